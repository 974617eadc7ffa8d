"""When a device quarantines itself (NISC booklet 4-5: cut an infected device off at once).
Pure: the settings (``auto_quarantine:`` in the gateway config) and the trigger engine, which
is told what happened (a virus in a download or in received mail, a block of a category)
with the time, and answers with an order to quarantine, or None.

    auto_quarantine:
      download_virus: true            # clamd found a virus in a download (scan:)
      mail_virus: true                # ... or in received mail (mail:, its policy's clamd)
      categories: [malware, phishing, c2]       # one block of a rule with this category
      repeated_blocks:                # N blocks of a category within M minutes
        - {category: sideload, count: 5, minutes: 10}

Categories are the ``category:`` of policy rules (e.g. a rule matching a feed's malware list,
gateway/policy/LANGUAGE.md) as carried by the block verdict. Only a device that is active is
ordered into quarantine; one already quarantined, suspended or revoked is left as it is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from gateway.i18n import Text

AUTO_ACTOR = "kanmon-auto-quarantine"   # the audit actor of automatic quarantines
AUTO_REASON_PREFIX = "[auto] "          # status_reason of an automatic quarantine starts with this


class Trigger(StrEnum):
    DOWNLOAD_VIRUS = "download-virus"
    MAIL_VIRUS = "mail-virus"
    CATEGORY = "category"
    REPEATED_BLOCKS = "repeated-blocks"


_CATEGORY = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_./-]{0,63}$"}
AUTO_QUARANTINE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "download_virus": {"type": "boolean"},
        "mail_virus": {"type": "boolean"},
        "categories": {"type": "array", "items": _CATEGORY},
        "repeated_blocks": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["category", "count", "minutes"],
            "properties": {"category": _CATEGORY,
                           "count": {"type": "integer", "minimum": 2, "maximum": 10000},
                           "minutes": {"type": "number", "exclusiveMinimum": 0, "maximum": 1440}}}},
    },
}


@dataclass(frozen=True)
class RepeatedBlocks:
    category: str
    count: int
    minutes: float


@dataclass(frozen=True)
class AutoQuarantineSettings:
    download_virus: bool = True
    mail_virus: bool = True
    categories: frozenset[str] = frozenset({"malware", "phishing", "c2"})
    repeated_blocks: tuple[RepeatedBlocks, ...] = ()


def auto_quarantine_settings(section: Mapping[str, Any] | None) -> AutoQuarantineSettings | None:
    """From a schema-checked ``auto_quarantine:`` mapping; None when the section is absent."""
    if section is None:
        return None
    default = AutoQuarantineSettings()
    return AutoQuarantineSettings(
        download_virus=bool(section.get("download_virus", default.download_virus)),
        mail_virus=bool(section.get("mail_virus", default.mail_virus)),
        categories=frozenset(c.lower() for c in section.get("categories", default.categories)),
        repeated_blocks=tuple(RepeatedBlocks(r["category"].lower(), int(r["count"]), float(r["minutes"]))
                              for r in section.get("repeated_blocks", ())),
    )


@dataclass(frozen=True)
class QuarantineOrder:
    device_id: str
    user: str | None
    trigger: Trigger
    evidence: Mapping[str, Any]
    at: datetime

    @property
    def summary(self) -> Text:
        e = self.evidence
        if self.trigger in (Trigger.DOWNLOAD_VIRUS, Trigger.MAIL_VIRUS):
            where_ja, where_en = ("ダウンロード", "a download") if self.trigger is Trigger.DOWNLOAD_VIRUS else ("受信メール", "received mail")
            return Text(f"{where_ja}でウイルス {e.get('signature')} を検出", f"virus {e.get('signature')} in {where_en}")
        if self.trigger is Trigger.CATEGORY:
            return Text(f"カテゴリ {e.get('category')} の宛先へのアクセス ({e.get('destination')})",
                        f"access to a {e.get('category')} destination ({e.get('destination')})")
        return Text(f"カテゴリ {e.get('category')} のブロックが {e.get('minutes')} 分間に {e.get('count')} 回",
                    f"{e.get('count')} blocks of category {e.get('category')} within {e.get('minutes')} minutes")

    @property
    def reason(self) -> str:
        """The registry's status_reason (one line, both languages)."""
        s = self.summary
        return f"{AUTO_REASON_PREFIX}{self.trigger}: {s.ja} / {s.en}"


@dataclass
class TriggerEngine:
    """Decides; never does. Memory: one deque of at most ``count`` timestamps per device and
    configured repeated-blocks category (bounded by devices x configured rules)."""

    settings: AutoQuarantineSettings
    _windows: dict[tuple[str, str], deque] = field(default_factory=dict)

    def virus(self, source: Trigger, device_id: str, user: str | None, evidence: Mapping[str, Any],
              now: datetime) -> QuarantineOrder | None:
        enabled = {Trigger.DOWNLOAD_VIRUS: self.settings.download_virus, Trigger.MAIL_VIRUS: self.settings.mail_virus}
        if not enabled.get(source, False):
            return None
        return QuarantineOrder(device_id, user, source, dict(evidence), now)

    def blocked(self, device_id: str, user: str | None, category: str | None, evidence: Mapping[str, Any],
                now: datetime) -> QuarantineOrder | None:
        """A block verdict of a rule with ``category`` for this device."""
        if not category:
            return None
        category = category.lower()
        if category in self.settings.categories:
            return QuarantineOrder(device_id, user, Trigger.CATEGORY, {"category": category, **evidence}, now)
        for rule in self.settings.repeated_blocks:
            if rule.category != category:
                continue
            window = self._windows.setdefault((device_id, category), deque(maxlen=rule.count))
            window.append(now)
            cutoff = now - timedelta(minutes=rule.minutes)
            while window and window[0] < cutoff:
                window.popleft()
            if len(window) >= rule.count:
                first = window[0]
                window.clear()
                return QuarantineOrder(device_id, user, Trigger.REPEATED_BLOCKS, {
                    "category": category, "count": rule.count, "minutes": rule.minutes,
                    "first_block": first.isoformat(), **evidence}, now)
        return None

    def forget(self, device_id: str) -> None:
        """The device was quarantined or released: its counts start again."""
        for key in [k for k in self._windows if k[0] == device_id]:
            del self._windows[key]
