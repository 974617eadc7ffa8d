"""Device scale: registration, gateway start-up, peer sync, memory and revocation latency (needs root).

For each size N, in the namespace lab: N devices are registered once (the registry part of an
enrollment: address allocation + insert + audit entry). Then, for each tree measured (this one,
and with ``--before COMMIT`` that commit, checked out in a temporary git worktree and run from
there: same lab, same registry copy, same machine load), ``kanmon run`` starts and its
reconciler loads all N peers into the WireGuard interface, and the bench reads:

- start-up: from launching ``kanmon run`` to its "gateway ready" line;
- initial peer sync: the first (full) reconcile pass, from the gateway's own log line;
- RSS after start (VmRSS and peak VmHWM) of the gateway, and of the wireguard-go daemon;
- CPU share of the gateway over the revocation phase (its background polls -- registry
  revision, peer list, periodic full pass -- plus the revocations themselves);
- revocation latency from the registry write: the bench revokes one device at a time (an
  UPDATE of the registry row, as ``kanmon device revoke`` does), at random moments, and reads
  when the gateway reported that registry revision enforced (peer removed, address in the
  drop set, live connections cut: the ``applied`` status file the operator commands wait
  for, stamped by the gateway). Median and p99 over ``--revocations`` samples, spread over
  more than one periodic full pass. Afterwards the bench checks that every revoked device
  has no peer on the interface and its address is in the drop set.

wireguard-go holds at most 65,536 peers per interface (its MaxPeers). Since issue #22 the gateway
splits a larger pool over several interfaces (gateway/devices/shards.py: one per 65,536-address
block), so ``--sizes 10000 60000 100000`` measures 100,000 (a /15 pool: two wireguard-go
processes, synced in parallel); the RSS column of wireguard-go sums every shard's process. A tree
that cannot (``--before`` an older commit) refuses at start-up: its row says so. When no size
reaches 100,000 the figures there are extrapolated along the line through the two largest sizes.
``--peers-per-interface N`` (a power of two) splits smaller pools too, to see the shards at small
sizes.

    sudo .venv/bin/python bench/devices.py [--sizes 10000 60000 100000] [--before COMMIT] [--profile DIR]

Prints a table and writes bench/results/devices.json.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

from gateway.lab.topology import GatewayProcess, Lab, wait_until  # noqa: E402
from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus  # noqa: E402
from gateway.registry.sqlite import SqliteRegistry  # noqa: E402
from gateway.runtime.gatewayprocess import applied_revision  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RECONCILED = re.compile(r"reconciled revision \d+ \((full|incremental)\): \+(\d+) -(\d+) peers.*\(([\d.]+) ms\)")
PY_SPY = Path(sys.executable).parent / "py-spy"
CLK_TCK = 100


def _prefix_for(n: int) -> str:
    """A tunnel prefix with room for n devices (a /16 holds 65,533)."""
    return f"10.64.0.0/{min(16, 32 - (n + 3).bit_length())}"


def _public_key() -> str:
    """A real X25519 public key, made by `cryptography` (wireguard-tools' pure-Python curve
    takes milliseconds per key: minutes for 100,000)."""
    raw = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def register(registry: SqliteRegistry, n: int, prefix4: str, timed: int = 2000) -> float:
    """Registers n devices through the registry's own path; returns the seconds per device of
    the first `timed` (as an operator's enrolments see them). The rest is written with the
    bench's connection set to `synchronous=OFF` (same statements, no disk sync per device):
    only the start-up is under test for them, and 100,000 syncs take minutes on a busy disk."""
    p4, p6 = ipaddress.ip_network(prefix4), ipaddress.ip_network("fd77:77::/64")
    keys = [_public_key() for _ in range(n)]
    per_device = 0.0
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        if i == min(timed, n) - 1:
            per_device = (time.perf_counter() - t0) / (i + 1) if i else 0.0
            registry._db.execute("PRAGMA synchronous=OFF")
        v4, v6 = registry.allocate_addresses(p4, p6)
        registry.add(DeviceRecord(f"dev-{i:06d}", key, v4, v6, owner=f"user{i}"),
                     audit=AuditEntry("bench", "device-added"))
    registry._db.execute("PRAGMA synchronous=FULL")
    return per_device or (time.perf_counter() - t0) / n


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024   # MiB
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _wireguard_go_pid(ifname: str) -> int | None:
    proc = subprocess.run(["pgrep", "-f", f"wireguard-go {ifname}$"], capture_output=True, text=True)
    pids = proc.stdout.split()
    return int(pids[0]) if pids else None


def _interfaces(lab: Lab) -> list[str]:
    """The tunnel's interfaces that exist now (shard 0 first; issue #22)."""
    names = _config(lab).tunnel_shards.interfaces
    return [n for n in names if lab.gw.run("ip", "link", "show", n, check=False).returncode == 0]


def _peer_keys(lab: Lab) -> list[str]:
    return [k for n in _interfaces(lab) for k in lab.gw.run("wg", "show", n, "peers", timeout=300).stdout.split()]


def _profile(pid: int, out: Path, seconds: int) -> threading.Thread:
    """py-spy (collapsed stacks, idle frames left out) of the gateway for `seconds`, attached
    once `kanmon run` has re-executed itself with jemalloc preloaded (a py-spy session does not
    survive the exec) -- or after 2 s if it does not."""
    def record():
        end = time.monotonic() + 2
        while time.monotonic() < end:
            try:
                if b"KANMON_ALLOCATOR_REEXEC" in Path(f"/proc/{pid}/environ").read_bytes():
                    break
            except OSError:
                return
            time.sleep(0.005)
        subprocess.run([str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "-r", "200",
                        "-d", str(seconds), "-o", str(out), "--nonblocking"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = threading.Thread(target=record, daemon=True)
    t.start()
    return t


def _start_gateway(lab: Lab, tree: Path, profile: Path | None, timeout: float) -> tuple[float, object]:
    """Launch `kanmon run` from `tree`; seconds until "gateway ready"."""
    log_path = lab.workdir / "gateway.log"
    log_path.unlink(missing_ok=True)
    env = {"PYTHONPATH": str(tree), "KANMON_LOG_LEVEL": "info"}
    t0 = time.perf_counter()
    # From the tree's own directory: `python -m` puts the working directory ahead of PYTHONPATH,
    # so launched from another checkout, `--before` would measure that checkout instead.
    proc = lab.gw.popen("env", "-C", str(tree), *lab.kanmon_cmd, "run", "--config", str(lab.config_path),
                        stdout=open(log_path, "a"), env={**os.environ, **env})
    if profile is not None:
        _profile(proc.pid, profile, 60)
    lab.gateway = GatewayProcess(proc, log_path)
    wait_until(lambda: "gateway ready" in log_path.read_text(errors="replace") or proc.poll() is not None,
               timeout, "the gateway to start", interval=0.02)
    if proc.poll() is not None:
        raise RuntimeError(f"gateway exited with {proc.returncode}:\n{lab.gateway.log_text()[-4000:]}")
    return time.perf_counter() - t0, proc


def _revoke(registry: SqliteRegistry, device_id: str, applied_path: Path, timeout: float) -> float:
    """Revoke one device by a registry write; ms from the committed write to the gateway's
    "applied" stamp of that revision."""
    rec = registry.get(device_id)
    registry.update(replace(rec, status=DeviceStatus.REVOKED, status_reason="bench: lost"),
                    audit=AuditEntry("bench", "device-revoked", "lost"))
    written = time.time()
    revision = registry.revision()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = applied_revision(applied_path)
        if seen is not None and seen >= revision:
            at = json.loads(applied_path.read_text())["at"]
            if at - written > 0.1:   # to find it in the gateway's log (--logs)
                print(f"  slow revocation: revision {revision}, {(at - written) * 1000:.0f} ms, written at "
                      f"{time.strftime('%H:%M:%S', time.localtime(written))}.{int(written % 1 * 1000):03d}", flush=True)
            return (at - written) * 1000
        time.sleep(0.002)
    raise RuntimeError(f"revision {revision} not applied within {timeout} s")


def measure(lab: Lab, tree: Path, registry_copy: Path, n: int, args, label: str) -> dict:
    state_db = lab.state_dir / "registry.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(str(state_db) + suffix).unlink(missing_ok=True)
    shutil.copyfile(registry_copy, state_db)
    applied_path = _config(lab).applied_status_path
    applied_path.unlink(missing_ok=True)
    profile = Path(args.profile) / f"devices-{n}-{label}.txt" if args.profile else None
    startup_s, proc = _start_gateway(lab, tree, profile, timeout=600)
    try:
        log = lab.gateway.log_text()
        first = RECONCILED.search(log)
        gw_mem = _status(proc.pid)
        interfaces = _interfaces(lab)
        wg_pids = [p for p in map(_wireguard_go_pid, interfaces) if p]
        wg_rss = sum(_status(p).get("VmRSS", 0) for p in wg_pids) if wg_pids else None
        peers = len(_peer_keys(lab))
        time.sleep(2)   # let the start-up's tail (first underlay read, audit shipping) pass
        registry = SqliteRegistry(state_db)
        rng = random.Random(n)
        victims = [f"dev-{i:06d}" for i in rng.sample(range(n), args.revocations)]
        cpu0, wall0 = _cpu_seconds(proc.pid), time.monotonic()
        latencies = []
        for device_id in victims:
            time.sleep(rng.uniform(0.2, 2 * args.spacing - 0.2))
            latencies.append(_revoke(registry, device_id, applied_path, timeout=120))
        idle_cpu = (_cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - wall0) * 100
        revoked = {registry.get(d).wg_public_key for d in victims}
        addresses = {str(registry.get(d).ipv4) for d in victims}
        registry.close()
        peer_keys = set(_peer_keys(lab))
        blocked = lab.gw.run("nft", "-j", "list", "set", "inet", _config(lab).nft_table, "blocked_v4",
                             check=False).stdout
        cut = not (revoked & peer_keys) and all(a in blocked for a in addresses)
        latencies.sort()
        return {
            "tree": label, "devices": n,
            "gateway_startup_s": round(startup_s, 2),
            "initial_peer_sync_ms": float(first.group(4)) if first else None,
            "peers_on_interface": peers, "interfaces": len(interfaces),
            "gateway_rss_mib": gw_mem.get("VmRSS"), "gateway_peak_rss_mib": gw_mem.get("VmHWM"),
            "wireguard_go_rss_mib": wg_rss,
            "cpu_percent": round(idle_cpu, 1),
            "revoke_ms_median": round(statistics.median(latencies), 1),
            "revoke_ms_p99": round(latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))], 1),
            "revoke_ms_max": round(latencies[-1], 1),
            "revocations": len(latencies),
            "revoked_cut_verified": cut,
        }
    finally:
        log_path = lab.gateway.log_path
        lab.stop_gateway(timeout=120)
        if args.logs:   # the gateway's log, e.g. its reconcile pass timings around a slow revocation
            shutil.copyfile(log_path, Path(args.logs) / f"devices-{n}-{label.split()[0]}.log")
        for name in _config(lab).tunnel_shards.interfaces:
            if lab.gw.run("ip", "link", "show", name, check=False).returncode == 0:
                lab.gw.run("ip", "link", "del", name, check=False)


def _config(lab: Lab):
    from gateway.config import load_config
    return load_config(lab.config_path)


def run_size(n: int, trees: list[tuple[str, Path]], args) -> tuple[dict, list[dict]]:
    workdir = Path(tempfile.mkdtemp(prefix=f"kanmon-devbench-{n}-"))
    prefix = _prefix_for(n)
    tunnel = {"ipv4_prefix": prefix}
    if args.peers_per_interface:
        tunnel["peers_per_interface"] = args.peers_per_interface
    lab = Lab(workdir, n_devices=0, config_overrides={"tunnel": tunnel})
    try:
        lab.build()
        copy = workdir / "registry-copy.sqlite3"
        registry = SqliteRegistry(copy)
        per_device = register(registry, n, prefix)
        registry.close()
        reg = {"devices": n, "register_per_device_ms": round(per_device * 1000, 3)}
        print(f"{n} devices registered ({per_device * 1000:.2f} ms per device)", flush=True)
        rows = []
        for label, tree in trees:
            try:
                rows.append(measure(lab, tree, copy, n, args, label))
            except RuntimeError as exc:   # e.g. an older tree refusing more than 65,536 peers
                tail = [line for line in str(exc).splitlines() if line.strip()][-3:]
                rows.append({"tree": label, "devices": n, "error": " / ".join(tail)[-600:]})
            print(json.dumps(rows[-1]), flush=True)
        return reg, rows
    finally:
        lab.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


def _worktree(commit: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="kanmon-before-"))
    path.rmdir()
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit],
                   check=True, capture_output=True)
    return path


COLUMNS = ("interfaces", "gateway_startup_s", "initial_peer_sync_ms", "gateway_rss_mib", "gateway_peak_rss_mib",
           "wireguard_go_rss_mib", "cpu_percent", "revoke_ms_median", "revoke_ms_p99", "revoke_ms_max",
           "revoked_cut_verified")


GOAL_DEVICES, GOAL_STARTUP_S = 100_000, 15


def extrapolate(rows: list[dict], n: int) -> dict[str, dict]:
    """Per tree, the start-up, peer sync and RSS at n devices on the straight line through
    the two largest sizes measured (when n itself was not: wireguard-go holds at most 65,536
    peers per interface, so 100,000 cannot be run on a host without the kernel module)."""
    out = {}
    for tree in dict.fromkeys(r["tree"] for r in rows):
        mine = sorted((r for r in rows if r["tree"] == tree and "error" not in r), key=lambda r: r["devices"])
        if len(mine) < 2 or mine[-1]["devices"] >= n:
            continue
        a, b = mine[-2], mine[-1]
        figures = {}
        for col in ("gateway_startup_s", "initial_peer_sync_ms", "gateway_rss_mib"):
            if a.get(col) is None or b.get(col) is None:
                continue
            slope = (b[col] - a[col]) / (b["devices"] - a["devices"])
            figures[col] = round(b[col] + slope * (n - b["devices"]), 1)
        out[tree] = figures
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 60000])
    ap.add_argument("--before", help="a commit to measure beside this tree (run from a temporary git worktree)")
    ap.add_argument("--revocations", type=int, default=25, help="revocations timed per size and tree")
    ap.add_argument("--spacing", type=float, default=1.3,
                    help="mean seconds between revocations (25 x 1.3 s spans the 30 s periodic full pass)")
    ap.add_argument("--peers-per-interface", type=int,
                    help="tunnel.peers_per_interface (addresses per WireGuard interface; default 65,536)")
    ap.add_argument("--profile", help="directory for py-spy collapsed stacks of each gateway's first 60 s")
    ap.add_argument("--logs", help="directory to keep each gateway's log in")
    ap.add_argument("--out", default=str(RESULTS / "devices.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # tear the lab down on `kill` too
    for directory in (args.profile, args.logs):
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
    trees = [("after", ROOT)]
    before = _worktree(args.before) if args.before else None
    if before is not None:
        trees.insert(0, (f"before {args.before}", before))
    registrations, rows = [], []
    try:
        for n in args.sizes:
            reg, measured = run_size(n, trees, args)
            registrations.append(reg)
            rows += measured
    finally:
        if before is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
    print("\nregistration (this tree's registry):")
    for r in registrations:
        print(f"  {r['devices']:>7} devices: {r['register_per_device_ms']} ms per device (the first 2,000)")
    head = f"| {'devices':>7} | {'tree':<18} | " + " | ".join(COLUMNS) + " |"
    print("\n" + head + "\n|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['devices']:>7} | {r['tree'][:18]:<18} | " + " | ".join(f"{r.get(c)!s:>{len(c)}}" for c in COLUMNS) + " |"
              + (f" failed: {r['error']}" if "error" in r else ""))
    extrapolated = extrapolate(rows, GOAL_DEVICES)
    for tree, figures in extrapolated.items():
        print(f"\n{tree}: straight line through the two largest sizes, at {GOAL_DEVICES:,} devices: "
              + ", ".join(f"{k} {v}" for k, v in figures.items())
              + f" (goal: start-up <= {GOAL_STARTUP_S} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "registration": registrations, "rows": rows,
                               f"extrapolated_{GOAL_DEVICES}": extrapolated}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
