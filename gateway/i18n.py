"""Bilingual user-facing text. Japanese first, English too (operators in Japan are the
first audience). KANMON_LANG=ja|en|both selects what the CLI prints; default both."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Text:
    ja: str
    en: str

    def format(self, **kw: object) -> "Text":
        """A value that is a Text, or carries one as ``.text`` (the bilingual exceptions:
        registry, CA, client config…), fills each language with its own half."""
        ja, en = {}, {}
        for key, value in kw.items():
            text = value if isinstance(value, Text) else getattr(value, "text", None)
            ja[key], en[key] = (text.ja, text.en) if isinstance(text, Text) else (value, value)
        return Text(self.ja.format(**ja), self.en.format(**en))

    def render(self, lang: str | None = None) -> str:
        lang = lang or current_lang()
        if lang == "ja":
            return self.ja
        if lang == "en":
            return self.en
        return f"{self.ja}\n{self.en}"

    def inline(self, lang: str | None = None) -> str:
        """As ``render``, on one line ("ja / en" for both): a detail after ``file:line:``."""
        lang = lang or current_lang()
        return self.render(lang) if lang in ("ja", "en") else f"{self.ja} / {self.en}"

    def __str__(self) -> str:
        return self.render()


def current_lang() -> str:
    lang = os.environ.get("KANMON_LANG", "both").lower()
    return lang if lang in ("ja", "en", "both") else "both"
