"""Errors in the signature block (IPA SME sample 7.4, 本文 ⑤ 署名の内容が誤っている: an
organization or telephone number that does not exist, a telephone number given as the FAX
number).

* telephone and FAX numbers are found after their labels (TEL, 電話, Phone, FAX, ファクス …)
  by RE2 (linear) and checked with **phonenumbers** (Google's libphonenumber metadata: a real
  check against the Japanese numbering plan, so 03-0000-0000 is not a number);
* the same number labelled once as telephone and once as FAX (a combined ``TEL/FAX`` label is
  a real practice of small offices and does not count);
* a web address in the signature whose organization (registrable) domain differs from the
  sender's: the registrable domain is the public suffix plus one label (publicsuffixlist,
  ICANN section, the copy the package ships).

The signature block is the one sender.py finds (after ``-- `` or a rule line, else the last
lines). At most ``MAX_NUMBERS`` labelled numbers are parsed.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import phonenumbers
import re2

MAX_NUMBERS = 20
DEFAULT_REGION = "JP"
# label, up to 8 separator characters, the number (digits with - ( ) . spaces, 8-24 chars).
_NUMBER = re2.compile(
    r"(?i)(\btel(?:ephone)?|\bphone|電話(?:番号)?|代表|直通|携帯|\bmobile|\bfax|\bfacsimile|ファクス|ファックス|ファクシミリ)"
    r"((?:[ \t]*[/／・&][ \t]*(?:tel|phone|fax|電話|ファクス|ファックス))?)"
    r"[^0-9+\n]{0,8}"
    r"(\+?[0-9][0-9()\- .\x{2010}-\x{2015}\x{2212}\x{30fc}]{6,22}[0-9])")
_URL_HOST = re2.compile(r"(?i)(?:https?://|\bwww\.)([a-z0-9.-]+\.[a-z]{2,63})")
_FAX_LABELS = ("fax", "facsimile", "ファクス", "ファックス", "ファクシミリ")

_PSL = None


def _registrable(host: str) -> str:
    global _PSL
    if _PSL is None:
        from publicsuffixlist import PublicSuffixList  # ships its own copy of the list: no network
        _PSL = PublicSuffixList(only_icann=True)
    host = host.lower().rstrip(".")
    return _PSL.privatesuffix(host) or host


@dataclass(frozen=True)
class SignatureProblem:
    kind: str         # "invalid-number", "phone-as-fax", "domain-differs"
    detail: str       # what was found (for the evidence)


@dataclass(frozen=True)
class LabelledNumber:
    label: str
    fax: bool
    combined: bool
    text: str


def labelled_numbers(block: str) -> list[LabelledNumber]:
    text = unicodedata.normalize("NFKC", block)
    out: list[LabelledNumber] = []
    for label, combined, number in _NUMBER.findall(text)[:MAX_NUMBERS]:
        lab = label.lower()
        out.append(LabelledNumber(label, any(f in lab for f in _FAX_LABELS), bool(combined), number.strip()))
    return out


def _e164(number: str) -> str | None:
    """The number in E.164 form if it is a valid number of its region (JP by default)."""
    try:
        parsed = phonenumbers.parse(number, DEFAULT_REGION)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def signature_problems(block: str, sender_domain: str | None) -> list[SignatureProblem]:
    problems: list[SignatureProblem] = []
    phones: dict[str, str] = {}
    faxes: dict[str, str] = {}
    for n in labelled_numbers(block):
        e164 = _e164(n.text)
        if e164 is None:
            problems.append(SignatureProblem("invalid-number", f"{n.label} {n.text}"))
            continue
        if n.combined:
            continue
        (faxes if n.fax else phones).setdefault(e164, n.text)
    for e164, text in phones.items():
        if e164 in faxes:
            problems.append(SignatureProblem("phone-as-fax", text))
    if sender_domain:
        own = _registrable(sender_domain)
        seen: set[str] = set()
        for host in _URL_HOST.findall(unicodedata.normalize("NFKC", block)):
            org = _registrable(host)
            if org != own and org not in seen:
                seen.add(org)
                problems.append(SignatureProblem("domain-differs", host.lower()))
    return problems
