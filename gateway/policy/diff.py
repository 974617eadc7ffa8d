"""What a candidate policy changes against the one in force (issue #21, the console's policy
page): settings, rules (added, removed, changed key by key, moved in precedence), rule groups,
lists (declared, and their entry counts once compiled) and the other sections. Pure: two
parsed documents (``gateway.policy.compiler.parse_policy``) and, when both compiled, their
snapshots. Which URLs change verdict is ``gateway.policy.urltest.verdict_changes``."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from gateway.policy.snapshot import PolicySnapshot

_SECTIONS = ("categories", "systems", "tenants")


@dataclass(frozen=True)
class Change:
    """One named thing that differs; ``keys``: the keys whose values differ (changed only)."""

    name: str
    kind: str                      # "added", "removed", "changed", "moved"
    keys: tuple[str, ...] = ()
    old: Any = None
    new: Any = None
    group: str | None = None       # the rule group of a rule (None: a top-level rule)


@dataclass(frozen=True)
class PolicyDiff:
    settings: list[Change] = field(default_factory=list)
    rules: list[Change] = field(default_factory=list)
    groups: list[Change] = field(default_factory=list)
    lists: list[Change] = field(default_factory=list)
    sections: list[Change] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.settings or self.rules or self.groups or self.lists or self.sections)


def rules_in_order(data: dict) -> list[tuple[str, str | None, dict]]:
    """(rule id, group name or None, rule mapping) in precedence order: each rule group top to
    bottom, then the top-level rules (gateway/policy/LANGUAGE.md)."""
    out = []
    for group in data.get("rule_groups") or []:
        for rule in group.get("rules") or []:
            out.append((str(rule.get("id")), group.get("name"), rule))
    for rule in data.get("rules") or []:
        out.append((str(rule.get("id")), None, rule))
    return out


def _keys_differing(a: dict, b: dict) -> tuple[str, ...]:
    return tuple(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def _mapping_changes(old: dict, new: dict) -> list[Change]:
    changes = []
    for name in sorted(set(old) | set(new), key=str):
        if name not in old:
            changes.append(Change(str(name), "added", new=new[name]))
        elif name not in new:
            changes.append(Change(str(name), "removed", old=old[name]))
        elif old[name] != new[name]:
            a, b = old[name], new[name]
            keys = _keys_differing(a, b) if isinstance(a, dict) and isinstance(b, dict) else ()
            changes.append(Change(str(name), "changed", keys, a, b))
    return changes


def _moved(old_ids: list[str], new_ids: list[str]) -> set[str]:
    """Rules kept in both whose precedence relative to the other kept rules changed: the kept
    rules outside a longest common subsequence of the two orders."""
    kept = set(old_ids) & set(new_ids)
    a = [i for i in old_ids if i in kept]
    b = [i for i in new_ids if i in kept]
    # Longest increasing subsequence of the new positions, in old order (O(n log n)).
    position = {rule_id: n for n, rule_id in enumerate(b)}
    seq = [position[i] for i in a]
    tails: list[int] = []
    tail_index: list[int] = []
    parent = [-1] * len(seq)
    for n, value in enumerate(seq):
        at = bisect.bisect_left(tails, value)
        if at == len(tails):
            tails.append(value)
            tail_index.append(n)
        else:
            tails[at] = value
            tail_index[at] = n
        parent[n] = tail_index[at - 1] if at else -1
    stay = set()
    n = tail_index[-1] if tail_index else -1
    while n != -1:
        stay.add(a[n])
        n = parent[n]
    return kept - stay


def diff_documents(old: dict, new: dict, old_snap: PolicySnapshot | None = None,
                   new_snap: PolicySnapshot | None = None) -> PolicyDiff:
    """The structural difference of two policy documents (their ``data``)."""
    result = PolicyDiff()
    result.settings.extend(_mapping_changes(old.get("settings") or {}, new.get("settings") or {}))
    old_rules = {rid: (group, rule) for rid, group, rule in rules_in_order(old)}
    new_rules = {rid: (group, rule) for rid, group, rule in rules_in_order(new)}
    moved = _moved([r for r, _g, _x in rules_in_order(old)], [r for r, _g, _x in rules_in_order(new)])
    for rid, _group, _rule in rules_in_order(new):
        if rid not in old_rules:
            result.rules.append(Change(rid, "added", new=new_rules[rid][1], group=new_rules[rid][0]))
    for rid, _group, _rule in rules_in_order(old):
        if rid not in new_rules:
            result.rules.append(Change(rid, "removed", old=old_rules[rid][1], group=old_rules[rid][0]))
            continue
        (g0, a), (g1, b) = old_rules[rid], new_rules[rid]
        keys = _keys_differing(a, b)
        if g0 != g1:
            keys = tuple(sorted(set(keys) | {"rule_groups"}))
        if keys:
            result.rules.append(Change(rid, "changed", keys, a, b, group=g1))
        elif rid in moved:
            result.rules.append(Change(rid, "moved", old=a, new=b, group=g1))
    old_groups = {g.get("name"): {k: v for k, v in g.items() if k != "rules"} for g in old.get("rule_groups") or []}
    new_groups = {g.get("name"): {k: v for k, v in g.items() if k != "rules"} for g in new.get("rule_groups") or []}
    result.groups.extend(_mapping_changes(old_groups, new_groups))
    result.lists.extend(_mapping_changes(old.get("lists") or {}, new.get("lists") or {}))
    if old_snap is not None and new_snap is not None:
        declared = {c.name for c in result.lists}
        for name in sorted(set(old_snap.lists) & set(new_snap.lists)):
            a, b = old_snap.lists[name], new_snap.lists[name]
            if a != b and name not in declared:       # same declaration, other content (the file changed)
                result.lists.append(Change(name, "changed", ("entries",), a, b))
            elif a != b:
                i = next(n for n, c in enumerate(result.lists) if c.name == name)
                c = result.lists[i]
                result.lists[i] = Change(c.name, c.kind, tuple(sorted(set(c.keys) | {"entries"})), c.old, c.new)
    for section in _SECTIONS:
        for c in _mapping_changes(old.get(section) or {}, new.get(section) or {}):
            result.sections.append(Change(f"{section}.{c.name}", c.kind, c.keys, c.old, c.new))
    if old.get("version") != new.get("version"):
        result.settings.append(Change("version", "changed", (), old.get("version"), new.get("version")))
    return result
