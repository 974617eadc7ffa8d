"""Getting a feed's bytes: HTTP(S) with a conditional request (If-None-Match /
If-Modified-Since), a timeout on the whole transfer, and a size cap; or a local file or
UT1 directory through the bounded file reader. Failures raise ``FeedRefused`` with the
metrics reason (unreachable, http-status, too-large)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from gateway.feeds.checks import FeedRefused
from gateway.i18n import Text
from gateway.yamlsource import SourceErrors, read_bytes_file

T_UNREACHABLE = Text("フィードを取得できません: {e}", "the feed cannot be fetched: {e}")
T_STATUS = Text("フィードのサーバーが HTTP {status} を返しました", "the feed server answered HTTP {status}")
T_TOO_LARGE = Text("フィードが大きすぎます（上限 {limit} バイト）", "the feed is too large (at most {limit} bytes)")
T_TIMEOUT = Text("フィードの取得が {s} 秒以内に終わりませんでした", "fetching the feed took longer than {s} s")
T_LOCAL = Text("フィードのファイルを読めません: {e}", "the feed file cannot be read: {e}")

USER_AGENT = "kanmon-feeds/1"


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects stay on http(s): urllib would otherwise follow one to ftp://."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-HTTP URL refused", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# Proxies from the environment are not used: the gateway fetches its feeds itself.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _HttpOnlyRedirects())


@dataclass
class Fetched:
    body: bytes | None  # None: 304 Not Modified
    etag: str | None = None
    last_modified: str | None = None


def fetch_http(url: str, timeout: float, max_bytes: int, etag: str | None = None,
               last_modified: str | None = None) -> Fetched:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    deadline = time.monotonic() + timeout
    try:
        with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise FeedRefused("unreachable", T_TIMEOUT.format(s=timeout))
                chunk = resp.read(min(1 << 16, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise FeedRefused("too-large", T_TOO_LARGE.format(limit=max_bytes))
            return Fetched(b"".join(chunks), resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return Fetched(None, exc.headers.get("ETag") or etag, exc.headers.get("Last-Modified") or last_modified)
        raise FeedRefused("http-status", T_STATUS.format(status=exc.code)) from None
    except FeedRefused:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        detail = getattr(exc, "reason", None) or exc
        raise FeedRefused("unreachable", T_UNREACHABLE.format(e=str(detail)[:200])) from None


def read_local(path: Path, max_bytes: int) -> bytes:
    try:
        return read_bytes_file(path, max_bytes)
    except SourceErrors as exc:
        err = exc.errors[0]
        reason = "too-large" if "too large" in err.message else "unreachable"
        raise FeedRefused(reason, Text(T_LOCAL.ja.format(e=f"{path}: {err.ja or err.message}"),
                                       T_LOCAL.en.format(e=f"{path}: {err.message}"))) from None


def fetch_bytes(url: str, timeout: float, max_bytes: int, base_dir: Path | None = None) -> bytes:
    """An unconditional fetch of a small companion file (a signature)."""
    if url.startswith(("http://", "https://")):
        return fetch_http(url, timeout, max_bytes).body or b""
    path = Path(url)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return read_local(path, max_bytes)
