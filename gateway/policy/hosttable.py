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
    slots    m x (u64 hash, u64 info): hash = crc32 of the slot's name, or EMPTY (2**32, above
             every crc32); info = name offset in the buffer << 32 | name length << 20 | group
    groups   w x u32: per group its length, then its ordinals (a rule-ordinal tuple)
    blob     b bytes: the names, UTF-8 (surrogatepass, as they are encoded to be looked up)

The slots are an open-addressing table with linear probing: a name's home slot is the top bits
of its crc32 (``crc32 >> shift``, ``2**(32 - shift)`` home slots for at least 1.5 n names), and
entries are placed in the order of their hash, so along a run of occupied slots the hashes
only grow: a lookup walks past smaller hashes and stops at the first larger one or an empty slot
(a miss costs one or two probes, in one cache line or two). A hash match is confirmed by
comparing the name's bytes (the slot's info says where), so a crc32 collision costs a compare,
never a wrong answer. crc32 (zlib, C) is stable across processes and Python versions, unlike
``hash()``. Names an attacker chose could still pile up on one crc32 (it is not a keyed hash):
``encode`` refuses a table where a name sits more than ``MAX_RUN`` slots after its home (the
caller keeps the dict: more memory, same verdicts), so no lookup probes more than
``MAX_RUN + 2`` slots.

Why not a library: marisa-trie 1.4.1 (mmap-able, a C++ trie) took 1.2 µs (``in``) to 1.7 µs
(``get``) a lookup on this machine, and it maps keys to ids of its own only (the ordinals would
need a second file); bisect over a sorted array of hashes (C) 1.5 µs (20 probes, each an int
object). This layout: ~0.35-0.45 µs a miss, ~0.8-1.1 µs a hit, against ~0.05 / ~0.25 µs for the
dict -- per decision +0.5-1.0 µs at the median (bench/hosttable.py, on bench/engine.py's inputs
and decision path), under 0.1 % of the ~1,100 µs of CPU a request costs at the gateway. A front
cache of recent names (a dict before the probe) was tried: no gain on the real-domain stream.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator, Mapping
from itertools import groupby, islice
from sys import byteorder
from typing import TYPE_CHECKING
from zlib import crc32

if TYPE_CHECKING:
    import numpy as np

# numpy does the encoder's bulk steps (no I/O). It is imported by the encoder only: importing
# it costs ~0.08 s, ~14 MiB and an OpenBLAS thread (measured), which every gateway start, every
# inspection worker (forked with that thread already running) and every process that only maps
# a table (a cache hit, a worker's reload) would pay for a step only a cache miss runs.

MAGIC = b"KANMON-HOSTS-v3\n"
_HEADER = struct.Struct("<16s6Q")
MAX_RUN = 256   # slots: how far a name may sit after its home slot
EMPTY = 1 << 32
_NAME_CODEC = ("utf-8", "surrogatepass")
_LOW = 0xFFFFFFFF
_MAX_NAME = (1 << 12) - 1   # bytes of a name (info bits 20-31); a host name has at most 253
_MAX_GROUPS = 1 << 20       # distinct ordinal tuples (info bits 0-19)


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
    """The table in the layout above, as buffers to write one after the other; None when it
    does not fit it (its hashes pile up: a name more than ``MAX_RUN`` slots after its home;
    a name over ``_MAX_NAME`` bytes; too many groups; over 4 GiB): keep the dict then.

    Bulk steps with numpy (arrays of machine integers; its sort, cumulative sum and scatter
    are C loops; it does no I/O): the work left per name is in CPython's C loops (``join``,
    ``split``, ``crc32``). Per 1M names about 0.4 s of CPU and ~100 MiB at the peak, the ~50
    MiB it returns included; the passes of ``map``/``accumulate`` over Python ints it replaces
    took 2.4 s and ~135 MiB (measured on bench/engine_scale.py's 1M names)."""
    import numpy as np
    n = len(table)
    if n >= 1 << 30 or byteorder != "little":   # the layout is little-endian machine integers
        return None
    blob, lengths, hashes = _names(table)
    if n and int(lengths.max()) > _MAX_NAME:
        return None
    # The distinct ordinal tuples in order of first use (a list's hosts share one: groupby
    # compares neighbours, mostly the same object, instead of hashing a tuple per name).
    groups = {ordinals: k for k, ordinals in enumerate(dict.fromkeys(g for g, _ in groupby(table.values())))}
    if len(groups) > _MAX_GROUPS:
        return None
    words = np.array([x for ordinals in groups for x in (len(ordinals), *ordinals)], dtype="<u4")
    blob_size = sum(map(len, blob))
    shift = _shift(n)
    home_slots = 1 << (32 - shift)
    slot_count = home_slots + MAX_RUN + 1   # the last slot always stays empty: every probe ends
    blob_at = _HEADER.size + 16 * slot_count + words.nbytes + _pad(words.nbytes)
    if blob_at + blob_size >= 1 << 32:
        return None
    # Each entry's info: name offset << 32 | length << 20 | group (entries in table order).
    # (Every fresh array costs its page faults, ~9 µs per 4 KiB page on this VM: views and
    # 4-byte integers where they suffice.)
    info = np.empty(n, dtype="<u8")
    if n:
        info[0] = 0
        np.cumsum(lengths[:-1], out=info[1:])
    info += blob_at
    info <<= 32
    lengths <<= 20   # u32: a length under 4096, shifted, stays below 2**32
    info |= lengths
    del lengths
    if len(groups) > 1:   # one group (one list): every entry's group is 0
        info |= np.fromiter(map(groups.__getitem__, table.values()), dtype="<u8", count=n)
    # hash << 32 | entry, sorted: the entries in hash order (ties in table order). Little-endian:
    # the entry is the low half of each u64, the hash the high half.
    order = np.empty(n, dtype="<u8")
    halves = order.view("<u4")
    halves[0::2] = np.arange(n, dtype="<u4")
    halves[1::2] = hashes
    del hashes
    order.sort()
    info = info[halves[0::2]]
    hashes = halves[1::2]   # in hash order (a view)
    # Linear probing in hash order: position k = max(home k, position k-1 + 1), that is
    # k + the running maximum of (home j - j) over j <= k.
    index = np.int32 if slot_count < 1 << 31 else np.int64
    homes = (hashes >> shift).astype(index)
    ks = np.arange(n, dtype=index)
    positions = homes - ks
    np.maximum.accumulate(positions, out=positions)
    positions += ks
    del ks
    homes -= positions   # minus how far each entry sits after its home
    if n and (-int(homes.min()) > MAX_RUN or int(positions[-1]) >= home_slots + MAX_RUN):
        return None
    del homes
    slots = np.empty((slot_count, 2), dtype="<u8")   # (hash, info) per slot
    slots[:, 0] = EMPTY
    slots[:, 1] = 0
    slots[positions, 0] = hashes
    slots[positions, 1] = info
    del positions, info, hashes, halves, order
    out: list = [_HEADER.pack(MAGIC, n, slot_count, shift, len(groups), len(words), blob_size),
                 memoryview(slots).cast("B"), memoryview(words).cast("B")]
    if _pad(words.nbytes):
        out.append(bytes(_pad(words.nbytes)))
    out += blob
    out.append(bytes(_pad(blob_size)))
    return out


_CHUNK = 1 << 16   # names encoded at a time: ~1 MiB of bytes, a few MiB of temporaries


def _names(table: Mapping[str, tuple[int, ...]]) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """The names' bytes one after the other (the blob, in pieces), each name's length in bytes
    and its crc32, in table order. Per chunk of names: joined with newlines and encoded in one
    call; when the bytes hold one newline fewer than the chunk has names, no name holds one
    (no checked host name does), so the newlines are the bounds between the names, found by
    numpy (not one ``encode`` and ``len`` per name)."""
    import numpy as np
    n = len(table)
    lengths = np.empty(n, dtype="<u4")
    hashes = np.empty(n, dtype="<u4")
    blob: list[bytes] = []
    names = iter(table)
    for i in range(0, n, _CHUNK):
        chunk = list(islice(names, _CHUNK))
        k = len(chunk)
        joined = "\n".join(chunk).encode(*_NAME_CODEC)
        newlines = np.flatnonzero(np.frombuffer(joined, dtype=np.uint8) == 10)
        if len(newlines) == k - 1:
            bounds = np.empty(k + 1, dtype=np.int64)   # name j is joined[bounds[j] + 1:bounds[j + 1]]
            bounds[0] = -1
            bounds[1:k] = newlines
            bounds[k] = len(joined)
            lengths[i:i + k] = np.diff(bounds) - 1
            hashes[i:i + k] = np.fromiter(map(crc32, joined.split(b"\n")), dtype="<u4", count=k)
            blob.append(joined.replace(b"\n", b""))
        else:   # a name with a newline in it: one at a time
            encoded = [name.encode(*_NAME_CODEC) for name in chunk]
            lengths[i:i + k] = np.fromiter(map(len, encoded), dtype="<u4", count=k)
            hashes[i:i + k] = np.fromiter(map(crc32, encoded), dtype="<u4", count=k)
            blob.append(b"".join(encoded))
    return blob, lengths, hashes


def _lookup(buffer, shift, slots, groups):   # type: ignore[no-untyped-def]
    def get(name: str, default=None):   # type: ignore[no-untyped-def]
        """The ordinals of exactly ``name``; ``default`` when it is not in the table."""
        try:
            key = name.encode()
        except UnicodeEncodeError:   # a lone surrogate: encoded as the names were
            key = name.encode(*_NAME_CODEC)
        h = crc32(key)
        i = (h >> shift) << 1
        s = slots[i]
        while s < h:   # EMPTY is above every hash: the walk ends at an empty slot
            i += 2
            s = slots[i]
        while s == h:
            info = slots[i + 1]
            start = info >> 32
            if buffer[start:start + ((info >> 20) & 0xFFF)] == key:
                return groups[info & 0xFFFFF]
            i += 2
            s = slots[i]
        return default

    return get


class HostTable(Mapping[str, tuple[int, ...]]):
    """A read-only ``host -> ordinals`` mapping over a buffer in ``encode``'s layout (an mmap
    of the file, or bytes in tests: slicing either gives bytes). Checks the layout's sizes and
    bounds when made (``BadTable``); the caller checks the bytes' digest. Thread-safe: nothing
    is written."""

    __slots__ = ("_buffer", "_n", "_slots", "_groups", "_views", "get")

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
        if (n >= 1 << 30 or shift != _shift(n) or m != (1 << (32 - shift)) + MAX_RUN + 1 or g > n + 1
                or g > _MAX_GROUPS):
            raise BadTable("host-table header is inconsistent")
        sizes = (16 * m, 4 * w, b)
        if len(view) != _HEADER.size + sum(s + _pad(s) for s in sizes):
            raise BadTable("host-table size does not match its header")
        blob_at = _HEADER.size + 16 * m + 4 * w + _pad(4 * w)
        slot_view = view[_HEADER.size:_HEADER.size + 16 * m]
        word_view = view[_HEADER.size + 16 * m:_HEADER.size + 16 * m + 4 * w]
        slots, words = slot_view.cast("Q"), word_view.cast("I")
        if slots[2 * m - 2] != EMPTY:
            raise BadTable("host-table slots are inconsistent")
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
        self._slots = slots
        self._groups = tuple(groups)
        self._views = (view, slot_view, word_view, words, blob_at)
        # ``get`` is a closure over the sections (the snapshot calls it for every label of
        # every host: local names instead of attribute loads).
        self.get = _lookup(buffer, shift, slots, self._groups)

    def __getitem__(self, name: str) -> tuple[int, ...]:
        found = self.get(name) if isinstance(name, str) else None
        if found is None:
            raise KeyError(name)
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __len__(self) -> int:
        return self._n

    def items(self):   # type: ignore[no-untyped-def,override]
        """(name, ordinals) in slot order, without a lookup per name."""
        slots, buffer, groups = self._slots, self._buffer, self._groups
        out = []
        for i in range(0, len(slots), 2):
            if slots[i] != EMPTY:
                info = slots[i + 1]
                start = info >> 32
                name = bytes(buffer[start:start + ((info >> 20) & 0xFFF)]).decode(*_NAME_CODEC)
                out.append((name, groups[info & 0xFFFFF]))
        return out

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.items())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and dict(self.items()) == dict(other.items())

    __hash__ = None   # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<HostTable of {self._n} hosts>"
