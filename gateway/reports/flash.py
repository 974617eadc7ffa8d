"""The fields IPA SME sample regulations 組織的対策 9.5 インシデント報告 asks an incident
report to carry, and the timeline of the incident (pure, no I/O).

9.5 (quoted in the report): 「報告内容には、インシデントの概要、状況、時系列を含め…報告フォー
マットには、インシデント対応における各フェーズ（①発見報告、②初動、③調査・対応、④復旧、⑤最
終報告）に基づき、インシデントの分類、責任者・担当者、発覚日時、発生日時、発生事象、対応経過、
想定される原因、原因発生の背景、被害を受けたシステムの状況、再発防止策等を含める。」 The
classification (区分) and the accident level (事故レベル 0–3) are those of 9.4.

What the logs know is filled from them (発生日時: the device's first suspicious record;
発覚日時: the first quarantine or block; 発生事象; 対応経過: the timeline; the damaged system:
the device). What only a person knows (区分, レベル, 原因, 背景, 再発防止策, 報告者, 責任者) is
given on the command line, or left as a blank line to fill in on paper. 区分 may be suggested
from the evidence (a virus found in a download or a mail: ウイルス感染) — shown as a
suggestion with its evidence, never as the operator's decision."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.i18n import Text

from . import recordview as rv
from .model import IncidentFacts, Suggestion, TimelineEntry
from .labels import AUDIT_ACTIONS, FIREWALL_REASONS, INCIDENT_CATEGORIES, INCIDENT_LEVELS, INCIDENT_PHASES, \
    MAIL_INDICATORS, TUNNEL_EVENTS, CATEGORIES, label, words_or_code

GUIDELINE_9_5 = Text(
    "「報告内容には、インシデントの概要、状況、時系列を含め、インシデント対応完了時に最終報告を行う。」"
    "「報告フォーマットには、インシデント対応における各フェーズ（①発見報告、②初動、③調査・対応、④復旧、⑤最終報告）に基づき、"
    "インシデントの分類、責任者・担当者、発覚日時、発生日時、発生事象、対応経過、想定される原因、原因発生の背景、"
    "被害を受けたシステムの状況、再発防止策等を含める。」（IPA 中小企業の情報セキュリティ対策ガイドライン 付録5 組織的対策 9.5）",
    "IPA SME guidelines appendix 5, organizational measures 9.5: the report contains the incident's overview, "
    "situation and timeline, with a final report when the response is complete; following the phases (1 discovery "
    "report, 2 initial response, 3 investigation and response, 4 recovery, 5 final report) it carries the "
    "classification, the person responsible and in charge, when it was found, when it happened, what happened, the "
    "course of the response, the presumed cause, the background of the cause, the state of the damaged systems and "
    "the measures against recurrence.")

MAX_FIELD = 2000     # characters of one free-text field (a report is printed on paper)

BAD_CATEGORY = Text("区分は {choices} のいずれかです: {value!r}", "the category is one of {choices}: {value!r}")
BAD_LEVEL = Text("事故レベルは 0〜3 です: {value!r}", "the accident level is 0 to 3: {value!r}")
BAD_PHASE = Text("フェーズは {choices} のいずれかです: {value!r}", "the phase is one of {choices}: {value!r}")
TOO_LONG = Text("{field} が長すぎます（{n} 文字、最大 {max} 文字）", "{field} is too long ({n} characters, at most {max})")


class FactsError(ValueError):
    def __init__(self, text: Text):
        super().__init__(text.en)
        self.text = text


def check_facts(facts: IncidentFacts) -> IncidentFacts:
    """The facts unchanged, or FactsError (bilingual) for a code outside the tables or a
    text too long for the form. Blank texts become None (a blank line on paper)."""
    if facts.category is not None and facts.category not in INCIDENT_CATEGORIES:
        raise FactsError(BAD_CATEGORY.format(choices=", ".join(INCIDENT_CATEGORIES), value=facts.category))
    if facts.level is not None and facts.level not in INCIDENT_LEVELS:
        raise FactsError(BAD_LEVEL.format(value=facts.level))
    if facts.phase is not None and facts.phase not in INCIDENT_PHASES:
        raise FactsError(BAD_PHASE.format(choices=", ".join(INCIDENT_PHASES), value=facts.phase))
    cleaned = {}
    for name in ("cause", "background", "prevention", "reporter", "responsible"):
        value = getattr(facts, name)
        if value is not None:
            value = value.strip() or None
        if value is not None and len(value) > MAX_FIELD:
            raise FactsError(TOO_LONG.format(field=name, n=len(value), max=MAX_FIELD))
        cleaned[name] = value
    return IncidentFacts(facts.category, facts.level, facts.phase, detected_at=facts.detected_at, **cleaned)


VIRUS_WORDS = ("virus", "malware", "infected", "eicar")


def _indicator_names(record: dict[str, Any]) -> tuple[str, ...]:
    return rv.mail_indicators(record)


def virus_evidence(stream: str, record: dict[str, Any]) -> str | None:
    """A short description when the record reports malware (a mail with ``virus-detected``,
    a blocked download or a quarantine whose rule, category or reason names a virus)."""
    if stream == "mail" and "virus-detected" in _indicator_names(record):
        return f"mail: {rv.text(record, 'email.from.address') or '-'} ({MAIL_INDICATORS['virus-detected'].en})"
    probe = " ".join(str(record.get(k) or "") for k in ("rule.id", "rule.category", "event.reason", "kanmon.scan.signature"))
    if (stream in ("proxy", "conn", "audit") and any(w in probe.lower() for w in VIRUS_WORDS)
            and (rv.is_block(record) or stream == "audit")):
        where = rv.text(record, "url.full") or rv.destination(record) or rv.text(record, "event.action") or "-"
        return f"{stream}: {where} ({rv.text(record, 'rule.id') or rv.text(record, 'event.reason') or '-'})"
    return None


def suggest_category(evidence: Iterable[str]) -> Suggestion | None:
    found = tuple(evidence)
    return Suggestion("virus", found[:5]) if found else None


# ---- timeline ----------------------------------------------------------------------------------

def timeline_entry(stream: str, record: dict[str, Any]) -> TimelineEntry | None:
    """The record as a line of the incident's timeline, or None when it is routine (an
    allowed request, a DNS answer): the timeline keeps what a responder would retell —
    blocks, firewall drops, tunnel sessions and roaming, mail held, device status changes."""
    moment = rv.record_time(record)
    if moment is None:
        return None
    if stream == "audit":
        action = rv.text(record, "event.action") or ""
        if action not in AUDIT_ACTIONS:
            return None
        operator = rv.text(record, "user.name") or "-"
        return TimelineEntry(moment, "action", label(AUDIT_ACTIONS, action),
                             f"{operator}: {rv.text(record, 'event.reason') or '-'}")
    if stream == "auth" and record.get("event.dataset") == "kanmon.tunnel":
        event = rv.text(record, "kanmon.tunnel.event") or rv.text(record, "event.action")
        outer = rv.text(record, "client.ip") or rv.text(record, "source.ip") or "-"
        previous = rv.text(record, "kanmon.tunnel.previous_ip")
        return TimelineEntry(moment, "tunnel", label(TUNNEL_EVENTS, event),
                             f"{previous} → {outer}" if previous else outer)
    if stream == "conn" and record.get("event.dataset") == "kanmon.firewall":
        reason = rv.text(record, "kanmon.firewall.reason")
        packets = record.get("kanmon.firewall.packets") or 1
        return TimelineEntry(moment, "firewall", label(FIREWALL_REASONS, reason),
                             f"{rv.destination(record) or '-'} /{rv.text(record, 'network.transport') or '?'} ×{packets}")
    if stream == "mail" and (rv.is_block(record) or _indicator_names(record)):
        names = [label(MAIL_INDICATORS, n) for n in _indicator_names(record)]
        what = Text("メール: " + ("、".join(n.ja for n in names) or "遮断"),
                    "mail: " + (", ".join(n.en for n in names) or "blocked"))
        return TimelineEntry(moment, "mail", what, rv.text(record, "email.from.address") or "-")
    if stream in ("proxy", "conn", "dns") and rv.is_block(record):
        category = rv.text(record, "rule.category")
        words = words_or_code(CATEGORIES, category) if category else None
        what = (Text("遮断: {r}（{c}）", "blocked: {r} ({c})").format(r=rv.text(record, "rule.id") or "-", c=words)
                if words else Text("遮断: {r}", "blocked: {r}").format(r=rv.text(record, "rule.id") or "-"))
        return TimelineEntry(moment, "block", what,
                             rv.text(record, "url.full") or rv.destination(record) or "-")
    return None


def cap_timeline(entries: list[TimelineEntry], limit: int) -> tuple[tuple[TimelineEntry, ...], int]:
    """Sorted by time; when there are more than ``limit``, the first and the newest halves
    are kept (how it started and where it is now) and the number left out is returned.
    Device status changes are always kept."""
    entries = sorted(entries, key=lambda e: (e.time, e.kind))
    if len(entries) <= limit:
        return tuple(entries), 0
    actions = [e for e in entries if e.kind == "action"]
    rest = [e for e in entries if e.kind != "action"]
    room = max(0, limit - len(actions))
    head, tail = rest[: room - room // 2], rest[len(rest) - room // 2:] if room // 2 else []
    kept = sorted(head + tail + actions, key=lambda e: (e.time, e.kind))
    return tuple(kept), len(entries) - len(kept)
