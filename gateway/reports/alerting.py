"""Alerts the gateway sends itself, for critical events — a device quarantined or revoked,
a log write failure — to a webhook (HTTP POST, JSON) and/or by mail (SMTP relay from the
config). IPA SME sample regulations 技術的対策 3.3: 異常時に通知する仕組み, アラートが速やかに
発報されること; Prometheus alert rules (observability/alerts.yml) cover the same ground for
sites that run Alertmanager.

Pure parts: the event constructors, ``webhook_payload``, ``mail_message``, ``retry_delays``
and ``AlertSettings.from_mapping``. I/O edge: ``WebhookChannel``, ``SmtpChannel`` and
``AlertDispatcher``, whose ``send(event)`` only enqueues (never blocks, never raises): one
worker thread per channel delivers in order and retries with capped exponential backoff, so
a dead webhook does not delay mail and neither delays a request.

Config (``alerts:`` section; ALERTS_SCHEMA is its JSON schema)::

    alerts:
      gateway_name: kanmon-tokyo-1
      webhook: {url: "https://chat.example.lg.jp/hooks/abc", timeout: 5}
      mail:
        host: smtp.example.lg.jp
        port: 25
        starttls: false
        username: kanmon            # optional
        password_file: /etc/kanmon/smtp-password   # optional, read at start
        from: kanmon@example.lg.jp
        to: [security@example.lg.jp]
      retries: 5                    # attempts after the first
      retry_base_seconds: 2
      retry_max_seconds: 300
      queue_size: 1000
"""

from __future__ import annotations

import json
import logging
import queue
import smtplib
import ssl
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from gateway.i18n import Text

log = logging.getLogger("kanmon.alerting")

SEVERITY_CRITICAL = "critical"
SEVERITY_WARNING = "warning"

KIND_QUARANTINE = "device-quarantined"
KIND_REVOCATION = "device-revoked"
KIND_LOG_FAILURE = "log-write-failure"
KIND_AUTO_QUARANTINE = "device-auto-quarantined"        # issue #18
KIND_AUTO_QUARANTINE_FAILED = "device-auto-quarantine-failed"
KIND_LOSS_REPORT = "device-reported-lost"                 # issue #21: an owner reported the device lost (console)
AUTO_QUARANTINE_ACTOR = "kanmon-auto-quarantine"       # = gateway/autoquarantine/triggers.py AUTO_ACTOR


# ---- events (pure) -------------------------------------------------------------------------

@dataclass(frozen=True)
class AlertEvent:
    kind: str
    severity: str
    summary: Text
    at: datetime
    details: Mapping[str, Any] = field(default_factory=dict)
    guideline: str = "IPA SME 技術的対策 3.3"


def quarantine_event(device_id: str, *, operator: str | None, reason: str | None, at: datetime) -> AlertEvent:
    return AlertEvent(KIND_QUARANTINE, SEVERITY_CRITICAL,
                      Text("端末 {d} を隔離しました", "device {d} quarantined").format(d=device_id), at,
                      {"device.id": device_id, "user.name": operator, "event.reason": reason})


def revocation_event(device_id: str, *, operator: str | None, reason: str | None, at: datetime) -> AlertEvent:
    return AlertEvent(KIND_REVOCATION, SEVERITY_CRITICAL,
                      Text("端末 {d} を失効させました", "device {d} revoked").format(d=device_id), at,
                      {"device.id": device_id, "user.name": operator, "event.reason": reason})


def log_failure_event(stream: str, error: BaseException | str, *, at: datetime) -> AlertEvent:
    return AlertEvent(KIND_LOG_FAILURE, SEVERITY_CRITICAL,
                      Text("ログ {s} に書き込めません", "cannot write log stream {s}").format(s=stream), at,
                      {"kanmon.log.stream": stream, "error.message": str(error)},
                      guideline="IPA SME 技術的対策 3.3, 3.8.3")


def auto_quarantine_event(device_id: str, *, user: str | None, trigger: str, summary: Text,
                          evidence: Mapping[str, Any], at: datetime, done: bool = True) -> AlertEvent:
    """A device quarantined by itself (issue #18): device, user, trigger and evidence. With
    ``done`` False the trigger fired but the registry could not be changed."""
    if done:
        text = Text("端末 {d} を自動隔離しました: {s}", "device {d} quarantined automatically: {s}")
    else:
        text = Text("端末 {d} を自動隔離できませんでした: {s}", "device {d} could NOT be quarantined automatically: {s}")
    return AlertEvent(KIND_AUTO_QUARANTINE if done else KIND_AUTO_QUARANTINE_FAILED, SEVERITY_CRITICAL,
                      Text(text.ja.format(d=device_id, s=summary.ja), text.en.format(d=device_id, s=summary.en)), at,
                      {"device.id": device_id, "user.name": user, "kanmon.trigger": trigger,
                       "kanmon.evidence": dict(evidence)},
                      guideline="NISC 4-5, IPA SME 技術的対策 2.1.4 / 3.3")


def event_from_audit(record: Mapping[str, Any], *, at: datetime) -> AlertEvent | None:
    """The alert for an audit-stream record (as written by the gateway's audit shipping),
    or None when the change is not critical."""
    action = record.get("event.action")
    device = record.get("device.id")
    if not device or record.get("event.outcome", "success") != "success":
        return None
    if record.get("user.name") == AUTO_QUARANTINE_ACTOR:
        return None   # the automatic quarantine sent its own alert, with trigger and evidence
    if action == KIND_QUARANTINE:
        return quarantine_event(str(device), operator=record.get("user.name"), reason=record.get("event.reason"), at=at)
    if action == KIND_REVOCATION:
        return revocation_event(str(device), operator=record.get("user.name"), reason=record.get("event.reason"), at=at)
    if action == KIND_LOSS_REPORT:   # the helpdesk calls the owner back and decides on revocation
        return AlertEvent(KIND_LOSS_REPORT, SEVERITY_CRITICAL,
                          Text("端末 {d} の紛失が届け出られ、一時停止しました", "device {d} reported lost and suspended")
                          .format(d=device), at,
                          {"device.id": device, "user.name": record.get("user.name"),
                           "event.reason": record.get("event.reason")}, guideline="NISC スマートフォン等利用ガイド 6.2(5)")
    return None


def webhook_payload(event: AlertEvent, gateway: str) -> bytes:
    """JSON body of the webhook POST. ``text`` is a ready-made bilingual line for chat
    tools (Slack/Teams/Mattermost-style incoming webhooks read ``text``)."""
    body = {
        "text": f"[Kanmon {gateway}] {event.summary.ja} / {event.summary.en}",
        "kind": event.kind,
        "severity": event.severity,
        "gateway": gateway,
        "time": event.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "summary": {"ja": event.summary.ja, "en": event.summary.en},
        "details": dict(event.details),
        "guideline": event.guideline,
    }
    return json.dumps(body, ensure_ascii=False, default=str).encode("utf-8")


def mail_message(event: AlertEvent, gateway: str, sender: str, recipients: tuple[str, ...]) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = f"[Kanmon {gateway}] {event.severity.upper()}: {event.summary.ja} / {event.summary.en}"
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Date"] = format_datetime(event.at.astimezone(UTC))
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    lines = [event.summary.ja, event.summary.en, "",
             f"ゲートウェイ / gateway: {gateway}", f"種別 / kind: {event.kind}",
             f"重要度 / severity: {event.severity}",
             f"日時 / time: {event.at.astimezone(UTC).isoformat()}", ""]
    lines += [f"{key}: {value}" for key, value in event.details.items() if value is not None]
    lines += ["", f"根拠 / guideline: {event.guideline}",
              "対応: kanmon report incident --device ID で速報レポートを作成してください。",
              "Action: produce a flash report with kanmon report incident --device ID."]
    message.set_content("\n".join(lines) + "\n")
    return message


def retry_delays(retries: int, base: float, cap: float) -> list[float]:
    """Seconds to wait before each retry: base, 2*base, 4*base, … capped at ``cap``."""
    return [min(cap, base * (2 ** n)) for n in range(max(0, retries))]


# ---- settings (pure) -----------------------------------------------------------------------

ALERTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "gateway_name": {"type": "string", "minLength": 1},
        "webhook": {"type": "object", "additionalProperties": False, "required": ["url"], "properties": {
            "url": {"type": "string", "pattern": "^https?://"},
            "timeout": {"type": "number", "exclusiveMinimum": 0}}},
        "mail": {"type": "object", "additionalProperties": False, "required": ["host", "from", "to"], "properties": {
            "host": {"type": "string", "minLength": 1},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "starttls": {"type": "boolean"},
            "username": {"type": "string"},
            "password_file": {"type": "string"},
            "timeout": {"type": "number", "exclusiveMinimum": 0},
            "from": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"},
            "to": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"}}}},
        "retries": {"type": "integer", "minimum": 0, "maximum": 100},
        "retry_base_seconds": {"type": "number", "exclusiveMinimum": 0},
        "retry_max_seconds": {"type": "number", "exclusiveMinimum": 0},
        "queue_size": {"type": "integer", "minimum": 1},
        # issue #21: where the console reads the alerts firing now (gateway/reports/firing.py)
        "prometheus": {"type": "object", "additionalProperties": False, "required": ["url"], "properties": {
            "url": {"type": "string", "pattern": "^https?://"},
            "timeout": {"type": "number", "exclusiveMinimum": 0}}},
    },
}


@dataclass(frozen=True)
class WebhookSettings:
    url: str
    timeout: float = 5.0


@dataclass(frozen=True)
class MailSettings:
    host: str
    sender: str
    recipients: tuple[str, ...]
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password_file: str | None = None
    timeout: float = 10.0


@dataclass(frozen=True)
class AlertSettings:
    gateway_name: str = "kanmon"
    webhook: WebhookSettings | None = None
    mail: MailSettings | None = None
    retries: int = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    queue_size: int = 1000

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "AlertSettings":
        """From the ``alerts:`` section, validated with ALERTS_SCHEMA first (the config
        loader reports schema errors as file:line; this assumes a valid mapping)."""
        webhook = data.get("webhook")
        mail = data.get("mail")
        return cls(
            gateway_name=data.get("gateway_name", "kanmon"),
            webhook=WebhookSettings(webhook["url"], float(webhook.get("timeout", 5.0))) if webhook else None,
            mail=MailSettings(mail["host"], mail["from"], tuple(mail["to"]), int(mail.get("port", 25)),
                              bool(mail.get("starttls", False)), mail.get("username"), mail.get("password_file"),
                              float(mail.get("timeout", 10.0))) if mail else None,
            retries=int(data.get("retries", 5)),
            retry_base_seconds=float(data.get("retry_base_seconds", 2.0)),
            retry_max_seconds=float(data.get("retry_max_seconds", 300.0)),
            queue_size=int(data.get("queue_size", 1000)),
        )


# ---- channels (I/O) ------------------------------------------------------------------------

class Channel(Protocol):
    name: str

    def deliver(self, event: AlertEvent) -> None:
        """Deliver or raise."""


class DeliveryError(Exception):
    pass


class WebhookChannel:
    name = "webhook"

    def __init__(self, settings: WebhookSettings, gateway: str):
        if urlsplit(settings.url).scheme not in ("http", "https"):
            raise ValueError(f"webhook url must be http(s): {settings.url!r}")
        self.settings = settings
        self.gateway = gateway

    def deliver(self, event: AlertEvent) -> None:
        request = urllib.request.Request(
            self.settings.url, data=webhook_payload(event, self.gateway), method="POST",
            headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": "kanmon-alerts"})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"webhook answered {exc.code}") from None
        except (OSError, ValueError) as exc:
            raise DeliveryError(f"webhook unreachable: {exc}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"webhook answered {status}")


class SmtpChannel:
    name = "mail"

    def __init__(self, settings: MailSettings, gateway: str, password: str | None = None):
        self.settings = settings
        self.gateway = gateway
        self._password = password

    @classmethod
    def from_settings(cls, settings: MailSettings, gateway: str) -> "SmtpChannel":
        password = None
        if settings.password_file:
            password = Path(settings.password_file).read_text(encoding="utf-8").strip()
        return cls(settings, gateway, password)

    def deliver(self, event: AlertEvent) -> None:
        s = self.settings
        message = mail_message(event, self.gateway, s.sender, s.recipients)
        try:
            with smtplib.SMTP(s.host, s.port, timeout=s.timeout) as smtp:
                if s.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if s.username and self._password is not None:
                    smtp.login(s.username, self._password)
                smtp.send_message(message, from_addr=s.sender, to_addrs=list(s.recipients))
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"mail relay {s.host}:{s.port}: {exc}") from None


# ---- dispatcher (I/O) ----------------------------------------------------------------------

_STOP = object()


class AlertDispatcher:
    """Queues events per channel; a worker thread per channel delivers them in order with
    retries. ``send`` never blocks the caller: when a channel's queue is full the event is
    dropped for that channel and counted in ``dropped``."""

    def __init__(self, channels: list[Channel], *, retries: int = 5, retry_base: float = 2.0,
                 retry_max: float = 300.0, queue_size: int = 1000,
                 on_gave_up: Callable[[str, AlertEvent, Exception], None] | None = None,
                 on_outcome: Callable[[str, str], None] | None = None):
        self.channels = list(channels)
        self.delays = retry_delays(retries, retry_base, retry_max)
        self._queues: dict[str, queue.Queue] = {c.name: queue.Queue(maxsize=queue_size) for c in self.channels}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._on_gave_up = on_gave_up
        self._on_outcome = on_outcome   # (channel, "delivered"|"retried"|"failed"|"dropped"): metrics
        self._lock = threading.Lock()
        self.delivered: Counter = Counter()   # by channel
        self.retried: Counter = Counter()
        self.failed: Counter = Counter()      # gave up after every retry
        self.dropped: Counter = Counter()     # queue full

    @classmethod
    def from_settings(cls, settings: AlertSettings, **kw: Any) -> "AlertDispatcher":
        channels: list[Channel] = []
        if settings.webhook:
            channels.append(WebhookChannel(settings.webhook, settings.gateway_name))
        if settings.mail:
            channels.append(SmtpChannel.from_settings(settings.mail, settings.gateway_name))
        return cls(channels, retries=settings.retries, retry_base=settings.retry_base_seconds,
                   retry_max=settings.retry_max_seconds, queue_size=settings.queue_size, **kw)

    def start(self) -> "AlertDispatcher":
        for channel in self.channels:
            thread = threading.Thread(target=self._work, args=(channel,), name=f"kanmon-alerts-{channel.name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def send(self, event: AlertEvent) -> bool:
        """Enqueue for every channel; True if every channel took it. Never blocks."""
        accepted = True
        for name, pending in self._queues.items():
            try:
                pending.put_nowait(event)
            except queue.Full:
                with self._lock:
                    self.dropped[name] += 1
                self._outcome(name, "dropped")
                log.error("alert queue for %s full: dropped %s", name, event.kind)
                accepted = False
        return accepted

    def _outcome(self, channel: str, outcome: str) -> None:
        if self._on_outcome is not None:
            try:
                self._on_outcome(channel, outcome)
            except Exception:
                log.exception("on_outcome failed")

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout`` seconds), then stop the workers; retries
        still waiting are abandoned."""
        for pending in self._queues.values():
            try:
                pending.put(_STOP, timeout=timeout)
            except queue.Full:
                pass
        for thread in self._threads:
            thread.join(timeout)
        self._stop.set()
        for thread in self._threads:
            thread.join(1.0)

    def _work(self, channel: Channel) -> None:
        pending = self._queues[channel.name]
        while True:
            event = pending.get()
            if event is _STOP:
                return
            self._deliver(channel, event)
            if self._stop.is_set():
                return

    def _deliver(self, channel: Channel, event: AlertEvent) -> None:
        for attempt in range(len(self.delays) + 1):
            try:
                channel.deliver(event)
            except Exception as exc:   # any failure of a channel is retried, never raised
                if attempt == len(self.delays):
                    with self._lock:
                        self.failed[channel.name] += 1
                    self._outcome(channel.name, "failed")
                    log.error("alert %s via %s failed after %d attempts: %s", event.kind, channel.name,
                              attempt + 1, exc)
                    if self._on_gave_up is not None:
                        try:
                            self._on_gave_up(channel.name, event, exc)
                        except Exception:
                            log.exception("on_gave_up failed")
                    return
                with self._lock:
                    self.retried[channel.name] += 1
                self._outcome(channel.name, "retried")
                if self._stop.wait(self.delays[attempt]):
                    return
            else:
                with self._lock:
                    self.delivered[channel.name] += 1
                self._outcome(channel.name, "delivered")
                return
