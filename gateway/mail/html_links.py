"""Anchors in an HTML body and whether their visible text names another host than their
href (IPA SME sample 7.4, メールの本文 ④). Uses the standard library's html.parser, which
tolerates the broken HTML that mail clients produce."""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urlsplit

# Text that reads as a URL or bare host name: optional scheme, host with a TLD, optional path.
_HOSTLIKE = re.compile(
    r"^\s*(?:(?:https?|ftp)://)?(?:[^\s/@]+@)?((?:[\w\u00a0-\uffff-]+[.．。])+[a-z\u00a0-\uffff]{2,63})\.?(?::\d+)?(?:[/?#]\S*)?\s*$",
    re.I,
)
_URL_IN_TEXT = re.compile(r"\bhttps?://([^\s/?#<>\"'()\[\]{}|\\^`:]+)", re.I)


@dataclass(frozen=True)
class Anchor:
    text: str
    href: str


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[Anchor] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._close()
            self._href = dict(attrs).get("href") or ""
            self._text = []
        elif tag == "area":
            href = dict(attrs).get("href")
            if href:
                self.anchors.append(Anchor(dict(attrs).get("alt") or "", href))

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self._close()

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def _close(self) -> None:
        if self._href is not None:
            self.anchors.append(Anchor(" ".join("".join(self._text).split()), self._href))
        self._href = None
        self._text = []

    def close(self) -> None:
        super().close()
        self._close()


def anchors(html: str) -> list[Anchor]:
    parser = _AnchorParser()
    parser.feed(html)
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
