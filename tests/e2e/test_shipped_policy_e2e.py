"""Issue #17 in the namespace lab, with the shipped policies/example.yaml (and its lists) as
the gateway's policy: a device's raw TCP connection to a TCP echo server on a BitTorrent port
(6881) of the lab's spare internet host is neither TLS nor HTTP, so the gateway refuses it
(`kanmon:unidentified-protocol` in the conn stream, not one byte reaches the server); once the
approved-service rule documented (commented) in example.yaml is added — an allow naming the
destination with dst_cidr SPARE4/32 and dst_port 6881 — and applied, the same connection
passes and the echo comes back. A web request still passes under the shipped policy, so the
refusal is not the lab being broken."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.lab.topology import SPARE4, Lab, LabError, wait_until
from tests.e2e.conftest import require_lab, running_lab

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PORT = 6881                              # BitTorrent's port
UNIDENTIFIED = "kanmon:unidentified-protocol"
SOURCE_PORTS = itertools.count(41881)     # a fresh source port per probe (conntrack remaps a reused one)

ECHO_SERVER = r"""
import socket, sys, threading
log = open(sys.argv[3], "a", buffering=1)
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(16)
print("echo ready", flush=True)
def serve(conn):
    with conn:
        while data := conn.recv(4096):
            log.write(data.decode("latin-1") + "\n")
            conn.sendall(data)
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

PROBE = r"""
import json, socket, sys
dst, port, sport, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = {"echo": "", "error": None}
try:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", sport)); s.settimeout(4)
    s.connect((dst, port))
    s.sendall(marker.encode())
    while len(out["echo"]) < len(marker):
        data = s.recv(4096)
        if not data:
            break
        out["echo"] += data.decode("latin-1")
except OSError as exc:
    out["error"] = type(exc).__name__
print(json.dumps(out))
"""


def policies(tmp: Path) -> tuple[Path, Path]:
    """The shipped policies folder as is, and a copy of example.yaml with the approved
    non-web service rule (the commented `approved-sftp` example, for the echo server)."""
    target = tmp / "policies"
    shutil.copytree(ROOT / "policies", target)
    doc = yaml.safe_load((target / "example.yaml").read_text(encoding="utf-8"))
    doc["rules"].insert(0, {"id": "approved-echo", "description": "承認済みの非 Web サービス（試験用エコー）",
                            "reason": "lab: an approved non-web service names its destination",
                            "action": "allow", "match": {"dst_cidr": [f"{SPARE4}/32"], "dst_port": PORT}})
    approved = target / "approved.yaml"
    approved.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return target / "example.yaml", approved


@pytest.fixture(scope="module")
def shipped_lab(tmp_path_factory):
    require_lab()
    work = tmp_path_factory.mktemp("shipped")
    example, approved = policies(work)
    lab = Lab(work, n_devices=1, config_overrides={"policy": {"path": str(example)}})
    with running_lab(lab, "test_shipped_policy_e2e") as running:
        running.echo_log = work / "echo.log"
        proc = subprocess.Popen(running.inet.cmd(sys.executable, "-c", ECHO_SERVER, SPARE4, str(PORT), str(running.echo_log)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        running.server_procs.append(proc)
        line = proc.stdout.readline()
        if "echo ready" not in line:
            raise LabError(f"echo server did not start: {line}")
        running.approved_policy = approved
        device = running.devices[0]
        warm = device.curl("http://www.example.test/warm-up")   # the WireGuard handshake, before any clock runs
        if not warm.stdout.endswith("HTTP_CODE=200"):
            raise LabError(f"the device cannot reach the lab: {warm.stdout} {warm.stderr}")
        yield running


def probe(lab: Lab, sport: int, marker: str) -> dict:
    out = lab.devices[0].ns.run(sys.executable, "-c", PROBE, SPARE4, str(PORT), str(sport), marker, timeout=30)
    return json.loads(out.stdout.strip().splitlines()[-1])


def conn_records(lab: Lab, sport: int) -> list[dict]:
    device = lab.devices[0]
    return [r for r in lab.log_records("conn")
            if r.get("source.port") == sport and r.get("source.ip") == device.ipv4]


def echoed(lab: Lab, marker: str) -> bool:
    return lab.echo_log.exists() and marker in lab.echo_log.read_text(errors="replace")


def test_raw_tcp_to_a_p2p_port_is_refused_and_logged_under_the_shipped_policy(shipped_lab):
    marker = "kanmon-p2p-refused-7f3a"
    sport = next(SOURCE_PORTS)
    result = probe(shipped_lab, sport, marker)
    assert result["echo"] == "", result                 # no echo: the connection never reached the server
    records: list[dict] = []

    def logged() -> bool:
        nonlocal records
        records = conn_records(shipped_lab, sport)
        return any(r.get("rule.id") == UNIDENTIFIED for r in records)

    wait_until(logged, 10, f"a conn record with {UNIDENTIFIED}")
    refused = [r for r in records if r.get("rule.id") == UNIDENTIFIED]
    assert all(r.get("kanmon.verdict") == "block" for r in refused), refused
    assert refused[0].get("destination.ip") in (SPARE4, None) and not echoed(shipped_lab, marker)
    # web traffic still passes under the same shipped policy
    assert shipped_lab.devices[0].curl("http://www.example.test/control").stdout.endswith("HTTP_CODE=200")


def test_an_approved_destination_rule_lets_the_same_connection_through(shipped_lab):
    applied = shipped_lab.kanmon("policy", "apply", str(shipped_lab.approved_policy), "--config",
                                 str(shipped_lab.config_path))
    assert applied.returncode == 0, applied.stderr
    marker = "kanmon-p2p-approved-91c2"
    last: dict = {}

    def passes() -> bool:   # the gateway swaps the policy on SIGHUP: allow it a moment
        nonlocal last
        last = probe(shipped_lab, next(SOURCE_PORTS), marker)
        return last["echo"] == marker

    try:
        wait_until(passes, 15, "the echo through the approved rule", interval=0.5)
    finally:
        shipped_lab.kanmon("policy", "apply", str(shipped_lab.approved_policy.with_name("example.yaml")),
                           "--config", str(shipped_lab.config_path), check=False)
    assert last["echo"] == marker and echoed(shipped_lab, marker)
