"""Anchors in an HTML body and whether their visible text names another host than their
href (IPA SME sample 7.4, メールの本文 ④). Uses the standard library's html.parser, which
tolerates the broken HTML that mail clients produce."""

from __future__ import annotations

from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urlsplit

import re2

from gateway.mail.html_text import defuse_charrefs
from gateway.mail.limits import RE2_SPACE as _WS
from gateway.mail.limits import MessageLimits, too_complex

# Text that reads as a URL or bare host name: optional scheme, host with a TLD, optional path.
# RE2, never Python's re: anchor text is attacker-chosen and the nested repetition below
# backtracks exponentially in a backtracking engine (a 402-byte mail stalled the gateway).
# RE2's \s and \w are ASCII-only: _WS spells out the Unicode spaces Python's \s matched, and
# \x{a0}-\x{ffff} already covered the non-ASCII letters of Python's \w.
_HOSTLIKE = re2.compile(
    r"(?i)^[" + _WS + r"]*(?:(?:https?|ftp)://)?(?:[^" + _WS + r"/@]+@)?((?:[\w\x{a0}-\x{ffff}-]+[.．。])+[a-z\x{a0}-\x{ffff}]{2,63})"
    r"\.?(?::\d+)?(?:[/?#][^" + _WS + r"]*)?[" + _WS + r"]*$"
)
# Elements that never hold content, or whose end tag is usually left out: not counted as
# nesting (a mail with a thousand <p> or <br> is ordinary, a thousand open <div> is not).
_NO_NESTING = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track",
    "wbr", "p", "li", "dt", "dd", "tr", "td", "th", "option", "a",
})
_URL_IN_TEXT = re2.compile(r"(?i)\bhttps?://([^" + _WS + r"/?#<>\"'()\[\]{}|\\^`:]+)")


@dataclass(frozen=True)
class Anchor:
    text: str
    href: str


class _AnchorParser(HTMLParser):
    def __init__(self, limits: MessageLimits) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[Anchor] = []
        self._href: str | None = None
        self._text: list[str] = []
        self._text_len = 0
        self._limits = limits
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _NO_NESTING:
            self._depth += 1
            if self._depth > self._limits.max_html_depth:
                raise too_complex(f"HTML の入れ子が {self._limits.max_html_depth} 段を超える",
                                  f"HTML nested deeper than {self._limits.max_html_depth} elements")
        if tag == "a":
            self._close()
            self._href = dict(attrs).get("href") or ""
            self._text = []
        elif tag == "area":
            href = dict(attrs).get("href")
            if href:
                self.anchors.append(Anchor(dict(attrs).get("alt") or "", href))

    def handle_endtag(self, tag: str) -> None:
        if tag not in _NO_NESTING and self._depth:
            self._depth -= 1
        if tag == "a":
            self._close()

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text_len += len(data)
            if self._text_len > self._limits.max_anchor_text:
                raise too_complex(f"リンクの表示文字列が {self._limits.max_anchor_text} 文字を超える",
                                  f"link text longer than {self._limits.max_anchor_text} characters")
            self._text.append(data)

    def _close(self) -> None:
        if self._href is not None:
            self.anchors.append(Anchor(" ".join("".join(self._text).split()), self._href))
        self._href = None
        self._text = []
        self._text_len = 0

    def close(self) -> None:
        super().close()
        self._close()


def anchors(html: str, limits: MessageLimits = MessageLimits()) -> list[Anchor]:
    """Raises MessageTooComplex over the HTML caps (size, nesting, text of one link)."""
    if len(html) > limits.max_html_bytes:
        raise too_complex(f"HTML 本文が {limits.max_html_bytes} 文字を超える",
                          f"HTML body longer than {limits.max_html_bytes} characters")
    parser = _AnchorParser(limits)
    parser.feed(defuse_charrefs(html))
    parser.close()
    return parser.anchors


def url_host(url: str) -> str | None:
    """Lower-case host of an absolute http(s) URL, or None."""
    try:
        parts = urlsplit(url.strip())
        if parts.scheme.lower() not in ("http", "https"):
            return None
        host = parts.hostname
    except ValueError:
        return None
    return host.rstrip(".").lower() if host else None


def text_host(text: str) -> str | None:
    """The host a piece of anchor text names, if it reads like a URL or host."""
    m = _HOSTLIKE.match(text)
    if not m:
        return None
    return m.group(1).replace("．", ".").replace("。", ".").lower().rstrip(".")


def hosts_in_text(text: str) -> list[str]:
    return [h.lower().rstrip(".") for h in _URL_IN_TEXT.findall(text)]


def _comparable(host: str) -> str:
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    return host[4:] if host.startswith("www.") else host


def mismatched(anchor: Anchor) -> tuple[str, str] | None:
    """(host the text shows, host the link goes to) when they differ."""
    shown = text_host(anchor.text)
    target = url_host(anchor.href)
    if not shown or not target:
        return None
    if _comparable(shown) == _comparable(target):
        return None
    return shown, target
