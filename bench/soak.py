"""Soak: many devices with mixed web and DNS (and optionally mail) traffic for a while (needs root).

    sudo .venv/bin/python bench/soak.py [--devices 50] [--seconds 600] [--mail]

Every device (its own namespace and wireguard-go tunnel) loops: resolve and fetch an allowed
page (must be 200), fetch a blocked one (must be the 403 block page), a bare DNS query; with
--mail a few devices also read mail over IMAPS. Meanwhile the gateway's RSS and open file
descriptors are sampled. At the end:

- verdicts: every answer is the expected one (wrong = allowed 403, blocked 200, DNS wrong);
- lost log records: every request the devices saw complete has its `proxy` record;
- RSS growth (MB/hour, least-squares slope after the first fifth of the run);
- leaks: open descriptors and live connections back near the start after the load stops;
- latency p50/p99 of the web requests;
- the shape of the RSS curve (mean RSS per minute, slope of each half of the warm part), so
  warm-up (caches filling to their caps: the slope falls) is told apart from a leak (it does not);
- the flow table (the gateway's live ConnectionState objects) at the start, early, late and after the load,
  from the gateway's opt-in memory reports (gateway/runtime/diagnostics.py, SIGUSR2).

The gateway's memory reports (start, early, late, after the load: watched object counts, glibc's
in-use and free-but-held totals, which also go into the JSON) are copied to --reports-dir. With
--tracemalloc the gateway also traces allocations (top sites, growth since the start). Tracing costs CPU
and memory, so its RSS figures are not comparable with a run without it.

Prints a table, writes bench/results/soak.json, exits 1 if an invariant fails (the CI test
runs it for 60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.runtime.diagnostics import parse_allocator, parse_type_counts  # noqa: E402
from gateway.lab.topology import Lab  # noqa: E402

RESULTS = ROOT / "bench" / "results"

WORKER = textwrap.dedent("""
    import json, socket, sys, time, urllib.error, urllib.request
    from dnslib import DNSRecord
    device, seconds = sys.argv[1], float(sys.argv[2])
    out = {"web": [], "blocked": [], "dns_ok": 0, "dns_bad": 0, "errors": []}
    end, n = time.time() + seconds, 0
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.time() < end:
        n += 1
        marker = f"/soak-{device}-{n}"
        start = time.time()
        try:
            code = opener.open("http://www.example.test" + marker, timeout=15).status
        except urllib.error.HTTPError as e:
            code = e.code
        except Exception as e:
            code = None; out["errors"].append(repr(e)[:120])
        out["web"].append([marker, code, round((time.time() - start) * 1000, 2)])
        try:
            opener.open(f"http://blocked.test/soak-{device}-{n}", timeout=15)
            out["blocked"].append(200)
        except urllib.error.HTTPError as e:
            out["blocked"].append(e.code if e.headers.get("X-Kanmon-Rule") else -e.code)
        except Exception as e:
            out["blocked"].append(None); out["errors"].append(repr(e)[:120])
        try:
            r = DNSRecord.parse(DNSRecord.question(f"q{n}.{device}.example.test").send("10.77.0.1", 53, timeout=5))
            out["dns_ok" if r.rr else "dns_bad"] += 1
        except Exception as e:
            out["dns_bad"] += 1; out["errors"].append(repr(e)[:120])
        time.sleep(0.5)
    print(json.dumps(out))
""")

MAIL_WORKER = textwrap.dedent("""
    import imaplib, json, ssl, sys, time
    ctx = ssl.create_default_context(cafile=sys.argv[3])
    host, user = sys.argv[4], sys.argv[5]
    seconds, ok, bad, errors = float(sys.argv[2]), 0, 0, []
    end = time.time() + seconds
    while time.time() < end:
        try:
            m = imaplib.IMAP4_SSL(host, 993, ssl_context=ctx)
            m.login(user, "taro-pass"); m.select("INBOX")
            typ, data = m.uid("SEARCH", None, "ALL")
            for uid in data[0].split():
                m.uid("FETCH", uid, "(BODY.PEEK[])")
            m.logout(); ok += 1
        except Exception as e:
            bad += 1; errors.append(repr(e)[:120])
        time.sleep(2)
    print(json.dumps({"mail_ok": ok, "mail_bad": bad, "errors": errors[:5]}))
""")


def gateway_pid(lab: Lab) -> int:
    return int((lab.state_dir / "kanmon.pid").read_text())


def sample(pid: int) -> tuple[float, int]:
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def memory_report(lab: Lab, pid: int, number: int, timeout: float = 60) -> str:
    """Ask the gateway for its memory report number `number` (SIGUSR2) and return its text."""
    path = lab.state_dir / f"memory-{number}.txt"
    os.kill(pid, signal.SIGUSR2)
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise RuntimeError(f"the gateway wrote no {path.name} within {timeout} s")
        time.sleep(0.2)
    return path.read_text()


FLOW_TYPE = "gateway.proxy.connections.ConnectionState"


def rss_shape(samples: list[tuple[float, float, int]], warm_from: float) -> dict:
    """Mean RSS per minute and the slope of each half of the warm part: a cache filling to
    its cap shows a falling slope, a leak a steady one."""
    per_minute: dict[int, list[float]] = {}
    for t, rss, _ in samples:
        per_minute.setdefault(int(t // 60), []).append(rss)
    warm = [(t, rss) for t, rss, _ in samples if t >= warm_from]
    mid = (warm[0][0] + warm[-1][0]) / 2 if warm else 0
    return {
        "rss_mb_by_minute": [round(statistics.fmean(v), 1) for _, v in sorted(per_minute.items())],
        "rss_growth_first_half_mb_per_hour": round(slope_per_hour([p for p in warm if p[0] <= mid]), 1),
        "rss_growth_second_half_mb_per_hour": round(slope_per_hour([p for p in warm if p[0] > mid]), 1),
    }


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 3:
        return 0.0
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 0.0 if den == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 3600


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--mail", action="store_true", help="also IMAPS reading on a few devices (Postfix/Dovecot lab)")
    ap.add_argument("--out", default=str(RESULTS / "soak.json"))
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace the gateway's allocations and keep its memory reports (slower; RSS not comparable)")
    ap.add_argument("--reports-dir", default=str(RESULTS / "soak-memory"),
                    help="where the gateway's memory reports (start, early, late, after) are copied")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the gateway, e.g. KANMON_MALLOC_TRIM_SECONDS=30 (repeatable)")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the lab's directory (logs, state) after the run")
    args = ap.parse_args()

    extra_env = {}
    for item in args.gateway_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"--gateway-env wants NAME=VALUE, not {item!r}")
        extra_env[name] = value

    workdir = Path(tempfile.mkdtemp(prefix="kanmon-soak-"))
    lab = Lab(workdir, n_devices=0, mail=args.mail)
    if args.mail:
        from gateway.lab.mailservers import MAIL_HOST
        from gateway.lab.topology import MAIL4
        lab.config_overrides = {"mail": {"organization_hosts": [MAIL_HOST, MAIL4],
                                         "clamd_socket": str(workdir / "mail" / "clamd" / "clamd.sock")}}
    report: dict = {"devices": args.devices, "seconds": args.seconds, "mail": args.mail}
    try:
        t0 = time.time()
        lab.build()
        if args.mail:
            lab.mail_servers.put_message("taro", "hello.eml", b"From: a@example.test\r\nTo: taro@example.test\r\n"
                                         b"Subject: soak\r\nMessage-ID: <soak@example.test>\r\n\r\nhello\r\n")
        for i in range(1, args.devices + 1):
            lab.add_device(i)
        gw_env = {"KANMON_DIAGNOSTICS": "1", "KANMON_DIAGNOSTICS_DIR": str(lab.state_dir)}
        if args.tracemalloc:
            gw_env["KANMON_TRACEMALLOC"] = "1"
        gw_env.update(extra_env)
        report["gateway_env"] = {k: v for k, v in gw_env.items() if not k.startswith("KANMON_DIAGNOSTICS")}
        lab.start_gateway(timeout=120, env=gw_env)
        for dev in lab.devices:
            lab.wait_for_peer(dev, timeout=30)
        report["setup_s"] = round(time.time() - t0, 1)
        pid = gateway_pid(lab)
        time.sleep(2)
        rss0, fds0 = sample(pid)
        reports: list[tuple[str, str]] = [("start", memory_report(lab, pid, 1))]   # before any load
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        # Each worker writes its result (every request it made: megabytes after an hour) to a
        # file: into a pipe nobody reads until the end it blocked at 64 KiB and the hour's
        # run never finished.
        results_dir = workdir / "worker-results"
        results_dir.mkdir()
        result_files = []

        def start_worker(cmd: list[str], name: str, **kw) -> subprocess.Popen:
            path = results_dir / f"{name}.json"
            result_files.append(path)
            with open(path, "w") as out:
                return subprocess.Popen(cmd, stdout=out, text=True, **kw)

        workers = [start_worker(d.ns.cmd(sys.executable, "-c", WORKER, d.device_id, str(args.seconds)),
                                f"web-{d.device_id}", env=env) for d in lab.devices]
        if args.mail:
            from gateway.lab.mailservers import MAIL_DOMAIN, MAIL_HOST
            workers += [start_worker(d.ns.cmd(sys.executable, "-c", MAIL_WORKER, d.device_id, str(args.seconds),
                                              str(lab.interception_ca), MAIL_HOST, f"taro@{MAIL_DOMAIN}"),
                                     f"mail-{d.device_id}")
                        for d in lab.devices[:3]]
        samples, start = [], time.time()
        due = [("early", args.seconds / 5), ("late", args.seconds * 0.95)]
        while any(w.poll() is None for w in workers):
            rss, fds = sample(pid)
            samples.append((time.time() - start, rss, fds))
            if due and samples[-1][0] >= due[0][1]:
                reports.append((due.pop(0)[0], memory_report(lab, pid, len(reports) + 1)))
            time.sleep(2)
        for w in workers:
            w.wait()
        outputs = [json.loads(path.read_text().strip().splitlines()[-1]) for path in result_files]
        time.sleep(25)  # UDP DNS streams idle out after 20 s; TCP connections are closed already
        rss1, fds1 = sample(pid)
        reports.append(("after", memory_report(lab, pid, len(reports) + 1)))
        flows = {f"flows_{name}": parse_type_counts(text).get(FLOW_TYPE, 0) for name, text in reports}
        # glibc's totals at each report: live allocations vs freed-but-held memory tell a leak
        # (in use grows) from fragmentation or a high-water mark (free-but-held grows)
        allocator = {f"allocator_{name}": parse_allocator(text) for name, text in reports}
        out_dir = Path(args.reports_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for number, (name, _) in enumerate(reports, 1):
            shutil.copy(lab.state_dir / f"memory-{number}.txt", out_dir / f"memory-{number}-{name}.txt")

        web = [w for o in outputs for w in o.get("web", [])]
        blocked = [b for o in outputs for b in o.get("blocked", [])]
        latencies = sorted(w[2] for w in web if w[1] == 200)
        completed = {w[0] for w in web if w[1] == 200}
        logged = {r.get("url.full", "").split("www.example.test", 1)[-1] for r in lab.log_records("proxy")}
        warm = [s for s in samples if s[0] >= args.seconds / 5]
        report.update({
            "web_requests": len(web), "web_ok": len(completed),
            "wrong_verdicts": sum(1 for w in web if w[1] not in (200,)) + sum(1 for b in blocked if b != 403),
            "blocked_requests": len(blocked),
            "dns_ok": sum(o.get("dns_ok", 0) for o in outputs), "dns_bad": sum(o.get("dns_bad", 0) for o in outputs),
            "mail_sessions_ok": sum(o.get("mail_ok", 0) for o in outputs),
            "mail_sessions_bad": sum(o.get("mail_bad", 0) for o in outputs),
            "client_errors": sum(len(o.get("errors", [])) for o in outputs),
            "error_samples": [e for o in outputs for e in o.get("errors", [])][:5],
            "lost_log_records": len(completed - logged),
            "requests_per_s": round((len(web) + len(blocked)) / args.seconds, 1),
            "latency_p50_ms": statistics.median(latencies) if latencies else None,
            "latency_p99_ms": latencies[int(0.99 * len(latencies)) - 1] if latencies else None,
            "rss_start_mb": round(rss0, 1), "rss_end_mb": round(rss1, 1),
            "rss_peak_mb": round(max(s[1] for s in samples), 1) if samples else None,
            "rss_growth_mb_per_hour": round(slope_per_hour([(s[0], s[1]) for s in warm]), 1),
            **rss_shape(samples, args.seconds / 5),
            "tracemalloc": args.tracemalloc,
            **flows,
            **allocator,
            "fds_start": fds0, "fds_peak": max(s[2] for s in samples) if samples else None, "fds_end": fds1,
        })
    finally:
        lab.teardown()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)   # keys, logs, mail spool: hundreds of MB after an hour

    failures = []
    if report["wrong_verdicts"]:
        failures.append(f"{report['wrong_verdicts']} wrong verdicts")
    if report["lost_log_records"]:
        failures.append(f"{report['lost_log_records']} completed requests without a log record")
    if report["dns_bad"] > 0.01 * max(1, report["dns_ok"]):
        failures.append(f"{report['dns_bad']} failed DNS queries")
    if report["fds_end"] > report["fds_start"] + 20:
        failures.append(f"descriptor leak: {report['fds_start']} -> {report['fds_end']}")
    if report.get("flows_after", 0) > 20:
        failures.append(f"flow-table leak: {report['flows_after']} live connections after the load")
    if args.mail and report["mail_sessions_bad"]:
        failures.append(f"{report['mail_sessions_bad']} failed mail sessions")
    report["failures"] = failures
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"written: {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
