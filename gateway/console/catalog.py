"""The console's message catalog and the language of a request.

English is the message id; Japanese comes from ``locale/ja/LC_MESSAGES/console.po``,
compiled in memory when first used (``gateway.pages.catalog.PoCatalog``: no build step, no
stale ``.mo``). A console page is in one language, chosen by the ``lang`` cookie (the switch in
the header) or else by ``Accept-Language``; Japanese when neither says.
"""

from __future__ import annotations

from pathlib import Path

from gateway.pages.catalog import PoCatalog

DOMAIN = "console"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
LANGUAGES = ("ja", "en")
LANG_COOKIE = "kanmon_console_lang"   # not a secret: a plain preference (no __Host- needed, still Secure)


def M_(message: str) -> str:
    """Marks a message in Python code for extraction (``pybabel extract -k M_``)."""
    return message


CATALOG = PoCatalog(DOMAIN, LOCALE_DIR)
po_path = CATALOG.po_path
translations = CATALOG.translations


def gettext_for(lang: str):
    tr = translations(lang)

    def translate(message: str, **values: object) -> str:
        text = tr.gettext(message)
        return text % values if values else text
    return translate


def choose_lang(cookie: str | None, accept_language: str | None) -> str:
    if cookie in LANGUAGES:
        return cookie
    for part in (accept_language or "").split(","):
        tag = part.split(";", 1)[0].strip().lower()
        if tag[:2] in LANGUAGES:
            return tag[:2]
    return "ja"


def load_all() -> None:
    """Raise CatalogError now (at start) rather than at the first page."""
    for lang in LANGUAGES:
        translations(lang)


# Messages the templates look up by a value (``_(status)``, ``_("reason-" ~ r)``): marked here
# so the extraction finds them and the catalog test checks each has its Japanese text.
VALUE_MESSAGES = (
    M_("active"), M_("suspended"), M_("quarantined"), M_("revoked"),
    M_("org"), M_("byod"),
    M_("admin"), M_("helpdesk"), M_("auditor"), M_("user"),
    M_("any"), M_("compliant"), M_("noncompliant"), M_("unknown"),
    M_("Devices"), M_("My devices"),
)
