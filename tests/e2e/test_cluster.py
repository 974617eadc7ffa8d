"""Issue #8 "Must show": two gateway nodes on one PostgreSQL registry (started by this test
in its own namespace), devices on each.

- a revocation issued on node A cuts a download running through node B within 1 s (20 trials,
  distribution written to artifacts/cluster/propagation.json);
- a policy applied on A is enforced on B (same version id on both);
- PostgreSQL stopped: both nodes keep enforcing, changes are refused with a clear error, a
  revocation queued on A applies on A at once and on B once the registry is back; started
  again: both nodes converge (`kanmon cluster status` exits 0).

The nodes run `python -m gateway.cli --registry-url URL run` (gateway/cli/__main__.py: `kanmon`
with the shared registry given on the command line).
"""

from __future__ import annotations

import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
from wireguard_tools import WireguardKey

from gateway.lab.cluster import ClusterLab, postgres_prerequisites
from gateway.lab.topology import WEB4, LabError, wait_until
from tests.e2e.conftest import ARTIFACTS, require_lab
from tests.e2e.test_device_lifecycle import DOWNLOAD, http_code
from tests.availability import unavailable

pytestmark = pytest.mark.e2e

TRIALS = 20

POLICY_V1 = """version: 1
settings: {default_action: allow}
lists:
  banned: {file: lists/banned.txt}
rules:
  - {id: banned, action: block, reason: "禁止サイト / banned site", dns_block: sinkhole, match: {list: [banned]}}
"""


@pytest.fixture(scope="module")
def cl(tmp_path_factory):
    require_lab()
    missing = postgres_prerequisites()
    if missing:
        unavailable("PostgreSQL missing: " + ", ".join(missing))
    workdir = tmp_path_factory.mktemp("cluster")
    policy_dir = workdir / "policy"
    (policy_dir / "lists").mkdir(parents=True)
    (policy_dir / "policy.yaml").write_text(POLICY_V1)
    (policy_dir / "lists" / "banned.txt").write_text("blocked.test\n")
    lab = ClusterLab(workdir / "lab")
    try:
        lab.build()
        # The deployment's first policy, stored in the registry before any node runs.
        out = lab.kanmon("node-a", "cluster", "policy-apply", str(policy_dir / "policy.yaml"),
                         "--config", str(lab.nodes["node-a"].config_path), check=False)
        assert out.returncode == 0, out.stderr
        from gateway.registry.postgres import PgRegistry
        admin = PgRegistry(lab.pg.url(), node="test")
        lab.admin = admin
        lab.policy_dir = policy_dir
        for index, node in ((1, "node-a"), (2, "node-b"), (3, "node-b")):
            device = lab.add_device(index, node)
            admin.add(_record(device))
        lab.start_node("node-a")
        lab.start_node("node-b")
        for device in lab.lab.devices:
            for node in ("node-a", "node-b"):
                lab.wait_for_peer(node, device)      # every node has every admitted device
        yield lab
    finally:
        for name in ("node-a", "node-b"):
            src = lab.workdir / f"{name}.log"
            if src.exists():
                (ARTIFACTS / "e2e" / "cluster").mkdir(parents=True, exist_ok=True)
                (ARTIFACTS / "e2e" / "cluster" / f"{name}.log").write_text(src.read_text(errors="replace"))
        lab.teardown()


def _record(device):
    from gateway.registry.model import DeviceRecord
    return DeviceRecord(device.device_id, device.public_key, ipaddress.IPv4Address(device.ipv4),
                        ipaddress.IPv6Address(device.ipv6) if device.ipv6 else None, owner="lab", groups=frozenset({"staff"}))


def _device(cl, device_id):
    return next(d for d in cl.lab.devices if d.device_id == device_id)


def _config(cl, node):
    return str(cl.nodes[node].config_path)


def _rekey(cl, device, device_id: str, node: str):
    """A new identity for a device namespace, enrolled through node A (address allocated in
    the shared registry), connected through `node`."""
    key = WireguardKey.generate()
    out = cl.kanmon("node-a", "device", "add", "--config", _config(cl, "node-a"), "--id", device_id,
                    "--public-key", str(key.public_key()), "--owner", "trial", "--json")
    rec = json.loads(out.stdout)
    device.assume_identity(device_id, key, rec["ipv4"], cl.workdir)
    cl.wait_for_peer(node, device)
    return rec


def _tunnel_up(cl, device, node: str) -> float:
    """Seconds until the new identity's first request through `node` succeeds. The peer being
    listed on the node is not enough on a loaded CI machine: one full-suite run saw the next
    download's connect time out (5 s) right after it. The wait is reported, so a slow tunnel
    shows in the artefact instead of passing unnoticed; failing, the message carries both
    ends' WireGuard state."""
    started = time.monotonic()
    try:
        wait_until(lambda: http_code(device.curl("http://www.example.test/tunnel-up", timeout=3)) == "200", 20,
                   f"{device.device_id}'s first request through {node}", interval=0.2)
    except LabError as exc:
        n = cl.nodes[node]
        raise AssertionError(f"{exc}\n{node}: {n.ns.run('wg', 'show', n.wg_interface, check=False).stdout}\n"
                             f"device: {device.ns.run('wg', 'show', device.wg_interface, check=False).stdout}") from None
    return time.monotonic() - started


def _revoked_at(cl, device_id: str) -> float:
    """When node A's revocation committed (its audit entry is written in that transaction)."""
    import psycopg
    with psycopg.connect(cl.pg.url()) as conn:
        at = conn.execute("SELECT at FROM audit WHERE device_id=%s AND action='device-revoked'", (device_id,)).fetchone()[0]
    return at.timestamp()


def test_revoke_on_node_a_cuts_a_download_through_node_b_within_a_second(cl):
    dev = _device(cl, "dev3")       # connected through node B
    latencies, from_start, from_commit, addresses, warmups = [], [], [], set(), []
    for trial in range(TRIALS):
        device_id = f"trial-{trial:02d}"
        addresses.add(_rekey(cl, dev, device_id, "node-b")["ipv4"])
        warmups.append(_tunnel_up(cl, dev, "node-b"))
        proc = subprocess.Popen(dev.ns.cmd(sys.executable, "-c", DOWNLOAD, WEB4), stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "flowing", "the download must run through node B before the revoke"
        started = time.time()
        cl.kanmon("node-a", "device", "revoke", device_id, "--reason", "lost", "--config", _config(cl, "node-a"))
        returned = time.time()
        outcome = json.loads(proc.communicate(timeout=30)[0].strip().splitlines()[-1])
        latencies.append((outcome["last_data"] - returned) * 1000)
        from_start.append((outcome["last_data"] - started) * 1000)
        from_commit.append((outcome["last_data"] - _revoked_at(cl, device_id)) * 1000)
        if trial == 0:
            assert dev.public_key not in cl.peers("node-b") and dev.public_key not in cl.peers("node-a")
            assert http_code(dev.curl("http://www.example.test/after-revoke", timeout=3)) == "000"
    assert len(addresses) == TRIALS       # every enrollment got its own address

    def summary(values):
        values = sorted(values)
        return {"min_ms": round(values[0], 1), "p50_ms": round(statistics.median(values), 1),
                "p90_ms": round(values[int(0.9 * len(values)) - 1], 1), "max_ms": round(values[-1], 1)}
    report = {"trials": TRIALS, "after_commit_on_node_a": summary(from_commit),
              "after_command_returned": summary(latencies),
              "after_command_started": summary(from_start), "all_after_return_ms": [round(x, 1) for x in latencies],
              "tunnel_up_after_enrollment_s": {"max": round(max(warmups), 2), "median": round(statistics.median(warmups), 2)}}
    (ARTIFACTS / "cluster").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "cluster" / "propagation.json").write_text(json.dumps(report, indent=2))
    print(f"\nrevoke on node A -> download through node B dead, {TRIALS} trials: {report}")
    assert max(from_commit) <= 1000 and max(latencies) <= 1000, report
    # the device on node A was never disturbed
    assert http_code(_device(cl, "dev1").curl("http://www.example.test/")) == "200"


def test_policy_applied_on_a_is_enforced_on_b(cl):
    dev_b = _device(cl, "dev2")
    assert http_code(dev_b.curl("http://www.example.test/before")) == "200"
    (cl.policy_dir / "lists" / "banned.txt").write_text("blocked.test\nwww.example.test\n")
    out = cl.kanmon("node-a", "cluster", "policy-apply", str(cl.policy_dir / "policy.yaml"),
                    "--config", _config(cl, "node-a"), check=False)
    assert out.returncode == 0, out.stderr
    blocked = dev_b.curl("http://www.example.test/after")
    assert http_code(blocked) == "403", blocked.stdout
    assert "x-kanmon-rule: banned" in blocked.stdout.lower() or "禁止サイト" in blocked.stdout, blocked.stdout
    status = json.loads(cl.kanmon("node-b", "cluster", "status", "--config", _config(cl, "node-b"), "--json").stdout)
    versions = {n["name"]: n["policy_version"] for n in status["nodes"]}
    assert versions["node-a"] == versions["node-b"] == status["policy_version"]
    assert http_code(_device(cl, "dev1").curl("http://www.example.test/on-a")) == "403"


def test_devices_move_between_nodes_without_reenrollment(cl):
    dev = _device(cl, "dev1")
    cl.use_node(dev, "node-b")
    try:
        wait_until(lambda: http_code(dev.curl("http://allowed.test/moved", timeout=3)) == "200", 15,
                   "dev1 through node B")
        log = cl.lab.nginx_requests()[-1]
        assert log["uri"] == "/moved" and log["remote"].startswith("198.51.101.")   # node B's uplink
    finally:
        cl.use_node(dev, "node-a")
        wait_until(lambda: http_code(dev.curl("http://allowed.test/back", timeout=3)) == "200", 15, "dev1 back on A")


def test_postgres_outage_keeps_enforcing_refuses_changes_and_converges(cl):
    dev_a, dev_b, dev_c = _device(cl, "dev1"), _device(cl, "dev2"), cl.lab.devices[2]
    from gateway.registry.model import DeviceStatus
    gone = cl.admin.get(dev_c.device_id)
    if gone.status is not DeviceStatus.REVOKED:
        cl.kanmon("node-a", "device", "revoke", dev_c.device_id, "--reason", "lost", "--config", _config(cl, "node-a"))
    wait_until(lambda: dev_c.public_key not in cl.peers("node-b"), 3, "revocation before the outage")
    cl.pg.stop()
    try:
        # the revoked trial device stays out; allowed traffic flows; the policy still blocks
        wait_until(lambda: "kanmon_registry_up 0.0" in cl.metrics_text("node-b"), 10, "node B to notice the outage")
        time.sleep(1)
        for dev in (dev_a, dev_b):
            assert http_code(dev.curl("http://allowed.test/during-outage", timeout=5)) == "200"
            assert http_code(dev.curl("http://www.example.test/during-outage", timeout=5)) == "403"
        assert http_code(dev_c.curl("http://allowed.test/", timeout=3)) == "000"
        refused = cl.kanmon("node-a", "device", "suspend", "dev2", "--reason", "x", "--config", _config(cl, "node-a"),
                            check=False)
        assert refused.returncode == 1 and "接続できません" in refused.stderr and "unreachable" in refused.stderr
        added = cl.kanmon("node-b", "device", "add", "--config", _config(cl, "node-b"), "--id", "new",
                          "--public-key", str(WireguardKey.generate().public_key()), check=False)
        assert added.returncode != 0 and "unreachable" in added.stderr
        # a revocation that cannot wait: queued on A, applied on A at once
        queued = cl.kanmon("node-a", "cluster", "revoke", "dev1", "--reason", "stolen", "--config",
                           _config(cl, "node-a"), check=False)
        assert queued.returncode == 1 and "queued on this node" in queued.stderr
        wait_until(lambda: dev_a.public_key not in cl.peers("node-a"), 2, "queued revocation applied on node A")
        assert dev_a.public_key in cl.peers("node-b")      # node B cannot know yet (documented)
        # full reconcile passes during the outage keep the state (one is forced by a SIGUSR1 poke)
        assert dev_b.public_key in cl.peers("node-a") and dev_b.public_key in cl.peers("node-b")
        status = cl.kanmon("node-a", "cluster", "status", "--config", _config(cl, "node-a"), check=False)
        assert status.returncode == 1 and "unreachable" in status.stderr
    finally:
        cl.pg.start()
    t0 = time.monotonic()
    wait_until(lambda: dev_a.public_key not in cl.peers("node-b"), 10, "the queued revocation to reach node B")
    print(f"\nqueued revocation reached node B {time.monotonic() - t0:.2f} s after PostgreSQL started")
    assert cl.admin.get("dev1").status.value == "revoked"

    def converged() -> bool:
        out = cl.kanmon("node-b", "cluster", "status", "--config", _config(cl, "node-b"), "--json", check=False)
        if out.returncode != 0:
            return False
        nodes = json.loads(out.stdout)["nodes"]
        return len(nodes) == 2 and len({n["registry_revision"] for n in nodes}) == 1
    wait_until(converged, 15, "both nodes to report the same revision, policy and a healthy registry")
    # changes are accepted again and reach the other node
    cl.kanmon("node-b", "device", "quarantine", "dev2", "--reason", "check", "--config", _config(cl, "node-b"))
    wait_until(lambda: "kanmon_registry_up 1.0" in cl.metrics_text("node-a"), 5, "node A registry up")
    assert http_code(dev_b.curl("http://allowed.test/quarantined", timeout=5)) in ("403", "000")
