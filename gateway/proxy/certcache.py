"""Leaf certificates toward devices, kept in a bounded LRU sized by ``proxy.leaf_cert_cache``.

mitmproxy's CertStore keeps the last ``STORE_CAP`` (100) leaves it made, first in first out,
and on every eviction rebuilds its whole dict comparing entries by certificate fingerprint
(a SHA-256 of each certificate): fine at 100, quadratic at 10,000. A gateway whose devices
visit a few thousand sites would make a new leaf (a signature) for most new connections.

``BoundedCertStore`` is mitmproxy's store with its own eviction: least recently used, a
capacity per instance (no class attribute patched for the whole process), O(1) per hit and
per eviction. Making and looking up leaves stays mitmproxy's code (``get_cert``); only which
ones are kept changes. ``CachingTlsConfig`` is mitmproxy's TlsConfig addon that puts such a
store in place of the one it loads from the confdir.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from cryptography import x509
from mitmproxy import certs
from mitmproxy.addons import tlsconfig

# Leaves. Measured: about 2.0 KiB of RSS per ECDSA leaf (2.4 KiB RSA), so 10,000 take about 20 MB.
DEFAULT_LEAF_CERT_CACHE = 10_000


class BoundedCertStore(certs.CertStore):
    def __init__(self, *args, capacity: int = DEFAULT_LEAF_CERT_CACHE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._lru: OrderedDict[object, certs.CertStoreEntry] = OrderedDict()   # generated leaves only
        self._key_of: dict[int, object] = {}                                   # id(entry) -> its key

    @classmethod
    def adopt(cls, store: certs.CertStore, capacity: int) -> "BoundedCertStore":
        """The same CA, CRL, DH parameters and operator-given certificates as ``store``."""
        new = cls(store.default_privatekey, store.default_ca, store.default_chain_file, store.default_crl,
                  store.dhparams, capacity=capacity)
        new.certs = dict(store.certs)   # certificates given with mitmproxy's `certs` option: never evicted
        return new

    def __len__(self) -> int:
        return len(self._lru)

    def get_cert(self, commonname: str | None, sans: Iterable[x509.GeneralName],
                 organization: str | None = None, crl_url: str | None = None) -> certs.CertStoreEntry:
        entry = super().get_cert(commonname, sans, organization, crl_url)
        key = self._key_of.get(id(entry))
        if key is not None:
            self._lru.move_to_end(key)   # a hit: most recently used
        return entry

    def expire(self, entry: certs.CertStoreEntry) -> None:
        """Called by CertStore.get_cert for each leaf it has just made and stored."""
        key = next(reversed(self.certs))   # get_cert stored it last (dicts keep insertion order) ...
        if self.certs[key] is not entry:   # ... or else find it (never seen with mitmproxy 12.2)
            key = next(k for k, v in self.certs.items() if v is entry)
        self._lru[key] = entry
        self._key_of[id(entry)] = key
        while len(self._lru) > self.capacity:
            old_key, old = self._lru.popitem(last=False)
            del self._key_of[id(old)]
            self.certs.pop(old_key, None)


class CachingTlsConfig(tlsconfig.TlsConfig):
    """mitmproxy's TlsConfig with a BoundedCertStore of ``capacity`` leaves."""

    name = "tlsconfig"

    def __init__(self, capacity: int = DEFAULT_LEAF_CERT_CACHE) -> None:
        super().__init__()
        self.capacity = capacity

    def configure(self, updated) -> None:
        super().configure(updated)
        if self.certstore is not None and not isinstance(self.certstore, BoundedCertStore):
            self.certstore = BoundedCertStore.adopt(self.certstore, self.capacity)
