"""A host table (host name -> rule ordinals) in one read-only buffer (issue #22: "the compiled
policy is built once and shared ... a file the workers map"). Pure: ``encode`` turns a table
into bytes, ``HostTable`` looks names up in a buffer it is given; writing, mapping and
checking the file is the edge's business (gateway/runtime/hosttablefile.py).

A snapshot's big host tables (a block list of 200k-1M domains) are dicts of strings: after a
policy reload each inspection worker built its own. A ``HostTable`` over a file every process
maps (MAP_SHARED, read-only) is one copy in the page cache whatever the number of workers.
The snapshot only calls ``.get(name)`` on its tables, so either kind serves.

Layout (little-endian; every section 8-byte aligned):

    header   MAGIC (16 bytes), entries n, slots m, shift, groups g, group words w, blob bytes b (6 x u64)
    hashes   m x u64: crc32 of the name in the slot, or EMPTY (2**32, above every crc32)
    entries  m x u32: the entry in the slot
    offsets  (n + 1) x u32: entry i's name is buffer[offsets[i]:offsets[i + 1]] (whole-buffer offsets)
    group    n x u32: entry i's ordinals are groups[group[i]]
    groups   w x u32: per group its length, then its ordinals
    blob     b bytes: the names, UTF-8 (surrogatepass, as they are encoded to be looked up)

The slots are an open-addressing table with linear probing: a name's home slot is the top bits
of its crc32 (``crc32 >> shift``, ``2**(32 - shift)`` home slots for at least 1.5 n names), and
entries are placed in the order of their hash, so along a run of occupied slots the hashes
only grow: a lookup walks past smaller hashes and stops at the first larger one or an empty slot
(a miss costs one or two probes). A hash match is confirmed by comparing the name's bytes, so a
crc32 collision costs a compare, never a wrong answer. crc32 (zlib, C) is stable across
processes and Python versions, unlike ``hash()``. Names an attacker chose could still pile up
on one crc32 (it is not a keyed hash): ``encode`` refuses a table where a name sits more than
``MAX_RUN`` slots after its home (the caller keeps the dict: more memory, same verdicts), so no
lookup probes more than ``MAX_RUN + 2`` slots.

Why not a library: marisa-trie 1.4.1 (mmap-able) measured 1.2-1.7 µs a lookup against ~0.9 µs
for this in the same run, and it maps keys to its own ids only; bisect over a sorted hash array
(C) took 1.5 µs (20 probes, each an int object). bench/hosttable.py has the figures.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from array import array
from collections import deque
from itertools import accumulate, count, repeat
from operator import add, and_, lshift, or_, rshift, sub
from sys import byteorder
from zlib import crc32

MAGIC = b"KANMON-HOSTS-v2\n"
_HEADER = struct.Struct("<16s6Q")
MAX_RUN = 256   # slots: how far a name may sit after its home slot
EMPTY = 1 << 32
_NAME_CODEC = ("utf-8", "surrogatepass")
_LOW = 0xFFFFFFFF


class BadTable(ValueError):
    """The buffer is not a host table this module wrote."""


def _pad(n: int) -> int:
    return -n % 8


def _shift(n: int) -> int:
    """32 - log2 of the home slots: a power of two, at least 1.5 n and 8."""
    bits = max(3, (max(1, (3 * n + 1) // 2) - 1).bit_length())
    return 32 - bits


def encode(table: Mapping[str, tuple[int, ...]]) -> bytes | None:
    """The table in the layout above, as one bytes object (``encode_parts`` joined)."""
    parts = encode_parts(table)
    return None if parts is None else b"".join(parts)


def encode_parts(table: Mapping[str, tuple[int, ...]]) -> list | None:
    """The table in the layout above, as buffers to write one after the other; None when its
    hashes pile up (a name more than ``MAX_RUN`` slots after its home) or it is too big for
    32-bit offsets: keep the dict then. Entries stay in the table's order; only the slots
    follow the hashes. Bulk steps in C (map, sort, accumulate, arrays of machine integers, no
    list of a million bytes objects): about a second and ~60 MiB of temporaries per 1M names."""
    n = len(table)
    if n >= 1 << 30 or byteorder != "little":   # the layout is little-endian machine integers
        return None
    blob = "".join(table).encode(*_NAME_CODEC)
    ascii_only = len(blob) == sum(map(len, table))   # then a name's bytes are its characters
    shift = _shift(n)
    home_slots = 1 << (32 - shift)
    # (hash << 32) | entry, sorted: the entries in hash order (a C sort of ints).
    hashes_of_names = map(crc32, map(str.encode, table, repeat(_NAME_CODEC[0]), repeat(_NAME_CODEC[1])))
    order = list(map(or_, map(lshift, hashes_of_names, repeat(32)), count()))
    order.sort()
    homes = array("q", map(rshift, order, repeat(32 + shift)))
    # Linear probing in hash order: position k = max(home k, position k-1 + 1), that is
    # k + the running maximum of (home j - j) over j <= k.
    positions = array("q", map(add, count(), accumulate(map(sub, homes, count()), max)))
    if positions and (max(map(sub, positions, homes)) > MAX_RUN or positions[-1] >= home_slots + MAX_RUN):
        return None
    del homes
    slot_count = home_slots + MAX_RUN + 1   # the last slot always stays empty: every probe ends
    hashes = _array("Q", [EMPTY]) * slot_count
    deque(map(hashes.__setitem__, positions, map(rshift, order, repeat(32))), maxlen=0)
    entries = _array("I", [0]) * slot_count
    deque(map(entries.__setitem__, positions, map(and_, order, repeat(_LOW))), maxlen=0)
    del positions, order
    groups = {ordinals: k for k, ordinals in enumerate(dict.fromkeys(table.values()))}
    group_of = _array("I", map(groups.__getitem__, table.values()))
    words = _array("I", [x for ordinals in groups for x in (len(ordinals), *ordinals)])
    sizes = (8 * slot_count, 4 * slot_count, 4 * (n + 1), 4 * n, 4 * len(words))
    blob_at = _HEADER.size + sum(size + _pad(size) for size in sizes)
    if blob_at + len(blob) >= 1 << 32:
        return None
    lengths = map(len, table) if ascii_only else (len(name.encode(*_NAME_CODEC)) for name in table)
    offsets = _array("I", accumulate(lengths, initial=blob_at))
    parts: list = [_HEADER.pack(MAGIC, n, slot_count, shift, len(groups), len(words), len(blob)), hashes, entries,
                   offsets, group_of, words, blob]
    out: list = []
    for part in parts:
        out.append(part)
        size = part.itemsize * len(part) if isinstance(part, array) else len(part)
        if _pad(size):
            out.append(bytes(_pad(size)))
    return out


def _array(code: str, values) -> array:   # type: ignore[no-untyped-def]
    """An array of little-endian machine integers (u32 for "I", u64 for "Q")."""
    out = array(code, values)
    if out.itemsize != {"I": 4, "Q": 8}[code]:   # pragma: no cover - CPython on Linux x86/arm
        raise BadTable(f"array {code!r} is not {out.itemsize} bytes here")
    return out


def _lookup(buffer, shift, hashes, entries, offsets, group_of, groups):   # type: ignore[no-untyped-def]
    def get(name: str, default=None):   # type: ignore[no-untyped-def]
        """The ordinals of exactly ``name``; ``default`` when it is not in the table."""
        try:
            key = name.encode()
        except UnicodeEncodeError:   # a lone surrogate: encoded as the names were
            key = name.encode(*_NAME_CODEC)
        h = crc32(key)
        i = h >> shift
        s = hashes[i]
        while s < h:   # EMPTY is above every hash: the walk ends at an empty slot
            i += 1
            s = hashes[i]
        while s == h:
            e = entries[i]
            if buffer[offsets[e]:offsets[e + 1]] == key:
                return groups[group_of[e]]
            i += 1
            s = hashes[i]
        return default

    return get


class HostTable(Mapping[str, tuple[int, ...]]):
    """A read-only ``host -> ordinals`` mapping over a buffer in ``encode``'s layout (an mmap
    of the file, or bytes in tests: slicing either gives bytes). Checks the layout's sizes and
    bounds when made (``BadTable``); the caller checks the bytes' digest. Thread-safe: nothing
    is written."""

    __slots__ = ("_buffer", "_n", "_offsets", "_group_of", "_groups", "_views", "get")

    def __init__(self, buffer) -> None:   # type: ignore[no-untyped-def]
        if byteorder != "little":   # pragma: no cover - the file is little-endian
            raise BadTable("host tables are read on little-endian machines only")
        view = memoryview(buffer)
        if view.ndim != 1 or view.itemsize != 1:
            raise BadTable("a host table is read from a flat byte buffer")
        if len(view) < _HEADER.size:
            raise BadTable("shorter than a host-table header")
        magic, n, m, shift, g, w, b = _HEADER.unpack_from(view)
        if magic != MAGIC:
            raise BadTable("not a host table (magic)")
        if n >= 1 << 30 or shift != _shift(n) or m != (1 << (32 - shift)) + MAX_RUN + 1 or g > n + 1:
            raise BadTable("host-table header is inconsistent")
        sizes = (8 * m, 4 * m, 4 * (n + 1), 4 * n, 4 * w, b)
        if len(view) != _HEADER.size + sum(s + _pad(s) for s in sizes):
            raise BadTable("host-table size does not match its header")
        at = _HEADER.size
        sections = []
        for size in sizes:
            sections.append(view[at:at + size])
            at += size + _pad(size)
        blob_at = len(view) - b - _pad(b)
        hashes, entries, offsets = sections[0].cast("Q"), sections[1].cast("I"), sections[2].cast("I")
        group_of, words = sections[3].cast("I"), sections[4].cast("I")
        if (hashes[m - 1] != EMPTY or offsets[0] != blob_at or offsets[n] != blob_at + b
                or (n and (max(entries) >= n or max(group_of) >= g))):
            raise BadTable("host-table sections are inconsistent")
        groups = []
        i = 0
        while i < w:
            length = words[i]
            if length == 0 or i + 1 + length > w:
                raise BadTable("host-table groups are malformed")
            groups.append(tuple(words[i + 1:i + 1 + length]))
            i += 1 + length
        if len(groups) != g:
            raise BadTable("host-table group count does not match")
        self._buffer = buffer   # keeps the mapping alive as long as the table
        self._n = n
        self._offsets = offsets
        self._group_of = group_of
        self._groups = tuple(groups)
        self._views = (view, *sections)
        # ``get`` is a closure over the sections (the snapshot calls it for every label of
        # every host: local names instead of attribute loads are ~25 % of a lookup).
        self.get = _lookup(buffer, shift, hashes, entries, offsets, group_of, self._groups)

    def __getitem__(self, name: str) -> tuple[int, ...]:
        found = self.get(name) if isinstance(name, str) else None
        if found is None:
            raise KeyError(name)
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[str]:
        offsets, buffer = self._offsets, self._buffer
        for i in range(self._n):
            yield bytes(buffer[offsets[i]:offsets[i + 1]]).decode(*_NAME_CODEC)

    def items(self):   # type: ignore[no-untyped-def,override]
        """(name, ordinals) in entry order, without a lookup per name."""
        offsets, buffer, groups, group_of = self._offsets, self._buffer, self._groups, self._group_of
        return [(bytes(buffer[offsets[i]:offsets[i + 1]]).decode(*_NAME_CODEC), groups[group_of[i]])
                for i in range(self._n)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and dict(self.items()) == dict(other.items())

    __hash__ = None   # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<HostTable of {self._n} hosts>"
