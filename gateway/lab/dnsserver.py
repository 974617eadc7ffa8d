"""The fake internet's authoritative DNS server for the `.test` zone (dnslib).

Run in the internet namespace: `python -m gateway.lab.dnsserver --zone ZONE.json --address A`.
The zone file maps names to records; any other name under `.test` gets the wildcard
answer, every name outside `.test` gets NXDOMAIN. It also logs each query (one JSON line)
so tests can tell which queries reached the internet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dnslib import AAAA, HTTPS, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class ZoneResolver(BaseResolver):
    def __init__(self, zone: dict, wildcard_a: str | None, wildcard_aaaa: str | None, query_log):
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.wildcard_a = wildcard_a
        self.wildcard_aaaa = wildcard_aaaa
        self.query_log = query_log

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE[request.q.qtype]
        self.query_log.write(json.dumps({"t": time.time(), "name": qname, "type": qtype,
                                         "client": handler.client_address[0]}) + "\n")
        self.query_log.flush()
        records = self.zone.get(qname)
        if records is None and qname.endswith(".test"):
            records = {"A": [self.wildcard_a] if self.wildcard_a else [],
                       "AAAA": [self.wildcard_aaaa] if self.wildcard_aaaa else []}
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for value in records.get(qtype, []) if qtype in ("A", "AAAA", "HTTPS") else []:
            rdata = A(value) if qtype == "A" else AAAA(value) if qtype == "AAAA" else HTTPS.fromZone(value)
            reply.add_answer(RR(request.q.qname, getattr(QTYPE, qtype), rdata=rdata, ttl=30))
        return reply


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zone", required=True)
    ap.add_argument("--address", action="append", required=True)
    ap.add_argument("--query-log", required=True)
    args = ap.parse_args(argv)
    with open(args.zone) as f:
        spec = json.load(f)
    query_log = open(args.query_log, "a", buffering=1)
    resolver = ZoneResolver(spec["records"], spec.get("wildcard_a"), spec.get("wildcard_aaaa"), query_log)
    logger = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    servers = []
    for address in args.address:
        for tcp in (False, True):
            server = DNSServer(resolver, address=address, port=53, tcp=tcp, logger=logger)
            server.start_thread()
            servers.append(server)
    print("dns ready", flush=True)
    try:
        while all(s.isAlive() for s in servers):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
