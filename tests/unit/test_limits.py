"""Per-device limits (issue #14): token buckets, the per-device tables, the rate-limited report,
the `limits:` config section, the addon's hooks and the HTTP/1 header caps inside mitmproxy's
HTTP/1 layers (driven event by event, as the proxy drives them)."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess

import pytest
from mitmproxy import dns, options
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import RequestData, RequestHeaders, ResponseProtocolError
from mitmproxy.test import tflow, tutils
from wireguard_tools import WireguardKey

from addons.identity import DeviceDirectory, DeviceIdentity
from addons.limits import (DeviceLimits, HeaderLimits, LimitedHttp1Client, LimitedHttp1Server, header_overrun,
                           install_header_limits)
from gateway.proxy import dnslistener
from gateway.config import load_config_text
from gateway.proxy.connections import LiveConnections
from gateway.limits import (LIMIT_CONNECTION_RATE, LIMIT_CONNECTIONS, LIMIT_DNS_RATE, LIMIT_HEADER_BYTES,
                            LIMIT_HEADER_COUNT, LIMIT_RESPONSE_HEADER, RULE_DEVICE_LIMIT, DeviceLimiter,
                            LimitReporter, LimitSettings, TokenBucket)
from gateway.logstore import missing_required_fields
from gateway.metrics import GatewayMetrics
from gateway.registry.model import DeviceRecord
from gateway.yamlsource import SourceErrors


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- token bucket and per-device tables -------------------------------------------------------

def test_token_bucket_spends_its_burst_then_refills_at_its_rate():
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.05) is False          # half a token
    assert bucket.take(0.1) is True            # one token after 0.1 s at 10/s
    assert bucket.take(0.1) is False
    # an idle bucket never saves more than its burst
    assert sum(bucket.take(100.0) for _ in range(20)) == 5


def test_connection_cap_and_rate_are_per_device_and_released_on_close():
    clock = Clock()
    limiter = DeviceLimiter(LimitSettings(connections_per_device=3, new_connections_per_second=1,
                                          new_connections_burst=4), clock)
    assert [limiter.admit_connection("a") for _ in range(4)] == [None, None, None, LIMIT_CONNECTIONS]
    assert limiter.admit_connection("b") is None            # another device is not affected
    limiter.release_connection("a")
    assert limiter.admit_connection("a") is None            # the 4th token of its burst
    limiter.release_connection("a")
    assert limiter.admit_connection("a") == LIMIT_CONNECTION_RATE   # burst spent, no time passed
    clock.now += 1.0
    assert limiter.admit_connection("a") is None
    assert limiter.open_connections == {"a": 3, "b": 1}
    for _ in range(3):
        limiter.release_connection("a")
    assert "a" not in limiter.open_connections               # the table holds busy devices only
    limiter.release_connection("a")                           # an extra release never goes negative
    assert "a" not in limiter.open_connections


def test_a_connection_refused_by_the_cap_takes_no_rate_token():
    clock = Clock()
    limiter = DeviceLimiter(LimitSettings(connections_per_device=1, new_connections_per_second=1,
                                          new_connections_burst=2), clock)
    assert limiter.admit_connection("a") is None
    assert all(limiter.admit_connection("a") == LIMIT_CONNECTIONS for _ in range(50))
    limiter.release_connection("a")
    assert limiter.admit_connection("a") is None


def test_dns_bucket_and_sweep_of_idle_devices():
    clock = Clock()
    limiter = DeviceLimiter(LimitSettings(dns_queries_per_second=2, dns_burst=3), clock)
    assert [limiter.admit_dns("a") for _ in range(4)] == [True, True, True, False]
    limiter.admit_dns("b")
    assert len(limiter) == 2
    clock.now += 0.4
    limiter.sweep()
    assert len(limiter) == 2          # not refilled yet: still remembered (forgetting would hand out a new burst)
    clock.now += 10
    limiter.sweep()
    assert len(limiter) == 0


# -- the report --------------------------------------------------------------------------------

def test_reporter_writes_the_first_bite_at_once_then_one_record_per_interval_with_the_count():
    clock, records = Clock(), []
    reporter = LimitReporter(lambda key, limit, count, ctx: records.append((key, limit, count, ctx["n"])), 10, clock)
    for n in range(1000):                      # a flood: 1000 bites in 5 s
        reporter.hit("dev-a", LIMIT_DNS_RATE, {"n": n})
        clock.now += 0.005
    assert records == [("dev-a", LIMIT_DNS_RATE, 1, 0)]
    reporter.flush()                           # interval not over: nothing yet
    assert len(records) == 1
    clock.now += 6
    reporter.flush()
    assert records[1] == ("dev-a", LIMIT_DNS_RATE, 999, 999)   # the count, and the latest context
    for n in range(100):                       # the flood goes on: still one record per interval
        reporter.hit("dev-a", LIMIT_DNS_RATE, {"n": n})
    clock.now += 10
    reporter.flush()
    assert records[2][2] == 100 and len(records) == 3
    clock.now += 10
    reporter.flush()                           # a quiet interval: no record, window forgotten
    assert len(records) == 3 and len(reporter) == 0
    reporter.hit("dev-a", LIMIT_DNS_RATE, {"n": -1})
    assert records[3] == ("dev-a", LIMIT_DNS_RATE, 1, -1)      # reported at once again


def test_reporter_keeps_devices_and_limits_apart():
    clock, records = Clock(), []
    reporter = LimitReporter(lambda key, limit, count, ctx: records.append((key, limit, count)), 10, clock)
    for key in ("a", "b"):
        for limit in (LIMIT_CONNECTIONS, LIMIT_DNS_RATE):
            reporter.hit(key, limit, {})
            reporter.hit(key, limit, {})
    assert sorted(records) == [("a", LIMIT_CONNECTIONS, 1), ("a", LIMIT_DNS_RATE, 1),
                               ("b", LIMIT_CONNECTIONS, 1), ("b", LIMIT_DNS_RATE, 1)]
    reporter.flush(force=True)
    assert len(records) == 8 and all(count == 1 for _, _, count in records)


# -- config ------------------------------------------------------------------------------------

BASE = """
state_dir: /tmp/kanmon-test
tunnel: {interface: wg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}
uplink: {interface: eth0}
"""


def test_limits_default_when_the_section_is_absent_and_take_overrides():
    assert load_config_text(BASE).limits == LimitSettings()
    cfg = load_config_text(BASE + "limits: {connections_per_device: 64, dns_queries_per_second: 5.5}\n")
    assert cfg.limits.connections_per_device == 64
    assert cfg.limits.dns_queries_per_second == 5.5
    assert cfg.limits.request_header_bytes == LimitSettings().request_header_bytes


@pytest.mark.parametrize("bad", ["request_header_bytes: 10", "connections_per_device: 0",
                                 "dns_queries_per_second: 0", "new_connections_burst: -1", "header_bytes: 4096"])
def test_bad_limits_are_refused_with_the_line(bad):
    with pytest.raises(SourceErrors) as exc:
        load_config_text(BASE + "limits:\n  " + bad + "\n", "kanmon.yaml")
    text = "\n".join(str(e) for e in exc.value.errors)
    assert "kanmon.yaml:6" in text and "limits" in text


# -- the addon's hooks -------------------------------------------------------------------------

DEVICE = DeviceRecord("phone-1", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.2"),
                      ipaddress.ip_address("fd77:77::2"), owner="sato@example.jp")
OTHER = DeviceRecord("phone-2", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.3"),
                     ipaddress.ip_address("fd77:77::3"), owner="suzuki@example.jp")


class Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict]] = []

    def append(self, stream: str, record: dict) -> None:
        self.records.append((stream, record))


class Gate:
    def __init__(self, **settings) -> None:
        self.clock = Clock()
        self.metrics = GatewayMetrics()
        self.connections = LiveConnections()
        self.directory = DeviceDirectory()
        self.directory.replace([DEVICE, OTHER])
        self.identity = DeviceIdentity(self.directory, self.connections, self.metrics)
        self.sink = Sink()
        self.limits = DeviceLimits(LimitSettings(**settings), self.connections, self.directory, self.metrics,
                                   self.sink, clock=self.clock)

    def connect(self, ip: str = "10.77.0.2", transport: str = "tcp"):
        client = tflow.tclient_conn()
        client.peername = (ip, 40000)
        client.sockname = ("198.51.100.80", 443)
        client.transport_protocol = transport
        self.identity.client_connected(client)
        self.limits.client_connected(client)
        return client

    def disconnect(self, client) -> None:
        self.limits.client_disconnected(client)
        self.identity.client_disconnected(client)

    def bites(self, limit: str) -> float:
        return self.metrics.registry.get_sample_value("kanmon_device_limited_total", {"limit": limit}) or 0


def test_connection_over_the_cap_is_refused_at_connect_counted_and_logged_once():
    gate = Gate(connections_per_device=2)
    held = [gate.connect(), gate.connect("fd77:77::2")]     # both addresses count for the one device
    assert all(c.error is None for c in held)
    refused = [gate.connect() for _ in range(5)]
    assert all(c.error and "connections limit" in c.error for c in refused)
    assert gate.connect("10.77.0.3").error is None           # the other device is not affected
    assert gate.bites(LIMIT_CONNECTIONS) == 5
    assert len(gate.sink.records) == 1                       # one record, not one per refused connection
    stream, record = gate.sink.records[0]
    assert stream == "conn"
    assert record["event.action"] == "device-limited"
    assert record["rule.id"] == RULE_DEVICE_LIMIT
    assert record["kanmon.limit.name"] == LIMIT_CONNECTIONS and record["kanmon.limit.count"] == 1
    assert record["device.id"] == "phone-1" and record["user.name"] == "sato@example.jp"
    assert record["source.ip"] == "10.77.0.2" and record["destination.port"] == 443
    assert "上限" in record["event.reason"] and "limit" in record["event.reason"]
    assert missing_required_fields("conn", {**record, "@timestamp": "2026-12-05T00:00:00.000000Z"}) == []
    for c in refused:                                        # refused connections close too
        gate.disconnect(c)
    gate.disconnect(held[0])
    assert gate.connect().error is None                      # a slot is free again
    gate.clock.now += 11
    gate.limits.flush()
    assert gate.sink.records[-1][1]["kanmon.limit.count"] == 4


def test_connection_rate_refuses_a_burst_beyond_the_bucket():
    gate = Gate(new_connections_per_second=1, new_connections_burst=3)
    clients = [gate.connect() for _ in range(5)]
    assert [c.error is None for c in clients] == [True, True, True, False, False]
    assert gate.bites(LIMIT_CONNECTION_RATE) == 2
    gate.clock.now += 1
    assert gate.connect().error is None


def test_dns_streams_and_unknown_devices_are_not_counted_as_connections():
    gate = Gate(connections_per_device=1)
    assert all(gate.connect(transport="udp").error is None for _ in range(5))
    stranger = gate.connect("10.77.0.99")
    assert "no admitted device" in stranger.error            # refused by identity, not counted by us
    assert gate.limits.limiter.open_connections == {}
    assert gate.bites(LIMIT_CONNECTIONS) == 0


def test_dns_datagrams_over_the_rate_are_dropped_per_device():
    gate = Gate(dns_queries_per_second=1, dns_burst=3)
    answers = [gate.limits.admit_dns("10.77.0.2") for _ in range(3)] + [gate.limits.admit_dns("fd77:77::2")]
    assert answers == [True, True, True, False]              # IPv6 shares the IPv4 address's budget
    assert gate.limits.admit_dns("10.77.0.3") is True
    assert gate.bites(LIMIT_DNS_RATE) == 1
    record = gate.sink.records[0][1]
    assert record["kanmon.limit.name"] == LIMIT_DNS_RATE and record["device.id"] == "phone-1"
    assert record["network.transport"] == "udp" and record["destination.port"] == 53
    assert missing_required_fields("conn", {**record, "@timestamp": "2026-12-05T00:00:00.000000Z"}) == []


def test_dns_check_that_fails_drops_the_datagram_and_counts_the_error():
    gate = Gate()
    gate.limits.directory = None                              # by_ip raises AttributeError
    assert gate.limits.admit_dns("10.77.0.2") is False
    assert gate.metrics.registry.get_sample_value(
        "kanmon_addon_errors_total", {"addon": "kanmon-limits", "hook": "admit_dns"}) == 1


def test_dns_over_tcp_over_the_rate_is_answered_refused():
    gate = Gate(dns_queries_per_second=1, dns_burst=1)
    client = gate.connect()
    flows = []
    for _ in range(2):
        flow = tflow.tdnsflow(client_conn=client)
        gate.limits.dns_request(flow)
        flows.append(flow)
    assert flows[0].response is None
    assert flows[1].response.response_code == dns.response_codes.REFUSED
    udp = tflow.tdnsflow(client_conn=gate.connect(transport="udp"))
    gate.limits.dns_request(udp)                              # UDP was checked in the listener
    assert udp.response is None


def test_the_log_record_survives_a_failing_store():
    gate = Gate(connections_per_device=1)

    class Broken:
        def append(self, stream, record):
            raise OSError("disk full")

    gate.limits.sink = Broken()
    gate.connect()
    assert gate.connect().error                               # still refused
    assert gate.bites(LIMIT_CONNECTIONS) == 1


def test_listener_drops_datagrams_the_admission_refuses():
    import asyncio

    async def scenario():
        started = []

        async def handle_stream(reader, writer):
            started.append(writer)

        admitted = {"10.77.0.2": True, "10.77.0.3": False}
        endpoint = dnslistener._Endpoint(handle_stream, admit=lambda ip: admitted[ip])

        class Transport:
            def get_extra_info(self, name, default=None):
                return ("10.77.0.1", 53)

            def sendto(self, data, addr):
                pass

        endpoint.connection_made(Transport())
        endpoint.datagram_received(b"q1", ("10.77.0.3", 5000))
        endpoint.datagram_received(b"q2", ("10.77.0.2", 5001))
        await asyncio.sleep(0)
        assert endpoint.refused == 1
        assert list(endpoint.streams) == [("10.77.0.2", 5001)]
        for stream in list(endpoint.streams.values()):
            stream.close()

    asyncio.run(scenario())


# -- HTTP/1 header caps inside mitmproxy's layers ----------------------------------------------

@pytest.fixture
def capped():
    refused: list[tuple[str, int]] = []
    install_header_limits(HeaderLimits(1024, 10, lambda client, limit, size: refused.append((limit, size))))
    yield refused
    install_header_limits(None)


def server_layer():
    client = tflow.tclient_conn()
    layer = http_layers.Http1Server(Context(client, options.Options()))
    list(layer.handle_event(events.Start()))
    return client, layer


def feed(layer, conn, data: bytes) -> list:
    return list(layer.handle_event(events.DataReceived(conn, data)))


def headers_passed_on(cmds) -> list:
    return [c for c in cmds if isinstance(c, ReceiveHttp) and isinstance(c.event, RequestHeaders)]


def refused_with_431(cmds) -> bool:
    sent = [c for c in cmds if isinstance(c, commands.SendData)]
    return (len(sent) == 1 and sent[0].data.startswith(b"HTTP/1.1 431 ") and "上限".encode() in sent[0].data
            and any(isinstance(c, commands.CloseConnection) for c in cmds))


def test_the_http_layer_uses_the_capped_layers_only_while_installed(capped):
    assert http_layers.Http1Server is LimitedHttp1Server and http_layers.Http1Client is LimitedHttp1Client
    install_header_limits(None)
    assert http_layers.Http1Server is _http1.Http1Server and http_layers.Http1Client is _http1.Http1Client


def test_endless_header_is_refused_while_reading_never_passed_on(capped):
    client, layer = server_layer()
    cmds = feed(layer, client, b"GET / HTTP/1.1\r\nHost: a\r\n")
    sent = 0
    for _ in range(100):                                       # 100 x 100 bytes, never a blank line
        cmds = feed(layer, client, b"X-Junk: " + b"a" * 90 + b"\r\n")
        sent += 1
        if cmds:
            break
    assert refused_with_431(cmds) and not headers_passed_on(cmds)
    assert sent <= 11                                           # bit within one read past the cap
    assert capped == [(LIMIT_HEADER_BYTES, 25 + sent * 100)]
    assert len(layer.buf) == 0                                  # what was read is freed at once
    assert feed(layer, client, b"more junk" * 1000) == []      # and nothing more is buffered
    assert len(layer.buf) == 0


def test_a_complete_head_over_the_byte_cap_arriving_at_once_is_refused(capped):
    client, layer = server_layer()
    head = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * 2000 + b"\r\n\r\n"
    cmds = feed(layer, client, head)
    assert refused_with_431(cmds) and not headers_passed_on(cmds)
    assert capped == [(LIMIT_HEADER_BYTES, len(head))]


def test_too_many_header_fields_are_refused(capped):
    client, layer = server_layer()
    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(10)) + b"\r\n"
    cmds = feed(layer, client, head)                            # 11 fields, small
    assert refused_with_431(cmds) and not headers_passed_on(cmds)
    assert capped == [(LIMIT_HEADER_COUNT, 11)]


def test_small_head_with_a_large_body_in_the_same_read_passes(capped):
    client, layer = server_layer()
    body = b"b" * 5000
    cmds = feed(layer, client, b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n" + body)
    assert len(headers_passed_on(cmds)) == 1 and capped == []
    data = b"".join(c.event.data for c in cmds if isinstance(c, ReceiveHttp) and isinstance(c.event, RequestData))
    assert data == body


def test_heads_at_the_caps_pass_and_keep_alive_requests_are_each_checked(capped):
    client, layer = server_layer()
    fill = 1024 - len(b"GET / HTTP/1.1\r\nHost: a\r\nX-Fill: \r\n\r\n")
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Fill: " + b"f" * fill + b"\r\n\r\n"
    assert len(head) == 1024
    cmds = feed(layer, client, head)
    assert len(headers_passed_on(cmds)) == 1 and capped == []
    assert header_overrun(1024, 10, HeaderLimits(1024, 10)) is None
    assert header_overrun(1025, 1, HeaderLimits(1024, 10)) == LIMIT_HEADER_BYTES


def test_oversized_response_head_from_a_server_becomes_a_protocol_error(capped):
    server = tutils.tserver_conn() if hasattr(tutils, "tserver_conn") else tflow.tserver_conn()
    context = Context(tflow.tclient_conn(), options.Options())
    context.server = server
    layer = http_layers.Http1Client(context)
    list(layer.handle_event(events.Start()))
    request = tutils.treq()
    list(layer.handle_event(http_layers.RequestHeaders(1, request, True)))
    cmds = list(layer.handle_event(events.DataReceived(server, b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 2000 + b"\r\n")))
    errors = [c for c in cmds if isinstance(c, ReceiveHttp) and isinstance(c.event, ResponseProtocolError)]
    assert len(errors) == 1 and any(isinstance(c, commands.CloseConnection) for c in cmds)
    assert capped and capped[0][0] == LIMIT_RESPONSE_HEADER


# -- the kernel backstop ------------------------------------------------------------------------

def test_kernel_backstop_sits_at_twice_the_proxys_limits_per_address():
    from gateway.net.limitsnft import render_limits_table, table_name
    text = render_limits_table(table_name("kanmon_gw"), "wg0", LimitSettings(
        connections_per_device=256, new_connections_per_second=50, new_connections_burst=200,
        dns_queries_per_second=20, dns_burst=100))
    assert table_name("kanmon_gw") == "kanmon_gw_limits"
    assert "table inet kanmon_gw_limits {" in text and "delete table inet kanmon_gw_limits" in text
    for family, saddr in (("4", "ip saddr"), ("6", "ip6 saddr")):
        assert f"add @rate_v{family} {{ {saddr} limit rate over 100/second burst 400 packets }}" in text
        assert f"add @held_v{family} {{ {saddr} ct count over 512 }}" in text
        assert f"add @dns_v{family} {{ {saddr} limit rate over 40/second burst 200 packets }}" in text
    assert text.count("reject with tcp reset") == 4
    assert 'iifname != "wg0" return' in text            # only tunnel traffic is limited
    # encrypted packets per WireGuard endpoint (address and port), before the tunnel's socket
    assert ("udp dport 51820 meta nfproto ipv4 add @tunnel_v4 { ip saddr . udp sport limit rate over "
            "4000/second burst 4000 packets } counter name dropped_tunnel drop") in text
    assert text.index("@tunnel_v4") < text.index('iifname != "wg0" return')   # underlay packets, not tunnel ones


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root")
def test_kernel_backstop_is_valid_nft():
    from gateway.net.limitsnft import render_limits_table
    proc = subprocess.run(["nft", "-c", "-f", "-"], input=render_limits_table("kanmon_t_limits", "wg0", LimitSettings()),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_kernel_counters_are_added_to_the_metric_as_deltas():
    from gateway.net.limitsnft import parse_counters
    text = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "inet", "name": "refused_rate", "table": "t", "packets": 120, "bytes": 7200}},
        {"counter": {"family": "inet", "name": "dropped_dns", "table": "t", "packets": 5, "bytes": 300}},
        {"counter": {"family": "inet", "name": "someone_elses", "table": "t", "packets": 9, "bytes": 1}}]})
    counters = parse_counters(text)
    assert counters == {"refused_rate": 120, "dropped_dns": 5}
    gate = Gate()
    gate.limits.count_kernel(counters)
    gate.limits.count_kernel({"refused_rate": 150, "dropped_dns": 5})
    assert gate.bites("kernel-connection-rate") == 150 and gate.bites("kernel-dns-rate") == 5
    gate.limits.count_kernel({"refused_rate": 10})       # table replaced (restart): counts from there
    gate.limits.count_kernel({"refused_rate": 25})
    assert gate.bites("kernel-connection-rate") == 165


# -- the proxy listeners' accept queue ---------------------------------------------------------

@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_accept_queue_of_a_listening_socket_is_deepened():
    import asyncio

    from gateway.proxy.master import deepen_accept_queues

    def backlog(port: int) -> int:
        # For a listening socket, ss shows the accept queue's limit as Send-Q.
        line = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
        return int(line[2])

    async def scenario():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            assert backlog(port) == 100                         # asyncio's default

            class Instance:                                     # what mitmproxy's server instances hold
                _servers = [server]

            assert deepen_accept_queues([Instance()], 1024) == 1
            assert backlog(port) == 1024
        finally:
            server.close()

    asyncio.run(scenario())


# -- the ClientHello buffer ------------------------------------------------------------------

def _drive(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def test_an_endless_clienthello_is_cut_at_the_cap(capped):
    from mitmproxy.addons import next_layer
    from mitmproxy.proxy.layers import tls as tls_layers

    from addons.limits import LimitedClientTLSLayer
    from gateway.limits import LIMIT_CLIENTHELLO, MAX_CLIENTHELLO_BYTES

    assert next_layer.ClientTLSLayer is LimitedClientTLSLayer          # what the transparent mode builds
    context = Context(tflow.tclient_conn(), options.Options())
    context.layers = [object()]
    layer = LimitedClientTLSLayer(context)
    # A handshake message that says it is 1 MiB long, sent in full-size TLS records.
    body = b"\x01" + (1 << 20).to_bytes(3, "big") + b"h" * (16384 - 4)
    first = b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body
    more = b"\x16\x03\x01" + (16384).to_bytes(2, "big") + b"h" * 16384
    assert _drive(layer.receive_handshake_data(first)) == (False, None)   # incomplete: wait for more
    results = []
    for _ in range(10):
        results.append(_drive(layer.receive_handshake_data(more)))
        if results[-1][1] is not None:
            break
    done, error = results[-1]
    assert done is False and "ClientHello" in error
    assert all(r == (False, None) for r in results[:-1])
    received = len(first) + len(more) * len(results)
    assert received - len(more) <= MAX_CLIENTHELLO_BYTES < received      # cut by the first read past the cap
    assert capped == [(LIMIT_CLIENTHELLO, received)]
    assert len(layer.recv_buffer) == 0
    install_header_limits(None)
    assert next_layer.ClientTLSLayer is tls_layers.ClientTLSLayer
