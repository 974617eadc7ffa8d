"""Proxy throughput, side by side in one run, in the namespace lab (needs root).

Scenarios, all from one WireGuard device in its namespace to nginx in the fake internet
(HTTP keep-alive, small responses, `wrk` with N connections):

  tunnel          the WireGuard tunnel, routed and masqueraded by the gateway, no proxy
  mitmproxy       + bare `mitmdump --mode transparent` (no addons) behind an nftables redirect
  mitmproxy jemalloc  bare mitmdump with jemalloc preloaded, as `kanmon run` preloads it: the
                  fair reference for the gateway's own ratio (allocator held equal)
  mitmproxy xW    + W bare mitmdump workers, nftables spreading connections (jhash of the
                  source address and port) over their ports: does one-process-per-core scale?
  e2guardian      Debian's e2guardian 5.3 (C++ filtering proxy) as an explicit proxy on the gateway
                  (it has no transparent mode for plain redirects of every port), its banned-site
                  list loaded with the same domains as policies/lists/*.txt plus blocked.test;
                  the device sends absolute-form requests to it (wrk Lua script)
  kanmon          the Kanmon gateway (`kanmon run`: identity, built-in host rules, enforcer, access log)
  kanmon+policy   the same with the shipped example policy (policies/example.yaml: every list,
                  rule groups, tenants) compiled into the engine
  kanmon+policy glibc  the same on glibc's malloc (KANMON_ALLOCATOR=glibc), next to bare mitmproxy

Fairness on a shared machine: the scenarios run in ``--rounds`` rounds, each round runs every
scenario once, and each round starts one step further along the list (rotated order), so no
scenario is always the one that runs last, minutes after bare mitmproxy, when the machine's
load has drifted. Every ratio is taken between two figures of the *same* round (e.g.
kanmon+policy / mitmproxy of round 2) and the table shows the median over the rounds, with
the per-round ratios to bare mitmproxy listed below it.

Prints a table with ratios and writes bench/results/proxy.json (per-round figures, per-scenario
medians and per-round ratios).

    sudo .venv/bin/python bench/proxy.py [--duration 10] [--rounds 3] [--connections 10] [--workers 2]
        [--baseline DIR]   # also the gateway of another checkout, same rounds (before/after a change)
    sudo .venv/bin/python bench/proxy.py --suite https [--tls-names 1000] [--before COMMIT]
        # HTTPS keep-alive and a new TLS connection per request (see "HTTPS through interception"
        # below), bare mitmdump and Kanmon with the example policy, gateway CPU-seconds per 1,000
        # requests; writes bench/results/proxy_https.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.runtime.allocator import find_jemalloc  # noqa: E402
from gateway.lab.topology import GATEWAY_TUNNEL4, TUNNEL4, WEB4, WG_PORT, Lab, run, wait_until  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def parse_wrk(text: str) -> dict:
    def latency_ms(value: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
        number, unit = float(m.group(1)), m.group(2)
        return number / 1000 if unit == "us" else number * 1000 if unit == "s" else number

    out = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", text, re.M)
        out[f"p{pct}_ms"] = latency_ms(m.group(1)) if m else None
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    out["non_2xx"] = int(errors.group(1)) if errors else 0
    out["socket_errors"] = socket_errors.group(1).strip() if socket_errors else ""
    out["requests"] = int(re.search(r"(\d+) requests in", text).group(1))
    return out


def load(lab: Lab, duration: int, connections: int, via_proxy: str | None = None) -> dict:
    """wrk from the device. With `via_proxy` (host:port) the requests go to that explicit
    proxy in absolute form, for the same URL."""
    dev = lab.devices[0]
    url, extra = f"http://{WEB4}/bench", []
    if via_proxy:
        script = lab.workdir / "absolute-form.lua"
        script.write_text(f'wrk.path = "http://{WEB4}/bench"\nwrk.headers["Host"] = "{WEB4}"\n')
        url, extra = f"http://{via_proxy}/", ["-s", str(script)]
    # After a switch between the manual tunnel and the gateway the device's WireGuard session
    # is renewed: wait until a request gets through before the warm-up and the measurement.
    probe = ["curl", "-sS", "-o", "/dev/null", "--max-time", "2"]
    if via_proxy:
        probe += ["--proxy", f"http://{via_proxy}"]
    wait_until(lambda: dev.ns.run(*probe, f"http://{WEB4}/bench", check=False, timeout=10).returncode == 0,
               30, "a request through the scenario", interval=0.2)
    dev.ns.run("wrk", "-t1", "-c", str(connections), "-d", "2s", *extra, url, timeout=60)  # warm-up
    result = dev.ns.run("wrk", "-t1", "-c", str(connections), "-d", f"{duration}s", "--latency", *extra, url,
                        timeout=duration + 60)
    return parse_wrk(result.stdout)


def prepare_e2guardian(lab: Lab, port: int) -> Path:
    """A private copy of Debian's e2guardian configuration: no daemon, our port, its
    banned-site list = the domains of policies/lists plus the lab's blocked.test. Made once;
    returns the main configuration file for ``start_e2guardian``."""
    etc = lab.workdir / "e2guardian"
    shutil.copytree("/etc/e2guardian", etc)
    etc.chmod(0o755)
    lab.workdir.chmod(0o755)
    for conf in etc.rglob("*.conf"):
        text = conf.read_text(errors="replace").replace("/etc/e2guardian", str(etc))
        conf.write_text(text)
    main = etc / "e2guardian.conf"
    text = main.read_text()
    text = re.sub(r"^filterports = .*$", f"filterports = {port}", text, flags=re.M)
    text = re.sub(r"^nodaemon = .*$", "nodaemon = on", text, flags=re.M)
    text += f"\npidfilename = '{lab.workdir}/e2guardian.pid'\nloglocation = '{lab.workdir}/e2guardian-access.log'\n"
    main.write_text(text)
    domains = {"blocked.test"}
    for lst in (ROOT / "policies" / "lists").glob("*.txt"):
        for line in lst.read_text().splitlines():
            entry = line.split("#", 1)[0].strip().removeprefix("||").removesuffix("^")
            if entry and "/" not in entry and " " not in entry:
                domains.add(entry)
    for owned in ("e2guardian-access.log", "e2guardian.pid"):  # it drops privileges to user e2guardian
        path = lab.workdir / owned
        path.touch()
        shutil.chown(path, "e2guardian", "e2guardian")
    with open(etc / "lists" / "bannedsitelist", "a") as f:
        f.write("\n" + "\n".join(sorted(domains)) + "\n")
    return main


def start_e2guardian(lab: Lab, main: Path, port: int) -> subprocess.Popen:
    (lab.workdir / "e2guardian.pid").write_text("")  # a previous round's pid must not stop it starting
    proc = lab.gw.popen("e2guardian", "-N", "-c", str(main), stdout=open(lab.workdir / "e2guardian.out", "w"))
    wait_until(lambda: f":{port} " in lab.gw.run("ss", "-ltnH").stdout or proc.poll() is not None, 30, "e2guardian")
    if proc.poll() is not None:
        raise RuntimeError("e2guardian did not start: " + (lab.workdir / "e2guardian.out").read_text())
    return proc


def manual_tunnel(lab: Lab) -> None:
    """The tunnel alone: wireguard-go with the device as peer, routed + masqueraded."""
    gw, wg = lab.gw, lab.wg_interface
    env = {k: v for k, v in os.environ.items() if k != "WG_PROCESS_FOREGROUND"}
    run(gw.cmd("wireguard-go", wg), env=env)
    gw.run("wg", "set", wg, "private-key", str(lab.state_dir / "wg-private.key"), "listen-port", str(WG_PORT))
    for dev in lab.devices:
        gw.run("wg", "set", wg, "peer", dev.public_key, "allowed-ips", f"{dev.ipv4}/32")
    gw.run("ip", "addr", "add", f"{GATEWAY_TUNNEL4}/{TUNNEL4.split('/')[1]}", "dev", wg)
    gw.run("ip", "link", "set", wg, "mtu", "1420", "up")
    gw.run("sysctl", "-qw", "net.ipv4.ip_forward=1")


def steer(lab: Lab, ports: list[int] | None) -> None:
    """nft table for the manual scenarios: masquerade, plus redirect to bare mitmdump port(s)."""
    wg, up = lab.wg_interface, lab.uplink_interface
    redirect = ""
    if ports:
        if len(ports) == 1:
            target = f":{ports[0]}"
        else:
            mapping = ", ".join(f"{i} : {p}" for i, p in enumerate(ports))
            target = f": jhash ip saddr . tcp sport mod {len(ports)} map {{ {mapping} }}"
        redirect = f'chain pre {{ type nat hook prerouting priority dstnat; policy accept; iifname "{wg}" meta l4proto tcp redirect to {target}; }}'
    ruleset = (f"table inet benchsteer {{}}\ndelete table inet benchsteer\n"
               f"table inet benchsteer {{\n {redirect}\n"
               f' chain post {{ type nat hook postrouting priority srcnat; policy accept; oifname "{up}" masquerade; }}\n}}\n')
    lab.gw.run("nft", "-f", "-", input=ruleset)


def start_mitmdump(lab: Lab, port: int, confdir: Path, preload: Path | None = None) -> subprocess.Popen:
    mitmdump = Path(sys.executable).parent / "mitmdump"
    env = dict(os.environ, LD_PRELOAD=str(preload)) if preload else None
    proc = lab.gw.popen(str(mitmdump), "--mode", f"transparent@{port}", "--set", "connection_strategy=lazy",
                        "--set", f"confdir={confdir}", "-q",
                        "--set", f"ssl_verify_upstream_trusted_ca={lab.ca.cert_path}",   # HTTPS: the lab's servers
                        env=env)
    wait_until(lambda: f":{port} " in lab.gw.run("ss", "-ltnH").stdout or proc.poll() is not None, 30,
               f"mitmdump on {port}")
    if preload and proc.poll() is None and preload.name not in Path(f"/proc/{proc.pid}/maps").read_text():
        raise RuntimeError(f"mitmdump on {port} did not load {preload}")
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


class Modes:
    """Which of the two set-ups the lab is in: the manual tunnel (wireguard-go + nft steering,
    for tunnel / mitmproxy / e2guardian) or the Kanmon gateway (it owns the tunnel and its own
    nft table). Rounds go back and forth between them."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.mode: str | None = None
        self.gateway_overrides: tuple | None = None
        self.ca_tag = "after"     # whose interception CA is in the state directory (see use_ca)

    def manual(self) -> None:
        lab = self.lab
        if self.mode == "manual":
            return
        if self.mode == "gateway":
            lab.stop_gateway()  # removes its nft table and the tunnel interface
            lab.gw.run("ip", "link", "del", lab.wg_interface, check=False)
        manual_tunnel(lab)
        self.mode = "manual"

    def use_ca(self, tag: str) -> None:
        """Park the current interception CA directory under its tag and bring in `tag`'s
        (a gateway that finds none makes its own), so two commits never share one CA."""
        if tag == self.ca_tag:
            return
        confdir = self.lab.state_dir / "mitmproxy"
        parked = self.lab.workdir / f"mitmproxy-ca-{self.ca_tag}"
        if confdir.exists():
            shutil.rmtree(parked, ignore_errors=True)
            confdir.rename(parked)
        incoming = self.lab.workdir / f"mitmproxy-ca-{tag}"
        if incoming.exists():
            incoming.rename(confdir)
        self.ca_tag = tag

    def gateway(self, overrides: dict, env: dict | None = None, ca: str = "after") -> None:
        lab = self.lab
        if self.mode == "gateway" and self.gateway_overrides == (overrides, env) and self.ca_tag == ca:
            return
        if self.mode == "manual":
            lab.gw.run("nft", "delete", "table", "inet", "benchsteer", check=False)
            lab.gw.run("ip", "link", "del", lab.wg_interface, check=False)
            lab.gw.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
        elif self.mode == "gateway":
            lab.stop_gateway()
        self.use_ca(ca)
        lab.write_config(overrides)
        lab.start_gateway(env=env)
        lab.wait_for_peer(lab.devices[0])
        self.mode, self.gateway_overrides = "gateway", (overrides, env)


BENCH_LIMITS = {"tunnel_packets_per_second": 100_000, "new_connections_per_second": 100_000,
                "new_connections_burst": 100_000}


def scenarios(lab: Lab, modes: Modes, args: argparse.Namespace, workdir: Path) -> dict:
    """name -> a function that sets the scenario up, loads it once and returns wrk's figures."""
    def load_now() -> dict:
        return load(lab, args.duration, args.connections)

    def tunnel() -> dict:
        modes.manual()
        steer(lab, None)
        return load_now()

    def mitmproxy(ports: list[int], preload: Path | None = None) -> dict:
        modes.manual()
        procs = [start_mitmdump(lab, p, workdir / "mitm", preload) for p in ports]
        try:
            steer(lab, ports)
            return load_now()
        finally:
            stop(procs)
            steer(lab, None)

    e2g_conf: list[Path] = []

    def e2guardian() -> dict:
        modes.manual()
        steer(lab, None)
        if not e2g_conf:
            e2g_conf.append(prepare_e2guardian(lab, 18090))
        procs = [start_e2guardian(lab, e2g_conf[0], 18090)]
        try:
            return load(lab, args.duration, args.connections, via_proxy=f"{GATEWAY_TUNNEL4}:18090")
        finally:
            stop(procs)

    def kanmon(overrides: dict, env: dict | None = None) -> dict:
        # The bench's one device stands for many phones: its load (~3,000 packets/s at 900
        # req/s) would meet the per-device limits (tunnel packets, new connections), which
        # bench/noisy_neighbour.py measures; here the proxy's own cost is the subject.
        overrides = {**overrides, "limits": {**BENCH_LIMITS, **overrides.get("limits", {})}}
        modes.gateway(overrides, env)
        return load_now()

    jemalloc = find_jemalloc()
    out = {
        "tunnel": tunnel,
        "mitmproxy": lambda: mitmproxy([18080]),
    }
    if jemalloc is not None:
        out["mitmproxy jemalloc"] = lambda: mitmproxy([18080], jemalloc)
    else:
        print("libjemalloc2 not installed: 'mitmproxy jemalloc' skipped (the gateway runs on glibc too)")
    out[f"mitmproxy x{args.workers}"] = lambda: mitmproxy([18080 + i for i in range(args.workers)])
    if shutil.which("e2guardian"):
        out["e2guardian"] = e2guardian
    else:
        print("e2guardian not installed (apt-get install --no-install-recommends e2guardian): skipped")
    out["kanmon"] = lambda: kanmon({})
    example = {"policy": {"path": str(ROOT / "policies" / "example.yaml")}}
    out["kanmon+policy"] = lambda: kanmon(example)
    out["kanmon+policy glibc"] = lambda: kanmon(example, {"KANMON_ALLOCATOR": "glibc"})
    if args.kanmon_workers:   # issue #22 (branch workers): see kanmon_worker_scenarios
        out.update(kanmon_worker_scenarios(lab, modes, args, example))
    if args.baseline:
        # The same gateway from another checkout (e.g. main before a change), in the same
        # run and rounds, so a change's cost is a ratio between two figures of one round.
        base = {"PYTHONPATH": str(Path(args.baseline).resolve())}
        out["kanmon baseline"] = lambda: kanmon({}, base)
        out["kanmon+policy baseline"] = lambda: kanmon(example, base)
    return out


# -- issue #22 (branch workers): Kanmon with `proxy.workers: N` ---------------------------------
# nftables spreads *devices* over the workers (a hash of the tunnel source address), so the
# load comes from one device per worker at once (wrk in each namespace, the connections split
# between them); `w1` is the same load on one worker. CPU: the gateway's processes' own time.

def _gateway_cpu_seconds(lab: Lab) -> float:
    """The gateway's CPU seconds: its process and every worker (one measure for both suites)."""
    return process_tree_cpu(lab.gateway.proc.pid)


def kanmon_worker_scenarios(lab: Lab, modes: Modes, args: argparse.Namespace, policy: dict) -> dict:
    from gateway.lab.workerprobe import one_device_per_worker

    n = args.kanmon_workers
    devices: list = []

    def run(workers: int) -> dict:
        overrides = {**policy, "proxy": {"workers": workers}, "limits": BENCH_LIMITS}
        if not devices:   # once, with the gateway in N-worker mode: find one device per worker
            modes.gateway({**overrides, "proxy": {"workers": n}})
            devices.extend(one_device_per_worker(lab, n).values())
        modes.gateway(overrides)
        for dev in devices:
            lab.wait_for_peer(dev)
        url, per_device = f"http://{WEB4}/bench", max(1, args.connections // len(devices))
        for dev in devices:
            wait_until(lambda: dev.ns.run("curl", "-sS", "-o", "/dev/null", "--max-time", "2", url, check=False,
                                          timeout=10).returncode == 0, 30, "a request through the gateway", interval=0.2)
        cpu = _gateway_cpu_seconds(lab)
        procs = [subprocess.Popen(dev.ns.cmd("wrk", "-t1", "-c", str(per_device), "-d", f"{args.duration}s",
                                             "--latency", url), stdout=subprocess.PIPE, text=True) for dev in devices]
        parts = [parse_wrk(p.communicate(timeout=args.duration + 60)[0]) for p in procs]
        cpu = _gateway_cpu_seconds(lab) - cpu
        requests = sum(p["requests"] for p in parts)
        return {"requests_per_s": sum(p["requests_per_s"] for p in parts),
                "p50_ms": max(p["p50_ms"] or 0 for p in parts), "p90_ms": max(p["p90_ms"] or 0 for p in parts),
                "p99_ms": max(p["p99_ms"] or 0 for p in parts), "non_2xx": sum(p["non_2xx"] for p in parts),
                "socket_errors": "; ".join(p["socket_errors"] for p in parts if p["socket_errors"]),
                "requests": requests, "gateway_cpu_s": round(cpu, 2),
                "cpu_s_per_1000_requests": round(1000 * cpu / requests, 3) if requests else None,
                "devices": len(devices)}

    return {"kanmon+policy 2dev w1": lambda: run(1), f"kanmon+policy 2dev w{n}": lambda: run(n)}


# --- HTTPS through interception (issue #22) ---------------------------------------------------
#
#   https   HTTPS keep-alive: wrk with N connections to https://www.example.test/bench (the
#           lab's nginx): per request, the interception's record decryption and re-encryption.
#   newtls  a new TLS connection per request, over --tls-names distinct host names
#           (h0000.bench.test ...): per request, the device-side handshake (key exchange and a
#           signature with the interception CA's key), the leaf certificate (made or found in
#           the cache), the upstream connection and handshake, and Kanmon's per-connection work.
#           curl --parallel with N transfers at a time, `Connection: close` and no session
#           cache, so every request is a new, full handshake (num_connects is checked).
#           The names cycle in order: a cache smaller than the number of names (mitmproxy's
#           100) misses on every request; one pass over all names before the measurement
#           (the warm-up) fills a large enough cache.
#
# The device resolves the names from a hosts file (`ip netns exec` binds /etc/netns/NS/hosts
# over /etc/hosts), so no DNS is in the measurement. The bench names are served by a second
# nginx on SPARE4:443 with one wildcard certificate *.bench.test from the lab CA: the leaf the
# gateway makes depends on the SNI only (connection_strategy lazy: it is made before the
# upstream is contacted), so per-name upstream certificates would measure nothing more and
# cost the lab 1,000 keys.
#
# Gateway CPU: utime+stime of the proxy process and of its descendants (and its reaped
# children) from /proc, read just before and just after the measured load (warm-ups excluded),
# reported as CPU-seconds per 1,000 requests: steadier than req/s on a shared machine.

from gateway.lab.topology import SPARE4  # noqa: E402

BENCH_DOMAIN = "bench.test"
KEEPALIVE_HOST = "www.example.test"
TLS_VARIANTS = ("https", "newtls")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid`, its live descendants and its reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            stats[int(entry)] = text[text.rindex(")") + 2:].split()   # fields from `state` on
    if pid not in stats:
        return 0.0
    children: dict[int, list[int]] = {}
    for p, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(p)
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        f = stats[p]
        total += int(f[11]) + int(f[12])           # utime, stime
        if p == pid:
            total += int(f[13]) + int(f[14])       # cutime, cstime: children already reaped
        todo.extend(children.get(p, ()))
    return total / tick


def bench_names(count: int) -> list[str]:
    return [f"h{i:04d}.{BENCH_DOMAIN}" for i in range(count)]


def prepare_tls_lab(lab: Lab, names: list[str]) -> None:
    """Hosts file for the device, and nginx on SPARE4:443 for *.bench.test."""
    dev = lab.devices[0]
    etc = Path("/etc/netns") / dev.ns.name        # removed with the namespace by lab.teardown()
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{WEB4} {KEEPALIVE_HOST}\n"
                               + "".join(f"{SPARE4} {n}\n" for n in names))
    pair = lab.ca.issue_server("bench-wildcard", [f"*.{BENCH_DOMAIN}"])
    d = lab.workdir / "bench-nginx"
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy; fastcgi_temp_path {d}/tmp/fcgi;
  uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  server {{
    listen {SPARE4}:443 ssl;
    ssl_certificate {pair.cert_path}; ssl_certificate_key {pair.key_path};
    server_name _;
    location / {{ default_type text/plain; return 200 "hello from $host\\n"; }}
  }}
}}
""")
    proc = lab.inet.popen("nginx", "-c", str(conf), stdout=open(d / "nginx.out", "w"))
    lab.server_procs.append(proc)
    wait_until(lambda: (d / "nginx.pid").exists() or proc.poll() is not None, 15, "the bench nginx")
    if proc.poll() is not None:
        raise RuntimeError("bench nginx died: " + (d / "nginx.out").read_text())


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def curl_new_connections(lab: Lab, urls: list[str], connections: int, timeout: float) -> dict:
    """Each URL once, `connections` at a time, a new TLS connection each; wall time and the
    per-transfer figures curl reports."""
    dev = lab.devices[0]
    cfg = lab.workdir / f"urls-{len(urls)}.cfg"
    cfg.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
    started = time.monotonic()
    result = dev.ns.run("curl", "-sS", "-k", "--http1.1", "--no-sessionid", "-H", "Connection: close",
                        "--parallel", "--parallel-immediate", "--parallel-max", str(connections),
                        "--max-time", "20", "-w", "%{http_code} %{time_total} %{num_connects}\\n", "-K", str(cfg),
                        check=False, timeout=timeout)
    elapsed = time.monotonic() - started
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    ok = [r for r in rows if len(r) == 3 and r[0] == "200"]
    return {"elapsed_s": elapsed, "requests": len(ok), "failed": len(urls) - len(ok),
            "new_connections": sum(int(r[2]) for r in ok), "latencies_ms": [float(r[1]) * 1000 for r in ok]}


def load_tls(lab: Lab, variant: str, pid_of, args: argparse.Namespace) -> dict:
    """One measurement of `variant` ('https' or 'newtls'); `pid_of()` is the proxy's pid."""
    dev = lab.devices[0]
    probe = ["curl", "-sS", "-k", "-o", "/dev/null", "--max-time", "2"]
    target = f"https://{KEEPALIVE_HOST}/bench" if variant == "https" else f"https://h0000.{BENCH_DOMAIN}/bench"
    wait_until(lambda: dev.ns.run(*probe, target, check=False, timeout=10).returncode == 0,
               30, "a request through the scenario", interval=0.2)
    if variant == "https":
        dev.ns.run("wrk", "-t1", "-c", str(args.connections), "-d", "2s", target, timeout=60)   # warm-up
        cpu0 = process_tree_cpu(pid_of())
        result = dev.ns.run("wrk", "-t1", "-c", str(args.connections), "-d", f"{args.duration}s", "--latency",
                            target, timeout=args.duration + 60)
        cpu = process_tree_cpu(pid_of()) - cpu0
        out = parse_wrk(result.stdout)
    else:
        names = bench_names(args.tls_names)
        urls = [f"https://{n}/bench" for n in names]
        warm = curl_new_connections(lab, urls, args.connections, timeout=600)   # one pass: fills a cache that is big enough
        rate = warm["requests"] / warm["elapsed_s"] if warm["requests"] else 50.0
        count = max(len(names), int(rate * args.duration))
        measured = [urls[i % len(urls)] for i in range(count)]
        cpu0 = process_tree_cpu(pid_of())
        run_ = curl_new_connections(lab, measured, args.connections, timeout=args.duration * 20 + 120)
        cpu = process_tree_cpu(pid_of()) - cpu0
        lat = run_["latencies_ms"]
        out = {"requests_per_s": run_["requests"] / run_["elapsed_s"], "requests": run_["requests"],
               "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p99_ms": percentile(lat, 99),
               "non_2xx": run_["failed"], "socket_errors": "",
               "new_connection_share": run_["new_connections"] / run_["requests"] if run_["requests"] else None,
               "warmup_requests_per_s": rate}
    out["gateway_cpu_s"] = cpu
    out["cpu_s_per_1000"] = 1000 * cpu / out["requests"] if out["requests"] else None
    return out


def tls_scenarios(lab: Lab, modes: "Modes", args: argparse.Namespace, workdir: Path) -> dict:
    """name -> function, for the HTTPS scenarios (``--suite https``)."""
    prepare_tls_lab(lab, bench_names(args.tls_names))
    out: dict = {}

    def kanmon(overrides: dict, env: dict | None, ca: str) -> None:
        # As in scenarios(): the per-device limits lifted (one bench device stands for many
        # phones; new connections per second matter here). `ca`: which interception CA
        # directory the gateway gets (the commit before makes mitmproxy's RSA CA, this one
        # an ECDSA CA: each keeps its own).
        overrides = {**overrides, "limits": {**BENCH_LIMITS, **overrides.get("limits", {})}}
        modes.gateway(overrides, env, ca)

    def gateway_pid() -> int:
        return lab.gateway.proc.pid

    def mitmproxy(variant: str) -> dict:
        modes.manual()
        procs = [start_mitmdump(lab, 18080, workdir / "mitm")]
        try:
            steer(lab, [18080])
            return load_tls(lab, variant, lambda: procs[0].pid, args)
        finally:
            stop(procs)
            steer(lab, None)

    def gateway(variant: str, overrides: dict, env: dict | None = None, ca: str = "after") -> dict:
        kanmon(overrides, env, ca)
        return load_tls(lab, variant, gateway_pid, args)

    example = {"policy": {"path": str(ROOT / "policies" / "example.yaml")}}
    for variant in TLS_VARIANTS:
        out[f"{variant} mitmproxy"] = lambda v=variant: mitmproxy(v)
        out[f"{variant} kanmon+policy"] = lambda v=variant: gateway(v, example)
        workers = getattr(args, "kanmon_workers", None)   # the workers branch's --kanmon-workers N
        if workers:
            # One bench device: nftables hashes it to one worker, so this measures the cost of
            # the workers set-up on one device's load, not the spread (see kanmon_worker_scenarios).
            more = {**example, "proxy": {"workers": workers}}
            out[f"{variant} kanmon+policy w{workers}"] = lambda v=variant, o=more: gateway(v, o)
        if args.baseline:
            base = {"PYTHONPATH": str(Path(args.baseline).resolve())}
            out[f"{variant} kanmon+policy before"] = lambda v=variant, b=base: gateway(v, example, b, "before")
    return out


def round_order(names: list[str], round_index: int, rounds: int) -> list[str]:
    """Round r starts ``r * len(names) // rounds`` steps along the list: over the rounds every
    scenario runs early, in the middle and late."""
    k = (round_index * len(names) // max(1, rounds)) % len(names)
    return names[k:] + names[:k]


def summarize(names: list[str], rounds: list[dict]) -> dict:
    """Per scenario: medians of its figures over the rounds, and its ratios to tunnel /
    mitmproxy / e2guardian, each ratio taken within one round, with their median."""
    out: dict[str, dict] = {}
    for name in names:
        rows = [r["results"][name] for r in rounds if name in r["results"]]
        entry: dict = {key: statistics.median(row[key] for row in rows if row[key] is not None)
                       if any(row[key] is not None for row in rows) else None
                       for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms")}
        entry["non_2xx"] = sum(row["non_2xx"] for row in rows)
        entry["socket_errors"] = [row["socket_errors"] for row in rows if row["socket_errors"]]
        entry["requests_per_s_per_round"] = [row["requests_per_s"] for row in rows]
        for ref in ("tunnel", "mitmproxy", "mitmproxy jemalloc", "e2guardian"):
            per_round = [r["results"][name]["requests_per_s"] / r["results"][ref]["requests_per_s"]
                         for r in rounds if name in r["results"] and r["results"].get(ref, {}).get("requests_per_s")]
            key = ref.replace(" ", "_")
            entry[f"vs_{key}_per_round"] = per_round
            entry[f"vs_{key}"] = statistics.median(per_round) if per_round else None
        out[name] = entry
    return out


def summarize_tls(names: list[str], rounds: list[dict]) -> dict:
    """Per scenario: medians over the rounds of req/s, latency and CPU-s per 1,000 requests,
    and its ratios (req/s and CPU) to bare mitmproxy and to the commit before of the same
    variant, each ratio within one round."""
    out: dict[str, dict] = {}
    for name in names:
        variant = name.split()[0]
        rows = [r["results"][name] for r in rounds if name in r["results"]]
        entry: dict = {}
        for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "cpu_s_per_1000", "new_connection_share"):
            values = [row[key] for row in rows if row.get(key) is not None]
            entry[key] = statistics.median(values) if values else None
        entry["non_2xx"] = sum(row["non_2xx"] for row in rows)
        entry["requests_per_s_per_round"] = [row["requests_per_s"] for row in rows]
        entry["cpu_s_per_1000_per_round"] = [row.get("cpu_s_per_1000") for row in rows]
        for ref_name, key in ((f"{variant} mitmproxy", "mitmproxy"), (f"{variant} kanmon+policy before", "before")):
            for metric, short in (("requests_per_s", "rps"), ("cpu_s_per_1000", "cpu")):
                per_round = [r["results"][name][metric] / r["results"][ref_name][metric] for r in rounds
                             if name in r["results"] and r["results"].get(ref_name, {}).get(metric)
                             and r["results"][name].get(metric) is not None]
                entry[f"{short}_vs_{key}_per_round"] = per_round
                entry[f"{short}_vs_{key}"] = statistics.median(per_round) if per_round else None
        out[name] = entry
    return out


def report_tls(names: list[str], rounds: list[dict], args: argparse.Namespace) -> int:
    summary = summarize_tls(names, rounds)
    load = os.getloadavg()
    print(f"\nproxy HTTPS benchmark: {args.connections} connections, {args.duration} s per scenario, "
          f"{args.rounds} rounds (rotated order), {os.cpu_count()} cores, {args.tls_names} names for newtls; "
          f"medians over the rounds, ratios within each round; load average at the end {load[0]:.2f}\n")

    def fmt(value, width: int, spec: str) -> str:
        return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"

    w = max(24, *(len(n) for n in names))
    print(f"{'scenario':{w}} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU-s/1k':>9} {'req/s vs mitm':>14} "
          f"{'CPU vs mitm':>12} {'req/s vs before':>16} {'CPU vs before':>14} {'errors':>7}")
    for name in names:
        s = summary[name]
        print(f"{name:{w}} {fmt(s['requests_per_s'], 8, '.0f')} {fmt(s['p50_ms'], 8, '.2f')} {fmt(s['p99_ms'], 8, '.2f')} "
              f"{fmt(s['cpu_s_per_1000'], 9, '.3f')} {fmt(s['rps_vs_mitmproxy'], 14, '.3f')} "
              f"{fmt(s['cpu_vs_mitmproxy'], 12, '.3f')} {fmt(s['rps_vs_before'], 16, '.3f')} "
              f"{fmt(s['cpu_vs_before'], 14, '.3f')} {s['non_2xx']:>7}")
    print("orders: " + "; ".join(" > ".join(r["order"]) for r in rounds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "cores": os.cpu_count(), "load_average_end": load, "suite": "https", "duration_s": args.duration,
        "connections": args.connections, "tls_names": args.tls_names, "rounds_run": args.rounds,
        "before": args.before, "summary": summary, "rounds": rounds,
    }, indent=2))
    print(f"\nwritten: {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per scenario and round")
    ap.add_argument("--rounds", type=int, default=3, help="every scenario once per round, rotated order (medians reported)")
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(RESULTS / "proxy.json"))
    ap.add_argument("--baseline", metavar="DIR",
                    help="also run 'kanmon baseline' and 'kanmon+policy baseline': the gateway from another "
                         "checkout (e.g. a git worktree of main), to compare two commits in one run")
    ap.add_argument("--kanmon-workers", type=int, default=0, metavar="N",  # issue #22 (branch workers)
                    help="also run 'kanmon+policy 2dev w1' and 'kanmon+policy 2dev wN': Kanmon with proxy.workers 1 "
                         "and N, loaded from one device per worker at once (a device's traffic stays in one worker)")
    ap.add_argument("--only", action="append", metavar="SCENARIO",
                    help="run only this scenario (repeatable; e.g. to profile one of them)")
    ap.add_argument("--suite", choices=("http", "https"), default="http",
                    help="http: the plain-HTTP scenarios (default); https: HTTPS keep-alive and a new TLS "
                         "connection per request, with gateway CPU per request (issue #22)")
    ap.add_argument("--tls-names", type=int, default=1000, help="distinct host names of the newtls scenario")
    ap.add_argument("--before", metavar="COMMIT",
                    help="also the gateway of COMMIT (a temporary git worktree), same rounds: like --baseline")
    args = ap.parse_args()
    if args.before and args.baseline:
        ap.error("--before and --baseline are two ways to say the same: give one")
    if args.suite == "https" and args.out == str(RESULTS / "proxy.json"):
        args.out = str(RESULTS / "proxy_https.json")
    before_tree: Path | None = None
    if args.before:
        before_tree = Path(tempfile.mkdtemp(prefix="kanmon-before-")) / "tree"
        run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before_tree), args.before])
        args.baseline = str(before_tree)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install --no-install-recommends wrk", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="kanmon-bench-"))
    # `python -m gateway.cli` puts its working directory first on sys.path, before PYTHONPATH:
    # run from a checkout, every gateway (the --baseline/--before one too) would import that
    # checkout's code. From the bench's own directory each imports the tree it is given.
    args.out = str(Path(args.out).resolve())
    if args.baseline:
        args.baseline = str(Path(args.baseline).resolve())
    os.chdir(workdir)
    lab = Lab(workdir, n_devices=0)
    rounds: list[dict] = []
    try:
        lab.build()
        lab.add_device(1)
        modes = Modes(lab)
        table = scenarios(lab, modes, args, workdir) if args.suite == "http" else tls_scenarios(lab, modes, args, workdir)
        if args.only:
            unknown = sorted(set(args.only) - set(table))
            if unknown:
                print(f"unknown scenario {', '.join(unknown)}; known: {', '.join(table)}", file=sys.stderr)
                return 2
            table = {name: run_one for name, run_one in table.items() if name in args.only}
        names = list(table)
        for r in range(args.rounds):
            order = round_order(names, r, args.rounds)
            results: dict[str, dict] = {}
            for name in order:
                started = time.time()
                results[name] = table[name]()
                cpu = results[name].get("cpu_s_per_1000")
                print(f"round {r + 1}/{args.rounds}: {name:20} {results[name]['requests_per_s']:8.0f} req/s "
                      + (f"{cpu:6.2f} CPU-s/1000 " if cpu is not None else "")
                      + f"({time.time() - started:.0f} s)", flush=True)
            rounds.append({"round": r + 1, "order": order, "results": results})
    finally:
        lab.teardown()
        if before_tree is not None:
            run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], check=False)
    if args.suite == "https":
        return report_tls(names, rounds, args)

    summary = summarize(names, rounds)
    print(f"\nproxy benchmark: {args.connections} keep-alive connections, {args.duration} s per scenario, "
          f"{args.rounds} rounds (rotated order), {os.cpu_count()} cores; medians over the rounds, "
          f"ratios taken within each round\n")

    def ratio(value: float | None, width: int) -> str:
        return f"{value:{width}.3f}" if value is not None else f"{'-':>{width}}"

    w = max(16, *(len(n) for n in names))
    print(f"{'scenario':{w}} {'req/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'vs tunnel':>10} {'vs mitmproxy':>13} "
          f"{'vs mitm+jemalloc':>17} {'vs e2guardian':>14} {'errors':>8}")
    for name in names:
        s = summary[name]
        print(f"{name:{w}} {s['requests_per_s']:10.0f} {s['p50_ms'] or 0:8.2f} {s['p90_ms'] or 0:8.2f} {s['p99_ms'] or 0:8.2f} "
              f"{ratio(s['vs_tunnel'], 10)} {ratio(s['vs_mitmproxy'], 13)} {ratio(s['vs_mitmproxy_jemalloc'], 17)} "
              f"{ratio(s['vs_e2guardian'], 14)} {s['non_2xx']:>8}")
    print("\nper round (req/s, and ratio to bare mitmproxy of the same round):")
    print(f"{'scenario':{w}} " + " ".join(f"{'round ' + str(r['round']):>18}" for r in rounds))
    for name in names:
        cells = []
        for r in rounds:
            row, bare = r["results"].get(name), r["results"].get("mitmproxy")
            cells.append(f"{row['requests_per_s']:8.0f} ({row['requests_per_s'] / bare['requests_per_s']:5.3f}x)"
                         if row and bare else f"{'-':>18}")
        print(f"{name:{w}} " + " ".join(f"{c:>18}" for c in cells))
    print("orders: " + "; ".join(" > ".join(r["order"]) for r in rounds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "cores": os.cpu_count(), "duration_s": args.duration, "connections": args.connections,
        "workers": args.workers, "rounds_run": args.rounds,
        "results": {name: {k: summary[name][k] for k in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "non_2xx")}
                    for name in names},
        "ratios": {name: {k: summary[name][k] for k in ("vs_tunnel", "vs_mitmproxy", "vs_mitmproxy_jemalloc", "vs_e2guardian")}
                   for name in names},
        "summary": summary,
        "rounds": rounds,
    }, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
