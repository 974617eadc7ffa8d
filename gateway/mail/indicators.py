"""Stable indicator names, the verdict scale, and what one fired indicator carries.

The names are an operator-facing contract (policy keys, logs, `kanmon mail scan --json`):
never rename one. INDICATORS.md beside this file documents each, with the checklist item of
IPA's SME regulation sample 7.4 (標的型攻撃メールの特徴) it implements.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import StrEnum

from gateway.i18n import Text


class MailAction(StrEnum):
    """What happens to a message, from mildest to harshest."""

    DELIVER = "deliver"
    TAG = "tag"
    NEUTRALIZE = "neutralize"
    QUARANTINE = "quarantine"
    REJECT = "reject"

    @property
    def rank(self) -> int:
        return _ORDER.index(self)


_ORDER = [MailAction.DELIVER, MailAction.TAG, MailAction.NEUTRALIZE, MailAction.QUARANTINE, MailAction.REJECT]


def harshest(*actions: MailAction) -> MailAction:
    return max(actions, key=lambda a: a.rank, default=MailAction.DELIVER)


class Name(StrEnum):
    """One stable name per checklist item (items 11 and 13 have two, see INDICATORS.md)."""

    FREEMAIL_SENDER = "freemail-sender"                        # 1
    SENDER_MISMATCH = "sender-mismatch"                        # 2
    DISPLAY_NAME_IMPERSONATION = "display-name-impersonation"  # 3
    LINK_TEXT_MISMATCH = "link-text-mismatch"                  # 4
    LOOKALIKE_DOMAIN = "lookalike-domain"                      # 5
    EXECUTABLE_ATTACHMENT = "executable-attachment"            # 6
    SHORTCUT_ATTACHMENT = "shortcut-attachment"                # 7
    DOUBLE_EXTENSION = "double-extension"                      # 8
    EXTENSION_PADDING = "extension-padding"                    # 9
    FILENAME_CONTROL_CHARS = "filename-control-chars"          # 10
    ARCHIVE_THREAT = "archive-threat"                          # 11
    ARCHIVE_ENCRYPTED = "archive-encrypted"                    # 11
    SENDER_AUTH_FAILURE = "sender-auth-failure"                # 12
    VIRUS_DETECTED = "virus-detected"                          # 13
    VIRUS_SCAN_UNAVAILABLE = "virus-scan-unavailable"          # 13
    # issue 20: the rest of the 7.4 checklist (INDICATORS.md, items 14-19)
    THEME_REQUEST = "theme-request"                            # 14 テーマ ①
    THEME_INTERNAL_DOCUMENT = "theme-internal-document"        # 14 テーマ ②
    THEME_PUBLIC_NOTICE = "theme-public-notice"                # 14 テーマ ③
    THEME_ORGANIZATION_NOTICE = "theme-organization-notice"    # 14 テーマ ④
    THEME_DELIVERY_NOTICE = "theme-delivery-notice"            # 14 テーマ ⑤
    THEME_CREDENTIAL_REQUEST = "theme-credential-request"      # 14 テーマ ⑥
    UNNATURAL_JAPANESE = "unnatural-japanese"                  # 15 本文 ①
    NON_JAPANESE_HAN = "non-japanese-han"                      # 16 本文 ②
    SIGNATURE_ERROR = "signature-error"                        # 17 本文 ⑤
    ATTACHMENT_PRESENT = "attachment-present"                  # 18 添付 ①
    ICON_DISGUISE = "icon-disguise"                            # 19 添付 ④


ALL_NAMES: tuple[str, ...] = tuple(str(n) for n in Name)

# Indicators that say something is wrong with a file; the neutralize action removes the part.
ATTACHMENT_NAMES = frozenset({
    Name.EXECUTABLE_ATTACHMENT, Name.SHORTCUT_ATTACHMENT, Name.DOUBLE_EXTENSION,
    Name.EXTENSION_PADDING, Name.FILENAME_CONTROL_CHARS, Name.ARCHIVE_THREAT, Name.ARCHIVE_ENCRYPTED,
    Name.ICON_DISGUISE,   # not attachment-present: a harmless attachment is never removed for being one
})


@dataclass(frozen=True, slots=True)
class Finding:
    """What a check found, before the policy gives it a weight.

    ``part`` is the index of the MIME part (in ``EmailMessage.walk()`` order) the finding is
    about, so the neutralize action knows what to replace; None for whole-message findings.
    """

    name: Name
    evidence: Text
    part: int | None = None


@dataclass(frozen=True, slots=True)
class Indicator:
    """A finding with its policy weight: what the verdict and the operator see."""

    name: str
    weight: int
    evidence: Text
    part: int | None = None

    def as_dict(self) -> dict[str, object]:
        # JSON is for machines (issue 5 fixes its shape): evidence is the English text; the
        # human-readable output of `kanmon mail scan` shows both languages.
        return {"name": self.name, "weight": self.weight, "evidence": self.evidence.en}


def visible(text: str, limit: int = 200) -> str:
    """Make an attacker-chosen string safe to print: control, format (bidi, zero-width) and
    line-separator characters are shown as <U+XXXX>, and long strings are cut."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"):
            out.append(f"<U+{ord(ch):04X}>")
        else:
            out.append(ch)
    joined = "".join(out)
    return joined if len(joined) <= limit else joined[: limit - 1] + "…"
