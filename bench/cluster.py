"""Cluster figures (issue #8): the registry side of a reconcile with 10,000 devices on SQLite
and on PostgreSQL, enrollment throughput from two nodes at once, and NOTIFY propagation.

A private PostgreSQL server is started in a temporary directory (as the postgres user; needs
root and the Debian `postgresql` package). The reconciler runs with a recording stand-in for
the WireGuard interface and the nft sets (their cost is in bench/devices.py), so the numbers
are what the registry and the reconcile logic add per node.

    sudo /tmp/venv/bin/python bench/cluster.py [--devices 10000] [--notify-trials 200]

Prints a summary and writes bench/results/cluster.json. The end-to-end propagation through
two real gateway nodes (revoke on A -> download through B dead) is measured by
tests/e2e/test_cluster.py into artifacts/cluster/propagation.json.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wireguard_tools import WireguardKey  # noqa: E402

from gateway.lab.cluster import PostgresServer  # noqa: E402
from gateway.runtime.reconcile import Reconciler  # noqa: E402
from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus  # noqa: E402
from gateway.registry.sqlite import SqliteRegistry
from gateway.registry.postgres import REGISTRY_CHANNEL, PgRegistry, RegistryWatcher  # noqa: E402
from gateway.net.tunnel import PeerSyncResult  # noqa: E402

RESULTS = ROOT / "bench" / "results"
P4, P6 = ipaddress.ip_network("10.64.0.0/16"), ipaddress.ip_network("fd77:77::/64")


class RecordingTunnel:
    """Stands in for WireGuardInterface: remembers the peer set, costs nothing."""

    def __init__(self):
        self.peers: dict = {}

    def sync_peers(self, desired):
        added = tuple(k for k in desired if k not in self.peers)
        removed = tuple(k for k in self.peers if k not in desired)
        self.peers = dict(desired)
        return PeerSyncResult(added, removed, ())

    def remove_peers(self, keys):
        for k in keys:
            self.peers.pop(k, None)

    def upsert_peers(self, peers):
        for p in peers:
            self.peers[p.public_key] = p


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def dist(values: list[float]) -> dict:
    v = sorted(values)
    return {"n": len(v), "min_ms": round(v[0], 2), "p50_ms": round(statistics.median(v), 2),
            "p90_ms": round(v[int(0.9 * len(v)) - 1], 2), "p99_ms": round(v[max(0, int(round(0.99 * len(v))) - 1)], 2),
            "max_ms": round(v[-1], 2)}


def register(registry, n: int, tag: str) -> float:
    keys = [str(WireguardKey.generate().public_key()) for _ in range(n)]
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        v4, v6 = registry.allocate_addresses(P4, P6)
        registry.add(DeviceRecord(f"{tag}-{i:05d}", key, v4, v6, owner=f"user{i}"), audit=AuditEntry("bench", "device-added"))
    return time.perf_counter() - t0


def reconcile_figures(registry, label: str) -> dict:
    rec = Reconciler(registry, RecordingTunnel(), "bench", set_blocked=lambda *a, **kw: None)
    full = []
    for _ in range(3):
        t0 = time.perf_counter()
        report = rec.run_once(full=True)
        full.append(time.perf_counter() - t0)
    victim = registry.get(registry.all()[len(rec.records) // 2].device_id)
    registry.update(replace(victim, status=DeviceStatus.REVOKED), audit=AuditEntry("bench", "device-revoked"))
    t0 = time.perf_counter()
    inc = rec.run_once()
    incremental = time.perf_counter() - t0
    assert inc.peers_removed == 1 and len(inc.changed) == 1, inc
    t0 = time.perf_counter()
    rec.run_once()  # nothing changed
    idle_s = time.perf_counter() - t0
    out = {"backend": label, "devices": len(report.changed), "full_pass_ms": [ms(x) for x in full],
           "incremental_one_revocation_ms": ms(incremental), "incremental_nothing_changed_ms": ms(idle_s)}
    print(f"{label:>10}: full pass {min(full) * 1000:.0f} ms, one revocation {incremental * 1000:.2f} ms, "
          f"idle poll {idle_s * 1000:.2f} ms ({len(report.changed)} devices)")
    return out


def two_writers(url: str, n: int) -> dict:
    regs = [PgRegistry(url, node=f"node-{i}") for i in range(2)]
    results = {}

    def work(reg):
        results[reg.node] = register(reg, n, reg.node)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    addresses = [r.ipv4 for r in regs[0].all() if r.device_id.startswith("node-")]
    assert len(addresses) == len(set(addresses)) == 2 * n
    print(f"two nodes enrolling {n} each at once: {wall:.1f} s, {2 * n / wall:.0f} enrollments/s, no address reused")
    return {"per_node": n, "wall_s": round(wall, 2), "enrollments_per_s": round(2 * n / wall), "collisions": 0}


def notify_latency(url: str, trials: int) -> dict:
    reg = PgRegistry(url, node="writer")
    heard: dict[int, float] = {}
    lock = threading.Condition()

    def on_change(channel, payload):
        if channel == REGISTRY_CHANNEL and payload.isdigit():
            with lock:
                heard[int(payload)] = time.perf_counter()
                lock.notify_all()

    watcher = RegistryWatcher(url, on_change).start()
    while not watcher.up:
        time.sleep(0.01)
    victim = reg.add(DeviceRecord("notify-probe", str(WireguardKey.generate().public_key()), ipaddress.IPv4Address("10.65.0.2")))
    latencies = []
    for i in range(trials):
        t0 = time.perf_counter()
        victim = reg.update(replace(victim, os_version=str(i)))
        committed = time.perf_counter()
        revision = reg.revision()
        with lock:
            lock.wait_for(lambda: revision in heard, timeout=5)
        latencies.append((heard[revision] - t0) * 1000)
        del committed
    watcher.stop()
    d = dist(latencies)
    print(f"NOTIFY, update call -> listener callback, {trials} trials: {d}")
    return d


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--concurrent", type=int, default=1000, help="devices per node in the two-writer run")
    parser.add_argument("--notify-trials", type=int, default=200)
    args = parser.parse_args()
    pg = PostgresServer().init().start()
    results: dict = {"devices": args.devices}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = SqliteRegistry(Path(tmp) / "r.sqlite3")
            results["register_sqlite_s"] = round(register(sqlite, args.devices, "dev"), 2)
            pgreg = PgRegistry(pg.create_database("bench10k"), node="bench")
            results["register_postgresql_s"] = round(register(pgreg, args.devices, "dev"), 2)
            print(f"registering {args.devices}: SQLite {results['register_sqlite_s']} s, "
                  f"PostgreSQL {results['register_postgresql_s']} s")
            results["reconcile"] = [reconcile_figures(sqlite, "sqlite"), reconcile_figures(pgreg, "postgresql")]
        results["two_writers"] = two_writers(pg.create_database("benchtwo"), args.concurrent)
        results["notify"] = notify_latency(pg.create_database("benchnotify"), args.notify_trials)
    finally:
        pg.destroy()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cluster.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {RESULTS / 'cluster.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
