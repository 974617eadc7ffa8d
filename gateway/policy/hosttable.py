"""A host table (host name -> rule ordinals) in one read-only buffer (issue #22: "the compiled
policy is built once and shared ... a file the workers map"). Pure: ``encode`` turns a table
into bytes, ``HostTable`` looks names up in a buffer it is given; writing, mapping and
checking the file is the edge's business (gateway/runtime/hosttablefile.py).

A snapshot's big host tables (a block list of 200k-1M domains) are dicts of strings: after a
policy reload each inspection worker built its own. A ``HostTable`` over a file every process
maps (MAP_SHARED, read-only) is one copy in the page cache whatever the number of workers.
The snapshot only calls ``.get(name)`` on its tables, so either kind serves.

Layout (little-endian; every section 8-byte aligned):

    header   MAGIC (16 bytes), entries n, slots m, groups g, group words w, blob bytes b  (5 x u64)
    slots    m x u64: 0 = empty, else (crc32(name) << 32) | (entry + 1)
    offsets  (n + 1) x u32: entry i's name is blob[offsets[i]:offsets[i + 1]]
    group    n x u32: entry i's ordinals are groups[group[i]]
    groups   w x u32: per group its length, then its ordinals
    blob     b bytes: the names, UTF-8 (surrogatepass, as they are encoded to be looked up)

The slots are an open-addressing table with linear probing: a name's home slot is
``crc32 * HOME_SLOTS >> 32`` of its ``HOME_SLOTS = 2n`` (load 1/2), and entries are placed in
the order of their hash, so along a run of occupied slots the hashes only grow: a lookup stops
at the first empty slot or the first larger hash (a miss costs one or two probes). A hash match
is confirmed by comparing the name's bytes, so a crc32 collision costs a compare, never a wrong
answer. crc32 (zlib, C) is stable across processes and Python versions, unlike ``hash()``.
Names an attacker chose could still pile up on one crc32 (it is not a keyed hash): ``encode``
refuses a table with a run longer than ``MAX_RUN`` (the caller keeps the dict: more memory,
same verdicts), so no lookup ever probes more than ``MAX_RUN`` slots.

Why not a library: marisa-trie 1.4.1 (mmap-able) measured 1.2-1.7 µs a lookup against ~0.9 µs
for this in the same run, and it maps keys to its own ids only; bisect over a sorted hash array
(C) took 1.5 µs (20 probes, each an int object). bench/hosttable.py has the figures.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from collections import deque
from itertools import accumulate, count, repeat
from operator import add, sub
from sys import byteorder
from zlib import crc32

MAGIC = b"KANMON-HOSTS-v1\n"
_HEADER = struct.Struct("<16s5Q")
MAX_RUN = 256   # slots: the longest probe a lookup can make
_NAME_CODEC = ("utf-8", "surrogatepass")


class BadTable(ValueError):
    """The buffer is not a host table this module wrote."""


def _pad(n: int) -> int:
    return -n % 8


def encode(table: Mapping[str, tuple[int, ...]]) -> bytes | None:
    """The table in the layout above; None when its hashes pile up (a name displaced more
    than ``MAX_RUN`` slots from its home) or it is too big for 32-bit offsets: keep the dict
    then. Entries stay in the table's order; only the slots follow the hashes. Bulk steps in
    C (map, sort, accumulate): 1M names in about a second."""
    n = len(table)
    if n >= (1 << 32) - 1:
        return None
    encoded = list(map(str.encode, table, repeat(_NAME_CODEC[0]), repeat(_NAME_CODEC[1])))
    home_slots = max(2 * n, 8)
    # (hash << 32) | entry: sorted, the entries in hash order; + 1 is the slot's value.
    order = [(h << 32) | i for i, h in enumerate(map(crc32, encoded))]
    order.sort()
    homes = [((p >> 32) * home_slots) >> 32 for p in order]
    # Linear probing in hash order: position k = max(home k, position k-1 + 1), that is
    # k + the running maximum of (home j - j) over j <= k.
    positions = list(map(add, count(), accumulate(map(sub, homes, count()), max)))
    # A lookup probes at most the largest displacement + 2 slots (hashes grow along a run).
    if positions and (max(map(sub, positions, homes)) > MAX_RUN or positions[-1] >= home_slots + MAX_RUN):
        return None
    del homes
    slot_count = home_slots + MAX_RUN + 1   # the last slot always stays empty: every probe ends
    slots = [0] * slot_count
    deque(map(slots.__setitem__, positions, map((1).__add__, order)), maxlen=0)
    del positions, order
    slot_bytes = _u64(slots)
    del slots
    blob = b"".join(encoded)
    if len(blob) >= 1 << 32:
        return None
    groups: dict[tuple[int, ...], int] = {}
    group_of = [groups.setdefault(ordinals, len(groups)) for ordinals in table.values()]
    words = [x for ordinals in groups for x in (len(ordinals), *ordinals)]
    parts = [_HEADER.pack(MAGIC, n, slot_count, len(groups), len(words), len(blob)),
             slot_bytes, _u32(accumulate(map(len, encoded), initial=0)), _u32(group_of), _u32(words), blob]
    return b"".join(part + bytes(_pad(len(part))) for part in parts)


def _u64(values: list[int]) -> bytes:
    from array import array

    out = array("Q", values)
    if byteorder != "little":
        out.byteswap()
    return out.tobytes()


def _u32(values) -> bytes:   # type: ignore[no-untyped-def]
    from array import array

    out = array("I", values)
    if out.itemsize != 4:   # pragma: no cover - CPython on Linux: "I" is 4 bytes
        raise BadTable("unsigned int is not 32 bits here")
    if byteorder != "little":
        out.byteswap()
    return out.tobytes()


class HostTable(Mapping[str, tuple[int, ...]]):
    """A read-only ``host -> ordinals`` mapping over a buffer in ``encode``'s layout (an mmap
    of the file, or bytes in tests). Checks the layout's sizes and bounds when made
    (``BadTable``); the caller checks the bytes' digest. Thread-safe: nothing is written."""

    __slots__ = ("_buffer", "_n", "_home", "_slots", "_offsets", "_group_of", "_groups", "_blob", "_views")

    def __init__(self, buffer) -> None:   # type: ignore[no-untyped-def]
        if byteorder != "little":   # pragma: no cover - the file is little-endian
            raise BadTable("host tables are read on little-endian machines only")
        view = memoryview(buffer)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if len(view) < _HEADER.size:
            raise BadTable("shorter than a host-table header")
        magic, n, m, g, w, b = _HEADER.unpack_from(view)
        if magic != MAGIC:
            raise BadTable("not a host table (magic)")
        sizes = (8 * m, 4 * (n + 1), 4 * n, 4 * w, b)
        if m != max(2 * n, 8) + MAX_RUN + 1 or g > n + 1 or b >= 1 << 32:
            raise BadTable("host-table header is inconsistent")
        if len(view) != _HEADER.size + sum(s + _pad(s) for s in sizes):
            raise BadTable("host-table size does not match its header")
        at = _HEADER.size
        sections = []
        for size in sizes:
            sections.append(view[at:at + size])
            at += size + _pad(size)
        slots, offsets, group_of = sections[0].cast("Q"), sections[1].cast("I"), sections[2].cast("I")
        words = sections[3].cast("I")
        if slots[m - 1] != 0 or offsets[0] != 0 or offsets[n] != b or (n and max(group_of) >= g):
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
        self._home = max(2 * n, 8)
        self._slots = slots
        self._offsets = offsets
        self._group_of = group_of
        self._groups = tuple(groups)
        self._blob = sections[4]
        self._views = (view, *sections, slots, offsets, group_of, words)

    def get(self, name: str, default=None):   # type: ignore[no-untyped-def,override]
        """The ordinals of exactly ``name``; ``default`` when it is not in the table."""
        key = name.encode("utf-8", "surrogatepass")
        h = crc32(key)
        low = h << 32
        high = low | 0xFFFFFFFF
        slots = self._slots
        i = (h * self._home) >> 32
        while True:
            s = slots[i]
            if not s or s > high:
                return default
            if s >= low:
                e = s & 0xFFFFFFFF
                offsets = self._offsets
                if self._blob[offsets[e - 1]:offsets[e]] == key:
                    return self._groups[self._group_of[e - 1]]
            i += 1

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
        offsets, blob = self._offsets, self._blob
        for i in range(self._n):
            yield bytes(blob[offsets[i]:offsets[i + 1]]).decode(*_NAME_CODEC)

    def items(self):   # type: ignore[no-untyped-def,override]
        """(name, ordinals) in entry order, without a lookup per name."""
        offsets, blob, groups, group_of = self._offsets, self._blob, self._groups, self._group_of
        return [(bytes(blob[offsets[i]:offsets[i + 1]]).decode(*_NAME_CODEC), groups[group_of[i]])
                for i in range(self._n)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and dict(self.items()) == dict(other.items())

    __hash__ = None   # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<HostTable of {self._n} hosts>"
