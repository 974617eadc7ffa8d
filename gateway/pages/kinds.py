"""Which page a blocked request gets, and what it tells staff.

Page kinds: ``policy`` (a rule of the organization's policy), ``quarantine`` (the device is
quarantined), ``signin-required`` (no signed-in user), ``fault`` (the gateway itself failed:
HTTP 503, "temporarily unavailable, try again" — never "blocked by policy"), ``infected``
(a download in which the virus scanner found a signature) and ``bad-request`` (a request the
gateway cannot parse: HTTP 400).

An addon that blocks an infected download gives the page its signature name either way:
its verdict's rule id is ``gateway.verdict.RULE_INFECTED``, or it sets
``flow.metadata[gateway.proxy.flowstate.METADATA_SIGNATURE]`` before the enforcer writes the page
(``Enforcer.block_http``, which hands the signature to ``page_kind``).

The staff message of a ``policy`` page, per language: the rule's ``description_ja`` /
``description``, else the policy's ``categories:`` entry for the rule's category, else the
built-in message of that category (below, in the catalogs), else a general sentence. The
approved alternative: the rule's ``alternative``, else its category's.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Mapping

from gateway.pages.catalog import LANGS, N_
from gateway.verdict import (RULE_FAIL_CLOSED, RULE_INFECTED, RULE_MALFORMED_AUTHORITY, RULE_QUARANTINE,
                             RULE_SCAN_UNAVAILABLE, RULE_SIGNIN_REQUIRED, RULE_UNDECIDED, Verdict)


class PageKind(StrEnum):
    POLICY = "policy"
    QUARANTINE = "quarantine"
    SIGNIN = "signin-required"
    FAULT = "fault"
    INFECTED = "infected"
    BAD_REQUEST = "bad-request"


STATUS = {PageKind.POLICY: 403, PageKind.QUARANTINE: 403, PageKind.SIGNIN: 403, PageKind.FAULT: 503,
          PageKind.INFECTED: 403, PageKind.BAD_REQUEST: 400}
_FAULT_RULES = frozenset({RULE_FAIL_CLOSED, RULE_UNDECIDED,
                          RULE_SCAN_UNAVAILABLE})   # issue #18: the virus scanner did not answer (gateway/scan)


def page_kind(verdict: Verdict, signature: str | None = None) -> PageKind:
    rule = verdict.rule_id
    if rule in _FAULT_RULES:
        return PageKind.FAULT
    if signature is not None or rule == RULE_INFECTED:
        return PageKind.INFECTED
    if rule == RULE_QUARANTINE:
        return PageKind.QUARANTINE
    if rule == RULE_SIGNIN_REQUIRED:
        return PageKind.SIGNIN
    if rule == RULE_MALFORMED_AUTHORITY:
        return PageKind.BAD_REQUEST
    return PageKind.POLICY


# What staff read for a rule of a category that the policy does not describe itself. The
# categories of the shipped policy (policies/example.yaml) and of the usual feeds.
CATEGORY_MESSAGES: dict[str, str] = {
    "webmail": N_("Free web mail services are not used for work: mail sent there leaves the organization's "
                  "control. Use the organization's own mail."),
    "storage": N_("Online storage and file transfer services that the organization has not approved are not "
                  "used for work: files kept there leave the organization's control."),
    "sns": N_("Posting to social networks from work devices is not allowed. Reading is still possible."),
    "p2p": N_("File sharing (P2P) is not allowed on work devices."),
    "shortener": N_("Shortened links hide where they lead, so they are not opened on work devices. "
                    "Ask the sender for the full address."),
    "sideload": N_("Apps are installed only from the approved app store, not downloaded from web sites."),
    "dns-bypass": N_("Name lookups must go through the organization's resolver; other resolvers are blocked."),
    "malware": N_("This site is known to spread malware or to steal passwords."),
    "phishing": N_("This site is known to imitate other sites to steal passwords."),
}
GENERAL_MESSAGE = N_("Your organization does not allow this site on work devices.")


@dataclass(frozen=True)
class StaffMessage:
    ja: str
    en: str
    alternative: str | None = None   # an http(s) URL of the approved alternative


def looks_japanese(text: str) -> bool:
    """Kana or kanji in the text: an older policy's Japanese ``description`` (from before
    ``description_ja``) is shown as the Japanese message, not under English."""
    return any(unicodedata.name(ch, "").startswith(("CJK UNIFIED", "HIRAGANA", "KATAKANA")) for ch in text)


def staff_message(verdict: Verdict, rule: Any = None, categories: Mapping[str, Any] | None = None) -> StaffMessage:
    """``rule``: the policy's RuleInfo for the verdict (or None); ``categories``: the
    policy's ``categories:`` entries (objects with description, description_ja, alternative)."""
    desc_en = getattr(rule, "description", None)
    desc_ja = getattr(rule, "description_ja", None)
    if desc_en and not desc_ja and looks_japanese(desc_en):
        desc_ja, desc_en = desc_en, None
    category = verdict.category or getattr(rule, "category", None)
    declared = (categories or {}).get(category) if category else None
    builtin = CATEGORY_MESSAGES.get(category or "")
    fallback = builtin or GENERAL_MESSAGE
    ja_lang, en_lang = LANGS
    ja = desc_ja or getattr(declared, "description_ja", None) or ja_lang.gettext(fallback)
    en = desc_en or getattr(declared, "description", None) or en_lang.gettext(fallback)
    alternative = getattr(rule, "alternative", None) or getattr(declared, "alternative", None)
    return StaffMessage(ja, en, alternative)
