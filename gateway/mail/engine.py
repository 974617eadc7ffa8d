"""The verdict engine: one message (bytes) + context in, a verdict with every indicator out.

Pure: no I/O of its own. The two things that need the outside world are passed in — the
virus scanner (any ``Scanner``) and the DNS TXT lookup for DKIM keys — so tests and the
benchmark can supply fakes. How the verdict follows from the indicators:

* each indicator that fired gets its policy weight; the score is the sum of the weights of
  the distinct indicator names that fired (ten executables weigh as much as one, but all ten
  are listed with their evidence);
* the score picks the harshest action whose threshold it reaches (thresholds.tag ...
  thresholds.reject); below thresholds.tag the message is delivered untouched;
* an indicator may carry a floor (``at_least``), so e.g. a virus is rejected whatever the
  score; encrypted_archive and scanner_unavailable set the floors of archive-encrypted and
  virus-scan-unavailable.
* outgoing mail (SMTP submission) is judged on ``outbound_indicators`` only, plus the
  outbound guard (outbound.py: many external recipients in To/Cc, a confidentiality label
  going outside), whose action is the guard's own floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.i18n import Text
from gateway.mail.archives import ArchiveLimits, inspect_archive
from gateway.mail.authentication import DnsTxtLookup, auth_findings
from gateway.mail.content import content_findings
from gateway.mail.filenames import check_filename
from gateway.mail.html_links import anchors, hosts_in_text, mismatched, text_host, url_host
from gateway.mail.indicators import Finding, Indicator, MailAction, Name, harshest, visible
from gateway.mail.limits import TOO_COMPLEX, MessageTooComplex, check_message
from gateway.mail.lookalike import find_lookalike
from gateway.mail.message import ParsedMail, parse_message, readable_text
from gateway.mail.outbound import guard_findings
from gateway.mail.policy import MailPolicy
from gateway.mail.scanner import Scanner, ScannerUnavailable
from gateway.mail.sniff import executable_kind, is_lnk
from gateway.mail.sender import (freemail_findings, header_addresses, impersonation_findings,
                                 mismatch_findings)
from gateway.verdict import Action, Stage, Verdict


@dataclass(frozen=True)
class MailContext:
    """Where the message is going. ``direction`` is "inbound" (a device receives it: IMAP
    FETCH, POP3 RETR) or "outbound" (a device submits it over SMTP)."""

    direction: str = "inbound"
    device: str | None = None
    mail_from: str | None = None
    rcpt_to: tuple[str, ...] = ()


@dataclass(frozen=True)
class MailVerdict:
    action: MailAction
    score: int
    indicators: tuple[Indicator, ...]
    scanned: bool = False
    notes: tuple[Text, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {"verdict": str(self.action), "indicators": [i.as_dict() for i in self.indicators]}

    def gateway_verdict(self) -> Verdict:
        """The decision in the gateway-wide model, for logs and metrics."""
        action = {MailAction.DELIVER: Action.ALLOW, MailAction.TAG: Action.MONITOR,
                  MailAction.NEUTRALIZE: Action.MONITOR}.get(self.action, Action.BLOCK)
        top = max(self.indicators, key=lambda i: i.weight, default=None)
        explain = "; ".join(f"{i.name}: {i.evidence.en}" for i in self.indicators) or "no indicator fired"
        return Verdict(action, f"mail:{top.name}" if top else None, f"mail {self.action}: {explain}",
                       Stage.TCP, category="mail")


def evaluate_message(raw: bytes, policy: MailPolicy, context: MailContext = MailContext(), *,
                     scanner: Scanner | None = None, dns_txt: DnsTxtLookup | None = None) -> MailVerdict:
    """Judge one message. Raises MalformedMessage for bytes that are not a usable message.

    ``scanner=None`` skips the virus scan (``MailVerdict.scanned`` is False and a note says
    so); the gateway always passes one. ``dns_txt=None`` skips local DKIM verification.
    """
    try:
        check_message(raw, policy.limits)
        mail = parse_message(raw)
        findings = collect_findings(raw, mail, policy, context, dns_txt)
        guard = guard_findings(mail, context.rcpt_to, policy.organization.domains, policy.outbound_guard,
                               readable_text(mail)) if context.direction == "outbound" else []
    except MessageTooComplex as exc:
        return too_complex_verdict(exc.text, policy)
    except (MemoryError, RecursionError) as exc:
        return too_complex_verdict(Text(f"メッセージが複雑すぎて検査できません ({type(exc).__name__})",
                                        f"the message is too complex to inspect ({type(exc).__name__})"), policy)
    notes: list[Text] = []
    scanned = False
    if scanner is not None:
        try:
            result = scanner.scan(raw)
            scanned = True
            if result.infected:
                findings.append(Finding(Name.VIRUS_DETECTED, Text(
                    f"ウイルス検出: {visible(result.signature or '?')}", f"virus found: {visible(result.signature or '?')}")))
        except ScannerUnavailable as exc:
            findings.append(Finding(Name.VIRUS_SCAN_UNAVAILABLE, Text(
                f"ウイルス検査ができません: {exc}", f"virus scanner unavailable: {exc}")))
    else:
        notes.append(Text("ウイルス検査は行っていません", "no virus scan was made"))
    if context.direction == "outbound":
        findings = [f for f in findings if f.name in policy.outbound_indicators] + guard
    return decide(findings, policy, scanned, tuple(notes))


def too_complex_verdict(evidence: Text, policy: MailPolicy) -> MailVerdict:
    """The verdict for a message over a cap (limits.py) or over the judge's CPU / memory
    limit: the policy's ``too_complex`` action; nothing else was looked at."""
    return MailVerdict(policy.too_complex, 0, (Indicator(TOO_COMPLEX, 0, evidence),), False,
                       (Text("メッセージは解析していません", "the message was not analysed"),))


def decide(findings: list[Finding], policy: MailPolicy, scanned: bool = False, notes: tuple[Text, ...] = ()) -> MailVerdict:
    unique: list[Finding] = []
    seen: set[tuple[str, str, int | None]] = set()
    for f in findings:
        key = (f.name, f.evidence.en, f.part)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    indicators = tuple(Indicator(str(f.name), policy.weights.get(str(f.name), 0), f.evidence, f.part) for f in unique)
    weights_by_name: dict[str, int] = {}
    for ind in indicators:
        weights_by_name[ind.name] = max(weights_by_name.get(ind.name, 0), ind.weight)
    score = sum(weights_by_name.values())
    by_score = MailAction.DELIVER
    for action in (MailAction.TAG, MailAction.NEUTRALIZE, MailAction.QUARANTINE, MailAction.REJECT):
        if score >= policy.thresholds[action]:
            by_score = action
    floors = [policy.floors[n] for n in weights_by_name if n in policy.floors]
    return MailVerdict(harshest(by_score, *floors), score, indicators, scanned, notes)


def collect_findings(raw: bytes, mail: ParsedMail, policy: MailPolicy, context: MailContext,
                     dns_txt: DnsTxtLookup | None) -> list[Finding]:
    findings: list[Finding] = []
    message = mail.message
    senders = header_addresses(message, "From")
    reply_to = header_addresses(message, "Reply-To")
    # The HTML caps first (size, nesting, link text): before anything converts the HTML.
    links = _link_findings(mail, policy, [a.domain for a in senders + reply_to])
    body = readable_text(mail)
    if senders:
        sender = senders[0]
        findings += freemail_findings(sender, policy)
        findings += mismatch_findings(sender, reply_to, body)
        findings += impersonation_findings(sender, policy)
    findings += links
    findings += _attachment_findings(mail, policy)
    findings += auth_findings(raw, message, policy, dns_txt)
    findings += content_findings(mail, body, senders[0].domain if senders else None, policy)   # issue 20
    return findings


def _link_findings(mail: ParsedMail, policy: MailPolicy, sender_domains: list[str]) -> list[Finding]:
    found: list[Finding] = []
    hosts: dict[str, str] = {d: "sender" for d in sender_domains}
    for html in mail.html:
        for anchor in anchors(html, policy.limits):
            pair = mismatched(anchor)
            if pair:
                found.append(Finding(Name.LINK_TEXT_MISMATCH, Text(
                    f"リンクの表示は {visible(pair[0])} だが実際の行き先は {visible(pair[1])}",
                    f"link text shows {visible(pair[0])} but the link goes to {visible(pair[1])}")))
            for host in (url_host(anchor.href), text_host(anchor.text)):
                if host:
                    hosts.setdefault(host, "link")
    for text in mail.plain + mail.html:
        for host in hosts_in_text(text):
            hosts.setdefault(host, "link")
    for host, where in hosts.items():
        hit = find_lookalike(host, policy.protected_domains, policy.max_edit_distance)
        if hit:
            how_ja = {"confusable": "紛らわしい文字", "punycode": "国際化ドメイン (punycode)",
                      "edit-distance": f"綴りの違い {hit.distance} 文字", "contains": "名称を含む"}[hit.how]
            how_en = {"confusable": "confusable characters", "punycode": "internationalized (punycode) name",
                      "edit-distance": f"{hit.distance} character(s) apart", "contains": "contains the protected name"}[hit.how]
            where_ja = "差出人ドメイン" if where == "sender" else "URL"
            where_en = "sender domain" if where == "sender" else "URL host"
            found.append(Finding(Name.LOOKALIKE_DOMAIN, Text(
                f"{where_ja} {visible(host)} (表示: {visible(hit.shown_as)}) が {hit.protected} に似ている: {how_ja}",
                f"{where_en} {visible(host)} (shown as {visible(hit.shown_as)}) looks like {hit.protected}: {how_en}")))
    return found


def _attachment_findings(mail: ParsedMail, policy: MailPolicy) -> list[Finding]:
    limits = ArchiveLimits(policy.archive_max_depth, policy.archive_max_members, policy.archive_max_total_bytes,
                           policy.executable_extensions, policy.shortcut_extensions, policy.decoy_extensions,
                           policy.padding_min_run)
    found: list[Finding] = []
    for part in mail.parts:
        label = visible(part.filenames[0]) if part.filenames else f"({part.content_type})"
        for name in part.filenames:
            for nf in check_filename(name, policy.executable_extensions, policy.shortcut_extensions,
                                     policy.decoy_extensions, policy.padding_min_run):
                found.append(Finding(nf.name, nf.evidence, part.index))
        kind = executable_kind(part.data)
        if kind:
            found.append(Finding(Name.EXECUTABLE_ATTACHMENT, Text(
                f"添付「{label}」の中身が実行形式: {kind}", f"attachment '{label}' content is {kind}"), part.index))
        if is_lnk(part.data):
            found.append(Finding(Name.SHORTCUT_ATTACHMENT, Text(
                f"添付「{label}」の中身が Windows ショートカット (LNK ヘッダー)",
                f"attachment '{label}' content is a Windows shortcut (LNK header)"), part.index))
        report = inspect_archive(part.data, part.filenames[0] if part.filenames else label, limits)
        if report:
            for text in report.threats:
                found.append(Finding(Name.ARCHIVE_THREAT, text, part.index))
            for text in report.uninspectable:
                found.append(Finding(Name.ARCHIVE_ENCRYPTED, text, part.index))
    return found
