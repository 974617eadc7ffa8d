"""Issue #22, "the compiled policy is built once and shared": after a `kanmon policy apply` of a
policy with a big list, the gateway process and every inspection worker serve its host table
from one mapped file (gateway/runtime/policycache.py, gateway/policy/hosttable.py) -- the same
file in every process's memory map, not a copy per worker -- and decide with it in every worker;
applying another policy switches every worker again and removes the file no policy uses."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from gateway.lab import workerprobe
from gateway.lab.topology import Lab
from tests.e2e.conftest import require_lab, running_lab
from tests.e2e.test_policy_e2e import POLICIES

pytestmark = pytest.mark.e2e

WORKERS = 2
BASE_PORT = 8080
BIG = 6000   # names in the big list: above policycache.MAP_MIN_ENTRIES, so its table is mapped


@pytest.fixture(scope="module")
def slab(tmp_path_factory):
    require_lab()
    work = tmp_path_factory.mktemp("slab")
    policy_dir = work / "policies"
    shutil.copytree(POLICIES, policy_dir)
    names = [f"n{i:05d}.bulk.example" for i in range(BIG)] + ["switch.test"]
    (policy_dir / "lists" / "big.txt").write_text("\n".join(names) + "\n")
    (policy_dir / "big.yaml").write_text(
        (policy_dir / "lab.yaml").read_text().replace("lists:\n", "lists:\n  big: {file: lists/big.txt}\n", 1)
        + "  - {id: block-big, action: block, reason: big list, match: {list: [big]}}\n")
    lab = Lab(work, n_devices=2, config_overrides={"proxy": {"workers": WORKERS},
                                                   "policy": {"path": str(policy_dir / "lab.yaml")}})
    lab.policy_dir = policy_dir
    with running_lab(lab, "test_workers_shared_policy_e2e"):
        lab.on_worker = workerprobe.one_device_per_worker(lab, WORKERS, BASE_PORT)
        yield lab


def _codes(lab: Lab) -> dict[int, str]:
    return {w: d.curl(f"http://switch.test/s-{time.monotonic_ns()}", timeout=5).stdout.rsplit("HTTP_CODE=", 1)[-1].strip()
            for w, d in lab.on_worker.items()}


def _gateway_processes(lab: Lab) -> list[int]:
    parent = lab.gateway.proc.pid
    cmdline = Path(f"/proc/{parent}/cmdline").read_bytes()
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    workers = [int(pid) for pid in children if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline]
    assert len(workers) == WORKERS, children
    return [parent, *workers]


def _mapped_tables(pid: int) -> set[str]:
    return {line.split(None, 5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if line.rstrip().endswith(".hosts") or line.rstrip().endswith(".hosts (deleted)")}


def test_every_process_serves_the_big_table_from_one_mapped_file(slab: Lab):
    cache_dir = slab.state_dir / "policy-cache"
    assert _codes(slab) == {0: "200", 1: "200"}
    assert not list(cache_dir.glob("*.hosts")), "the lab policy's tables are small: dicts, no file"
    slab.kanmon("policy", "apply", str(slab.policy_dir / "big.yaml"), "--config", str(slab.config_path), timeout=120)
    assert _codes(slab) == {0: "403", 1: "403"}, "every worker blocks a name of the big list"
    (table,) = cache_dir.glob("*.hosts")
    for pid in _gateway_processes(slab):
        assert _mapped_tables(pid) == {str(table)}, f"process {pid} maps the one table file"
    slab.kanmon("policy", "apply", str(slab.policy_dir / "lab.yaml"), "--config", str(slab.config_path), timeout=120)
    assert _codes(slab) == {0: "200", 1: "200"}
    assert not table.exists(), "a table no policy uses is removed"
    assert slab.metric_value("kanmon_worker_restarts_total") == 0, "no worker had to be replaced"
