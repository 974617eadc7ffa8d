"""Build the replay corpus with scapy: `python tests/replay/build.py OUTDIR`.

Writes OUTDIR/corpus.pcapng: the device-side packets of every flow in
tests/replay/expect.yaml, each packet carrying the pcapng comment `flow=NAME` so
`kanmon replay` can name flows. The capture is made as the lab's first device
(10.77.0.2 / fd77:77::2, the first addresses the registry hands out); packets that
pretend to be another device or a foreign host keep their own source address.

Deterministic: fixed timestamps, sequence numbers and ports, so building twice gives the
same bytes (tests/unit/test_replay_corpus.py checks the committed copy is current).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scapy.layers.dns import DNS, DNSQR, DNSRROPT, EDNS0TLV  # noqa: E402
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment  # noqa: E402
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment  # noqa: E402
from scapy.layers.tls.all import TLS  # noqa: E402
from scapy.layers.tls.extensions import (ServerName, TLS_Ext_ServerName, TLS_Ext_SignatureAlgorithms,  # noqa: E402
                                         TLS_Ext_SupportedGroups, TLS_Ext_SupportedPointFormat)
from scapy.layers.tls.handshake import TLSClientHello  # noqa: E402
from scapy.packet import Raw  # noqa: E402
from scapy.utils import PcapNgWriter  # noqa: E402

from gateway.lab.topology import DNS4, GATEWAY_TUNNEL6, SPARE4, WEB4, WEB6  # noqa: E402

DEVICE4, DEVICE6 = "10.77.0.2", "fd77:77::2"
OTHER_DEVICE4, OTHER_DEVICE6 = "10.77.0.3", "fd77:77::3"
UNASSIGNED4 = "10.77.0.99"
FOREIGN4, FOREIGN6 = "192.0.2.66", "2001:db8:bad::66"
RESOLVER_ELSEWHERE4 = "203.0.113.53"   # a resolver the device was configured with by someone else
DOT_RESOLVER4 = DNS4                   # DoT straight to a resolver address
CORPUS_NAME = "corpus.pcapng"
BASE_TIME = 1_767_225_600.0            # 2026-01-01T00:00:00Z
LINKTYPE_RAW = 101


class Corpus:
    def __init__(self) -> None:
        self.packets: list = []
        self.flows: list[str] = []
        self._port = 40000

    def port(self) -> int:
        self._port += 1
        return self._port

    def add(self, flow: str, pkts: list) -> None:
        assert flow not in self.flows, flow
        self.flows.append(flow)
        for p in pkts:
            p.comment = f"flow={flow}".encode()
            p.time = BASE_TIME + len(self.packets) * 0.001
            self.packets.append(p)

    # -- builders ------------------------------------------------------------------------
    def tcp_stream(self, flow: str, src: str, dst: str, dport: int, payload: bytes, *, segment: int = 0,
                   reorder: bool = False) -> None:
        ip = IP if ":" not in dst else IPv6
        sport, isn = self.port(), 1000
        pkts = [ip(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="S", seq=isn)]
        chunks = [payload] if not segment else [payload[i:i + segment] for i in range(0, len(payload), segment)]
        seq = isn + 1
        segs = []
        for chunk in chunks:
            segs.append(ip(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="PA", seq=seq, ack=1) / Raw(chunk))
            seq += len(chunk)
        if reorder:
            segs = segs[1:] + segs[:1]
        pkts += segs
        pkts.append(ip(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="FA", seq=seq, ack=1))
        self.add(flow, pkts)

    def udp(self, flow: str, src: str, dst: str, dport: int, payload: bytes) -> None:
        ip = IP if ":" not in dst else IPv6
        self.add(flow, [ip(src=src, dst=dst) / UDP(sport=self.port(), dport=dport) / Raw(payload)])


def http_get(host: str, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kanmon-replay-corpus\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n").encode()


def client_hello(sni: str | None) -> bytes:
    """A deterministic TLS 1.2 ClientHello (zero random) the interception proxy answers."""
    ext = [TLS_Ext_SupportedGroups(groups=[23, 24]), TLS_Ext_SupportedPointFormat(ecpl=[0]),
           TLS_Ext_SignatureAlgorithms(sig_algs=[0x0401, 0x0804, 0x0403])]
    if sni:
        ext.insert(0, TLS_Ext_ServerName(servernames=[ServerName(servername=sni.encode())]))
    hello = TLSClientHello(version=0x0303, gmt_unix_time=0, random_bytes=bytes(28), sid=b"",
                           ciphers=[0xC02F, 0xC030, 0xC02B], comp=[0], ext=ext)
    return bytes(TLS(type=22, version=0x0301, msg=[hello]))


def dns_query(name: str, qtype: str = "A", qid: int = 0x4B4D) -> bytes:
    return bytes(DNS(id=qid, rd=1, qd=DNSQR(qname=name, qtype=qtype)))


def dns_query_padded(name: str, qtype: str = "A", pad: int = 64) -> bytes:
    """A query made long with EDNS(0) padding (RFC 7830), so it can be split into fragments
    and still be a well-formed DNS message (trailing bytes would make the resolver ignore it)."""
    return bytes(DNS(id=0x4B4E, rd=1, qd=DNSQR(qname=name, qtype=qtype),
                     ar=DNSRROPT(rclass=1232, rdata=[EDNS0TLV(optcode=12, optdata=bytes(pad))])))


def udp_bytes(packet) -> bytes:
    """The UDP header and payload of `packet`, checksum computed over its IP pseudo-header
    (a UDP layer built alone has none to compute it from)."""
    return bytes(packet.__class__(bytes(packet))[UDP])


def quic_initial() -> bytes:
    """Looks like a QUIC v1 Initial (long header, type Initial) padded to 1200 bytes."""
    dcid, scid = bytes(range(8)), bytes(range(8, 16))
    head = bytes([0xC3]) + struct.pack("!I", 1) + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid
    head += b"\x00" + struct.pack("!H", 0x4000 | 1100)
    return head + bytes(1200 - len(head))


def build(out_dir: Path) -> Path:
    c = Corpus()
    # -- TCP at the flow level (real sockets) -------------------------------------------------
    for v, (src, web) in {"": (DEVICE4, WEB4), "-v6": (DEVICE6, WEB6)}.items():
        c.tcp_stream(f"http-allowed{v}", src, web, 80, http_get("www.example.test", f"/replay/allowed{v}"))
        c.tcp_stream(f"http-blocked{v}", src, web, 80, http_get("blocked.test", f"/replay/blocked{v}"))
        c.tcp_stream(f"tls-sni-allowed{v}", src, web, 443, client_hello("www.example.test"))
        c.tcp_stream(f"tls-sni-blocked{v}", src, web, 443, client_hello("www.blocked.test"))
        c.tcp_stream(f"tls-no-sni{v}", src, web, 443, client_hello(None))
        c.tcp_stream(f"doh-https{v}", src, web, 443, client_hello("doh.test"))
        c.tcp_stream(f"http-out-of-order{v}", src, web, 80, http_get("example.test", f"/replay/ooo{v}"),
                     segment=20, reorder=True)
        q = dns_query("blocked.test", "A" if not v else "AAAA")
        c.tcp_stream(f"dns-tcp-blocked{v}", src, DNS4 if not v else GATEWAY_TUNNEL6, 53, struct.pack("!H", len(q)) + q)
    c.tcp_stream("dot-853", DEVICE4, DOT_RESOLVER4, 853, client_hello("dns.test"))
    c.tcp_stream("dot-853-no-sni", DEVICE4, DOT_RESOLVER4, 853, client_hello(None))

    # -- DNS, packet by packet ------------------------------------------------------------------
    c.udp("dns-allowed", DEVICE4, DNS4, 53, dns_query("www.example.test"))
    c.udp("dns-blocked", DEVICE4, DNS4, 53, dns_query("blocked.test"))
    c.udp("dns-blocked-sub", DEVICE4, DNS4, 53, dns_query("www.blocked.test"))
    c.udp("dns-doh-name", DEVICE4, DNS4, 53, dns_query("doh.test"))
    c.udp("dns-https-ech", DEVICE4, DNS4, 53, dns_query("ech.example.test", "HTTPS"))
    c.udp("dns-other-resolver", DEVICE4, RESOLVER_ELSEWHERE4, 53, dns_query("www.example.test"))
    c.udp("dns-allowed-v6", DEVICE6, GATEWAY_TUNNEL6, 53, dns_query("v6.example.test", "AAAA"))
    c.udp("dns-blocked-v6", DEVICE6, WEB6, 53, dns_query("blocked.test", "AAAA"))
    c.udp("dns-https-ech-v6", DEVICE6, GATEWAY_TUNNEL6, 53, dns_query("ech.example.test", "HTTPS"))

    # -- QUIC and other UDP / ICMP ------------------------------------------------------------------
    c.udp("quic-initial", DEVICE4, WEB4, 443, quic_initial())
    c.udp("quic-initial-v6", DEVICE6, WEB6, 443, quic_initial())
    c.udp("udp-other-port", DEVICE4, SPARE4, 9999, b"replay-udp-probe")
    c.udp("udp-other-port-v6", DEVICE6, WEB6, 9999, b"replay-udp-probe")
    c.add("icmp-echo-internet", [IP(src=DEVICE4, dst=WEB4) / ICMP(id=7, seq=1) / Raw(b"replay")])

    # -- fragments --------------------------------------------------------------------------------
    frag_q = IP(src=DEVICE4, dst=DNS4, id=0x1111) / UDP(sport=c.port(), dport=53) / Raw(
        dns_query_padded("files.example.test"))
    c.add("frag-dns", fragment(frag_q, fragsize=24))
    overlap = IP(src=DEVICE4, dst=SPARE4, id=0x2222) / UDP(sport=c.port(), dport=9999) / Raw(b"A" * 64)
    ob = bytes(overlap[UDP])
    c.add("frag-overlap", [
        IP(src=DEVICE4, dst=SPARE4, id=0x2222, flags="MF", frag=0, proto=17) / Raw(ob[:48]),
        IP(src=DEVICE4, dst=SPARE4, id=0x2222, flags="MF", frag=3, proto=17) / Raw(b"B" * 24),   # overlaps 24..48
        IP(src=DEVICE4, dst=SPARE4, id=0x2222, frag=6, proto=17) / Raw(ob[48:]),
    ])
    overlap_dns = udp_bytes(IP(src=DEVICE4, dst=DNS4) / UDP(sport=c.port(), dport=53)
                            / Raw(dns_query_padded("www.example.test", pad=40)))
    c.add("frag-overlap-dns", [
        IP(src=DEVICE4, dst=DNS4, id=0x3333, flags="MF", frag=0, proto=17) / Raw(overlap_dns[:32]),
        IP(src=DEVICE4, dst=DNS4, id=0x3333, frag=2, proto=17) / Raw(overlap_dns[16:]),
    ])
    f6_port = c.port()
    f6_payload = udp_bytes(IPv6(src=DEVICE6, dst=GATEWAY_TUNNEL6) / UDP(sport=f6_port, dport=53)
                           / Raw(dns_query_padded("v6.example.test", "AAAA")))
    f6_overlap = udp_bytes(IPv6(src=DEVICE6, dst=WEB6) / UDP(sport=c.port(), dport=53)
                           / Raw(dns_query_padded("v6.example.test", "AAAA")))
    c.add("frag6-dns", [
        IPv6(src=DEVICE6, dst=GATEWAY_TUNNEL6, nh=44) / IPv6ExtHdrFragment(nh=17, id=0x6001, m=1, offset=0) / Raw(f6_payload[:48]),
        IPv6(src=DEVICE6, dst=GATEWAY_TUNNEL6, nh=44) / IPv6ExtHdrFragment(nh=17, id=0x6001, m=0, offset=6) / Raw(f6_payload[48:]),
    ])
    c.add("frag6-overlap", [
        IPv6(src=DEVICE6, dst=WEB6, nh=44) / IPv6ExtHdrFragment(nh=17, id=0x6002, m=1, offset=0) / Raw(f6_overlap[:48]),
        IPv6(src=DEVICE6, dst=WEB6, nh=44) / IPv6ExtHdrFragment(nh=17, id=0x6002, m=0, offset=4) / Raw(f6_overlap[32:]),
    ])

    # -- TCP oddities, packet by packet ---------------------------------------------------------------
    c.add("tcp-syn-with-data", [IP(src=DEVICE4, dst=WEB4) / TCP(sport=c.port(), dport=80, flags="S", seq=5000)
                                / Raw(http_get("www.example.test", "/replay/syn-data"))])
    c.add("tcp-syn-with-data-v6", [IPv6(src=DEVICE6, dst=WEB6) / TCP(sport=c.port(), dport=80, flags="S", seq=5000)
                                   / Raw(http_get("www.example.test", "/replay/syn-data-v6"))])
    storm_port = c.port()
    c.add("tcp-rst-storm", [IP(src=DEVICE4, dst=WEB4) / TCP(sport=storm_port, dport=80, flags="R", seq=7000 + 1000 * i)
                            for i in range(40)])
    c.add("tcp-midstream-data", [IP(src=DEVICE4, dst=SPARE4) / TCP(sport=c.port(), dport=8080, flags="PA", seq=9000, ack=1)
                                 / Raw(b"data without a handshake")])
    c.add("tcp-xmas", [IP(src=DEVICE4, dst=WEB4) / TCP(sport=c.port(), dport=80, flags="FSRPAU", seq=1)])

    # -- spoofed sources --------------------------------------------------------------------------
    c.add("spoof-other-device-dns", [IP(src=OTHER_DEVICE4, dst=DNS4) / UDP(sport=c.port(), dport=53) / Raw(dns_query("www.example.test"))])
    c.add("spoof-other-device-syn", [IP(src=OTHER_DEVICE4, dst=WEB4) / TCP(sport=c.port(), dport=80, flags="S", seq=1)])
    c.add("spoof-other-device-v6", [IPv6(src=OTHER_DEVICE6, dst=WEB6) / TCP(sport=c.port(), dport=80, flags="S", seq=1)])
    c.add("spoof-unassigned-tunnel", [IP(src=UNASSIGNED4, dst=SPARE4) / UDP(sport=c.port(), dport=9999) / Raw(b"spoof")])
    c.add("spoof-foreign", [IP(src=FOREIGN4, dst=WEB4) / TCP(sport=c.port(), dport=80, flags="S", seq=1)])
    c.add("spoof-foreign-udp", [IP(src=FOREIGN4, dst=SPARE4) / UDP(sport=c.port(), dport=9999) / Raw(b"spoof")])
    c.add("spoof-foreign-v6", [IPv6(src=FOREIGN6, dst=WEB6) / UDP(sport=c.port(), dport=9999) / Raw(b"spoof")])

    # -- oversized and truncated ------------------------------------------------------------------
    c.add("oversized-udp", [IP(src=DEVICE4, dst=SPARE4) / UDP(sport=c.port(), dport=9999) / Raw(bytes(3000))])
    c.add("oversized-v6", [IPv6(src=DEVICE6, dst=WEB6) / UDP(sport=c.port(), dport=53) / Raw(bytes(3000))])
    full = IP(bytes(IP(src=DEVICE4, dst=DNS4) / UDP(sport=c.port(), dport=53) / Raw(dns_query("www.example.test"))))
    full.len = 1000                                        # claims more than is there
    c.add("truncated-ip-length", [full])
    c.add("truncated-tcp-header", [IP(src=DEVICE4, dst=WEB4, proto=6) / Raw(b"\x9c\x41\x00\x50\x00\x00")])
    short6 = IPv6(bytes(IPv6(src=DEVICE6, dst=WEB6) / UDP(sport=c.port(), dport=9999) / Raw(b"x" * 40)))
    short6.plen = 900
    c.add("truncated-v6-payload-length", [short6])

    # -- not IP at all ----------------------------------------------------------------------------
    c.add("garbage-not-ip", [Raw(b"\x00\x11\x22\x33 this is not an IP packet \xff" * 3)])
    c.add("garbage-short", [Raw(b"\x45\x00")])
    c.add("garbage-version-4", [Raw(b"\x4f" + bytes(range(1, 60)))])

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CORPUS_NAME
    # LINKTYPE_RAW (101): the packets are the bytes the tunnel interface carries (IPv4, IPv6
    # or, on purpose, neither), written as raw frames so one link type covers them all.
    # scapy's public write() guesses a link type per packet class; its packet writer takes
    # it explicitly, which is what a mixed (IP, IPv6, garbage) tunnel capture needs.
    writer = PcapNgWriter(str(path))
    writer.linktype = LINKTYPE_RAW
    writer.write_header(None)
    for p in c.packets:
        writer._write_packet(bytes(p), LINKTYPE_RAW, sec=float(p.time), usec=int(round((p.time % 1) * 1e6)),
                             comments=[p.comment])
    writer.close()
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/replay/build.py OUTDIR", file=sys.stderr)
        return 2
    path = build(Path(argv[0]))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
