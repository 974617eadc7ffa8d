"""A feed as the policy declares it (``lists: NAME: {url: ..., format: ...}``). Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from gateway.feeds.formats import ALL
from gateway.hostname import normalize_host
from gateway.i18n import Text
from gateway.policy.conditions import ConditionError, parse_duration_seconds
from gateway.policy.lists import valid_domain

DEFAULT_REFRESH = 6 * 3600
DEFAULT_TIMEOUT = 30
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SHRINK = 0.5

T_FILE_OR_URL = Text("file（ローカルのリスト）か url（フィード）のどちらか一方を書いてください",
                     "give either file (a local list) or url (a feed), not both or neither")
T_CATEGORIES = Text("categories は format: ut1 のときだけ、かつ必ず書きます",
                    "categories is required with format: ut1 and only allowed with it")
T_FEED_ONLY = Text("{key} はフィード（url）でだけ使えます", "{key} is only used with a feed (url)")
T_DURATION = Text("期間として正しくありません（例: 6h, 30m, 3600）: {v}", "not a duration (e.g. 6h, 30m, 3600): {v}")
T_ALLOW_HOST = Text("ドメイン名として正しくありません: {v}", "not a domain name: {v}")
T_ALLOW_DATE = Text("日付として正しくありません（YYYY-MM-DD）: {v}", "not a date (write YYYY-MM-DD): {v}")
T_KEY = Text("公開鍵として正しくありません（Ed25519 の 32 バイトを base64 で）: {e}",
             "not a public key (32 Ed25519 bytes in base64): {e}")

# The name is also a file name under the state dir.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
T_NAME = Text("フィード名には英数字と _ . - だけを使えます（64 文字まで）",
              "a feed name has only letters, digits, _ . - (at most 64 characters)")

FEED_KEYS = ("url", "categories", "refresh", "timeout", "max_bytes", "sha256", "public_key", "signature_url",
             "max_shrink", "allow", "accept_public_suffixes")


@dataclass(frozen=True)
class FeedException:
    """An ``allow`` entry: ``host`` and its sub-domains are not in this feed until the end of
    the ``expires`` day (policy time zone)."""
    host: str
    reason: str
    expires: date
    expires_at: datetime  # aware UTC


@dataclass(frozen=True)
class FeedSpec:
    name: str
    url: str
    format: str
    categories: tuple[str, ...]
    refresh: int
    timeout: int
    max_bytes: int
    sha256: str | None
    public_key: str | None
    signature_url: str | None
    max_shrink: float
    match: str
    allow: tuple[FeedException, ...]
    accept_public_suffixes: frozenset[str] = frozenset()

    @property
    def is_http(self) -> bool:
        return self.url.startswith(("http://", "https://"))

    def list_names(self) -> tuple[str, ...]:
        """The list names rules may use: the feed (every category) and ``name/category``."""
        return (self.name,) + tuple(f"{self.name}/{c}" for c in self.categories if c != ALL)


def feed_from_spec(name: str, spec: dict[str, Any], tz: Any, err) -> FeedSpec | None:
    """``err(key_path, Text)`` collects problems; None when the entry is not a feed."""
    if "url" not in spec:
        for key in FEED_KEYS:
            if key in spec:
                err((key,), T_FEED_ONLY.format(key=key))
        if "file" not in spec:
            err(("file",), T_FILE_OR_URL)
        return None
    if "file" in spec:
        err(("file",), T_FILE_OR_URL)
    if not _NAME.fullmatch(name):
        err(("url",), T_NAME)
    fmt = spec.get("format", "domains")
    fmt = "domains" if fmt == "auto" else fmt
    categories = tuple(spec.get("categories") or ())
    if (fmt == "ut1") != bool(categories):
        err(("categories",), T_CATEGORIES)
    durations = {}
    for key, default in (("refresh", DEFAULT_REFRESH), ("timeout", DEFAULT_TIMEOUT)):
        try:
            durations[key] = parse_duration_seconds(spec[key]) if key in spec else default
        except ConditionError:
            err((key,), T_DURATION.format(v=repr(spec[key])[:40]))
            durations[key] = default
    public_key = spec.get("public_key")
    if public_key is not None:
        from gateway.feeds.checks import public_key_from_text
        try:
            public_key_from_text(public_key)
        except ValueError as exc:
            err(("public_key",), T_KEY.format(e=exc))
    allow = []
    for i, entry in enumerate(spec.get("allow") or ()):
        host = normalize_host(str(entry["host"]))
        if host is None or not valid_domain(host):
            err(("allow", i, "host"), T_ALLOW_HOST.format(v=repr(entry["host"])[:80]))
            continue
        value = entry["expires"]
        if isinstance(value, datetime):
            value = value.date()
        if isinstance(value, str):
            try:
                value = date.fromisoformat(value)
            except ValueError:
                value = None
        if not isinstance(value, date):
            err(("allow", i, "expires"), T_ALLOW_DATE.format(v=repr(entry["expires"])[:40]))
            continue
        end = datetime.combine(value + timedelta(days=1), time(0, 0), tzinfo=tz).astimezone(timezone.utc)
        allow.append(FeedException(host, str(entry["reason"]), value, end))
    return FeedSpec(
        name=name, url=spec["url"], format=fmt, categories=categories if fmt == "ut1" else (ALL,),
        refresh=durations["refresh"], timeout=durations["timeout"],
        max_bytes=int(spec.get("max_bytes", DEFAULT_MAX_BYTES)),
        sha256=spec.get("sha256"), public_key=public_key,
        signature_url=spec.get("signature_url") or (spec["url"] + ".sig" if public_key else None),
        max_shrink=float(spec.get("max_shrink", DEFAULT_MAX_SHRINK)), match=spec.get("match", "suffix"),
        allow=tuple(allow),
        accept_public_suffixes=frozenset(filter(None, (normalize_host(str(v)) for v in spec.get("accept_public_suffixes") or ()))),
    )
