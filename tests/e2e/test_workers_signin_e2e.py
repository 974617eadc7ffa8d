"""Issue #22 with user sign-in (issue #9) and automatic quarantine (issue #18): the product
default `proxy.workers: auto` (one worker per usable core, at least 2 here; the lab pins 1 for
other tests) in the namespace lab with the lab's OIDC provider. One device per worker (found by probing
which worker's port accepted its connection) signs in through the portal in a headless
Chromium; `kanmon user signout` of one user cuts that device's running download in its worker
within 100 ms while the other worker's device keeps its own; then one block in the `malware`
category by the device of worker 1 quarantines it (its worker counts, the gateway process
writes the registry) and cuts its live flow there."""

from __future__ import annotations

import json
import statistics
import subprocess
import time

import pytest

from gateway.autoquarantine.triggers import AUTO_ACTOR
from gateway.config import MAX_PROXY_WORKERS, usable_cores
from gateway.lab import workerprobe
from gateway.lab.oidcprovider import OidcClient
from gateway.lab.topology import Lab, wait_until
from tests.availability import unavailable
from tests.e2e.conftest import ARTIFACTS, require_lab, running_lab
from tests.e2e.test_oidc_lab import _require_oidc_lab
from tests.e2e.test_signin_e2e import CALLBACK, PORTAL, _auth, _code, _curl, _sign_in
from tests.e2e.test_workers_e2e import last_data, start_download

pytestmark = pytest.mark.e2e

WORKERS = min(usable_cores(), MAX_PROXY_WORKERS)   # what `auto` makes of this machine
BASE_PORT = 8080     # the lab's transparent_port (the default)
SIGNOUT_TRIALS = 2   # per worker
USERS = {0: "alice", 1: "bob"}   # the devices of workers 0 and 1 (others, with more cores, idle)

POLICY = """\
version: 1
settings: {default_action: allow}
rules:
  - {id: feed-malware, action: block, category: malware, reason: "マルウェア配布サイト / malware site", match: {domain: [blocked.test]}}
"""


@pytest.fixture(scope="module")
def wslab(tmp_path_factory):
    require_lab()
    _require_oidc_lab()
    if WORKERS < 2:
        unavailable(f"workers: auto makes {WORKERS} worker here: needs 2 usable cores")
    work = tmp_path_factory.mktemp("wsignin")
    policy = work / "policy.yaml"
    policy.write_text(POLICY)
    lab = Lab(work, n_devices=2, idp=True, idp_client=OidcClient(redirect_uris=(CALLBACK,)))
    with running_lab(lab, "test_workers_signin_e2e", start=False):
        lab.config_overrides = {
            "proxy": {"workers": "auto"},   # the product default (the lab's base config pins 1)
            "policy": {"path": str(policy)},
            "signin": {
                "issuer": "https://idp.test", "client_id": lab.idp.client.client_id,
                "client_secret": lab.idp.client.client_secret, "ca_file": str(lab.ca.cert_path),
                "portal_host": PORTAL, "session_lifetime": 3600, "require_owner_match": False,
            },
            "auto_quarantine": {"categories": ["malware"]},
            "quarantine": {"allow_hosts": ["mdm.test"]},
        }
        lab.write_config()
        lab.start_gateway()
        for device in lab.devices:
            lab.wait_for_peer(device)
        lab.on_worker = workerprobe.one_device_per_worker(lab, WORKERS, BASE_PORT)
        yield lab


def signout(lab: Lab, user: str) -> subprocess.CompletedProcess:
    return lab.kanmon("user", "signout", user, "--config", str(lab.config_path), "--reason", "e2e", check=False)


def test_signout_cuts_the_download_in_the_users_worker_only(wslab: Lab):
    cut_ms: dict[int, list[float]] = {0: [], 1: []}
    pair = {w: wslab.on_worker[w] for w in USERS}
    for trial in range(SIGNOUT_TRIALS):
        for worker, device in pair.items():
            other = pair[1 - worker]
            for w, d in pair.items():   # both signed in (the portal is in the device's own worker)
                if _code(_curl(d, "http://example.test/", "-H", "Accept: text/html")) == "302":
                    _sign_in(wslab, d, USERS[w])
            assert _code(_curl(device, "http://example.test/", "-H", "Accept: text/html")) == "200"
            mine, theirs = start_download(device), start_download(other)
            out = signout(wslab, USERS[worker])
            returned = time.time()   # the session store was written before the command returned
            assert out.returncode == 0, out.stdout + out.stderr
            cut_ms[worker].append(round((last_data(mine) - returned) * 1000, 1))
            assert cut_ms[worker][-1] <= 100, f"worker {worker}: the signed-out device's download lives on"
            assert theirs.poll() is None, "the other worker's signed-in device keeps its download"
            theirs.kill()
            theirs.wait()
            # its worker forgot the session: the next page goes to the portal again, the other's not
            assert _code(_curl(device, "http://example.test/", "-H", "Accept: text/html")) == "302"
            assert _code(_curl(other, "http://example.test/", "-H", "Accept: text/html")) == "200"
    for worker, device in pair.items():
        signins = [r for r in _auth(wslab, "user-signin", device.device_id) if r["event.outcome"] == "success"]
        assert len(signins) >= SIGNOUT_TRIALS, "the worker's auth records reach the one log"
        ended = _auth(wslab, "user-session-ended", device.device_id)
        assert len(ended) == SIGNOUT_TRIALS, "each end written once (by the gateway process), not once per worker"
    assert wslab.metric_value("kanmon_worker_restarts_total") == 0, "no worker was late or replaced"
    assert wslab.metric_value("kanmon_worker_up") == WORKERS, "auto: one worker per usable core"
    (ARTIFACTS / "e2e").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "e2e" / "workers-signout-cut-latency.json").write_text(json.dumps(
        {"workers": WORKERS, "ms_from_signout_return_to_last_data": cut_ms,
         "median_ms": statistics.median(cut_ms[0] + cut_ms[1])}, indent=2))


def test_a_malware_block_in_worker_1_quarantines_its_device(wslab: Lab):
    device, other = wslab.on_worker[1], wslab.on_worker[0]
    for w, d in ((w, wslab.on_worker[w]) for w in USERS):
        if _code(_curl(d, "http://example.test/", "-H", "Accept: text/html")) == "302":
            _sign_in(wslab, d, USERS[w])
    assert _code(_curl(device, "https://www.example.test/ok")) == "200"
    running = start_download(device)
    device.curl("https://blocked.test/payload", timeout=5)   # one block in a listed category
    blocked = time.time()
    wait_until(lambda: json.loads(wslab.kanmon("device", "show", device.device_id, "--config",
                                               str(wslab.config_path)).stdout)["status"] == "quarantined",
               5, "the automatic quarantine")
    # the quarantine's reconcile report cut it in its worker (a 4 MB/s download of many MB)
    assert last_data(running) - blocked < 5, "the quarantined device's download lives on"
    wait_until(lambda: _code(_curl(device, "https://www.example.test/q")) == "403", 5, "the quarantine to apply")
    assert _code(_curl(other, "https://www.example.test/meanwhile")) == "200"
    assert wslab.metric_value("kanmon_auto_quarantines_total", trigger="category") == 1, "counted once, by the gateway"
    audit = [r for r in wslab.log_records("audit") if r.get("event.action") == "device-quarantined"
             and r.get("device.id") == device.device_id]
    assert audit and audit[-1]["user.name"] == AUTO_ACTOR
    wslab.kanmon("device", "release", device.device_id, "--config", str(wslab.config_path))
    wait_until(lambda: _code(_curl(device, "https://www.example.test/back")) == "200", 10, "the release")
