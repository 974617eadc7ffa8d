"""Policy document -> PolicySnapshot. Pure: the caller supplies the policy text and the
text of every list file; every problem is collected and raised together as SourceErrors
(``file:line: key: message``), and nothing is built when there is one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import re2

from gateway.policy import facts as F
from gateway.policy.conditions import Check, ConditionError, System, as_list, build_check, system_from_spec
from gateway.policy.lists import DomainList, parse_list, regex_error, valid_domain
from gateway.policy.query import PolicyQuery, normalize_host
from gateway.policy.schema import POLICY_SCHEMA
from gateway.policy.snapshot import CategoryInfo, CompiledRule, PolicySnapshot, RuleInfo
from gateway.policy.tenants import tenant_headers
from gateway.policy.urlpattern import CompiledWildcard, WildcardError, compile_wildcard
from gateway.policy.urlsets import SchemeSplitSet
from gateway.i18n import Text
from gateway.verdict import Action
from gateway.yamlsource import LoadedYaml, SourceError, SourceErrors, load_yaml_text, schema_errors

DEFAULT_TIMEZONE = "Asia/Tokyo"
# RE2's default budget (8 MiB) runs out around two thousand URL patterns in one set.
URL_SET_MAX_MEM = 1 << 30
HOST_KEYS = ("domain", "domain_exact", "list")
T_NOT_A_DATE = Text("日付ではありません: {value}（YYYY-MM-DD で書いてください）", "not a date: {value} (write YYYY-MM-DD)")
T_LIST_NAME_TAKEN = Text("リスト名 {name} はフィード {feed} のカテゴリ名と重なっています",
                         "list name {name} is the name of a category of feed {feed}")
T_NO_FEED_COPY = Text("フィード {name} の正常なコピーがまだありません（`kanmon lists update` で取得してください）",
                      "feed {name} has no good copy yet (fetch it with `kanmon lists update`)")
URL_KEYS = ("url", "url_regex")
# issue #19: the approved alternative shown on the block page is a link staff follow.
T_ALTERNATIVE = Text("代替手段は http:// か https:// の URL で書いてください（例: https://mail.example.lg.jp/）: {value!r}",
                     "the alternative must be an http:// or https:// URL (e.g. https://mail.example.lg.jp/): {value!r}")


# Changes whenever the form of ``Prepared`` or what the compiler derives from it changes; the
# edge's cache key (gateway/runtime/policycache.py) also hashes the engine's source files.
PREPARED_FORMAT = 2


@dataclass(frozen=True)
class Prepared:
    """What a compile worked out from its inputs that is plain data and costs the most to
    redo at scale: the final host tables (a million domains parsed and routed), each list
    file's size and URL regexes (and its hosts too when an ``unless:`` names it: that
    condition walks the list itself), the URL wildcards compiled, and the URL patterns RE2
    accepted. A snapshot carries the ``Prepared`` of its compile when asked
    (``keep_prepared``); giving it back to ``compile_policy`` for the very same inputs skips
    that work and yields the same snapshot. The caller must key it by every input
    (gateway/runtime/policycache.py does, with a hash of the policy text, every list, the feed
    copies and the engine version): the compiler does not check that it fits."""

    lists: Mapping[str, DomainList]  # file lists; hosts left out unless ``unless:`` names the list
    sizes: Mapping[str, int]  # file list -> entries (len of the parsed list)
    exact: Mapping[str, tuple[int, ...]]  # the snapshot's host tables, final
    suffix: Mapping[str, tuple[int, ...]]
    wildcards: Mapping[str, tuple[Any, ...]]  # url: pattern as written -> CompiledWildcard fields
    valid_patterns: frozenset[str]  # regexes RE2 accepted


@dataclass(frozen=True)
class ListSource:
    name: str
    file: str  # as written in the policy (relative to the policy file's directory)
    format: str
    match: str
    feed: Any = None  # a gateway.feeds.spec.FeedSpec when the list is a category feed (url)


def parse_policy(text: str, filename: str) -> tuple[LoadedYaml, list[ListSource]]:
    """Parse and schema-check the policy document; returns the list files and feeds it needs."""
    doc = load_yaml_text(text, filename)
    if not isinstance(doc.data, dict):
        raise SourceErrors([SourceError(filename, 1, (), "a policy file is a mapping with at least 'version: 1'")])
    errors = schema_errors(doc, POLICY_SCHEMA)
    if errors:
        raise SourceErrors(errors)
    from gateway.feeds.spec import feed_from_spec  # feeds import policy.lists: not at module level

    try:
        tz = ZoneInfo((doc.data.get("settings") or {}).get("timezone", DEFAULT_TIMEZONE))
    except (ZoneInfoNotFoundError, ValueError, OSError):
        tz = ZoneInfo(DEFAULT_TIMEZONE)  # reported by the compiler
    sources = []
    declared = set(doc.data.get("lists") or {})
    for name, spec in (doc.data.get("lists") or {}).items():
        feed = feed_from_spec(name, spec, tz, lambda p, t, n=name: errors.append(doc.error(("lists", n) + p, t)))
        file = spec.get("file") or spec.get("url", "")
        sources.append(ListSource(name, file, spec.get("format", "auto"), spec.get("match", "suffix"), feed))
        for taken in (feed.list_names()[1:] if feed else ()):
            if taken in declared:  # "ut1/webmail" is the feed's category: one name, one list
                errors.append(doc.error(("lists", taken), T_LIST_NAME_TAKEN.format(name=taken, feed=name)))
    if errors:
        raise SourceErrors(errors)
    return doc, sources


def content_version(policy_text: str, list_texts: Mapping[str, tuple[str, str]], feed_versions: str = "") -> str:
    """Hash of every input, so a reload log can say which policy serves."""
    h = hashlib.sha256(policy_text.encode())
    for name in sorted(list_texts):
        filename, text = list_texts[name]
        h.update(b"\0" + name.encode() + b"\0" + text.encode())
    if feed_versions:
        h.update(b"\0feeds\0" + feed_versions.encode())
    return h.hexdigest()[:16]


def compile_text(
    text: str,
    lists: Mapping[str, tuple[str, str]] | None = None,
    filename: str = "<policy>",
    compiled_at: datetime | None = None,
) -> PolicySnapshot:
    """Compile from strings: ``lists`` maps list name -> (filename, text)."""
    doc, sources = parse_policy(text, filename)
    return compile_policy(doc, text, sources, lists or {}, compiled_at or datetime.now(timezone.utc))


def compile_policy(
    doc: LoadedYaml,
    policy_text: str,
    sources: list[ListSource],
    list_texts: Mapping[str, tuple[str, str]],
    compiled_at: datetime,
    feed_lists: Mapping[str, DomainList] | None = None,
    feed_versions: str = "",
    prepared: Prepared | None = None,
    keep_prepared: bool = False,
) -> PolicySnapshot:
    """``feed_lists``: the list of every feed name and ``feed/category`` from the last good
    copies (gateway/feeds/loading.py); ``feed_versions`` goes into the content version.
    ``prepared``: the ``Prepared`` of an earlier compile of exactly these inputs;
    ``keep_prepared``: set ``snapshot.prepared`` to this compile's (it holds the parsed lists
    alive, so only a caller that stores it asks, and then drops it)."""
    return _Compiler(doc, policy_text, sources, list_texts, compiled_at, feed_lists or {},
                     feed_versions, prepared, keep_prepared).build()


class _Compiler:
    def __init__(self, doc: LoadedYaml, policy_text: str, sources: list[ListSource],
                 list_texts: Mapping[str, tuple[str, str]], compiled_at: datetime,
                 feed_lists: Mapping[str, DomainList] | None = None, feed_versions: str = "",
                 prepared: Prepared | None = None, keep_prepared: bool = False):
        self.doc = doc
        self.keep_prepared = keep_prepared
        self.prepared = prepared
        self.valid_patterns: set[str] = set()  # for this compile's Prepared
        self.unless_lists: set[str] = set()  # lists an unless: names (walked, so kept whole)
        self.compiled_wildcards: dict[str, CompiledWildcard] = {}
        # With prepared host tables the routes of hosts are not added again (they are in them).
        self.tables_ready = prepared is not None
        self.data: dict[str, Any] = doc.data
        self.policy_text = policy_text
        self.sources = sources
        self.list_texts = list_texts
        self.feed_lists = feed_lists or {}
        self.feed_versions = feed_versions
        # list name (a feed or feed/category) -> the feed's allow exceptions
        self.feed_allow: dict[str, tuple[Any, ...]] = {}
        self.compiled_at = compiled_at
        self.errors: list[SourceError] = []
        self.lists: dict[str, DomainList] = {}
        self._sizes: dict[str, int] = dict(prepared.sizes) if prepared is not None else {}
        self.systems: dict[str, System] = {}
        self.tenants: dict[str, tuple[tuple[str, str], ...]] = {}
        # routing tables under construction: host -> the ordinals of its rules (sorted)
        self.exact: dict[str, tuple[int, ...]] = {}
        self.suffix: dict[str, tuple[int, ...]] = {}
        self._interned: dict[tuple[int, ...], tuple[int, ...]] = {}  # one object per ordinal tuple
        self.generic: list[int] = []
        self.url_only: list[int] = []
        self.patterns: dict[str, int] = {}
        # Which RE2 set each pattern goes in: KEYED_SET for the URL patterns of a rule bucketed
        # by their hosts (asked only when such a rule is reached), FREE_SET for every other
        # use. A pattern used both ways is in both.
        self.pattern_sets: list[set[int]] = []
        self.pattern_rules: list[list[int]] = []
        # pattern id -> the wildcard it was compiled from (``url:``); the KEYED_SET holds only
        # these and is matched scheme apart (urlsets.py)
        self.wildcards: dict[int, CompiledWildcard] = {}
        self.rules: list[CompiledRule] = []
        self.retired: list[RuleInfo] = []

    def err(self, path: tuple[Any, ...], message: "str | Text") -> None:
        self.errors.append(self.doc.error(path, message))

    # -- top level ----------------------------------------------------------------------

    def build(self) -> PolicySnapshot:
        settings = self.data.get("settings") or {}
        tz_name = settings.get("timezone", DEFAULT_TIMEZONE)
        try:
            tz = ZoneInfo(tz_name)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a file name
            self.err(("settings", "timezone"), Text(f"知らないタイムゾーンです: {tz_name!r}(例 Asia/Tokyo)",
                                                    f"unknown time zone {tz_name!r} (e.g. Asia/Tokyo)"))
            tz = ZoneInfo(DEFAULT_TIMEZONE)
        self.tz = tz
        self._load_lists()
        if self.prepared is not None:
            # The tables as prepared (never changed here: _route leaves them alone).
            self.exact, self.suffix = self.prepared.exact, self.prepared.suffix  # type: ignore[assignment]
        self._load_systems()
        self._load_tenants()
        categories = self._load_categories()
        seen_ids: dict[str, int] = {}
        for gi, group in enumerate(self.data.get("rule_groups") or []):
            applies = group.get("applies_to") or {}
            group_checks = []
            for key, value in applies.items():
                check = self._simple_check(("rule_groups", gi, "applies_to", key), key, value)
                if check:
                    group_checks.append(check)
            for ri, rule in enumerate(group["rules"]):
                self._rule(("rule_groups", gi, "rules", ri), rule, group["name"], tuple(group_checks), seen_ids)
        for ri, rule in enumerate(self.data.get("rules") or []):
            self._rule(("rules", ri), rule, None, (), seen_ids)
        if self.errors:
            raise SourceErrors(self.errors)
        url_sets = self._url_sets()
        if self.errors:
            raise SourceErrors(self.errors)
        interned = self._interned

        def freeze(v: list[int]) -> tuple[int, ...]:
            t = (v[0],) if len(v) == 1 else tuple(sorted(set(v)))
            return interned.setdefault(t, t)

        snapshot = PolicySnapshot(
            version=content_version(self.policy_text, self.list_texts, self.feed_versions),
            compiled_at=self.compiled_at,
            tz=tz,
            default_action=Action(settings.get("default_action", "allow")),
            no_sni=settings.get("no_sni", "block"),
            dns_block=settings.get("dns_block", "sinkhole"),  # issue #19: browsers land on the block page
            rules=tuple(self.rules),
            exact=self.exact,
            suffix=self.suffix,
            generic=freeze(self.generic),
            url_only=freeze(self.url_only),
            url_sets=url_sets,
            pattern_rules=tuple(freeze(v) for v in self.pattern_rules),
            retired=tuple(self.retired),
            lists={name: self._sizes.get(name, len(lst)) for name, lst in self.lists.items()},
            source=self.doc.filename,
            categories=categories,
        )
        if self.keep_prepared:
            files = [src.name for src in self.sources if src.feed is None and src.name in self.lists]
            snapshot.prepared = Prepared(
                lists={name: self.lists[name] if name in self.unless_lists else
                       DomainList(name, self.lists[name].filename, frozenset(), frozenset(), self.lists[name].regexes)
                       for name in files},
                sizes={name: len(self.lists[name]) for name in files},
                exact=self.exact, suffix=self.suffix,
                wildcards={raw: (wc.regex, wc.host, wc.host_is_suffix, wc.scheme, wc.port, wc.path, wc.tail)
                           for raw, wc in self.compiled_wildcards.items()},
                valid_patterns=frozenset(self.valid_patterns))
        return snapshot

    def _load_lists(self) -> None:
        for src in self.sources:
            if src.feed is not None:
                names = src.feed.list_names()
                if src.name not in self.feed_lists:
                    self.err(("lists", src.name, "url"), T_NO_FEED_COPY.format(name=src.name))
                for name in names:
                    if name in self.feed_lists:
                        self.lists[name] = self.feed_lists[name]
                    if src.feed.allow:
                        self.feed_allow[name] = src.feed.allow
                continue
            if src.name not in self.list_texts:
                self.err(("lists", src.name, "file"), Text(f"リストファイルを読んでいません: {src.file}",
                                                           f"list file not read: {src.file}"))
                continue
            ready = self.prepared.lists.get(src.name) if self.prepared is not None else None
            if ready is not None:
                self.lists[src.name] = ready  # hosts only when an unless: walks it (Prepared)
                continue
            filename, text = self.list_texts[src.name]
            parsed, errors = parse_list(text, src.name, filename, src.format, src.match)
            self.errors.extend(errors)
            self.lists[src.name] = parsed

    def _load_systems(self) -> None:
        for name, spec in (self.data.get("systems") or {}).items():
            try:
                self.systems[name] = system_from_spec(name, spec)
            except ConditionError as exc:
                path: tuple[Any, ...] = ("systems", name)
                if exc.key:
                    path += (exc.key,) + ((exc.index,) if exc.index is not None else ())
                self.err(path, exc.text or str(exc))

    def _load_tenants(self) -> None:
        for name, spec in (self.data.get("tenants") or {}).items():
            headers, problems = tenant_headers(spec)
            for key, message in problems:
                self.err(("tenants", name, key), message)
            self.tenants[name] = headers

    # -- rules --------------------------------------------------------------------------

    def _simple_check(self, path: tuple[Any, ...], key: str, value: Any) -> Check | None:
        try:
            return build_check(key, value, self.systems)
        except ConditionError as exc:
            self.err(path + ((exc.index,) if exc.index is not None and isinstance(value, list) else ()), exc.text or str(exc))
            return None

    def _alternative(self, path: tuple[Any, ...], value: str | None) -> str | None:
        if value is None:
            return None
        if not re2.fullmatch(r"https?://[^\s/?#\x22'<>]+[^\s\x22'<>]*", value):
            self.err(path, T_ALTERNATIVE.format(value=value if len(value) <= 80 else value[:77] + "..."))
            return None
        return value

    def _load_categories(self) -> dict[str, CategoryInfo]:
        """The ``categories:`` section (issue #19): the block page's words per category."""
        out = {}
        for name, spec in (self.data.get("categories") or {}).items():
            out[name] = CategoryInfo(name, spec.get("description"), spec.get("description_ja"),
                                     self._alternative(("categories", name, "alternative"), spec.get("alternative")))
        return out

    def _expiry(self, path: tuple[Any, ...], value: Any) -> tuple[date | None, datetime | None]:
        if value is None:
            return None, None
        if isinstance(value, datetime):
            value = value.date()
        if isinstance(value, str):
            try:
                value = date.fromisoformat(value)
            except ValueError:
                self.err(path, T_NOT_A_DATE.format(value=repr(value)))
                return None, None
        if not isinstance(value, date):
            self.err(path, T_NOT_A_DATE.format(value=repr(value)))
            return None, None
        # The rule applies through the whole expiry day in the policy's time zone.
        end = datetime.combine(value + timedelta(days=1), time(0, 0), tzinfo=self.tz)
        return value, end.astimezone(timezone.utc)

    def _rule(self, path: tuple[Any, ...], spec: dict[str, Any], group: str | None,
              group_checks: tuple[Check, ...], seen_ids: dict[str, int]) -> None:
        rule_id = spec["id"]
        line = self.doc.line_of(path + ("id",))
        if rule_id in seen_ids:
            self.err(path + ("id",), Text(f"ルール ID {rule_id!r} が重複しています(最初は {seen_ids[rule_id]} 行目)",
                                          f"duplicate rule id {rule_id!r} (first on line {seen_ids[rule_id]})"))
        else:
            seen_ids[rule_id] = line
        action = Action(spec["action"])
        headers: tuple[tuple[str, str], ...] = ()
        tenant = spec.get("tenant")
        if action is Action.TENANT_RESTRICT:
            if tenant is None:
                self.err(path + ("action",), Text("tenant-restrict には tenant: <tenants: の名前> が必要です",
                                                  "tenant-restrict needs tenant: <name of a tenants: entry>"))
            elif tenant not in self.tenants:
                self.err(path + ("tenant",), Text(f"テナント {tenant!r} は定義されていません(tenants: に書いてください)",
                                                  f"unknown tenant {tenant!r} (define it under tenants:)"))
            else:
                headers = self.tenants[tenant]
        elif tenant is not None:
            self.err(path + ("tenant",), Text("tenant は action: tenant-restrict でだけ使います",
                                              "tenant is only used with action: tenant-restrict"))
        expires, expires_at = self._expiry(path + ("expires",), spec.get("expires"))
        status = spec.get("status", "active")
        ordinal = len(self.rules)
        match = spec.get("match") or {}
        unless = spec.get("unless") or {}
        checks: list[Check] = list(group_checks)
        needs = F.DEVICE
        host_check, routes = self._host_condition(path + ("match",), match, ordinal, bucketed=True)
        url_check, url_routes = self._url_condition(path + ("match",), match, ordinal, bucketed=True)
        if host_check:
            checks.append(host_check)
        if url_check:
            checks.append(url_check)
        for key, value in match.items():
            if key in HOST_KEYS or key in URL_KEYS:
                continue
            check = self._simple_check(path + ("match", key), key, value)
            if check:
                checks.append(check)
        unless_checks: list[Check] = []
        exempt = self._feed_exceptions(match)
        if exempt is not None:
            unless_checks.append(exempt)
        if unless:
            u_host, _ = self._host_condition(path + ("unless",), unless, ordinal, bucketed=False)
            u_url, _ = self._url_condition(path + ("unless",), unless, ordinal, bucketed=False)
            unless_checks += [c for c in (u_host, u_url) if c]
            for key, value in unless.items():
                if key in HOST_KEYS or key in URL_KEYS:
                    continue
                check = self._simple_check(path + ("unless", key), key, value)
                if check:
                    unless_checks.append(check)
        for c in checks + unless_checks:
            needs |= c.needs | c.may_need
        info = RuleInfo(
            id=rule_id, action=action, group=group, description=spec.get("description"), reason=spec.get("reason"),
            owner=spec.get("owner"), expires=expires, status=status, category=spec.get("category"),
            decided_at=F.earliest_stage(needs), filename=self.doc.filename, line=line,
            dns_block=spec.get("dns_block"),
            names_destination=any(key in match for key in DESTINATION_KEYS),
            allows_dns_messages=_names_dns_messages(match),
            description_ja=spec.get("description_ja"),
            alternative=self._alternative(path + ("alternative",), spec.get("alternative")),
        )
        if status == "retired":
            self.retired.append(info)
            return
        # Register the rule's routes only now that it is kept.
        if routes is not None:  # host condition: its hosts (URL patterns are then only checked)
            self._route(ordinal, routes)
        elif url_routes is not None:
            self._route(ordinal, url_routes)
        else:
            self.generic.append(ordinal)
        # Decided by the host lookup alone: its one condition is the plain host condition
        # (``ordinal in f.host_hits``, no list regexes), nothing else, never expires.
        host_only = (host_check is not None and checks == [host_check] and not host_check.may_need
                     and not unless_checks and expires_at is None)
        self.rules.append(CompiledRule(ordinal, info, tuple(checks), tuple(unless_checks), expires_at, headers,
                                       host_only=host_only))

    def _feed_exceptions(self, match: Mapping[str, Any]) -> Check | None:
        """A rule that names a feed with ``allow`` entries does not apply to those hosts (and
        their sub-domains) until each entry's expiry: the feed's exceptions, kept beside the
        feed so that a new copy of the feed cannot undo them."""
        allow: dict[str, datetime] = {}
        names = []
        for name in as_list(match.get("list")) if "list" in match else ():
            for entry in self.feed_allow.get(name, ()):
                names.append(name)
                if entry.expires_at > allow.get(entry.host, entry.expires_at - timedelta(seconds=1)):
                    allow[entry.host] = entry.expires_at
        if not allow:
            return None

        def fn(q: PolicyQuery, f: F.Facts) -> bool | None:
            name = q.host
            while name:
                until = allow.get(name)
                if until is not None and f.now < until:
                    return True
                dot = name.find(".")
                if dot == -1:
                    break
                name = name[dot + 1:]
            return False

        hosts = sorted(allow)
        text = f"host excepted from feed {', '.join(sorted(set(names)))}: {', '.join(hosts[:3])}{' …' if len(hosts) > 3 else ''}"
        return Check(F.HOST | F.TIME, fn, text)

    def _route(self, ordinal: int, routes: "_Routes") -> None:
        if self.tables_ready:  # the prepared host tables hold these routes already
            self._route_patterns(ordinal, routes)
            return
        self.exact = self._add_hosts(self.exact, routes.exact, ordinal)
        self.suffix = self._add_hosts(self.suffix, routes.suffix, ordinal)
        for lst in routes.suffix_lists:
            self.suffix = self._add_hosts(self.suffix, lst, ordinal)
        for lst in routes.exact_lists:
            self.exact = self._add_hosts(self.exact, lst, ordinal)
        self._route_patterns(ordinal, routes)

    def _route_patterns(self, ordinal: int, routes: "_Routes") -> None:
        if routes.pattern_ids:
            for pid in routes.pattern_ids:
                self.pattern_rules[pid].append(ordinal)
            self.url_only.append(ordinal)

    def _add_hosts(self, table: dict[str, tuple[int, ...]], hosts: "set[str] | frozenset[str]",
                   ordinal: int) -> dict[str, tuple[int, ...]]:
        """``table[host] += (ordinal,)`` for every host, in bulk; returns the table (a new
        one when it was empty). A list of a million domains is one ``dict.fromkeys`` (a C
        loop, sized once from the set) and every host of it shares one ``(ordinal,)`` tuple.
        Rules are routed in ordinal order, so each entry stays sorted and unique without a
        later pass (issue #22: the per-host loop and the per-host lists it made were 40 % of
        a 1M-domain compile)."""
        if not hosts:
            return table
        one = self._interned.setdefault((ordinal,), (ordinal,))
        if not table:
            return dict.fromkeys(hosts, one)
        before = {host: table[host] for host in table.keys() & hosts}
        table.update(dict.fromkeys(hosts, one))
        for host, had in before.items():
            merged = had if had[-1] == ordinal else had + one
            table[host] = self._interned.setdefault(merged, merged)
        return table

    def _wildcard(self, raw: str) -> CompiledWildcard:
        """``compile_wildcard``, or its prepared result."""
        fields = self.prepared.wildcards.get(raw) if self.prepared is not None else None
        wc = CompiledWildcard(*fields) if fields is not None else compile_wildcard(raw)
        self.compiled_wildcards[raw] = wc
        return wc

    def _regex_error(self, pattern: str, wildcard: bool = False) -> str | None:
        """``regex_error``, skipped for a pattern the prepared inputs found valid.

        A short wildcard's regex (urlpattern.py: escaped literals, ``.*``, ``[^/?#]*``) is
        only parsed (``_parses``, ~5 µs) instead of compiled (~40 µs: 0.33 s of a 10k-pattern
        compile, issue #22): what RE2 could still refuse in one that parses is its size,
        and a regex of at most ``_WILDCARD_PARSE_ONLY`` characters of those pieces is
        hundreds of times below RE2's program budget. A refused one goes through
        ``regex_error`` for its message, as does every longer one and every user regex."""
        if self.prepared is not None and pattern in self.prepared.valid_patterns:
            self.valid_patterns.add(pattern)
            return None
        if wildcard and len(pattern) <= _WILDCARD_PARSE_ONLY and _parses(pattern):
            self.valid_patterns.add(pattern)
            return None
        problem = regex_error(pattern)
        if problem is None:
            self.valid_patterns.add(pattern)
        return problem

    def _pattern_id(self, regex: str, url_set: int | None = F.FREE_SET) -> int:
        pid = self.patterns.get(regex)
        if pid is None:
            pid = self.patterns[regex] = len(self.patterns)
            self.pattern_rules.append([])
            self.pattern_sets.append(set())
        if url_set is not None:
            self.pattern_sets[pid].add(url_set)
        return pid

    def _host_condition(self, path: tuple[Any, ...], block: Mapping[str, Any], ordinal: int,
                        bucketed: bool) -> tuple[Check | None, "_Routes | None"]:
        """domain / domain_exact / list: one condition, true when any entry matches."""
        if not any(k in block for k in HOST_KEYS):
            return None, None
        routes = _Routes()
        texts = []
        for key in ("domain", "domain_exact"):
            if key not in block:
                continue
            values = as_list(block[key])
            for i, raw in enumerate(values):
                host = normalize_host(str(raw))
                if host is None or not valid_domain(host):
                    self.err(path + (key,) + ((i,) if isinstance(block[key], list) else ()), Text(f"ドメイン名ではありません: {raw!r}", f"not a domain name: {raw!r}"))
                    continue
                (routes.suffix if key == "domain" else routes.exact).add(host)
            texts.append(f"{'host under' if key == 'domain' else 'host is'} {', '.join(map(str, values[:3]))}{' …' if len(values) > 3 else ''}")
        regex_ids: set[int] = set()
        if "list" in block:
            names = as_list(block["list"])
            for i, name in enumerate(names):
                lst = self.lists.get(name)
                if lst is None:
                    if name not in {s.name for s in self.sources}:
                        self.err(path + ("list",) + ((i,) if isinstance(block["list"], list) else ()), Text(f"リスト {name!r} は定義されていません(lists: に書いてください)", f"unknown list {name!r} (define it under lists:)"))
                    continue
                routes.suffix_lists.append(lst.suffix)
                routes.exact_lists.append(lst.exact)
                if not bucketed:
                    self.unless_lists.add(name)
                for pattern, _line in lst.regexes:
                    regex_ids.add(self._pattern_id(pattern))
            texts.append(f"host in list {', '.join(map(str, names))}")
        routes.pattern_ids = frozenset(regex_ids)
        text = " or ".join(texts)
        if bucketed:
            if regex_ids:
                ids = frozenset(regex_ids)

                def fn(q: PolicyQuery, f: F.Facts) -> bool | None:
                    if ordinal in f.host_hits:
                        return True
                    if not f.known & F.URL:
                        return None
                    return not ids.isdisjoint(f.matches())
            else:
                def fn(q: PolicyQuery, f: F.Facts) -> bool | None:
                    return ordinal in f.host_hits
            return Check(F.HOST, fn, text, F.URL if regex_ids else 0), routes
        # Unbucketed (inside unless:): walk the host's suffixes against this rule's own sets.
        exact = frozenset(routes.exact).union(*routes.exact_lists) if routes.exact_lists else frozenset(routes.exact)
        suffix_sets = [frozenset(routes.suffix)] + list(routes.suffix_lists)
        ids = frozenset(regex_ids)

        def walk(q: PolicyQuery, f: F.Facts) -> bool | None:
            host = q.host
            if host:
                if host in exact:
                    return True
                name = host
                while True:
                    if any(name in s for s in suffix_sets):
                        return True
                    dot = name.find(".")
                    if dot == -1:
                        break
                    name = name[dot + 1:]
            if not ids:
                return False
            if not f.known & F.URL:
                return None
            return not ids.isdisjoint(f.matches())

        return Check(F.HOST, walk, text, F.URL if ids else 0), None

    def _url_condition(self, path: tuple[Any, ...], block: Mapping[str, Any], ordinal: int,
                       bucketed: bool) -> tuple[Check | None, "_Routes | None"]:
        """url / url_regex: one condition, true when any pattern matches the URL."""
        if not any(k in block for k in URL_KEYS):
            return None, None
        ids: set[int] = set()
        routes = _Routes()
        keyed = "url_regex" not in block
        texts = []
        if "url" in block:
            values = as_list(block["url"])
            for i, raw in enumerate(values):
                try:
                    wc = self._wildcard(str(raw))
                except WildcardError as exc:
                    self.err(path + ("url",) + ((i,) if isinstance(block["url"], list) else ()), exc.text)
                    continue
                problem = self._regex_error(wc.regex, wildcard=True)
                if problem:
                    self.err(path + ("url",) + ((i,) if isinstance(block["url"], list) else ()), Text(f"URL パターンが正しくありません: {problem}", f"bad URL pattern: {problem}"))
                    continue
                pid = self._pattern_id(wc.regex, None)  # its set is known at the end
                self.wildcards[pid] = wc
                ids.add(pid)
                if wc.host is None:
                    keyed = False
                elif wc.host_is_suffix:
                    routes.suffix.add(wc.host)
                else:
                    routes.exact.add(wc.host)
            texts.append(f"URL like {', '.join(map(str, values[:3]))}{' …' if len(values) > 3 else ''}")
        if "url_regex" in block:
            values = as_list(block["url_regex"])
            for i, raw in enumerate(values):
                problem = self._regex_error(str(raw))
                if problem:
                    self.err(path + ("url_regex",) + ((i,) if isinstance(block["url_regex"], list) else ()), Text(f"正規表現が正しくありません: {problem}", f"bad regular expression: {problem}"))
                    continue
                ids.add(self._pattern_id(str(raw), None))
            texts.append(f"URL matches {', '.join(map(str, values[:3]))}{' …' if len(values) > 3 else ''}")
        frozen = frozenset(ids)
        keyed = keyed and bucketed and bool(routes.exact or routes.suffix)
        url_set = F.KEYED_SET if keyed else F.FREE_SET
        for pid in frozen:
            self.pattern_sets[pid].add(url_set)
        if len(frozen) == 1:
            (only,) = frozen

            def fn(q: PolicyQuery, f: F.Facts) -> bool:
                return only in f.matches(url_set)
        else:
            def fn(q: PolicyQuery, f: F.Facts) -> bool:
                return not frozen.isdisjoint(f.matches(url_set))

        check = Check(F.URL, fn, " or ".join(texts))
        if keyed:
            return check, routes  # every pattern names its host: bucket by host
        routes = _Routes()
        routes.pattern_ids = frozen
        return check, routes

    def _url_sets(self) -> tuple[Any, Any] | None:
        """(FREE_SET, KEYED_SET), each ``(compiled RE2 set, global pattern id of each of its
        entries)`` or None when empty; None when there are no patterns at all."""
        if not self.patterns:
            return None
        members: tuple[list[int], list[int]] = ([], [])
        for pid, sets in enumerate(self.pattern_sets):
            for which in sets:
                members[which].append(pid)
        regexes = sorted(self.patterns, key=self.patterns.__getitem__)
        return self._url_set(regexes, members[F.FREE_SET]), self._url_set(regexes, members[F.KEYED_SET], keyed=True)

    def _url_set(self, regexes: list[str], pids: list[int], keyed: bool = False) -> tuple[Any, tuple[int, ...]] | None:
        if not pids:
            return None
        if keyed:  # every KEYED_SET pattern is a wildcard tied to a host: matched scheme apart
            regexes = list(regexes)
            for pid in pids:
                regexes[pid] = self.wildcards[pid].tail
        options = re2.Options()
        options.max_mem = URL_SET_MAX_MEM
        options.case_sensitive = False
        options.log_errors = False
        url_set = re2.Set.SearchSet(options)
        for index, pid in enumerate(pids):
            added = url_set.Add(regexes[pid])
            if added != index:  # pragma: no cover - patterns were checked one by one above
                raise AssertionError("RE2 set index out of step")
        try:
            url_set.Compile()
        except re2.error:
            self.err(("rules",), Text(f"{len(pids)} 個の URL パターンが 1 つの RE2 セットに収まりません",
                                      f"the {len(pids)} URL patterns do not fit in one RE2 set"))
            return None
        # The extension object's own Match (the wrapper only encodes and forwards: a third of
        # the call on the hot path).
        if keyed:
            return SchemeSplitSet(url_set._set, tuple(self.wildcards[pid].scheme for pid in pids), options), tuple(pids)
        return url_set._set, tuple(pids)


_WILDCARD_PARSE_ONLY = 2000
_PARSE_OPTIONS = re2.Options()
_PARSE_OPTIONS.log_errors = False


def _parses(pattern: str) -> bool:
    """RE2 parses ``pattern`` (a Set's Add parses without compiling a program)."""
    try:
        re2.Set.SearchSet(_PARSE_OPTIONS).Add(pattern)
    except (re2.error, UnicodeError):
        return False
    return True


class _Routes:
    __slots__ = ("exact", "suffix", "exact_lists", "suffix_lists", "pattern_ids")

    def __init__(self) -> None:
        self.exact: set[str] = set()
        self.suffix: set[str] = set()
        self.exact_lists: list[frozenset[str]] = []
        self.suffix_lists: list[frozenset[str]] = []
        self.pattern_ids: frozenset[int] = frozenset()


# Conditions that name where traffic goes (RuleInfo.names_destination).
DESTINATION_KEYS = frozenset({"dst_port", "dst_cidr", "protocol", "system", "system_class"})
DNS_MESSAGE_TYPES = frozenset({"application/dns-message", "application/dns-json"})


def _names_dns_messages(match: dict) -> bool:
    for key in ("request_content_type", "response_content_type"):
        value = match.get(key)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, str) and v.strip().lower() in DNS_MESSAGE_TYPES for v in values):
            return True
    return False
