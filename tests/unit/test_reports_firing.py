"""The alerts firing now from Prometheus's HTTP API (gateway/reports/firing.py, issue #21):
a Prometheus that is down, errs or answers garbage is an error, never "no alerts"."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gateway.reports.firing import (AlertsUnavailable, PrometheusSettings, bilingual, fetch_alerts, parse_alerts)

ANSWER = {"status": "success", "data": {"alerts": [
    {"labels": {"alertname": "KanmonLogWriteFailure", "severity": "warning", "stream": "proxy"},
     "annotations": {"summary": "ログ proxy の書き込みに失敗しています / Log stream proxy has write failures",
                     "runbook_url": "observability/RUNBOOK.md#kanmonlogwritefailure"},
     "state": "firing", "activeAt": "2026-12-05T04:01:02.123456789Z", "value": "1e+00"},
    {"labels": {"alertname": "KanmonDeviceQuarantined", "severity": "critical"},
     "annotations": {"summary": "plain"}, "state": "pending", "activeAt": "2026-12-05T04:00:00Z", "value": "2"},
    {"labels": {"alertname": "KanmonAuthFailureBurst", "severity": "critical"},
     "annotations": {}, "state": "firing", "activeAt": "bad"},
]}}


class Server:
    def __init__(self, status: int, body: bytes):
        self.status, self.body, self.paths = status, body, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(status=200, body=json.dumps(ANSWER).encode()):
        servers.append(Server(status, body))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def test_firing_alerts_are_parsed_firing_first_most_severe_first(serve):
    server = serve()
    alerts = fetch_alerts(PrometheusSettings(server.url))
    assert server.paths == ["/api/v1/alerts"]
    assert [(a.name, a.state) for a in alerts] == [
        ("KanmonAuthFailureBurst", "firing"), ("KanmonLogWriteFailure", "firing"), ("KanmonDeviceQuarantined", "pending")]
    log = alerts[1]
    assert log.summary.ja.startswith("ログ proxy") and log.summary.en == "Log stream proxy has write failures"
    assert log.since is not None and log.since.microsecond == 123456 and log.labels["stream"] == "proxy"
    assert alerts[0].since is None and alerts[0].summary.en == "KanmonAuthFailureBurst"


def test_no_alerts_is_an_empty_list(serve):
    server = serve(body=b'{"status":"success","data":{"alerts":[]}}')
    assert fetch_alerts(PrometheusSettings(server.url)) == []


def test_prometheus_down_is_an_error_not_no_alerts():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: nothing listens there
    with pytest.raises(AlertsUnavailable) as exc:
        fetch_alerts(PrometheusSettings(f"http://127.0.0.1:{port}", timeout=2))
    assert "接続できません" in exc.value.text.ja and "cannot reach" in exc.value.text.en


@pytest.mark.parametrize("status,body,words", [
    (503, b"unavailable", "HTTP 503"),
    (200, b"<html>not the api</html>", "not its alerts API"),
    (200, b'{"status":"error","errorType":"internal","error":"query failed"}', "query failed"),
    (200, b'{"status":"success","data":{}}', "not its alerts API"),
    (200, b"[1, 2]", "not its alerts API"),
])
def test_error_answers_are_errors(serve, status, body, words):
    server = serve(status, body)
    with pytest.raises(AlertsUnavailable) as exc:
        fetch_alerts(PrometheusSettings(server.url))
    assert words in exc.value.text.en and exc.value.text.ja


def test_settings_from_the_alerts_section():
    assert PrometheusSettings.from_alerts_section(None) is None
    assert PrometheusSettings.from_alerts_section({"webhook": {"url": "http://x"}}) is None
    s = PrometheusSettings.from_alerts_section({"prometheus": {"url": "http://p:9090/", "timeout": 2}})
    assert s == PrometheusSettings("http://p:9090", 2.0)


CONFIG = """\
state_dir: /var/lib/kanmon
tunnel: {interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}
uplink: {interface: eth0}
"""


def test_config_accepts_and_checks_the_prometheus_url():
    from gateway.config import load_config_text
    from gateway.yamlsource import SourceErrors
    cfg = load_config_text(CONFIG + "alerts:\n  prometheus: {url: 'http://127.0.0.1:9090', timeout: 3}\n", "k.yaml")
    assert PrometheusSettings.from_alerts_section(cfg.alerts) == PrometheusSettings("http://127.0.0.1:9090", 3.0)
    with pytest.raises(SourceErrors) as exc:
        load_config_text(CONFIG + "alerts:\n  prometheus: {url: 'ftp://x'}\n", "k.yaml")
    assert "k.yaml:5" in str(exc.value.errors[0])


def test_bilingual_split():
    t = bilingual("日本語 / English")
    assert (t.ja, t.en) == ("日本語", "English")
    assert bilingual("only").en == "only"


def test_parse_is_bounded_against_hostile_nesting():
    with pytest.raises(AlertsUnavailable):
        parse_alerts(b"[" * 100000)
