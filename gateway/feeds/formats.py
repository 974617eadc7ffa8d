"""Feed text -> entries. Pure. Every line of a feed is written by someone else: lines are
split by one linear ``str`` scan, a line longer than ``MAX_LIST_LINE_CHARS`` is skipped
(counted), no regular expression that can backtrack is applied to a line (the domain check
is the bounded label pattern of policy/lists.py on at most 253 characters), and a feed with
more than ``MAX_FEED_ENTRIES`` entries is refused as a whole.

Unlike a list file (policy/lists.py: one bad line stops the policy), a feed is not ours to
fix: a line this code does not take is *skipped* and counted, and the feed as a whole is
judged by the sanity limits in ``checks``.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass, field
from ipaddress import ip_address

from gateway.i18n import Text
from gateway.hostname import normalize_host
from gateway.policy.lists import _HOSTS_SELF_NAMES, MAX_LIST_LINE_CHARS, valid_domain

FORMATS = ("ut1", "domains", "hosts", "abp")
ALL = "all"  # the one category of a feed that is not in the UT1 layout
MAX_FEED_ENTRIES = 5_000_000  # all categories together; UT1 in full is about 4.5 million
MAX_URL_ENTRIES = 50_000  # UT1 ``urls`` lines per category: each becomes one RE2 pattern
MAX_TAR_MEMBERS = 20_000  # UT1 has a few hundred files
MAX_UNPACKED_BYTES = 512 * 1024 * 1024  # a gzip bomb stops here (members not taken are streamed past)
MAX_MEMBER_BYTES = 64 * 1024 * 1024  # one kept <category>/domains file, as a list file (MAX_LIST_BYTES)


class FeedFormatError(ValueError):
    """The feed as a whole cannot be read (not a tar archive, too large unpacked, too many
    entries). ``reason`` is the metrics label; ``text`` the message in Japanese and English."""

    def __init__(self, reason: str, text: Text):
        super().__init__(text.en)
        self.reason = reason
        self.text = text


@dataclass
class Category:
    domains: set[str] = field(default_factory=set)  # the name and its sub-domains
    exact: set[str] = field(default_factory=set)  # exactly the name (hosts files)
    urls: set[str] = field(default_factory=set)  # UT1 urls: "host/path" prefixes
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.domains) + len(self.exact) + len(self.urls)


def lines(text: str):
    """Lines without a regular expression: \\r\\n, \\r and \\n end a line."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def _host(raw: str) -> str | None:
    if len(raw) > 253 * 4:  # before normalizing: IDNA mapping of a long label costs time
        return None
    host = normalize_host(raw)
    if host is None or len(host) > 253 or not valid_domain(host):
        return None
    return host


def parse_text(text: str, fmt: str, into: Category | None = None, kind: str = "domains") -> Category:
    """One feed file. ``fmt``: domains, hosts or abp (``kind`` "urls": a UT1 urls file)."""
    cat = into if into is not None else Category()
    for line in lines(text):
        if len(line) > MAX_LIST_LINE_CHARS:
            cat.skipped += 1
            continue
        s = line.strip()
        if not s:
            continue
        if s[0] == "#":
            if fmt == "abp" and s[1:2] in ("#", "@", "?", "$"):
                cat.skipped += 1  # a cosmetic rule for every site (##.ad, #@#.ad): not a host block
            continue
        if fmt == "abp":
            if s[0] == "!" or (s[0] == "[" and s[-1] == "]"):
                continue  # comment, "[Adblock Plus 2.0]" header
            # Only "||domain^": options ($third-party), exceptions (@@), cosmetic (##) and
            # path rules are not host blocks; taking them as one would block too much.
            if s.startswith("||") and s.endswith("^") and len(s) > 3:
                body = s[2:-1]
                if not any(c in body for c in "/^$|*"):
                    host = _host(body)
                    if host is not None:
                        cat.domains.add(host)
                        continue
            cat.skipped += 1
        elif fmt == "hosts":
            fields = s.split()
            hash_at = next((i for i, f in enumerate(fields) if f.startswith("#")), len(fields))
            fields = fields[:hash_at]
            try:
                ip_address(fields[0])
            except (ValueError, IndexError):
                cat.skipped += 1
                continue
            names = [f for f in fields[1:] if f.lower() not in _HOSTS_SELF_NAMES]
            if len(fields) < 2:
                cat.skipped += 1
            for raw in names:
                host = _host(raw)
                if host is None:
                    cat.skipped += 1
                else:
                    cat.exact.add(host)
        elif kind == "urls":
            host_part, slash, path = s.partition("/")
            host = _host(host_part) if slash else None
            if host is None or " " in s or "\t" in s or len(cat.urls) >= MAX_URL_ENTRIES:
                cat.skipped += 1
            else:
                cat.urls.add(host + "/" + path)
        else:
            hash_at = s.find("#")
            if hash_at != -1:
                s = s[:hash_at].rstrip()
            host = _host(s) if (" " not in s and "\t" not in s and "/" not in s and "*" not in s) else None
            if host is None:
                cat.skipped += 1
            else:
                cat.domains.add(host)
    return cat


def parse_ut1_files(files: dict[tuple[str, str], str], categories: tuple[str, ...]) -> dict[str, Category]:
    """``files``: (category, "domains" | "urls") -> text. Only the asked categories."""
    out: dict[str, Category] = {}
    for cat_name in categories:
        cat = Category()
        for kind in ("domains", "urls"):
            text = files.get((cat_name, kind))
            if text is not None:
                parse_text(text, "domains", cat, kind)
        out[cat_name] = cat
    return out


class _Capped(io.RawIOBase):
    """A reader that refuses to give more than ``limit`` bytes (a gzip bomb stops here)."""

    def __init__(self, inner, limit: int):
        self.inner, self.left = inner, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(min(len(b), self.left + 1))
        if len(data) > self.left:
            raise FeedFormatError("too-large", Text(f"展開すると {MAX_UNPACKED_BYTES} バイトを超えます",
                                                    f"the archive unpacks to more than {MAX_UNPACKED_BYTES} bytes"))
        self.left -= len(data)
        b[:len(data)] = data
        return len(data)


def ut1_files_from_tar(data: bytes, categories: tuple[str, ...],
                       unpacked_limit: int = MAX_UNPACKED_BYTES) -> dict[tuple[str, str], str]:
    """The ``<category>/domains`` and ``<category>/urls`` members of a UT1 blacklists.tar.gz
    (any leading directory, e.g. ``blacklists/``), for the asked categories only. Streamed
    (mode ``r|``): nothing is written to disk, nothing but those members is kept."""
    wanted = set(categories)
    files: dict[tuple[str, str], str] = {}
    try:
        raw = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else io.BytesIO(data)
        stream = io.BufferedReader(_Capped(raw, unpacked_limit), 1 << 16)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_TAR_MEMBERS:
                    raise FeedFormatError("format", Text(f"アーカイブのファイルが {MAX_TAR_MEMBERS} 個を超えます",
                                                         f"more than {MAX_TAR_MEMBERS} files in the archive"))
                parts = member.name.split("/")
                if len(parts) < 2 or not member.isfile():
                    continue
                cat_name, kind = parts[-2], parts[-1]
                if cat_name not in wanted or kind not in ("domains", "urls"):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                data = f.read(MAX_MEMBER_BYTES + 1)
                if len(data) > MAX_MEMBER_BYTES:
                    raise FeedFormatError("too-large", Text(f"{cat_name}/{kind} が {MAX_MEMBER_BYTES} バイトを超えます",
                                                            f"{cat_name}/{kind} is larger than {MAX_MEMBER_BYTES} bytes"))
                files[(cat_name, kind)] = data.decode("utf-8", "replace")
    except FeedFormatError:
        raise
    except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise FeedFormatError("format", Text(f"UT1 のアーカイブ (tar.gz) ではありません: {type(exc).__name__}",
                                             f"not a UT1 archive (tar.gz): {type(exc).__name__}")) from None
    return files
