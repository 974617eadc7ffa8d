"""Destinations grouped by registered domain, with the bytes the device sent (incident flash
report, issue #18). Pure, no I/O.

The registered domain is the public suffix plus one label, from the Public Suffix List the
project already pins (``publicsuffixlist``, ICANN section, the same instance the feeds use:
gateway/feeds/checks.py). Multi-level suffixes come from the list, not from a rule of
thumb: ``www.example.co.jp`` -> ``example.co.jp``; ``www.city.shibuya.tokyo.jp`` ->
``city.shibuya.tokyo.jp`` (``shibuya.tokyo.jp`` is a suffix). LGWAN names follow the list
too: it has ``lg.jp`` only, so ``www.city.chiyoda.lg.jp`` -> ``chiyoda.lg.jp``. Private
suffixes (``blogspot.com``, ``github.io``) are not registrations and are not split further.

Names are compared in their one normalized form (gateway/hostname.py: IDNA UTS 46,
punycode), so ``例え.jp`` and ``xn--r8jz45g.jp`` are one group; the report shows the Unicode
form beside it. An address, a name that is itself a public suffix or a single label stands
for itself."""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import idna

from gateway.feeds.checks import public_suffix_list
from gateway.hostname import normalize_host


@dataclass(frozen=True)
class DomainGroup:
    domain: str                  # registered domain (punycode), or the address
    display: str                 # Unicode form when the name is an IDN, else == domain
    hosts: tuple[str, ...]       # the names seen under it (sorted; at most ``max_hosts``)
    more_hosts: int              # names not listed
    requests: int                # records (proxy requests and conn flows)
    upload_bytes: int            # bytes the device sent (request bodies, raw TCP client bytes)
    download_bytes: int
    blocked: int


@dataclass(frozen=True)
class Transfer:
    """One record's facts: where to, what went up and down, whether it was blocked."""

    host: str
    upload: int = 0
    download: int = 0
    blocked: bool = False


@lru_cache(maxsize=8192)    # a device's records repeat a few names many times
def registered_domain(host: str) -> str:
    """The registered domain of ``host`` (see the module docstring); the input itself
    (normalized when it can be) when it has none."""
    name = normalize_host(host)
    if name is None:
        return host
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    private = public_suffix_list().privatesuffix(name)
    return private or name


def unicode_form(name: str) -> str:
    """``xn--r8jz45g.jp`` -> ``例え.jp``; the name unchanged when it is not an IDN or does
    not decode (an invalid punycode label is shown as written)."""
    if "xn--" not in name:
        return name
    try:
        return idna.decode(name, uts46=False)
    except idna.IDNAError:
        labels = []
        for part in name.split("."):
            try:
                labels.append(idna.decode(part) if part.startswith("xn--") else part)
            except idna.IDNAError:
                labels.append(part)
        return ".".join(labels)


class DomainTally:
    """Adds transfers up per registered domain as records stream by (memory: one entry per
    domain and up to ``max_hosts`` + 1 names each, not one per record)."""

    def __init__(self, max_hosts: int = 8):
        self.max_hosts = max_hosts
        self.hosts: dict[str, set[str]] = defaultdict(set)
        self.more: dict[str, set[str]] = defaultdict(set)   # names past max_hosts, to count them once
        self.requests: dict[str, int] = defaultdict(int)
        self.up: dict[str, int] = defaultdict(int)
        self.down: dict[str, int] = defaultdict(int)
        self.blocked: dict[str, int] = defaultdict(int)

    def add(self, item: Transfer) -> None:
        domain = registered_domain(item.host)
        name = normalize_host(item.host) or item.host
        names = self.hosts[domain]
        if name not in names:
            if len(names) < self.max_hosts:
                names.add(name)
            elif len(self.more[domain]) < 10_000:      # counted up to a bound, then "10000+"
                self.more[domain].add(name)
        self.requests[domain] += 1
        self.up[domain] += max(0, item.upload)
        self.down[domain] += max(0, item.download)
        self.blocked[domain] += 1 if item.blocked else 0

    def result(self) -> tuple[DomainGroup, ...]:
        """Most bytes sent first (exfiltration is what an incident report looks for), then
        most records, then the name."""
        groups = [DomainGroup(domain, unicode_form(domain), tuple(sorted(names)), len(self.more.get(domain, ())),
                              self.requests[domain], self.up[domain], self.down[domain], self.blocked[domain])
                  for domain, names in self.hosts.items()]
        groups.sort(key=lambda g: (-g.upload_bytes, -g.requests, g.domain))
        return tuple(groups)


def group_by_registered_domain(transfers: Iterable[Transfer], *, max_hosts: int = 8) -> tuple[DomainGroup, ...]:
    tally = DomainTally(max_hosts)
    for item in transfers:
        tally.add(item)
    return tally.result()
