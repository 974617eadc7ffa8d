"""The alerts firing now, from the Prometheus the configuration names (issue #21, the
console's alerts page): its HTTP API ``GET /api/v1/alerts``.

Config (``alerts:`` section)::

    alerts:
      prometheus: {url: "http://127.0.0.1:9090", timeout: 5}

A Prometheus that does not answer, answers with an error, or answers something that is not
its API is reported as unavailable (``AlertsUnavailable``, bilingual) -- never as "no
alerts": an empty page must mean that nothing fires. ``parse_alerts`` is pure;
``fetch_alerts`` is the I/O edge (urllib, bounded size and time)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.i18n import Text

MAX_RESPONSE_BYTES = 8 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0
SEVERITY_ORDER = {"critical": 0, "page": 0, "error": 1, "warning": 2, "info": 3}

T_UNREACHABLE = Text("Prometheus（{url}）に接続できません: {detail}", "cannot reach Prometheus ({url}): {detail}")
T_HTTP = Text("Prometheus（{url}）がエラーを返しました: HTTP {status}", "Prometheus ({url}) answered with an error: HTTP {status}")
T_NOT_API = Text("Prometheus（{url}）の応答がアラート API の形式ではありません: {detail}",
                 "the answer of Prometheus ({url}) is not its alerts API: {detail}")
T_API_ERROR = Text("Prometheus（{url}）がエラーを返しました: {detail}", "Prometheus ({url}) reported an error: {detail}")
T_TOO_LARGE = Text("Prometheus（{url}）の応答が大きすぎます（{limit} バイト超）",
                   "the answer of Prometheus ({url}) is too large (over {limit} bytes)")


class AlertsUnavailable(Exception):
    def __init__(self, text: Text):
        super().__init__(text.en)
        self.text = text


@dataclass(frozen=True)
class PrometheusSettings:
    url: str
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_alerts_section(cls, alerts: Mapping[str, Any] | None) -> "PrometheusSettings | None":
        """From the config's ``alerts:`` section; None when no Prometheus is configured."""
        prom = (alerts or {}).get("prometheus")
        if not prom:
            return None
        return cls(str(prom["url"]).rstrip("/"), float(prom.get("timeout", DEFAULT_TIMEOUT)))


@dataclass(frozen=True)
class FiringAlert:
    name: str
    state: str                       # "firing" or "pending"
    severity: str
    since: datetime | None
    summary: Text
    labels: dict[str, str] = field(default_factory=dict)
    runbook: str | None = None
    value: str | None = None


def bilingual(annotation: str) -> Text:
    """The project's alert annotations read ``日本語 / English``: split them; anything else is
    shown as is in both languages."""
    ja, sep, en = annotation.partition(" / ")
    return Text(ja.strip(), en.strip()) if sep else Text(annotation.strip(), annotation.strip())


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:                                  # Prometheus gives nanoseconds: keep microseconds
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def parse_alerts(body: bytes, url: str = "") -> list[FiringAlert]:
    """The alerts of an ``/api/v1/alerts`` answer, firing before pending, most severe first.
    Raises AlertsUnavailable when the body is not that API's success answer."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise AlertsUnavailable(T_NOT_API.format(url=url, detail=type(exc).__name__)) from None
    if not isinstance(doc, dict) or "status" not in doc:
        raise AlertsUnavailable(T_NOT_API.format(url=url, detail="no status"))
    if doc["status"] != "success":
        raise AlertsUnavailable(T_API_ERROR.format(url=url, detail=str(doc.get("error") or doc["status"])[:200]))
    data = doc.get("data")
    raw = data.get("alerts") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise AlertsUnavailable(T_NOT_API.format(url=url, detail="no data.alerts"))
    alerts = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        labels = {str(k): str(v) for k, v in (item.get("labels") or {}).items()}
        notes = item.get("annotations") or {}
        summary = notes.get("summary") or notes.get("description") or labels.get("alertname", "")
        alerts.append(FiringAlert(
            name=labels.get("alertname", "?"), state=str(item.get("state", "")),
            severity=labels.get("severity", ""), since=_time(item.get("activeAt")),
            summary=bilingual(str(summary)), labels=labels, runbook=notes.get("runbook_url"),
            value=str(item["value"]) if item.get("value") is not None else None))
    alerts.sort(key=lambda a: (a.state != "firing", SEVERITY_ORDER.get(a.severity, 9), a.name))
    return alerts


def fetch_alerts(settings: PrometheusSettings, opener: Any = None) -> list[FiringAlert]:
    """GET ``<url>/api/v1/alerts`` within the timeout; AlertsUnavailable on any failure."""
    url = settings.url + "/api/v1/alerts"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    open_ = opener or urllib.request.urlopen
    try:
        with open_(request, timeout=settings.timeout) as response:
            body = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise AlertsUnavailable(T_HTTP.format(url=settings.url, status=exc.code)) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AlertsUnavailable(T_UNREACHABLE.format(url=settings.url, detail=reason)) from None
    if len(body) > MAX_RESPONSE_BYTES:
        raise AlertsUnavailable(T_TOO_LARGE.format(url=settings.url, limit=MAX_RESPONSE_BYTES))
    return parse_alerts(body, settings.url)
