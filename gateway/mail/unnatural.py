"""Unnatural Japanese (IPA SME sample 7.4, 本文 ① 日本語の言い回しが不自然): signs that a text
was written by someone who does not write Japanese, or by a machine translator.

No well-kept library or small shipped model judges the naturalness of Japanese business
prose (morphological analysers such as SudachiPy or fugashi need dictionaries of 50+ MB and
still say nothing about naturalness), so these are documented heuristics, each an RE2
pattern (linear time) or a plain substring test. Each sign has points; the text is unnatural
at ``MIN_POINTS``. Measured on tests/mailcorpus/indicators.py (see INDICATORS.md).

| sign | points | what |
|---|---|---|
| ``half-width-punctuation`` | 1 | a Japanese character followed by an ASCII ``,`` or ``.`` that ends a clause (mixed full/half-width punctuation) |
| ``mixed-commas`` | 1 | both ``、`` and ``，`` as commas in one text |
| ``chinese-punctuation`` | 1 | 《 》 ； —— in Japanese text |
| ``chinese-han`` | 1, 2 at 3+ | Han characters no Japanese codec writes, inside Japanese text (确认 for 確認); one (a rare name) is a single point |
| ``spaced-kana`` | 2 | three or more spaces between a hiragana and another Japanese character (word-by-word spacing of translated text) |
| ``particle-collision`` | 2 | two case particles in a row after a noun (アカウントをが, お客様はが): machine translation |
| ``translated-phrase`` | 2 | a stock phrase of translated mail (親愛なる, 尊敬するお客様, あなたのアカウント, 私たちのチーム) |

Only text that is Japanese (at least ``MIN_KANA`` kana) is judged.
"""

from __future__ import annotations

from dataclasses import dataclass

import re2

from gateway.mail.hanzi import CHINESE_PUNCTUATION, non_japanese_han

MIN_POINTS = 2
MIN_KANA = 10
_JA = r"\p{Hiragana}\p{Katakana}\p{Han}ー"
_KANA_RUN = re2.compile(r"(?s)(?:[\p{Hiragana}\p{Katakana}].*?){%d}" % MIN_KANA)
# A clause ended the ASCII way after Japanese: 「確認してください.」「ありがとう, 」 — not 1.5 or a.b.
_HALF_PUNCT = re2.compile(r"(?m)[" + _JA + r"][,.](?:[ \t\r\n]|$|[" + _JA + r"])")
_SPACED_KANA = re2.compile(r"\p{Hiragana}[ \x{3000}][" + _JA + r"]|[" + _JA + r"][ \x{3000}]\p{Hiragana}")
_PARTICLES = re2.compile(r"[\p{Han}\p{Katakana}ー](?:はが|がは|をが|がを|をは|はを|をを|がが)")
TRANSLATED_PHRASES = (
    "親愛なる", "尊敬するお客様", "尊敬される", "あなたのアカウント", "あなたのメールボックス", "あなたのパスワード",
    "あなたの電子メール", "私たちのチーム", "私たちのシステム", "ご不便をおかけして申し訳ありません。私たち",
    "よろしくお願いします致します", "確認するために下のリンク",
)


@dataclass(frozen=True)
class Sign:
    name: str
    points: int
    example: str


def unnatural_signs(text: str) -> list[Sign]:
    """The signs found in ``text`` (empty if it is not Japanese)."""
    if not _is_japanese(text):
        return []
    signs: list[Sign] = []
    m = _HALF_PUNCT.search(text)
    if m:
        signs.append(Sign("half-width-punctuation", 1, m.group()))
    if "、" in text and "，" in text:
        signs.append(Sign("mixed-commas", 1, "、 / ，"))
    chinese = [p for p in CHINESE_PUNCTUATION if p in text]
    if chinese:
        signs.append(Sign("chinese-punctuation", 1, " ".join(chinese)))
    han = non_japanese_han(text).chars
    if han:
        signs.append(Sign("chinese-han", 2 if len(han) >= 3 else 1, "".join(han[:5])))
    spaced = _SPACED_KANA.findall(text)
    if len(spaced) >= 3:
        signs.append(Sign("spaced-kana", 2, spaced[0]))
    m = _PARTICLES.search(text)
    if m:
        signs.append(Sign("particle-collision", 2, m.group()))
    phrase = next((p for p in TRANSLATED_PHRASES if p in text), None)
    if phrase:
        signs.append(Sign("translated-phrase", 2, phrase))
    return signs


def _is_japanese(text: str) -> bool:
    """At least MIN_KANA kana: one RE2 search (each call of the Python wrapper costs a pass
    over the text, so not one call per kana)."""
    return _KANA_RUN.search(text) is not None


def is_unnatural(signs: list[Sign]) -> bool:
    return sum(s.points for s in signs) >= MIN_POINTS
