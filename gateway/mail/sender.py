"""Checks on who the message claims to be from (IPA SME sample 7.4, 差出人のメールアドレス
①②, and issue 5 items 1-3): free-mail sender, From differing from Reply-To or from the
address in the signature, and a display name that names a protected organization while the
address is outside it."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import re2

from gateway.i18n import Text
from gateway.mail.freemail import freemail_match
from gateway.mail.indicators import Finding, Name, visible
from gateway.mail.lookalike import is_under, skeleton
from gateway.mail.message import fix_8bit
from gateway.mail.policy import Entity, MailPolicy

# RE2 (linear time): display names and bodies are attacker text, and a backtracking engine
# is quadratic on a long run of address characters with no "@" after it (100k chars: 7 s).
_ADDRESS = re2.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,63}")
# Lines that open a signature block: RFC 3676 "-- ", or a rule of separator characters.
# (― U+2015 and the box and star rules are common in Japanese signatures: issue 20.)
_SIG_SEPARATOR = re2.compile(r"^(-- ?|[-=_*━─－＝＿〜~#―—＊■□◆◇☆★]{5,}.*)$")
_SIG_TAIL_LINES = 12


@dataclass(frozen=True)
class Address:
    display: str
    address: str

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")


def header_addresses(message, name: str) -> list[Address]:
    out: list[Address] = []
    try:
        values = message.get_all(name, []) or []
    except Exception:  # noqa: BLE001 — the stdlib header parser raises assorted errors on hostile input
        return out
    for value in values:
        try:
            groups = value.addresses
        except (AttributeError, ValueError, IndexError, TypeError):
            groups = ()
        for a in groups:
            if a.addr_spec and "@" in a.addr_spec:
                out.append(Address(fix_8bit(a.display_name or ""), fix_8bit(a.addr_spec.strip("<>"))))
    return out


def signature_block(text: str) -> str:
    marked = marked_signature_block(text)
    if marked is not None:
        return marked
    return "\n".join(text.rstrip().splitlines()[-_SIG_TAIL_LINES // 2:])


def marked_signature_block(text: str) -> str | None:
    """The lines after a signature separator near the end, or None when there is none."""
    lines = text.rstrip().splitlines()
    tail = lines[-_SIG_TAIL_LINES * 2:]
    for i in range(len(tail) - 1, -1, -1):
        if _SIG_SEPARATOR.match(tail[i].strip()) and len(tail) - i <= _SIG_TAIL_LINES:
            return "\n".join(tail[i + 1:])
    return None


def _norm(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def freemail_findings(sender: Address, policy: MailPolicy) -> list[Finding]:
    hit = freemail_match(sender.domain, policy.freemail_domains)
    if not hit:
        return []
    return [Finding(Name.FREEMAIL_SENDER, Text(
        f"差出人 {visible(sender.address)} はフリーメール ({hit})",
        f"sender {visible(sender.address)} is a free-mail address ({hit})"))]


def mismatch_findings(sender: Address, reply_to: list[Address], body: str) -> list[Finding]:
    found: list[Finding] = []
    for r in reply_to:
        if r.domain != sender.domain:
            found.append(Finding(Name.SENDER_MISMATCH, Text(
                f"Reply-To {visible(r.address)} が差出人 {visible(sender.address)} と異なるドメイン",
                f"Reply-To {visible(r.address)} is in another domain than From {visible(sender.address)}")))
    in_display = _ADDRESS.findall(sender.display)
    for addr in in_display:
        if addr.lower() != sender.address.lower():
            found.append(Finding(Name.SENDER_MISMATCH, Text(
                f"表示名のアドレス {visible(addr)} が実際の差出人 {visible(sender.address)} と異なる",
                f"display name shows {visible(addr)} but the sender is {visible(sender.address)}")))
    sig_addrs = {a.lower() for a in _ADDRESS.findall(signature_block(body))}
    if sig_addrs and sender.address.lower() not in sig_addrs:
        shown = ", ".join(sorted(visible(a) for a in sig_addrs))
        found.append(Finding(Name.SENDER_MISMATCH, Text(
            f"署名のアドレス ({shown}) が差出人 {visible(sender.address)} と異なる",
            f"signature address ({shown}) differs from the sender {visible(sender.address)}")))
    return found


def impersonation_findings(sender: Address, policy: MailPolicy) -> list[Finding]:
    display = _norm(sender.display)
    if not display:
        return []
    display_skel = skeleton(display)
    found: list[Finding] = []
    for entity in policy.protected:
        if any(is_under(sender.domain, d) for d in entity.domains):
            continue
        named = _names_entity(display, display_skel, entity)
        if named:
            found.append(Finding(Name.DISPLAY_NAME_IMPERSONATION, Text(
                f"表示名「{visible(sender.display)}」が {entity.label} ({named}) を名乗るが、アドレス {visible(sender.address)} は組織外",
                f"display name '{visible(sender.display)}' names {entity.label} ({named}) but the address {visible(sender.address)} is outside it")))
    return found


def _names_entity(display: str, display_skel: str, entity: Entity) -> str | None:
    for name in entity.names:
        n = _norm(name)
        if n and (n in display or (n.isascii() and skeleton(n) in display_skel)):
            return name
    for domain in entity.domains:
        if domain in display or skeleton(domain) in display_skel:
            return domain
    return None
