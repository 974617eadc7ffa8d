"""On-disk cache of what a policy compile works out from its inputs (issue #22, engine
scale): a restart with an unchanged policy, lists, feed copies and engine does not parse a
million list entries again.

What is kept is ``compiler.Prepared`` (the parsed list files and the URL patterns RE2
accepted), the part of a compile that is plain data; rules and the RE2 sets are rebuilt
from it in memory (a rule's checks are closures and RE2 has no serialized form). The
compiler stays pure: this module is the I/O edge, called by policy/loader.py.

- **Key**: SHA-256 of the policy text, every list file (name, path, text), the feed copies'
  versions, the Prepared format, the Python version (marshal's format) and the engine
  version (the source of the modules that parse and compile). Any change gives a new key,
  and a file under another key is never read.
- **File**: ``<state_dir>/policy-cache/<key>.prepared``: a magic line, the SHA-256 of the
  payload, its length, the payload (marshal: plain tuples, frozensets and strings only).
  Written to a temporary file, fsynced, renamed over: a crash leaves the old file or the
  new one, never half of one. Older keys' files are removed after a write.
- **Fail closed**: a file that is short, long, bit-flipped, of another format or key, or
  whose payload is not the expected shape is refused (logged and counted: ``refused``),
  removed, and the policy compiled from its sources as if there were no cache. A damaged
  cache can only cost a recompile, never a different verdict (tests/unit/test_policy_cache.py
  feeds it truncated and bit-flipped files).
- **Big host tables are mapped, not decoded** (issue #22, "the compiled policy is built once
  and shared"): a host table of at least ``MAP_MIN_ENTRIES`` names is written beside the
  payload as its own file (gateway/runtime/hosttablefile.py: ``<sha256>.hosts``, the layout
  of gateway/policy/hosttable.py) and the payload names it by its digest. A load maps that
  file read-only instead of building a dict, so the gateway and every inspection worker that
  loads the policy share one copy; the compile that wrote it swaps its own dicts for the
  mapping too (``shared_tables``, called by policy/loader.py). A missing or damaged table file
  refuses the whole entry as above (compiled from the sources, written anew).
- The payload is read only after its digest matched: marshal is not meant for hostile
  bytes, and the digest turns random damage into a refusal. The state directory is the
  gateway's own (mode 0700); whoever can write it can change the policy itself.
"""

from __future__ import annotations

import hashlib
import logging
import marshal
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from gateway.policy import hosttable
from gateway.policy.compiler import PREPARED_FORMAT, Prepared
from gateway.policy.lists import DomainList
from gateway.runtime import hosttablefile

log = logging.getLogger("kanmon.policycache")

MAGIC = b"KANMON-PREPARED-POLICY\n"
SUFFIX = ".prepared"
_DIGEST = 32
_LENGTH = 8
# The modules whose code decides what a compile derives from its inputs: a change to any of
# them is a new engine version (and so a new key).
_ENGINE_SOURCES = ("gateway/policy/compiler.py", "gateway/policy/lists.py", "gateway/policy/urlpattern.py",
                   "gateway/hostname.py", "gateway/runtime/policycache.py", "gateway/policy/hosttable.py")
_ROOT = Path(__file__).resolve().parents[2]   # the checkout (this file: gateway/runtime/)
# A host table of at least this many names is mapped from its own file (smaller ones stay in
# the payload and become dicts: a lookup in a dict is ~3x faster, and they cost little).
MAP_MIN_ENTRIES = 4096
_TABLES = ("exact", "suffix")


# Libraries whose version changes what a compile derives: RE2 accepts or refuses patterns,
# idna's UTS 46 tables map list entries.
_ENGINE_LIBRARIES = ("google-re2", "idna")


def engine_version() -> str:
    """A hash of the engine's source files, the libraries it derives with, and the Prepared
    format."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256(f"prepared-format {PREPARED_FORMAT}\n".encode())
    for lib in _ENGINE_LIBRARIES:
        try:
            h.update(f"{lib}=={version(lib)}\n".encode())
        except PackageNotFoundError:
            h.update(f"{lib} unknown\n".encode())
    for name in _ENGINE_SOURCES:
        h.update(b"\0" + name.encode() + b"\0" + (_ROOT / name).read_bytes())
    return h.hexdigest()


_ENGINE_VERSION: str | None = None


def cache_key(policy_text: str, list_texts: Mapping[str, tuple[str, str]], feed_versions: str) -> str:
    """SHA-256 over every input of a compile and the engine that compiles it."""
    global _ENGINE_VERSION
    if _ENGINE_VERSION is None:
        _ENGINE_VERSION = engine_version()
    h = hashlib.sha256()
    for part in (_ENGINE_VERSION, sys.version, policy_text, feed_versions):
        _update(h, part)
    for name in sorted(list_texts):
        filename, text = list_texts[name]
        for part in (name, filename, text):
            _update(h, part)
    return h.hexdigest()


def _update(h: "hashlib._Hash", part: str) -> None:
    """Its length, then its bytes (two updates: not a third copy of a list's megabytes)."""
    data = part.encode("utf-8", "surrogatepass")
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


class DamagedCache(ValueError):
    """The cache file is not one this engine wrote for this key."""


def _joined(names: frozenset[str]) -> str:
    # One string per set: marshal writes a frozenset of a million strings in 2.3 s (it
    # tracks every object for back-references), one joined string in a few ms; split and
    # frozenset() read it back in 0.25 s. A list entry is a checked domain name: no "\n".
    return "\n".join(names)


def _split(text: str) -> frozenset[str]:
    return frozenset(text.split("\n")) if text else frozenset()


def _table_groups(table: Mapping[str, tuple[int, ...]]) -> tuple[tuple[tuple[int, ...], str], ...]:
    """A host table as (rule ordinals, the hosts that have them, joined): a list's million
    hosts share one ordinal tuple, so this is a handful of strings."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for host, ordinals in table.items():
        groups.setdefault(ordinals, []).append(host)
    return tuple((ordinals, "\n".join(hosts)) for ordinals, hosts in groups.items())


def _table(groups: object) -> dict[str, tuple[int, ...]]:
    if type(groups) is not tuple:
        raise DamagedCache("a host table is malformed")
    table: dict[str, tuple[int, ...]] = {}
    for entry in groups:
        if not (type(entry) is tuple and len(entry) == 2 and type(entry[1]) is str and type(entry[0]) is tuple
                and entry[0] and all(type(o) is int and o >= 0 for o in entry[0]) and list(entry[0]) == sorted(set(entry[0]))):
            raise DamagedCache("a host table entry is malformed")
        hosts = entry[1].split("\n")
        if not table:
            table = dict.fromkeys(hosts, entry[0])
        else:
            before = len(table)
            table.update(dict.fromkeys(hosts, entry[0]))
            if len(table) != before + len(hosts):
                raise DamagedCache("a host is in two groups of a host table")
    return table


def encode(key: str, prepared: Prepared, mapped: Mapping[str, str] | None = None) -> bytes:
    """``mapped``: "exact"/"suffix" -> the digest of the host-table file that holds that
    table (hosttablefile.write); the payload then names the file instead of holding the hosts."""
    mapped = mapped or {}
    lists = tuple((name, lst.filename, _joined(lst.suffix), _joined(lst.exact), lst.regexes)
                  for name, lst in sorted(prepared.lists.items()))
    wildcards = tuple((raw, *fields) for raw, fields in prepared.wildcards.items())
    payload = marshal.dumps((PREPARED_FORMAT, key, lists, tuple(sorted(prepared.sizes.items())),
                             mapped.get("exact") or _table_groups(prepared.exact),
                             mapped.get("suffix") or _table_groups(prepared.suffix), wildcards,
                             tuple(prepared.valid_patterns)))
    return MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(_LENGTH, "big") + payload


def decode(data: bytes, key: str, open_table: Callable[[str], Mapping[str, tuple[int, ...]]] | None = None) -> Prepared:
    """The Prepared in ``data``, or DamagedCache saying why not. ``open_table``: maps a host
    table the payload names by its digest (raises DamagedCache); without it such a payload is
    refused."""
    head = len(MAGIC) + _DIGEST + _LENGTH
    if len(data) < head or not data.startswith(MAGIC):
        raise DamagedCache("not a prepared-policy cache file (or cut short)")
    digest = data[len(MAGIC):len(MAGIC) + _DIGEST]
    length = int.from_bytes(data[len(MAGIC) + _DIGEST:head], "big")
    payload = data[head:]
    if len(payload) != length:
        raise DamagedCache(f"payload is {len(payload)} bytes, the header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise DamagedCache("payload digest does not match")
    try:
        value = marshal.loads(payload)
    except (EOFError, ValueError, TypeError) as exc:
        raise DamagedCache(f"payload unreadable: {exc}") from None
    return _prepared(value, key, open_table)


def _host_table(value: object, open_table: Callable[[str], Mapping[str, tuple[int, ...]]] | None) -> Mapping[str, tuple[int, ...]]:
    """A host table of the payload: groups (a dict is built) or a mapped file's digest."""
    if type(value) is str:
        if open_table is None:
            raise DamagedCache("the payload names a host-table file and none can be opened here")
        return open_table(value)
    return _table(value)


def _strings(value: object) -> bool:
    return type(value) is tuple and all(type(item) is str for item in value)


_WILDCARD_TYPES = ((str,), (str, type(None)), (bool,), (str, type(None)), (str, type(None)), (str,), (str,))


def _prepared(value: object, key: str, open_table: Callable[[str], Mapping[str, tuple[int, ...]]] | None = None) -> Prepared:
    """Check the shape of a decoded payload (it was written by ``encode``; anything else is
    damage)."""
    if not (type(value) is tuple and len(value) == 8):
        raise DamagedCache("payload is not a prepared policy")
    fmt, stored_key, lists, sizes, exact, suffix, wildcards, valid = value
    if fmt != PREPARED_FORMAT:
        raise DamagedCache(f"format {fmt!r}, this engine reads {PREPARED_FORMAT}")
    if stored_key != key:
        raise DamagedCache("written for other inputs")
    if type(lists) is not tuple or not _strings(valid) or type(sizes) is not tuple or type(wildcards) is not tuple:
        raise DamagedCache("payload is not a prepared policy")
    out: dict[str, DomainList] = {}
    for entry in lists:
        if not (type(entry) is tuple and len(entry) == 5):
            raise DamagedCache("a list entry is malformed")
        name, filename, suffix_text, exact_text, regexes = entry
        if not (type(name) is str and type(filename) is str and type(suffix_text) is str and type(exact_text) is str
                and type(regexes) is tuple
                and all(type(r) is tuple and len(r) == 2 and type(r[0]) is str and type(r[1]) is int for r in regexes)):
            raise DamagedCache(f"list {name!r} is malformed")
        out[name] = DomainList(name, filename, _split(suffix_text), _split(exact_text), regexes)
    if not all(type(e) is tuple and len(e) == 2 and type(e[0]) is str and type(e[1]) is int for e in sizes):
        raise DamagedCache("list sizes are malformed")
    compiled: dict[str, tuple] = {}
    for entry in wildcards:
        if not (type(entry) is tuple and len(entry) == 8 and type(entry[0]) is str
                and all(type(v) in kinds for v, kinds in zip(entry[1:], _WILDCARD_TYPES))):
            raise DamagedCache("a URL wildcard is malformed")
        compiled[entry[0]] = entry[1:]
    return Prepared(lists=out, sizes=dict(sizes), exact=_host_table(exact, open_table),
                    suffix=_host_table(suffix, open_table), wildcards=compiled, valid_patterns=frozenset(valid))


class PolicyCache:
    """The cache directory of one gateway (``<state_dir>/policy-cache``). ``hits``,
    ``misses``, ``refused`` and ``write_failures`` count what happened; ``last`` says it in
    words for the log."""

    def __init__(self, directory: str | Path, on_result: Callable[[str], None] | None = None,
                 map_min: int = MAP_MIN_ENTRIES):
        self.directory = Path(directory)
        self.map_min = map_min   # host tables of at least this many names are mapped files
        self._stored: tuple[str, dict[str, str]] | None = None   # the last store's key and table files
        self.hits = self.misses = self.refused = self.write_failures = 0
        self.last = ""
        # Told "hit", "miss", "refused" or "write-failure" (the gateway counts them in
        # kanmon_policy_cache_total).
        self.on_result = on_result or (lambda result: None)

    @staticmethod
    def key(policy_text: str, list_texts: Mapping[str, tuple[str, str]], feed_versions: str) -> str:
        return cache_key(policy_text, list_texts, feed_versions)

    def path_for(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def load(self, key: str) -> Prepared | None:
        """The Prepared stored under ``key``; None when there is none or it is damaged (then
        the file is removed, and the caller compiles from the sources)."""
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            self.last = "miss"
            self.on_result("miss")
            return None
        except OSError as exc:
            return self._refuse(path, f"unreadable: {exc.strerror or exc}")
        damaged: list[str] = []

        def open_table(digest: str) -> Mapping[str, tuple[int, ...]]:
            try:
                return hosttablefile.open_table(self.directory, digest)
            except hosttablefile.DamagedTable as exc:
                damaged.append(digest)
                raise DamagedCache(f"host table {exc}") from None

        try:
            prepared = decode(data, key, open_table)
        except DamagedCache as exc:
            for digest in damaged:   # written anew by the compile from the sources
                hosttablefile.path_for(self.directory, digest).unlink(missing_ok=True)
            return self._refuse(path, str(exc))
        self.hits += 1
        self.last = "hit"
        self.on_result("hit")
        log.info("policy compiled from its prepared inputs in %s (unchanged policy, lists and feeds)", path)
        return prepared

    def _refuse(self, path: Path, why: str) -> None:
        self.refused += 1
        self.last = f"refused: {why}"
        self.on_result("refused")
        log.warning("policy cache %s refused (%s); compiling the policy from its sources", path, why)
        try:
            path.unlink()
        except OSError:
            pass
        return None

    def store(self, key: str, prepared: Prepared) -> bool:
        """Write atomically; remove the files of other keys. A failure is logged and counted,
        never raised: the gateway serves the policy it compiled either way."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            mapped = self._write_tables(prepared)
            data = encode(key, prepared, mapped)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=self.directory)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path_for(key))
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except (OSError, ValueError) as exc:
            self.write_failures += 1
            self.on_result("write-failure")
            log.warning("policy cache not written to %s: %s", self.directory, exc)
            return False
        for old in self.directory.glob(f"*{SUFFIX}"):
            if old.name != self.path_for(key).name:
                try:
                    old.unlink()
                except OSError:
                    pass
        hosttablefile.remove_unreferenced(self.directory, set(mapped.values()))
        self._stored = (key, mapped)
        return True

    def _write_tables(self, prepared: Prepared) -> dict[str, str]:
        """Write the host tables of at least ``map_min`` names as mapped files; "exact" /
        "suffix" -> digest. A table whose names pile up on one hash stays in the payload."""
        mapped = {}
        for name in _TABLES:
            table = getattr(prepared, name)
            if len(table) < self.map_min:
                continue
            data = hosttable.encode_parts(table)
            if data is None:
                log.warning("the %s host table (%d names) is not mapped: its names crowd one hash; "
                            "each process builds its own copy", name, len(table))
                continue
            mapped[name] = hosttablefile.write(self.directory, data)
        return mapped

    def shared_tables(self, key: str) -> dict[str, Mapping[str, tuple[int, ...]]]:
        """The host tables the last ``store`` of ``key`` wrote, mapped ("exact"/"suffix" -> the
        table): the compiling process serves these instead of its own dicts, as every process
        that loads the policy from the cache does. Empty when none were written or one does
        not open (then the dicts serve: same verdicts, logged)."""
        if self._stored is None or self._stored[0] != key:
            return {}
        try:
            return {name: hosttablefile.open_table(self.directory, digest, written_here=True)
                    for name, digest in self._stored[1].items()}
        except hosttablefile.DamagedTable as exc:
            log.warning("host table just written does not open (%s); this process keeps its own copy", exc)
            return {}
