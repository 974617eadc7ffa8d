"""Does one hostile mail stall everyone else? (issue #15) Web latency of one device while
another device fetches crafted mail over IMAP through the gateway, in the namespace lab (needs
root and postfix, dovecot-imapd, dovecot-pop3d, clamav-daemon).

Device 1 sends HTTP requests through the tunnel to the lab's web server, one after the other,
for the whole run. Phase "idle": nothing else happens. Phase "noisy": device 0 fetches
``--messages`` copies (distinct Message-IDs, so each is judged) of the crafted mail of issue
#15 — an HTML anchor whose text is ``a。`` repeated ``--reps`` times (40 = the 402-byte mail,
which never finished judging before the fix; ``--reps 24`` stalls the old gateway ~4 s per
message and lets the run end).
Rows: device 1's request latency per phase (median, p99, max) and the longest gap between two
answers; device 0's fetch time per message.

    python bench/noisy_mail.py [--reps 40] [--messages 3] [--seconds 8]
    python bench/noisy_mail.py --code /work/main --reps 24     # the gateway of another checkout

(The lab runs the gateway from the checkout its own code comes from: ``--code``.) Prints a table and writes
bench/results/noisy_mail.json. tests/e2e/test_mail_stall.py asserts the same, lighter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = Path(sys.argv[sys.argv.index("--code") + 1]).resolve() if "--code" in sys.argv else ROOT
sys.path.insert(0, str(CODE))
# The lab starts the gateway as `python -m gateway.cli`, which puts the working directory
# first on its path (before PYTHONPATH): work from the checkout whose gateway is measured.
os.chdir(CODE)

from gateway.lab.mailservers import MAIL_DOMAIN, MAIL_HOST  # noqa: E402
from gateway.lab.topology import MAIL4, Lab  # noqa: E402

RESULTS = ROOT / "bench" / "results"

WEB_CLIENT = """
import json, socket, sys, time
# Resolved once: a lost DNS datagram costs the stub resolver a 5 s retry, which would be
# measured as a stall of the proxy (what this measures is the proxy's event loop).
address = socket.getaddrinfo("www.example.test", 80, socket.AF_INET, socket.SOCK_STREAM)[0][4]
end = time.monotonic() + {seconds}
out = []
while time.monotonic() < end:
    t = time.monotonic()
    try:
        s = socket.create_connection(address, timeout=60)
        s.sendall(b"GET /noisy HTTP/1.1\\r\\nHost: www.example.test\\r\\nConnection: close\\r\\n\\r\\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        ok = data.startswith(b"HTTP/1.1 ")
    except OSError:
        ok = False
    out.append([t, time.monotonic() - t, ok])
    # 40 requests a second at most: under the per-device new-connection rate (limits, 50/s),
    # which would otherwise refuse B's own requests and measure the limit, not the proxy.
    time.sleep(max(0.0, 0.025 - (time.monotonic() - t)))
print(json.dumps(out))
"""

IMAP_CLIENT = """
import imaplib, json, ssl, time
ctx = ssl.create_default_context(cafile={ca!r})
m = imaplib.IMAP4_SSL({host!r}, 993, ssl_context=ctx, timeout={timeout})
m.login({user!r}, 'taro-pass'); m.select('INBOX')
uids = m.uid('SEARCH', None, 'ALL')[1][0].split()
out = []
for uid in uids:
    t = time.monotonic()
    typ, data = m.uid('FETCH', uid, '(BODY.PEEK[])')
    out.append([t, time.monotonic() - t, typ])
m.logout()
print(json.dumps(out))
"""


def crafted_mail(reps: int, index: int) -> bytes:
    """The 402-byte mail of issue #15 (at reps=40), with its own Message-ID."""
    body = f'<a href="http://example.com/">{"a。" * reps}!</a>'
    return (f"From: sender@partner.example.co.jp\r\nTo: taro@{MAIL_DOMAIN}\r\nSubject: noisy {index}\r\n"
            f"Date: Sat, 05 Dec 2026 07:00:00 +0900\r\nMessage-ID: <noisy-{index}@bench.kanmon>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + body + "\r\n").encode()


def summary(latencies: list[float]) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "median_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "max_ms": ms[-1]}


def longest_gap(samples: list[list]) -> float:
    ends = sorted(t + d for t, d, _ in samples)
    return max((b - a for a, b in zip(ends, ends[1:])), default=0.0) * 1000


def web_phase(lab: Lab, seconds: float) -> subprocess.Popen:
    return subprocess.Popen(lab.devices[1].ns.cmd(sys.executable, "-c", textwrap.dedent(WEB_CLIENT.format(seconds=seconds))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> list:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"client failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure(lab: Lab, reps: int, messages: int, seconds: float, imap_timeout: float) -> dict:
    for i in range(messages):
        lab.mail_servers.put_message("taro", f"noisy{i}", crafted_mail(reps, i))
    idle = finish(web_phase(lab, seconds), seconds + 120)
    web = web_phase(lab, seconds)
    time.sleep(min(1.0, seconds / 4))
    code = IMAP_CLIENT.format(ca=str(lab.interception_ca), host=MAIL_HOST, user=f"taro@{MAIL_DOMAIN}",
                              timeout=imap_timeout)
    imap = subprocess.run(lab.devices[0].ns.cmd(sys.executable, "-c", textwrap.dedent(code)),
                          capture_output=True, text=True, timeout=imap_timeout * (messages + 2))
    noisy = finish(web, seconds + imap_timeout * (messages + 2))
    fetches = json.loads(imap.stdout.strip().splitlines()[-1]) if imap.returncode == 0 else []
    return {
        "idle": {**summary([d for _, d, ok in idle if ok]), "errors": sum(not ok for *_, ok in idle),
                 "longest_gap_ms": longest_gap(idle)},
        "noisy": {**summary([d for _, d, ok in noisy if ok]), "errors": sum(not ok for *_, ok in noisy),
                  "longest_gap_ms": longest_gap(noisy)},
        "imap_fetch_ms": [d * 1000 for _, d, _ in fetches],
        "imap_ok": imap.returncode == 0,
        "imap_error": "" if imap.returncode == 0 else imap.stderr[-500:],
    }


def run_lab(workdir: Path, reps: int, messages: int, seconds: float, imap_timeout: float) -> dict:
    lab = Lab(workdir, n_devices=2, mail=True)
    lab.config_overrides = {"mail": {"organization_hosts": [MAIL_HOST, MAIL4],
                                     "clamd_socket": str(workdir / "mail" / "clamd" / "clamd.sock")}}
    try:
        lab.build()
        lab.start_gateway()
        for device in lab.devices:
            lab.wait_for_peer(device)
        return measure(lab, reps, messages, seconds, imap_timeout)
    finally:
        lab.teardown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40, help="'a。' repetitions in the anchor (40: the 402-byte mail)")
    ap.add_argument("--messages", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each web phase")
    ap.add_argument("--imap-timeout", type=float, default=60.0)
    ap.add_argument("--code", help="run the gateway of this checkout (default: this one)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kanmon-bench-noisy-"))
    result = run_lab(workdir, args.reps, args.messages, args.seconds, args.imap_timeout)
    idle, noisy = result["idle"], result["noisy"]
    ratio = noisy["p99_ms"] / idle["p99_ms"] if idle.get("p99_ms") and noisy.get("p99_ms") else float("nan")
    print(f"gateway code: {CODE}; crafted mail: 'a。' x {args.reps}, "
          f"{args.messages} messages")
    print(f"{'phase':<8} {'requests':>8} {'errors':>7} {'median ms':>10} {'p99 ms':>9} {'max ms':>9} {'longest gap ms':>15}")
    for name, row in (("idle", idle), ("noisy", noisy)):
        print(f"{name:<8} {row.get('n', 0):>8} {row['errors']:>7} {row.get('median_ms', float('nan')):>10.1f} "
              f"{row.get('p99_ms', float('nan')):>9.1f} {row.get('max_ms', float('nan')):>9.1f} {row['longest_gap_ms']:>15.1f}")
    print(f"p99 noisy/idle: {ratio:.2f}; IMAP fetch ms: {', '.join(f'{x:.0f}' for x in result['imap_fetch_ms']) or 'failed'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "noisy_mail", "reps": args.reps, "messages": args.messages, "seconds": args.seconds,
           "gateway_code": str(CODE), "machine": platform.platform(),
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "p99_ratio": ratio, **result}
    name = "noisy_mail.json" if CODE == ROOT else f"noisy_mail-{CODE.name}.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
