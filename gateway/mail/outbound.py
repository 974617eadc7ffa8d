"""The outbound guard (issue #20): mis-sent mail stopped at SMTP submission. Pure: the parsed
message and the envelope in, findings out.

NISC's booklet (1-2, 2-4) names mis-sent mail (誤送付) the most common cause of leaks: a
circular to many outside addresses written in To/Cc instead of Bcc discloses every address to
every recipient, and IPA's SME regulation sample 7.3 asks for Bcc (同報メール) and for 社外秘 /
極秘 information to travel encrypted or through an approved transfer service, not in a mail.
Three rules, each its own stable name:

* ``outbound-external-recipients``: more than ``max_external_recipients`` distinct external
  addresses in the To and Cc headers. Bcc recipients are only in the envelope (RCPT TO): they
  are not counted — moving the addresses to Bcc is the remedy the explanation suggests.
* ``outbound-external-domains``: the To/Cc addresses span more than ``max_external_domains``
  external domains (a circular to several organizations at once).
* ``outbound-confidential-label``: a confidentiality label (機密性2, 機密性3, 社外秘, 極秘 by
  default; configurable) in the subject, the body text or an attachment name, while at least
  one envelope recipient (Bcc included: the mail goes there all the same) is external.

"External" is every domain that is not one of the organization's (``organization.domains``
of the mail policy, plus ``outbound_guard.internal_domains``), a sub-domain of one counting as
internal. Domains go through the one host normalization (gateway/hostname.py): IDN, full-width
letters and case meet in one form. The rules' action is the guard's ``action`` (reject, or
quarantine to hold the message), whatever the score; the explanation the sender gets names the
rule, the limit, Bcc and the approved transfer service, in Japanese and English.

Why the header parser is not the email package's structured one: its address-list parser is
quadratic on hostile runs of dots or quotes (60 KB of "." in a To: 55 s here), and To/Cc are
not under the 4 KB cap of the sender headers (limits.py) — a circular may legitimately list
hundreds of addresses. ``email.utils.getaddresses`` on the raw (unfolded) value is linear on
the same input (0.02 s); its one failure, a RecursionError on deeply nested comments, fails
closed (the recipients cannot be counted: the rule fires).
"""

from __future__ import annotations

import email.utils
import unicodedata
from dataclasses import dataclass

from gateway.hostname import normalize_host
from gateway.i18n import Text
from gateway.mail.indicators import Finding, MailAction, visible
from gateway.mail.message import ParsedMail, fix_8bit

EXTERNAL_RECIPIENTS = "outbound-external-recipients"
EXTERNAL_DOMAINS = "outbound-external-domains"
CONFIDENTIAL_LABEL = "outbound-confidential-label"
GUARD_NAMES: tuple[str, ...] = (EXTERNAL_RECIPIENTS, EXTERNAL_DOMAINS, CONFIDENTIAL_LABEL)

DEFAULT_LABELS = ("機密性2", "機密性3", "社外秘", "極秘")
_RECIPIENT_HEADERS = ("to", "cc")
_SHOWN = 5   # addresses / domains named in the evidence


@dataclass(frozen=True)
class OutboundGuard:
    enabled: bool = True
    max_external_recipients: int = 10
    max_external_domains: int = 3
    labels: tuple[str, ...] = DEFAULT_LABELS
    action: MailAction = MailAction.REJECT           # reject or quarantine (hold)
    internal_domains: tuple[str, ...] = ()          # besides organization.domains
    transfer_service: str = ""                      # named in the explanation when set


@dataclass(frozen=True)
class Recipients:
    addresses: tuple[str, ...]   # distinct external addresses, local part as written, domain normalized
    domains: tuple[str, ...]     # distinct external domains
    unreadable: bool = False     # the header could not be parsed: counted as over the limit


def normalized_domain(address: str) -> str:
    """The address's domain in the one host form; an unmappable name stays lower-cased (it is
    never one of the organization's, so it counts as external)."""
    domain = address.rpartition("@")[2].strip().strip("<>")
    return normalize_host(domain) or domain.lower()


def is_internal(domain: str, internal: tuple[str, ...]) -> bool:
    return any(domain == d or domain.endswith("." + d) for d in internal)


def internal_domains(organization_domains: tuple[str, ...], guard: OutboundGuard) -> tuple[str, ...]:
    out = []
    for d in (*organization_domains, *guard.internal_domains):
        n = normalize_host(d)
        if n:
            out.append(n)
    return tuple(out)


def header_recipients(message, internal: tuple[str, ...]) -> Recipients:
    """Distinct external addresses of the To and Cc headers (every field of each, group syntax
    and comments understood; duplicates, including the same address in To and Cc, counted
    once; case of the domain folded, the local part compared case-insensitively too)."""
    values: list[str] = []
    for name, value in message.raw_items():
        if name.lower() in _RECIPIENT_HEADERS:
            values.append(fix_8bit(" ".join(str(value).splitlines())))
    try:
        pairs = email.utils.getaddresses(values)
    except (RecursionError, ValueError, IndexError, TypeError):
        return Recipients((), (), unreadable=True)
    seen: dict[tuple[str, str], str] = {}
    domains: dict[str, None] = {}
    for _display, addr in pairs:
        addr = addr.strip()
        if "@" not in addr:
            continue   # an empty group ("undisclosed-recipients:;") or a bare word
        local = addr.rpartition("@")[0]
        domain = normalized_domain(addr)
        if not domain or is_internal(domain, internal):
            continue
        key = (local.lower(), domain)
        if key not in seen:
            seen[key] = f"{local}@{domain}"
            domains.setdefault(domain, None)
    return Recipients(tuple(seen.values()), tuple(domains))


def external_envelope(rcpt_to: tuple[str, ...], internal: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for addr in rcpt_to:
        if "@" not in addr:
            continue
        domain = normalized_domain(addr)
        if not is_internal(domain, internal) and addr not in out:
            out.append(addr)
    return tuple(out)


def _fold(text: str) -> str:
    """NFKC (full-width 機密性２ is 機密性2), case folded, blanks removed (機密性 2, 社 外 秘):
    the form both the labels and the searched text are compared in."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def find_labels(texts: list[tuple[str, str]], labels: tuple[str, ...]) -> list[tuple[str, str]]:
    """(label, where) for each label found in each (where, text). Substring search of folded
    text: linear in the text for each of a handful of labels."""
    folded_labels = [(label, _fold(label)) for label in labels]
    hits: list[tuple[str, str]] = []
    for where, text in texts:
        folded = _fold(text)
        for label, f in folded_labels:
            if f and f in folded and (label, where) not in hits:
                hits.append((label, where))
    return hits


def _subjects(message) -> list[str]:
    """The subject decoded (RFC 2047 words in any charset), and — when it came as raw 8-bit
    bytes (Shift_JIS from old Japanese mailers) — decoded from its raw value: the structured
    header turns such bytes into U+FFFD before fix_8bit could read them."""
    out: list[str] = []
    try:
        out.append(fix_8bit(str(message.get("Subject", "") or "")))
    except (ValueError, IndexError, TypeError, LookupError):
        pass
    for name, value in message.raw_items():
        if name.lower() == "subject":
            text = " ".join(str(value).splitlines())
            if any("\udc80" <= ch <= "\udcff" for ch in text):
                out.append(fix_8bit(text))
    return out


def _where(where: str) -> tuple[str, str]:
    kind, _, name = where.partition(":")
    if kind == "subject":
        return "件名", "the subject"
    if kind == "body":
        return "本文", "the body"
    return f"添付ファイル名「{visible(name)}」", f"the attachment name '{visible(name)}'"


def _shown(items: tuple[str, ...] | list[str]) -> str:
    listed = ", ".join(visible(x) for x in list(items)[:_SHOWN])
    return listed + (f", … (+{len(items) - _SHOWN})" if len(items) > _SHOWN else "")


def guard_findings(mail: ParsedMail, rcpt_to: tuple[str, ...], organization_domains: tuple[str, ...],
                   guard: OutboundGuard, body: str) -> list[Finding]:
    """The guard's findings for one submitted message (``body``: its readable text)."""
    if not guard.enabled:
        return []
    internal = internal_domains(organization_domains, guard)
    found: list[Finding] = []
    recipients = header_recipients(mail.message, internal)
    if recipients.unreadable:
        found.append(Finding(EXTERNAL_RECIPIENTS, Text(
            "To/Cc の宛先を読み取れません (社外の宛先数を確認できないため上限超過として扱います)",
            "the To/Cc recipients cannot be read (counted as over the limit of external recipients)")))
    elif len(recipients.addresses) > guard.max_external_recipients:
        found.append(Finding(EXTERNAL_RECIPIENTS, Text(
            f"To/Cc に社外の宛先が {len(recipients.addresses)} 件 (上限 {guard.max_external_recipients} 件): "
            f"{_shown(recipients.addresses)}",
            f"{len(recipients.addresses)} external recipients in To/Cc (limit {guard.max_external_recipients}): "
            f"{_shown(recipients.addresses)}")))
    if len(recipients.domains) > guard.max_external_domains:
        found.append(Finding(EXTERNAL_DOMAINS, Text(
            f"To/Cc の社外の宛先が {len(recipients.domains)} ドメインにわたる (上限 {guard.max_external_domains}): "
            f"{_shown(recipients.domains)}",
            f"To/Cc recipients in {len(recipients.domains)} external domains (limit {guard.max_external_domains}): "
            f"{_shown(recipients.domains)}")))
    if guard.labels:
        # Where the mail goes: the envelope (Bcc included); without one (a tool judging a
        # file), the header recipients.
        external = external_envelope(rcpt_to, internal) if rcpt_to else recipients.addresses
        if external:
            texts = [("subject", subject) for subject in _subjects(mail.message)] + [("body", body)]
            texts += [(f"attachment:{name}", name) for part in mail.parts for name in part.filenames]
            for label, where in find_labels(texts, guard.labels):
                ja, en = _where(where)
                found.append(Finding(CONFIDENTIAL_LABEL, Text(
                    f"{ja}に「{visible(label)}」の表示があるメールが社外 ({_shown(external)}) に送られようとしている",
                    f"{en} carries the label '{visible(label)}' and the mail goes outside the organization "
                    f"({_shown(external)})")))
    return found


def explanation(names: set[str], guard: OutboundGuard, held: bool, quarantine_id: str | None = None) -> Text:
    """What the sender reads in the SMTP reply (one line per language): which rule and what to
    do instead. The English line stays ASCII unless the configured service name is not."""
    service = f" ({guard.transfer_service})" if guard.transfer_service else ""
    ja: list[str] = []
    en: list[str] = []
    if EXTERNAL_RECIPIENTS in names or EXTERNAL_DOMAINS in names:
        ja.append(f"To/Cc に社外の宛先が多すぎます (上限 {guard.max_external_recipients} 件・"
                  f"{guard.max_external_domains} ドメイン)。社外の多数の宛先は Bcc に入れ (To には自分のアドレス)、"
                  f"または承認済みのファイル転送サービス{service}を使ってください")
        en.append(f"too many external recipients in To/Cc (limit {guard.max_external_recipients} addresses, "
                  f"{guard.max_external_domains} domains): put the external recipients in Bcc (your own address "
                  f"in To), or use the approved transfer service{service}")
    if CONFIDENTIAL_LABEL in names:
        ja.append(f"機密性の表示 (機密性2・3、社外秘、極秘など) のある情報は社外にメールで送れません。"
                  f"承認済みのファイル転送サービス{service}を使ってください")
        en.append(f"information with a confidentiality label may not be mailed outside the organization: "
                  f"use the approved transfer service{service}")
    qid = f" (ID: {quarantine_id})" if quarantine_id else ""
    head_ja = f"【関門】送信を保留しました{qid}: " if held else "【関門】送信を拒否しました: "
    head_en = f"[Kanmon] message held{qid}: " if held else "[Kanmon] message refused: "
    return Text(head_ja + "。".join(ja) + "。", head_en + "; ".join(en) + ".")
