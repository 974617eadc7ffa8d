"""gateway/replay/judge.py, expectations.py and report.py: outcomes, bypasses, the diff."""

from __future__ import annotations

import base64

import dnslib
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from gateway.replay.capture import PACKETS, STREAM, Flow
from gateway.replay.expectations import parse_expectations
from gateway.replay.judge import compare, decide, find_bypasses, judge_packets, judge_stream
from gateway.replay.report import render, summary
from gateway.yamlsource import SourceErrors

DEV, WEB, DNS, UPLINK = "10.77.0.2", "198.51.100.80", "198.51.100.53", "198.51.100.1"
PREFIXES = ["10.77.0.0/24", "fd77:77::/64"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def stream(dport=80) -> Flow:
    return Flow("s", STREAM, "tcp", 4, DEV, WEB, 40001, dport, payload=b"x")


def packets_flow(dport=53, transport="udp", dst=DNS) -> Flow:
    return Flow("p", PACKETS, transport, 4, DEV, dst, 40002, dport)


def result(received=b"", end="eof", connect="ok", port=40001):
    return {"connect": connect, "end": end, "received": b64(received), "local_port": port, "error": "boom"}


def test_block_page_gives_blocked_with_the_header_rule():
    page = b"HTTP/1.1 403 Forbidden\r\nX-Kanmon-Rule: r1\r\n\r\n<html>"
    obs = judge_stream(stream(), result(page), [], DEV)
    assert (obs.outcome, obs.rule, obs.status) == ("blocked", "r1", 403)
    obs = judge_stream(stream(), result(b"HTTP/1.1 200 OK\r\n\r\nhi"), [], DEV)
    assert (obs.outcome, obs.status) == ("allowed", 200)


def test_tls_answered_is_blocked_only_when_a_record_of_that_port_says_so():
    hello_back = b"\x16\x03\x03\x00\x52\x02"
    rec = {"source.ip": DEV, "source.port": 40001, "kanmon.verdict": "block", "rule.id": "sni-rule"}
    other_port = dict(rec, **{"source.port": 40009})
    other_device = dict(rec, **{"source.ip": "10.77.0.3"})
    assert judge_stream(stream(443), result(hello_back, "timeout"), [rec], DEV).rule == "sni-rule"
    assert judge_stream(stream(443), result(hello_back, "timeout"), [rec], DEV).outcome == "blocked"
    assert judge_stream(stream(443), result(hello_back, "timeout"), [other_port, other_device], DEV).outcome == "allowed"


@pytest.mark.parametrize("res,outcome", [
    (result(connect="refused"), "refused"),
    (result(connect="timeout"), "dropped"),
    (result(b"", "reset"), "reset"),
    (result(b"", "timeout"), "dropped"),
    (None, "dropped"),
])
def test_stream_transport_outcomes(res, outcome):
    assert judge_stream(stream(), res, [], DEV).outcome == outcome


def dns_reply(rcode: int, src=DNS) -> IP:
    msg = dnslib.DNSRecord(dnslib.DNSHeader(id=1, qr=1, rcode=rcode), q=dnslib.DNSQuestion("a.test"))
    return IP(src=src, dst=DEV) / UDP(sport=53, dport=40002) / Raw(msg.pack())


def test_packet_flow_dns_icmp_and_silence():
    rec = {"source.ip": DEV, "source.port": 40002, "kanmon.verdict": "block", "rule.id": "dns-rule"}
    obs = judge_packets(packets_flow(), {"sent": 1}, [dns_reply(3)], [rec], DEV)
    assert (obs.outcome, obs.rule) == ("nxdomain", "dns-rule")
    assert judge_packets(packets_flow(), {"sent": 1}, [dns_reply(0)], [], DEV).outcome == "allowed"
    # a reply to another port is not this flow's
    other = IP(src=DNS, dst=DEV) / UDP(sport=53, dport=40999) / Raw(b"x")
    assert judge_packets(packets_flow(), {"sent": 1}, [other], [], DEV).outcome == "dropped"
    quic = packets_flow(443, dst=WEB)
    unreachable = IP(bytes(IP(src="10.77.0.1", dst=DEV) / ICMP(type=3, code=3)
                           / IP(src=DEV, dst=WEB) / UDP(sport=40002, dport=443)))
    assert judge_packets(quic, {"sent": 1}, [unreachable], [], DEV).outcome == "refused"
    rst = IP(src=WEB, dst=DEV) / TCP(sport=80, dport=40002, flags="R")
    assert judge_packets(packets_flow(80, "tcp", WEB), {"sent": 1}, [rst], [], DEV).outcome == "reset"
    synack = IP(src=WEB, dst=DEV) / TCP(sport=80, dport=40002, flags="SA")
    assert judge_packets(packets_flow(80, "tcp", WEB), {"sent": 1}, [synack], [], DEV).outcome == "answered"
    obs = judge_packets(packets_flow(9999, dst=WEB), {"sent": 0, "errors": ["OSError: Message too long"]}, [], [], DEV)
    assert obs.outcome == "dropped" and "Message too long" in obs.detail


def frame(pkt) -> dict:
    return {"t": 0.0, "data": b64(bytes(Ether() / pkt))}


def test_bypass_rules():
    records = {"proxy": [{"kanmon.verdict": "allow", "destination.ip": WEB, "destination.port": 80}],
               "conn": [{"kanmon.verdict": "block", "destination.ip": WEB, "destination.port": 443}],
               "dns": [{"kanmon.verdict": "allow", "dns.question.name": "www.example.test"}]}
    q = lambda name: dnslib.DNSRecord.question(name).pack()  # noqa: E731
    explained = [
        frame(IP(src=UPLINK, dst=WEB) / TCP(sport=5555, dport=80, flags="S")),
        frame(IP(src=UPLINK, dst=WEB) / TCP(sport=5555, dport=80, flags="A")),   # same connection
        frame(IP(src=UPLINK, dst=DNS) / UDP(sport=6000, dport=53) / Raw(q("www.example.test"))),
        {"t": 0.0, "data": b64(bytes(Ether() / ARP()))},
        frame(IPv6(src="fe80::1", dst="ff02::1:ff00:1") / ICMP()),
    ]
    assert find_bypasses(explained, records, {UPLINK}, {DNS}, PREFIXES) == []
    leaks = [
        frame(IP(src=DEV, dst=WEB) / UDP(sport=1, dport=9999)),                       # a device address
        frame(IP(src="192.0.2.66", dst=WEB) / TCP(sport=1, dport=80, flags="S")),     # foreign source
        frame(IP(src=UPLINK, dst=WEB) / TCP(sport=7777, dport=443, flags="S")),       # only a block record
        frame(IP(src=UPLINK, dst=WEB) / TCP(sport=7778, dport=8080, flags="A")),      # no connection
        frame(IP(src=UPLINK, dst=DNS) / UDP(sport=6001, dport=53) / Raw(q("blocked.test"))),
        frame(IP(src=UPLINK, dst="198.51.100.90") / UDP(sport=1, dport=9999)),
        frame(IP(src=UPLINK, dst=WEB) / ICMP()),
    ]
    found = find_bypasses(explained + leaks, records, {UPLINK}, {DNS}, PREFIXES)
    assert len(found) == len(leaks)
    reasons = " | ".join(b.reason for b in found)
    assert "device tunnel address" in reasons and "not the gateway's uplink" in reasons
    assert "'blocked.test'" in reasons and "9999" in reasons


EXPECT_TEXT = """
max_bypass: 0
flows:
  s: {outcome: allowed, rule: null}
  p: {outcome: nxdomain, rule: dns-rule}
  gone: {outcome: dropped}
"""


def test_compare_and_render_a_readable_bilingual_diff():
    expect = parse_expectations(EXPECT_TEXT, "e.yaml")
    flows = [stream(), packets_flow(), Flow("extra", PACKETS, "raw", None, None, None, None, None)]
    results = {"streams": {"s": result(b"HTTP/1.1 403 Forbidden\r\nX-Kanmon-Rule: r1\r\n\r\n")},
               "packets": {"p": {"sent": 1}, "extra": {"sent": 1}},
               "received": [{"t": 0, "data": b64(bytes(dns_reply(3)))}]}
    records = {"dns": [{"source.ip": DEV, "source.port": 40002, "kanmon.verdict": "block", "rule.id": "dns-rule"}]}
    v = decide(flows, expect, results, records, {4: DEV}, [], {UPLINK}, {DNS}, PREFIXES)
    assert not v.ok
    fields = {(m.flow, m.field) for m in v.mismatches}
    assert fields == {("s", "outcome"), ("s", "rule"), ("gone", "flow"), ("extra", "expectation")}
    text = render(v, flows)
    assert "期待と異なります" in text and "expectations do not hold" in text
    assert "s [tcp/stream -> 198.51.100.80:80]: outcome: allowed -> blocked" in text
    assert "rule: None -> r1" in text
    data = summary(v, flows, capture="c", expect="e", device="d", seconds=1.0)
    assert data["flows"] == 3 and data["bypass_count"] == 0 and not data["ok"]
    # all good once the expectation matches what happened
    fixed = parse_expectations("flows:\n  s: {outcome: blocked, rule: r1, status: 403}\n"
                               "  p: {outcome: nxdomain, rule: dns-rule}\n  extra: {outcome: dropped}\n")
    v = decide(flows, fixed, results, records, {4: DEV}, [], {UPLINK}, {DNS}, PREFIXES)
    assert v.ok and "期待どおり" in render(v, flows)


def test_bypass_over_the_limit_fails_even_when_flows_match():
    expect = parse_expectations("flows:\n  p: {outcome: dropped}\n")
    leak = [frame(IP(src=DEV, dst=WEB) / UDP(sport=1, dport=9))]
    v = decide([packets_flow(9, dst=WEB)], expect, {"packets": {"p": {"sent": 1}}}, {}, {4: DEV}, leak,
               {UPLINK}, {DNS}, PREFIXES)
    assert v.mismatches == [] and not v.ok and "10.77.0.2" in render(v, [packets_flow(9, dst=WEB)])


@pytest.mark.parametrize("text,where", [
    ("flows:\n  a: {outcome: maybe}\n", "f.yaml:2"),
    ("flows:\n  a: {outcome: allowed, colour: red}\n", "f.yaml:2"),
    ("flows: {}\n", "f.yaml:1"),
    ("flows:\n  a: {outcome: allowed}\n  a: {outcome: dropped}\n", "f.yaml:3"),
    ("- not a mapping\n", "f.yaml:1"),
])
def test_bad_expectation_files_name_file_and_line(text, where):
    with pytest.raises(SourceErrors) as exc:
        parse_expectations(text, "f.yaml")
    assert str(exc.value.errors[0]).startswith(where)


def test_compare_only_checks_given_fields():
    expect = parse_expectations("flows:\n  s: {outcome: allowed}\n")
    from gateway.replay.judge import Observation
    assert compare(expect, {"s": Observation("s", "allowed", rule="anything", status=200)}) == []
