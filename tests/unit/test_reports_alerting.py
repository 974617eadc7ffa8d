"""Alert delivery against a local HTTP server (webhook) and a local aiosmtpd SMTP server."""

from __future__ import annotations

import json
import socket
import threading
import time
from datetime import UTC, datetime
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
import pytest

from gateway.reports.alerting import (ALERTS_SCHEMA, KIND_LOG_FAILURE, KIND_QUARANTINE, KIND_REVOCATION,
                                      AlertDispatcher, AlertSettings, MailSettings, SmtpChannel, WebhookChannel,
                                      WebhookSettings, event_from_audit, log_failure_event, quarantine_event,
                                      retry_delays, revocation_event)

AT = datetime(2026, 1, 15, 4, 0, tzinfo=UTC)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Webhook:
    """Records POST bodies; answers 500 to the first ``fail_first`` requests; can hang."""

    def __init__(self, fail_first: int = 0, delay: float = 0.0):
        self.bodies: list[dict] = []
        self.attempts = 0
        self.fail_first = fail_first
        self.delay = delay
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                hook.attempts += 1
                if hook.delay:
                    time.sleep(hook.delay)
                if hook.attempts <= hook.fail_first:
                    self.send_response(500)
                    self.end_headers()
                    return
                assert self.headers["Content-Type"].startswith("application/json")
                hook.bodies.append(json.loads(body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook():
    hooks = []

    def make(**kw) -> Webhook:
        hooks.append(Webhook(**kw))
        return hooks[-1]
    yield make
    for hook in hooks:
        hook.close()


@pytest.fixture
def smtp_server():
    from aiosmtpd.controller import Controller

    class Collect:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            return "250 OK"

    handler = Collect()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield handler, controller.port
    controller.stop()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


# ---- pure parts ------------------------------------------------------------------------------

def test_events_from_audit_records():
    quarantined = event_from_audit({"event.action": "device-quarantined", "event.outcome": "success",
                                    "device.id": "d4", "user.name": "admin", "event.reason": "malware"}, at=AT)
    assert quarantined.kind == KIND_QUARANTINE and quarantined.details["device.id"] == "d4"
    assert "d4" in quarantined.summary.ja and "quarantined" in quarantined.summary.en
    revoked = event_from_audit({"event.action": "device-revoked", "device.id": "d6", "user.name": "admin"}, at=AT)
    assert revoked.kind == KIND_REVOCATION and revoked.severity == "critical"
    for quiet in ({"event.action": "device-resumed", "device.id": "d4"},
                  {"event.action": "policy-reloaded"},
                  {"event.action": "device-revoked", "device.id": "d6", "event.outcome": "failure"},
                  {"event.action": "device-quarantined"}):
        assert event_from_audit(quiet, at=AT) is None


def test_retry_delays_are_capped_exponential():
    assert retry_delays(6, 2.0, 20.0) == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    assert retry_delays(0, 2.0, 20.0) == []


def test_settings_schema_and_mapping():
    good = {"gateway_name": "gw1", "webhook": {"url": "https://hooks.example.jp/x"},
            "mail": {"host": "smtp.example.jp", "from": "kanmon@example.jp", "to": ["sec@example.jp"], "port": 587,
                     "starttls": True}, "retries": 3}
    jsonschema.validate(good, ALERTS_SCHEMA)
    settings = AlertSettings.from_mapping(good)
    assert settings.webhook == WebhookSettings("https://hooks.example.jp/x", 5.0)
    assert settings.mail.port == 587 and settings.mail.recipients == ("sec@example.jp",) and settings.mail.starttls
    assert settings.retries == 3
    for bad in ({"webhook": {"url": "ftp://x"}}, {"mail": {"host": "h", "from": "nobody", "to": ["a@b"]}},
                {"mail": {"host": "h", "from": "a@b", "to": []}}, {"retries": -1}, {"webhok": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, ALERTS_SCHEMA)
    with pytest.raises(ValueError):
        WebhookChannel(WebhookSettings("file:///etc/passwd"), "gw")


# ---- webhook ---------------------------------------------------------------------------------

def test_webhook_delivery_is_json_and_bilingual(webhook):
    hook = webhook()
    dispatcher = AlertDispatcher([WebhookChannel(WebhookSettings(hook.url), "gw1")], retry_base=0.01).start()
    assert dispatcher.send(quarantine_event("d4", operator="admin", reason="malware", at=AT))
    assert dispatcher.send(log_failure_event("proxy", OSError(28, "No space left on device"), at=AT))
    dispatcher.close()
    assert [b["kind"] for b in hook.bodies] == [KIND_QUARANTINE, KIND_LOG_FAILURE]   # in order
    first = hook.bodies[0]
    assert first["details"]["device.id"] == "d4" and first["severity"] == "critical" and first["gateway"] == "gw1"
    assert first["summary"]["ja"] == "端末 d4 を隔離しました" and first["summary"]["en"] == "device d4 quarantined"
    assert first["time"] == "2026-01-15T04:00:00.000000Z"
    assert "3.3" in first["guideline"]
    assert "No space left" in hook.bodies[1]["details"]["error.message"]
    assert dispatcher.delivered["webhook"] == 2 and not dispatcher.failed


def test_webhook_failures_are_retried(webhook):
    hook = webhook(fail_first=2)
    dispatcher = AlertDispatcher([WebhookChannel(WebhookSettings(hook.url), "gw1")], retries=3,
                                 retry_base=0.01).start()
    dispatcher.send(revocation_event("d6", operator="admin", reason="lost", at=AT))
    dispatcher.close()
    assert hook.attempts == 3 and len(hook.bodies) == 1
    assert dispatcher.retried["webhook"] == 2 and dispatcher.delivered["webhook"] == 1


def test_gives_up_after_the_retries_and_says_so(webhook):
    hook = webhook(fail_first=100)
    gave_up = []
    dispatcher = AlertDispatcher([WebhookChannel(WebhookSettings(hook.url), "gw1")], retries=2, retry_base=0.01,
                                 on_gave_up=lambda channel, event, exc: gave_up.append((channel, event.kind, str(exc))))
    dispatcher.start()
    dispatcher.send(revocation_event("d6", operator="admin", reason="lost", at=AT))
    dispatcher.close()
    assert hook.attempts == 3
    assert dispatcher.failed["webhook"] == 1 and dispatcher.delivered["webhook"] == 0
    assert gave_up == [("webhook", KIND_REVOCATION, "webhook answered 500")]


def test_send_never_blocks_even_when_the_webhook_hangs(webhook):
    hook = webhook(delay=2.0)
    dispatcher = AlertDispatcher([WebhookChannel(WebhookSettings(hook.url, timeout=5), "gw1")],
                                 retries=0, queue_size=5).start()
    started = time.monotonic()
    results = [dispatcher.send(quarantine_event(f"d{i}", operator=None, reason=None, at=AT)) for i in range(20)]
    assert time.monotonic() - started < 0.2
    # the worker holds one in flight, 5 queued; the rest are dropped and counted
    assert results.count(True) in (5, 6)
    assert dispatcher.dropped["webhook"] == 20 - results.count(True)
    dispatcher.close(timeout=0.1)


def test_unreachable_webhook_counts_a_failure_without_raising():
    dead = f"http://127.0.0.1:{free_port()}/hook"
    dispatcher = AlertDispatcher([WebhookChannel(WebhookSettings(dead, timeout=1), "gw1")], retries=1,
                                 retry_base=0.01).start()
    dispatcher.send(log_failure_event("dns", "EIO", at=AT))
    dispatcher.close()
    assert dispatcher.failed["webhook"] == 1


# ---- mail ------------------------------------------------------------------------------------

def test_mail_delivery_through_a_local_smtp_server(smtp_server):
    handler, port = smtp_server
    mail = MailSettings("127.0.0.1", "kanmon@example.jp", ("sec@example.jp", "ops@example.jp"), port=port)
    dispatcher = AlertDispatcher([SmtpChannel(mail, "gw1")], retry_base=0.01).start()
    dispatcher.send(quarantine_event("d4", operator="admin", reason="malware", at=AT))
    dispatcher.close()
    assert dispatcher.delivered["mail"] == 1
    (sender, recipients, raw), = handler.messages
    assert sender == "kanmon@example.jp" and recipients == ["sec@example.jp", "ops@example.jp"]
    message = message_from_bytes(raw, policy=policy.default)
    assert message["Subject"] == "[Kanmon gw1] CRITICAL: 端末 d4 を隔離しました / device d4 quarantined"
    body = message.get_content()
    assert "device.id: d4" in body and "event.reason: malware" in body and "3.3" in body
    assert "kanmon report incident" in body


def test_webhook_and_mail_fail_independently(smtp_server):
    handler, port = smtp_server
    dead = f"http://127.0.0.1:{free_port()}/hook"
    settings = AlertSettings.from_mapping({
        "gateway_name": "gw2", "webhook": {"url": dead, "timeout": 1},
        "mail": {"host": "127.0.0.1", "port": port, "from": "kanmon@example.jp", "to": ["sec@example.jp"]},
        "retries": 1, "retry_base_seconds": 0.01})
    dispatcher = AlertDispatcher.from_settings(settings).start()
    dispatcher.send(revocation_event("d6", operator="admin", reason="stolen", at=AT))
    dispatcher.close()
    assert dispatcher.failed["webhook"] == 1 and dispatcher.delivered["mail"] == 1
    assert len(handler.messages) == 1


def test_mail_relay_down_is_retried_then_delivered(smtp_server):
    handler, port = smtp_server

    class FlakyOnce(SmtpChannel):
        calls = 0

        def deliver(self, event):
            FlakyOnce.calls += 1
            if FlakyOnce.calls == 1:
                # first attempt against a port nobody listens on
                saved = self.settings
                self.settings = MailSettings("127.0.0.1", saved.sender, saved.recipients, port=free_port(), timeout=1)
                try:
                    return super().deliver(event)
                finally:
                    self.settings = saved
            return super().deliver(event)

    channel = FlakyOnce(MailSettings("127.0.0.1", "kanmon@example.jp", ("sec@example.jp",), port=port), "gw1")
    dispatcher = AlertDispatcher([channel], retries=2, retry_base=0.01).start()
    dispatcher.send(log_failure_event("audit", "disk full", at=AT))
    dispatcher.close()
    assert dispatcher.retried["mail"] == 1 and dispatcher.delivered["mail"] == 1
    assert len(handler.messages) == 1
