"""A capture file -> the flows a device sent, each ready to be replayed.

Pure apart from `read_capture` (which reads the file). scapy parses; the grouping and the TCP
reassembly are ours because they encode replay decisions (which flows can be replayed at the
stream level, which must go packet by packet) that no library makes for us.

Flow names: the corpus builder puts a pcapng comment `flow=NAME` on every packet of a flow;
a capture without comments (tcpdump) gets computed names such as
`tcp 10.77.0.2:40001>198.51.100.80:80`.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.packet import Packet

STREAM = "stream"    # TCP: reassembled client->server bytes, re-sent over a real socket
PACKETS = "packets"  # everything else: the recorded packets, written to the tunnel as they are

_SYN, _RST, _ACK, _FIN = 0x02, 0x04, 0x10, 0x01


class CaptureError(Exception):
    pass


@dataclass(frozen=True)
class CapturedPacket:
    """One packet at the IP level (`data` is what the tunnel carries), with its flow label."""
    index: int
    time: float
    data: bytes
    label: str | None = None


@dataclass
class Flow:
    id: str
    mode: str                      # STREAM | PACKETS
    transport: str                 # tcp | udp | icmp | ip | raw
    family: int | None             # 4 | 6 | None (not IP)
    src: str | None
    dst: str | None
    sport: int | None
    dport: int | None
    packets: list[bytes] = field(default_factory=list)
    payload: bytes = b""           # STREAM: the reassembled client->server bytes
    notes: list[str] = field(default_factory=list)

    @property
    def is_dns(self) -> bool:
        return self.dport == 53

    def summary(self) -> str:
        where = f"{self.dst}:{self.dport}" if self.dport is not None else (self.dst or "?")
        return f"{self.transport}/{self.mode} -> {where}"


# -- reading --------------------------------------------------------------------------------

def _ip_bytes(pkt: Packet) -> bytes:
    """The IP-level bytes of a captured frame (raw-IP, Ethernet or Linux cooked captures)."""
    for layer in (IP, IPv6):
        if pkt.haslayer(layer):
            return bytes(pkt[layer])
    # Not recognised as IP: keep the frame payload as the tunnel would carry it.
    inner = pkt
    while inner.payload and inner.name in ("Ethernet", "cooked linux", "cooked linux v2", "Loopback"):
        inner = inner.payload
    return bytes(inner)


def read_capture(path: str | Path) -> list[CapturedPacket]:
    """pcap or pcapng (scapy reads both); raises CaptureError with the reason."""
    from scapy.utils import rdpcap  # import here: scapy's full import is slow, only I/O needs it
    try:
        frames = rdpcap(str(path))
    except FileNotFoundError as exc:
        raise CaptureError(f"{path}: no such file") from exc
    except Exception as exc:  # scapy raises Scapy_Exception / struct errors for bad files
        raise CaptureError(f"{path}: not a pcap/pcapng capture ({exc})") from exc
    out = []
    for i, frame in enumerate(frames):
        comment = getattr(frame, "comment", None)
        label = None
        if comment:
            text = comment.decode("utf-8", "replace") if isinstance(comment, bytes) else str(comment)
            for part in text.split():
                if part.startswith("flow="):
                    label = part[5:]
        out.append(CapturedPacket(i, float(frame.time), _ip_bytes(frame), label))
    return out


# -- parsing one packet ---------------------------------------------------------------------

@dataclass(frozen=True)
class PacketFacts:
    family: int | None
    src: str | None
    dst: str | None
    transport: str
    sport: int | None = None
    dport: int | None = None
    flags: int = 0
    seq: int = 0
    payload: bytes = b""
    fragment: bool = False
    frag_id: int | None = None
    well_formed: bool = True


def parse_packet(data: bytes) -> PacketFacts:
    """What the replay needs to know about one IP-level packet (never raises)."""
    if not data or data[0] >> 4 not in (4, 6):
        return PacketFacts(None, None, None, "raw", well_formed=False)
    try:
        pkt = IP(data) if data[0] >> 4 == 4 else IPv6(data)
    except Exception:
        return PacketFacts(None, None, None, "raw", well_formed=False)
    if isinstance(pkt, IP):
        declared = pkt.len if pkt.len is not None else len(data)
        well_formed = declared == len(data) and pkt.ihl is not None and pkt.ihl >= 5
        fragment = bool(pkt.flags.MF) or pkt.frag != 0
        frag_id = pkt.id if fragment else None
        first = pkt.frag == 0
        family = 4
    else:
        declared = 40 + (pkt.plen or 0)
        well_formed = declared == len(data)
        frag = pkt.getlayer(IPv6ExtHdrFragment)
        fragment = frag is not None
        frag_id = frag.id if frag is not None else None
        first = frag is None or frag.offset == 0
        family = 6
    transport, sport, dport, flags, seq, payload = "ip", None, None, 0, 0, b""
    if first and pkt.haslayer(TCP):
        tcp = pkt[TCP]
        transport, sport, dport, flags, seq = "tcp", tcp.sport, tcp.dport, int(tcp.flags), tcp.seq
        payload = bytes(tcp.payload)
    elif first and pkt.haslayer(UDP):
        udp = pkt[UDP]
        transport, sport, dport = "udp", udp.sport, udp.dport
        payload = bytes(udp.payload)
    elif pkt.haslayer(ICMP) or (family == 6 and pkt.nh == 58):
        transport = "icmp"
    elif fragment:
        proto = pkt.proto if family == 4 else (frag.nh if frag is not None else pkt.nh)
        transport = {6: "tcp", 17: "udp"}.get(proto, "ip")
    return PacketFacts(family, pkt.src, pkt.dst, transport, sport, dport, flags, seq, payload, fragment, frag_id,
                       well_formed)


def _computed_id(index: int, f: PacketFacts) -> str:
    if f.family is None:
        return f"raw #{index}"
    if f.fragment:
        return f"frag{f.family} {f.src}>{f.dst} id={f.frag_id}"
    if f.sport is not None:
        return f"{f.transport} {f.src}:{f.sport}>{f.dst}:{f.dport}"
    return f"{f.transport} {f.src}>{f.dst}"


# -- the device's address and direction -----------------------------------------------------

def device_addresses(packets: list[CapturedPacket]) -> set[str]:
    """The capturing device's addresses: the most frequent source address per IP family."""
    counts: dict[int, Counter] = {4: Counter(), 6: Counter()}
    for p in packets:
        f = parse_packet(p.data)
        if f.family is not None and f.src:
            counts[f.family][f.src] += 1
    return {c.most_common(1)[0][0] for c in counts.values() if c}


# -- flows ----------------------------------------------------------------------------------

def reassemble(segments: list[tuple[int, bytes]], isn: int) -> tuple[bytes, list[str]]:
    """Client->server bytes from (seq, payload) segments in any order; the first copy of a
    byte wins (retransmissions and overlaps change nothing). Stops at a gap."""
    notes: list[str] = []
    data: dict[int, int] = {}
    for seq, payload in segments:
        offset = (seq - isn - 1) % 2**32
        for i, b in enumerate(payload):
            data.setdefault(offset + i, b)
    out = bytearray()
    while len(out) in data:
        out.append(data[len(out)])
    if len(out) < len(data):
        notes.append(f"gap in the stream after {len(out)} bytes; {len(data) - len(out)} bytes not replayed")
    order = [seq for seq, p in segments if p]
    if order != sorted(order, key=lambda s: (s - isn) % 2**32):
        notes.append("segments were out of order in the capture (reassembled)")
    return bytes(out), notes


def split_flows(packets: list[CapturedPacket], device: set[str] | None = None) -> list[Flow]:
    """Group the device-side packets into flows in order of first appearance. Packets sent
    *to* the device (replies in a two-way capture) are left out."""
    device = device if device is not None else device_addresses(packets)
    groups: dict[str, list[tuple[CapturedPacket, PacketFacts]]] = {}
    for p in packets:
        f = parse_packet(p.data)
        if f.dst is not None and f.dst in device:
            continue
        key = p.label or _computed_id(p.index, f)
        groups.setdefault(key, []).append((p, f))
    return [_make_flow(key, members, device) for key, members in groups.items()]


def _make_flow(key: str, members: list[tuple[CapturedPacket, PacketFacts]], device: set[str]) -> Flow:
    facts = [f for _, f in members]
    head = next((f for f in facts if f.sport is not None), facts[0])
    flow = Flow(key, PACKETS, head.transport, head.family, head.src, head.dst, head.sport, head.dport,
                packets=[p.data for p, _ in members])
    if head.transport == "tcp" and _stream_replayable(facts, device):
        syn = next(f for f in facts if f.flags & _SYN)
        flow.mode = STREAM
        flow.payload, flow.notes = reassemble([(f.seq, f.payload) for f in facts if f.payload], syn.seq)
    return flow


def _stream_replayable(facts: list[PacketFacts], device: set[str]) -> bool:
    """A TCP flow goes through a real socket when it is an ordinary connection: it starts
    with a SYN without data, from the device's address, with no fragments, no malformed
    packet, no SYN carrying data and at most one reset."""
    first = facts[0]
    if not (first.flags & _SYN) or first.flags & _ACK or first.payload:
        return False
    if any(f.src not in device or f.fragment or not f.well_formed for f in facts):
        return False
    if any(f.flags & _SYN and f.payload for f in facts):
        return False
    return sum(1 for f in facts if f.flags & _RST) <= 1


def rewrite_source(data: bytes, old: str, new: str) -> bytes:
    """The packet with source `old` replaced by `new` and checksums recomputed; other fields
    (lengths, flags, offsets — including deliberately wrong ones) are kept as recorded."""
    f = parse_packet(data)
    if f.src != old or f.family is None:
        return data
    if ipaddress.ip_address(new).version != f.family:
        return data
    pkt = IP(data) if f.family == 4 else IPv6(data)
    pkt.src = new
    if f.family == 4:
        del pkt.chksum
    if not f.fragment and f.well_formed:
        for layer in (TCP, UDP):
            if pkt.haslayer(layer):
                del pkt[layer].chksum
    return bytes(pkt)
