"""Issue #15: hostile enrollment bodies over real TLS. Every class of malformed body (built by
generators, not typed in: nesting 8,000 deep, 5,000-digit numbers, huge strings, wrong types,
invalid UTF-8, missing, misspelt and duplicate keys) gets a 400 `bad-request` whose Japanese and
English message says what is wrong, an auth-log record, no traceback in the server log and no
registry write. Before the fix a deep or long-number body killed the connection thread with a
RecursionError / ValueError: no answer, no record."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.enroll.decide import MAX_JSON_DEPTH, MAX_NUMBER_CHARS
from gateway.enroll.server import MAX_BODY_BYTES
from tests.unit.test_enroll_server import make_env, new_key

KEY = "A" * 43 + "="


def _key_with(extra: str) -> bytes:
    """A body with a valid key and one more field given as raw JSON text."""
    return ('{"wg_public_key": "%s", %s}' % (KEY, extra)).encode()


def deep(depth: int, opener: str = "[", closer: str = "]", leaf: str = "") -> str:
    return opener * depth + leaf + closer * depth


def digits(n: int) -> str:
    return "".join(str((i * 7 + 3) % 10) for i in range(n - 1)) + "9"


# (case id, body, a fragment the English detail must contain)
NESTING = [
    ("array-8000", deep(8000).encode(), "nested too deeply"),
    ("object-3000", deep(3000, '{"":', "}", "1").encode(), "nested too deeply"),
    ("mixed-5000", deep(2500, '[{"a":', "}]", "0").encode()[:MAX_BODY_BYTES], "nested too deeply"),
    ("field-8000", _key_with('"platform": ' + deep(7000)), "nested too deeply"),
    ("one-over-limit", _key_with('"platform": ' + deep(MAX_JSON_DEPTH)), "nested too deeply"),
]
NUMBERS = [
    ("int-5000", _key_with('"jailbroken": ' + digits(5000)), "number is too long"),
    ("negative-int-5000", _key_with('"jailbroken": -' + digits(5000)), "number is too long"),
    ("bare-int-5000", digits(5000).encode(), "number is too long"),
    ("fraction-5000", _key_with('"os_version": 0.' + digits(5000)), "number is too long"),
    ("exponent-5000", _key_with('"os_version": 1e' + digits(5000)), "number is too long"),
    ("int-one-over-limit", _key_with('"jailbroken": ' + digits(MAX_NUMBER_CHARS + 1)), "number is too long"),
    ("nan", _key_with('"jailbroken": NaN'), "not a JSON value"),
    ("infinity", _key_with('"os_version": -Infinity'), "not a JSON value"),
]
STRINGS = [
    ("platform-15000", _key_with('"platform": "%s"' % ("x" * 15000)), "at most 64"),
    ("key-15000", json.dumps({"wg_public_key": "A" * 15000}).encode(), "wg_public_key is invalid"),
    ("field-name-15000", _key_with('"%s": 1' % ("n" * 15000)), "unknown fields"),
    ("escaped-surrogate-name", b'{"\\ud800\\udfff\\ud800": 1}', "unknown fields"),
    ("escaped-surrogate-value", _key_with('"platform": "\\udc80"'), "at most 64"),
    ("unterminated", b'{"wg_public_key": "' + b"A" * 5000, "not JSON"),
]
TYPES = [(f"key-as-{name}", json.dumps({"wg_public_key": value}).encode(), "wg_public_key")
         for name, value in [("number", 5), ("list", [KEY]), ("object", {"k": KEY}), ("null", None),
                             ("bool", True), ("empty", ""), ("blank", "   ")]] + [
    ("platform-list", _key_with('"platform": ["ios"]'), "platform must be a string"),
    ("os-version-number", _key_with('"os_version": 17.4'), "os_version must be a string"),
    ("jailbroken-string", _key_with('"jailbroken": "no"'), "true or false"),
    ("jailbroken-int", _key_with('"jailbroken": 0'), "true or false"),
    ("top-list", b"[]", "JSON object"),
    ("top-string", b'"wg_public_key"', "JSON object"),
    ("top-null", b"null", "JSON object"),
    ("empty", b"", "not JSON"),
]
ENCODINGS = [
    ("latin1", '{"wg_public_key": "%s", "platform": "Ä"}'.encode("latin-1") % KEY.encode(), "UTF-8"),
    ("lone-ff", b"\xff", "UTF-8"),
    ("overlong-slash", b'{"wg_public_key": "\xc0\xaf"}', "UTF-8"),
    ("encoded-surrogate", b'{"wg_public_key": "\xed\xa0\x80"}', "UTF-8"),
    ("truncated-sequence", b'{"wg_public_key": "\xe3\x81', "UTF-8"),
    ("utf16", json.dumps({"wg_public_key": KEY}).encode("utf-16"), "UTF-8"),
]
KEYS = [
    ("missing", b"{}", "wg_public_key"),
    ("only-platform", json.dumps({"platform": "ios"}).encode(), "wg_public_key"),
    ("upper-case", json.dumps({"WG_PUBLIC_KEY": KEY}).encode(), "wg_public_key"),
    ("misspelt", json.dumps({"wg_publickey": KEY}).encode(), "wg_public_key"),
    ("camel-case", json.dumps({"wgPublicKey": KEY}).encode(), "wg_public_key"),
    ("duplicate-key", ('{"wg_public_key": "%s", "wg_public_key": "%s"}' % (KEY, KEY)).encode(), "duplicate fields"),
    ("duplicate-jailbroken", _key_with('"jailbroken": true, "jailbroken": false'), "duplicate fields: jailbroken"),
]
CASES = NESTING + NUMBERS + STRINGS + TYPES + ENCODINGS + KEYS


def test_the_cases_are_what_they_claim():
    assert len(deep(8000)) == 16000 <= MAX_BODY_BYTES
    assert all(len(body) <= MAX_BODY_BYTES for _, body, _ in CASES), "a case would be a 413, not a body problem"
    assert len(digits(5000)) == 5000 and digits(5000).isdigit()
    assert (MAX_JSON_DEPTH, MAX_NUMBER_CHARS) == (32, 100)
    # Without the bounds, Python's own parser fails these with exceptions, not a JSONDecodeError.
    with pytest.raises(RecursionError):
        json.loads(deep(8000))
    with pytest.raises(ValueError, match="Exceeds the limit"):
        json.loads(digits(5000))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = make_env(tmp_path_factory.mktemp("bodies"), rate=100000, burst=100000)
    env.register("dev-1")
    yield env
    env.server.stop()
    env.registry.close()


@pytest.mark.parametrize("body, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_body_is_a_clear_400_with_an_auth_record(env, caplog, body, fragment):
    _, ident = env.issue("dev-1", new_key())
    before = len(env.logs.auth())
    with caplog.at_level(logging.INFO, logger="kanmon.enroll"):
        status, reply, _ = env.request(body, identity=ident)
    assert status == 400, reply
    assert reply["error"] == "bad-request"
    assert reply["message"]["ja"] and reply["message"]["en"]
    ja, _, en = reply["detail"].partition(" / ")
    assert fragment in en, reply["detail"]
    assert ja and not ja.isascii(), "the detail has a Japanese part"
    if fragment == "wg_public_key":
        assert "wg_public_key" in ja, "both languages name the expected field"
    assert len(reply["detail"]) < 1000, "client-supplied text is quoted short"
    records = env.logs.auth()[before:]
    assert len(records) == 1, records
    assert records[0]["kanmon.auth.reason"] == "bad-request" and records[0]["event.outcome"] == "failure"
    assert records[0]["http.response.status_code"] == 400 and records[0]["source.ip"] == "127.0.0.1"
    json.dumps(records[0], ensure_ascii=False).encode("utf-8")     # the record can be written as UTF-8
    problems = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]
    assert env.registry.get("dev-1").wg_public_key is None


def test_the_depth_limit_is_exactly_32_levels(env):
    """32 levels (the object itself counts) still parse: the refusal is then about the field."""
    _, ident = env.issue("dev-1", new_key())
    at_limit = _key_with('"platform": ' + deep(MAX_JSON_DEPTH - 1))
    status, reply, _ = env.request(at_limit, identity=ident)
    assert status == 400 and "platform must be a string" in reply["detail"]
    brackets_in_strings = _key_with('"platform": "%s"' % ("[{" * 33))
    status, reply, _ = env.request(brackets_in_strings, identity=ident)
    assert status == 400 and "at most 64" in reply["detail"], "brackets inside strings are not nesting"


def test_a_body_over_the_cap_is_a_413_with_a_record(env):
    """Without Content-Length (chunked) the read itself is bounded. The client sends exactly
    one byte too many and no more (unread bytes at close would reset the connection)."""
    _, ident = env.issue("dev-1", new_key())
    before = len(env.logs.auth())
    over = deep(MAX_BODY_BYTES).encode()[:MAX_BODY_BYTES + 1]
    raw = (b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           + b"%x\r\n" % len(over) + over)
    status, reply, _ = env.request(None, identity=ident, raw=raw)
    assert status == 413 and reply["error"] == "too-large"
    assert [r["kanmon.auth.reason"] for r in env.logs.auth()[before:]] == ["too-large"]


def test_a_good_body_still_enrolls_after_all_that(env):
    key = new_key()
    _, ident = env.issue("dev-1", key)
    status, reply, _ = env.request({"wg_public_key": key, "platform": "ios", "os_version": "17.5",
                                    "jailbroken": False}, identity=ident)
    assert status == 200, reply
    assert env.registry.get("dev-1").wg_public_key == key
