"""`kanmon console serve`: the console as its own process, HTTPS on the management address.

Why its own process and not inside the gateway: the gateway process carries every device's
traffic (mitmproxy's event loop, the reconcile loop, the tunnel). A web application is the
part most likely to have a bug (a template, a form, a slow page, a crafted request); in the
gateway it would share the event loop and the memory of the data path, and a crash would cut
every device off. As a separate process it reaches the gateway only through the interfaces the
CLI already uses (the registry, the "apply now" poke and its confirmation file, the log files
read-only), it can be restarted alone, and it runs with its own systemd sandbox
(systemd/kanmon-console.service). The cost: sessions live in this process (a restart signs
operators out, which fails closed) and live state (peers, sockets) is read from the host.

TLS: the server certificate is issued by the organization CA (the one that issues device
certificates; operators' browsers trust it like the enrollment endpoint's devices do) with
gateway/enroll/servercert.py, kept under <state>/console/ and re-issued near expiry or when the
names change. Without an organization CA (and without server_cert_file) the console does not
start: a self-signed console would teach operators to click through certificate warnings.

The HTTP server is Werkzeug's threaded WSGI server (installed with Flask; no other server is a
dependency of the project). It serves a handful of operators on the management address, never
device traffic; TLS 1.2 or newer only.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import ssl
from datetime import UTC, datetime
from pathlib import Path

from gateway.i18n import Text

log = logging.getLogger("kanmon.console")


class ConsoleStartError(Exception):
    def __init__(self, text: Text):
        self.text = text
        super().__init__(str(text))


def listen_socket(host: str, port: int) -> socket.socket:
    """The console's listening socket, or a ConsoleStartError that says what to check.

    serve() binds it once before Werkzeug does: when Werkzeug's own bind fails it prints the
    errno text in English and ends the process (sys.exit), so an operator who kept the doc's
    example address saw only "Cannot assign requested address"."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno == errno.EADDRNOTAVAIL:
            hint = Text(f"{host} はこのホストのアドレスではありません。console.listen にこのホストの管理用アドレスを"
                        "書いてください(`ip -brief address` で確認できます)",
                        f"{host} is not an address of this host: set console.listen to this host's management "
                        "address (see `ip -brief address`)")
        elif exc.errno == errno.EADDRINUSE:
            hint = Text(f"ポート {port} はほかのプログラムが使っています。`ss -ltnp` で確認して止めるか、"
                        "console.listen のポートを変えてください",
                        f"port {port} is used by another program: find it with `ss -ltnp` and stop it, or "
                        "change the port in console.listen")
        elif exc.errno == errno.EACCES:
            hint = Text("1024 未満のポートには root 権限(CAP_NET_BIND_SERVICE)が必要です",
                        "a port below 1024 needs root (CAP_NET_BIND_SERVICE)")
        else:
            hint = Text("console.listen を確認してください", "check console.listen")
        raise ConsoleStartError(Text(f"{host}:{port} で待ち受けできません: {reason}。{hint.ja}",
                                     f"cannot listen on {host}:{port}: {reason}; {hint.en}")) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_QUERY = re.compile(r"\?[^\s\"]*")


class RequestLogFilter(logging.Filter):
    """Werkzeug's access lines without ANSI colours (escape codes in the journal) and without
    query strings (on /callback: the IdP's one-time code and state)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_QUERY.sub("", _ANSI.sub("", a)) if isinstance(a, str) else a for a in record.args)
        return True


def certificate_paths(cfg, now: datetime | None = None) -> tuple[Path, Path]:
    """(certificate chain PEM, key PEM) of the console's TLS identity."""
    from gateway.devices.ca import CaStore, DeviceCaError, pki_dir
    from gateway.enroll import servercert

    settings = cfg.console
    if settings.server_cert_file:
        return Path(settings.server_cert_file), Path(settings.server_key_file)
    store = CaStore(pki_dir(cfg.state_dir))
    if not store.has_org_ca():
        raise ConsoleStartError(Text("組織 CA がありません(`kanmon ca init`)。コンソールの証明書を発行できません"
                                     "(または console.server_cert_file / server_key_file を設定してください)",
                                     "no organization CA (`kanmon ca init`): cannot issue the console's certificate "
                                     "(or set console.server_cert_file / server_key_file)"))
    try:
        ca = store.load_org_ca()
    except DeviceCaError as exc:
        raise ConsoleStartError(exc.text) from None
    host = settings.public_url.split("://", 1)[1].rsplit(":", 1)[0].strip("[]") \
        if settings.public_url.count(":") > 1 else settings.public_url.split("://", 1)[1].strip("[]")
    names = servercert.server_names(settings.host, None, (host,) + tuple(settings.server_names))
    directory = cfg.state_dir / "console"
    servercert.load_or_create(directory, names, now or datetime.now(UTC), ca)
    return directory / "server.cert.pem", directory / "server.key.pem"


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


CONNECTION_TIMEOUT = 30   # seconds a connection may sit without sending (handshake, request, keep-alive)
MAX_CONNECTIONS_PER_ADDRESS = 16   # a browser opens at most 6 per host; one thread each
MAX_CONNECTIONS = 256


def make_console_server(host: str, port: int, app, context: ssl.SSLContext):
    """Werkzeug's threaded server with TLS done in each connection's thread.

    Why not ``make_server(..., ssl_context=context)``: Werkzeug then wraps the listening socket
    with the handshake on accept, in the one thread that accepts; a single client that opens a
    TCP connection and sends nothing froze the console for everyone (tests/unit/
    test_console_attacks.py). Here the handshake is the first read of the connection's own
    thread, and every connection has CONNECTION_TIMEOUT."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Handler(WSGIRequestHandler):
        server_version = "kanmon-console"   # no Werkzeug/Python versions in the Server header
        sys_version = ""
        timeout = CONNECTION_TIMEOUT

    server = make_server(host, port, app, threaded=True, request_handler=Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.ssl_context = context   # Werkzeug reads it for wsgi.url_scheme and its TLS error handling
    _bound_connections(server)
    return server


def _bound_connections(server) -> None:
    """One thread per connection, bounded: at most MAX_CONNECTIONS_PER_ADDRESS open from one
    client address and MAX_CONNECTIONS in all; a connection beyond is closed at once (one
    client holding idle connections cannot take every thread, nor every operator's turn)."""
    import threading

    lock = threading.Lock()
    open_by_address: dict[str, int] = {}

    def finished(address: str) -> None:
        with lock:
            open_by_address[address] -= 1
            if not open_by_address[address]:
                del open_by_address[address]

    def bounded_process_request(request, client_address):
        address = str(client_address[0])
        with lock:
            full = (open_by_address.get(address, 0) >= MAX_CONNECTIONS_PER_ADDRESS
                    or sum(open_by_address.values()) >= MAX_CONNECTIONS)
            if not full:
                open_by_address[address] = open_by_address.get(address, 0) + 1
        if full:
            log.warning("console: connection from %s refused (too many open)", address)
            server.shutdown_request(request)
            return

        def run():
            try:
                server.process_request_thread(request, client_address)
            finally:
                finished(address)
        threading.Thread(target=run, daemon=server.daemon_threads).start()

    server.process_request = bounded_process_request


def serve(cfg) -> None:
    """Run until interrupted. Raises ConsoleStartError (bilingual) when it cannot start."""
    from gateway.console.app import create_app
    from gateway.pages.catalog import CatalogError

    if cfg.console is None:
        raise ConsoleStartError(Text("設定に console: セクションがありません", "the configuration has no console: section"))
    listen_socket(cfg.console.host, cfg.console.port).close()   # refused in both languages, before Werkzeug
    logging.getLogger("werkzeug").addFilter(RequestLogFilter())
    cert, key = certificate_paths(cfg)
    try:
        context = tls_context(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConsoleStartError(Text(f"TLS 証明書を読めません: {exc}", f"cannot load the TLS certificate: {exc}")) from None
    try:
        app = create_app(cfg)
    except CatalogError as exc:
        raise ConsoleStartError(exc.text) from None
    try:
        server = make_console_server(cfg.console.host, cfg.console.port, app, context)
    except OSError as exc:
        raise ConsoleStartError(Text(f"{cfg.console.host}:{cfg.console.port} で待ち受けできません: {exc}",
                                     f"cannot listen on {cfg.console.host}:{cfg.console.port}: {exc}")) from None
    log.info("console on %s (listening on %s:%d)", cfg.console.public_url, cfg.console.host, cfg.console.port)
    print(f"console: {cfg.console.public_url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
