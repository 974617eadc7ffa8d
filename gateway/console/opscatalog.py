"""The texts of the operator pages that are not about one device (live blocks, policy, feeds,
reports, alerts; issue #21) and how those pages render.

Their Japanese is in ``locale/ja/LC_MESSAGES/console_ops.po`` (domain ``console_ops``),
beside the core's ``console.po``: the pages were written on a branch of their own, and one
catalog per set of pages keeps both files mergeable (fold it into ``console.po`` with
``msgcat`` once both branches are in). This catalog is installed as the fallback of the core's
(``install``), so the core's ``_`` finds these messages on every page (the navigation too).
Extraction: ``pybabel extract -F gateway/console/ops_babel.cfg -k O_ -o /tmp/ops.pot .``;
tests/unit/test_console_ops.py fails for a message without its Japanese text.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from flask import g

from gateway.console.app import render_page
from gateway.console.catalog import LANGUAGES, gettext_for
from gateway.console.catalog import translations as core_translations
from gateway.i18n import Text
from gateway.pages.catalog import PoCatalog

DOMAIN = "console_ops"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
TEMPLATES = "ops_templates"


def O_(message: str) -> str:
    """Marks a message of these pages in Python code (``pybabel extract -k O_``)."""
    return message


CATALOG = PoCatalog(DOMAIN, LOCALE_DIR)
po_path = CATALOG.po_path
translations = CATALOG.translations


_installed: set[str] = set()
_install_lock = threading.Lock()


def install() -> None:
    """Make this catalog the fallback of the core's (once per language and process), so every
    console page -- the navigation of the core's pages too -- finds these messages through the
    core's ``_``. Called when a blueprint of these pages is registered."""
    with _install_lock:
        for code in LANGUAGES:
            if code == "en" or code in _installed:
                continue
            core_translations(code).add_fallback(translations(code))
            _installed.add(code)


def ops_gettext(lang: str):
    install()
    return gettext_for(lang)


def load_all() -> None:
    for code in LANGUAGES:
        translations(code)


def lang() -> str:
    return g.get("lang", "ja")


def text(message: str, **values: object) -> str:
    """A message of these pages in the request's language (for flashes built in Python)."""
    return ops_gettext(lang())(message, **values)


def tr(t: Text) -> str:
    """A gateway ``Text`` (the bilingual texts of the core packages) in the request's language."""
    return t.ja if lang() == "ja" else t.en


def page(template: str, http_status: int = 200, /, **context: Any):
    """``render_page`` with this catalog's ``_`` (it wins over the core's context processor)
    and ``tr`` for the core packages' ``Text``."""
    return render_page(template, http_status, _=ops_gettext(lang()), tr=tr, **context)


# Messages the templates look up by a value: marked so extraction finds them.
VALUE_MESSAGES = (
    O_("allow"), O_("block"), O_("monitor"), O_("no-inspect"), O_("tenant-restrict"),
    O_("added"), O_("removed"), O_("changed"), O_("moved"),
    O_("firing"), O_("pending"),
    O_("dns"), O_("tls"), O_("http-request"), O_("http-response"), O_("tcp"), O_("connect"),
    O_("proxy"), O_("conn"), O_("mail"),
    O_("Live blocks"), O_("Policy"), O_("Feeds"), O_("Reports"), O_("Alerts"),   # the navigation (app.PAGES)
)
