"""Issue #19 "What to build": the Grafana dashboard and the alert rules against a real
Prometheus scraping two real gateway nodes.

Two nodes on one PostgreSQL registry (gateway/lab/cluster.py, as in test_cluster.py), each
serving /metrics on its underlay address; a Prometheus (Debian's `prometheus`, configured by
observability/prometheus.example.yml with the lab's targets and a 1 s scrape and rule
evaluation, alerts.yml loaded) in the lab's database namespace scrapes both as job `kanmon`. Traffic: an allowed and a blocked request through each node, in
two rounds (a counter series that appears with its first increment has no increase yet), and
one quarantined device.

Then every target expression of grafana-dashboard.json, with the template variables filled
in as Grafana would (tests/dashboard_queries.py), is evaluated through /api/v1/query for all
nodes and for one node: each must parse and answer. Chosen panels must answer the right
numbers: one quarantined device is 1 (both nodes export it: added up it would be 2), the
KanmonDeviceQuarantined alert says "1 device(s) quarantined", per-node panels follow the
instance selector. The answers are written to artifacts/e2e/dashboard/queries.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse

import pytest
import yaml

from gateway.lab.cluster import NODE_B_UNDERLAY, ClusterLab, postgres_prerequisites
from gateway.lab.topology import UNDERLAY_GW, wait_until
from tests import dashboard_queries
from tests.availability import unavailable
from tests.e2e.conftest import ARTIFACTS, require_lab
from tests.e2e.test_cluster import POLICY_V1, _record
from tests.e2e.test_device_lifecycle import http_code

pytestmark = pytest.mark.e2e

RULES = dashboard_queries.DASHBOARD.parent / "alerts.yml"
EXAMPLE_CONFIG = dashboard_queries.DASHBOARD.parent / "prometheus.example.yml"
METRICS_PORT = 9180
PROMETHEUS_PORT = 9090            # inside the database namespace: no clash with anything else
NODE_A = f"{UNDERLAY_GW}:{METRICS_PORT}"
NODE_B = f"{NODE_B_UNDERLAY}:{METRICS_PORT}"
EVIDENCE = ARTIFACTS / "e2e" / "dashboard"


class Prometheus:
    """A Prometheus server in a lab namespace, queried over its HTTP API from inside it."""

    def __init__(self, ns, workdir):
        self.ns, self.workdir = ns, workdir
        self.base = f"http://127.0.0.1:{PROMETHEUS_PORT}"
        self.proc = None

    def start(self, binary: str, targets: list[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(RULES, self.workdir / "alerts.yml")
        # The shipped example, with the lab's targets and a 1 s interval.
        config = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"}
        [job] = config["scrape_configs"]
        assert job["job_name"] == "kanmon" and config["rule_files"] == ["alerts.yml"]
        job["static_configs"] = [{"targets": targets}]
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.proc = self.ns.popen(binary, f"--config.file={self.workdir / 'prometheus.yml'}",
                                  f"--storage.tsdb.path={self.workdir / 'data'}",
                                  f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}", stdout=self.log,
                                  stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is not None or self._get("/-/ready", raw=True) == "Prometheus Server is Ready.",
                   60, "prometheus to start")
        assert self.proc.poll() is None, self.log_text()

    def log_text(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-4000:]

    def _get(self, path: str, raw: bool = False):
        out = self.ns.run("curl", "-sS", "--max-time", "10", self.base + path, check=False, timeout=20)
        if raw:
            return out.stdout.strip()
        return json.loads(out.stdout)

    def query(self, expr: str) -> dict:
        # No --fail: a parse error is a 400 with a JSON body naming the error.
        return self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))

    def value(self, expr: str) -> dict[str, float]:
        """{label set as text: value} of an instant vector answer."""
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in answer["data"]["result"]}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    require_lab()
    binary = shutil.which("prometheus")
    if binary is None:
        unavailable("prometheus not installed (apt-get install prometheus)")
    missing = postgres_prerequisites()
    if missing:
        unavailable("PostgreSQL missing: " + ", ".join(missing))
    workdir = tmp_path_factory.mktemp("dashboard")
    policy_dir = workdir / "policy"
    (policy_dir / "lists").mkdir(parents=True)
    (policy_dir / "policy.yaml").write_text(POLICY_V1)
    (policy_dir / "lists" / "banned.txt").write_text("blocked.test\n")
    # /metrics on every address of the node, so the database namespace reaches both nodes over
    # the underlay (the production setting is a management address a Prometheus can reach).
    lab = ClusterLab(workdir / "lab", overrides={"management": {"listen": f"0.0.0.0:{METRICS_PORT}"}})
    prometheus = Prometheus(lab.db_ns, workdir / "prometheus")
    try:
        lab.build()
        out = lab.kanmon("node-a", "cluster", "policy-apply", str(policy_dir / "policy.yaml"),
                         "--config", str(lab.nodes["node-a"].config_path), check=False)
        assert out.returncode == 0, out.stderr
        from gateway.registry.postgres import PgRegistry
        admin = PgRegistry(lab.pg.url(), node="test")
        for index, node in ((1, "node-a"), (2, "node-b"), (3, "node-b")):
            admin.add(_record(lab.add_device(index, node)))
        lab.start_node("node-a")
        lab.start_node("node-b")
        for device in lab.lab.devices:
            for node in ("node-a", "node-b"):
                lab.wait_for_peer(node, device)
        prometheus.start(binary, [NODE_A, NODE_B])
        yield lab, prometheus
    finally:
        prometheus.stop()
        EVIDENCE.mkdir(parents=True, exist_ok=True)
        for src in (workdir / "prometheus" / "prometheus.log", workdir / "lab" / "node-a.log",
                    workdir / "lab" / "node-b.log"):
            if src.exists():
                shutil.copy(src, EVIDENCE / src.name)
        lab.teardown()


def _browse(lab) -> None:
    """An allowed and a blocked request through each node (dev1 on A, dev2 on B)."""
    for device in lab.lab.devices[:2]:
        assert http_code(device.curl("http://www.example.test/dashboard", timeout=5)) == "200"
        assert http_code(device.curl("http://blocked.test/dashboard", timeout=5)) == "403"


def _scraped(prometheus, expr: str, want) -> None:
    wait_until(lambda: want(prometheus.value(expr)), 30, f"prometheus to see {expr}")


@pytest.fixture(scope="module")
def traffic(two_nodes):
    lab, prometheus = two_nodes
    _scraped(prometheus, 'up{job="kanmon"}', lambda v: len(v) == 2 and all(x == 1 for x in v.values()))
    _browse(lab)
    # the first block's series is scraped on both nodes before the second round
    _scraped(prometheus, 'sum by (instance) (kanmon_decisions_total{verdict="block"})', lambda v: len(v) == 2)
    _browse(lab)
    config_a = str(lab.nodes["node-a"].config_path)
    lab.kanmon("node-a", "device", "quarantine", lab.lab.devices[2].device_id, "--reason", "dashboard test",
               "--config", config_a)
    _scraped(prometheus, 'sum by (instance) (kanmon_decisions_total{verdict="block"})',
             lambda v: len(v) == 2 and all(x >= 2 for x in v.values()))
    _scraped(prometheus, 'kanmon_devices{status="quarantined"}', lambda v: len(v) == 2 and all(x == 1 for x in v.values()))
    time.sleep(3)      # a few more scrapes after the last change, so rates over [1m] see it
    return lab, prometheus


def _panel(title_en: str) -> dict:
    return next(p for p in dashboard_queries.load()["panels"] if p["title"].split(" / ")[-1] == title_en)


def _expr(title_en: str, ref: str = "A", instance: str = ".*") -> str:
    target = next(t for t in _panel(title_en)["targets"] if t["refId"] == ref)
    return dashboard_queries.substitute(target["expr"], instance=instance)


def test_every_panel_query_answers_for_all_nodes_and_for_one(traffic):
    _lab, prometheus = traffic
    answers, failures = [], []
    pairs = dashboard_queries.targets(dashboard_queries.load())
    assert len(pairs) >= 20
    for instance in (".*", NODE_A):
        for panel, target in pairs:
            expr = dashboard_queries.substitute(target["expr"], instance=instance)
            answer = prometheus.query(expr)
            if answer.get("status") != "success" or answer["data"]["resultType"] not in ("vector", "scalar"):
                failures.append(f"{panel['title']} [{target['refId']}]: {expr}: {answer.get('error')}")
                continue
            answers.append({"panel": panel["title"], "ref": target["refId"], "instance": instance, "expr": expr,
                            "result": [{"metric": r["metric"], "value": r["value"][1]}
                                       for r in answer["data"]["result"]]})
    EVIDENCE.mkdir(parents=True, exist_ok=True)
    (EVIDENCE / "queries.json").write_text(json.dumps(answers, indent=2, ensure_ascii=False))
    assert not failures, "\n".join(failures)
    # Not vacuous: with traffic on both nodes most panels have data (mail and sign-in do not).
    with_data = {a["panel"] for a in answers if a["result"] and a["instance"] == ".*"}
    assert len(with_data) >= 10, with_data


def test_the_instance_variable_lists_both_nodes(traffic):
    _lab, prometheus = traffic
    # What Grafana asks for label_values(up{job="kanmon"}, instance).
    answer = prometheus._get("/api/v1/label/instance/values?" + urllib.parse.urlencode({"match[]": 'up{job="kanmon"}'}))
    assert answer["status"] == "success" and sorted(answer["data"]) == sorted([NODE_A, NODE_B])


def test_one_quarantined_device_is_one_on_two_nodes(traffic):
    _lab, prometheus = traffic
    # both nodes export the registry gauge: added up, the old query said 2
    assert sum(prometheus.value('kanmon_devices{status="quarantined"}').values()) == 2
    devices = prometheus.value(_expr("Devices by status"))
    by_status = {json.loads(k)["status"]: v for k, v in devices.items()}
    assert by_status["quarantined"] == 1 and by_status["active"] == 2, by_status


def test_the_quarantine_alert_fires_saying_one_device(traffic):
    _lab, prometheus = traffic

    def firing():
        alerts = prometheus._get("/api/v1/alerts")["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "KanmonDeviceQuarantined" and a["state"] == "firing"]
    wait_until(lambda: firing(), 20, "KanmonDeviceQuarantined to fire")
    [alert] = firing()
    assert alert["annotations"]["summary"] == "隔離中の端末が 1 台あります / 1 device(s) quarantined"
    assert alert["annotations"]["runbook_url"] == "observability/RUNBOOK.md#kanmondevicequarantined"
    alerts = prometheus._get("/api/v1/alerts")["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] == "KanmonGatewayDown"]


def test_per_node_panels_follow_the_instance_selector(traffic):
    _lab, prometheus = traffic
    up_all = prometheus.value(_expr("Gateway up"))
    assert len(up_all) == 2 and set(up_all.values()) == {1.0}
    up_a = prometheus.value(_expr("Gateway up", instance=NODE_A))
    assert [json.loads(k)["instance"] for k in up_a] == [NODE_A]
    peers = prometheus.value(_expr("WireGuard peers"))
    assert {json.loads(k)["instance"] for k in peers} == {NODE_A, NODE_B}
    assert len(set(peers.values())) == 1 and min(peers.values()) >= 2    # every node has every admitted device
    # The 24-hour top-rules panel against what the counters really grew by since their first
    # scrape (max - min of each series, no extrapolation): increase() may only add a little
    # towards the window's ends. A blocked request is several decisions (DNS queries, the
    # request), so the expected numbers come from the counters, not from the request count.
    grown = ('sum by (rule) (max_over_time(kanmon_decisions_total{{verdict="block", instance=~"{}"}}[24h])'
             ' - min_over_time(kanmon_decisions_total{{verdict="block", instance=~"{}"}}[24h]))')
    for instance in (".*", NODE_A, NODE_B):
        shown = {json.loads(k)["rule"]: v for k, v in prometheus.value(_expr("Top blocking rules (24h)",
                                                                                 instance=instance)).items()}
        real = {json.loads(k)["rule"]: v for k, v in prometheus.value(grown.format(instance, instance)).items()}
        assert real["banned"] >= 1, (instance, real)
        assert real["banned"] <= shown["banned"] <= 1.5 * real["banned"], (instance, shown, real)
    shown_all = prometheus.value(_expr("Top blocking rules (24h)"))
    shown_a = prometheus.value(_expr("Top blocking rules (24h)", instance=NODE_A))
    assert max(shown_all.values()) > max(shown_a.values())       # node B's blocks are in "all" only
    blocked = prometheus.value(_expr("Blocked traffic by stage"))
    assert blocked and all(v > 0 for v in blocked.values()), blocked
