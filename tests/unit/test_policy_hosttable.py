"""Mapped host tables (issue #22, "the compiled policy is built once and shared ... a file the
workers map"): gateway/policy/hosttable.py (the layout and its lookup, pure) and
gateway/runtime/hosttablefile.py + policycache.py (the file every process maps).

What must hold: a lookup in the mapped table answers exactly as the dict it was written from,
for every name the house normalization produces (IDN/punycode, trailing dots, upper case) and
every name it does not hold; a policy served from mapped tables decides exactly as one compiled
fresh; a damaged, short, foreign or missing table file is refused, counted, and the policy
compiled from its sources; files no policy refers to are removed, and a process that still maps
an old one keeps answering from it."""

from __future__ import annotations

import hashlib
import os
import random
import string
import struct
from datetime import UTC, datetime
from pathlib import Path
from zlib import crc32

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.hostname import normalize_host
from gateway.policy import DeviceContext, load_policy, query_for_url
from gateway.policy import hosttable
from gateway.policy.hosttable import MAX_RUN, BadTable, HostTable, encode
from gateway.policy.lists import valid_domain
from gateway.runtime import hosttablefile
from gateway.runtime.policycache import PolicyCache

NOW = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)
DEVICE = DeviceContext("policy-test", frozenset(), "org")

# Raw names as lists and requests spell them: IDN in several scripts, full-width letters and
# stops, upper case, trailing dots, blanks.
RAW_NAMES = st.text(alphabet=string.ascii_letters + string.digits + "-._ 。．例え日本ßüÉ☃ＡＢｃ", min_size=1, max_size=30)


def _table(names, rng: random.Random) -> dict[str, tuple[int, ...]]:
    """A host table as the compiler builds it: normalized names -> sorted unique ordinals."""
    out: dict[str, tuple[int, ...]] = {}
    for raw in names:
        host = normalize_host(raw)
        if host:
            out[host] = tuple(sorted(set(rng.sample(range(40), rng.randint(1, 3)))))
    return out


def _asked(raw: str) -> list[str]:
    """What a snapshot asks a table for a request host: the normalized host and each suffix."""
    host = normalize_host(raw)
    if not host:
        return []
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))] + [raw, raw.upper(), host + "."]


@settings(max_examples=300, deadline=None)
@given(st.lists(RAW_NAMES, max_size=60), st.lists(RAW_NAMES, max_size=30), st.integers(0, 2**32))
@example(["faß.de", "ÉCOLE.fr.", "例え.jp。", "☃.net", "xn--n3h.net", "a.example"],
         ["FASS.DE", "xn--fa-hia.de", "www.école.fr", "b.例え.jp", "net", ""], 0)
def test_a_mapped_table_answers_exactly_as_its_dict(listed, asked, seed):
    table = _table(listed, random.Random(seed))
    data = encode(table)
    assert data is not None
    mapped = HostTable(data)
    assert len(mapped) == len(table) and dict(mapped.items()) == table and mapped == table
    for raw in listed + asked:
        for name in _asked(raw):
            assert mapped.get(name) == table.get(name), name
            assert (name in mapped) == (name in table), name
    assert mapped.get("\udcff.example") is None  # a lone surrogate is a miss, not an error


def _reference_encode(table) -> bytes | None:
    """The layout of hosttable's docstring, spelled out one name at a time (the encoder does it
    in bulk with numpy): what ``encode`` must produce byte for byte."""
    names = [name.encode("utf-8", "surrogatepass") for name in table]
    groups = list(dict.fromkeys(table.values()))
    if any(len(name) > hosttable._MAX_NAME for name in names) or len(groups) > hosttable._MAX_GROUPS:
        return None
    words = [x for ordinals in groups for x in (len(ordinals), *ordinals)]
    n, shift = len(names), hosttable._shift(len(names))
    homes = 1 << (32 - shift)
    m = homes + MAX_RUN + 1
    words_bytes = struct.pack(f"<{len(words)}I", *words)
    words_bytes += bytes(-len(words_bytes) % 8)
    blob_at = 64 + 16 * m + len(words_bytes)
    infos, at = [], blob_at
    for k, name in enumerate(names):
        infos.append(at << 32 | len(name) << 20 | groups.index(list(table.values())[k]))
        at += len(name)
    slots = [(hosttable.EMPTY, 0)] * m
    position = -1
    for h, k in sorted((crc32(name), k) for k, name in enumerate(names)):
        position = max(h >> shift, position + 1)   # linear probing in hash order
        if position - (h >> shift) > MAX_RUN or position >= homes + MAX_RUN:
            return None
        slots[position] = (h, infos[k])
    blob = b"".join(names)
    return (struct.pack("<16s6Q", hosttable.MAGIC, n, m, shift, len(groups), len(words), len(blob))
            + b"".join(struct.pack("<QQ", *slot) for slot in slots) + words_bytes + blob + bytes(-len(blob) % 8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=string.ascii_lowercase + ".-\n\udcffé例", max_size=12), max_size=80),
       st.integers(0, 2**32))
@example([], 0)
@example([""], 0)
@example(["a\nb.example", "a", "b.example"], 1)   # a name holding the separator the encoder splits on
@example(["\udcff", "\udcff.example", "é.example"], 2)
def test_encode_is_the_documented_layout_byte_for_byte(names, seed):
    rng = random.Random(seed)
    table = {name: tuple(sorted(set(rng.sample(range(1000), rng.randint(1, 3))))) for name in names}
    if seed % 2:   # one list: every name has the same ordinals (one group)
        table = dict.fromkeys(table, (seed % 1000,))
    assert encode(table) == _reference_encode(table)
    data = encode(table)
    if data is not None:
        assert dict(HostTable(data).items()) == table


def test_a_large_table_of_real_looking_names():
    rng = random.Random(7)
    letters = string.ascii_lowercase + string.digits + "-"
    names = {f"{''.join(rng.choices(letters, k=rng.randint(1, 20))).strip('-') or 'x'}.{rng.choice(['jp', 'co.jp', 'com', 'xn--wgv71a'])}"
             for _ in range(30_000)}
    table = {n: (i % 5,) if i % 3 else (1, 9) for i, n in enumerate(sorted(names))}
    mapped = HostTable(encode(table))
    misses = [f"{n}x" for n in list(names)[:5000]] + [f"www.{n}" for n in list(names)[:5000]]
    for _ in range(2):   # asked twice: a lookup leaves nothing behind that changes the next answer
        assert all(mapped.get(n) == t for n, t in table.items())
        assert all(mapped.get(n, "absent") == "absent" for n in misses if n not in table)
        assert all(mapped.get(n) == table[n] for n in list(table)[:100])
    with pytest.raises(KeyError):
        mapped["not-there.example"]


def test_names_crowding_one_hash_are_not_mapped():
    """crc32 is not keyed: a list that puts more than MAX_RUN names on one home slot would make
    every lookup there long. ``encode`` refuses it (the caller keeps the dict)."""
    n = MAX_RUN + 50
    shift = hosttable._shift(n)   # a name's home slot: crc32 >> shift
    crowd = [name for name in (f"h{i}.example" for i in range(2_000_000)) if crc32(name.encode()) >> shift == 0][:n]
    assert len(crowd) == n
    assert encode(dict.fromkeys(crowd, (0,))) is None
    assert encode(dict.fromkeys(crowd[:MAX_RUN // 2], (0,))) is not None
    assert encode(dict.fromkeys(crowd[:MAX_RUN // 2], (0,))) == _reference_encode(dict.fromkeys(crowd[:MAX_RUN // 2], (0,)))


def test_a_buffer_that_is_not_a_table_is_refused():
    good = encode({"a.example": (1,), "b.example": (2, 3)})
    damaged = [b"", good[:10], good[:-8], good + bytes(8), b"X" + good[1:]]
    flipped = bytearray(good)
    flipped[20] ^= 1   # the entry count
    damaged.append(bytes(flipped))
    for data in damaged:
        with pytest.raises(BadTable):
            HostTable(data)


# -- the files (edge) and the cache ---------------------------------------------------------

def _write_policy(directory: Path, n: int = 6000) -> Path:
    """A block list of ``n`` names (IDN and upper case among them) and a hosts-format list."""
    rng = random.Random(3)
    names = [f"{''.join(rng.choices(string.ascii_lowercase, k=8))}.example" for _ in range(n)]
    names += ["ÉCOLE-BLOCKED.fr", "例え-block.jp", "trailing-dot.example."]
    (directory / "big.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    hosts = [f"0.0.0.0 {''.join(rng.choices(string.ascii_lowercase, k=9))}.test" for _ in range(n)]
    (directory / "hosts.txt").write_text("\n".join(hosts) + "\n0.0.0.0 Exact-Only.Test\n", encoding="utf-8")
    (directory / "p.yaml").write_text(
        "version: 1\nsettings: {default_action: allow}\nlists:\n  big: {file: big.txt}\n  hosts: {file: hosts.txt}\n"
        "rules:\n  - {id: keep, action: allow, match: {domain: keep.aaaaaaaa.example}}\n"
        "  - {id: big, action: block, match: {list: big}}\n"
        "  - {id: hosts, action: block, match: {list: hosts}}\n", encoding="utf-8")
    return directory / "p.yaml"


def _urls(policy: Path) -> list[str]:
    big = [line for line in (policy.parent / "big.txt").read_text(encoding="utf-8").splitlines() if line]
    hosts = [line.split()[1] for line in (policy.parent / "hosts.txt").read_text().splitlines()]
    hosts_sample = hosts[:200] + ["exact-only.test", "sub.exact-only.test"]
    hosts_sample += [f"www.{h}" for h in hosts[:50]]
    sample = big[:300] + big[-3:] + [f"www.{n}" for n in big[:100]] + [n.upper() for n in big[:50]] + [f"{n}." for n in big[:50]]
    sample += ["www.école-blocked.fr", "xn--cole-blocked-feb.fr", "a.例え-block.jp", "example", "other.example",
               "keep.aaaaaaaa.example", "trailing-dot.example"]
    return [f"https://{h}/x" for h in sample + hosts_sample]


def _verdicts(snap, urls) -> list[tuple[str, str | None]]:
    return [(str(v.action), v.rule_id) for v in (snap.decide(query_for_url(u, DEVICE, now=NOW)) for u in urls)]


def _load(policy: Path, cache):
    return load_policy(policy, NOW, feeds_dir=policy.parent / "feeds", cache=cache)


def test_a_policy_served_from_mapped_tables_decides_as_compiled(tmp_path):
    policy = _write_policy(tmp_path)
    urls = _urls(policy)
    fresh = _load(policy, None)
    expected = _verdicts(fresh, urls)
    assert sum(a == "block" for a, _ in expected) > 600 and ("allow", None) in expected
    cache = PolicyCache(tmp_path / "cache")
    compiled = _load(policy, cache)   # a miss: compiled, written, then served from the mapping
    assert cache.last == "miss"
    assert isinstance(compiled._suffix, HostTable) and isinstance(compiled._exact, HostTable)
    tables = sorted(p.name for p in cache.directory.glob("*.hosts"))
    assert len(tables) == 2
    assert _verdicts(compiled, urls) == expected
    worker = PolicyCache(tmp_path / "cache")   # another process loading what the parent wrote
    loaded = _load(policy, worker)
    assert worker.last == "hit" and isinstance(loaded._suffix, HostTable)
    assert _verdicts(loaded, urls) == expected
    assert loaded._suffix == fresh._suffix and loaded._exact == fresh._exact
    assert sorted(p.name for p in cache.directory.glob("*.hosts")) == tables   # nothing written by a hit


def test_small_tables_stay_dicts(tmp_path):
    policy = _write_policy(tmp_path, n=100)
    cache = PolicyCache(tmp_path / "cache")
    snap = _load(policy, cache)
    assert type(snap._suffix) is dict and not list(cache.directory.glob("*.hosts"))
    assert _verdicts(_load(policy, cache), _urls(policy)) == _verdicts(snap, _urls(policy))


def _damage(data: bytes) -> dict[str, bytes]:
    cases = {"empty": b"", "truncated": data[:-1], "half": data[: len(data) // 2], "one byte more": data + b"\0",
             "garbage": os.urandom(len(data))}
    for at in (3, 40, len(data) // 2, len(data) - 1):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        cases[f"bit flip at {at}"] = bytes(flipped)
    return cases


def test_a_damaged_or_missing_table_file_is_refused_and_the_policy_compiled_from_its_sources(tmp_path):
    policy = _write_policy(tmp_path)
    urls = _urls(policy)
    expected = _verdicts(_load(policy, None), urls)
    told: list[str] = []
    cache = PolicyCache(tmp_path / "cache", told.append)
    _load(policy, cache)
    suffix_file = max(cache.directory.glob("*.hosts"), key=lambda p: p.stat().st_size)
    good = suffix_file.read_bytes()
    cases = _damage(good)
    cases["missing"] = None
    for name, damaged in cases.items():
        suffix_file.chmod(0o600)
        if damaged is None:
            suffix_file.unlink()
        else:
            suffix_file.write_bytes(damaged)
        refused = cache.refused
        snap = _load(policy, cache)
        assert cache.refused == refused + 1 and "host table" in cache.last, name
        assert _verdicts(snap, urls) == expected, name
        assert suffix_file.read_bytes() == good, name   # compiled from the sources and written anew
    assert told == ["miss"] + ["refused"] * len(cases)


def test_a_foreign_file_under_a_digest_name_is_refused(tmp_path):
    policy = _write_policy(tmp_path)
    urls = _urls(policy)
    expected = _verdicts(_load(policy, None), urls)
    cache = PolicyCache(tmp_path / "cache")
    _load(policy, cache)
    # A file whose name is its own digest but that is no host table: the layout check refuses it.
    foreign = hosttablefile.write(tmp_path / "elsewhere", b"KANMON-HOSTS-v1\n" + bytes(100))
    with pytest.raises(hosttablefile.DamagedTable):
        hosttablefile.open_table(tmp_path / "elsewhere", foreign)
    # Another sound table put under this policy's table's name: the digest check refuses it.
    for target in cache.directory.glob("*.hosts"):
        target.chmod(0o600)
        target.write_bytes(encode({"a.example": (0,)}))
    snap = _load(policy, cache)
    assert cache.last.startswith("refused") and _verdicts(snap, urls) == expected
    with pytest.raises(hosttablefile.DamagedTable):
        hosttablefile.open_table(cache.directory, "../" + "0" * 64)


def test_old_tables_are_removed_and_a_process_mapping_one_keeps_serving(tmp_path):
    policy = _write_policy(tmp_path)
    urls = _urls(policy)
    cache = PolicyCache(tmp_path / "cache")
    old = _load(policy, cache)
    old_verdicts = _verdicts(old, urls)
    old_files = set(cache.directory.glob("*.hosts"))
    with open(policy.parent / "big.txt", "a", encoding="utf-8") as fh:
        fh.write("newly-blocked.example\n")
    new = _load(policy, cache)
    assert cache.last == "miss"
    files = set(cache.directory.glob("*.hosts"))
    assert len(files) == 2 and files != old_files and not (old_files - files) & files
    assert all(not f.exists() for f in old_files - files)   # unreferenced: removed
    assert len(list(cache.directory.glob("*.prepared"))) == 1 and not list(cache.directory.glob(".tmp-*"))
    assert _verdicts(old, urls) == old_verdicts   # the unlinked file is still mapped here
    url = "https://newly-blocked.example/"
    assert _verdicts(old, [url]) == [("allow", None)] and _verdicts(new, [url]) == [("block", "big")]


def test_table_files_are_read_only_and_named_by_their_digest(tmp_path):
    policy = _write_policy(tmp_path)
    cache = PolicyCache(tmp_path / "cache")
    _load(policy, cache)

    for path in cache.directory.glob("*.hosts"):
        assert path.stat().st_mode & 0o777 == 0o400
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name[:-len(".hosts")]
        assert valid_domain(next(iter(hosttablefile.open_table(cache.directory, path.name[:-len(".hosts")]))))


def test_a_table_file_is_the_encoded_bytes_under_their_digest(tmp_path):
    """``write`` hashes and writes each slice in one pass: the file is exactly ``encode``'s bytes
    and its name their SHA-256, for parts larger than one slice (the slots of 70k names: 2 MiB)."""
    rng = random.Random(11)
    table = {f"{''.join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 14)))}.example": (i % 3,)
             for i in range(70_000)}
    parts = hosttable.encode_parts(table)
    assert max(len(memoryview(p).cast("B")) for p in parts) > hosttablefile._SLICE
    digest = hosttablefile.write(tmp_path, parts)
    data = (tmp_path / f"{digest}.hosts").read_bytes()
    assert data == encode(table) and hashlib.sha256(data).hexdigest() == digest
    for written_here in (False, True):
        mapped = hosttablefile.open_table(tmp_path, digest, written_here=written_here)
        assert all(mapped.get(name) == ordinals for name, ordinals in list(table.items())[::97])


def test_the_writer_maps_its_own_file_with_the_layout_checked(tmp_path):
    """The process that wrote a table maps it without hashing it again; a file that is not a
    sound table under that name (cut short, another layout) is still refused."""
    digest = hosttablefile.write(tmp_path, encode({"a.example": (0,), "b.example": (1,)}))
    path = tmp_path / f"{digest}.hosts"
    assert hosttablefile.open_table(tmp_path, digest, written_here=True).get("b.example") == (1,)
    good = path.read_bytes()
    for damaged in (good[:-8], good[:40], b"KANMON-HOSTS-v1\n" + good[16:]):
        path.chmod(0o600)
        path.write_bytes(damaged)
        with pytest.raises(hosttablefile.DamagedTable):
            hosttablefile.open_table(tmp_path, digest, written_here=True)
        with pytest.raises(hosttablefile.DamagedTable):
            hosttablefile.open_table(tmp_path, digest)
