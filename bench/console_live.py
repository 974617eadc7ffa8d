"""The console's live view (issue #21): what following the log store and serving many viewers
costs (gateway/logstore/follow.py, gateway/logstore/live.py).

Writes ``--records`` proxy records (one in ``--block-every`` a block) with the real LogStore,
then measures:

* follow: one ``LiveBlocks.poll_once`` over all of them (records/s read, parsed and filtered);
* viewers: ``--viewers`` cursors each reading every event from the ring (reads/s), and the
  memory the ring holds against the memory all the viewers add (tracemalloc);
* catch-up: one viewer that was away longer than the ring lasts, resuming from the start of
  the stream (events/s from the files).

    python bench/console_live.py [--records 200000] [--block-every 10] [--viewers 200] [--ring 2000]

Prints a table and writes bench/results/console_live.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.logstore import LogStore  # noqa: E402
from gateway.logstore.live import LiveBlocks  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--block-every", type=int, default=10)
    ap.add_argument("--viewers", type=int, default=200)
    ap.add_argument("--ring", type=int, default=2000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        hub = LiveBlocks(directory, streams=("proxy",), capacity=args.ring)
        start_cursor = hub.head()
        with LogStore(directory) as store:
            t = time.perf_counter()
            for i in range(args.records):
                store.append("proxy", {"device.id": f"d{i % 500}", "user.name": f"u{i % 500}", "source.ip": "10.8.0.2",
                                       "kanmon.verdict": "block" if i % args.block_every == 0 else "allow",
                                       "rule.id": "r", "rule.category": "webmail", "http.request.method": "GET",
                                       "url.full": f"https://site{i % 97}.example.jp/path/{i}"})
            write_s = time.perf_counter() - t
        blocks = (args.records + args.block_every - 1) // args.block_every

        t = time.perf_counter()
        added = LiveBlocks(directory, streams=("proxy",), capacity=args.ring)   # a second one, for the timing
        added._followers["proxy"] = type(added._followers["proxy"])(directory, "proxy", after=start_cursor["proxy"])
        added = added.poll_once()
        follow_s = time.perf_counter() - t
        assert added == blocks, (added, blocks)
        tracemalloc.start()
        base = tracemalloc.take_snapshot()
        assert hub.poll_once() == blocks
        ring_bytes = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename") if s.size_diff > 0)

        fresh = [hub.head() for _ in range(args.viewers)]
        behind = [dict(fresh[0], proxy=fresh[0]["proxy"] - 10 * args.ring) for _ in range(args.viewers)]
        base = tracemalloc.take_snapshot()
        t = time.perf_counter()
        served = 0
        for cursor in behind:          # each viewer reads the ring's last events (no files)
            cursor["proxy"] = max(cursor["proxy"], hub._floor["proxy"])
            events, _ = hub.read(cursor, limit=args.ring)
            served += len(events)
        viewers_s = time.perf_counter() - t
        viewer_bytes = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename") if s.size_diff > 0)
        tracemalloc.stop()

        t = time.perf_counter()
        cursor, caught = dict(start_cursor), 0
        while True:
            events, cursor = hub.read(cursor, limit=1000)
            if not events:
                break
            caught += len(events)
        catchup_s = time.perf_counter() - t
        assert caught == blocks, (caught, blocks)

    result = {
        "records": args.records, "blocks": blocks, "ring": args.ring, "viewers": args.viewers,
        "write_records_per_s": round(args.records / write_s),
        "follow_records_per_s": round(args.records / follow_s),
        "ring_memory_bytes": ring_bytes,
        "viewer_reads_events_per_s": round(served / viewers_s),
        "viewers_memory_bytes_during_reads": viewer_bytes,
        "catchup_from_files_events_per_s": round(caught / catchup_s),
        "catchup_records_scanned_per_s": round(args.records / catchup_s),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "console_live.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"| {'measure':<44} | {'value':>14} |\n|{'-' * 46}|{'-' * 16}|")
    for key, value in result.items():
        print(f"| {key:<44} | {value:>14,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
