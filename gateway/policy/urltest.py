"""Testing URLs against a policy: the one code path of `kanmon policy test`, `kanmon policy
diff --urls` and the console's policy page (issue #21). Pure: a snapshot, URLs, a device.

``url_warning`` says what is wrong with a URL as typed; ``judge_urls`` gives each URL its
verdict (or none, when there is nothing to judge); ``verdict_changes`` lists the URLs whose
action differs between two snapshots."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from gateway.i18n import Text
from gateway.policy.query import DeviceContext, PolicyQuery, query_for_url
from gateway.policy.snapshot import PolicySnapshot
from gateway.verdict import Stage, Verdict

T_URL_EMPTY = Text("警告: 空の URL は判定できません（読み飛ばしました）", "warning: an empty URL cannot be judged (skipped)")
T_URL_NO_HOST = Text("警告: ホスト名のない URL は判定できません（読み飛ばしました）: {url}",
                     "warning: a URL without a host cannot be judged (skipped): {url}")
T_URL_SCHEME = Text("警告: 知らないスキーム {scheme!r} です（使えるのは {known}）。ホスト名だけで推測した判定です: {url}",
                    "warning: unknown scheme {scheme!r} (known: {known}); the verdict is a guess from the host alone: {url}")
T_URL_GUESSED = Text("警告: スキームがないため https:// として判定しました: {url}",
                     "warning: no scheme; judged as https://{url}")
KNOWN_SCHEMES = ("http", "https", "ws", "wss")   # what the gateway's proxy sees (gateway/policy/query.py)
MAX_TEST_URLS = 1000


@dataclass(frozen=True)
class RequestShape:
    """What is known about the request besides its URL. Default stage: the response, where
    every fact is known, so the answer is final (a response without ``content_type``
    matches no content-type condition)."""

    stage: Stage = Stage.RESPONSE
    method: str = "GET"
    content_type: str | None = None           # response Content-Type
    request_content_type: str | None = None
    body_size: int | None = None              # request body size in bytes


@dataclass(frozen=True)
class UrlResult:
    url: str
    kind: str                  # "ok", "shorthand", "guess", "skip" (see url_warning)
    warning: Text | None
    verdict: Verdict | None    # None: not judged (kind "skip")


def url_warning(url: str) -> tuple[Text | None, str]:
    """(warning or None, kind) for one URL given to `policy test`. Kinds: "ok"; "shorthand"
    (no scheme: judged as https://, the documented shorthand, exit 0); "guess" (a scheme the
    gateway never sees, ``htps://``: a typo, the verdict is a guess from the host, exit 2);
    "skip" (empty or no host: not judged, exit 2)."""
    text = url.strip()
    if not text:
        return T_URL_EMPTY, "skip"
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    host = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0].rpartition("@")[2]
    if not host or host.startswith(":"):
        return T_URL_NO_HOST.format(url=url), "skip"
    if not sep:
        return T_URL_GUESSED.format(url=url), "shorthand"
    if scheme.lower() not in KNOWN_SCHEMES:
        return T_URL_SCHEME.format(scheme=scheme, known=", ".join(KNOWN_SCHEMES), url=url), "guess"
    return None, "ok"


def read_urls(lines: Iterable[str]) -> list[str]:
    """One URL per line; blank lines and ``#`` comments left out."""
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


def policy_query(url: str, device: DeviceContext, shape: RequestShape, now: datetime) -> PolicyQuery:
    q = query_for_url(url, device, stage=shape.stage, method=shape.method, now=now,
                      response_content_type=shape.content_type, request_content_type=shape.request_content_type,
                      body_size=shape.body_size)
    if q.stage in (Stage.DNS, Stage.TLS):
        q = q._replace(url=None, scheme=None, method=None)
    return q


def decide(snap: PolicySnapshot, url: str, device: DeviceContext, shape: RequestShape, now: datetime) -> Verdict:
    """``snap.decide(policy_query(...))``; at the HTTP stages through ``decide_url``."""
    if shape.stage in (Stage.DNS, Stage.TLS):
        return snap.decide(policy_query(url, device, shape, now))
    extra = {key: value for key, value in (("response_content_type", shape.content_type),
                                           ("request_content_type", shape.request_content_type),
                                           ("body_size", shape.body_size)) if value is not None}
    return snap.decide_url(url, device, shape.stage, shape.method, now, **extra)


def judge_urls(snap: PolicySnapshot, urls: Iterable[str], device: DeviceContext, shape: RequestShape,
               now: datetime) -> list[UrlResult]:
    """Each URL with its warning and verdict; a URL with nothing to judge gets no verdict."""
    results = []
    for url in urls:
        warning, kind = url_warning(url)
        if warning is not None and kind == "shorthand" and shape.stage in (Stage.DNS, Stage.TLS):
            warning = None      # a bare host is what the DNS and TLS stages see anyway
        verdict = None if kind == "skip" else decide(snap, url, device, shape, now)
        results.append(UrlResult(url, kind, warning, verdict))
    return results


@dataclass(frozen=True)
class VerdictChange:
    url: str
    old: Verdict
    new: Verdict


def verdict_changes(old: PolicySnapshot, new: PolicySnapshot, urls: Iterable[str], device: DeviceContext,
                    shape: RequestShape, now: datetime) -> list[VerdictChange]:
    """The URLs whose action differs between ``old`` and ``new`` (as `kanmon policy diff --urls`)."""
    changes = []
    for url in urls:
        q = policy_query(url, device, shape, now)
        a, b = old.decide(q), new.decide(q)
        if a.action != b.action:
            changes.append(VerdictChange(url, a, b))
    return changes
