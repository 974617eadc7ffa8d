"""HTML mail to plain text, for the neutralize action (IPA SME sample 7.3: 受信メールのHTML表示
を禁止し、テキスト形式に変換して表示). Scripts, styles and everything else active are dropped; each
link is written as ``text <href>`` so a reader sees where it really goes.

Hand-written on html.parser rather than a dependency: the common converter (html2text) is
GPL-licensed, and we need only block structure, links and entity decoding.
"""

from __future__ import annotations

from html.parser import HTMLParser

import re2

_BLOCK = frozenset({
    "p", "div", "br", "tr", "li", "ul", "ol", "table", "h1", "h2", "h3", "h4", "h5", "h6",
    "blockquote", "pre", "hr", "section", "article", "header", "footer", "dt", "dd", "form",
})
# Blanks folded by str methods, not a regular expression: linear on any input (issue #15),
# and without the per-match cost RE2's Python wrapper has on a million short runs.
_BLANKS = str.maketrans("\t\r\f\v", "    ")
# A numeric character reference of many digits: html.unescape converts it with int(), which
# raises ValueError past 4,300 digits (and a 100k-digit int costs quadratic time). Rewritten
# before parsing, keeping its meaning: the value without leading zeros, or U+FFFD (what the
# parser gives for any value above U+10FFFF) when it is longer than any code point.
_LONG_CHARREF = re2.compile(r"&#(?:([xX])([0-9a-fA-F]{12,})|([0-9]{12,}));?")


def _short_charref(m) -> str:
    hex_mark, hex_digits, dec_digits = m.group(1), m.group(2), m.group(3)
    digits = (hex_digits if hex_mark else dec_digits).lstrip("0") or "0"
    if len(digits) > 8:
        return "\ufffd"
    return f"&#{hex_mark or ''}{digits};"


def defuse_charrefs(html: str) -> str:
    """``html`` with every overlong numeric character reference shortened (linear, RE2)."""
    return _LONG_CHARREF.sub(_short_charref, html) if "&#" in html else html


_SKIP = frozenset({"script", "style", "head", "title", "noscript", "template", "object", "iframe", "svg", "math"})


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0
        self._href: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            self._skip += 1
        elif tag in _BLOCK:
            self.out.append("\n")
            if tag == "li":
                self.out.append("・")
            if tag == "hr":
                self.out.append("-" * 20 + "\n")
        elif tag == "a":
            self._href.append(dict(attrs).get("href"))
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt and not self._skip:
                self.out.append(f"[{alt}]")
        elif tag in ("td", "th"):
            self.out.append("\t")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP:
            return
        self.handle_starttag(tag, attrs)
        if tag == "a":
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK:
            self.out.append("\n")
        elif tag == "a" and self._href:
            href = self._href.pop()
            if href and not self._skip and not href.startswith("#"):
                self.out.append(f" <{href.strip()}>")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.out.append(data)


def html_to_text(html: str) -> str:
    parser = _TextParser()
    parser.feed(defuse_charrefs(html))
    parser.close()
    text = "".join(parser.out)
    lines: list[str] = []
    for raw_line in text.split("\n"):
        line = " ".join(w for w in raw_line.translate(_BLANKS).split(" ") if w).strip()
        if line or (lines and lines[-1]):   # at most one blank line in a row
            lines.append(line)
    return "\n".join(lines).strip() + "\n"
