"""The issue 20 indicators over what the reader sees (IPA SME sample 7.4): mail themes ①-⑥,
unnatural Japanese, Han characters Japanese does not use, signature errors, any attachment
and icon disguise. Pure: a parsed mail and the policy in, findings out.

Each check is one function of ``MailView`` in ``CHECKS`` (name -> function), so the benchmark
can time them one by one (bench/mail.py --indicators).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.i18n import Text
from gateway.mail.hanzi import non_japanese_han
from gateway.mail.indicators import Finding, Name, visible
from gateway.mail.message import ParsedMail, fix_8bit
from gateway.mail.pe_icons import MAX_PE_PER_MESSAGE, document_claim, pe_icons
from gateway.mail.policy import MailPolicy
from gateway.mail.sender import marked_signature_block, signature_block
from gateway.mail.signature import signature_problems
from gateway.mail.themes import THEMES
from gateway.mail.unnatural import is_unnatural, unnatural_signs

_THEME_NAMES = {key: Name(spec[0]) for key, spec in THEMES.items()}
_MAX_PHRASES_SHOWN = 3


@dataclass(frozen=True)
class MailView:
    """The texts the checks read, computed once per message."""

    mail: ParsedMail
    subject: str
    body: str                  # readable_text(): plain parts, else HTML as text
    sender_domain: str | None


def subject_of(mail: ParsedMail) -> str:
    try:
        return fix_8bit(str(mail.message.get("Subject", "") or ""))
    except Exception:  # noqa: BLE001 — the stdlib header parser raises assorted errors on hostile input
        return ""


def theme_findings(view: MailView, policy: MailPolicy) -> list[Finding]:
    found: dict[str, list[tuple[str, str, str]]] = {}
    sources = [("件名", "subject", view.subject), ("本文", "body", view.body)]
    sources += [("添付ファイル名", "attachment name", n) for p in view.mail.parts for n in p.filenames]
    for where_ja, where_en, text in sources:
        for hit in policy.themes.match(text):
            found.setdefault(hit.theme, []).append((where_ja, where_en, hit.phrase))
    out: list[Finding] = []
    for theme, hits in found.items():
        _name, mark, label_ja, label_en = THEMES[theme]
        shown = hits[:_MAX_PHRASES_SHOWN]
        ja = "、".join(f"{w}に「{visible(p, 60)}」" for w, _, p in shown)
        en = ", ".join(f"{w} has '{visible(p, 60)}'" for _, w, p in shown)
        more_ja = f" ほか {len(hits) - len(shown)} 件" if len(hits) > len(shown) else ""
        more_en = f" and {len(hits) - len(shown)} more" if len(hits) > len(shown) else ""
        out.append(Finding(_THEME_NAMES[theme], Text(
            f"メールのテーマ{mark} ({label_ja}): {ja}{more_ja}",
            f"mail theme {mark} ({label_en}): {en}{more_en}")))
    return out


def unnatural_findings(view: MailView, policy: MailPolicy) -> list[Finding]:
    signs = unnatural_signs(view.subject + "\n" + view.body)
    if not is_unnatural(signs):
        return []
    shown = ", ".join(f"{s.name} ({visible(s.example, 40)})" for s in signs)
    return [Finding(Name.UNNATURAL_JAPANESE, Text(
        f"日本語の言い回しが不自然: {shown}", f"the Japanese reads unnaturally: {shown}"))]


def han_findings(view: MailView, policy: MailPolicy) -> list[Finding]:
    report = non_japanese_han(view.subject + "\n" + view.body)
    if not report.fires(policy.han_min_chars):
        return []
    chars = "".join(report.chars[:20]) + ("…" if len(report.chars) > 20 else "")
    punct = f"; 中国語の句読点 {' '.join(report.punctuation)}" if report.punctuation else ""
    punct_en = f"; Chinese punctuation {' '.join(report.punctuation)}" if report.punctuation else ""
    return [Finding(Name.NON_JAPANESE_HAN, Text(
        f"日本語では使われない漢字 {len(report.chars)} 種 ({report.count} 字): {visible(chars)}{punct}",
        f"{len(report.chars)} distinct Han characters Japanese does not use ({report.count} in all): "
        f"{visible(chars)}{punct_en}"))]


_SIGNATURE_TEXT = {
    "invalid-number": ("署名の電話・FAX 番号が日本の番号計画にない番号: {d}",
                       "signature phone/FAX number is not a valid number: {d}"),
    "phone-as-fax": ("署名の電話番号と FAX 番号が同じ: {d}", "signature gives the same number as phone and FAX: {d}"),
    "domain-differs": ("署名の組織のドメイン {d} が差出人のドメイン {s} と異なる",
                       "signature organization domain {d} differs from the sender's {s}"),
}


def signature_findings(view: MailView, policy: MailPolicy) -> list[Finding]:
    # Numbers: the marked signature, else the last lines (as sender-mismatch reads it). Web
    # addresses only in a marked signature: the last lines of an unsigned mail are its text,
    # and text links anywhere.
    marked = marked_signature_block(view.body)
    block = marked if marked is not None else signature_block(view.body)
    out: list[Finding] = []
    for problem in signature_problems(block, view.sender_domain if marked is not None else None):
        ja, en = _SIGNATURE_TEXT[problem.kind]
        d, s = visible(problem.detail, 80), visible(view.sender_domain or "?")
        out.append(Finding(Name.SIGNATURE_ERROR, Text(ja.format(d=d, s=s), en.format(d=d, s=s))))
    return out


def attachment_findings(view: MailView, policy: MailPolicy) -> list[Finding]:
    parts = view.mail.parts
    if not parts:
        return []
    labels = [visible(p.filenames[0], 60) if p.filenames else f"({p.content_type})" for p in parts[:5]]
    shown = ", ".join(labels) + (" …" if len(parts) > 5 else "")
    return [Finding(Name.ATTACHMENT_PRESENT, Text(
        f"添付ファイルあり ({len(parts)} 個): {shown}", f"{len(parts)} attachment(s): {shown}"))]


def icon_findings(view: MailView, policy: MailPolicy) -> list[Finding]:
    out: list[Finding] = []
    budget = MAX_PE_PER_MESSAGE   # the rest are still executable-attachment (content sniffing)
    for part in view.mail.parts:
        if not part.data.startswith(b"MZ"):
            continue
        claim = document_claim(part.filenames, part.content_type, policy.decoy_extensions, policy.executable_extensions)
        if claim is None or budget <= 0:
            continue
        budget -= 1
        icons = pe_icons(part.data)
        if icons is None:
            continue
        label = visible(part.filenames[0]) if part.filenames else f"({part.content_type})"
        out.append(Finding(Name.ICON_DISGUISE, Text(
            f"添付「{label}」は独自のアイコン ({icons.groups} 組, {icons.icons} 個) を持つ実行ファイルだが文書を装う: {claim}",
            f"attachment '{label}' is an executable with its own icons ({icons.groups} group(s), {icons.icons} image(s)) "
            f"posing as a document: {claim}"), part.index))
    return out


CHECKS: dict[str, Callable[[MailView, MailPolicy], list[Finding]]] = {
    "themes": theme_findings,
    "unnatural-japanese": unnatural_findings,
    "non-japanese-han": han_findings,
    "signature-error": signature_findings,
    "attachment-present": attachment_findings,
    "icon-disguise": icon_findings,
}


def content_findings(mail: ParsedMail, body: str, sender_domain: str | None, policy: MailPolicy) -> list[Finding]:
    view = MailView(mail, subject_of(mail), body, sender_domain)
    found: list[Finding] = []
    for check in CHECKS.values():
        found += check(view, policy)
    return found
