"""The prepared-policy cache (gateway/runtime/policycache.py, issue #22): a restart with unchanged
inputs does not parse the lists again; any changed input is a new key; a damaged cache file
(truncated, bit-flipped, foreign, malformed) is refused, counted and removed, and the
policy is compiled from its sources — the verdicts never differ from a fresh compile."""

from __future__ import annotations

import hashlib
import marshal
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

import gateway.policy.compiler as compiler_module
import gateway.runtime.policycache as policycache
from gateway.policy import DeviceContext, load_policy, query_for_url
from gateway.runtime.policycache import MAGIC, PolicyCache, cache_key, decode, encode
from tests.unit.test_policy_corpus import load_corpus

ROOT = Path(__file__).resolve().parents[2]
DEVICE = DeviceContext("policy-test", frozenset(), "org")
# A BYOD phone on an old iOS: blocked by byod-old-os "unless" the host is in the remediation list
# (an unless: walks the list itself, so the cache keeps that list's hosts).
OLD_PHONE = DeviceContext("old-phone", frozenset(), "byod", platform="ios", os_version="15.0")
UNLESS_URLS = ["https://mesu.apple.com/assets/x", "https://mdm.example.lg.jp/enroll", "https://www.example.org/"]
NOW = datetime(2026, 6, 1, 3, 0, tzinfo=UTC)
URLS = [e["url"] for e in load_corpus()]


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A copy of the shipped example policy and its lists (the tests change files in it)."""
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    return tmp_path / "policies"


def _verdicts(snap) -> list[tuple[str, str | None]]:
    queries = [query_for_url(u, DEVICE, now=NOW) for u in URLS] + [query_for_url(u, OLD_PHONE, now=NOW) for u in UNLESS_URLS]
    return [(str(v.action), v.rule_id) for v in map(snap.decide, queries)]


def _load(policy_dir: Path, cache: PolicyCache | None):
    return load_policy(policy_dir / "example.yaml", NOW, feeds_dir=policy_dir / "feeds", cache=cache)


def _no_list_parsing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a list was parsed although the cache had it")

    monkeypatch.setattr(compiler_module, "parse_list", refuse)


def test_second_load_uses_the_cache_and_gives_the_same_verdicts(policy_dir, tmp_path, monkeypatch):
    cache = PolicyCache(tmp_path / "state" / "policy-cache")
    fresh = _load(policy_dir, None)
    first = _load(policy_dir, cache)
    assert cache.last == "miss" and cache.misses == 1
    files = list(cache.directory.glob("*.prepared"))
    assert len(files) == 1 and not list(cache.directory.glob(".tmp-*"))
    assert first.prepared is None  # not kept alive after the store
    _no_list_parsing(monkeypatch)
    second = _load(policy_dir, cache)
    assert cache.last == "hit" and cache.hits == 1
    assert second.version == fresh.version == first.version
    assert second.lists == fresh.lists
    assert second._exact == fresh._exact and second._suffix == fresh._suffix  # the host tables as compiled
    assert _verdicts(second) == _verdicts(fresh)
    old_phone = _verdicts(fresh)[-3:]
    assert old_phone[2] == ("block", "byod-old-os") and all(rule != "byod-old-os" for _, rule in old_phone[:2])
    assert sum(1 for action, _ in _verdicts(fresh) if action == "block") > 100  # the corpus exercises the lists


def test_a_changed_list_is_a_new_key_and_is_read_again(policy_dir, tmp_path):
    cache = PolicyCache(tmp_path / "cache")
    before = _load(policy_dir, cache)
    url = "https://news.yahoo.co.jp/"
    assert before.decide(query_for_url(url, DEVICE, now=NOW)).action == "allow"
    with open(policy_dir / "lists" / "webmail.txt", "a", encoding="utf-8") as fh:
        fh.write("news.yahoo.co.jp\n")
    after = _load(policy_dir, cache)
    assert cache.last == "miss" and cache.misses == 2
    assert after.decide(query_for_url(url, DEVICE, now=NOW)).rule_id == "webmail"
    assert len(list(cache.directory.glob("*.prepared"))) == 1  # the old key's file is gone


def test_the_key_covers_every_input():
    lists = {"a": ("a.txt", "x.example\n"), "b": ("b.txt", "y.example\n")}
    base = cache_key("version: 1\n", lists, "feeds-1")
    assert base == cache_key("version: 1\n", dict(reversed(list(lists.items()))), "feeds-1")  # order-free
    variants = [
        cache_key("version: 1 \n", lists, "feeds-1"),
        cache_key("version: 1\n", {**lists, "a": ("a.txt", "x.example\nz.example\n")}, "feeds-1"),
        cache_key("version: 1\n", {**lists, "a": ("other/a.txt", "x.example\n")}, "feeds-1"),
        cache_key("version: 1\n", {"a": lists["a"]}, "feeds-1"),
        cache_key("version: 1\n", lists, "feeds-2"),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # the boundary between fields counts: file "f" + text "xy" is not file "fx" + text "y"
    assert cache_key("p", {"a": ("f", "xy")}, "") != cache_key("p", {"a": ("fx", "y")}, "")


def test_the_engine_version_is_in_the_key(monkeypatch):
    lists = {"a": ("a.txt", "x.example\n")}
    base = cache_key("version: 1\n", lists, "")
    monkeypatch.setattr(policycache, "_ENGINE_VERSION", "another engine")
    assert cache_key("version: 1\n", lists, "") != base
    monkeypatch.setattr(policycache, "_ENGINE_VERSION", None)
    assert cache_key("version: 1\n", lists, "") == base  # computed again from the sources


def _damage_cases(data: bytes) -> dict[str, bytes]:
    head = len(MAGIC) + 32 + 8
    cases = {
        "empty": b"",
        "magic only": MAGIC,
        "truncated header": data[: head - 3],
        "truncated payload": data[:-1],
        "half": data[: len(data) // 2],
        "one byte more": data + b"\0",
        "other magic": b"X" + data[1:],
        "garbage": os.urandom(len(data)),
    }
    for name, at in (("magic", 3), ("digest", len(MAGIC) + 5), ("length", head - 1), ("payload start", head + 2),
                     ("payload middle", head + (len(data) - head) // 2), ("payload end", len(data) - 1)):
        flipped = bytearray(data)
        flipped[at] ^= 0x10
        cases[f"bit flip in {name}"] = bytes(flipped)
    return cases


def test_a_damaged_cache_file_is_refused_and_the_policy_compiled_from_its_sources(policy_dir, tmp_path):
    told: list[str] = []
    cache = PolicyCache(tmp_path / "cache", told.append)
    fresh = _verdicts(_load(policy_dir, None))
    _load(policy_dir, cache)
    (path,) = cache.directory.glob("*.prepared")
    good = path.read_bytes()
    cases = _damage_cases(good)
    for name, damaged in cases.items():
        path.write_bytes(damaged)
        refused = cache.refused
        snap = _load(policy_dir, cache)
        assert cache.refused == refused + 1 and cache.last.startswith("refused"), name
        assert _verdicts(snap) == fresh, name
        assert path.read_bytes() == good, name  # compiled from the sources and written anew
    assert cache.refused == len(cases)
    assert told == ["miss"] + ["refused"] * len(cases)  # what the gateway counts in kanmon_policy_cache_total


def test_a_valid_file_of_other_inputs_or_shape_is_refused(policy_dir, tmp_path):
    cache = PolicyCache(tmp_path / "cache")
    snap = _load(policy_dir, None)
    key = "0" * 64
    prepared = _prepared_of(policy_dir)
    # A sound file written for another key, put where this key's file goes.
    cache.path_for(key).parent.mkdir(parents=True)
    cache.path_for(key).write_bytes(encode("1" * 64, prepared))
    assert cache.load(key) is None and "other inputs" in cache.last
    assert not cache.path_for(key).exists()  # removed
    # A digest-correct payload of the wrong shape (or format) is damage too.
    fmt = compiler_module.PREPARED_FORMAT
    sound = (fmt, key, (), (), (((0,), "a.example"),), (), (), ())
    decode(_framed(marshal.dumps(sound)), key)  # the shape the cases below break
    for value in [(fmt + 1, *sound[1:]), (fmt, key, "x", *sound[3:]), (fmt, key, (("l", "f", 3, "", ()),), *sound[3:]),
                  ["not", "a", "tuple"], sound[:-1], (fmt, key, (("l", "f", "", "", (("re", "1"),)),), *sound[3:]),
                  (*sound[:3], (("l", "7"),), *sound[4:]),  # a size that is not a number
                  (*sound[:4], (((1, 0), "a.example"),), *sound[5:]),  # ordinals out of order
                  (*sound[:4], (((0,), "a.example"), ((1,), "a.example")), *sound[5:]),  # a host twice
                  (*sound[:4], ((("0",), "a.example"),), *sound[5:]),
                  (*sound[:6], (("x.example/*", "^re$", None, "yes", None, None, "", "^://"),), sound[7])]:
        with pytest.raises(policycache.DamagedCache):
            decode(_framed(marshal.dumps(value)), key)
    assert snap.rules  # the policy itself compiles fine


def _framed(payload: bytes) -> bytes:
    return MAGIC + hashlib.sha256(payload).digest() + len(payload).to_bytes(8, "big") + payload


def _prepared_of(policy_dir: Path):
    """The Prepared of a compile of the copy (through the loader's own cache path)."""
    seen = {}

    class Keep(PolicyCache):
        def store(self, key, prepared):
            seen["prepared"] = prepared
            return True

    _load(policy_dir, Keep(policy_dir / "unused"))
    return seen["prepared"]


def test_encode_decode_round_trip(policy_dir):
    prepared = _prepared_of(policy_dir)
    back = decode(encode("k" * 64, prepared), "k" * 64)
    assert back == prepared
    # Lists are kept whole only where an unless: walks them; the host tables hold the rest.
    assert len(back.lists["remediation"].suffix) > 3 and not back.lists["webmail"].suffix
    assert back.sizes["webmail"] > 10 and len(back.suffix) > 100


def test_an_unwritable_cache_directory_only_costs_the_cache(policy_dir, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    cache = PolicyCache(blocker / "policy-cache")
    snap = _load(policy_dir, cache)
    assert cache.write_failures == 1
    assert _verdicts(snap) == _verdicts(_load(policy_dir, None))
    snap = _load(policy_dir, cache)  # nothing readable there: compiled again, served
    assert cache.hits == 0 and cache.write_failures == 2
    assert _verdicts(snap) == _verdicts(_load(policy_dir, None))


def test_a_policy_with_errors_writes_no_cache(policy_dir, tmp_path):
    cache = PolicyCache(tmp_path / "cache")
    with open(policy_dir / "lists" / "webmail.txt", "a", encoding="utf-8") as fh:
        fh.write("not a domain/\n")
    with pytest.raises(compiler_module.SourceErrors):
        _load(policy_dir, cache)
    assert not cache.directory.exists() or not list(cache.directory.iterdir())


WILDCARD_POLICY = """
version: 1
lists:
  ads: {file: ads.txt}
rules:
  - {id: site-path, action: block, match: {url: ["site.example/secret/*", "https://*.files.example:8443/x*"]}}
  - {id: any-scheme, action: block, match: {url: ["ws.example/feed"]}}
  - {id: ads, action: block, match: {list: ads}}
  - {id: rx, action: block, match: {url_regex: ["/track/[0-9]+"]}}
"""
WILDCARD_URLS = ["https://site.example/secret/a", "http://site.example/secret/", "https://site.example/open",
                 "https://a.files.example:8443/x1", "https://a.files.example/x1", "wss://ws.example/feed",
                 "HTTPS://SITE.EXAMPLE/secret/b", "https://x.ads.example/", "https://ok.example/track/12"]


def test_a_cached_policy_with_url_wildcards_decides_as_compiled(tmp_path):
    (tmp_path / "p.yaml").write_text(WILDCARD_POLICY)
    (tmp_path / "ads.txt").write_text("ads.example\n")
    cache = PolicyCache(tmp_path / "cache")

    def load(c):
        snap = load_policy(tmp_path / "p.yaml", NOW, feeds_dir=tmp_path / "feeds", cache=c)
        return [(str(v.action), v.rule_id) for v in (snap.decide(query_for_url(u, DEVICE, now=NOW)) for u in WILDCARD_URLS)]

    fresh = load(None)
    assert fresh == [("block", "site-path"), ("block", "site-path"), ("allow", None), ("block", "site-path"),
                     ("allow", None), ("block", "any-scheme"), ("block", "site-path"), ("block", "ads"), ("block", "rx")]
    assert load(cache) == fresh and cache.last == "miss"
    (path,) = cache.directory.glob("*.prepared")
    assert b"site.example/secret/*" in path.read_bytes()  # the compiled wildcards are in the cache
    assert load(cache) == fresh and cache.last == "hit"
