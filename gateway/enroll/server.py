"""The enrollment endpoint: HTTPS with client-certificate authentication, `POST /v1/enroll`.

One thread accepts; each connection gets a thread and carries exactly one request
(`Connection: close`). Under load (issue #15) the slots are shared out before any TLS: at
accept, a source address (IPv6: its /64) already holding `max_connections_per_source`
connections, or a server holding `max_connections`, gets its connection closed at once
(reset), counted in kanmon_enrollment_connections_dropped_total and logged at most once a
minute. The TLS handshake must end within `handshake_timeout` (default 5 s) of the accept,
the request arrive and the answer leave within `request_timeout` (default 10 s) after it:
one address holding hundreds of idle connections holds its own few slots for a few seconds
each and never anyone else's. (The per-attempt token bucket, ratelimit.py, counts requests,
after the handshake.) Timeouts and failed handshakes are counted and logged the same way.
Decisions are in decide.py (pure); this module does the I/O: TLS, HTTP, the registry write,
the auth log.

Why pyOpenSSL and not the stdlib `ssl` module: with `ssl`, a client certificate that does not
chain to the configured CAs fails the handshake, and the server learns nothing but "handshake
failed". We want the auth log to say exactly why (expired, untrusted CA, on the CRL …), so
the TLS layer requests a certificate and ACCEPTS EVERY ONE (verify callback returns True);
the certificate is then judged in full by gateway.devices.certcheck before anything is
granted. TLS still proves possession of the certificate's private key (CertificateVerify),
which is what the accept-all callback does not weaken.

HTTP/1.1 is parsed by h11 (a dependency of mitmproxy): sans-I/O, strict, with a size limit
on the request head; we add a body limit and the deadlines above, so a slow or hostile
client costs one bounded thread for at most `handshake_timeout + request_timeout` seconds.
The body is parsed with bounded depth and number length (decide.py).

Fail closed (issue #18): a successful enrollment writes its auth-log record BEFORE the
registry; when the record cannot be written the enrollment is refused (503
auth-log-unavailable, kanmon_fail_closed_blocks_total{stage="enrollment"}) and nothing is
written. Should the registry write then fail, a second record logs that refusal.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
from OpenSSL import SSL

from gateway.devices.ca import CaStore, DeviceCaError, pki_dir
from gateway.enroll import servercert
from gateway.enroll.decide import (ENROLL_ACTOR, Decision, EnrollRequest, RequestProblem, auth_log_record,
                                   decide_enrollment, enrollment_response, error_body, parse_enroll_request,
                                   refusal)
from gateway.enroll.ratelimit import ConnectionSlots, TokenBuckets
from gateway.posture import PosturePolicy
from gateway.registry.model import AuditEntry, RegistryError

log = logging.getLogger("kanmon.enroll")

ENROLL_PATH = b"/v1/enroll"
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 16 * 1024


class _Closed(Exception):
    """The peer went away or the deadline passed: drop the connection quietly."""


class _Deadline(_Closed):
    """The deadline passed (counted by phase)."""


class _DropReport:
    """Connections dropped without an answer: counted always, logged at most once per
    `interval` seconds per reason with how many and from which source last (a flood must not
    flood the log). Thread-safe."""

    def __init__(self, metrics, monotonic: Callable[[], float], interval: float = 60.0) -> None:
        self.metrics = metrics
        self.monotonic = monotonic
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, reason: str, source_ip: str, detail: str = "") -> None:
        if self.metrics is not None:
            self.metrics.enrollment_connections_dropped.labels(reason).inc()
        now = self.monotonic()
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            self._pending[reason] = self._pending.get(reason, 0) + 1
            if now - self._last.get(reason, -1e18) < self.interval:
                return
            self._last[reason] = now
            count = self._pending.pop(reason)
        log.warning("enrollment: %d connection(s) dropped (%s) since the last report; latest from %s%s",
                    count, reason, source_ip, f": {detail}" if detail else "")


@dataclass
class _Reply:
    status: int
    body: dict
    headers: tuple[tuple[bytes, bytes], ...] = ()
    conn: h11.Connection | None = None


class EnrollmentServer:
    """`EnrollmentServer(cfg, registry, logstore, gateway_public_key, interception_ca_pem)`,
    then `start()` / `stop()`. `logstore` is anything with `append(stream, record)`.
    `host`/`port` override the config (tests use port 0; `address` tells the bound one)."""

    def __init__(self, config, registry, logstore, gateway_public_key: str, interception_ca_pem: str | bytes, *,
                 ca_store: CaStore | None = None, host: str | None = None, port: int | None = None,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 monotonic: Callable[[], float] = time.monotonic,
                 request_timeout: float | None = None, handshake_timeout: float | None = None,
                 max_connections: int | None = None, max_connections_per_source: int | None = None,
                 metrics=None) -> None:
        """The timeouts and slot counts default to the config's `enrollment.*`; `metrics` is
        a GatewayMetrics (None: counted only in `self.dropped.counts` and the log)."""
        self.cfg = config
        self.registry = registry
        self.logstore = logstore
        self.gateway_public_key = gateway_public_key
        self.interception_ca_pem = (interception_ca_pem.decode() if isinstance(interception_ca_pem, bytes)
                                    else interception_ca_pem)
        self.ca_store = ca_store or CaStore(pki_dir(config.state_dir))
        self.host = host if host is not None else (config.enrollment_host or "0.0.0.0")
        self.port = port if port is not None else config.enrollment_port
        self.clock = clock
        self.monotonic = monotonic
        self.request_timeout = request_timeout if request_timeout is not None else config.enrollment_request_timeout
        self.handshake_timeout = (handshake_timeout if handshake_timeout is not None
                                  else config.enrollment_handshake_timeout)
        self.metrics = metrics
        self.policy = PosturePolicy.from_pairs(config.posture_min_os, config.posture_quarantine_jailbroken)
        self.limiter = TokenBuckets(config.enrollment_rate_per_minute, config.enrollment_burst)
        self._limiter_lock = threading.Lock()
        self._limited_logged: set[str] = set()    # one auth record per run of 429s per source
        self._write_lock = threading.Lock()       # one enrollment decision+write at a time
        self.slots = ConnectionSlots(
            max_connections if max_connections is not None else config.enrollment_max_connections,
            max_connections_per_source if max_connections_per_source is not None
            else config.enrollment_max_connections_per_source)
        self.dropped = _DropReport(metrics, monotonic)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.address: tuple[str, int] | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def _server_identity(self) -> servercert.ServerIdentity:
        cfg = self.cfg
        if cfg.enrollment_cert_file is not None and cfg.enrollment_key_file is not None:
            return servercert.load_identity(cfg.enrollment_cert_file, cfg.enrollment_key_file)
        ca = None
        if self.ca_store.has_org_ca():
            try:
                ca = self.ca_store.load_org_ca()
            except DeviceCaError as exc:
                log.warning("enrollment: org CA unusable (%s); using a self-signed server certificate", exc)
        names = servercert.server_names(cfg.enrollment_host, cfg.endpoint, cfg.enrollment_server_names)
        return servercert.load_or_create(cfg.state_dir / "enroll", names, self.clock(), ca)

    def _tls_context(self) -> SSL.Context:
        identity = self._server_identity()
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate(identity.cert)
        ctx.use_privatekey(identity.key)
        for cert in identity.chain:
            ctx.add_extra_chain_cert(cert)
        ctx.check_privatekey()
        # Request a client certificate but accept any (see the module docstring): certcheck
        # judges it afterwards so that the auth log can say precisely why it was refused.
        ctx.set_verify(SSL.VERIFY_PEER, lambda _conn, _cert, _errno, _depth, _ok: True)
        # Tell clients which CAs we trust (phones pick their identity by this list). Read at
        # start: trusting a new CA takes effect for certificate checks at once, for this
        # hint at the next start.
        try:
            from OpenSSL.crypto import X509
            names = [X509.from_cryptography(c).get_subject() for c in self.ca_store.trusted_cas()]
            if names:
                ctx.set_client_ca_list(names)
        except (ValueError, OSError) as exc:
            log.warning("enrollment: cannot read trusted CAs for the client CA hint: %s", exc)
        ctx.set_session_id(b"kanmon-enroll")
        return ctx

    def _pki_stamp(self) -> tuple:
        """What the TLS context was built from, cheaply: the org CA files, the trusted CAs and
        the configured server files (stat only). A change -- `kanmon ca init` or `ca trust`
        after the service started, as README "First device, step by step" does -- rebuilds
        the context for the next connection, so the endpoint presents a certificate from the
        organization CA without a restart."""
        paths = [self.ca_store.cert_path, self.ca_store.key_path, self.ca_store.trusted_dir]
        if self.ca_store.trusted_dir.is_dir():
            paths += sorted(self.ca_store.trusted_dir.glob("*.pem"))
        paths += [p for p in (self.cfg.enrollment_cert_file, self.cfg.enrollment_key_file) if p is not None]
        stamp = []
        for path in paths:
            try:
                st = os.stat(path)
                stamp.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stamp.append((str(path), None))
        return tuple(stamp)

    def _context(self) -> SSL.Context:
        """The TLS context for a new connection, rebuilt when the PKI files changed. If the
        rebuild fails (a half-written or corrupt CA), the previous context keeps serving --
        every client certificate is still judged against the files by certcheck -- and the
        failure is logged; the next connection tries again."""
        stamp = self._pki_stamp()
        if stamp != self._ctx_stamp:
            with self._ctx_lock:
                if stamp != self._ctx_stamp:
                    try:
                        self._ctx = self._tls_context()
                        self._ctx_stamp = stamp
                        log.info("enrollment: TLS identity reloaded (organization CA or trusted CAs changed)")
                    except Exception as exc:      # noqa: BLE001 -- keep serving with the old identity
                        log.warning("enrollment: cannot reload the TLS identity, keeping the previous one: %s", exc)
        return self._ctx

    def start(self) -> None:
        self._ctx_lock = threading.Lock()
        self._ctx_stamp = self._pki_stamp()
        self._ctx = self._tls_context()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(256)
        listener.settimeout(0.2)
        self._listener = listener
        self.address = listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name="kanmon-enroll", daemon=True)
        self._thread.start()
        log.info("enrollment endpoint on https://%s:%d%s", self.address[0], self.address[1], ENROLL_PATH.decode())

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("enrollment: accept failed")
                time.sleep(0.1)
                continue
            refused = self.slots.acquire(addr[0])
            if refused is not None:
                # Over its share (or all slots busy): refuse rather than queue, before any
                # TLS work. Reset, not FIN: no TIME_WAIT left behind by a flood.
                self.dropped(refused, addr[0])
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                finally:
                    sock.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(sock, addr[0]), name="kanmon-enroll-conn",
                                 daemon=True).start()
            except RuntimeError:      # no thread to be had: give the slot back, drop the connection
                self.dropped("no-thread", addr[0])
                sock.close()
                self.slots.release(addr[0])

    # ---- one connection -----------------------------------------------------------------
    def _serve(self, sock: socket.socket, source_ip: str) -> None:
        deadline = self.monotonic() + self.handshake_timeout
        phase = "handshake-timeout"
        tls = None
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = SSL.Connection(self._context(), sock)
            tls.set_accept_state()
            self._io(tls, deadline, tls.do_handshake)
            deadline, phase = self.monotonic() + self.request_timeout, "request-timeout"
            reply = self._handle(tls, source_ip, deadline)
            if reply is not None:
                self._send(tls, reply, deadline)
        except _Deadline:
            self.dropped(phase, source_ip)
        except _Closed:
            pass
        except SSL.Error as exc:
            # Rate-limited like the rest: garbage instead of a ClientHello costs an attacker
            # nothing, one log line each would flood the log.
            self.dropped("tls-error", source_ip, str(exc)[:200])
        except Exception:
            log.exception("enrollment: unexpected error serving %s", source_ip)
        finally:
            try:
                if tls is not None:
                    tls.set_shutdown(SSL.RECEIVED_SHUTDOWN)
                    tls.shutdown()
            except Exception:
                pass
            sock.close()
            self.slots.release(source_ip)

    def _io(self, tls: SSL.Connection, deadline: float, op: Callable[..., Any], *args: Any) -> Any:
        """Run a TLS operation on the blocking socket with SO_RCVTIMEO/SO_SNDTIMEO bounded by
        the connection deadline (a blocked read returns EAGAIN, OpenSSL reports WantRead)."""
        while True:
            remaining = deadline - self.monotonic()
            if remaining <= 0:
                raise _Deadline()
            timeval = _timeval(min(remaining, 5.0))
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            try:
                return op(*args)
            except (SSL.WantReadError, SSL.WantWriteError):
                continue
            except SSL.ZeroReturnError:
                raise _Closed() from None
            except SSL.SysCallError as exc:
                if exc.args and exc.args[0] in (11, -1):   # EAGAIN after the socket timeout
                    continue
                raise _Closed() from None

    def _handle(self, tls: SSL.Connection, source_ip: str, deadline: float) -> _Reply | None:
        wait = self._take_token(source_ip)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = self._io(tls, deadline, tls.recv, 4096)
                    conn.receive_data(data)
                    if not data and request is None:
                        raise _Closed()
                    continue
                if isinstance(event, h11.Request):
                    request = event
                    length = dict(event.headers).get(b"content-length")
                    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
                        return self._finish(refusal("too-large", f"Content-Length {int(length)}"), source_ip, conn)
                    if wait or event.method != b"POST" or event.target.split(b"?")[0] != ENROLL_PATH:
                        break   # answered without reading the body
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY_BYTES:
                        return self._finish(refusal("too-large", f"body over {MAX_BODY_BYTES} bytes"), source_ip, conn)
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise _Closed()
        except h11.RemoteProtocolError as exc:
            return self._finish(refusal("bad-request", f"HTTP: {exc}"), source_ip, conn,
                                text_detail=f"HTTP/1.1 の構文エラー: {exc} / malformed HTTP/1.1: {exc}")
        assert request is not None
        if wait:
            headers = ((b"retry-after", self.limiter.retry_after_header(wait).encode()),)
            with self._limiter_lock:
                first = source_ip not in self._limited_logged
                self._limited_logged.add(source_ip)
            return self._finish(refusal("rate-limited", f"retry after {wait:.1f}s"), source_ip, conn,
                                headers=headers, log_it=first)
        if request.target.split(b"?")[0] != ENROLL_PATH:
            return self._finish(refusal("not-found", request.target.decode("latin-1")[:200]), source_ip, conn)
        if request.method != b"POST":
            return self._finish(refusal("method-not-allowed", request.method.decode("latin-1")[:20]), source_ip,
                                conn, headers=((b"allow", b"POST"),))
        try:
            enroll_request = parse_enroll_request(bytes(body))
        except RequestProblem as exc:
            return self._finish(refusal("bad-request", exc.text.en), source_ip, conn,
                                text_detail=f"{exc.text.ja} / {exc.text.en}")
        return self._enroll(tls, enroll_request, source_ip, conn)

    def _take_token(self, source_ip: str) -> float:
        with self._limiter_lock:
            wait = self.limiter.take(source_ip, self.monotonic())
            if not wait:
                self._limited_logged.discard(source_ip)
            return wait

    def _enroll(self, tls: SSL.Connection, request: EnrollRequest, source_ip: str, conn: h11.Connection) -> _Reply:
        leaf = tls.get_peer_certificate(as_cryptography=True)
        chain = [c for c in (tls.get_peer_cert_chain(as_cryptography=True) or []) if leaf is None or c != leaf]
        try:
            trusted, crls = self.ca_store.trusted_cas(), self.ca_store.crls()
            with self._write_lock:
                decision = decide_enrollment(leaf, chain, trusted, crls, self.clock(), request,
                                             self.registry.get, self.registry.by_public_key, self.policy)
                # The auth record first: an enrollment that cannot be logged does not happen.
                if decision.ok and not self._log(decision, source_ip, request):
                    return self._log_unavailable(decision, source_ip, conn, request)
                if decision.ok and decision.write is not None:
                    self.registry.update(decision.write, audit=AuditEntry(ENROLL_ACTOR, decision.audit_action,
                                                                          decision.audit_reason))
        except RegistryError as exc:
            decision = refusal("key-in-use", str(exc))
        except Exception as exc:   # never a traceback to the client; the log has it
            log.exception("enrollment: internal error for %s", source_ip)
            decision = refusal("internal-error", type(exc).__name__)
        if not decision.ok:
            return self._finish(decision, source_ip, conn, request=request)
        record = decision.write or decision.record
        dns = [str(self.cfg.gateway_ipv4)] + ([str(self.cfg.gateway_ipv6)] if self.cfg.gateway_ipv6 else [])
        body = enrollment_response(record, gateway_public_key=self.gateway_public_key,
                                   endpoint=self.cfg.device_endpoint(   # issue #22: its shard's port
                                       record.ipv4, self.cfg.endpoint or f"{self.cfg.enrollment_host}:{self.cfg.wg_listen_port}"),
                                   dns=dns, interception_ca_pem=self.interception_ca_pem, mtu=self.cfg.wg_mtu,
                                   changed=decision.write is not None,
                                   persistent_keepalive=getattr(self.cfg, "wg_persistent_keepalive", None))
        return _Reply(200, body, conn=conn)

    def _log_unavailable(self, decision: Decision, source_ip: str, conn: h11.Connection,
                         request: EnrollRequest) -> _Reply:
        """Fail closed: the enrollment was acceptable but its auth record could not be written."""
        if self.metrics is not None:
            self.metrics.fail_closed_blocks.labels("enrollment", "auth-log-unavailable").inc()
        log.error("enrollment: refused the enrollment of %s from %s: its auth log record could not be written",
                  decision.device_id, source_ip)
        return self._finish(refusal("auth-log-unavailable", f"device {decision.device_id}", check=decision.check,
                                    device_id=decision.device_id, record=decision.record),
                            source_ip, conn, request=request, log_it=False)

    def _finish(self, decision: Decision, source_ip: str, conn: h11.Connection, *, request: EnrollRequest | None = None,
                headers: tuple = (), text_detail: str = "", log_it: bool = True) -> _Reply:
        if log_it:
            self._log(decision, source_ip, request)
        detail = text_detail or (decision.detail if decision.http_status < 500 else "")
        return _Reply(decision.http_status, error_body(decision.reason, decision.message, detail), headers, conn)

    def _log(self, decision: Decision, source_ip: str, request: EnrollRequest | None) -> bool:
        """Write the auth record; False (logged here, the log store counts it) when it failed.
        A refusal stays the refusal it is; a success is turned into a 503 by the caller."""
        try:
            self.logstore.append("auth", auth_log_record(decision, source_ip, request=request))
            return True
        except Exception:
            log.exception("enrollment: could not write the auth log record (%s, %s)", decision.reason, source_ip)
            return False

    def _send(self, tls: SSL.Connection, reply: _Reply, deadline: float) -> None:
        conn = reply.conn
        payload = json.dumps(reply.body, ensure_ascii=False).encode("utf-8")
        headers = [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(payload)).encode()),
                   (b"connection", b"close"), (b"cache-control", b"no-store"), *reply.headers]
        try:
            if conn is None:
                raise h11.LocalProtocolError("no connection state")
            data = conn.send(h11.Response(status_code=reply.status, headers=headers))
            data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # h11 refuses to answer some broken requests (e.g. after a protocol error in the
            # request line): write a minimal response by hand then.
            data = (f"HTTP/1.1 {reply.status} Error\r\ncontent-type: application/json; charset=utf-8\r\n"
                    f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n").encode() + payload
        view = memoryview(data)
        while view:
            sent = self._io(tls, deadline, tls.send, view.tobytes())
            view = view[sent:]


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
