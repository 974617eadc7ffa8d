"""DNS TXT lookups for DKIM keys: the I/O edge the engine's ``dns_txt`` parameter expects.

Unlike dkimpy's built-in lookup, a resolver failure (timeout, no name servers) raises
DnsLookupError so the engine reports DKIM "temperror" instead of a false "fail"; only a
name that really does not exist (NXDOMAIN / no TXT) returns None.
"""

from __future__ import annotations

import dns.exception
import dns.resolver


class DnsLookupError(Exception):
    pass


def resolver_txt(name: str, timeout: float = 5.0) -> bytes | None:
    try:
        answer = dns.resolver.resolve(name, "TXT", lifetime=timeout, raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.NoResolverConfiguration,
            dns.exception.DNSException) as exc:
        raise DnsLookupError(f"{name}: {exc}") from None
    if answer.rrset is None:
        return None
    for rdata in answer.rrset:
        return b"".join(rdata.strings)
    return None
