"""A compiled, immutable policy and the decision procedure.

Precedence (LANGUAGE.md, "Precedence"): rules are tried in document order — every
``rule_groups`` entry in order, then the top-level ``rules`` — and the first rule whose
conditions all hold decides. The order is the same at every stage. A rule that needs a fact
the stage does not know yet (a URL path at TLS, a response type at request time) is
*unknown*; if an unknown rule comes before the first matching one, the stage cannot decide
and the verdict says so (``is_deferred``): the gateway lets the flow continue to the stage
that knows. Nothing matched and nothing unknown -> the configured default action.

Most requests touch only their host's rules: rules are bucketed by exact host and by domain
suffix (hash lookups along the host's labels), rules with free URL patterns are found
through one RE2 set over all patterns, and only rules with neither (device-wide rules) are
tried for every request.

``decide_url`` is the same decision for a URL string (the operator tools). The gateway
builds its HTTP queries with ``query.request_query`` and calls ``decide``, the path
bench/engine.py measures. (A native C++ fast path for ``decide_url`` was removed in issue
#22: the gateway never called it, and on the shipped policy it handed 99.5 % of URLs back
to this engine — figures in bench/engine.py's docstring.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any

from gateway.policy import facts as F
from gateway.policy.conditions import Check
from gateway.policy.query import DeviceContext, PolicyQuery, is_normalized_url, normalize_url, query_for_url
from gateway.verdict import RULE_NO_DECISION, Action, Stage, Verdict

RULE_NO_SNI = "kanmon:no-sni"
# Up to this many rules routed only by free URL patterns are simply tried in order (and the
# RE2 set asked lazily); above it the set is asked first and picks the candidates.
LAZY_URL_RULES = 16
# Per-device views kept by a snapshot (see ``_device_view``); cleared when full.
DEVICE_VIEWS = 4096
_EMPTY: frozenset[int] = frozenset()


def is_deferred(verdict: Verdict) -> bool:
    """True when the stage could not decide and the flow must continue to a later stage."""
    return verdict.rule_id == RULE_NO_DECISION


@dataclass(frozen=True, slots=True)
class RuleInfo:
    """A rule as the operator wrote it (for check/test output and the block page)."""

    id: str
    action: Action
    group: str | None
    description: str | None
    reason: str | None
    owner: str | None
    expires: Any  # datetime.date | None
    status: str
    category: str | None
    decided_at: Stage  # first stage that knows everything the rule needs
    filename: str
    line: int
    # How a DNS-stage block is answered: NXDOMAIN, or the gateway's sinkhole address (the
    # device then connects, and the proxy shows the block page). None: settings.dns_block.
    dns_block: str | None = None
    # ``match`` names a destination (dst_port, dst_cidr, protocol, system, system_class):
    # only such a rule can allow traffic whose protocol the gateway did not identify.
    names_destination: bool = False
    # ``match`` names a DNS message content type (application/dns-message, dns-json): only
    # such a rule can allow DNS over HTTPS through the gateway.
    allows_dns_messages: bool = False
    # issue #19: the block page's staff message in Japanese (``description`` is the English
    # one) and the approved alternative (an http(s) URL).
    description_ja: str | None = None
    alternative: str | None = None


@dataclass(frozen=True, slots=True)
class CategoryInfo:
    """A ``categories:`` entry of the policy: what the block page says for that category."""

    name: str
    description: str | None = None
    description_ja: str | None = None
    alternative: str | None = None


@dataclass(slots=True)
class CompiledRule:
    ordinal: int
    info: RuleInfo
    checks: tuple[Check, ...]
    unless: tuple[Check, ...]
    expires_at: datetime | None  # aware; the rule stops applying at this instant
    headers: tuple[tuple[str, str], ...] = ()  # tenant-restrict headers
    verdicts: dict[Stage, Verdict] = field(default_factory=dict)
    # The rule's only condition is "host in its host tables" (domain / domain_exact / list
    # without regexes), it has no unless and no expiry: it matches exactly when the host
    # lookup found it, so the engine decides it without calling the check (compiler.py).
    host_only: bool = False
    # The one check of a rule with a single condition and no unless (set by the snapshot):
    # tried directly instead of through _all_of.
    single: Check | None = None


class _DeviceView:
    """What one device can never match, worked out once per (snapshot, device): rules with a
    device condition (group, ownership, posture, user ...) that is false for this device."""

    __slots__ = ("dead", "generic", "unsure")

    def __init__(self, dead: frozenset[int], generic: tuple[int, ...], unsure: frozenset[int] = _EMPTY):
        self.dead = dead  # ordinals of rules this device cannot match
        self.generic = generic  # the device-wide rules it still has to try
        # Rules with a device condition that gave no True/False (an error): decide()
        # evaluates them again.
        self.unsure = unsure


def _all_of(checks: tuple[Check, ...], q: PolicyQuery, f: F.Facts) -> bool | None:
    """Kleene AND: False if any check is false, None if any is unknown, else True."""
    result: bool | None = True
    missing = ~f.known
    for c in checks:
        if c.needs & missing:
            result = None
            continue
        r = c.fn(q, f)
        if r is None:
            result = None
        elif not r:
            return False
    return result


def _same_outcome(a: CompiledRule, b: CompiledRule) -> bool:
    return a.info.action is b.info.action and a.headers == b.headers


class PolicySnapshot:
    """Immutable after construction; safe to share between threads and swap atomically."""

    def __init__(
        self,
        *,
        version: str,
        compiled_at: datetime,
        tz: tzinfo,
        default_action: Action,
        no_sni: str,
        rules: tuple[CompiledRule, ...],
        dns_block: str = "sinkhole",
        exact: dict[str, tuple[int, ...]],
        suffix: dict[str, tuple[int, ...]],
        generic: tuple[int, ...],
        url_only: tuple[int, ...],
        url_sets: Any,
        pattern_rules: tuple[tuple[int, ...], ...],
        retired: tuple[RuleInfo, ...],
        lists: dict[str, int],
        source: str,
        categories: dict[str, CategoryInfo] | None = None,
    ):
        self.categories = categories or {}   # category name -> CategoryInfo (issue #19)
        self.version = version
        self.compiled_at = compiled_at
        self.tz = tz
        self.default_action = default_action
        self.no_sni = no_sni
        self.dns_block = dns_block
        self.rules = rules
        self._exact = exact
        self._suffix = suffix
        self._generic = generic
        self._url_only = url_only
        self._url_sets = url_sets  # (FREE_SET, KEYED_SET) entries, see compiler._url_sets
        self._pattern_rules = pattern_rules
        self.retired = retired  # status: retired, kept for reports
        self.lists = lists  # list name -> entry count
        self.source = source
        self._by_id = {r.info.id: r.info for r in rules}
        # Checks that read only the device (needs exactly DEVICE, nothing further): their
        # result is a function of the DeviceContext alone, so it is computed once per device
        # (``_device_view``). Every stage knows DEVICE, so such a check is never "unknown".
        self._device_checks = tuple(
            (rule.ordinal, tuple(c for c in rule.checks if c.needs == F.DEVICE and not c.may_need))
            for rule in rules
        )
        self._device_checks = tuple((o, cs) for o, cs in self._device_checks if cs)
        self._device_views: dict[DeviceContext, _DeviceView] = {}
        self._all_alive = _DeviceView(_EMPTY, generic)
        # The last device asked about and its view, one tuple so threads read a matching pair:
        # the gateway passes the same DeviceContext object for every request of a device.
        self._last_view: tuple[DeviceContext | None, _DeviceView] = (None, self._all_alive)
        for rule in rules:
            rule.single = rule.checks[0] if len(rule.checks) == 1 and not rule.unless else None
        self._deferred_verdicts: dict[tuple[int, Stage, int], Verdict] = {}
        self._default = {
            s: Verdict(default_action, None, f"no rule matched: default action {default_action}", s) for s in Stage
        }
        for rule in rules:
            rule.verdicts = {s: self._rule_verdict(rule, s) for s in Stage}
        # What the compile worked out from its inputs (compiler.Prepared), for the edge's cache.
        self.prepared: Any = None

    # -- public -------------------------------------------------------------------------

    def rule(self, rule_id: str) -> RuleInfo | None:
        return self._by_id.get(rule_id)

    def dns_block_mode(self, rule_id: str | None) -> str:
        """`nxdomain` or `sinkhole` for a DNS-stage block by this rule."""
        info = self._by_id.get(rule_id) if rule_id else None
        return (info.dns_block if info and info.dns_block else None) or self.dns_block

    def expiring(self, now: datetime, days: int) -> list[RuleInfo]:
        """Active rules that stop applying within ``days`` of ``now`` (or already have)."""
        horizon = now.timestamp() + days * 86400
        return [r.info for r in self.rules if r.expires_at is not None and r.expires_at.timestamp() <= horizon]

    def decide(self, query: PolicyQuery) -> Verdict:
        stage = query.stage
        if stage is Stage.TLS and query.host is None and self.no_sni != "rules":
            return Verdict(Action(self.no_sni), RULE_NO_SNI, f"TLS without SNI: settings.no_sni is {self.no_sni}", stage)
        return self._evaluate(query, F.KNOWN_AT[stage], query.now or self.compiled_at)

    def decide_url(self, url: str, device: DeviceContext, stage: Stage = Stage.REQUEST, method: str = "GET",
                   now: datetime | None = None, **extra: Any) -> Verdict:
        """``decide(query_for_url(url, device, stage, method, now, **extra))``: a URL string
        decided (the operator tools, tests)."""
        return self.decide(query_for_url(url, device, stage, method, now, **extra))

    def host_verdict(self, device: DeviceContext, host: str, stage: Stage, now: datetime | None = None) -> Verdict | None:
        """The decision for (device, host) when no path, content, destination address or
        clock condition can change it; ``None`` when one can (then call ``decide``)."""
        q = PolicyQuery(stage=stage, device=device, host=host, now=now)
        v = self._evaluate(q, F.HOST_ONLY, now or self.compiled_at)
        return None if is_deferred(v) else v

    def next_expiry(self, now: datetime) -> datetime | None:
        """The next instant a rule stops applying (cached host verdicts expire then)."""
        future = [r.expires_at for r in self.rules if r.expires_at is not None and r.expires_at > now]
        return min(future) if future else None

    def __repr__(self) -> str:
        return f"<PolicySnapshot {self.version} rules={len(self.rules)} lists={len(self.lists)}>"

    # -- internals ----------------------------------------------------------------------

    def _device_view(self, device: DeviceContext) -> _DeviceView:
        if not self._device_checks:
            return self._all_alive
        last, view = self._last_view
        if last is device:
            return view
        try:
            view = self._device_views.get(device)
        except TypeError:  # an unhashable context (a field that is a list): no cache
            return self._make_device_view(device)
        if view is None:
            view = self._make_device_view(device)
            if len(self._device_views) >= DEVICE_VIEWS:
                self._device_views.clear()
            self._device_views[device] = view
        self._last_view = (device, view)
        return view

    def _make_device_view(self, device: DeviceContext) -> _DeviceView:
        q = PolicyQuery(stage=Stage.CONNECT, device=device)
        facts = F.Facts(F.DEVICE, None, None, _EMPTY, self.compiled_at, self.tz)
        dead = set()
        unsure = set()
        for ordinal, checks in self._device_checks:
            for c in checks:
                try:
                    result = c.fn(q, facts)
                except Exception:  # decide() evaluates it again and reports it as it always did
                    result = None
                if result is False:
                    dead.add(ordinal)  # a false condition makes the whole rule false (Kleene AND)
                    unsure.discard(ordinal)
                    break
                if result is not True:
                    unsure.add(ordinal)
        if not dead and not unsure:
            return self._all_alive
        return _DeviceView(frozenset(dead), tuple(o for o in self._generic if o not in dead), frozenset(unsure))

    def _evaluate(self, q: PolicyQuery, known: int, now: datetime) -> Verdict:
        if q.url and not is_normalized_url(q.url):  # query_for_url's URLs are normalized already
            url = normalize_url(q.url)  # the form URL conditions match against (query.py)
            if url is not q.url:
                q = q._replace(url=url)
        view = self._device_view(q.device)
        parts: list[tuple[int, ...]] = []
        host = q.host
        if host and known & F.HOST:
            found = self._exact.get(host)
            if found:
                parts.append(found)
            suffix = self._suffix
            name = host
            while True:
                found = suffix.get(name)
                if found:
                    parts.append(found)
                dot = name.find(".")
                if dot == -1:
                    break
                name = name[dot + 1:]
        # The rules found through the host tables (a tuple when one bucket, else a set).
        hits: tuple[int, ...] | set[int] = parts[0] if len(parts) == 1 else set().union(*parts) if parts else ()
        if view.generic:
            parts.append(view.generic)
        matched: set[int] | frozenset[int] | None = None
        url_only = self._url_only
        if known & F.URL and len(url_only) > LAZY_URL_RULES:
            # Many URL-routed rules: ask the RE2 set now and try only the rules it names.
            # url_only rules are those whose patterns are in FREE_SET.
            entry = self._url_sets[F.FREE_SET] if (q.url and self._url_sets is not None) else None
            local = entry[0].Match(q.url.encode()) if entry is not None else None
            matched = {entry[1][i] for i in local} if local else _EMPTY
            pattern_rules = self._pattern_rules
            for pid in matched:
                found = pattern_rules[pid]
                if found:
                    parts.append(found)
        elif url_only:
            # Few: try them in order; the RE2 set is asked only if one is reached.
            parts.append(url_only)
        if not parts:
            return self._default[q.stage]
        if len(parts) == 1:
            candidates = parts[0]
        elif len(parts) == 2 and parts[0][-1] < parts[1][0]:  # each part is sorted
            candidates = parts[0] + parts[1]
        else:
            candidates = sorted(set().union(*parts))
        facts: F.Facts | None = None  # made when the first rule needs more than the host lookup
        rules = self.rules
        dead = view.dead
        host_known = known & F.HOST
        first_unknown: CompiledRule | None = None
        mixed = False  # undecided rules disagree among themselves
        for ordinal in candidates:
            if ordinal in dead:
                continue  # a device condition of this rule is false for this device
            rule = rules[ordinal]
            if rule.host_only and host_known:
                if ordinal not in hits:
                    continue
                result: bool | None = True
            else:
                if rule.expires_at is not None and now >= rule.expires_at:
                    continue
                if facts is None:
                    facts = F.Facts(known, q.url, self._url_sets, hits, now, self.tz, matched)
                single = rule.single
                if single is not None:  # _all_of for one check
                    result = None if single.needs & ~known else single.fn(q, facts)
                    if not result and result is not None:
                        continue
                    if result is not None:
                        result = True
                else:
                    result = _all_of(rule.checks, q, facts)
                if result is False:
                    continue
                if rule.unless:
                    exempt = _all_of(rule.unless, q, facts)
                    if exempt:
                        continue
                    if exempt is None:
                        result = None
            if result is None:
                if first_unknown is None:
                    first_unknown = rule
                elif not _same_outcome(first_unknown, rule):
                    mixed = True
                continue
            # An undecided earlier rule holds the decision back only if it would act
            # differently: "block (unknown) ... block (matched)" is a block either way.
            if first_unknown is None or (not mixed and _same_outcome(first_unknown, rule)):
                return rule.verdicts[q.stage]
            return self._deferred(first_unknown, q.stage, rule)
        if first_unknown is not None:
            if not mixed and first_unknown.info.action is self.default_action and not first_unknown.headers:
                return self._default[q.stage]
            return self._deferred(first_unknown, q.stage, None)
        return self._default[q.stage]

    def _deferred(self, unknown: CompiledRule, stage: Stage, then: CompiledRule | None) -> Verdict:
        key = (unknown.ordinal, stage, then.ordinal if then is not None else -1)
        verdict = self._deferred_verdicts.get(key)
        if verdict is None:  # built once per (rule, stage, rule): a Verdict is immutable
            verdict = self._deferred_verdicts[key] = self._deferred_verdict(unknown, stage, then)
        return verdict

    def _deferred_verdict(self, unknown: CompiledRule, stage: Stage, then: CompiledRule | None) -> Verdict:
        after = f"rule {then.info.id} matches" if then else "no later rule matches"
        return Verdict(
            Action.ALLOW,
            RULE_NO_DECISION,
            f"undecided at {stage}: rule {unknown.info.id} needs facts known at {unknown.info.decided_at}; {after} so far",
            stage,
        )

    def _rule_verdict(self, rule: CompiledRule, stage: Stage) -> Verdict:
        info = rule.info
        conds = "; ".join(c.text for c in rule.checks) or "every request"
        if rule.unless:
            conds += " unless " + "; ".join(c.text for c in rule.unless)
        text = f"rule {info.id} ({info.action}): {conds}"
        if info.reason:
            text += f" — {info.reason}"
        return Verdict(info.action, info.id, text.replace("\n", " "), stage, rule.headers, info.category)
