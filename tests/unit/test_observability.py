"""The shipped Prometheus alert rules and Grafana dashboard (observability/), checked with
the real Prometheus tools (Debian package `prometheus`): `promtool check rules`, `promtool
test rules` (alerts fire on synthetic bursts and stay quiet on quiet series), and every
dashboard expression evaluated by a running Prometheus that also loads the rules."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import dashboard_queries
from tests.availability import unavailable

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "observability"
RULES = OBS / "alerts.yml"
RULE_TESTS = OBS / "alerts_test.yml"
DASHBOARD = OBS / "grafana-dashboard.json"

REQUIRED_ALERTS = {
    "KanmonAuthFailureBurst", "KanmonDeviceQuarantined", "KanmonLogWriteFailure",
    "KanmonPolicyReloadFailed", "KanmonRulesExpiringSoon", "KanmonBlockedTrafficSpike",
    "KanmonGatewayDown",
    # issue #18: the evidence itself must not fail silently
    "KanmonReconcileErrors", "KanmonAddonErrors", "KanmonFirewallLogDown", "KanmonFirewallLogLagging",
}
RUNBOOK = OBS / "RUNBOOK.md"
# English part of the panel titles the issue asks for.
REQUIRED_PANELS = (
    "Blocked traffic by category", "Blocked traffic by device group", "Top blocking rules",
    "Devices by status", "Authentication failures", "Mail verdicts", "Decision latency",
    "WireGuard peers",
)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed (apt-get install prometheus)")
    return path


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _expressions(dashboard: dict) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    return found


# ---- static checks -----------------------------------------------------------------------

def test_every_required_alert_has_severity_and_bilingual_annotations_citing_guidelines():
    rules = {r["alert"]: r for r in _rules()}
    assert REQUIRED_ALERTS <= set(rules)
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        for key in ("summary", "description"):
            text = rule["annotations"][key]
            ja, sep, en = text.partition(" / ")
            assert sep, f"{name} {key}: Japanese and English separated by ' / '"
            assert any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in ja), name
            assert sum(c.isascii() and c.isalpha() for c in en) > 10, name
        description = rule["annotations"]["description"]
        assert "IPA" in description, name
        assert any(section in description for section in ("3.3", "3.8", "3.2.2")), name


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = heading.strip().lstrip("#").strip().lower()
    return "".join(ch for ch in text if ch.isalnum() or ch in " -_").replace(" ", "-")


def test_every_alert_links_a_runbook_section_that_exists():
    # issue #19: every alert rule carries a runbook_url, and its RUNBOOK.md section exists.
    anchors = {_anchor(line) for line in RUNBOOK.read_text(encoding="utf-8").splitlines() if line.startswith("#")}
    rules = {r["alert"]: r for r in _rules()}
    missing = sorted(name for name, rule in rules.items() if "runbook_url" not in rule["annotations"])
    assert not missing, f"alerts without runbook_url: {missing}"
    for name in rules:
        path, _, anchor = rules[name]["annotations"]["runbook_url"].partition("#")
        assert (ROOT / path).resolve() == RUNBOOK.resolve(), name
        assert anchor == name.lower() and anchor in anchors, (name, anchor)


def test_alert_rules_use_the_gateway_metric_names():
    exprs = " ".join(r["expr"] for r in _rules())
    for metric in ("kanmon_auth_failures_total", "kanmon_devices", "kanmon_log_write_errors_total",
                   "kanmon_policy_reloads_total", "kanmon_policy_rules_expiring",
                   "kanmon_decisions_total", 'up{job="kanmon"}', "kanmon_reconcile_errors_total",
                   "kanmon_addon_errors_total", "kanmon_firewall_log_up",
                   "kanmon_firewall_log_heartbeat_timestamp_seconds", "kanmon_firewall_log_errors_total",
                   "kanmon_auto_quarantines_total", "kanmon_auto_quarantine_errors_total",
                   "kanmon_download_scans_total", "kanmon_alert_deliveries_total"):
        assert metric in exprs


def test_every_metric_an_alert_reads_is_exported_by_the_gateway():
    import re

    from gateway.metrics import GatewayMetrics
    exported = set()
    for metric in GatewayMetrics().registry.collect():
        exported |= {sample.name for sample in metric.samples} | {metric.name}
        if metric.type == "counter":   # the family name leaves out the `_total` the series carry
            exported.add(metric.name + "_total")
    used = set(re.findall(r"kanmon_[a-z_]+", " ".join(r["expr"] for r in _rules())))
    assert used and used <= exported, used - exported


def test_dashboard_has_the_required_panels_and_every_panel_has_a_query():
    dashboard = _dashboard()
    titles = [p["title"] for p in dashboard["panels"]]
    for wanted in REQUIRED_PANELS:
        assert any(wanted in title for title in titles), wanted
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), panel["title"]
        assert " / " in panel["title"], f"bilingual title: {panel['title']}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_cover_the_metrics_the_issue_names():
    exprs = " ".join(e for _t, e in _expressions(_dashboard()))
    for metric in ("kanmon_decisions_total", "kanmon_devices", "kanmon_auth_failures_total",
                   "kanmon_mail_verdicts_total", "kanmon_decision_duration_seconds_bucket",
                   "kanmon_wireguard_peers"):
        assert metric in exprs, metric
    assert "by (category)" in exprs and "by (group)" in exprs


# ---- promtool ------------------------------------------------------------------------------

def test_promtool_check_rules_passes():
    promtool = _tool("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(_rules())} rules found" in done.stdout


def test_promtool_check_config_passes_on_the_example_prometheus_config(tmp_path):
    promtool = _tool("promtool")
    for name in ("prometheus.example.yml", "alerts.yml"):
        shutil.copy(OBS / name, tmp_path / name)
    done = subprocess.run([promtool, "check", "config", "prometheus.example.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((OBS / "prometheus.example.yml").read_text(encoding="utf-8"))
    assert [job["job_name"] for job in config["scrape_configs"]] == ["kanmon"]   # what the rules select
    # the check is not vacuous: a rule file that does not parse fails it
    (tmp_path / "alerts.yml").write_text("groups: [{name: x, rules: [{alert: A, expr: 'sum(('}]}]\n")
    done = subprocess.run([promtool, "check", "config", "prometheus.example.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0


def test_promtool_check_rules_rejects_a_broken_rule(tmp_path):
    # The check is not vacuous: a syntax error in an expression fails it.
    promtool = _tool("promtool")
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES.read_text(encoding="utf-8").replace(
        "sum by (reason) (increase(kanmon_auth_failures_total[5m])) > 10",
        "sum by (reason) (increase(kanmon_auth_failures_total[5m]) > 10"), encoding="utf-8")
    done = subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0


def test_promtool_unit_tests_of_the_alerts_pass():
    promtool = _tool("promtool")
    done = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=OBS,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = [t for case in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
             for t in case["alert_rule_test"]]
    # issue #19: every alert rule is seen firing (and quiet) by at least one unit test.
    rules = {r["alert"] for r in _rules()}
    assert rules <= {t["alertname"] for t in cases if t["exp_alerts"]}
    assert rules <= {t["alertname"] for t in cases if not t["exp_alerts"]}


def test_promtool_unit_tests_fail_when_the_threshold_is_raised(tmp_path):
    # The unit tests see the thresholds: with a burst threshold of 100 the expected
    # auth-failure alert no longer fires and `promtool test rules` fails.
    promtool = _tool("promtool")
    (tmp_path / "alerts.yml").write_text(RULES.read_text(encoding="utf-8").replace(
        "(increase(kanmon_auth_failures_total[5m])) > 10", "(increase(kanmon_auth_failures_total[5m])) > 100"),
        encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "KanmonAuthFailureBurst" in done.stdout + done.stderr


def test_promtool_two_node_case_fails_when_the_registry_gauge_is_added_up(tmp_path):
    # The two-node case of alerts_test.yml sees the doubling: with `sum` instead of `max`, one
    # quarantined device exported by two nodes alerts as "2 device(s) quarantined" and the
    # unit tests fail.
    promtool = _tool("promtool")
    rules = RULES.read_text(encoding="utf-8")
    assert 'max by (job, status) (kanmon_devices{status="quarantined"})' in rules
    (tmp_path / "alerts.yml").write_text(rules.replace(
        'max by (job, status) (kanmon_devices{status="quarantined"})',
        'sum by (job, status) (kanmon_devices{status="quarantined"})'), encoding="utf-8")
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "2 device(s) quarantined" in done.stdout + done.stderr


# ---- issue #19: the dashboard on several nodes ------------------------------------------------

# Gauges that count the shared registry: every node of a cluster exports the same value.
REGISTRY_GAUGES = ("kanmon_devices", "kanmon_user_sessions")
# Gauges of one node (a level, not a count of events).
NODE_GAUGES = ("kanmon_wireguard_peers", "kanmon_policy_rules_expiring", "up{")


def _variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def test_dashboard_has_no_import_inputs_and_every_query_uses_the_datasource_variable():
    dashboard = _dashboard()
    # Nothing in the dashboard refers to an import input: __inputs would only add a
    # "DS_PROMETHEUS" question to the import dialog that changes nothing.
    assert "__inputs" not in dashboard and "DS_PROMETHEUS" not in DASHBOARD.read_text(encoding="utf-8")
    variables = _variables(dashboard)
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    for panel, target in dashboard_queries.targets(dashboard):
        for owner in (panel, target):
            assert owner["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_instance_variable_selects_the_nodes_of_the_kanmon_job():
    instance = _variables(_dashboard())["instance"]
    assert instance["type"] == "query" and instance["multi"] and instance["includeAll"]
    assert instance["allValue"] == ".*"
    assert instance["query"]["query"] == 'label_values(up{job="kanmon"}, instance)'


def test_per_node_queries_use_the_instance_selector_and_registry_queries_do_not_add_nodes_up():
    for panel, target in dashboard_queries.targets(_dashboard()):
        expr = target["expr"]
        if any(metric in expr for metric in REGISTRY_GAUGES):
            # The same value from every node: folded with max, never summed, and not per node.
            assert expr.startswith("max") and "sum" not in expr and "$instance" not in expr, (panel["title"], expr)
        else:
            assert 'instance=~"$instance"' in expr, (panel["title"], expr)


def test_alert_rules_never_add_up_a_registry_gauge():
    import re
    for rule in _rules():
        for metric in REGISTRY_GAUGES:
            if metric + "{" in rule["expr"] or metric + ")" in rule["expr"]:
                assert re.match(r"\s*(max|avg)\b", rule["expr"]) and "sum" not in rule["expr"], rule["alert"]


def test_legends_and_reductions_never_total_a_level_or_a_rolling_window():
    # A legend "sum"/"total" adds up the points of a series: meaningless for a gauge (devices,
    # peers, sessions), a rate, or an increase over a rolling window (each point already holds
    # its window's total, neighbouring points overlap). Rates show mean/max, levels and rolling
    # totals show last/max.
    checked = 0
    for panel in _dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        options = panel.get("options", {})
        calcs = options.get("legend", {}).get("calcs", []) + options.get("reduceOptions", {}).get("calcs", [])
        assert calcs, f"{panel['title']}: no legend calculation or reduction chosen"
        assert not {"sum", "total", "count", "delta"} & set(calcs), (panel["title"], calcs)
        exprs = [t["expr"] for t in panel["targets"]]
        if all("rate(" in e and "increase(" not in e for e in exprs):
            assert "mean" in calcs, panel["title"]
        if any(g in e for g in REGISTRY_GAUGES + NODE_GAUGES for e in exprs) or any("increase(" in e for e in exprs):
            assert "lastNotNull" in calcs, panel["title"]
        checked += 1
    assert checked >= 14


def test_mail_verdicts_count_messages_once_and_leave_out_indicator_none():
    panels = {p["title"].split(" / ")[-1]: p for p in _dashboard()["panels"]}
    verdicts = [t["expr"] for t in panels["Mail verdicts"]["targets"]]
    assert "kanmon_mail_messages_total" in verdicts[0] and "sum by (verdict)" in verdicts[0]
    # the per-indicator counter only for connection/recipient refusals, which are not messages
    assert all("kanmon_mail_verdicts_total" not in e or "private-" in e for e in verdicts)
    indicators = [t["expr"] for t in panels["Mail indicators (24h)"]["targets"]]
    assert indicators and all('indicator!="none"' in e for e in indicators)
    from gateway.metrics import GatewayMetrics
    names = {m.name for m in GatewayMetrics().registry.collect()}
    assert "kanmon_mail_messages" in names


def test_substitution_fills_every_variable_and_refuses_unknown_ones():
    for _panel, target in dashboard_queries.targets(_dashboard()):
        assert "$" not in dashboard_queries.substitute(target["expr"], instance="gw:9180")
    assert dashboard_queries.substitute('up{instance=~"$instance"}[$__rate_interval]', "a") == 'up{instance=~"a"}[1m]'
    with pytest.raises(KeyError):
        dashboard_queries.substitute("rate(x[$__unknown])")


# ---- a real Prometheus -----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    binary = _tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    shutil.copy(RULES, work / "alerts.yml")
    (work / "prometheus.yml").write_text(
        "global:\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\nscrape_configs: []\n", encoding="utf-8")
    port = _free_port()
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("prometheus did not start:\n" + (work / "prometheus.log").read_text(errors="replace"))
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return _get(url)
    except urllib.error.HTTPError as exc:   # 400 with a JSON body on a parse error
        return json.load(exc)


def test_every_dashboard_expression_evaluates_in_prometheus(prometheus):
    expressions = _expressions(_dashboard())
    assert len(expressions) >= 10
    failures = []
    for title, expr in expressions:
        expr = dashboard_queries.substitute(expr)
        answer = _query(prometheus, expr)
        if answer.get("status") != "success":
            failures.append(f"{title}: {expr}: {answer.get('error')}")
    assert not failures, "\n".join(failures)


def test_the_server_really_rejects_a_bad_expression(prometheus):
    answer = _query(prometheus, 'sum by (category) (rate(kanmon_decisions_total{verdict="block"}[5m])')
    assert answer["status"] == "error"


def test_prometheus_loads_and_evaluates_every_alert_rule(prometheus):
    deadline = time.monotonic() + 30
    while True:
        groups = _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"]}
        if set(rules) >= REQUIRED_ALERTS and all(r["health"] == "ok" for r in rules.values()):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"rules not all healthy: {[(n, r['health'], r.get('lastError')) for n, r in rules.items()]}")
        time.sleep(0.5)
    # With no gateway scraped at all, only the gateway-down rule (absent(up)) is active.
    active = {name for name, r in rules.items() if r.get("alerts")}
    assert active == {"KanmonGatewayDown"}
