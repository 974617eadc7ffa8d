"""Download scanning figures (issue #18): what a scan adds to a risky download, by size — the
content sniff, the bounded decode and clamd's INSTREAM answer (a real clamd, started offline with
our one custom signature; a production clamd with the full databases is slower per byte) — and
what N scans at once cost through the gateway's asyncio client (its max_concurrent slots).

    sudo /work/main/.venv/bin/python bench/download_scan.py [--rounds 5]

Prints a table and writes bench/results/download_scan.json. One run on a shared, noisy machine:
compare within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.lab.clamd import TEST_MARKER, LabClamd  # noqa: E402
from gateway.scan.clamdclient import AsyncClamd  # noqa: E402
from gateway.scan.decoding import decode_bounded  # noqa: E402
from gateway.scan.filetype import SNIFF_BYTES, classify  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PE = b"MZ" + b"\0" * 62 + b"PE\0\0" + b"\0" * 200
SIZES = [64 * 1024, 1024 * 1024, 8 * 1024 * 1024, 25 * 1024 * 1024]


def body(size: int, infected: bool) -> bytes:
    filler = os.urandom(size // 2) + b"A" * (size - size // 2 - len(PE))   # half incompressible
    data = PE + filler
    return data[: size - len(TEST_MARKER)] + TEST_MARKER if infected else data[:size]


async def measure(client: AsyncClamd, rounds: int) -> list[dict]:
    rows = []
    for size in SIZES:
        for infected in (False, True):
            data = body(size, infected)
            packed = gzip.compress(data, compresslevel=1)
            sniff, decode, scan = [], [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                assert classify(data[:SNIFF_BYTES], filename="setup.exe") is not None
                t1 = time.perf_counter()
                assert decode_bounded(packed, "gzip", 32 * 1024 * 1024) == data
                t2 = time.perf_counter()
                result = await client.scan(data)
                t3 = time.perf_counter()
                assert result.infected is infected
                sniff.append(t1 - t0)
                decode.append(t2 - t1)
                scan.append(t3 - t2)
            rows.append({"bytes": size, "infected": infected, "rounds": rounds,
                         "sniff_us_median": round(statistics.median(sniff) * 1e6, 1),
                         "gunzip_ms_median": round(statistics.median(decode) * 1e3, 2),
                         "clamd_ms_median": round(statistics.median(scan) * 1e3, 2),
                         "clamd_ms_max": round(max(scan) * 1e3, 2)})
    return rows


async def concurrent(client: AsyncClamd, n: int, size: int) -> dict:
    data = body(size, False)
    t0 = time.perf_counter()
    results = await asyncio.gather(*[client.scan(data) for _ in range(n)])
    elapsed = time.perf_counter() - t0
    assert not any(r.infected for r in results)
    return {"scans": n, "bytes_each": size, "max_concurrent": client.max_concurrent,
            "wall_ms": round(elapsed * 1e3, 1), "per_scan_ms": round(elapsed * 1e3 / n, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clamd = LabClamd(Path(tmp), stream_max="64M").start()
        try:
            client = AsyncClamd(str(clamd.socket_path), timeout=120, max_concurrent=8)

            async def run():
                return await measure(client, args.rounds), [await concurrent(client, n, 1024 * 1024) for n in (1, 8, 32)]

            rows, parallel = asyncio.run(run())
        finally:
            clamd.stop()
    print(f"{'bytes':>10} {'infected':>8} {'sniff µs':>9} {'gunzip ms':>10} {'clamd ms':>9} {'max ms':>8}")
    for r in rows:
        print(f"{r['bytes']:>10} {str(r['infected']):>8} {r['sniff_us_median']:>9} {r['gunzip_ms_median']:>10} "
              f"{r['clamd_ms_median']:>9} {r['clamd_ms_max']:>8}")
    print(f"\n{'scans at once':>13} {'MiB each':>8} {'slots':>5} {'wall ms':>8} {'per scan ms':>11}")
    for p in parallel:
        print(f"{p['scans']:>13} {p['bytes_each'] // 1048576:>8} {p['max_concurrent']:>5} {p['wall_ms']:>8} {p['per_scan_ms']:>11}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "download_scan.json").write_text(json.dumps({"sizes": rows, "concurrent": parallel,
                                                            "cpu_count": os.cpu_count()}, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'download_scan.json'}")


if __name__ == "__main__":
    main()
