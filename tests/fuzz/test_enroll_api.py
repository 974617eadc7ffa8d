"""Fuzz: the enrollment API's request handling (gateway/enroll/).

The HTTP/1.1 request parser and decision path of ``EnrollmentServer`` run on arbitrary
bytes — well-formed requests with fuzzed methods, targets, headers and JSON bodies, and raw
garbage — delivered in arbitrary chunks, through a stand-in for the TLS connection (the
TLS handshake itself is pyOpenSSL's and is exercised in tests/unit/test_enroll_server.py).
The client presents no certificate, so no request can succeed. Must hold:

- the server answers with a clean 4xx (never 200, never 500), a JSON body with a known
  reason code and a Japanese and an English message, parseable as HTTP/1.1; or closes the
  connection quietly when no complete request arrived; never raises, never hangs;
- the answer does not depend on how the bytes were chunked;
- ``parse_enroll_request`` on any body gives an ``EnrollRequest`` or ``RequestProblem``,
  also on hostile bodies (issue #15: nesting thousands deep, numbers thousands of digits
  long, long strings and keys, escaped lone surrogates); its message stays short and UTF-8;
  ``decide_enrollment`` on any certificate bytes and request refuses with a 4xx.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from pathlib import Path

import h11
from hypothesis import strategies as st
from wireguard_tools import WireguardKey

from gateway.config import load_config_text
from gateway.enroll.decide import (REFUSALS, EnrollRequest, RequestProblem, decide_enrollment,
                                   parse_enroll_request)
from gateway.enroll.server import MAX_HEAD_BYTES, EnrollmentServer, _Closed
from gateway.devices.certcheck import Reason
from gateway.posture import PosturePolicy
from gateway.registry.sqlite import SqliteRegistry
from tests.fuzz.harness import Harness

_STATE = Path(tempfile.mkdtemp(prefix="kanmon-fuzz-enroll-"))
CONFIG = load_config_text(f"""
state_dir: {_STATE}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
enrollment: {{listen: "127.0.0.1:8443", rate_per_minute: 100000000, burst: 100000000}}
""")
REGISTRY = SqliteRegistry(CONFIG.registry_path)
GOOD_KEY = str(WireguardKey.generate().public_key())
KNOWN_REASONS = set(REFUSALS) | {str(r) for r in Reason}  # refusals and certificate-check reasons
CLEAN_4XX = {status for status, _ in REFUSALS.values() if 400 <= status < 500}
NOW = dt.datetime(2025, 6, 2, tzinfo=dt.UTC)


class NullLog:
    def append(self, stream: str, record: dict) -> None:
        json.dumps(record, ensure_ascii=False)  # every auth record must be serializable


class FakeTls:
    """What ``_handle``/``_send`` use of a pyOpenSSL connection: recv in given chunks, send."""

    def __init__(self, chunks: list[bytes]):
        self.chunks = list(chunks)
        self.sent = bytearray()

    def setsockopt(self, *_args) -> None:
        pass

    def recv(self, n: int) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > n:
            self.chunks.insert(0, chunk[n:])
        return chunk[:n]

    def send(self, data: bytes) -> int:
        self.sent += data
        return len(data)

    def get_peer_certificate(self, as_cryptography: bool = False):
        return None

    def get_peer_cert_chain(self, as_cryptography: bool = False):
        return None


SERVER = EnrollmentServer(CONFIG, REGISTRY, NullLog(), GOOD_KEY, "-----BEGIN CERTIFICATE-----\n", port=0,
                          request_timeout=5.0)


def serve(data: bytes, cuts: list[int]) -> tuple[int, dict] | None:
    """Feed ``data`` split at ``cuts``; the status and JSON body answered, or None (closed)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:]) if b > a]
    tls = FakeTls(chunks)
    deadline = SERVER.monotonic() + 5.0
    try:
        reply = SERVER._handle(tls, "192.0.2.7", deadline)
    except _Closed:
        return None
    assert reply is not None
    SERVER._send(tls, reply, deadline)
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
    client.receive_data(bytes(tls.sent))
    response = client.next_event()
    assert isinstance(response, h11.Response), f"not an HTTP response: {bytes(tls.sent)[:200]!r}"
    body = bytearray()
    while True:
        event = client.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)) or event is h11.NEED_DATA:
            break
    return response.status_code, json.loads(body)


def check_clean_refusal(case: tuple[bytes, list[int], list[int]]) -> None:
    data, cuts, other_cuts = case
    answer = serve(data, cuts)
    if answer is None:
        return
    status, body = answer
    assert status in CLEAN_4XX, f"status {status} for {data[:120]!r}"
    assert body["error"] in KNOWN_REASONS, body
    assert body["error"] not in REFUSALS or REFUSALS[body["error"]][0] == status, body
    assert body["message"]["ja"] and body["message"]["en"]
    head_size = data.find(b"\r\n\r\n")
    if head_size == -1 or head_size > MAX_HEAD_BYTES // 2:
        return  # h11 bounds the *incomplete* head: near the limit, how it arrived decides
    other = serve(data, other_cuts)
    # h11's wording of a syntax error may differ with the chunking; the decision may not.
    assert other is not None and (other[0], other[1]["error"]) == (status, body["error"]), \
        f"the answer depends on the chunking: {answer} vs {other}"


# -- strategies --------------------------------------------------------------------------

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)
_BODY_DOC = st.one_of(
    _JSON,
    st.fixed_dictionaries({"wg_public_key": st.one_of(st.just(GOOD_KEY), st.text(max_size=50), _JSON)},
                          optional={"platform": _JSON, "os_version": st.one_of(st.text(max_size=80), _JSON),
                                    "jailbroken": _JSON, "jailbroke": st.booleans()}),
)
_BODY = st.one_of(_BODY_DOC.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200),
                  st.just(b'{"wg_public_key": "' + GOOD_KEY.encode() + b'"}'))
_HEADER_NAME = st.sampled_from([b"Host", b"Content-Type", b"Transfer-Encoding", b"Content-Length", b"Connection",
                                b"Expect", b"X-Forwarded-For", b"Bad Header", b"", b"\xff"])
_HEADER_VALUE = st.one_of(st.sampled_from([b"application/json", b"chunked", b"100-continue", b"close", b"-1",
                                           b"99999999999999999999", b"0", b"1.5"]), st.binary(max_size=20))


@st.composite
def http_request(draw) -> bytes:
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"post", b"", b"P\x00ST"]))
    target = draw(st.sampled_from([b"/v1/enroll", b"/v1/enroll?x=1", b"/", b"/v1/enroll/../x", b"*",
                                   b"http://a/v1/enroll", b"/" + b"a" * 9000]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 junk"]))
    body = draw(_BODY)
    headers = [(b"Host", b"vpn.example.test")]
    if draw(st.booleans()):
        if draw(st.booleans()):
            headers.append((b"Content-Length", str(len(body)).encode()))
        else:
            headers.append((b"Transfer-Encoding", b"chunked"))
            body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:]) if part) + b"0\r\n\r\n"
    headers += draw(st.lists(st.tuples(_HEADER_NAME, _HEADER_VALUE), max_size=3))
    head = method + b" " + target + b" " + version + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return head + b"\r\n" + body


_CUTS = st.lists(st.integers(0, 20000), max_size=6)
_REQUEST_CASE = st.tuples(st.one_of(http_request(), st.binary(max_size=400)), _CUTS, _CUTS)


def check_parse_request(body: bytes) -> None:
    try:
        request = parse_enroll_request(body)
    except RequestProblem as exc:
        assert exc.text.ja and exc.text.en
        return
    assert isinstance(request, EnrollRequest) and request.wg_public_key


@st.composite
def hostile_body(draw) -> bytes:
    """Bodies built to break a JSON parser: deep nesting, huge numbers, long strings."""
    depth = draw(st.one_of(st.integers(0, 40), st.integers(0, 9000)))
    opener = draw(st.sampled_from(["[", '{"a":', '{"":[', "[{\"k\":"]))
    closer = {"[": "]", '{"a":': "}", '{"":[': "]}", "[{\"k\":": "}]"}[opener]
    leaf = draw(st.one_of(
        st.integers(1, 6000).map(lambda n: "-" * (n % 2) + "9" * n),
        st.integers(1, 6000).map(lambda n: "0." + "1" * n),
        st.integers(1, 6000).map(lambda n: "1e" + "7" * n),
        st.integers(0, 15000).map(lambda n: '"' + "x" * n + '"'),
        st.sampled_from(["NaN", "-Infinity", '"\\ud800"', "null", "true", "{}", '"' + GOOD_KEY + '"'])))
    value = opener * depth + leaf + closer * depth
    shape = draw(st.sampled_from(["bare", "field", "key", "name"]))
    if shape == "field":
        doc = '{"wg_public_key": "%s", "%s": %s}' % (GOOD_KEY, draw(st.sampled_from(sorted(_FIELD_NAMES))), value)
    elif shape == "key":
        doc = '{"wg_public_key": %s}' % value
    elif shape == "name":
        doc = '{"%s": 1, "wg_public_key": "%s"}' % ("n" * draw(st.integers(0, 15000)), GOOD_KEY)
    else:
        doc = value
    raw = doc.encode()
    if draw(st.booleans()):
        raw = raw[:draw(st.integers(0, len(raw)))]       # truncated: invalid JSON, maybe invalid UTF-8
    return raw


_FIELD_NAMES = {"platform", "os_version", "jailbroken", "wg_public_key", "jailbroke"}


def check_hostile_body(body: bytes) -> None:
    try:
        request = parse_enroll_request(body)
    except RequestProblem as exc:
        for text in (exc.text.ja, exc.text.en):
            assert text and len(text) < 600, text[:200]
            text.encode("utf-8")
        return
    assert isinstance(request, EnrollRequest) and request.wg_public_key


def hostile_request(body: bytes) -> bytes:
    return (b"POST /v1/enroll HTTP/1.1\r\nHost: vpn.example.test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def check_decide_refuses(case: tuple[bytes, bytes]) -> None:
    leaf, body = case
    try:
        request = parse_enroll_request(body)
    except RequestProblem:
        request = EnrollRequest(GOOD_KEY)
    decision = decide_enrollment(leaf or None, [leaf], [], [], NOW, request, REGISTRY.get, REGISTRY.by_public_key,
                                 PosturePolicy.from_pairs({}, True))
    assert not decision.ok and 400 <= decision.http_status < 500, decision
    assert decision.message.ja and decision.message.en


_DER_LIKE = st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda b: b"\x30\x82" + len(b).to_bytes(2, "big") + b),
                      st.binary(max_size=100).map(lambda b: b"-----BEGIN CERTIFICATE-----\n" + b + b"\n-----END CERTIFICATE-----\n"))

HARNESSES = [
    Harness("enroll-http", _REQUEST_CASE, check_clean_refusal, ci_examples=250),
    Harness("enroll-body", _BODY, check_parse_request, ci_examples=300),
    Harness("enroll-decide", st.tuples(_DER_LIKE, _BODY), check_decide_refuses, ci_examples=150),
    Harness("enroll-hostile-body", hostile_body(), check_hostile_body, ci_examples=200),
    Harness("enroll-hostile-http", st.tuples(hostile_body().map(hostile_request), _CUTS, _CUTS), check_clean_refusal,
            ci_examples=100),
]

for _h in HARNESSES:
    globals()[_h.as_test().__name__] = _h.as_test()
