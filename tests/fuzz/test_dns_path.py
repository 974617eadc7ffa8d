"""Fuzz: DNS message handling on the gateway's DNS path.

Wire messages built from fuzzed questions (any label bytes, lengths, types, classes, flags,
question counts, trailing junk) and plain random bytes are unpacked by mitmproxy as its DNS
layer does; every message that unpacks is run through the addons exactly as the gateway
chains them (identity -> policy decider -> enforcer, ``addons/identity.py``,
``addons/policy.py``, ``addons/enforce.py``, unwrapped, so an exception is a finding and
not hidden by the fail-closed guard). Must hold:

- no addon raises; every query ends with a verdict;
- a query the verdict does not pass is answered by the gateway (NXDOMAIN, the sinkhole
  address, or REFUSED when undecided), with the query's id, and the answer packs to wire;
  a query it passes gets no local answer (it goes upstream);
- a name under a blocked domain is blocked however its ASCII letters are cased;
- a query from an address that is no admitted device is refused, never forwarded;
- the verdict does not change when only the case of the name changes.
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import strategies as st
from mitmproxy import dns
from mitmproxy.test import tflow
from wireguard_tools import WireguardKey

from addons.enforce import Enforcer
from gateway.proxy.flowstate import METADATA_VERDICT
from addons.identity import DeviceDirectory, DeviceIdentity
from addons.policy import PolicyDecider, PolicyHolder
from addons.blockpage import Helpdesk
from gateway.proxy.connections import LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.policy import compile_text
from gateway.registry.model import DeviceRecord
from gateway.verdict import Verdict
from tests.fuzz.harness import Harness

DEVICE = DeviceRecord("phone-1", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.2"),
                      ipaddress.ip_address("fd77:77::2"), owner="sato@example.jp")
POLICY = compile_text("""
version: 1
settings: {default_action: allow, dns_block: nxdomain}
rules:
  - {id: webmail, action: block, dns_block: sinkhole, match: {domain: [webmail.test]}}
  - {id: tracker, action: block, match: {domain: [tracker.test, 例え.jp]}}
  - {id: exact, action: block, match: {domain_exact: [doh.example]}}
  - {id: apk, action: block, match: {file_extension: [apk]}}
  - {id: path, action: block, match: {url: ["*.files.test/secret/*"]}}
""")
BLOCKED_SUFFIXES = (b"webmail.test", b"tracker.test", b"xn--r8jz45g.jp")


class Chain:
    def __init__(self) -> None:
        self.metrics = GatewayMetrics()
        self.connections = LiveConnections()
        directory = DeviceDirectory()
        directory.replace([DEVICE])
        self.identity = DeviceIdentity(directory, self.connections, self.metrics)
        self.decider = PolicyDecider(PolicyHolder(POLICY, "<fuzz>"), self.connections)
        self.enforcer = Enforcer(self.connections, self.metrics, Helpdesk("情報システム課", "IT desk", "1234"),
                                 [ipaddress.ip_network("10.77.0.0/24"), ipaddress.ip_network("fd77:77::/64")],
                                 lambda _cid: None)

    def query(self, message: dns.DNSMessage, source: str = "10.77.0.2") -> dns.DNSFlow:
        client = tflow.tclient_conn()
        client.peername = (source, 5353)
        self.identity.client_connected(client)
        flow = tflow.tdnsflow(client_conn=client, req=message)
        if client.error is None:  # a refused client never gets this far in mitmproxy
            for addon in (self.identity, self.decider, self.enforcer):
                addon.dns_request(flow)
        self.identity.client_disconnected(client)
        return flow


CHAIN = Chain()

_LABEL = st.one_of(
    st.binary(min_size=1, max_size=63),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
            max_size=20).map(str.encode),
    st.sampled_from([b"webmail", b"tracker", b"test", b"TrAcKeR", b"xn--r8jz45g", b"jp", b"doh", b"example",
                     b"xn--", b"xn--zz", b"a" * 63, b"*", b".", b"\x00"]),
)
_NAME = st.lists(_LABEL, max_size=6).map(tuple)
_TYPES = st.one_of(st.sampled_from([1, 28, 65, 64, 5, 16, 255, 12, 33, 0]), st.integers(0, 65535))


def _wire_name(labels: tuple[bytes, ...]) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


@st.composite
def wire_query(draw) -> bytes:
    questions = draw(st.lists(st.tuples(_NAME, _TYPES, st.sampled_from([1, 1, 1, 3, 255, 0])), min_size=0, max_size=2))
    header = struct.pack("!HHHHHH", draw(st.integers(0, 65535)), draw(st.sampled_from([0x0100, 0x0000, 0x0120, 0x8180,
                                                                                        0x2800])) | draw(st.sampled_from([0, 0, 0x0010])),
                         len(questions), 0, 0, 0)
    body = b"".join(_wire_name(n) + struct.pack("!HH", t, c) for n, t, c in questions)
    return header + body + draw(st.sampled_from([b"", b"", b"\x00", b"\xc0\x0c"]))


UNPACK_FAILURES: dict[str, int] = {}  # reported by bench/fuzz.py


def _unpack(wire: bytes) -> dns.DNSMessage | None:
    try:
        return dns.DNSMessage.unpack(wire)
    except struct.error:
        # mitmproxy's DNS layer logs it and closes the client's connection: nothing passes.
        UNPACK_FAILURES["struct.error"] = UNPACK_FAILURES.get("struct.error", 0) + 1
        return None
    except UnicodeError:
        # mitmproxy 12.2.3 decodes labels with the 'idna' codec and lets its UnicodeError
        # ("xn--", an empty or over-long label) escape the DNS layer, which does not catch
        # it: mitmproxy logs a crash for that client connection and answers nothing, so
        # nothing passes either. tests/e2e/test_faults.py sends such a query through the
        # real gateway and checks that it keeps answering everyone afterwards.
        UNPACK_FAILURES["UnicodeError"] = UNPACK_FAILURES.get("UnicodeError", 0) + 1
        return None


def check_dns_path(wire: bytes) -> None:
    message = _unpack(wire)
    if message is None:
        return
    flow = CHAIN.query(message)
    verdict = flow.metadata.get(METADATA_VERDICT)
    assert isinstance(verdict, Verdict), "no verdict recorded"
    if verdict.passes:
        assert flow.response is None, "an allowed query was answered locally"
    else:
        assert flow.response is not None, "a blocked query has no answer"
        assert flow.response.id == message.id
        assert flow.response.response_code in (dns.response_codes.NXDOMAIN, dns.response_codes.REFUSED,
                                               dns.response_codes.NOERROR)
        if _packs(message):
            assert _packs(flow.response), "the gateway's answer cannot be sent"
        # else: a name mitmproxy cannot re-encode ("." inside a label, an empty label in a
        # second question): it can neither forward nor answer it, so the client connection
        # is closed on the error and nothing passes (checked end to end in test_faults.py).
    q = message.question
    if q is not None:
        name = q.name.lower().rstrip(".").encode("utf-8", "replace")
        if any(name == s or name.endswith(b"." + s) for s in BLOCKED_SUFFIXES):
            assert not verdict.passes, f"{q.name!r} is under a blocked domain but passed"
        swapped = dns.DNSMessage.unpack(_swapcase_ascii(wire))
        other = CHAIN.query(swapped).metadata.get(METADATA_VERDICT)
        assert (other.action, other.rule_id) == (verdict.action, verdict.rule_id), \
            f"case changes the verdict for {q.name!r}"
    refused = CHAIN.query(message, source="10.77.0.99")
    assert refused.response is None or not refused.metadata.get(METADATA_VERDICT, verdict).passes
    assert METADATA_VERDICT not in refused.metadata, "an unknown address got a decision"


def _packs(message: dns.DNSMessage) -> bool:
    try:
        message.packed  # noqa: B018
    except ValueError:
        return False
    return True


def _swapcase_ascii(wire: bytes) -> bytes:
    head, rest = wire[:12], bytearray(wire[12:])
    for i, b in enumerate(rest):
        if 65 <= b <= 90 or 97 <= b <= 122:
            rest[i] = b ^ 0x20
    return head + bytes(rest)


HARNESSES = [
    Harness("dns-wire-query", wire_query(), check_dns_path, ci_examples=300),
    Harness("dns-random-bytes", st.binary(min_size=0, max_size=300), check_dns_path, ci_examples=200),
]

for _h in HARNESSES:
    globals()[_h.as_test().__name__] = _h.as_test()
