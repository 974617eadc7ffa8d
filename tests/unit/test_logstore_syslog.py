"""RFC 5424 forwarding, tested against sockets opened here."""

from __future__ import annotations

import json
import re
import socket
import threading
from datetime import UTC, datetime

from gateway.logstore import LogStore, SyslogForwarder, format_rfc5424

HEADER = re.compile(rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) - \xef\xbb\xbf(.*)$", re.S)


def test_format_is_rfc5424():
    line = '{"@timestamp":"2026-01-01T00:00:00.000000Z","kanmon.verdict":"block","user.name":"山田"}'
    message = format_rfc5424("proxy", line, hostname="gw 01", procid="42",
                             now=datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC))
    match = HEADER.match(message)
    assert match is not None, message
    pri, stamp, host, app, procid, msgid, body = match.groups()
    assert int(pri) == 16 * 8 + 4             # local0, warning (a block)
    assert stamp == b"2026-01-01T00:00:01.000000Z"
    assert host == b"gw01"                    # space is not allowed in HOSTNAME
    assert (app, procid, msgid) == (b"kanmon", b"42", b"proxy")
    assert json.loads(body.decode("utf-8"))["user.name"] == "山田"
    info = format_rfc5424("dns", "{}", hostname="h")
    assert info.startswith(b"<134>1 ")        # local0, informational


def test_store_forwards_every_record_over_udp():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    forwarder = SyslogForwarder("127.0.0.1", receiver.getsockname()[1], hostname="kanmon-gw")
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        store = LogStore(directory, clock=lambda: datetime(2026, 1, 1, tzinfo=UTC), on_record=forwarder)
        store.append("auth", {"device.id": "d1", "event.outcome": "failure"})
        store.append("audit", {"user.name": "admin", "event.action": "policy-reload"})
        store.close()
        written = [json.loads(l) for l in open(f"{directory}/auth/auth-2026-01-01.jsonl")]
    first = HEADER.match(receiver.recv(65535))
    second = HEADER.match(receiver.recv(65535))
    receiver.close()
    forwarder.close()
    assert first and second
    assert first.group(6) == b"auth" and int(first.group(1)) == 16 * 8 + 4
    assert json.loads(first.group(7)) == written[0]            # hash and all: an external copy
    assert second.group(6) == b"audit" and int(second.group(1)) == 16 * 8 + 5
    assert forwarder.sent == 2 and forwarder.errors == 0


def test_tcp_uses_octet_counting_and_never_blocks_the_caller():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    received = bytearray()

    def accept() -> None:
        conn, _ = server.accept()
        conn.settimeout(5)
        while received.count(b"<134>1") < 2:
            chunk = conn.recv(65535)
            if not chunk:
                break
            received.extend(chunk)
        conn.close()
    thread = threading.Thread(target=accept)
    thread.start()
    forwarder = SyslogForwarder("127.0.0.1", server.getsockname()[1], transport="tcp", hostname="h")
    forwarder("conn", '{"a":1}')
    forwarder("conn", '{"a":2}')
    forwarder.flush()
    thread.join(5)
    forwarder.close()
    server.close()
    frames = []
    data = bytes(received)
    while data:
        length, _, rest = data.partition(b" ")
        frames.append(rest[: int(length)])
        data = rest[int(length):]
    assert [json.loads(HEADER.match(f).group(7)) for f in frames] == [{"a": 1}, {"a": 2}]


def test_tcp_queue_overflow_drops_and_counts():
    forwarder = SyslogForwarder("127.0.0.1", 9, transport="tcp", queue_size=1, connect_timeout=0.2)
    for i in range(50):
        forwarder("conn", "{}")
    forwarder.close()
    assert forwarder.dropped >= 40
