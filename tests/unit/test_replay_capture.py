"""gateway/replay/capture.py: capture -> flows, TCP reassembly, source rewriting."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from scapy.utils import wrpcap

from gateway.replay.capture import (PACKETS, STREAM, CaptureError, CapturedPacket, parse_packet, read_capture,
                                    reassemble, rewrite_source, split_flows)

DEV, WEB = "10.77.0.2", "198.51.100.80"


def cap(pkts, labels=None) -> list[CapturedPacket]:
    return [CapturedPacket(i, float(i), bytes(p), (labels or {}).get(i)) for i, p in enumerate(pkts)]


def handshake(sport=40001, payloads=(b"GET / HTTP/1.1\r\n\r\n",), reorder=False, src=DEV):
    pkts = [IP(src=src, dst=WEB) / TCP(sport=sport, dport=80, flags="S", seq=99)]
    seq, segs = 100, []
    for p in payloads:
        segs.append(IP(src=src, dst=WEB) / TCP(sport=sport, dport=80, flags="PA", seq=seq, ack=1) / Raw(p))
        seq += len(p)
    return pkts + (segs[::-1] if reorder else segs)


def test_reassemble_out_of_order_overlap_and_gap():
    data, notes = reassemble([(106, b"world"), (100, b"hello "), (100, b"HELLO ")], isn=99)
    assert data == b"hello world"           # the first copy of a byte wins
    assert any("out of order" in n for n in notes)
    data, notes = reassemble([(100, b"abc"), (110, b"xyz")], isn=99)
    assert data == b"abc" and any("gap" in n for n in notes)
    # sequence numbers wrap around 2**32
    data, _ = reassemble([(0, b"cd"), (2**32 - 2, b"ab")], isn=2**32 - 3)
    assert data == b"abcd"


def test_ordinary_tcp_is_a_stream_and_replies_are_left_out():
    pkts = handshake(payloads=(b"GET /a ", b"HTTP/1.1\r\n\r\n"), reorder=True)
    pkts.append(IP(src=WEB, dst=DEV) / TCP(sport=80, dport=40001, flags="SA"))  # a reply: not replayed
    flows = split_flows(cap(pkts), {DEV})
    assert len(flows) == 1
    f = flows[0]
    assert f.mode == STREAM and f.payload == b"GET /a HTTP/1.1\r\n\r\n"
    assert (f.dst, f.dport, f.sport, f.family) == (WEB, 80, 40001, 4)
    assert len(f.packets) == 3


@pytest.mark.parametrize("pkts", [
    [IP(src=DEV, dst=WEB) / TCP(sport=1, dport=80, flags="S") / Raw(b"data in the SYN")],
    [IP(src=DEV, dst=WEB) / TCP(sport=1, dport=80, flags="R", seq=i) for i in range(5)],
    [IP(src=DEV, dst=WEB) / TCP(sport=1, dport=80, flags="PA") / Raw(b"no handshake")],
    [IP(src="10.77.0.3", dst=WEB) / TCP(sport=1, dport=80, flags="S")],
], ids=["syn-with-data", "rst-storm", "midstream", "spoofed"])
def test_odd_tcp_goes_packet_by_packet(pkts):
    flows = split_flows(cap(pkts), {DEV})
    assert [f.mode for f in flows] == [PACKETS]
    assert len(flows[0].packets) == len(pkts)


def test_fragments_group_by_id_and_labels_win():
    frags = fragment(IP(src=DEV, dst="198.51.100.53", id=77) / UDP(sport=5000, dport=53) / Raw(bytes(100)), fragsize=32)
    flows = split_flows(cap(frags), {DEV})
    assert len(flows) == 1 and flows[0].id == f"frag4 {DEV}>198.51.100.53 id=77"
    assert flows[0].dport == 53 and flows[0].sport == 5000 and len(flows[0].packets) == len(frags)
    labelled = split_flows(cap(frags, {i: "dns-frag" for i in range(len(frags))}), {DEV})
    assert [f.id for f in labelled] == ["dns-frag"]


def test_garbage_is_its_own_flow_and_parsing_never_raises():
    flows = split_flows(cap([Raw(b"\x00not ip"), Raw(b"")]), {DEV})
    assert [f.transport for f in flows] == ["raw", "raw"]
    for junk in (b"", b"\x45", b"\x60" + bytes(10), b"\x4f" * 30):
        parse_packet(junk)


def test_rewrite_source_keeps_lies_and_fixes_checksums():
    p = IP(bytes(IP(src=DEV, dst=WEB) / UDP(sport=1, dport=53) / Raw(b"q")))
    out = IP(rewrite_source(bytes(p), DEV, "10.77.0.9"))
    assert out.src == "10.77.0.9"
    again = IP(bytes(IP(src="10.77.0.9", dst=WEB) / UDP(sport=1, dport=53) / Raw(b"q")))
    assert out.chksum == again.chksum and out[UDP].chksum == again[UDP].chksum
    lying = IP(bytes(p))
    lying.len = 900
    rewritten = rewrite_source(bytes(lying), DEV, "10.77.0.9")
    assert IP(rewritten).len == 900 and len(rewritten) == len(bytes(lying))
    assert rewrite_source(bytes(p), "10.77.0.5", "10.77.0.9") == bytes(p)       # not the device: kept
    v6 = bytes(IPv6(src="fd77:77::2", dst="2001:db8::1") / UDP(sport=1, dport=2))
    assert rewrite_source(v6, "fd77:77::2", "10.77.0.9") == v6                    # family mismatch: kept


def test_read_capture_errors_and_roundtrip(tmp_path):
    with pytest.raises(CaptureError, match="no such file"):
        read_capture(tmp_path / "missing.pcap")
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"definitely not a capture")
    with pytest.raises(CaptureError, match="not a pcap"):
        read_capture(bad)
    good = tmp_path / "good.pcap"
    wrpcap(str(good), handshake())
    packets = read_capture(good)
    assert len(packets) == 2 and packets[0].label is None and parse_packet(packets[0].data).dport == 80
