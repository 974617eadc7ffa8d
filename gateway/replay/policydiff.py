"""`kanmon policy diff OLD NEW --pcap CAPTURE`: which of a capture's flows a new policy
would judge differently, before it is applied.

`flows_from_pcap` turns a capture into the questions the gateway would ask the policy for
it: an HTTP request's URL (stage http-request), a TLS ClientHello's SNI (stage tls, with
destination address and port), a DNS query's name (stage dns), and for any other TCP/UDP
flow its destination (stage tls, no host). `register_diff_pcap(diff_parser)` adds `--pcap`
to the existing `policy diff` sub-command (see gateway/policy/commands.py).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from datetime import datetime, timezone
from ipaddress import ip_address
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import dnslib

from gateway.i18n import Text
from gateway.replay.capture import STREAM, CaptureError, Flow, read_capture, split_flows
from gateway.verdict import Stage

T_BAD_CAPTURE = Text("キャプチャを読めません: {detail}", "cannot read the capture: {detail}")
T_SUMMARY = Text("キャプチャの {total} 件の問い合わせ中 {changed} 件で判定が変わります（旧 {old} → 新 {new}）",
                 "{changed} of {total} questions from the capture change verdict (old {old} -> new {new})")
T_NEED_ONE = Text("--urls か --pcap のどちらかを指定してください", "give --urls or --pcap")


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


def cmd_diff_pcap(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from gateway.policy.commands import T_BAD_ARG, _load, device_context_from_args
    out, err = out or sys.stdout, err or sys.stderr
    try:
        device = device_context_from_args(args)
    except ValueError as exc:
        print(T_BAD_ARG.format(detail=exc).render(), file=err)
        return 2
    try:
        queries = flows_from_pcap(args.pcap)
    except CaptureError as exc:
        print(T_BAD_CAPTURE.format(detail=exc).render(), file=err)
        return 2
    old, new = _load(args.old, err), _load(args.new, err)
    if old is None or new is None:
        return 2
    now = datetime.now(timezone.utc)
    changed = 0
    for q in queries:
        pq = policy_query(q, device, now)
        a, b = old.decide(pq), new.decide(pq)
        if a.action == b.action and a.rule_id == b.rule_id:
            continue
        changed += 1
        if getattr(args, "json", False):
            print(json.dumps({"flow": q.flow, "stage": str(q.stage), "url": q.url, "host": q.host,
                              "destination": f"{q.dst_ip}:{q.dst_port}",
                              "old": {"verdict": str(a.action), "rule": a.rule_id},
                              "new": {"verdict": str(b.action), "rule": b.rule_id, "explain": b.explain}},
                             ensure_ascii=False), file=out)
        else:
            print(f"{q.flow}\t{q.label()}\t{a.action} ({a.rule_id or 'default'}) -> {b.action} ({b.rule_id or 'default'})",
                  file=out)
    print(T_SUMMARY.format(total=len(queries), changed=changed, old=old.version, new=new.version).render(),
          file=err if getattr(args, "json", False) else out)
    return 0


def register_diff_pcap(diff_parser: argparse.ArgumentParser) -> None:
    """Give `policy diff` a `--pcap CAPTURE` alternative to `--urls FILE`: `--urls` stops
    being required, and the handler goes to `cmd_diff_pcap` when `--pcap` is given."""
    diff_parser.add_argument("--pcap", help="capture (pcap/pcapng): compare the verdicts of its flows")
    for action in diff_parser._actions:  # argparse has no public way to relax a declared option
        if "--urls" in action.option_strings:
            action.required = False
    url_handler = diff_parser.get_default("func")

    def dispatch(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
        if getattr(args, "pcap", None):
            return cmd_diff_pcap(args, out, err)
        if not getattr(args, "urls", None):
            print(T_NEED_ONE.render(), file=err or sys.stderr)
            return 2
        return url_handler(args, out, err)

    diff_parser.set_defaults(func=dispatch)
