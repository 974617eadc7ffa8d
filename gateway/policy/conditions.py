"""Match conditions that do not route a rule (device, posture, destination, content, time,
systems inventory). Each is compiled once into a ``Check``: the facts it needs and a
function ``(query, facts) -> True | False | None`` (None = cannot tell at this stage).

Host and URL conditions live in compiler.py because they also decide which bucket a rule
sits in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import ip_network
from typing import Any

from gateway.i18n import Text
from gateway.policy import facts as F
from gateway.policy.query import PolicyQuery, normalize_host

T_PLATFORM_TWICE = Text("プラットフォーム {plat!r} が重複しています（大文字・小文字は区別しません）",
                        "platform {plat!r} given twice (platform names are compared without case)")

CheckFn = Callable[[PolicyQuery, F.Facts], "bool | None"]


@dataclass(frozen=True, slots=True)
class Check:
    needs: int  # facts.* flags; unknown when the stage lacks one of them
    fn: CheckFn
    text: str  # for the verdict's explanation
    may_need: int = 0  # further facts the check asks for when ``needs`` alone cannot settle it


class ConditionError(ValueError):
    """A bad condition value; ``index`` points into a list value for the line number."""

    def __init__(self, message: str, index: int | None = None, key: str | None = None, text: Text | None = None):
        super().__init__(message)
        self.index = index
        self.key = key
        self.text = text  # the message in both languages, when it has them


def _bad(ja: str, en: str, index: int | None = None, key: str | None = None) -> ConditionError:
    """A ConditionError in Japanese and English (what `policy check` prints per KANMON_LANG)."""
    return ConditionError(en, index, key, text=Text(ja, en))


@dataclass(frozen=True)
class System:
    name: str
    klass: int  # 機密性 1-3
    hosts: frozenset[str]  # a host entry covers its sub-domains
    networks: tuple[Any, ...]


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def parse_networks(values: list[Any]) -> tuple[Any, ...]:
    out = []
    for i, v in enumerate(values):
        try:
            out.append(ip_network(str(v), strict=False))
        except ValueError as exc:
            raise _bad(f"IP ネットワークではありません: {v!r} ({exc})", f"not an IP network: {v!r} ({exc})", i) from None
    return tuple(out)


def parse_version(text: str) -> tuple[int, ...]:
    """'17.4.1' -> (17, 4, 1); trailing non-digits ignored ('14.0-beta' -> (14, 0))."""
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "ki": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "mi": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "gi": 1024**3}


def parse_size(value: int | str) -> int:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*([0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise _bad(f"サイズではありません: {value!r}(例 10MiB、500kB、1048576)", f"not a size: {value!r} (e.g. 10MiB, 500kB, 1048576)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_seconds(value: Any) -> int:
    """``90`` (seconds), ``"30m"``, ``"8h"``, ``"1d"`` -> seconds."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = re.fullmatch(r"\s*([0-9]+)\s*([smhd])\s*", str(value))
    if not m or int(m.group(1)) == 0:
        raise _bad(f"時間の長さではありません(例 8h、30m、3600): {value!r}", f"not a duration (e.g. 8h, 30m, 3600): {value!r}")
    return int(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _strings(value: Any, lower: bool = True) -> frozenset[str]:
    return frozenset(str(v).lower() if lower else str(v) for v in as_list(value))


def _content_types(value: Any) -> tuple[frozenset[str], tuple[str, ...]]:
    exact, prefixes = set(), []
    for i, v in enumerate(as_list(value)):
        v = str(v).strip().lower()
        if "/" not in v:
            raise _bad(f"コンテンツタイプではありません: {v!r}(例 application/zip、video/*)",
                       f"not a content type: {v!r} (e.g. application/zip or video/*)", i)
        if v.endswith("/*"):
            prefixes.append(v[:-1])
        else:
            exact.add(v)
    return frozenset(exact), tuple(prefixes)


def _ctype_matcher(value: Any, attr: str) -> CheckFn:
    exact, prefixes = _content_types(value)

    def fn(q: PolicyQuery, _f: F.Facts) -> bool:
        ct = getattr(q, attr)
        if not ct:
            return False
        base = ct.split(";", 1)[0].strip().lower()
        return base in exact or base.startswith(prefixes)

    return fn


def _days(spec: list[str] | None) -> frozenset[int]:
    if not spec:
        return frozenset(range(7))
    names = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    out: set[int] = set()
    for d in spec:
        if d == "weekdays":
            out |= {0, 1, 2, 3, 4}
        elif d == "weekend":
            out |= {5, 6}
        elif d == "all":
            out |= set(range(7))
        else:
            out.add(names.index(d))
    return frozenset(out)


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def time_windows(value: Any) -> tuple[tuple[frozenset[int], int, int], ...]:
    """(days, from_minute, to_minute); a window whose end is before its start runs past
    midnight and belongs to the day it starts on."""
    out = []
    for i, w in enumerate(as_list(value)):
        start, end = _minutes(w["from"]), _minutes(w["to"])
        if start == end:
            raise _bad(f"時間帯が空です: {w['from']}-{w['to']}", f"empty time window {w['from']}-{w['to']}", i)
        out.append((_days(w.get("days")), start, end))
    return tuple(out)


def in_windows(windows: tuple[tuple[frozenset[int], int, int], ...], weekday: int, minute: int) -> bool:
    for days, start, end in windows:
        if start < end:
            if weekday in days and start <= minute < end:
                return True
        else:  # overnight: the start day's evening or the next day's early hours
            if (weekday in days and minute >= start) or ((weekday - 1) % 7 in days and minute < end):
                return True
    return False


_CLASS_OPS: dict[str, Callable[[int, int], bool]] = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "=": lambda a, b: a == b,
}


def system_check(selected: list[System], text: str) -> Check:
    """Destination belongs to one of ``selected``: by host name (known from DNS on) or by
    address (known from TLS on)."""
    hosts = frozenset(h for s in selected for h in s.hosts)
    networks = tuple(n for s in selected for n in s.networks)

    def fn(q: PolicyQuery, f: F.Facts) -> bool | None:
        host = q.host
        if host and f.known & F.HOST:
            name = host
            while True:
                if name in hosts:
                    return True
                dot = name.find(".")
                if dot == -1:
                    break
                name = name[dot + 1:]
        if not networks:
            return False
        if not f.known & F.DST:
            return None
        ip = q.dst_ip
        return ip is not None and any(ip in n for n in networks)

    return Check(F.HOST, fn, text, F.DST if networks else 0)


def build_check(key: str, value: Any, systems: Mapping[str, System]) -> Check:
    """One condition -> Check. Raises ConditionError for values the schema cannot judge."""
    if key == "device_group":
        groups = _strings(value, lower=False)
        return Check(F.DEVICE, lambda q, f: not groups.isdisjoint(q.device.groups), f"device group in {sorted(groups)}")
    if key == "ownership":
        own = str(value)
        return Check(F.DEVICE, lambda q, f: q.device.ownership == own, f"ownership {own}")
    if key == "device_id":
        ids = _strings(value, lower=False)
        return Check(F.DEVICE, lambda q, f: q.device.device_id in ids, f"device id in {sorted(ids)}")
    if key == "user":
        users = _strings(value, lower=False)
        return Check(F.DEVICE, lambda q, f: q.device.user in users, f"user in {sorted(users)}")
    if key == "signed_in":
        flag = bool(value)
        return Check(F.DEVICE, lambda q, f: q.device.signed_in == flag, "user signed in" if flag else "no user signed in")
    if key == "user_group":
        ugroups = _strings(value, lower=False)
        return Check(F.DEVICE, lambda q, f: not ugroups.isdisjoint(q.device.user_groups),
                     f"user's IdP group in {sorted(ugroups)}")
    if key == "amr":
        methods = _strings(value, lower=False)
        return Check(F.DEVICE, lambda q, f: not methods.isdisjoint(q.device.amr), f"sign-in method (amr) in {sorted(methods)}")
    if key == "acr":
        classes = _strings(value, lower=False)
        return Check(F.DEVICE, lambda q, f: q.device.acr in classes, f"sign-in context (acr) in {sorted(classes)}")
    if key == "mfa":
        flag = bool(value)
        return Check(F.DEVICE, lambda q, f: q.device.signed_in and q.device.mfa == flag,
                     "signed in with MFA" if flag else "signed in without MFA")
    if key == "mfa_within":
        seconds = parse_duration_seconds(value)

        def fresh(q: PolicyQuery, f: F.Facts) -> bool:
            d = q.device
            return (d.signed_in and d.mfa and d.auth_time is not None
                    and (f.now - d.auth_time).total_seconds() <= seconds)

        # Needs the clock: a host verdict cached for the connection table must not outlive it.
        return Check(F.DEVICE | F.TIME, fresh, f"signed in with MFA within {seconds} s")
    if key == "device_status":
        statuses = _strings(value)
        return Check(F.DEVICE, lambda q, f: q.device.status in statuses, f"device status in {sorted(statuses)}")
    if key == "platform":
        platforms = _strings(value)
        return Check(F.DEVICE, lambda q, f: (q.device.platform or "").lower() in platforms, f"platform in {sorted(platforms)}")
    if key == "os_version_below":
        minimums = {}
        for plat, ver in value.items():
            parsed = parse_version(str(ver))
            if not parsed:
                raise _bad(f"{plat} のバージョン番号ではありません: {ver!r}", f"not a version number for {plat}: {ver!r}")
            if str(plat).lower() in minimums:  # compared without case below: IOS would override ios
                text = T_PLATFORM_TWICE.format(plat=str(plat)[:60])
                raise ConditionError(text.en, text=text)
            minimums[str(plat).lower()] = parsed

        def below(q: PolicyQuery, f: F.Facts) -> bool:
            minimum = minimums.get((q.device.platform or "").lower())
            if minimum is None:
                return False
            # A device that reports no version cannot show it is current: counts as below.
            have = parse_version(q.device.os_version) if q.device.os_version else ()
            return have < minimum

        return Check(F.DEVICE, below, "OS below minimum " + ", ".join(f"{p} {'.'.join(map(str, v))}" for p, v in minimums.items()))
    if key == "jailbroken":
        flag = bool(value)
        return Check(F.DEVICE, lambda q, f: q.device.jailbroken == flag, "jailbroken/rooted" if flag else "not jailbroken")
    if key == "underlay_network":
        nets = parse_networks(as_list(value))
        return Check(F.DEVICE, lambda q, f: q.device.underlay_ip is not None and any(q.device.underlay_ip in n for n in nets),
                     f"underlay source in {[str(n) for n in nets]}")
    if key == "scheme":
        schemes = _strings(value)
        return Check(F.URL, lambda q, f: (q.scheme or "").lower() in schemes, f"scheme in {sorted(schemes)}")
    if key == "method":
        methods = frozenset(str(v).upper() for v in as_list(value))
        return Check(F.URL, lambda q, f: (q.method or "").upper() in methods, f"method in {sorted(methods)}")
    if key == "dst_cidr":
        nets = parse_networks(as_list(value))
        return Check(F.DST, lambda q, f: q.dst_ip is not None and any(q.dst_ip in n for n in nets),
                     f"destination in {[str(n) for n in nets]}")
    if key == "dst_port":
        ranges = []
        for i, p in enumerate(as_list(value)):
            lo, _, hi = str(p).partition("-")
            lo_i, hi_i = int(lo), int(hi or lo)
            if not (1 <= lo_i <= hi_i <= 65535):
                raise _bad(f"ポート範囲が正しくありません: {p!r}", f"bad port range {p!r}", i)
            ranges.append((lo_i, hi_i))
        rng = tuple(ranges)
        return Check(F.DST, lambda q, f: q.dst_port is not None and any(lo <= q.dst_port <= hi for lo, hi in rng),
                     f"port in {[f'{a}-{b}' if a != b else str(a) for a, b in rng]}")
    if key == "protocol":
        proto = str(value)
        return Check(F.DST, lambda q, f: q.protocol == proto, f"protocol {proto}")
    if key == "request_content_type":
        return Check(F.REQUEST_BODY, _ctype_matcher(value, "request_content_type"), f"request content type in {as_list(value)}")
    if key == "response_content_type":
        return Check(F.RESPONSE, _ctype_matcher(value, "response_content_type"), f"response content type in {as_list(value)}")
    if key == "file_extension":
        exts = tuple("." + str(e).lower().lstrip(".") for e in as_list(value))

        def has_ext(q: PolicyQuery, f: F.Facts) -> bool:
            if not q.url:
                return False
            path = q.url.split("?", 1)[0].split("#", 1)[0]
            scheme_end = path.find("://")
            slash = path.find("/", scheme_end + 3 if scheme_end != -1 else 0)
            return slash != -1 and path[slash:].lower().endswith(exts)

        return Check(F.URL, has_ext, f"file extension in {list(exts)}")
    if key == "body_size_over":
        limit = parse_size(value)
        return Check(F.REQUEST_BODY, lambda q, f: q.body_size is not None and q.body_size > limit, f"request body over {limit} bytes")
    if key == "time":
        windows = time_windows(value)

        def in_time(q: PolicyQuery, f: F.Facts) -> bool:
            local = f.local_now()
            return in_windows(windows, local.weekday(), local.hour * 60 + local.minute)

        shown = ", ".join(f"{w['from']}-{w['to']}" for w in as_list(value))
        return Check(F.TIME, in_time, f"time in {shown}")
    if key == "system":
        selected = []
        for i, name in enumerate(as_list(value)):
            if name not in systems:
                raise _bad(f"システム {name!r} は定義されていません(systems: に書いてください)",
                           f"unknown system {name!r} (define it under systems:)", i)
            selected.append(systems[name])
        return system_check(selected, f"system in {[s.name for s in selected]}")
    if key == "system_class":
        m = re.fullmatch(r"\s*(<=|>=|==|<|>|=)?\s*([1-3])\s*", str(value))
        assert m  # the schema's pattern guarantees the shape
        op, bound = m.group(1) or "==", int(m.group(2))
        cmp = _CLASS_OPS[op]
        selected = [s for s in systems.values() if cmp(s.klass, bound)]
        return system_check(selected, f"system class {op} {bound} (機密性{op}{bound})")
    raise _bad(f"知らない条件です: {key!r}", f"unknown condition {key!r}")


def system_from_spec(name: str, spec: Mapping[str, Any]) -> System:
    hosts = set()
    for i, h in enumerate(spec.get("hosts", [])):
        n = normalize_host(str(h))
        if n is None:
            raise _bad(f"ホスト名ではありません: {h!r}", f"not a host name: {h!r}", i, "hosts")
        hosts.add(n)
    try:
        nets = parse_networks(list(spec.get("cidrs", [])))
    except ConditionError as exc:
        raise ConditionError(str(exc), exc.index, "cidrs", text=exc.text) from None
    if not hosts and not nets:
        raise _bad(f"システム {name!r} にホストも CIDR もありません", f"system {name!r} names no hosts and no cidrs")
    return System(name, int(spec["class"]), frozenset(hosts), nets)

