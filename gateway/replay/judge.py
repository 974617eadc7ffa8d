"""What happened to each replayed flow, and whether anything went around the proxy.

Pure: takes what the device received (`inject` results), the gateway's log records and the
frames the internet side saw; no I/O, no clock.
"""

from __future__ import annotations

import base64
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import dnslib
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, IPerror6, IPv6
from scapy.layers.l2 import Ether

from gateway.replay.capture import STREAM, Flow
from gateway.replay.expectations import Expectation, ExpectationSet

PASSING = frozenset({"allow", "monitor", "no-inspect", "tenant-restrict"})
DNS_RCODES = {0: "allowed", 3: "nxdomain", 5: "refused"}
ND_TYPES = frozenset({133, 134, 135, 136, 137, 143})  # neighbour discovery, MLDv2 reports


@dataclass
class Observation:
    flow: str
    outcome: str
    rule: str | None = None
    status: int | None = None
    ech_stripped: bool | None = None
    detail: str = ""


@dataclass
class Bypass:
    summary: str
    reason: str


@dataclass
class Mismatch:
    flow: str
    field: str
    expected: Any
    observed: Any
    detail: str = ""


@dataclass
class Verdict:
    observations: dict[str, Observation]
    mismatches: list[Mismatch]
    bypasses: list[Bypass]
    max_bypass: int
    internet_observed: bool
    counts: dict[str, int] = field(default_factory=dict)
    internet_frames: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches and len(self.bypasses) <= self.max_bypass


# -- device side -----------------------------------------------------------------------------

def _parse_ip(data: bytes):
    if not data:
        return None
    try:
        if data[0] >> 4 == 4:
            return IP(data)
        if data[0] >> 4 == 6:
            return IPv6(data)
    except Exception:
        return None
    return None


def _records_for_port(records: Iterable[dict], src: str | None, port: int | None) -> list[dict]:
    if port is None:
        return []
    return [r for r in records if r.get("source.port") == port and (src is None or r.get("source.ip") == src)]


def _decision(recs: list[dict]) -> tuple[dict | None, dict | None]:
    """(first blocking record, first record) of a flow."""
    block = next((r for r in recs if r.get("kanmon.verdict") == "block"), None)
    return block, (recs[0] if recs else None)


def _http_head(data: bytes) -> tuple[int | None, dict[str, str]]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


def _dns_outcome(payload: bytes) -> tuple[str, bool | None, str]:
    """(outcome, ECH stripped?, detail) of one DNS response message."""
    try:
        msg = dnslib.DNSRecord.parse(payload)
    except Exception as exc:
        return "answered", None, f"unparseable DNS reply: {exc}"
    rcode = msg.header.rcode
    https = [rr for rr in msg.rr if rr.rtype == dnslib.QTYPE.HTTPS]
    ech = None
    if https:
        ech = not any(k == 5 for rr in https for k, _ in getattr(rr.rdata, "params", []))
    answers = ", ".join(str(rr.rdata) for rr in msg.rr if rr.rtype in (dnslib.QTYPE.A, dnslib.QTYPE.AAAA))
    detail = f"DNS {dnslib.RCODE.get(rcode)}" + (f" [{answers}]" if answers else "")
    return DNS_RCODES.get(rcode, "refused"), ech, detail


def judge_stream(flow: Flow, result: dict[str, Any] | None, records: list[dict], device_src: str) -> Observation:
    if result is None:
        return Observation(flow.id, "dropped", detail="not replayed (no result)")
    connect = result.get("connect")
    if connect != "ok":
        outcome = {"refused": "refused", "reset": "reset"}.get(connect, "dropped")
        return Observation(flow.id, outcome, detail=f"connect: {connect} ({result.get('error')})")
    data = base64.b64decode(result.get("received") or "")
    block, first = _decision(_records_for_port(records, device_src, result.get("local_port")))
    rule = (block or first or {}).get("rule.id")
    end = result.get("end")
    if data.startswith(b"HTTP/"):
        status, headers = _http_head(data)
        if "x-kanmon-rule" in headers:
            return Observation(flow.id, "blocked", headers["x-kanmon-rule"], status, detail=f"HTTP {status}, block page")
        return Observation(flow.id, "blocked" if block else "allowed", rule, status, detail=f"HTTP {status}")
    if flow.dport == 53 and len(data) >= 2:
        (length,) = struct.unpack("!H", data[:2])
        outcome, ech, detail = _dns_outcome(data[2:2 + length])
        return Observation(flow.id, outcome, rule, ech_stripped=ech, detail=detail + " over TCP")
    if data[:1] == b"\x16":
        if block:
            return Observation(flow.id, "blocked", rule, detail="TLS handshake answered by the proxy; blocked at SNI (log)")
        return Observation(flow.id, "allowed", rule, detail="TLS handshake answered")
    if data[:1] == b"\x15":
        return Observation(flow.id, "blocked" if block else "reset", rule, detail="TLS alert")
    if block:
        return Observation(flow.id, "blocked", rule, detail=f"{len(data)} bytes back, connection {end}; block record")
    if not data and end in ("reset", "eof"):
        return Observation(flow.id, "reset", rule, detail=f"connection closed ({end}) without an answer")
    if not data:
        return Observation(flow.id, "dropped", rule, detail="connected, no answer")
    return Observation(flow.id, "answered", rule, detail=f"{len(data)} bytes back ({data[:16]!r})")


def _reply_matches(flow: Flow, pkt) -> str | None:
    """How `pkt` (received by the device) answers `flow`: 'direct', 'icmp' or None."""
    if pkt.haslayer(IPerror) or pkt.haslayer(IPerror6):
        inner = pkt[IPerror] if pkt.haslayer(IPerror) else pkt[IPerror6]
        l4 = inner.getlayer(UDPerror) or inner.getlayer(TCPerror)
        if inner.dst == flow.dst and (l4 is None or (l4.dport == flow.dport and l4.sport == flow.sport)):
            return "icmp"
        return None
    l4 = pkt.getlayer(TCP) or pkt.getlayer(UDP)
    if l4 is not None:
        if pkt.src == flow.dst and l4.sport == flow.dport and l4.dport == flow.sport:
            return "direct"
        return None
    if flow.transport == "icmp" and pkt.src == flow.dst:
        return "direct"
    return None


def judge_packets(flow: Flow, sent: dict[str, Any] | None, received: list, records: list[dict],
                  device_src: str) -> Observation:
    errors = (sent or {}).get("errors") or []
    replies = [(how, pkt) for pkt in received if (how := _reply_matches(flow, pkt))]
    rule = None
    if flow.sport is not None:
        block, first = _decision(_records_for_port(records, device_src, flow.sport))
        rule = (block or first or {}).get("rule.id")
    for how, pkt in replies:
        if how == "direct" and pkt.haslayer(UDP) and pkt[UDP].sport == 53:
            outcome, ech, detail = _dns_outcome(bytes(pkt[UDP].payload))
            return Observation(flow.id, outcome, rule, ech_stripped=ech, detail=detail)
    if any(how == "icmp" for how, _ in replies):
        kind = next(p for how, p in replies if how == "icmp")
        return Observation(flow.id, "refused", rule, detail=f"ICMP error: {kind.summary()}")
    tcp_replies = [p[TCP] for _, p in replies if p.haslayer(TCP)]
    if tcp_replies and all(int(t.flags) & 0x04 for t in tcp_replies):
        return Observation(flow.id, "reset", rule, detail=f"{len(tcp_replies)} TCP reset(s) back")
    if replies:
        return Observation(flow.id, "answered", rule, detail="; ".join(p.summary() for _, p in replies[:3]))
    detail = "nothing came back"
    if errors:
        detail += f"; the tunnel refused to send: {errors[0]}"
    return Observation(flow.id, "dropped", rule, detail=detail)


def observe(flows: list[Flow], results: dict[str, Any], records: list[dict], device_src: dict[int, str]) -> dict[str, Observation]:
    received = [p for item in results.get("received", []) if (p := _parse_ip(base64.b64decode(item["data"]))) is not None]
    out = {}
    for flow in flows:
        src = device_src.get(flow.family or 4, "")
        if flow.mode == STREAM:
            out[flow.id] = judge_stream(flow, results.get("streams", {}).get(flow.id), records, src)
        else:
            out[flow.id] = judge_packets(flow, results.get("packets", {}).get(flow.id), received, records, src)
    return out


# -- comparison ------------------------------------------------------------------------------

def compare(expect: ExpectationSet, observations: dict[str, Observation]) -> list[Mismatch]:
    out: list[Mismatch] = []
    for name, exp in expect.flows.items():
        obs = observations.get(name)
        if obs is None:
            out.append(Mismatch(name, "flow", "in the capture", "absent", f"{expect.filename}:{exp.line}"))
            continue
        out += _compare_one(exp, obs)
    for name, obs in observations.items():
        if name not in expect.flows:
            out.append(Mismatch(name, "expectation", "one per flow", "none", f"observed {obs.outcome}: {obs.detail}"))
    return out


def _compare_one(exp: Expectation, obs: Observation) -> list[Mismatch]:
    out = []
    if exp.outcome != obs.outcome:
        out.append(Mismatch(exp.flow, "outcome", exp.outcome, obs.outcome, obs.detail))
    if exp.checks_rule and exp.rule != obs.rule:
        out.append(Mismatch(exp.flow, "rule", exp.rule, obs.rule, obs.detail))
    if exp.status is not None and exp.status != obs.status:
        out.append(Mismatch(exp.flow, "status", exp.status, obs.status, obs.detail))
    if exp.ech_stripped is not None and exp.ech_stripped != obs.ech_stripped:
        out.append(Mismatch(exp.flow, "ech_stripped", exp.ech_stripped, obs.ech_stripped, obs.detail))
    return out


# -- internet side ---------------------------------------------------------------------------

def _frame_ip(data: bytes):
    try:
        frame = Ether(data)
    except Exception:
        return None
    if frame.haslayer(IP):
        return frame[IP]
    if frame.haslayer(IPv6):
        return frame[IPv6]
    return None


def _qname(payload: bytes) -> str | None:
    try:
        msg = dnslib.DNSRecord.parse(payload)
    except Exception:
        return None
    return str(msg.q.qname).rstrip(".").lower() if msg.questions else None


def find_bypasses(frames: list[dict], records: dict[str, list[dict]], uplink_addresses: set[str],
                  upstream_dns: set[str], tunnel_prefixes: list[str]) -> list[Bypass]:
    """Every frame that reached the internet without the gateway's proxy having decided it.

    Explained: TCP connections from the gateway's uplink address to a destination a passing
    `proxy`/`conn` record names; DNS queries to the configured upstream resolvers for a name
    the `dns` log holds. Anything else — a device tunnel address as source, other UDP,
    ICMP, a connection no record explains — is a bypass."""
    prefixes = [ipaddress.ip_network(p) for p in tunnel_prefixes]
    allowed_dst: set[tuple[str, int]] = set()
    for stream in ("proxy", "conn"):
        for r in records.get(stream, []):
            if r.get("kanmon.verdict") in PASSING and r.get("destination.ip") and r.get("destination.port"):
                allowed_dst.add((str(ipaddress.ip_address(r["destination.ip"])), int(r["destination.port"])))
    dns_names = {str(r.get("dns.question.name", "")).rstrip(".").lower() for r in records.get("dns", [])
                 if r.get("kanmon.verdict") in PASSING}
    opened: set[tuple] = set()
    out: list[Bypass] = []
    for item in frames:
        pkt = _frame_ip(base64.b64decode(item["data"]))
        if pkt is None:
            continue  # ARP and other link-layer chatter
        if isinstance(pkt, IPv6) and (pkt.dst.startswith("ff") or pkt.src == "::"):
            continue  # neighbour discovery / multicast listener chatter of the link
        if isinstance(pkt, IPv6) and pkt.nh == 58 and pkt.payload.type in ND_TYPES:
            continue
        src = str(ipaddress.ip_address(pkt.src))
        summary = pkt.summary()
        if any(ipaddress.ip_address(src) in p for p in prefixes if p.version == ipaddress.ip_address(src).version):
            out.append(Bypass(summary, f"a device tunnel address ({src}) reached the internet"))
            continue
        if src not in uplink_addresses:
            out.append(Bypass(summary, f"source {src} is not the gateway's uplink address"))
            continue
        dst = str(ipaddress.ip_address(pkt.dst))
        if pkt.haslayer(TCP):
            t = pkt[TCP]
            key = (src, t.sport, dst, t.dport)
            if key in opened:
                continue
            if int(t.flags) & 0x02 and not int(t.flags) & 0x10:
                if (dst, t.dport) in allowed_dst or (dst in upstream_dns and t.dport == 53):
                    opened.add(key)
                    continue
                out.append(Bypass(summary, f"TCP connection to {dst}:{t.dport} that no passing proxy/conn record explains"))
            else:
                out.append(Bypass(summary, f"TCP segment to {dst}:{t.dport} outside any connection the proxy opened"))
            continue
        if pkt.haslayer(UDP):
            u = pkt[UDP]
            if dst in upstream_dns and u.dport == 53:
                name = _qname(bytes(u.payload))
                if name is not None and name in dns_names:
                    continue
                out.append(Bypass(summary, f"DNS query for {name!r} the gateway's DNS log does not explain"))
                continue
            out.append(Bypass(summary, f"UDP to {dst}:{u.dport} (only the gateway's upstream DNS may leave)"))
            continue
        if pkt.haslayer(ICMP) or pkt.haslayer(ICMPv6DestUnreach):
            out.append(Bypass(summary, "ICMP from the gateway towards the internet"))
            continue
        out.append(Bypass(summary, "a packet that is neither proxied TCP nor upstream DNS"))
    return out


def decide(flows: list[Flow], expect: ExpectationSet, results: dict[str, Any], records: dict[str, list[dict]],
           device_src: dict[int, str], frames: list[dict] | None, uplink_addresses: set[str], upstream_dns: set[str],
           tunnel_prefixes: list[str]) -> Verdict:
    flat = [r for stream in ("proxy", "conn", "dns") for r in records.get(stream, [])]
    observations = observe(flows, results, flat, device_src)
    mismatches = compare(expect, observations)
    bypasses = find_bypasses(frames, records, uplink_addresses, upstream_dns, tunnel_prefixes) if frames is not None else []
    counts: dict[str, int] = {}
    for obs in observations.values():
        counts[obs.outcome] = counts.get(obs.outcome, 0) + 1
    return Verdict(observations, mismatches, bypasses, expect.max_bypass, frames is not None, counts,
                   len(frames) if frames is not None else 0)
