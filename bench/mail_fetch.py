"""Added latency of an IMAP FETCH of a 1 MB message through the gateway, in the namespace lab
(needs root and postfix, dovecot-imapd, dovecot-pop3d, clamav-daemon).

Rows (same client code, one logged-in IMAPS connection, `UID FETCH n (BODY.PEEK[])`):

  direct              from the internet namespace straight to Dovecot (no tunnel, no gateway)
  gateway, judged     from a device through WireGuard and Kanmon, each message fetched for the
                      first time: held whole, judged (engine + clamd INSTREAM), released
  gateway, repeated   the same messages fetched again: the verdict is cached per message
                      (sha256), so this is tunnel + TLS interception + the IMAP adapter

There is no "gateway without the mail filter" row: without the addon, an implicit-TLS mail
connection never starts (mitmproxy's lazy connection strategy waits for the client, the
client waits for the server greeting); the addon is what opens the server side first.

The messages are clean (a 1 MB PDF-like attachment), so the bytes delivered are the
original ones. Prints a table and writes bench/results/mail_fetch.json.

    sudo /tmp/venv/bin/python bench/mail_fetch.py [--messages 10] [--size 1048576]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.lab.mailservers import MAIL_DOMAIN, MAIL_HOST  # noqa: E402
from gateway.lab.topology import MAIL4, Lab  # noqa: E402

RESULTS = ROOT / "bench" / "results"

CLIENT = """
import imaplib, json, ssl, time
ctx = ssl.create_default_context(cafile={ca!r})
m = imaplib.IMAP4_SSL({host!r}, 993, ssl_context=ctx)
m.login({user!r}, 'taro-pass'); m.select('INBOX')
uids = m.uid('SEARCH', None, 'ALL')[1][0].split()
out = {{}}
for rnd in range({rounds}):
    times = []
    for uid in uids:
        t = time.perf_counter()
        typ, data = m.uid('FETCH', uid, '(BODY.PEEK[])')
        times.append(time.perf_counter() - t)
        assert len(data[0][1]) >= {size}, len(data[0][1])
    out[str(rnd)] = times
m.logout()
print(json.dumps(out))
"""


def message(i: int, size: int) -> bytes:
    body = (f"filler line {i:04d} " * 4 + "\r\n").encode()
    blob = bytearray()
    while len(blob) < size:
        blob += body
    head = (f"From: Jiro <jiro@{MAIL_DOMAIN}>\r\nTo: taro@{MAIL_DOMAIN}\r\nSubject: bench {i}\r\n"
            f"Date: Mon, 01 Apr 2024 09:00:00 +0900\r\nMessage-ID: <bench-{i}@bench.kanmon>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n").encode()
    return head + bytes(blob[:size])


def run_client(ns, ca: str, host: str, rounds: int, size: int) -> dict:
    code = CLIENT.format(ca=ca, host=host, user=f"taro@{MAIL_DOMAIN}", rounds=rounds, size=size)
    proc = ns.python(textwrap.dedent(code), timeout=600, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"client failed: {proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)
    return {"n": len(ms), "median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))],
            "mean_ms": statistics.fmean(ms)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024 * 1024)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kanmon-bench-mail-"))
    lab = Lab(workdir, n_devices=1, mail=True)
    lab.config_overrides = {"mail": {"organization_hosts": [MAIL_HOST, MAIL4],
                                     "clamd_socket": str(workdir / "mail" / "clamd" / "clamd.sock")}}
    try:
        lab.build()
        lab.start_gateway()
        lab.wait_for_peer(lab.devices[0])
        for i in range(args.messages):
            lab.mail_servers.put_message("taro", f"bench{i}", message(i, args.size))
        direct = run_client(lab.inet, str(lab.ca.cert_path), MAIL4, 2, args.size)
        via = run_client(lab.devices[0].ns, str(lab.interception_ca), MAIL_HOST, 2, args.size)
    finally:
        lab.teardown()
    rows = {
        "direct": summary(direct["0"] + direct["1"]),
        "gateway, judged": summary(via["0"]),
        "gateway, repeated": summary(via["1"]),
    }
    base = rows["direct"]["median_ms"]
    print(f"IMAP FETCH BODY.PEEK[] of a {args.size // 1024} KiB message, {args.messages} messages")
    print(f"{'path':<20} {'median ms':>10} {'p90 ms':>10} {'added ms':>10}")
    for name, r in rows.items():
        print(f"{name:<20} {r['median_ms']:>10.1f} {r['p90_ms']:>10.1f} {r['median_ms'] - base:>10.1f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "mail_fetch", "size_bytes": args.size, "messages": args.messages,
           "machine": platform.platform(), "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows,
           "added_median_ms": {k: r["median_ms"] - base for k, r in rows.items()}}
    (RESULTS / "mail_fetch.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {RESULTS / 'mail_fetch.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
