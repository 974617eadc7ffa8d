"""Mail themes that push the reader to open a message (IPA SME sample 7.4, メールのテーマ ①-⑥):
the phrase list (parsing, pure) and the matcher over subject, body and attachment names.

List format (policies/mail-themes.txt, operator-extensible; the policy names the files under
``themes.lists``): one ``THEME: phrase`` per line, ``#`` starts a comment line. THEME is one of
the six keys of ``THEMES``. Phrases are compared after NFKC normalization and case folding, so
全角/半角 and upper/lower case variants need no entries of their own; a phrase made of ASCII
letters and digits at its ends only matches whole words (``cv`` does not match ``cvs``).

Matching is one RE2 set (linear time in the text, whatever the phrases): every phrase is a
literal, escaped. Built when first used and rebuilt after unpickling (the judge pool sends the
policy to its workers), never per message.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import re2

from gateway.i18n import Text
from gateway.yamlsource import SourceError

# theme key -> (indicator name, checklist item, Japanese label, English label)
THEMES: dict[str, tuple[str, str, str, str]] = {
    "request": ("theme-request", "①", "取材・講演の依頼、応募・履歴書、製品の問い合わせ・苦情、アンケート",
                "interview or lecture request, job application or CV, product enquiry or complaint, survey"),
    "internal": ("theme-internal-document", "②", "議事録・講演原稿などの内部文書、VIP の訪問",
                 "internal document (minutes, speech draft), VIP visit"),
    "public-notice": ("theme-public-notice", "③", "公的機関からのお知らせ (セキュリティ、感染症、災害)",
                      "notice from a public body (security alert, epidemic, disaster)"),
    "org-notice": ("theme-organization-notice", "④", "組織全体への通知 (人事、新しい方針、資料の再送・差替え)",
                   "organization-wide notice (personnel, new policy, resent or replaced document)"),
    "delivery": ("theme-delivery-notice", "⑤", "心当たりのない決裁・配送通知 (航空券の予約、宅配便)",
                 "unexpected approval or delivery notice (flight booking, parcel delivery)"),
    "credentials": ("theme-credential-request", "⑥", "ID・パスワードの入力要求 (メールボックスの容量超過、口座情報)",
                    "request to enter an ID or password (mailbox over quota, bank details)"),
}
MAX_PHRASES = 20_000        # a list of that many phrases compiles in well under a second
MAX_PHRASE_CHARS = 200
MIN_PHRASE_CHARS = 2        # one character would match nearly every Japanese mail
# RE2's default program budget (8 MiB) fails at about 2k patterns (platform-facts.md).
_SET_MAX_MEM = 256 << 20


@dataclass(frozen=True)
class ThemePhrase:
    theme: str
    phrase: str       # as written in the list (for the evidence)
    source: str       # file:line


def normalize(text: str) -> str:
    """What both phrases and mail text are compared as: NFKC, case-folded."""
    return unicodedata.normalize("NFKC", text).casefold()


def parse_theme_list(text: str, filename: str) -> tuple[list[ThemePhrase], list[SourceError]]:
    """Parse one list file; every malformed line is a bilingual ``file:line`` error."""
    entries: list[ThemePhrase] = []
    errors: list[SourceError] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue

        def err(ja: str, en: str) -> None:
            errors.append(SourceError.of(filename, lineno, (), Text(ja, en)))

        theme, sep, phrase = line.partition(":")
        theme, phrase = theme.strip(), phrase.strip()
        if not sep or theme not in THEMES:
            known = ", ".join(THEMES)
            err(f"「テーマ: 語句」の形ではありません (テーマは {known} のいずれか)",
                f"not of the form 'THEME: phrase' (THEME one of {known})")
            continue
        key = normalize(phrase)
        if len(key) < MIN_PHRASE_CHARS:
            err(f"語句が短すぎます (最低 {MIN_PHRASE_CHARS} 文字)", f"phrase too short (at least {MIN_PHRASE_CHARS} characters)")
            continue
        if len(phrase) > MAX_PHRASE_CHARS:
            err(f"語句が長すぎます (上限 {MAX_PHRASE_CHARS} 文字)", f"phrase too long (at most {MAX_PHRASE_CHARS} characters)")
            continue
        if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in phrase):
            err("語句に制御文字があります", "phrase contains a control character")
            continue
        if key in seen:
            err(f"重複した語句です (最初は {seen[key]} 行目)", f"duplicate phrase (first on line {seen[key]})")
            continue
        if len(entries) >= MAX_PHRASES:
            err(f"語句が多すぎます (上限 {MAX_PHRASES})", f"too many phrases (at most {MAX_PHRASES})")
            break
        seen[key] = lineno
        entries.append(ThemePhrase(theme, phrase, f"{filename}:{lineno}"))
    return entries, errors


def _pattern(phrase: str) -> str:
    key = normalize(phrase)
    pattern = re2.escape(key)
    if key[0].isascii() and key[0].isalnum():
        pattern = r"\b" + pattern
    if key[-1].isascii() and key[-1].isalnum():
        pattern += r"\b"
    return pattern


class ThemeMatcher:
    """All phrases of the loaded lists in one RE2 set. Picklable (the compiled set is not
    pickled, it is rebuilt on first use)."""

    def __init__(self, phrases: tuple[ThemePhrase, ...] = ()) -> None:
        self.phrases = phrases
        self._set = None

    def __getstate__(self) -> dict:
        return {"phrases": self.phrases}

    def __setstate__(self, state: dict) -> None:
        self.phrases = state["phrases"]
        self._set = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ThemeMatcher) and other.phrases == self.phrases

    def __hash__(self) -> int:
        return hash(self.phrases)

    def _compiled(self):
        if self._set is None:
            options = re2.Options()
            options.max_mem = _SET_MAX_MEM
            compiled = re2.Set.SearchSet(options)
            for p in self.phrases:
                compiled.Add(_pattern(p.phrase))
            compiled.Compile()
            self._set = compiled
        return self._set

    def match(self, text: str) -> list[ThemePhrase]:
        """The phrases found in ``text`` (list order)."""
        if not self.phrases or not text:
            return []
        return [self.phrases[i] for i in sorted(self._compiled().Match(normalize(text)) or ())]
