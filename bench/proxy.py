"""Proxy throughput, side by side in one run, in the namespace lab (needs root).

Scenarios, all from one WireGuard device in its namespace to nginx in the fake internet
(HTTP keep-alive, small responses, `wrk` with N connections):

  tunnel          the WireGuard tunnel, routed and masqueraded by the gateway, no proxy
  mitmproxy       + bare `mitmdump --mode transparent` (no addons) behind an nftables redirect
  mitmproxy xW    + W bare mitmdump workers, nftables spreading connections (jhash of the
                  source address and port) over their ports: does one-process-per-core scale?
  e2guardian      Debian's e2guardian 5.3 (C++ filtering proxy) as an explicit proxy on the gateway
                  (it has no transparent mode for plain redirects of every port), its banned-site
                  list loaded with the same domains as policies/lists/*.txt plus blocked.test;
                  the device sends absolute-form requests to it (wrk Lua script)
  kanmon          the Kanmon gateway (`kanmon run`: identity, built-in host rules, enforcer, access log)
  kanmon+policy   the same with the shipped example policy (policies/example.yaml: every list,
                  rule groups, tenants) compiled into the engine

Prints a table with ratios and writes bench/results/proxy.json.

    sudo .venv/bin/python bench/proxy.py [--duration 10] [--connections 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    dev.ns.run("wrk", "-t1", "-c", str(connections), "-d", "2s", *extra, url, timeout=60)  # warm-up
    result = dev.ns.run("wrk", "-t1", "-c", str(connections), "-d", f"{duration}s", "--latency", *extra, url,
                        timeout=duration + 60)
    return parse_wrk(result.stdout)


def start_e2guardian(lab: Lab, port: int) -> subprocess.Popen:
    """e2guardian with a private copy of Debian's configuration: no daemon, our port, its
    banned-site list = the domains of policies/lists plus the lab's blocked.test."""
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


def start_mitmdump(lab: Lab, port: int, confdir: Path) -> subprocess.Popen:
    mitmdump = Path(sys.executable).parent / "mitmdump"
    proc = lab.gw.popen(str(mitmdump), "--mode", f"transparent@{port}", "--set", "connection_strategy=lazy",
                        "--set", f"confdir={confdir}", "-q")
    wait_until(lambda: f":{port} " in lab.gw.run("ss", "-ltnH").stdout or proc.poll() is not None, 30,
               f"mitmdump on {port}")
    return proc


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per scenario")
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--out", default=str(RESULTS / "proxy.json"))
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is needed: apt-get install --no-install-recommends wrk", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="kanmon-bench-"))
    lab = Lab(workdir, n_devices=0)
    results: dict[str, dict] = {}
    try:
        lab.build()
        lab.add_device(1)
        manual_tunnel(lab)
        steer(lab, None)
        results["tunnel"] = load(lab, args.duration, args.connections)

        procs = [start_mitmdump(lab, 18080, workdir / "mitm")]
        steer(lab, [18080])
        results["mitmproxy"] = load(lab, args.duration, args.connections)
        stop(procs)

        ports = [18080 + i for i in range(args.workers)]
        procs = [start_mitmdump(lab, p, workdir / "mitm") for p in ports]
        steer(lab, ports)
        results[f"mitmproxy x{args.workers}"] = load(lab, args.duration, args.connections)
        stop(procs)

        if shutil.which("e2guardian"):
            steer(lab, None)
            procs = [start_e2guardian(lab, 18090)]
            results["e2guardian"] = load(lab, args.duration, args.connections, via_proxy=f"{GATEWAY_TUNNEL4}:18090")
            stop(procs)
        else:
            print("e2guardian not installed (apt-get install --no-install-recommends e2guardian): skipped")

        lab.gw.run("nft", "delete", "table", "inet", "benchsteer")
        lab.gw.run("ip", "link", "del", lab.wg_interface)
        lab.gw.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
        lab.start_gateway()
        lab.wait_for_peer(lab.devices[0])
        results["kanmon"] = load(lab, args.duration, args.connections)
        lab.stop_gateway()
        lab.write_config({"policy": {"path": str(ROOT / "policies" / "example.yaml")}})
        lab.start_gateway()
        lab.wait_for_peer(lab.devices[0])
        results["kanmon+policy"] = load(lab, args.duration, args.connections)
    finally:
        lab.teardown()

    base, bare = results["tunnel"]["requests_per_s"], results["mitmproxy"]["requests_per_s"]
    print(f"\nproxy benchmark: {args.connections} keep-alive connections, {args.duration} s per scenario, "
          f"{os.cpu_count()} cores\n")
    e2g = results.get("e2guardian", {}).get("requests_per_s")
    print(f"{'scenario':16} {'req/s':>10} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'vs tunnel':>10} {'vs mitmproxy':>13} {'vs e2guardian':>14} {'errors':>8}")
    for name, r in results.items():
        vs_e2g = f"{r['requests_per_s'] / e2g:14.3f}" if e2g else f"{'-':>14}"
        print(f"{name:16} {r['requests_per_s']:10.0f} {r['p50_ms'] or 0:8.2f} {r['p90_ms'] or 0:8.2f} {r['p99_ms'] or 0:8.2f} "
              f"{r['requests_per_s'] / base:10.3f} {r['requests_per_s'] / bare:13.3f} {vs_e2g} {r['non_2xx']:>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "cores": os.cpu_count(), "duration_s": args.duration, "connections": args.connections,
        "workers": args.workers, "results": results,
        "ratios": {name: {"vs_tunnel": r["requests_per_s"] / base, "vs_mitmproxy": r["requests_per_s"] / bare}
                   for name, r in results.items()},
    }, indent=2))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
