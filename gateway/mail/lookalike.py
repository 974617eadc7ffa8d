"""Does a domain look like a protected one (IPA SME sample 7.4, メールの本文 ③: a URL that
contains part of a real name)? Three tests against each protected domain:

* confusables: the Unicode "skeleton" (NFKC, case-fold, each character mapped to the ASCII
  character it is confusable with) equals the protected domain or ends with it;
* punycode: ``xn--`` labels are decoded first, so an IDN spoof is judged by what it shows;
* edit distance: the host's trailing labels are within ``max_distance`` edits (optimal string
  alignment: insert, delete, substitute, swap neighbours) of the protected domain;
* containment: the protected domain or one of its distinctive labels appears inside a host
  that is not under the protected domain (``kanmon-city.example``, ``city.kanmon.lg.jp.evil.example``).

The confusables table is the Unicode TR39 data shipped by the confusable-homoglyphs package.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from confusable_homoglyphs.confusables import confusables_data

# Multi-character ASCII look-alikes that TR39 data maps the other way round (m -> rn).
_ASCII_SEQUENCES = (("rn", "m"), ("vv", "w"), ("cl", "d"))
# Single ASCII characters that are commonly swapped for letters.
_ASCII_DIGITS = str.maketrans({"0": "o", "1": "l", "|": "l", "5": "s", "3": "e", "$": "s", "@": "a"})
_GENERIC_LABELS = frozenset({
    "www", "mail", "city", "pref", "town", "vill", "info", "login", "secure", "portal",
    "co", "go", "lg", "ne", "or", "ac", "ed", "gr", "ad", "jp", "com", "net", "org", "gov",
    "example", "invalid", "localhost",  # RFC 2606 reserved names, used in documentation and tests
})


@lru_cache(maxsize=1)
def _to_ascii_table() -> dict[str, str]:
    """Map each non-ASCII character to one ASCII letter/digit it is confusable with."""
    table: dict[str, str] = {}
    for char, entries in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        for entry in entries:
            target = entry["c"].strip("\u200e\u200f")
            if len(target) == 1 and target.isascii() and target.isalnum():
                table[char] = target.lower()
                break
    return table


def decode_idna(host: str) -> tuple[str, bool]:
    """Decode ``xn--`` labels; returns (unicode host, whether any label was punycode)."""
    labels = host.lower().rstrip(".").split(".")
    out = []
    had = False
    for label in labels:
        if label.startswith("xn--"):
            try:
                out.append(label[4:].encode("ascii").decode("punycode"))
                had = True
                continue
            except (UnicodeError, ValueError):
                pass
        out.append(label)
    return ".".join(out), had


def skeleton(text: str) -> str:
    """What ``text`` looks like, reduced to lower-case ASCII where a look-alike exists."""
    table = _to_ascii_table()
    norm = unicodedata.normalize("NFKC", text).casefold()
    mapped = "".join(table.get(ch, ch) for ch in norm)
    # Separators that render like a dot.
    mapped = mapped.replace("。", ".").replace("．", ".").replace("｡", ".")
    mapped = mapped.translate(_ASCII_DIGITS)
    for seq, repl in _ASCII_SEQUENCES:
        mapped = mapped.replace(seq, repl)
    return mapped


def edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance, stopping early above ``limit``.

    Hand-written (a dozen lines) instead of a compiled dependency: the strings are host names
    of at most 253 characters and we only care whether the distance is tiny.
    """
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


@dataclass(frozen=True)
class Lookalike:
    protected: str
    how: str        # "confusable" | "punycode" | "edit-distance" | "contains"
    shown_as: str   # the decoded host, as a reader would see it
    distance: int = 0


def is_under(host: str, domain: str) -> bool:
    return host == domain or host.endswith("." + domain)


def find_lookalike(host: str, protected_domains: tuple[str, ...], max_distance: int) -> Lookalike | None:
    host = host.strip().lower().rstrip(".")
    if not host or not protected_domains:
        return None
    if any(is_under(host, p) for p in protected_domains):
        return None
    shown, had_punycode = decode_idna(host)
    skel = skeleton(shown)
    for protected in protected_domains:
        p_skel = skeleton(protected)
        if is_under(skel, p_skel) and not is_under(host, protected):
            return Lookalike(protected, "punycode" if had_punycode else "confusable", shown)
        labels = skel.split(".")
        width = protected.count(".") + 1
        tail = ".".join(labels[-width:])
        if len(p_skel) >= 5 and max_distance > 0:
            dist = edit_distance(tail, p_skel, max_distance)
            if dist <= max_distance:
                raw_tail = ".".join(shown.split(".")[-width:])
                real = edit_distance(raw_tail, protected, max_distance + 3)
                return Lookalike(protected, "punycode" if had_punycode else "edit-distance", shown, max(real, dist, 1))
    # Containment last, so a closer match (a typo of one protected domain) is reported first.
    for protected in protected_domains:
        if skeleton(protected) in skel:
            return Lookalike(protected, "contains", shown)
        for label in protected.split("."):
            if len(label) >= 5 and label not in _GENERIC_LABELS and skeleton(label) in skel:
                return Lookalike(protected, "contains", shown)
    return None
