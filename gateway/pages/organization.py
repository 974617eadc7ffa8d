"""The `organization:` section of the gateway config: who the staff pages speak for.

    organization:
      name_ja: 例市役所
      name_en: Example City Office
      logo_url: data:image/png;base64,iVBORw0...   # or https://intranet.example.lg.jp/logo.png
      helpdesk:
        name_ja: 情報政策課 ヘルプデスク
        name_en: IT helpdesk (Information Policy Division)
        mail: helpdesk@example.lg.jp
        phone: 03-1234-5678

Every block page and the sign-in portal carry the name (and the logo); the helpdesk's mail
and phone become mailto:/tel: links, the mail one with the request id in its subject and
body. The older top-level ``helpdesk: {name_ja, name_en, contact}`` still works; its names
are used when ``organization.helpdesk`` does not give them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from gateway.i18n import Text

_STR = {"type": "string", "minLength": 1, "maxLength": 200}

ORGANIZATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name_ja", "name_en"],
    "properties": {
        "name_ja": _STR,
        "name_en": _STR,
        # A data: URL is inlined in every page (at most 64 KiB): the page then loads nothing,
        # also for a quarantined device or one not signed in yet.
        "logo_url": {"type": "string", "minLength": 1, "maxLength": 65536},
        "helpdesk": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"name_ja": _STR, "name_en": _STR, "mail": _STR, "phone": _STR},
        },
    },
}

# An addr-spec without quoting or comments: enough for a helpdesk address, and nothing that
# could add headers to the mailto: link (no ?, &, %, spaces). Hand-written: the stdlib's
# email.utils.parseaddr accepts display names and comments, which a mailto: link must not carry.
_MAIL = re.compile(r"[A-Za-z0-9!#$'*+/=^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+")
# Digits with the visual separators people write (03-1234-5678, +81 3 1234 5678, (03) 1234-5678).
_PHONE = re.compile(r"\+?[0-9(][0-9 ()-]{2,28}[0-9]")
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif|webp|svg\+xml);base64,[A-Za-z0-9+/]+={0,2}")

T_MAIL = Text("メールアドレスとして正しくありません: {value!r}（例: helpdesk@example.lg.jp）",
              "not a valid mail address: {value!r} (e.g. helpdesk@example.lg.jp)")
T_PHONE = Text("電話番号として正しくありません: {value!r}（数字・+・-・空白・括弧だけ、例: 03-1234-5678）",
               "not a valid phone number: {value!r} (digits, +, -, spaces and brackets only, e.g. 03-1234-5678)")
T_LOGO = Text("ロゴは https:// の URL か data:image/…;base64, の URL で書いてください: {value!r}",
              "the logo must be an https:// URL or a data:image/…;base64, URL: {value!r}")


@dataclass(frozen=True)
class Helpdesk:
    name_ja: str
    name_en: str
    contact: str = ""       # free text (the older `helpdesk.contact`), shown as is
    mail: str = ""
    phone: str = ""

    @property
    def tel_href(self) -> str | None:
        """RFC 3966: digits, '+' and '-' (spaces and brackets are not allowed in a tel: URI)."""
        if not self.phone:
            return None
        return "tel:" + re.sub(r"[ ()]", "", self.phone)

    def mailto_href(self, subject: str, body: str) -> str | None:
        if not self.mail:
            return None
        return f"mailto:{self.mail}?subject={quote(subject, safe='')}&body={quote(body, safe='')}"


@dataclass(frozen=True)
class Organization:
    name_ja: str = ""
    name_en: str = ""
    logo_url: str | None = None
    helpdesk: Helpdesk = field(default_factory=lambda: Helpdesk("情報システム担当", "IT helpdesk"))


def organization_settings(doc, section: dict | None, legacy_helpdesk: dict | None, errors: list) -> Organization:
    """From the schema-checked sections; problems go to ``errors`` (``doc.error(path, Text)``)."""
    legacy = legacy_helpdesk or {}
    section = section or {}
    desk = section.get("helpdesk", {})
    mail, phone, logo = desk.get("mail", ""), desk.get("phone", ""), section.get("logo_url")
    if mail and not _MAIL.fullmatch(mail):
        errors.append(doc.error(("organization", "helpdesk", "mail"), T_MAIL.format(value=mail)))
    if phone and not _PHONE.fullmatch(phone):
        errors.append(doc.error(("organization", "helpdesk", "phone"), T_PHONE.format(value=phone)))
    if logo is not None and not _valid_logo(logo):
        shown = logo if len(logo) <= 60 else logo[:57] + "..."
        errors.append(doc.error(("organization", "logo_url"), T_LOGO.format(value=shown)))
    return Organization(
        name_ja=section.get("name_ja", ""),
        name_en=section.get("name_en", ""),
        logo_url=logo,
        helpdesk=Helpdesk(
            name_ja=desk.get("name_ja", legacy.get("name_ja", "情報システム担当")),
            name_en=desk.get("name_en", legacy.get("name_en", "IT helpdesk")),
            contact=legacy.get("contact", ""),
            mail=mail,
            phone=phone,
        ),
    )


def _valid_logo(url: str) -> bool:
    if url.startswith("data:"):
        return _DATA_IMAGE.fullmatch(url) is not None
    parts = urlsplit(url)
    return (parts.scheme == "https" and bool(parts.hostname) and not any(c.isspace() for c in url)
            and '"' not in url and "'" not in url)
