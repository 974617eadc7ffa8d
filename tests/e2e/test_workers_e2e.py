"""Issue #22: `proxy.workers: 2` in the namespace lab. Two devices that hash to different
workers (found by probing which worker's port accepted their connection); what must stay whole
across workers: steering (no device picks its worker or reaches a worker's port), quarantine,
suspension and revocation cut live flows in every worker within 100 ms, a policy apply switches every worker
and a bad one is refused by all, metrics are summed, and a worker killed with -9 loses no log
record, refuses its devices until it is forked again (never routes them around the proxy),
while the other keeps serving."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from gateway.lab import workerprobe
from gateway.lab.topology import GATEWAY_TUNNEL4, WEB4, WEB6, Lab, wait_until
from tests.e2e.conftest import ARTIFACTS, require_lab, running_lab
from tests.e2e.test_device_lifecycle import DOWNLOAD
from tests.e2e.test_policy_e2e import POLICIES

pytestmark = pytest.mark.e2e

WORKERS = 2
QUARANTINE_TRIALS = 3   # per worker
BASE_PORT = 8080     # the lab's transparent_port (the default)

def http_code(result) -> str:
    return result.stdout.rsplit("HTTP_CODE=", 1)[-1].strip()


def worker_of_connection(lab: Lab, device, host: str = WEB4, port: int = 80) -> int:
    return workerprobe.worker_of_connection(lab, device, WORKERS, BASE_PORT, host, port)


def worker_pids(lab: Lab) -> dict[int, int]:
    out = lab.gw.run("ss", "-Htlnp", "sport", "ge", f":{BASE_PORT}", "and", "sport", "lt",
                     f":{BASE_PORT + WORKERS}").stdout
    pids = {}
    for line in out.splitlines():
        if "pid=" not in line:   # a socket being torn down has no process any more
            continue
        port = int(line.split()[3].rpartition(":")[2])
        pids[port - BASE_PORT] = int(line.split("pid=")[1].split(",")[0])
    return pids


@pytest.fixture(scope="module")
def wlab(tmp_path_factory):
    require_lab()
    work = tmp_path_factory.mktemp("wlab")
    policy_dir = work / "policies"
    shutil.copytree(POLICIES, policy_dir)
    lab = Lab(work, n_devices=2, config_overrides={
        "proxy": {"workers": WORKERS},
        "policy": {"path": str(policy_dir / "lab.yaml")},
        "quarantine": {"allow_hosts": ["mdm.test"]},
    })
    lab.policy_dir = policy_dir
    with running_lab(lab, "test_workers_e2e"):
        # One device per worker (addresses are allocated in order; the hash decides, so probe).
        lab.on_worker = workerprobe.one_device_per_worker(lab, WORKERS, BASE_PORT)
        yield lab


def test_a_device_keeps_its_worker_and_cannot_pick_another(wlab: Lab):
    for worker, device in wlab.on_worker.items():
        other = 1 - worker
        # the same worker for every connection of the device, whatever the destination port,
        # over IPv6 too (its IPv6 address has the same host number: the same hash)
        assert worker_of_connection(wlab, device) == worker
        assert worker_of_connection(wlab, device, WEB6) == worker
        assert worker_of_connection(wlab, device, WEB4, BASE_PORT + other) == worker, \
            "a connection to the other worker's port number upstream is still this device's worker"
        # The workers' ports on the gateway itself cannot be reached from the tunnel.
        for port in (BASE_PORT + other, BASE_PORT + worker, 8053 + other):
            probe = device.ns.run("curl", "-sS", "--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}",
                                  "-H", "Host: www.example.test", f"http://{GATEWAY_TUNNEL4}:{port}/direct-{port}",
                                  check=False)
            assert probe.stdout.strip() == "000", probe
        # and a request sent to the upstream on the other worker's port number goes through the
        # device's own worker (it is logged by the proxy), never around it
        marker = f"/via-port-{worker}-{time.monotonic_ns()}"
        device.curl(f"http://www.example.test:{BASE_PORT + other}{marker}", timeout=5)
        wait_until(lambda: any(marker in (r.get("url.full") or "") for r in wlab.log_records("proxy")), 5,
                   "the proxy's record of the request")
    assert not [r for r in wlab.nginx_requests() if "/direct-" in r.get("uri", "") + r.get("request", "")]


def test_metrics_are_summed_over_workers(wlab: Lab):
    def decisions() -> float:
        return wlab.metric_value("kanmon_decisions_total", stage="http-request")

    assert wlab.metric_value("kanmon_worker_up", worker="0") == 1
    assert wlab.metric_value("kanmon_worker_up", worker="1") == 1
    before = decisions()
    counts = {0: 3, 1: 5}
    for worker, n in counts.items():
        for i in range(n):
            r = wlab.on_worker[worker].curl(f"http://www.example.test/count-{worker}-{i}")
            assert http_code(r) == "200", r.stderr
    # a scrape asks every worker for its counts as of now: exact at once, no waiting
    assert decisions() - before == sum(counts.values()), "counted once each, by the worker that served it"
    time.sleep(1.2)   # and the periodic pushes do not count anything twice
    assert decisions() - before == sum(counts.values())
    text = wlab.metrics_text()
    families = [line for line in text.splitlines() if line.startswith("# TYPE kanmon_decisions_total ")]
    assert len(families) == 1, "one family per metric in the exposition"
    assert wlab.metric_value("kanmon_wireguard_peers") == len(wlab.devices), "the parent's gauges are not multiplied"


def test_policy_apply_switches_every_worker_and_a_bad_one_is_refused_by_all(wlab: Lab):
    def codes() -> dict[int, str]:
        return {w: http_code(d.curl(f"http://switch.test/s-{time.monotonic_ns()}", timeout=5))
                for w, d in wlab.on_worker.items()}

    assert codes() == {0: "200", 1: "200"}
    wlab.kanmon("policy", "apply", str(wlab.policy_dir / "lab-switch.yaml"), "--config", str(wlab.config_path))
    assert codes() == {0: "403", 1: "403"}, "every worker serves the applied policy when the command returns"
    status = json.loads((wlab.state_dir / "policy-status.json").read_text())
    assert status["result"] == "success"
    live = wlab.policy_dir / "lab-switch.yaml"
    good = live.read_text()
    try:
        live.write_text(good + "rules: [oops\n")
        wlab.gw.run("kill", "-HUP", (wlab.state_dir / "kanmon.pid").read_text().strip())
        wait_until(lambda: json.loads((wlab.state_dir / "policy-status.json").read_text())["result"] == "failure",
                   10, "the broken policy to be refused")
        assert codes() == {0: "403", 1: "403"}, "the old policy keeps serving in every worker"
    finally:
        live.write_text(good)
    wlab.kanmon("policy", "apply", str(wlab.policy_dir / "lab.yaml"), "--config", str(wlab.config_path))
    assert codes() == {0: "200", 1: "200"}
    assert wlab.metric_value("kanmon_worker_restarts_total") == 0, "no worker had to be replaced"


def test_kill_9_of_a_worker_loses_no_record_refuses_its_devices_and_it_comes_back(wlab: Lab):
    victim, survivor = wlab.on_worker[1], wlab.on_worker[0]
    pids = worker_pids(wlab)
    assert set(pids) == {0, 1} and pids[0] != pids[1]
    markers = [f"/before-kill-{time.monotonic_ns()}-{i}" for i in range(5)]
    for marker in markers:
        assert http_code(victim.curl(f"http://www.example.test{marker}")) == "200"
    wlab.gw.run("kill", "-9", str(pids[1]))     # at once: the records were sent, not yet written maybe
    # kill(1) returns when the signal is sent, not when the process is gone: until its sockets
    # are closed, the kernel still completes handshakes into its listening socket's backlog (and
    # resets them at exit). Wait for its listener to go (the restart is 1 s away).
    wait_until(lambda: worker_pids(wlab).get(1) != pids[1], 5, "the killed worker's listener to close")
    # While it is down (it is forked again after RESTART_DELAY, 1 s) its devices are refused
    # (its port does not listen) and nothing reaches the server around the proxy (by IP, so no
    # DNS query is in the way).
    refused = f"/while-down-{time.monotonic_ns()}"
    down = victim.ns.run("curl", "-sS", "--max-time", "3", "-o", "/dev/null", "-w", "%{http_code}",
                         "-H", "Host: www.example.test", f"http://{WEB4}{refused}", check=False)
    assert down.stdout.strip() == "000", down
    assert down.returncode == 7, down.stderr   # curl: could not connect (refused at once, no timeout)
    # the other worker's devices are served meanwhile
    assert http_code(survivor.curl(f"http://www.example.test/survivor-{time.monotonic_ns()}")) == "200"
    # Nothing lost: every request answered before the kill is in the one proxy log.
    wait_until(lambda: all(any(m in (r.get("url.full") or "") for r in wlab.log_records("proxy")) for m in markers),
               5, "the killed worker's records")
    assert not [r for r in wlab.nginx_requests() if refused in r.get("uri", "") + r.get("request", "")]
    # It is forked again and serves its devices.
    wait_until(lambda: worker_pids(wlab).get(1) not in (None, pids[1]), 10, "worker 1 to be forked again")
    wait_until(lambda: wlab.metric_value("kanmon_worker_up", worker="1") == 1, 10, "worker 1 up")
    assert wlab.metric_value("kanmon_worker_restarts_total", worker="1") == 1
    assert worker_pids(wlab)[0] == pids[0], "the other worker kept running"
    # One hash chain per stream, written by the one writer, verifies whole; search finds the
    # killed worker's records in it.
    out = wlab.kanmon("logs", "verify", "--dir", str(wlab.state_dir / "logs"), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert http_code(victim.curl(f"http://www.example.test/after-restart-{time.monotonic_ns()}")) == "200"


def start_download(device) -> subprocess.Popen:
    proc = subprocess.Popen(device.ns.cmd(sys.executable, "-c", DOWNLOAD, WEB4), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "flowing", "the download must be running first"
    return proc


def last_data(proc: subprocess.Popen) -> float:
    return json.loads(proc.communicate(timeout=30)[0].strip().splitlines()[-1])["last_data"]


def cut_ms(wlab: Lab, worker: int, *command: str, other_keeps: bool = True) -> float:
    """Run a `kanmon device ...` command against the device of ``worker`` while it downloads
    (and, with ``other_keeps``, while the other worker's device downloads too): ms from the
    command's return to the device's last data (negative: cut before it returned). The
    other worker's download must survive it."""
    mine = start_download(wlab.on_worker[worker])
    other = start_download(wlab.on_worker[1 - worker]) if other_keeps else None
    out = wlab.kanmon("device", *command, "--config", str(wlab.config_path))
    returned = time.time()
    assert "did not confirm" not in out.stderr, out.stderr
    ms = round((last_data(mine) - returned) * 1000, 1)
    assert ms <= 100, f"worker {worker}: {command[0]} left the device's download running ({ms} ms)"
    if other is not None:
        assert other.poll() is None, "the other worker's device keeps its download"
        other.kill()
        other.wait()
    return ms


def test_quarantine_suspension_and_revocation_cut_live_flows_in_every_worker(wlab: Lab):
    cfg = ["--config", str(wlab.config_path)]
    for worker in range(WORKERS):   # the test before it killed a worker: it may still be coming back
        wait_until(lambda: wlab.metric_value("kanmon_worker_up", worker=str(worker)) == 1, 10, f"worker {worker} up")
    wait_until(lambda: set(worker_pids(wlab)) == set(range(WORKERS)), 10, "every worker listening")
    after_return: dict[str, list[float]] = {"quarantine": [], "suspend": [], "revoke": []}
    # Quarantine keeps the device admitted (no drop set): only its worker can cut the flow.
    for trial in range(QUARANTINE_TRIALS):
        for worker, device in wlab.on_worker.items():
            after_return["quarantine"].append(cut_ms(wlab, worker, "quarantine", device.device_id, "--reason", "e2e"))
            wlab.kanmon("device", "release", device.device_id, *cfg)
    # Suspension drops the device (like revocation, until a time); resumed, it is served again.
    for worker, device in wlab.on_worker.items():
        until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        after_return["suspend"].append(cut_ms(wlab, worker, "suspend", device.device_id, "--until", until,
                                              "--reason", "e2e"))
        wlab.kanmon("device", "resume", device.device_id, *cfg)
        # Its peer was removed: the device's WireGuard client notices only when its data go
        # unanswered (keepalive + rekey timeout, ~15 s) and then shakes hands again.
        wait_until(lambda: http_code(device.curl(f"http://www.example.test/resumed-{time.monotonic_ns()}", timeout=2))
                   == "200", 40, "the resumed device to be served again", interval=0.5)
    # Revocation, in the worker of device 1 then device 0 (the last test of the module: they
    # stay revoked, so the first one's device cannot be the "other" of the second).
    for worker in (1, 0):
        after_return["revoke"].append(cut_ms(wlab, worker, "revoke", wlab.on_worker[worker].device_id,
                                             "--reason", "lost", other_keeps=False))
    (ARTIFACTS / "e2e").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "e2e" / "workers-cut-latency.json").write_text(json.dumps(
        {"workers": WORKERS, "ms_from_command_return_to_last_data": after_return}, indent=2))
