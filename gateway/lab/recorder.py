"""A fake upstream server that records every byte it receives (issue #14 "No bypass").

Run in a lab namespace: `python -m gateway.lab.recorder --log FILE --cert C --key K
--listen ADDR:PORT ...`. Every listener takes TLS *and* plain TCP: the first byte decides
(0x16, a TLS handshake record, gets a TLS handshake with the certificate; anything else is
read as it comes). So a ClientHello the gateway failed to recognise and relayed as raw TCP
still completes against this server, exactly as it would against a real web server.

The log is one JSON object per line, written and flushed as things happen:

    {"ev": "open",  "conn": N, "local": ADDR, "lport": PORT, "peer": ADDR, "t": ...}
    {"ev": "tls",   "conn": N, "sni": NAME-or-null, "alpn": ...}        (after a handshake)
    {"ev": "data",  "conn": N, "data": TEXT}       (bytes as latin-1 text, one line per read)
    {"ev": "close", "conn": N}

It answers what looks like HTTP/1.x (leading whitespace and CRLFs tolerated, as lenient
servers do) with `200` and a body naming the Host it saw, keeping the connection open;
`/dns-query` paths get `application/dns-message` and `/resolve` paths
`application/dns-json` bodies containing `DNSANSWER`, so a gateway that must block DNS
answers by content type has something to block. Other lines get `250 recorded`.
Python's socket/ssl modules rather than a web server: the point is to see bytes a real
server would have acted on, including ones no well-formed server would accept.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import ssl
import sys
import threading
import time

_REQUEST_LINE = re.compile(rb"^\s*([A-Za-z]+)[ \t]+(\S+)[ \t]+HTTP/(1\.[01])\r?\n")
_HEADER_END = re.compile(rb"\r?\n\r?\n")


class Recorder:
    def __init__(self, log_path: str, cert: str | None, key: str | None):
        self._log = open(log_path, "a", encoding="utf-8")
        self._lock = threading.Lock()
        self._next = 0
        self._sni = threading.local()
        self.ctx = None
        if cert and key:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self.ctx.load_cert_chain(cert, key)
            self.ctx.set_alpn_protocols(["http/1.1"])
            self.ctx.sni_callback = self._on_sni

    def _on_sni(self, _sock, name, _ctx):
        self._sni.name = name
        return None

    def write(self, rec: dict) -> None:
        rec["t"] = time.time()
        line = json.dumps(rec)
        with self._lock:
            self._log.write(line + "\n")
            self._log.flush()

    def conn_id(self) -> int:
        with self._lock:
            self._next += 1
            return self._next

    def serve(self, address: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        srv.bind((address, port))
        srv.listen(128)
        threading.Thread(target=self._accept_loop, args=(srv,), daemon=True).start()
        return srv

    def _accept_loop(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, peer = srv.accept()
            except OSError:   # the listening socket was closed: the server is done
                return
            threading.Thread(target=self._handle, args=(conn, peer), daemon=True).start()

    def _handle(self, sock: socket.socket, peer) -> None:
        cid = self.conn_id()
        local = sock.getsockname()
        self.write({"ev": "open", "conn": cid, "local": local[0], "lport": local[1], "peer": peer[0]})
        try:
            sock.settimeout(15)
            first = sock.recv(1, socket.MSG_PEEK)
            if first[:1] == b"\x16" and self.ctx is not None:
                self._sni.name = None
                try:
                    sock = self.ctx.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.write({"ev": "tls-error", "conn": cid, "error": str(exc)})
                    return
                self.write({"ev": "tls", "conn": cid, "sni": self._sni.name, "alpn": sock.selected_alpn_protocol()})
            self._session(sock, cid)
        except (OSError, ssl.SSLError) as exc:
            self.write({"ev": "error", "conn": cid, "error": str(exc)})
        finally:
            self.write({"ev": "close", "conn": cid})
            try:
                sock.close()
            except OSError:
                pass

    def _session(self, sock, cid: int) -> None:
        buf = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return
            self.write({"ev": "data", "conn": cid, "data": data.decode("latin-1")})
            buf += data
            buf = self._answer(sock, cid, buf)

    def _answer(self, sock, cid: int, buf: bytes) -> bytes:
        while buf:
            m = _REQUEST_LINE.match(buf)
            if m is None:
                if b"\n" not in buf or buf.strip() == b"":
                    return buf          # an incomplete first line (or only blank lines so far)
                line, _, buf = buf.partition(b"\n")
                if line.strip():
                    sock.sendall(b"250 recorded\r\n")
                continue
            end = _HEADER_END.search(buf, m.end() - 2)
            if end is None:
                return buf
            head = buf[m.end():end.start()]
            headers = [h.split(b":", 1) for h in re.split(rb"\r?\n", head) if b":" in h]
            hosts = [v.strip().decode("latin-1") for k, v in headers if k.strip().lower() == b"host"]
            length = next((v.strip() for k, v in headers if k.strip().lower() == b"content-length"), b"0")
            body_len = int(length) if length.isdigit() else 0
            if len(buf) < end.end() + body_len:
                return buf
            buf = buf[end.end() + body_len:]
            path = m.group(2).decode("latin-1")
            self._respond(sock, cid, path, hosts, m.group(3))
        return buf

    def _respond(self, sock, cid: int, path: str, hosts: list[str], version: bytes) -> None:
        if "/dns-query" in path:
            ctype, body = "application/dns-message", b"\x00\x00\x81\x80DNSANSWER"
        elif "/resolve" in path:
            ctype, body = "application/dns-json", b'{"Status":0,"Answer":[{"data":"DNSANSWER"}]}'
        else:
            ctype, body = "text/plain", f"recorded conn={cid} host={','.join(hosts)}\n".encode()
        sock.sendall(b"HTTP/" + version + b" 200 OK\r\nContent-Type: " + ctype.encode()
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nX-Recorder-Conn: "
                     + str(cid).encode() + b"\r\n\r\n" + body)


def read_log(path, offset: int = 0) -> tuple[dict[int, dict], int]:
    """Connections recorded from byte ``offset`` of the log on: conn id -> {"local", "lport",
    "sni", "tls", "data" (bytes)}; and the offset to continue from."""
    conns: dict[int, dict] = {}
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read()
    except FileNotFoundError:
        return conns, offset
    complete = raw[:raw.rfind(b"\n") + 1]
    for line in complete.splitlines():
        rec = json.loads(line)
        c = conns.setdefault(rec["conn"], {"local": None, "lport": None, "sni": None, "tls": False, "data": b""})
        if rec["ev"] == "open":
            c.update(local=rec["local"], lport=rec["lport"])
        elif rec["ev"] == "tls":
            c.update(tls=True, sni=rec["sni"])
        elif rec["ev"] == "data":
            c["data"] += rec["data"].encode("latin-1")
    return conns, offset + len(complete)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="record every byte an upstream receives")
    p.add_argument("--log", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--listen", action="append", required=True, help="ADDR:PORT ([v6]:PORT for IPv6)")
    args = p.parse_args(argv)
    rec = Recorder(args.log, args.cert, args.key)
    for spec in args.listen:
        host, _, port = spec.rpartition(":")
        rec.serve(host.strip("[]"), int(port))
    print("recorder ready", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
