"""UDP listener for mitmproxy's DNS mode that keeps answering a device after an idle pause.

Why this exists: with mitmproxy 12.2.3 / mitmproxy_rs 0.12.15, the Rust UDP server maps each
client address to one stream. mitmproxy closes a UDP stream after 20 s without traffic, but
the Rust side keeps the dead mapping, so every later datagram from the same address and port
is silently dropped — forever. Reproduced with a bare `mitmdump --mode dns`: a client bound
to one source port is answered, then after 25 s idle never again (found by the replay tests).
A device whose stub resolver reuses its source port would lose DNS entirely.

This module replaces only the UDP part of the DNS mode's listener with a plain asyncio
datagram endpoint that hands each client address a fresh stream once the previous one has
closed. The streams are driven by mitmproxy's own, unchanged connection handler
(`ServerInstance.handle_stream`), so every hook, addon and DNS layer behaves as before. TCP
DNS keeps mitmproxy's listener. Remove this when mitmproxy_rs fixes the mapping (the
regression test in tests/e2e covers it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mitmproxy.proxy import mode_servers

log = logging.getLogger("kanmon.dns")

MAX_QUEUED_DATAGRAMS = 64  # per client address; more while the handler is busy are dropped
# Live streams (client addresses) at most. A stream stays open until 20 s after its last
# datagram, and stub resolvers send each query from a fresh port, so the live count is the
# query rate times 20 s (the #7 soak: 1000-2800 for 50 devices, ~20 KiB each). Without a cap one
# device cycling through its 65535 source ports held 65535 streams (over 1 GB). When full,
# the stream idle longest is closed to make room: its answer has long been sent.
MAX_STREAMS = 8192
EVICTION_LOG_EVERY = 10.0  # seconds between warnings while streams are being evicted

# Per-device DNS rate (issue #14, addons/limits.py): called with the client's address before a
# datagram is queued or a stream made for it; False drops the datagram right there. Dropped,
# not answered REFUSED: a flood costs one dict lookup and a token-bucket step per datagram (no
# answer to build, no send), and a device that only briefly went over gets its stub resolver's
# normal retry a second later instead of an error it would show the user.
Admission = Callable[[str], bool]
_admission: Admission | None = None


def set_admission(admit: Admission | None) -> None:
    """Every DNS datagram listener started from now on asks `admit` first (None: no check)."""
    global _admission
    _admission = admit


class DatagramStream:
    """One client address's datagrams, with the reader/writer interface mitmproxy's
    connection handler uses for UDP streams."""

    def __init__(self, transport: asyncio.DatagramTransport, peer: tuple, sockname: tuple, on_close) -> None:
        self._transport = transport
        self._peer = peer
        self._sockname = sockname
        self._on_close = on_close
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(MAX_QUEUED_DATAGRAMS + 1)
        self.closed = False
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        if self._queue.qsize() >= MAX_QUEUED_DATAGRAMS:
            self.dropped += 1
            return
        self._queue.put_nowait(data)

    async def read(self, n: int = -1) -> bytes:
        if self.closed and self._queue.empty():
            return b""
        return await self._queue.get()

    def write(self, data: bytes) -> None:
        if not self.closed:
            self._transport.sendto(data, self._peer)

    async def drain(self) -> None:
        return None

    def write_eof(self) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._on_close(self._peer, self)
        self._queue.put_nowait(b"")  # wakes a pending read: end of stream

    async def wait_closed(self) -> None:
        return None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self._peer, "sockname": self._sockname, "transport_protocol": "udp"}.get(name, default)


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, handle_stream, max_streams: int = MAX_STREAMS, admit: Admission | None = None) -> None:
        if max_streams < 1:
            raise ValueError("max_streams must be positive")
        self.handle_stream = handle_stream
        self.admit = admit
        self.refused = 0   # datagrams dropped by `admit`
        self.max_streams = max_streams
        # Least recently heard-from first: the eviction order.
        self.streams: OrderedDict[tuple, DatagramStream] = OrderedDict()
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task] = set()
        self.evicted = 0
        self._last_eviction_log = float("-inf")

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.admit is not None and not self.admit(addr[0]):
            self.refused += 1
            return
        stream = self.streams.get(addr)
        if stream is not None:
            self.streams.move_to_end(addr)
        else:
            while len(self.streams) >= self.max_streams:
                self._evict_oldest()
            stream = DatagramStream(self.transport, addr, self.transport.get_extra_info("sockname"), self._closed)
            self.streams[addr] = stream
            task = asyncio.ensure_future(self.handle_stream(stream, stream))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        stream.feed(data)

    def _evict_oldest(self) -> None:
        _, oldest = self.streams.popitem(last=False)
        oldest.close()   # ends its handler (end of stream) like an idle timeout would
        self.evicted += 1
        now = time.monotonic()
        if now - self._last_eviction_log >= EVICTION_LOG_EVERY:
            self._last_eviction_log = now
            log.warning("DNS: %d live client streams (the cap): closing the longest idle ones (%d so far)",
                        self.max_streams, self.evicted)

    def _closed(self, peer: tuple, stream: DatagramStream) -> None:
        if self.streams.get(peer) is stream:
            del self.streams[peer]


class DatagramServer:
    """What `AsyncioServerInstance` expects of a started server: close() and sockets."""

    def __init__(self, transport: asyncio.DatagramTransport, endpoint: _Endpoint, sock: socket.socket) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.sockets = [sock]

    def getsockname(self) -> tuple:
        return self.sockets[0].getsockname()

    def close(self) -> None:
        for stream in list(self.endpoint.streams.values()):
            stream.close()
        self.transport.close()


async def start_datagram_server(handle_stream, host: str, port: int) -> DatagramServer:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # IPv4 has its own socket
    sock.bind((host, port))
    sock.setblocking(False)
    endpoint = _Endpoint(handle_stream, admit=_admission)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: endpoint, sock=sock)
    return DatagramServer(transport, endpoint, sock)


_installed = False


def install() -> None:
    """Route the UDP side of mitmproxy's DNS mode through `start_datagram_server`."""
    global _installed
    if _installed:
        return

    async def start_udp_based_server(self, host, port):
        return await start_datagram_server(self.handle_stream, host, port)

    mode_servers.DnsInstance.start_udp_based_server = start_udp_based_server
    _installed = True
