"""The message catalogs of the staff pages.

The Japanese catalog is compiled from its ``.po`` source when first used, in memory
(Babel's ``read_po`` + ``write_mo``), not at build time: the ``.po`` file in the repository is
the only copy, so a fresh ``pip install -e .`` (CI) or a checkout needs no build step and can
never run a stale ``.mo``. It costs a few milliseconds once per process. A catalog that does
not load, or that lacks the Japanese text of any message, raises ``CatalogError`` when the
gateway assembles its addons: it does not start rather than show staff a half-English page.

English is the message id itself (gettext's convention), so ``en`` needs no catalog.
"""

from __future__ import annotations

import gettext
import io
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from gateway.i18n import Text

DOMAIN = "kanmon"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
LANGUAGES = ("ja", "en")   # the order a page shows them in: Japanese first


class CatalogError(Exception):
    def __init__(self, text: Text):
        self.text = text
        super().__init__(str(text))


def N_(message: str) -> str:
    """Marks a message for extraction (pybabel -k N_); translated where it is shown."""
    return message


class PoCatalog:
    """One gettext domain whose ``.po`` files live under ``locale_dir/<lang>/LC_MESSAGES``: the
    staff pages' catalog here, the operator console's two (gateway/console). ``translations``
    compiles a language once per process (``translations.cache_clear()`` forgets it)."""

    def __init__(self, domain: str, locale_dir: Path):
        self.domain = domain
        self.locale_dir = locale_dir
        self.translations = lru_cache(maxsize=None)(self._translations)

    def po_path(self, lang: str) -> Path:
        return self.locale_dir / lang / "LC_MESSAGES" / f"{self.domain}.po"

    def _translations(self, lang: str) -> gettext.NullTranslations:
        if lang == "en":
            return gettext.NullTranslations()
        return compile_po(self.po_path(lang), lang, self.domain)


def compile_po(path: Path, lang: str, domain: str) -> gettext.NullTranslations:
    """One ``.po`` file compiled in memory (also the operator console's catalog, gateway/console)."""
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po
    from babel.support import Translations

    try:
        with path.open("rb") as f:
            catalog = read_po(f, locale=lang, domain=domain, abort_invalid=True)
    except Exception as exc:  # unreadable or not a valid .po: fail at start, with the file named
        raise CatalogError(Text(f"メッセージカタログを読めません: {path}: {exc}",
                                f"cannot read the message catalog {path}: {exc}")) from exc
    missing = [m.id for m in catalog if m.id and (not m.string or m.fuzzy)]
    if missing:
        raise CatalogError(Text(f"メッセージカタログ {path} に訳のないメッセージがあります: {missing[0]!r} ほか {len(missing) - 1} 件",
                                f"the message catalog {path} lacks translations: {missing[0]!r} and {len(missing) - 1} more"))
    buf = io.BytesIO()
    write_mo(buf, catalog, use_fuzzy=False)
    buf.seek(0)
    return Translations(buf, domain=domain)


CATALOG = PoCatalog(DOMAIN, LOCALE_DIR)
po_path = CATALOG.po_path
translations = CATALOG.translations


@dataclass(frozen=True)
class Lang:
    """One language of a page; templates call ``_`` set to ``lang.gettext``."""

    code: str

    def gettext(self, message: str, **values: object) -> str:
        text = translations(self.code).gettext(message)
        return text % values if values else text


LANGS = tuple(Lang(code) for code in LANGUAGES)


def both(message: str, **values: object) -> str:
    """``日本語 / English``, for short labels shown once for both languages."""
    ja, en = (lang.gettext(message, **values) for lang in LANGS)
    return ja if ja == en else f"{ja} / {en}"


def load_all() -> None:
    """Load every catalog now (raises CatalogError): called when the gateway starts."""
    for lang in LANGUAGES:
        translations(lang)
