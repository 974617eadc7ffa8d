"""Han characters Japanese does not use (IPA SME sample 7.4, 本文 ② 日本語では使用されない漢字
(繁体字・簡体字)) and punctuation only Chinese text uses.

A Han character is "Japanese" when one of the Japanese codecs can write it: JIS X 0213
(Python's ``shift_jis_2004`` and ``euc_jis_2004``) or Windows-31J (``cp932``: its NEC/IBM
extensions, e.g. 髙 in 髙橋, are in everyday Japanese use and not in JIS X 0213). Decided by the
codecs, not a hand list. Simplified forms (这, 请, 们, 说) fail all three; many traditional
forms (學, 國, 體) are JIS kanji (旧字体), so traditional Chinese is caught mostly by its
simplified-only or Taiwan-only characters and its punctuation.

One rare character in a person's or place name (𠮷 of 𠮷野家 is outside these codecs) must not
fire: the check needs ``min_chars`` distinct such characters (default 3), or one of them
together with Chinese-only punctuation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

# Blocks of CJK unified and compatibility ideographs (Unicode 15.1).
_HAN_RANGES = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2EBEF),
    (0x2F800, 0x2FA1F), (0x30000, 0x323AF),
)
_JAPANESE_CODECS = ("shift_jis_2004", "euc_jis_2004", "cp932")
# Punctuation Chinese writing uses and Japanese does not: book-title marks 《》 (Japanese: 『』),
# the full-width semicolon, the Chinese dash —— (two U+2014; Japanese writes ―― U+2015), and the middle dot U+00B7 between Han names
# (Japanese uses ・ U+30FB). Full-width ，and ： are left out: Japanese official writing
# (公用文) has used ， and ： for decades.
CHINESE_PUNCTUATION = ("《", "》", "；", "\u2014\u2014")


def is_han(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _HAN_RANGES)


@functools.lru_cache(maxsize=65536)
def is_japanese_han(ch: str) -> bool:
    """True if a Japanese codec can write ``ch`` (the codecs decide, per character, cached)."""
    for codec in _JAPANESE_CODECS:
        try:
            ch.encode(codec)
            return True
        except UnicodeEncodeError:
            continue
    return False


@dataclass(frozen=True)
class HanziReport:
    chars: tuple[str, ...]          # distinct non-Japanese Han characters, in first-seen order
    punctuation: tuple[str, ...]    # Chinese-only punctuation found
    count: int                      # occurrences of the characters

    def fires(self, min_chars: int) -> bool:
        return len(self.chars) >= min_chars or (bool(self.chars) and bool(self.punctuation))


def non_japanese_han(text: str) -> HanziReport:
    """Linear in ``text``: one codec call over the whole text when it is all Japanese-writable
    (the common case), else one look-up per distinct character."""
    try:
        text.encode("cp932")
        return HanziReport((), _punctuation(text), 0)   # everything writable in Windows-31J
    except UnicodeEncodeError:
        pass
    chars: dict[str, int] = {}
    for ch in text:
        if ch in chars:
            chars[ch] += 1
        elif ord(ch) >= 0x3400 and is_han(ch) and not is_japanese_han(ch):
            chars[ch] = 1
    return HanziReport(tuple(chars), _punctuation(text), sum(chars.values()))


def _punctuation(text: str) -> tuple[str, ...]:
    found = [p for p in CHINESE_PUNCTUATION if p in text]
    # A middle dot between two Han characters (a Chinese name: 欧阳·修), not in Latin text.
    start = text.find("\u00b7")
    while start != -1:
        if 0 < start < len(text) - 1 and is_han(text[start - 1]) and is_han(text[start + 1]):
            found.append("\u00b7")
            break
        start = text.find("\u00b7", start + 1)
    return tuple(found)
