"""Device scale: registration, gateway start-up and peer sync with 1k and 10k devices (needs root).

For each size N, in the namespace lab: N devices are registered (the registry part of an
enrollment: address allocation + insert + audit entry), then `kanmon run` starts and its
reconciler loads all N peers into the WireGuard interface; then one device is revoked and the
reconcile of that single change is timed (from the gateway's own log lines).

    sudo .venv/bin/python bench/devices.py [--sizes 1000 10000]

Prints a table and writes bench/results/devices.json.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wireguard_tools import WireguardKey  # noqa: E402

from gateway.lab.topology import Lab, wait_until  # noqa: E402
from gateway.registry.model import AuditEntry, DeviceRecord  # noqa: E402
from gateway.registry.sqlite import SqliteRegistry

RESULTS = ROOT / "bench" / "results"
RECONCILED = re.compile(r"reconciled revision \d+ \((full|incremental)\): \+(\d+) -(\d+) peers.*\(([\d.]+) ms\)")


def run_size(n: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"kanmon-devbench-{n}-"))
    lab = Lab(workdir, n_devices=0, config_overrides={"tunnel": {"ipv4_prefix": "10.64.0.0/16"}})
    try:
        lab.build()
        registry = SqliteRegistry(lab.state_dir / "registry.sqlite3")
        p4, p6 = ipaddress.ip_network("10.64.0.0/16"), ipaddress.ip_network("fd77:77::/64")
        keys = [str(WireguardKey.generate().public_key()) for _ in range(n)]
        t0 = time.perf_counter()
        for i, key in enumerate(keys):
            v4, v6 = registry.allocate_addresses(p4, p6)
            registry.add(DeviceRecord(f"dev-{i:05d}", key, v4, v6, owner=f"user{i}"),
                         audit=AuditEntry("bench", "device-added"))
        register_s = time.perf_counter() - t0
        registry.close()

        t0 = time.perf_counter()
        lab.start_gateway(timeout=300)
        startup_s = time.perf_counter() - t0
        log = lab.gateway.log_text()
        first = RECONCILED.search(log)
        peers = lab.gw.run("wg", "show", lab.wg_interface, "peers").stdout.split()

        before = len(RECONCILED.findall(lab.gateway.log_text()))
        t0 = time.perf_counter()
        lab.kanmon("device", "revoke", "dev-00000", "--reason", "lost", "--config", str(lab.config_path))
        cli_s = time.perf_counter() - t0
        wait_until(lambda: len(RECONCILED.findall(lab.gateway.log_text())) > before, 30, "the revoke reconcile")
        revoke_ms = float(RECONCILED.findall(lab.gateway.log_text())[-1][3])
        return {
            "devices": n,
            "register_total_s": round(register_s, 3),
            "register_per_device_ms": round(register_s / n * 1000, 3),
            "gateway_startup_s": round(startup_s, 2),
            "initial_peer_sync_ms": float(first.group(4)) if first else None,
            "peers_on_interface": len(peers),
            "revoke_one_reconcile_ms": revoke_ms,
            "revoke_cli_s": round(cli_s, 3),
        }
    finally:
        lab.teardown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--out", default=str(RESULTS / "devices.json"))
    args = ap.parse_args()
    rows = [run_size(n) for n in args.sizes]
    cols = list(rows[0])
    print("\n" + "  ".join(f"{c:>24}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]!s:>24}" for c in cols))
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        scale = b["devices"] / a["devices"]
        print(f"\n{b['devices']}/{a['devices']} devices = x{scale:g}: peer sync x{b['initial_peer_sync_ms'] / a['initial_peer_sync_ms']:.1f}, "
              f"registration per device x{b['register_per_device_ms'] / a['register_per_device_ms']:.2f}, "
              f"one revoke x{b['revoke_one_reconcile_ms'] / a['revoke_one_reconcile_ms']:.1f} (linear would be x{scale:g} for totals, x1 per device)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
