"""The message rewrites behind the tag and neutralize actions, and the notice a device gets
instead of a quarantined or rejected message. Pure: bytes in, bytes out.

* deliver: the original bytes object is returned as is — never re-serialized.
* tag: subject prefix, and a first text part that warns in Japanese and English.
* neutralize: tag, plus every attachment an indicator points at is replaced by a text notice,
  and every HTML part is converted to plain text (IPA SME sample 7.3: 受信メールの HTML 表示を
  禁止し、テキスト形式に変換する).
* html_as_text: the policy's ``html_to_text`` (default always, issue #20) converts the HTML of
  every delivered or tagged message the same way, in place, and changes nothing else.

DKIM is verified on the original bytes before any of this (engine.py); a rewritten message
no longer carries a valid signature, which is expected and harmless after the gateway.
"""

from __future__ import annotations

import codecs
import email
import functools
from email.message import EmailMessage, MIMEPart

from gateway.i18n import Text
from gateway.mail.engine import MailVerdict
from gateway.mail.html_text import html_to_text
from gateway.mail.indicators import ATTACHMENT_NAMES, MailAction, visible
from gateway.mail.limits import bytes_re2
from gateway.mail.message import POLICY, body_text, fix_8bit
from gateway.mail.policy import MailPolicy


def render_message(raw: bytes, verdict: MailVerdict, policy: MailPolicy) -> bytes | None:
    """The bytes to hand on for ``verdict``; None for quarantine and reject. Raises
    RewriteFailed when a tag/neutralize rewrite cannot be written (then quarantine)."""
    if verdict.action == MailAction.DELIVER:
        return raw
    if verdict.action == MailAction.TAG:
        return tag_message(raw, verdict, policy)
    if verdict.action == MailAction.NEUTRALIZE:
        return neutralize_message(raw, verdict, policy)
    return None


def _linesep(raw: bytes) -> str:
    return "\r\n" if b"\r\n" in raw[:4096] else "\n"


class RewriteFailed(Exception):
    """The email package could not write the rewritten message (hostile headers can trip
    its folder). The adapter must then hold the original (quarantine), never pass it on."""


def _serialize(msg: EmailMessage, raw: bytes) -> bytes:
    # refold_source="none": headers we did not touch are written exactly as they came.
    try:
        return msg.as_bytes(policy=POLICY.clone(linesep=_linesep(raw), refold_source="none"))
    except (ValueError, TypeError, LookupError, IndexError, AttributeError, AssertionError) as exc:
        raise RewriteFailed(f"cannot serialize the rewritten message: {type(exc).__name__}: {exc}") from exc


def _indicator_lines(verdict: MailVerdict) -> tuple[list[str], list[str]]:
    ja = [f"  - {i.name}: {i.evidence.ja}" for i in verdict.indicators]
    en = [f"  - {i.name}: {i.evidence.en}" for i in verdict.indicators]
    return ja, en


def warning_text(verdict: MailVerdict, removed: list[str] | None = None) -> Text:
    ja_lines, en_lines = _indicator_lines(verdict)
    ja = ["【関門 メールゲートウェイからの警告】",
          "このメールには標的型攻撃メールの特徴があります。添付ファイルを開いたり、リンクを",
          "開いたりする前に、差出人に別の手段 (電話など) で確認してください。",
          "不審な場合はシステム管理者に報告してください (IPA 中小企業の情報セキュリティ規程 7.4)。",
          "", "検出した特徴:", *ja_lines]
    en = ["[Warning from the Kanmon mail gateway]",
          "This message shows signs of a targeted attack. Before opening any attachment or",
          "link, confirm with the sender by another channel (e.g. phone).",
          "Report it to your system administrator if in doubt.",
          "", "Indicators found:", *en_lines]
    if removed:
        ja += ["", "安全のため次の添付ファイルを削除し、HTML 部分はテキストに変換しました:",
               *[f"  - {r}" for r in removed]]
        en += ["", "For your safety these attachments were removed and HTML was converted to text:",
               *[f"  - {r}" for r in removed]]
    return Text("\n".join(ja), "\n".join(en))


def _warning_part(text: Text) -> MIMEPart:
    part = MIMEPart(policy=POLICY)
    part.set_content(f"{text.ja}\n\n----\n\n{text.en}\n", charset="utf-8", cte="base64")
    return part


def _one_line(value: str) -> str:
    """A header value that is safe to set: every line break str.splitlines knows becomes a space."""
    return " ".join(value.splitlines())


def _prefix_subject(msg: EmailMessage, prefix: str) -> None:
    try:
        old = fix_8bit(str(msg.get("Subject", "")))
    except (ValueError, IndexError, TypeError):
        old = ""
    del msg["Subject"]
    old = _one_line(old)
    msg["Subject"] = old if old.startswith(prefix) else prefix + old


def _add_warning(msg: EmailMessage, text: Text) -> None:
    if msg.get_content_type() != "multipart/mixed":
        msg.make_mixed()
    msg.get_payload().insert(0, _warning_part(text))


def _library_errors_as_rewrite_failed(fn):
    """The email package raises assorted errors on hostile input; callers get RewriteFailed."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RewriteFailed:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RewriteFailed(f"cannot rewrite the message: {type(exc).__name__}: {exc}") from exc
    return wrapper


@_library_errors_as_rewrite_failed
def tag_message(raw: bytes, verdict: MailVerdict, policy: MailPolicy) -> bytes:
    msg = email.message_from_bytes(raw, policy=POLICY)
    _prefix_subject(msg, policy.subject_prefix)
    _add_warning(msg, warning_text(verdict))
    return _serialize(msg, raw)


@_library_errors_as_rewrite_failed
def neutralize_message(raw: bytes, verdict: MailVerdict, policy: MailPolicy) -> bytes:
    msg = email.message_from_bytes(raw, policy=POLICY)
    parts = list(msg.walk())  # same order as message.parse_message, so indexes match
    reasons: dict[int, list[str]] = {}
    for ind in verdict.indicators:
        if ind.part is not None and ind.name in ATTACHMENT_NAMES:
            reasons.setdefault(ind.part, []).append(ind.name)
    removed: list[str] = []
    for index in sorted(reasons):
        if index >= len(parts):
            continue
        part = parts[index]
        if part.is_multipart():
            continue
        name = _part_name(part)
        removed.append(f"{name} ({', '.join(sorted(set(reasons[index])))})")
        notice = Text(
            f"【関門】添付ファイル「{name}」は危険と判定されたため削除しました ({', '.join(sorted(set(reasons[index])))})。\n"
            "必要な場合はシステム管理者に連絡してください。",
            f"[Kanmon] The attachment '{name}' was removed as dangerous ({', '.join(sorted(set(reasons[index])))}).\n"
            "Contact your system administrator if you need it.")
        part.set_content(f"{notice.ja}\n\n{notice.en}\n", charset="utf-8", cte="base64",
                         disposition="attachment", filename="kanmon-removed-attachment.txt")
        if part is not msg:
            del part["MIME-Version"]
    _convert_html_parts(msg, parts, skip=set(reasons))
    _prefix_subject(msg, policy.subject_prefix)
    _add_warning(msg, warning_text(verdict, removed or None))
    return _serialize(msg, raw)


# What a mail client renders as a web page. application/xhtml+xml is rare but rendered by some.
HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
# <meta charset="..."> / <meta http-equiv content="...; charset=..."> in the first bytes of an
# HTML part whose Content-Type names no charset (old Japanese mailers: Shift_JIS this way).
# RE2 (linear) on attacker bytes; LATIN1 so any byte is a character.
_META_CHARSET = bytes_re2(rb"(?i)<meta[^>]{0,300}?charset[ \t]*=[ \t]*[\"']?([A-Za-z0-9_.:-]{1,40})")
_SNIFF_BYTES = 4096
# Charsets a <meta> may select: the ones mail and the web use. Not any codec Python knows — a
# sniffed "punycode" would decode a 4 MB body in quadratic time, "unicode_escape" re-interpret it.
_SNIFFED_CHARSETS = frozenset({
    "utf-8", "ascii", "shift_jis", "cp932", "euc_jp", "iso2022_jp", "iso2022_jp_1", "iso2022_jp_2",
    "iso2022_jp_3", "iso2022_jp_ext", "euc_jis_2004", "shift_jis_2004", "latin-1", "gb2312", "gbk",
    "gb18030", "big5", "euc_kr", "koi8-r", "utf-16", "utf-16-le", "utf-16-be",
})


def _html_source(part: EmailMessage, data: bytes) -> str:
    """The HTML as text: the Content-Type charset when there is one (RFC 2046 says it wins),
    else a <meta> charset the codecs know, else what body_text does (us-ascii / UTF-8 with
    replacement characters): bytes that do not decode never stop the conversion."""
    if part.get_param("charset") is None:
        m = _META_CHARSET.search(data[:_SNIFF_BYTES])
        if m:
            name = m.group(1).decode("ascii", "replace")
            try:
                canonical = codecs.lookup(name).name
                if canonical in _SNIFFED_CHARSETS or canonical.startswith(("iso8859", "cp125")):
                    return data.decode(canonical, errors="replace")
            except (LookupError, UnicodeError, ValueError):
                pass
    return body_text(part, data)


def _convert_html_parts(msg: EmailMessage, parts: list[EmailMessage], skip: set[int] = frozenset()) -> int:
    """Every HTML leaf part becomes text/plain (UTF-8, base64) in its place: the MIME tree
    keeps its shape, so part numbers (IMAP BODY[1.2], what BODYSTRUCTURE showed) still name
    the same parts. An HTML attachment becomes a .txt attachment. Returns how many changed."""
    changed = 0
    for index, part in enumerate(parts):
        if index in skip or part.is_multipart() or part.get_content_type() not in HTML_TYPES:
            continue
        data = part.get_payload(decode=True) or b""
        text = inert_text(html_to_text(_html_source(part, data)))
        was_attachment = (part.get_content_disposition() or "") == "attachment"
        extra = {"disposition": "attachment", "filename": _part_name(part) + ".txt"} if was_attachment else {}
        _set_text_like(part, text, extra)
        if part is not msg:
            del part["MIME-Version"]
        changed += 1
    return changed


# "<" and ">" of the converted text (a text node may hold "&lt;script&gt;") become their
# full-width forms: see inert_text.
_INERT = str.maketrans({"<": "\uff1c", ">": "\uff1e"})
_KEPT_CTE = ("7bit", "8bit", "quoted-printable", "base64")


def inert_text(text: str) -> str:
    """The converted text with no "<" or ">": inert even where a client renders it as HTML.
    An IMAP client that read BODYSTRUCTURE from the server (which describes the original,
    adapters/imap.py) and then fetches the part alone believes it is text/html: without this
    an escaped "&lt;img src=...&gt;" in the original would come back to life as markup. Links
    read ``text ＜https://...＞``; full-width brackets are ordinary in Japanese text."""
    return text.translate(_INERT)


def _set_text_like(part: EmailMessage, text: str, extra: dict) -> None:
    """text/plain in the part's own charset and transfer encoding when they can carry the text,
    so a client decoding the part by the server's BODYSTRUCTURE reads it right; else UTF-8 in
    the same encoding; else UTF-8 base64."""
    charset = part.get_content_charset()
    cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    attempts = []
    if charset and cte in _KEPT_CTE:
        attempts.append((charset, cte))
    if cte in _KEPT_CTE:
        attempts.append(("utf-8", cte))
    attempts.append(("utf-8", "base64"))
    for index, (cs, te) in enumerate(attempts):
        try:
            codecs.lookup(cs)
            part.set_content(text, charset=cs, cte=te, **extra)
            return
        except (LookupError, UnicodeError, ValueError):
            if index == len(attempts) - 1:
                raise


@_library_errors_as_rewrite_failed
def html_as_text(raw: bytes) -> bytes:
    """``html_to_text`` in the mail policy (issue #20, IPA SME sample 7.3 受信メールのHTML表示
    禁止): the message with every HTML part converted to plain text, nothing else changed
    (headers as they came, no warning part, no subject prefix). A message without HTML is
    returned as the very same bytes object, so a clean plain-text message stays byte-identical.

    Why convert in place rather than keep only the sender's text/plain alternative: that
    alternative is often a stub ("HTML メールを表示できません") or says something else than the
    HTML the sender meant to be read, and dropping parts renumbers the MIME tree under a client
    that already read BODYSTRUCTURE. In a multipart/alternative the converted part stays last,
    so clients show it: the HTML's content as text, each link written with its real target.
    The part keeps its charset and transfer encoding where it can, and the text is inert
    (inert_text), for clients that go by the server's BODYSTRUCTURE."""
    if b"htm" not in raw.lower():
        return raw   # no HTML content type can be declared without these letters
    msg = email.message_from_bytes(raw, policy=POLICY)
    parts = list(msg.walk())
    if not _convert_html_parts(msg, parts):
        return raw
    return _serialize(msg, raw)


def _part_name(part: EmailMessage) -> str:
    try:
        name = part.get_filename()
    except (ValueError, LookupError, TypeError):
        name = None
    return visible(fix_8bit(str(name))) if name else f"({part.get_content_type()})"


_NOTICE_HEADER_CHARS = 4000


@_library_errors_as_rewrite_failed
def notice_message(raw: bytes, verdict: MailVerdict, policy: MailPolicy, quarantine_id: str | None = None) -> bytes:
    """A short message that stands in for a quarantined or rejected one when it must still be
    served (IMAP FETCH / POP3 RETR): the original's addressing headers, a bilingual notice."""
    original = email.message_from_bytes(raw, policy=POLICY)
    notice = EmailMessage(policy=POLICY)
    raw_length = {}
    for name, value in original.raw_items():
        raw_length.setdefault(name.lower(), len(value))
    for header in ("From", "To", "Cc", "Date", "Message-ID"):
        if raw_length.get(header.lower(), 0) > _NOTICE_HEADER_CHARS:
            continue   # not copied: parsing a long address list costs quadratic time (issue #15)
        try:
            value = original.get(header)
            if value is not None:
                notice[header] = _one_line(fix_8bit(str(value)))
        except (ValueError, IndexError, TypeError):
            continue
    try:
        subject = fix_8bit(str(original.get("Subject", "")))
    except (ValueError, IndexError, TypeError):
        subject = ""
    notice["Subject"] = policy.subject_prefix + _one_line(subject)
    ja_lines, en_lines = _indicator_lines(verdict)
    held = verdict.action == MailAction.QUARANTINE
    qid = f" (ID: {quarantine_id})" if quarantine_id else ""
    ja = (f"【関門】このメールは危険と判定されたため{'隔離しました' + qid if held else '受信を拒否しました'}。\n"
          "必要な場合はシステム管理者に連絡してください。\n\n検出した特徴:\n" + "\n".join(ja_lines))
    en = (f"[Kanmon] This message was {'quarantined' + qid if held else 'rejected'} as dangerous.\n"
          "Contact your system administrator if you need it.\n\nIndicators found:\n" + "\n".join(en_lines))
    notice.set_content(f"{ja}\n\n----\n\n{en}\n", charset="utf-8", cte="base64")
    return _serialize(notice, raw)
