"""The questions a capture asks the policy, for `kanmon policy diff OLD NEW --pcap CAPTURE`
(which of a capture's flows a new policy would judge differently, before it is applied).

`flows_from_pcap` turns a capture into the questions the gateway would ask the policy for
it: an HTTP request's URL (stage http-request), a TLS ClientHello's SNI (stage tls, with
destination address and port), a DNS query's name (stage dns), and for any other TCP/UDP
flow its destination (stage tls, no host). The command itself (`register_diff_pcap`) is in
gateway/cli/policy.py.
"""

from __future__ import annotations

import struct
from datetime import datetime
from ipaddress import ip_address
from pathlib import Path
from typing import Any, NamedTuple

import dnslib

from gateway.replay.capture import STREAM, CaptureError, Flow, read_capture, split_flows
from gateway.verdict import Stage

class CaptureQuery(NamedTuple):
    flow: str
    stage: Stage
    url: str | None          # http-request: the URL; tls/dns: None
    host: str | None
    dst_ip: str | None
    dst_port: int | None
    protocol: str            # tcp | udp

    def label(self) -> str:
        what = self.url or self.host or f"{self.dst_ip}:{self.dst_port}"
        return f"{self.stage} {what}"


def _http_request(payload: bytes) -> tuple[str, str, str] | None:
    """(method, host, target) of the first HTTP request in a stream, if it is one."""
    head = payload.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    host = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("host:")), None)
    return (parts[0], host, parts[1]) if host else None


def client_hello_sni(payload: bytes) -> tuple[bool, str | None]:
    """(is a TLS ClientHello, server name). Parsed by hand from the record: no library in
    the project parses a lone ClientHello without a TLS state machine around it."""
    if len(payload) < 9 or payload[0] != 0x16 or payload[5] != 0x01:
        return False, None
    try:
        pos = 9 + 2 + 32                       # record + handshake headers, version, random
        pos += 1 + payload[pos]                # session id
        (n,) = struct.unpack("!H", payload[pos:pos + 2])
        pos += 2 + n                           # cipher suites
        pos += 1 + payload[pos]                # compression methods
        (ext_len,) = struct.unpack("!H", payload[pos:pos + 2])
        pos += 2
        end = min(len(payload), pos + ext_len)
        while pos + 4 <= end:
            etype, elen = struct.unpack("!HH", payload[pos:pos + 4])
            body = payload[pos + 4:pos + 4 + elen]
            if etype == 0 and len(body) >= 5 and body[2] == 0:
                (name_len,) = struct.unpack("!H", body[3:5])
                return True, body[5:5 + name_len].decode("ascii", "replace")
            pos += 4 + elen
    except (IndexError, struct.error):
        return True, None
    return True, None


def _dns_names(payload: bytes) -> list[str]:
    try:
        return [str(q.qname).rstrip(".") for q in dnslib.DNSRecord.parse(payload).questions]
    except Exception:
        return []


def queries_for_flow(flow: Flow) -> list[CaptureQuery]:
    proto = "udp" if flow.transport == "udp" else "tcp"
    if flow.dport is None:
        return []
    base = dict(flow=flow.id, dst_ip=flow.dst, dst_port=flow.dport, protocol=proto)
    if flow.dport == 53:
        payloads = []
        if flow.mode == STREAM and len(flow.payload) > 2:
            payloads = [flow.payload[2:]]
        elif proto == "udp":
            from gateway.replay.capture import parse_packet
            payloads = [parse_packet(p).payload for p in flow.packets]
        names = [n for p in payloads for n in _dns_names(p)]
        return [CaptureQuery(stage=Stage.DNS, url=None, host=n, **base) for n in dict.fromkeys(names)]
    if flow.mode == STREAM:
        http = _http_request(flow.payload)
        if http is not None:
            method, host, target = http
            port = "" if flow.dport == 80 else f":{flow.dport}"
            url = target if target.startswith("http") else f"http://{host.split(':')[0]}{port}{target}"
            return [CaptureQuery(stage=Stage.REQUEST, url=url, host=host, **base)]
        is_tls, sni = client_hello_sni(flow.payload)
        if is_tls:
            return [CaptureQuery(stage=Stage.TLS, url=None, host=sni, **base)]
    if proto == "tcp" or flow.dport == 443:
        return [CaptureQuery(stage=Stage.TLS, url=None, host=None, **base)]
    return []


def flows_from_pcap(path: str | Path) -> list[CaptureQuery]:
    """The policy questions of every device flow in a capture. Raises CaptureError."""
    out: list[CaptureQuery] = []
    for flow in split_flows(read_capture(path)):
        out += queries_for_flow(flow)
    return out


def policy_query(q: CaptureQuery, device: Any, now: datetime):
    """The engine's PolicyQuery for one capture question."""
    from gateway.policy.query import PolicyQuery, normalize_host, query_for_url
    if q.stage == Stage.REQUEST and q.url:
        base = query_for_url(q.url, device, stage=Stage.REQUEST, now=now)
    else:
        base = PolicyQuery(stage=q.stage, device=device, host=normalize_host(q.host), now=now)
    return base._replace(dst_ip=ip_address(q.dst_ip) if q.dst_ip else None, dst_port=q.dst_port, protocol=q.protocol)
