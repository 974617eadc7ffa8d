"""The one host-name normalization (issue #15): rule hosts, list entries, configured hosts
and the hosts of requests all go through ``normalize_host``, so a name written in a policy
and the same name on the wire meet in one form. Pure, no I/O.

The form: lower case, no surrounding blanks or trailing dots, an IP literal in its one
canonical spelling, and an internationalized name in the ASCII form browsers send — IDNA
UTS #46 *nontransitional* processing (the ``idna`` package's mapping table), as in the
WHATWG URL standard that Chromium, Firefox and Safari follow:

- ``faß.de`` is ``xn--fa-hia.de`` (the name browsers ask DNS for and put in SNI and Host).
  The stdlib ``idna`` codec (IDNA 2003) made it ``fass.de``: a policy entry ``faß.de`` then
  blocked ``fass.de`` but let ``xn--fa-hia.de`` through. ``fass.de`` is a different name
  with its own registration (DENIC has registered ß names since 2010): a policy that means
  both lists both.
- Full-width letters, ``ﬁ`` and the other UTS 46 mappings apply; ``。．｡`` are full stops.
- A label the IDNA 2008 rules would refuse but browsers accept (``☃.net``) is still given
  its punycode form (``xn--n3h``): the same input always gives the same output, so a
  rule cannot be stepped around by a spelling the engine would not read.
- A name with a code point UTS 46 disallows gives ``None`` (no host: no host rule matches;
  the policy's other rules and default decide, as for a request without a name).

Plain ASCII (nearly every request: browsers send punycode already) takes a fast path that
never enters the mapping table: for ASCII, UTS 46 only folds the case.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence, Set
from ipaddress import ip_address

import idna  # UTS 46 mapping table (idna==3.20 pinned); the stdlib codec is IDNA 2003


def normalize_host(host: str | None) -> str | None:
    """Lower-case, no trailing dot, IDNA UTS 46 (punycode) form; ``None`` for an empty or
    unmappable name. IP literals are returned in their canonical text form. Idempotent."""
    if not host:
        return None
    ascii_input = host.isascii()
    h = host.lower() if ascii_input else host  # UTS 46 folds the case of the rest itself
    while True:  # to a fixed point, so that normalizing twice changes nothing (tests/fuzz)
        stripped = h.strip().rstrip(".")
        if stripped.startswith("[") and stripped.endswith("]"):
            stripped = stripped[1:-1]
        if stripped == h:
            break
        h = stripped
    if not h:
        return None
    if ":" in h:
        # An IPv6 literal in its one canonical spelling: [2001:DB8:0::1] is 2001:db8::1.
        try:
            return str(ip_address(h))
        except ValueError:
            pass
    if h.isascii():  # "A\xa0" is ASCII once the blank is stripped (found by tests/fuzz)
        return h if ascii_input else h.lower()
    ascii_form = _to_ascii(h)
    # The mapping may uncover blanks, dots or brackets (``例え.jp。`` ends in a full stop):
    # once more through the ASCII path, which is a fixed point.
    return normalize_host(ascii_form) if ascii_form else None


def _to_ascii(name: str) -> str | None:
    """UTS 46 ToASCII, nontransitional, without the IDNA 2008 validity checks browsers
    skip: map, then punycode each non-ASCII label."""
    try:
        mapped = idna.uts46_remap(name, std3_rules=False, transitional=False)
    except (idna.IDNAError, ValueError, IndexError):
        return None
    labels = mapped.split(".")
    for i, label in enumerate(labels):
        if not label.isascii():
            try:
                labels[i] = "xn--" + label.encode("punycode").decode("ascii")
            except UnicodeError:
                return None
    return ".".join(labels)


def normalize_host_entry(entry: str) -> str:
    """A configured host entry: a name (normalized as above) or ``.suffix`` for a name and
    everything under it; an entry that does not map is kept lower-cased (it matches nothing
    a request can carry)."""
    text = entry.strip()
    if text.startswith("."):
        rest = normalize_host(text[1:])
        return "." + rest if rest else text.lower()
    return normalize_host(text) or text.lower()


def split_host_entries(entries: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Host entries (normalized with `normalize_host_entry`) split into exact names and
    ``.suffix`` entries, the two arguments of `host_in`."""
    hosts = [normalize_host_entry(e) for e in entries]
    return frozenset(h for h in hosts if not h.startswith(".")), tuple(h for h in hosts if h.startswith("."))


def host_in(host: str | None, exact: Set[str], suffixes: Sequence[str]) -> bool:
    """The one "exact or .suffix" matcher: the normalized ``host`` is one of ``exact``, or is a
    ``.suffix`` entry's name or a name under it (``.example.jp`` matches ``example.jp`` and
    ``www.example.jp``, never ``badexample.jp``)."""
    return bool(host) and (host in exact or any(host == s[1:] or host.endswith(s) for s in suffixes))


def canonical_address(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The one address parser for peers and destinations: an IPv6 zone (``%eth0``) dropped, an
    IPv4-mapped IPv6 address (how a dual-stack socket sees an IPv4 peer) as the IPv4 address
    the registry and the rules name; None for anything that is not an address."""
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(str(text).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
