"""Firewall log figures (issue #18): what the reader's pure path costs per logged packet --
parsing nfnetlink_log datagrams (batches as the kernel sends them with the reader's queue
threshold of 64) and aggregating them -- and what a flush of one interval costs, for a flood
(one key) and a scan (the per-interval key bounds reached).

The kernel hands the log at most 200 packets/s per drop rule (11 rules: 2,200 packets/s in
the worst case); the reader must keep up with that on one core with a wide margin.

    python bench/firewalllog.py [--packets 200000]

Prints a table and writes bench/results/firewalllog.json.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import struct
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.net.firewalllog import FirewallAggregator, parse_messages  # noqa: E402

RESULTS = ROOT / "bench" / "results"
KERNEL_WORST_CASE_PPS = 11 * 200


def _attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * ((-length) % 4)


def message(src: str, dst: str, dport: int, prefix: str) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, ipaddress.IPv4Address(src).packed,
                     ipaddress.IPv4Address(dst).packed) + struct.pack("!HHHH", 40000, dport, 8, 0)
    body = struct.pack("!BBH", 2, 0, 7) + _attr(1, struct.pack("!HBB", 0x0800, 0, 0)) + \
        _attr(10, prefix.encode() + b"\0") + _attr(9, ip)
    return struct.pack("=IHHII", 16 + len(body), 0x400, 0, 0, 0) + body


def run(name: str, datagrams: list[bytes], packets: int) -> dict:
    agg = FirewallAggregator(lambda ip: ("dev", "user", ("staff",)))
    now = datetime.now(UTC)
    started = time.perf_counter()
    for d in datagrams:
        for p in parse_messages(d):
            agg.add(p, now, 0.0)
    parsed = time.perf_counter() - started
    started = time.perf_counter()
    records = agg.flush()
    flushed = time.perf_counter() - started
    return {"case": name, "packets": packets, "records": len(records),
            "us_per_packet": round(parsed / packets * 1e6, 2), "packets_per_s": round(packets / parsed),
            "flush_ms": round(flushed * 1e3, 2),
            "margin_over_kernel_worst_case": round(packets / parsed / KERNEL_WORST_CASE_PPS, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--packets", type=int, default=200_000)
    args = parser.parse_args()
    n = args.packets - args.packets % 64
    flood = [b"".join(message("10.77.0.2", "198.51.100.9", 5000, "kanmon-fw:not-tcp ") for _ in range(64))
             for _ in range(n // 64)]
    scan = [b"".join(message(f"10.77.{(i * 64 + j) // 250 % 250}.{(i * 64 + j) % 250 + 2}", "198.51.100.9",
                             (i * 64 + j) % 60000 + 1, "kanmon-fw:not-tcp ") for j in range(64))
            for i in range(n // 64)]
    rows = [run("flood: one device, one destination", flood, n), run("scan: many sources and ports", scan, n)]
    print(f"{'case':40} {'packets':>9} {'records':>8} {'µs/pkt':>7} {'pkt/s':>9} {'flush ms':>9} {'x kernel max':>12}")
    for r in rows:
        print(f"{r['case']:40} {r['packets']:>9,} {r['records']:>8,} {r['us_per_packet']:>7} {r['packets_per_s']:>9,} "
              f"{r['flush_ms']:>9} {r['margin_over_kernel_worst_case']:>12}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "firewalllog.json").write_text(json.dumps({"rows": rows, "kernel_worst_case_pps": KERNEL_WORST_CASE_PPS},
                                                         indent=2) + "\n")


if __name__ == "__main__":
    main()
