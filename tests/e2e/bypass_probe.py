"""The attacker's client for the bypass corpus (tests/e2e/test_bypass.py), run inside a
device namespace: `python -m tests.e2e.bypass_probe SPEC-JSON` prints one JSON result.

A spec says where to connect and exactly which bytes go in which TCP segment, so a test can
ask for what no ordinary client sends: a request line after a CRLF, a ClientHello cut after
one byte or carrying an unusual record version, HTTP/2 with a Host header that disagrees
with :authority. Standard library only (plus h2, a mitmproxy dependency, for HTTP/2):

    {"dst": "198.51.100.80", "port": 80,
     "resolve": ["bank.test"],                 # getaddrinfo first (the gateway's resolver)
     "tls": {"sni": "www.example.test" | null, "split": [1],     # ClientHello cut offsets
             "record_version": "0304", "fragment": 0,            # re-frame into N-byte records
             "alpn": ["http/1.1"]},
     "segments": ["latin-1 text", ...],        # each one send() (TCP_NODELAY, a pause between)
     "h2": [["name", "value"], ...],           # instead of segments: one HTTP/2 request
     "read_timeout": 3}

Result: {"connected", "sport", "error", "response" (latin-1 text, first 8 KiB),
"tls_established", "peer_cert_sha256", "h2_status"}.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import ssl
import sys
import time

GAP = 0.15          # seconds between segments: long enough for separate TCP segments and reads


def _send_split(sock: socket.socket, data: bytes, cuts: list[int]) -> None:
    start = 0
    for cut in sorted(c for c in cuts if 0 < c < len(data)):
        sock.sendall(data[start:cut])
        time.sleep(GAP)
        start = cut
    sock.sendall(data[start:])


def _reframe(records: bytes, size: int) -> bytes:
    """Cut the handshake records' payload into records of at most ``size`` bytes."""
    out, i = b"", 0
    while i + 5 <= len(records):
        ctype, version, length = records[i], records[i + 1:i + 3], int.from_bytes(records[i + 3:i + 5], "big")
        payload = records[i + 5:i + 5 + length]
        for j in range(0, len(payload), size):
            piece = payload[j:j + size]
            out += bytes([ctype]) + version + len(piece).to_bytes(2, "big") + piece
        i += 5 + length
    return out


class _Tls:
    """A client TLS session over MemoryBIO, so the first flight can be rewritten and cut."""

    def __init__(self, sock: socket.socket, spec: dict, deadline: float):
        self.sock, self.deadline = sock, deadline
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if spec.get("alpn"):
            ctx.set_alpn_protocols(spec["alpn"])
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=spec.get("sni"))
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = self.out.read()
        if spec.get("fragment"):
            hello = _reframe(hello, int(spec["fragment"]))
        if spec.get("record_version"):
            hello = hello[:1] + bytes.fromhex(spec["record_version"]) + hello[3:]
        _send_split(sock, hello, list(spec.get("split", [])))
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._pull():
                    raise ConnectionError("closed during the TLS handshake")
        self._flush()

    def _flush(self) -> None:
        pending = self.out.read()
        if pending:
            self.sock.sendall(pending)

    def _pull(self) -> bool:
        left = self.deadline - time.monotonic()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            raise TimeoutError("no answer")
        data = self.sock.recv(65536)
        if not data:
            self.inc.write_eof()
            return False
        self.inc.write(data)
        return True

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def recv(self) -> bytes:
        while True:
            try:
                return self.obj.read(65536)
            except ssl.SSLWantReadError:
                if not self._pull():
                    try:
                        return self.obj.read(65536)
                    except (ssl.SSLWantReadError, ssl.SSLError):
                        return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""


def _plain_recv(sock: socket.socket, deadline: float):
    def recv() -> bytes:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            raise TimeoutError("no answer")
        return sock.recv(65536)
    return recv


def _h2_exchange(send, recv, headers: list, result: dict) -> bytes:
    import h2.config
    import h2.connection
    import h2.events
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
        validate_inbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers], end_stream=True)
    send(conn.data_to_send())
    body = b""
    while True:
        data = recv()
        if not data:
            return body
        for event in conn.receive_data(data):
            result.setdefault("h2_events", []).append(repr(event)[:200])
            if isinstance(event, h2.events.ResponseReceived):
                result["h2_status"] = dict(event.headers).get(b":status", b"").decode()
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                return body
        out = conn.data_to_send()
        if out:
            send(out)


def _complete_http(response: bytes) -> bool:
    """One whole HTTP/1 response with a Content-Length (the probe stops reading there)."""
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def probe(spec: dict) -> dict:
    result = {"connected": False, "sport": None, "error": None, "response": "", "tls_established": False,
              "peer_cert_sha256": None, "h2_status": None}
    for name in spec.get("resolve", []):
        try:
            socket.getaddrinfo(name, 443, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            result["error"] = f"resolve {name}: {exc}"
    if spec.get("dst") is None:
        return result          # a look-up only
    timeout = float(spec.get("read_timeout", 3))
    family = socket.AF_INET6 if ":" in spec["dst"] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if spec.get("sport"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(spec["sport"])))
    sock.settimeout(float(spec.get("connect_timeout", 3)))
    response = b""
    try:
        sock.connect((spec["dst"], int(spec["port"])))
        result["connected"] = True
        result["sport"] = sock.getsockname()[1]
        sock.settimeout(None)
        deadline = time.monotonic() + timeout
        if spec.get("tls") is not None:
            tls = _Tls(sock, spec["tls"], deadline)
            result["tls_established"] = True
            cert = tls.obj.getpeercert(binary_form=True)
            result["peer_cert_sha256"] = hashlib.sha256(cert).hexdigest() if cert else None
            send, recv = tls.send, tls.recv
        else:
            send, recv = sock.sendall, _plain_recv(sock, deadline)
        if spec.get("h2") is not None:
            response = _h2_exchange(send, recv, spec["h2"], result)
        else:
            for i, segment in enumerate(spec.get("segments", [])):
                if i:
                    time.sleep(GAP)
                send(segment.encode("latin-1"))
            while len(response) < 8192 and not _complete_http(response):
                data = recv()
                if not data:
                    break
                response += data
    except Exception as exc:   # the result says what happened; the test judges it
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()
    result["response"] = response[:8192].decode("latin-1")
    return result


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
