"""Proxy throughput, side by side in one run, in the namespace lab (needs root).

Scenarios, from one WireGuard device in its namespace to nginx in the fake internet (HTTP
keep-alive, small responses, `wrk` with N connections; the `Ndev` scenarios and the HTTPS suite
load from one device per inspection worker at once, see below):

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

Gateway CPU: every scenario with a proxy also reports the proxy's CPU-seconds per 1,000
requests (utime + stime from /proc of the proxy process and all its descendants: Kanmon's parent
and every inspection worker; bare mitmdump; e2guardian), read just around the measured load, and
its ratio to bare mitmproxy's within each round (issue #22: Kanmon+policy's must be <= 1).
`--kanmon-workers N` adds the same load from N devices at once, one per worker (nftables keeps a
device in one worker): bare mitmdump, Kanmon with 1 worker and with N.

Prints a table with ratios, the per-round figures and ratios, the issue's goals (met or not), and
writes bench/results/proxy.json (per-round figures, per-scenario medians, per-round ratios, goals).

The two runs of issue #22 (each about 15-25 minutes on 2 cores; medians of 3 rounds):

    sudo .venv/bin/python bench/proxy.py --rounds 3 --kanmon-workers 2
        # plain HTTP: every scenario above plus 'mitmproxy 2dev', 'kanmon+policy 2dev w1/w2';
        # writes bench/results/proxy.json
    sudo .venv/bin/python bench/proxy.py --suite https --tls-names 1000 --rounds 3
        # HTTPS keep-alive (https) and a new TLS connection per request over 1,000 names (newtls),
        # each on bare mitmdump, Kanmon+policy with workers 1 (w1) and workers auto (auto), all
        # from the same devices (one per worker of auto) at once; writes bench/results/proxy_https.json

Other options:

    [--duration 10] [--connections 10] [--workers 2]   # seconds per scenario; wrk connections; bare mitmdump xW
    [--baseline DIR]   # also the gateway of another checkout, same rounds (before/after a change)
    [--before COMMIT]  # the same from a temporary git worktree of COMMIT; in the HTTPS suite it adds
                       # 'kanmon+policy w1 before' and 'auto before' (the req/s and CPU vs before columns)
    [--only SCENARIO]  # repeatable: run only these scenarios (names as printed)
    [--out FILE]       # another JSON file
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


def split_connections(connections: int, devices: int) -> list[int]:
    """`connections` spread over `devices` load generators (the first get the remainder), at
    least one each: the same total load whether one device or one per worker sends it."""
    base, extra = divmod(connections, devices)
    return [max(1, base + (1 if i < extra else 0)) for i in range(devices)]


def combine_wrk(parts: list[dict]) -> dict:
    """One row from wrk's figures of several devices loaded at once: rates and counts summed,
    each latency percentile the worst device's (percentiles cannot be merged exactly)."""
    def worst(key: str) -> float | None:
        values = [p[key] for p in parts if p.get(key) is not None]
        return max(values) if values else None

    return {"requests_per_s": sum(p["requests_per_s"] for p in parts), "p50_ms": worst("p50_ms"),
            "p90_ms": worst("p90_ms"), "p99_ms": worst("p99_ms"), "non_2xx": sum(p["non_2xx"] for p in parts),
            "socket_errors": "; ".join(p["socket_errors"] for p in parts if p["socket_errors"]),
            "requests": sum(p["requests"] for p in parts), "devices": len(parts)}


def with_cpu(out: dict, cpu: float | None) -> dict:
    """The proxy's CPU-seconds of the measured load, and per 1,000 requests (None: no proxy)."""
    out["gateway_cpu_s"] = round(cpu, 3) if cpu is not None else None
    out["cpu_s_per_1000"] = 1000 * cpu / out["requests"] if cpu is not None and out["requests"] else None
    return out


def on_devices(devices: list, job) -> list:
    """`job(device, i)` on every device at once (threads: each waits on its own subprocess)."""
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        return list(pool.map(lambda pair: job(*pair), [(d, i) for i, d in enumerate(devices)]))


def drive_wrk(devices: list, url: str, connections: int, duration: int, extra: tuple = (),
              cpu_of: Callable[[], float] | None = None) -> dict:
    """wrk from every device at once (the connections split between them), after a 2 s warm-up;
    `cpu_of()`: the proxy processes' CPU seconds so far, read just around the measured load."""
    counts = split_connections(connections, len(devices))

    def wrk(dev, i: int, seconds: int, latency: bool) -> str:
        result = dev.ns.run("wrk", "-t1", "-c", str(counts[i]), "-d", f"{seconds}s", *(["--latency"] if latency else []),
                            *extra, url, timeout=seconds + 60, check=False)
        if result.returncode != 0 or "Requests/sec" not in result.stdout:
            raise RuntimeError(f"wrk on {dev.device_id} failed ({result.returncode}): {result.stdout}{result.stderr}")
        return result.stdout

    on_devices(devices, lambda d, i: wrk(d, i, 2, False))   # warm-up
    cpu0 = cpu_of() if cpu_of else None
    parts = [parse_wrk(text) for text in on_devices(devices, lambda d, i: wrk(d, i, duration, True))]
    cpu = cpu_of() - cpu0 if cpu_of else None
    return with_cpu(combine_wrk(parts), cpu)


def wait_through(devices: list, probe: list[str], url: str) -> None:
    """After a switch between the manual tunnel and the gateway each device's WireGuard session
    is renewed: wait until a request of every device gets through."""
    for dev in devices:
        wait_until(lambda: dev.ns.run(*probe, url, check=False, timeout=10).returncode == 0,
                   30, f"a request of {dev.device_id} through the scenario", interval=0.2)


def load(lab: Lab, duration: int, connections: int, via_proxy: str | None = None,
         cpu_of: Callable[[], float] | None = None, devices: list | None = None) -> dict:
    """wrk from the device (or from each of `devices` at once). With `via_proxy` (host:port) the
    requests go to that explicit proxy in absolute form, for the same URL."""
    devices = devices or lab.devices[:1]
    url, extra = f"http://{WEB4}/bench", ()
    if via_proxy:
        script = lab.workdir / "absolute-form.lua"
        script.write_text(f'wrk.path = "http://{WEB4}/bench"\nwrk.headers["Host"] = "{WEB4}"\n')
        url, extra = f"http://{via_proxy}/", ("-s", str(script))
    probe = ["curl", "-sS", "-o", "/dev/null", "--max-time", "2"]
    if via_proxy:
        probe += ["--proxy", f"http://{via_proxy}"]
    wait_through(devices, probe, f"http://{WEB4}/bench")
    return drive_wrk(devices, url, connections, duration, extra, cpu_of)


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
        self.devices: list = []   # the devices that drive the load (default: the first one)

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
        for dev in self.devices or lab.devices[:1]:
            lab.wait_for_peer(dev)
        self.mode, self.gateway_overrides = "gateway", (overrides, env)


BENCH_LIMITS = {"tunnel_packets_per_second": 100_000, "new_connections_per_second": 100_000,
                "new_connections_burst": 100_000}


def scenarios(lab: Lab, modes: Modes, args: argparse.Namespace, workdir: Path) -> dict:
    """name -> a function that sets the scenario up, loads it once and returns wrk's figures."""
    def load_now(cpu_of: Callable[[], float] | None) -> dict:
        return load(lab, args.duration, args.connections, cpu_of=cpu_of)

    def tunnel() -> dict:
        modes.manual()
        steer(lab, None)
        return load_now(None)   # no proxy process: no CPU column

    def mitmproxy(ports: list[int], preload: Path | None = None) -> dict:
        modes.manual()
        procs = [start_mitmdump(lab, p, workdir / "mitm", preload) for p in ports]
        try:
            steer(lab, ports)
            return load_now(lambda: sum(process_tree_cpu(p.pid) for p in procs))
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
            return load(lab, args.duration, args.connections, via_proxy=f"{GATEWAY_TUNNEL4}:18090",
                        cpu_of=lambda: process_tree_cpu(procs[0].pid))
        finally:
            stop(procs)

    def kanmon(overrides: dict, env: dict | None = None) -> dict:
        # The bench's one device stands for many phones: its load (~3,000 packets/s at 900
        # req/s) would meet the per-device limits (tunnel packets, new connections), which
        # bench/noisy_neighbour.py measures; here the proxy's own cost is the subject.
        overrides = {**overrides, "limits": {**BENCH_LIMITS, **overrides.get("limits", {})}}
        modes.gateway(overrides, env)
        return load_now(lambda: _gateway_cpu_seconds(lab))

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
        out.update(kanmon_worker_scenarios(lab, modes, args, example, workdir))
    if args.baseline:
        # The same gateway from another checkout (e.g. main before a change), in the same
        # run and rounds, so a change's cost is a ratio between two figures of one round.
        base = {"PYTHONPATH": str(Path(args.baseline).resolve())}
        out["kanmon baseline"] = lambda: kanmon({}, base)
        out["kanmon+policy baseline"] = lambda: kanmon(example, base)
    return out


# -- issue #22: Kanmon with `proxy.workers: N` --------------------------------------------------
# nftables spreads *devices* over the workers (a hash of the device's tunnel address), so the
# load comes from one device per worker at once (wrk in each namespace, the connections split
# between them): 'kanmon+policy Ndev wN'; 'Ndev w1' is the same load on one worker and 'mitmproxy Ndev' the same
# load on bare mitmdump. CPU: the gateway's processes' own time (parent and every worker: process_tree_cpu).

def _gateway_cpu_seconds(lab: Lab) -> float:
    """The gateway's CPU seconds: its process and every worker (one measure for both suites)."""
    return process_tree_cpu(lab.gateway.proc.pid)


def find_worker_devices(lab: Lab, modes: Modes, overrides: dict, workers: int) -> list:
    """Once per run: the gateway with `overrides` (its `workers` inspection processes) up, one
    lab device per worker found by probing (gateway/lab/workerprobe.py), in worker order. From
    then on every gateway start waits for all their peers."""
    from gateway.lab.workerprobe import one_device_per_worker

    if not modes.devices:
        modes.gateway(overrides)
        by_worker = one_device_per_worker(lab, workers)
        modes.devices = [by_worker[i] for i in sorted(by_worker)]
    return modes.devices


def kanmon_worker_scenarios(lab: Lab, modes: Modes, args: argparse.Namespace, policy: dict, workdir: Path) -> dict:
    n = args.kanmon_workers

    def settings(workers: int) -> dict:
        return {**policy, "proxy": {"workers": workers}, "limits": BENCH_LIMITS}

    def kanmon(workers: int) -> dict:
        devices = find_worker_devices(lab, modes, settings(n), n)
        modes.gateway(settings(workers))
        return load(lab, args.duration, args.connections, cpu_of=lambda: _gateway_cpu_seconds(lab), devices=devices)

    def mitmproxy() -> dict:
        devices = find_worker_devices(lab, modes, settings(n), n)
        modes.manual()
        procs = [start_mitmdump(lab, 18080, workdir / "mitm")]
        try:
            steer(lab, [18080])
            return load(lab, args.duration, args.connections, cpu_of=lambda: process_tree_cpu(procs[0].pid),
                        devices=devices)
        finally:
            stop(procs)
            steer(lab, None)

    return {f"mitmproxy {n}dev": mitmproxy, f"kanmon+policy {n}dev w1": lambda: kanmon(1),
            f"kanmon+policy {n}dev w{n}": lambda: kanmon(n)}


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
#           (the warm-up, by every device: each worker has its own cache) fills a large enough
#           cache.
#
# Each variant runs on bare mitmdump, Kanmon+policy with `proxy.workers: 1` (w1) and with
# `workers: auto` (one per usable core). nftables keeps a device's traffic in one worker (a hash
# of its tunnel address), so every scenario is loaded from the same devices, one per worker of
# `auto` (found by probing once, gateway/lab/workerprobe.py), at once, the N connections split
# between them: the same load for all three.
#
# The devices resolve the names from a hosts file (`ip netns exec` binds /etc/netns/NS/hosts
# over /etc/hosts), so no DNS is in the measurement. The bench names are served by a second
# nginx on SPARE4:443 with one wildcard certificate *.bench.test from the lab CA: the leaf the
# gateway makes depends on the SNI only (connection_strategy lazy: it is made before the
# upstream is contacted), so per-name upstream certificates would measure nothing more and
# cost the lab 1,000 keys.
#
# Gateway CPU: utime+stime of the proxy process and of its descendants (the workers; and the
# children they reaped) from /proc, read just before and just after the measured load (warm-ups
# excluded), reported as CPU-seconds per 1,000 requests: steadier than req/s on a shared machine.
# wireguard-go daemonizes (it is no child of the gateway) and is not counted for any scenario.

from gateway.lab.topology import SPARE4  # noqa: E402

BENCH_DOMAIN = "bench.test"
KEEPALIVE_HOST = "www.example.test"
TLS_VARIANTS = ("https", "newtls")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and its live descendants, each with the children it
    has reaped (cutime/cstime: a child's time moves there when it is waited for, so nothing is
    counted twice)."""
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
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])   # utime, stime, cutime, cstime
        todo.extend(children.get(p, ()))
    return total / tick


def bench_names(count: int) -> list[str]:
    return [f"h{i:04d}.{BENCH_DOMAIN}" for i in range(count)]


def write_hosts(device, names: list[str]) -> None:
    """The device's hosts file: www.example.test and the bench names (idempotent)."""
    etc = Path("/etc/netns") / device.ns.name     # removed with the namespace by lab.teardown()
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{WEB4} {KEEPALIVE_HOST}\n"
                               + "".join(f"{SPARE4} {n}\n" for n in names))


def prepare_tls_lab(lab: Lab) -> None:
    """nginx on SPARE4:443 for *.bench.test."""
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


def curl_new_connections(lab: Lab, device, urls: list[str], connections: int, timeout: float) -> dict:
    """Each URL once from `device`, `connections` at a time, a new TLS connection each; wall
    time and the per-transfer figures curl reports."""
    cfg = lab.workdir / f"urls-{device.device_id}-{len(urls)}.cfg"
    cfg.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
    started = time.monotonic()
    result = device.ns.run("curl", "-sS", "-k", "--http1.1", "--no-sessionid", "-H", "Connection: close",
                           "--parallel", "--parallel-immediate", "--parallel-max", str(connections),
                           "--max-time", "20", "-w", "%{http_code} %{time_total} %{num_connects}\\n", "-K", str(cfg),
                           check=False, timeout=timeout)
    elapsed = time.monotonic() - started
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()]
    ok = [r for r in rows if len(r) == 3 and r[0] == "200"]
    return {"elapsed_s": elapsed, "requests": len(ok), "failed": len(urls) - len(ok),
            "new_connections": sum(int(r[2]) for r in ok), "latencies_ms": [float(r[1]) * 1000 for r in ok]}


def combine_curl(parts: list[dict]) -> dict:
    """One newtls row from the devices' curl runs, started together: the rate is all requests
    over the longest device's wall time (a device that finished first idles: conservative),
    latency percentiles over every transfer."""
    requests = sum(p["requests"] for p in parts)
    elapsed = max(p["elapsed_s"] for p in parts)
    lat = [v for p in parts for v in p["latencies_ms"]]
    return {"requests_per_s": requests / elapsed if elapsed else 0.0, "requests": requests,
            "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90), "p99_ms": percentile(lat, 99),
            "non_2xx": sum(p["failed"] for p in parts), "socket_errors": "",
            "new_connection_share": sum(p["new_connections"] for p in parts) / requests if requests else None,
            "elapsed_s_per_device": [round(p["elapsed_s"], 2) for p in parts], "devices": len(parts)}


def load_tls(lab: Lab, variant: str, cpu_of: Callable[[], float], args: argparse.Namespace, devices: list) -> dict:
    """One measurement of `variant` ('https' or 'newtls') from every device at once (the
    connections split between them); `cpu_of()` is the proxy processes' CPU seconds so far."""
    probe = ["curl", "-sS", "-k", "-o", "/dev/null", "--max-time", "2"]
    target = f"https://{KEEPALIVE_HOST}/bench" if variant == "https" else f"https://h0000.{BENCH_DOMAIN}/bench"
    wait_through(devices, probe, target)
    if variant == "https":
        return drive_wrk(devices, target, args.connections, args.duration, cpu_of=cpu_of)
    urls = [f"https://{n}/bench" for n in bench_names(args.tls_names)]
    counts = split_connections(args.connections, len(devices))
    # One pass over all names per device (each worker has its own leaf cache), which also
    # gives each device's rate for sizing the measured run.
    warm = on_devices(devices, lambda d, i: curl_new_connections(lab, d, urls, counts[i], timeout=600))
    measured: list[list[str]] = []
    for i, w in enumerate(warm):
        rate = w["requests"] / w["elapsed_s"] if w["requests"] else 50.0
        count = max(len(urls), int(rate * args.duration))
        offset = i * len(urls) // len(devices)    # devices at different places in the cycle
        measured.append([urls[(offset + k) % len(urls)] for k in range(count)])
    cpu0 = cpu_of()
    parts = on_devices(devices, lambda d, i: curl_new_connections(lab, d, measured[i], counts[i],
                                                                  timeout=args.duration * 20 + 120))
    cpu = cpu_of() - cpu0
    out = combine_curl(parts)
    out["warmup_requests_per_s"] = sum(w["requests"] / w["elapsed_s"] for w in warm if w["elapsed_s"])
    return with_cpu(out, cpu)


def tls_scenarios(lab: Lab, modes: "Modes", args: argparse.Namespace, workdir: Path) -> dict:
    """name -> function, for the HTTPS scenarios (``--suite https``). Finds the devices first:
    one per worker of `workers: auto` (on one core: one device)."""
    from gateway.config import MAX_PROXY_WORKERS, usable_cores

    prepare_tls_lab(lab)
    names = bench_names(args.tls_names)
    example = {"policy": {"path": str(ROOT / "policies" / "example.yaml")}}
    auto = min(usable_cores(), MAX_PROXY_WORKERS)

    def settings(workers) -> dict:
        # As in scenarios(): the per-device limits lifted (one bench device stands for many
        # phones; new connections per second matter here).
        return {**example, "proxy": {"workers": workers}, "limits": BENCH_LIMITS}

    devices = find_worker_devices(lab, modes, settings("auto"), auto)
    for dev in devices:
        write_hosts(dev, names)
    print(f"HTTPS suite: {len(devices)} device(s), one per worker of workers: auto ({auto}): "
          + ", ".join(f"{d.device_id} {d.ipv4}" for d in devices), flush=True)

    def mitmproxy(variant: str) -> dict:
        modes.manual()
        procs = [start_mitmdump(lab, 18080, workdir / "mitm")]
        try:
            steer(lab, [18080])
            return load_tls(lab, variant, lambda: process_tree_cpu(procs[0].pid), args, devices)
        finally:
            stop(procs)
            steer(lab, None)

    def gateway(variant: str, workers, env: dict | None = None, ca: str = "after") -> dict:
        # `ca`: which interception CA directory the gateway gets (an older commit may make
        # mitmproxy's RSA CA, this one an ECDSA CA: each keeps its own).
        modes.gateway(settings(workers), env, ca)
        return load_tls(lab, variant, lambda: _gateway_cpu_seconds(lab), args, devices)

    out: dict = {}
    for variant in TLS_VARIANTS:
        out[f"{variant} mitmproxy"] = lambda v=variant: mitmproxy(v)
        for label, workers in (("w1", 1), ("auto", "auto")):
            out[f"{variant} kanmon+policy {label}"] = lambda v=variant, w=workers: gateway(v, w)
        if args.baseline:
            base = {"PYTHONPATH": str(Path(args.baseline).resolve())}
            for label, workers in (("w1", 1), ("auto", "auto")):
                out[f"{variant} kanmon+policy {label} before"] = \
                    lambda v=variant, w=workers, b=base: gateway(v, w, b, "before")
    return out


def round_order(names: list[str], round_index: int, rounds: int) -> list[str]:
    """Round r starts ``r * len(names) // rounds`` steps along the list: over the rounds every
    scenario runs early, in the middle and late."""
    k = (round_index * len(names) // max(1, rounds)) % len(names)
    return names[k:] + names[:k]


def per_round_ratio(rounds: list[dict], name: str, ref: str, metric: str) -> list[float]:
    """`metric` of `name` over that of `ref`, in each round that has both."""
    return [r["results"][name][metric] / r["results"][ref][metric] for r in rounds
            if name in r["results"] and r["results"].get(ref, {}).get(metric)
            and r["results"][name].get(metric) is not None]


def _medians(rows: list[dict], keys: tuple) -> dict:
    out = {}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _add_ratios(entry: dict, rounds: list[dict], name: str, key: str, ref: str | None, metrics: dict) -> None:
    """entry[f"{prefix}vs_{key}"] (median) and its per-round list, for each metric -> prefix."""
    for metric, prefix in metrics.items():
        per_round = per_round_ratio(rounds, name, ref, metric) if ref else []
        entry[f"{prefix}vs_{key}_per_round"] = per_round
        entry[f"{prefix}vs_{key}"] = statistics.median(per_round) if per_round else None


def same_devices_mitmproxy(name: str) -> str:
    """Bare mitmproxy driven from the same devices as `name` ('kanmon+policy 2dev w2' ->
    'mitmproxy 2dev'; one device: 'mitmproxy')."""
    m = re.search(r" (\d+dev)\b", name)
    return f"mitmproxy {m.group(1)}" if m else "mitmproxy"


def one_worker_twin(name: str) -> str | None:
    """The 1-worker scenario of a multi-worker one (same load, same devices), else None."""
    m = re.fullmatch(r"(.* \d+dev) w(\d+)", name)
    if m and m.group(2) != "1":
        return f"{m.group(1)} w1"
    if " auto" in name:
        return name.replace(" auto", " w1")
    return None


def summarize(names: list[str], rounds: list[dict]) -> dict:
    """Per scenario: medians of its figures over the rounds (req/s, latency, proxy CPU-s per
    1,000 requests), and its ratios, each taken within one round, with their median: req/s to
    tunnel / mitmproxy / e2guardian; CPU per request to bare mitmproxy (with and without
    jemalloc); a multi-worker scenario's req/s and CPU to its 1-worker twin. 'mitmproxy' is
    the one driven from the same devices (see same_devices_mitmproxy)."""
    out: dict[str, dict] = {}
    for name in names:
        rows = [r["results"][name] for r in rounds if name in r["results"]]
        entry = _medians(rows, ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "cpu_s_per_1000"))
        entry["non_2xx"] = sum(row["non_2xx"] for row in rows)
        entry["socket_errors"] = [row["socket_errors"] for row in rows if row["socket_errors"]]
        entry["requests_per_s_per_round"] = [row["requests_per_s"] for row in rows]
        entry["cpu_s_per_1000_per_round"] = [row.get("cpu_s_per_1000") for row in rows]
        mitm = same_devices_mitmproxy(name)
        rps_cpu = {"requests_per_s": "", "cpu_s_per_1000": "cpu_"}
        _add_ratios(entry, rounds, name, "tunnel", "tunnel", {"requests_per_s": ""})
        _add_ratios(entry, rounds, name, "mitmproxy", mitm, rps_cpu)
        _add_ratios(entry, rounds, name, "mitmproxy_jemalloc", "mitmproxy jemalloc" if mitm == "mitmproxy" else None,
                    rps_cpu)
        _add_ratios(entry, rounds, name, "e2guardian", "e2guardian", {"requests_per_s": ""})
        _add_ratios(entry, rounds, name, "w1", one_worker_twin(name), rps_cpu)
        out[name] = entry
    return out


def summarize_tls(names: list[str], rounds: list[dict]) -> dict:
    """Per scenario: medians over the rounds of req/s, latency and CPU-s per 1,000 requests,
    and its ratios (req/s and CPU), each within one round: to bare mitmproxy of the same
    variant, to the same scenario of the commit before, and (workers: auto) to 1 worker."""
    out: dict[str, dict] = {}
    for name in names:
        variant = name.split()[0]
        rows = [r["results"][name] for r in rounds if name in r["results"]]
        entry = _medians(rows, ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "cpu_s_per_1000",
                                "new_connection_share"))
        entry["non_2xx"] = sum(row["non_2xx"] for row in rows)
        entry["requests_per_s_per_round"] = [row["requests_per_s"] for row in rows]
        entry["cpu_s_per_1000_per_round"] = [row.get("cpu_s_per_1000") for row in rows]
        metrics = {"requests_per_s": "rps_", "cpu_s_per_1000": "cpu_"}
        _add_ratios(entry, rounds, name, "mitmproxy", f"{variant} mitmproxy", metrics)
        before = None if name.endswith(" before") or "kanmon" not in name else f"{name} before"
        _add_ratios(entry, rounds, name, "before", before, metrics)
        _add_ratios(entry, rounds, name, "w1", one_worker_twin(name), metrics)
        out[name] = entry
    return out


def _fmt(value, width: int, spec: str) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def per_round_table(names: list[str], rounds: list[dict], summary: dict, columns: list[tuple[str, str]]) -> list[str]:
    """Lines: per scenario and round, req/s, CPU-s/1000 and the ratios named in `columns`
    (summary key of a per-round list, label)."""
    lines = []
    for name in names:
        rows = {r["round"]: r["results"].get(name) for r in rounds}
        s = summary[name]
        for key, label in columns:
            if not s.get(key) or "mitmproxy" in name:   # bare mitmproxy is the reference itself
                continue
            cells = " ".join(f"{v:7.3f}" for v in s[key])
            lines.append(f"  {name}: {label} per round {cells} (median {statistics.median(s[key]):.3f})")
        figures = " | ".join(f"r{k}: {_fmt(row['requests_per_s'] if row else None, 0, '.0f')} req/s "
                             f"{_fmt(row.get('cpu_s_per_1000') if row else None, 0, '.3f')} CPU-s/1k"
                             for k, row in rows.items())
        lines.append(f"  {name}: {figures}")
    return lines


def goals(summary: dict) -> list[dict]:
    """Issue #22's goals, judged on the medians of the per-round ratios: every Kanmon+policy
    scenario's CPU per request <= bare mitmproxy's on the same load; a multi-worker scenario of
    HTTPS keep-alive (and of plain HTTP) >= 1.3x its 1-worker twin's req/s with CPU per request
    within 1.1x of it."""
    out = []

    def judge(goal: str, name: str, value: float | None, bound: float, at_least: bool) -> None:
        met = None if value is None else (value >= bound if at_least else value <= bound)
        out.append({"goal": goal, "scenario": name, "value": value, "bound": bound, "met": met})

    for name, s in summary.items():
        if "kanmon+policy" not in name or name.endswith(" before") or name.endswith(" baseline"):
            continue
        judge("CPU per request vs bare mitmproxy", name, s.get("cpu_vs_mitmproxy"), 1.0, False)
        if one_worker_twin(name) and not name.startswith("newtls"):
            rps = s.get("rps_vs_w1", s.get("vs_w1"))
            judge("req/s vs 1 worker", name, rps, 1.3, True)
            judge("CPU per request vs 1 worker", name, s.get("cpu_vs_w1"), 1.1, False)
    return out


def print_goals(results: list[dict]) -> None:
    print("\ngoals (issue #22; medians of the per-round ratios):")
    for g in results:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        sign = ">=" if g["goal"].startswith("req/s") else "<="
        print(f"  {g['scenario']:34} {g['goal']:34} {_fmt(g['value'], 6, '.3f')} {sign} {g['bound']}: {verdict}")


def report_tls(names: list[str], rounds: list[dict], args: argparse.Namespace, devices: list[str]) -> int:
    summary = summarize_tls(names, rounds)
    load = os.getloadavg()
    print(f"\nproxy HTTPS benchmark: {args.connections} connections over {len(devices)} device(s) "
          f"({', '.join(devices)}), {args.duration} s per scenario, {args.rounds} rounds (rotated order), "
          f"{os.cpu_count()} cores, {args.tls_names} names for newtls; medians over the rounds, ratios within "
          f"each round; load average at the end {load[0]:.2f}\n")
    w = max(24, *(len(n) for n in names))
    print(f"{'scenario':{w}} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'CPU-s/1k':>9} {'req/s vs mitm':>14} "
          f"{'CPU vs mitm':>12} {'req/s vs w1':>12} {'CPU vs w1':>10} {'req/s vs before':>16} {'CPU vs before':>14} "
          f"{'errors':>7}")
    for name in names:
        s = summary[name]
        print(f"{name:{w}} {_fmt(s['requests_per_s'], 8, '.0f')} {_fmt(s['p50_ms'], 8, '.2f')} "
              f"{_fmt(s['p99_ms'], 8, '.2f')} {_fmt(s['cpu_s_per_1000'], 9, '.3f')} "
              f"{_fmt(s['rps_vs_mitmproxy'], 14, '.3f')} {_fmt(s['cpu_vs_mitmproxy'], 12, '.3f')} "
              f"{_fmt(s['rps_vs_w1'], 12, '.3f')} {_fmt(s['cpu_vs_w1'], 10, '.3f')} "
              f"{_fmt(s['rps_vs_before'], 16, '.3f')} {_fmt(s['cpu_vs_before'], 14, '.3f')} {s['non_2xx']:>7}")
    print("\nper round:")
    print("\n".join(per_round_table(names, rounds, summary, [
        ("cpu_vs_mitmproxy_per_round", "CPU vs mitmproxy"), ("rps_vs_w1_per_round", "req/s vs w1"),
        ("cpu_vs_w1_per_round", "CPU vs w1")])))
    judged = goals(summary)
    print_goals(judged)
    print("orders: " + "; ".join(" > ".join(r["order"]) for r in rounds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "cores": os.cpu_count(), "load_average_end": load, "suite": "https", "duration_s": args.duration,
        "connections": args.connections, "devices": devices, "tls_names": args.tls_names, "rounds_run": args.rounds,
        "before": args.before, "summary": summary, "goals": judged, "rounds": rounds,
    }, indent=2))
    print(f"\nwritten: {out}")
    return 0


def report_http(names: list[str], rounds: list[dict], args: argparse.Namespace) -> int:
    summary = summarize(names, rounds)
    load = os.getloadavg()
    print(f"\nproxy benchmark: {args.connections} keep-alive connections, {args.duration} s per scenario, "
          f"{args.rounds} rounds (rotated order), {os.cpu_count()} cores; medians over the rounds, "
          f"ratios taken within each round; load average at the end {load[0]:.2f}\n")
    w = max(16, *(len(n) for n in names))
    print(f"{'scenario':{w}} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'CPU-s/1k':>9} {'vs tunnel':>10} "
          f"{'vs mitm':>8} {'CPU vs mitm':>12} {'vs mitm+jem':>12} {'CPU vs mitm+jem':>16} {'vs e2g':>7} "
          f"{'vs w1':>6} {'CPU vs w1':>10} {'errors':>7}")
    for name in names:
        s = summary[name]
        print(f"{name:{w}} {_fmt(s['requests_per_s'], 8, '.0f')} {_fmt(s['p50_ms'], 8, '.2f')} "
              f"{_fmt(s['p90_ms'], 8, '.2f')} {_fmt(s['p99_ms'], 8, '.2f')} {_fmt(s['cpu_s_per_1000'], 9, '.3f')} "
              f"{_fmt(s['vs_tunnel'], 10, '.3f')} {_fmt(s['vs_mitmproxy'], 8, '.3f')} "
              f"{_fmt(s['cpu_vs_mitmproxy'], 12, '.3f')} {_fmt(s['vs_mitmproxy_jemalloc'], 12, '.3f')} "
              f"{_fmt(s['cpu_vs_mitmproxy_jemalloc'], 16, '.3f')} {_fmt(s['vs_e2guardian'], 7, '.3f')} "
              f"{_fmt(s['vs_w1'], 6, '.3f')} {_fmt(s['cpu_vs_w1'], 10, '.3f')} {s['non_2xx']:>7}")
    print("\n'mitm' is bare mitmproxy on the same device(s): 'mitmproxy Ndev' for the Ndev scenarios.")
    print("per round:")
    print("\n".join(per_round_table(names, rounds, summary, [
        ("vs_mitmproxy_per_round", "req/s vs mitmproxy"), ("cpu_vs_mitmproxy_per_round", "CPU vs mitmproxy"),
        ("vs_w1_per_round", "req/s vs w1"), ("cpu_vs_w1_per_round", "CPU vs w1")])))
    judged = goals(summary)
    print_goals(judged)
    print("orders: " + "; ".join(" > ".join(r["order"]) for r in rounds))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "cores": os.cpu_count(), "load_average_end": load, "suite": "http", "duration_s": args.duration,
        "connections": args.connections, "workers": args.workers, "kanmon_workers": args.kanmon_workers,
        "rounds_run": args.rounds,
        "results": {name: {k: summary[name][k] for k in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms",
                                                          "cpu_s_per_1000", "non_2xx")}
                    for name in names},
        "ratios": {name: {k: summary[name][k] for k in ("vs_tunnel", "vs_mitmproxy", "cpu_vs_mitmproxy",
                                                         "vs_mitmproxy_jemalloc", "cpu_vs_mitmproxy_jemalloc",
                                                         "vs_e2guardian", "vs_w1", "cpu_vs_w1")}
                   for name in names},
        "summary": summary,
        "goals": judged,
        "rounds": rounds,
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
                    help="plain-HTTP suite: also run 'mitmproxy Ndev', 'kanmon+policy Ndev w1' and 'kanmon+policy "
                         "Ndev wN': bare mitmdump and Kanmon with proxy.workers 1 and N, all loaded from the same N "
                         "devices (one per worker, found by probing) at once (a device's traffic stays in one worker)")
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
    if args.suite == "https" and args.kanmon_workers:
        ap.error("--kanmon-workers is for the plain-HTTP suite: the HTTPS suite always runs workers 1 and auto")
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
                print(f"round {r + 1}/{args.rounds}: {name:28} {results[name]['requests_per_s']:8.0f} req/s "
                      + (f"{cpu:6.2f} CPU-s/1000 " if cpu is not None else "")
                      + f"({time.time() - started:.0f} s)", flush=True)
            rounds.append({"round": r + 1, "order": order, "results": results})
    finally:
        lab.teardown()
        if before_tree is not None:
            run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before_tree)], check=False)
    if args.suite == "https":
        return report_tls(names, rounds, args, [f"{d.device_id} {d.ipv4}" for d in modes.devices])

    return report_http(names, rounds, args)


if __name__ == "__main__":
    sys.exit(main())
