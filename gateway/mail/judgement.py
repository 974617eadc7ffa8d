"""One message from bytes to what the adapter hands on: the verdict (engine.py), the rewrite
or notice (rewrite.py), the quarantine entry, and the headers the log line shows.

This is what the mail addon runs for each message, in a worker process of the judge pool
(judgepool.py) in the gateway, or in the caller's thread for tests and tools. Its only I/O is
what the caller passes in: the scanner, the DNS lookup and the quarantine store.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from email.parser import BytesHeaderParser

from gateway.i18n import Text
from gateway.mail.adapters import Judgement
from gateway.mail.engine import MailContext, MailVerdict, evaluate_message, too_complex_verdict
from gateway.mail.indicators import MailAction
from gateway.mail.limits import TOO_COMPLEX
from gateway.mail.message import POLICY, MalformedMessage, fix_8bit
from gateway.mail.outbound import GUARD_NAMES, explanation
from gateway.mail.policy import MailPolicy
from gateway.mail.rewrite import RewriteFailed, html_as_text, notice_message, render_message

_LOG_SOURCE_CHARS = 2000
# A notice that copies no header of the original: for a message the parsers must not see.
# (CRLF so the notice is written with CRLF line ends.)
_NO_ORIGINAL = b"\r\n"


@dataclass(frozen=True)
class Outcome:
    judgement: Judgement
    verdict: MailVerdict
    quarantine_id: str | None
    headers: dict[str, str]     # From / To / Subject / Message-ID for the log, cut to 500 chars
    html_as_text: bool = False  # html_to_text converted HTML parts (issue #20), logged


def is_too_complex(verdict: MailVerdict) -> bool:
    return any(i.name == TOO_COMPLEX for i in verdict.indicators)


def judge_message(raw: bytes, context: MailContext, policy: MailPolicy, quarantine, *,
                  scanner=None, dns_txt=None) -> Outcome:
    try:
        verdict = evaluate_message(raw, policy, context, scanner=scanner, dns_txt=dns_txt)
    except MalformedMessage as exc:
        verdict = MailVerdict(policy.malformed_message, 0, (), notes=(exc.text,))
    return finish(raw, context, policy, quarantine, verdict)


def hold_too_complex(raw: bytes, context: MailContext, policy: MailPolicy, quarantine, evidence: Text) -> Outcome:
    """The answer for a message whose judgement was stopped (CPU time, memory, deadline)."""
    return finish(raw, context, policy, quarantine, too_complex_verdict(evidence, policy))


def finish(raw: bytes, context: MailContext, policy: MailPolicy, quarantine, verdict: MailVerdict) -> Outcome:
    complex_ = is_too_complex(verdict)
    action = verdict.action
    converted = False
    data: bytes | None = None
    if context.direction == "outbound" and action == MailAction.NEUTRALIZE:
        # Outgoing mail is never altered behind the sender's back: a message whose
        # attachment would be removed is refused, and the sender is told why.
        verdict = dataclasses.replace(verdict, action=MailAction.REJECT)
        action = verdict.action
    if action in (MailAction.DELIVER, MailAction.TAG, MailAction.NEUTRALIZE):
        if context.direction == "outbound" and action == MailAction.TAG:
            data = raw   # outgoing: a warning for the recipient is not ours to add; logged
        elif action == MailAction.DELIVER:
            data = raw
        elif complex_:
            # too_complex set to tag/neutralize: the rewrite would parse what must not be
            # parsed; hold it instead.
            verdict = dataclasses.replace(verdict, action=MailAction.QUARANTINE)
            action = verdict.action
        else:
            try:
                data = render_message(raw, verdict, policy)
            except RewriteFailed:
                verdict = dataclasses.replace(verdict, action=MailAction.QUARANTINE)
                action = verdict.action
    if data is not None and action in (MailAction.DELIVER, MailAction.TAG) and policy.converts_html(context.direction):
        # html_to_text (issue #20): HTML delivered as text; neutralize has converted it already.
        try:
            before, data = data, html_as_text(data)
            converted = data is not before
        except RewriteFailed:
            verdict = dataclasses.replace(verdict, action=MailAction.QUARANTINE)
            action = verdict.action
            data = None
    qid = None
    if action == MailAction.QUARANTINE:
        qid = quarantine.put(raw, verdict, context)
    if action in (MailAction.QUARANTINE, MailAction.REJECT):
        if context.direction == "inbound":
            try:
                data = notice_message(_NO_ORIGINAL if complex_ else raw, verdict, policy, qid)
            except RewriteFailed:
                data = plain_notice(str(action), qid)
        else:
            data = None
    names = ", ".join(sorted({i.name for i in verdict.indicators})) or "malformed message"
    guard = {i.name for i in verdict.indicators} & set(GUARD_NAMES)
    if context.direction == "outbound" and guard and action in (MailAction.QUARANTINE, MailAction.REJECT):
        # The outbound guard: the sender is told why and what to do, in both languages.
        text = explanation(guard, policy.outbound_guard, action == MailAction.QUARANTINE, qid)
        reason = f"{text.ja}\n{text.en} ({names})"
    elif action == MailAction.QUARANTINE:
        reason = f"Kanmon: message held in quarantine {qid} ({names})"
    elif action == MailAction.REJECT:
        reason = f"Kanmon: message refused ({names})"
    else:
        reason = ""
    headers = {} if complex_ else log_headers(raw)
    return Outcome(Judgement(str(action), data, reason), verdict, qid, headers, converted)


def log_headers(raw: bytes) -> dict[str, str]:
    """The raw value is cut before it is decoded: the standard library's structured header
    parsers are quadratic on long hostile values (a To of 60 KB), the log keeps 500 chars."""
    out: dict[str, str] = {}
    try:
        parsed = BytesHeaderParser(policy=POLICY).parsebytes(raw)
        raw_values: dict[str, str] = {}
        for name, value in parsed.raw_items():
            raw_values.setdefault(name.lower(), value)
        for key in ("from", "to", "subject", "message-id"):
            if key in raw_values:
                header = POLICY.header_fetch_parse(key, raw_values[key][:_LOG_SOURCE_CHARS])
                out[key] = fix_8bit(str(header))[:500]
    except Exception:  # noqa: BLE001 — a log line must not fail on a hostile header
        pass
    return out


def plain_notice(action: str, qid: str | None) -> bytes:
    held = f" (ID: {qid})" if qid else ""
    return ("Subject: [Kanmon] message withheld\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\nMIME-Version: 1.0\r\n\r\n"
            f"【関門】このメールは危険と判定されたため配信していません{held}。\r\n"
            f"[Kanmon] This message was withheld as dangerous ({action}){held}.\r\n").encode()
