"""gateway/proxy/dnslistener.py: the UDP DNS listener's per-address streams stay bounded (#7 soak)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.proxy import dnslistener
from gateway.proxy.dnslistener import _Endpoint


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple]] = []

    def get_extra_info(self, name, default=None):
        return ("10.77.0.1", 53) if name == "sockname" else default

    def sendto(self, data, addr) -> None:
        self.sent.append((data, addr))


def run_endpoint(max_streams: int, script) -> tuple[_Endpoint, dict[tuple, list[bytes]]]:
    """Feed datagrams with `script(endpoint)` to an endpoint whose handler echoes every
    datagram and records what each stream read until its end (b"")."""
    seen: dict[tuple, list[bytes]] = {}

    async def handle_stream(reader, writer) -> None:
        peer = writer.get_extra_info("peername")
        got = seen.setdefault(peer, [])
        while data := await reader.read():
            got.append(data)
            writer.write(b"answer:" + data)
        got.append(b"<end>")
        writer.close()

    async def main() -> _Endpoint:
        endpoint = _Endpoint(handle_stream, max_streams=max_streams)
        endpoint.connection_made(FakeTransport())
        await script(endpoint)
        await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        return endpoint

    return asyncio.run(main()), seen


def test_one_device_cycling_source_ports_cannot_grow_the_stream_table():
    async def flood(endpoint):
        for port in range(40000, 41000):
            endpoint.datagram_received(b"q%d" % port, ("10.77.0.2", port))
            await asyncio.sleep(0)   # the handler answers, as it would between datagrams
            assert len(endpoint.streams) <= 50

    endpoint, seen = run_endpoint(50, flood)
    assert len(endpoint.streams) == 50
    assert endpoint.evicted == 950
    # every evicted stream was answered and then ended; none was cut before its answer
    ended = [peer for peer, got in seen.items() if got[-1:] == [b"<end>"]]
    assert len(ended) == 950
    assert all(seen[p][0] == b"q%d" % p[1] for p in ended)
    assert len(endpoint.transport.sent) == 1000


def test_the_stream_idle_longest_is_closed_first():
    async def script(endpoint):
        for port in (1, 2, 3):
            endpoint.datagram_received(b"first", ("10.77.0.2", port))
            await asyncio.sleep(0)
        endpoint.datagram_received(b"again", ("10.77.0.2", 1))   # port 1 is active again
        await asyncio.sleep(0)
        endpoint.datagram_received(b"new", ("10.77.0.2", 4))     # full: port 2 goes

    endpoint, seen = run_endpoint(3, script)
    assert list(endpoint.streams) == [("10.77.0.2", 3), ("10.77.0.2", 1), ("10.77.0.2", 4)]
    assert seen[("10.77.0.2", 2)][-1] == b"<end>"
    assert seen[("10.77.0.2", 1)] == [b"first", b"again"]


def test_an_address_whose_stream_was_evicted_gets_a_new_one():
    async def script(endpoint):
        endpoint.datagram_received(b"a", ("10.77.0.2", 1))
        await asyncio.sleep(0)
        endpoint.datagram_received(b"b", ("10.77.0.2", 2))      # evicts port 1
        await asyncio.sleep(0)
        endpoint.datagram_received(b"c", ("10.77.0.2", 1))      # port 1 again: answered
        await asyncio.sleep(0)

    endpoint, _ = run_endpoint(1, script)
    assert [d for d, _ in endpoint.transport.sent] == [b"answer:a", b"answer:b", b"answer:c"]
    assert endpoint.evicted == 2


def test_default_cap_and_bad_cap():
    assert dnslistener.MAX_STREAMS >= 4096   # the soak's 50 devices keep up to ~2800 live streams
    with pytest.raises(ValueError, match="max_streams"):
        _Endpoint(lambda r, w: None, max_streams=0)
