"""Issue #2 "Must show": the running gateway's data path, driven from real WireGuard devices."""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from gateway.lab.topology import SPARE4, UPLINK_GW4, UPLINK_GW6, WEB4, WEB6, Lab

pytestmark = pytest.mark.e2e


def http_code(result) -> str:
    return result.stdout.rsplit("HTTP_CODE=", 1)[-1].strip()


def requests_for(lab: Lab, marker: str) -> list[dict]:
    return [r for r in lab.nginx_requests() if marker in r["uri"] or marker in r["host"]]


def udp_listener(lab: Lab, address: str, port: int, seconds: float):
    """Start a UDP listener in the internet namespace; returns a function giving what it received."""
    code = textwrap.dedent(f"""
        import socket, time, json
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(({address!r}, {port}))
        s.settimeout(0.2)
        got, end = [], time.time() + {seconds}
        print("ready", flush=True)
        while time.time() < end:
            try:
                data, peer = s.recvfrom(2048)
                got.append([peer[0], data.decode(errors="replace")])
            except socket.timeout:
                pass
        print(json.dumps(got), flush=True)
    """)
    import subprocess
    import sys
    proc = subprocess.Popen(lab.inet.cmd(sys.executable, "-c", code), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return lambda: json.loads(proc.communicate(timeout=seconds + 10)[0].strip().splitlines()[-1])


def test_device_fetches_http_and_https_through_the_tunnel(lab: Lab):
    dev = lab.devices[0]
    for scheme in ("http", "https"):
        marker = f"/fetch-{scheme}-{time.monotonic_ns()}"
        result = dev.curl(f"{scheme}://www.example.test{marker}")
        assert http_code(result) == "200", result.stderr
        assert f"hello from www.example.test via {scheme}" in result.stdout
        seen = requests_for(lab, marker)
        assert len(seen) == 1, "the server must see exactly one request"
        # It arrives from the gateway's uplink: it went through the tunnel and the proxy.
        assert seen[0]["remote"] == UPLINK_GW4
        records = [r for r in lab.log_records("proxy") if marker in (r.get("url.full") or "")]
        assert len(records) == 1
        assert records[0]["source.ip"] == dev.ipv4
        assert records[0]["device.id"] == dev.device_id
        assert records[0]["kanmon.verdict"] == "allow"


@pytest.mark.parametrize("url", ["http://blocked.test/page-{n}", "https://www.blocked.test/page-{n}"])
def test_blocked_request_gets_block_page_and_never_reaches_server(lab: Lab, url: str):
    marker = str(time.monotonic_ns())
    result = lab.devices[0].curl(url.format(n=marker), "-i")
    assert http_code(result) == "403", result.stderr
    assert "x-kanmon-rule: lab-block-blocked-test" in result.stdout.lower()
    assert "組織のセキュリティポリシー" in result.stdout and "security policy" in result.stdout
    assert requests_for(lab, marker) == []
    records = [r for r in lab.log_records("proxy") if marker in (r.get("url.full") or "")]
    assert records and records[0]["kanmon.verdict"] == "block"
    assert records[0]["rule.id"] == "lab-block-blocked-test"


def test_quic_is_refused_and_other_udp_dropped(lab: Lab):
    received = udp_listener(lab, SPARE4, 443, seconds=6)
    received_other = udp_listener(lab, SPARE4, 5000, seconds=6)
    probe = textwrap.dedent(f"""
        import socket, json
        out = {{}}
        for port in (443, 5000):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.connect(({SPARE4!r}, port))
            try:
                s.send(b"quic-initial-probe" if port == 443 else b"other-udp-probe")
                s.recv(100)
                out[port] = "answered"
            except ConnectionRefusedError:
                out[port] = "refused"
            except socket.timeout:
                out[port] = "timeout"
        print(json.dumps(out))
    """)
    outcome = json.loads(lab.devices[0].ns.python(probe).stdout)
    assert outcome == {"443": "refused", "5000": "timeout"}
    assert received() == [] and received_other() == []


def test_dns_to_any_resolver_is_answered_by_the_gateway(lab: Lab):
    name = f"q{time.monotonic_ns()}.example.test"
    query = textwrap.dedent(f"""
        from dnslib import DNSRecord
        for server in ("192.0.2.99", "10.77.0.1"):
            reply = DNSRecord.parse(DNSRecord.question({name!r}).send(server, 53, timeout=5))
            print(server, [str(r.rdata) for r in reply.rr])
    """)
    out = lab.devices[0].ns.python(query).stdout.splitlines()
    assert out == [f"192.0.2.99 ['{WEB4}']", f"10.77.0.1 ['{WEB4}']"]
    # The internet's DNS server only ever heard from the gateway, never from the device.
    asked = [q for q in lab.dns_queries() if q["name"] == name]
    assert asked and all(q["client"] == UPLINK_GW4 for q in asked)
    logged = [r for r in lab.log_records("dns") if r.get("dns.question.name") == name]
    assert logged and all(r["device.id"] == lab.devices[0].device_id for r in logged)


def test_ipv6_goes_through_the_proxy_too(lab: Lab):
    dev = lab.devices[0]
    marker = f"/v6-{time.monotonic_ns()}"
    result = dev.curl(f"http://[{WEB6}]{marker}", "-H", "Host: v6.example.test")
    assert http_code(result) == "200", result.stderr
    seen = requests_for(lab, marker)
    assert len(seen) == 1 and seen[0]["remote"] == UPLINK_GW6
    records = [r for r in lab.log_records("proxy") if marker in (r.get("url.full") or "")]
    assert records and records[0]["source.ip"] == dev.ipv6
    # ... and is filtered like IPv4: a blocked host over IPv6 gets the block page.
    blocked = dev.curl(f"http://[{WEB6}]/v6-blocked-{marker}", "-H", "Host: blocked.test")
    assert http_code(blocked) == "403"
    assert requests_for(lab, f"v6-blocked-{marker}") == []


def test_unregistered_key_gets_no_handshake_and_no_traffic(lab: Lab):
    stranger = lab.add_device(9, register=False, device_id="stranger")
    marker = f"/stranger-{time.monotonic_ns()}"
    result = stranger.curl(f"http://{WEB4}{marker}", timeout=5)
    assert http_code(result) == "000"
    handshakes = stranger.ns.run("wg", "show", stranger.wg_interface, "latest-handshakes").stdout.split()
    assert handshakes[-1] == "0", "the gateway must never complete a handshake with an unknown key"
    assert requests_for(lab, marker) == []


def test_device_cannot_reach_another_device(lab: Lab):
    a, b = lab.devices[0], lab.devices[1]
    listener = textwrap.dedent(f"""
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(({b.ipv4!r}, 8000)); s.listen(); s.settimeout(8)
        print("ready", flush=True)
        try:
            c, peer = s.accept(); print("accepted", peer[0])
        except socket.timeout:
            print("nothing")
    """)
    import subprocess
    import sys
    proc = subprocess.Popen(b.ns.cmd(sys.executable, "-c", listener), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    result = a.curl(f"http://{b.ipv4}:8000/", timeout=4)
    ping = a.ns.run("ping", "-c", "1", "-W", "2", b.ipv4, check=False)
    assert http_code(result) != "200"
    assert ping.returncode != 0
    assert proc.communicate(timeout=15)[0].strip().splitlines()[-1] == "nothing"
    # The gateway itself answers ping on its tunnel address (the device's tunnel is up).
    assert a.ns.run("ping", "-c", "1", "-W", "2", "10.77.0.1", check=False).returncode == 0


def test_addon_exception_blocks_the_request_and_is_counted(lab: Lab):
    before = lab.metric_value("kanmon_addon_errors_total", addon="test-explode")
    marker = f"/explode-{time.monotonic_ns()}"
    result = lab.devices[0].curl(f"http://www.example.test{marker}", "-i")
    assert http_code(result) == "503"   # the gateway's fault page (issue #19), not a policy block
    assert "x-kanmon-rule: kanmon:fail-closed" in result.stdout.lower()
    assert requests_for(lab, marker) == [], "a request whose addon failed must not reach the server"
    assert lab.metric_value("kanmon_addon_errors_total", addon="test-explode") == before + 1
    # Other requests on the gateway are unaffected.
    assert http_code(lab.devices[0].curl("http://www.example.test/still-fine")) == "200"


def test_gateway_refuses_connections_to_its_own_services(lab: Lab):
    # TCP to the gateway's tunnel address (e.g. an SSH or management port) is proxied, and
    # the proxy refuses destinations inside the gateway.
    result = lab.devices[0].curl("http://10.77.0.1:9180/metrics", timeout=5)
    assert http_code(result) in ("403", "000")
    assert "kanmon_decisions_total" not in result.stdout


def test_dns_still_answered_after_idle_pause_on_the_same_source_port(lab: Lab):
    """mitmproxy_rs drops a UDP client forever once its stream idled out (20 s); Kanmon's DNS
    listener (gateway/proxy/dnslistener.py) must keep answering a resolver that reuses its port."""
    probe = textwrap.dedent("""
        import socket, time
        from dnslib import DNSRecord
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 45555)); s.settimeout(3)
        for pause in (0, 23):
            time.sleep(pause)
            s.sendto(DNSRecord.question("www.example.test").pack(), ("10.77.0.1", 53))
            try:
                print(pause, [str(r.rdata) for r in DNSRecord.parse(s.recvfrom(4096)[0]).rr], flush=True)
            except socket.timeout:
                print(pause, "timeout", flush=True)
    """)
    out = lab.devices[1].ns.python(probe, timeout=60).stdout.splitlines()
    assert out == [f"0 ['{WEB4}']", f"23 ['{WEB4}']"]


def test_the_lab_gateway_runs_the_production_chain(lab: Lab, tmp_path):
    """Issue #16: the lab starts the real `kanmon run`; the chain its gateway logged is the one
    addons/chain.py builds from the lab's own configuration (the order tests/unit/test_chain.py
    checks), not a chain assembled by a test."""
    import re

    from addons.chain import build_chain, chain_names
    from gateway.config import load_config
    from tests.unit.test_chain import PRODUCTION_ORDER, chain_parts

    logged = re.findall(r"addon chain: (.*)", lab.gateway.log_text())
    assert logged, "the gateway did not log its addon chain"
    cfg = load_config(lab.config_path)
    expected = chain_names(build_chain(chain_parts(cfg, tmp_path)))
    assert logged[-1].split(", ") == expected
    extras = {spec.partition(":")[2] for spec in cfg.extra_addons}   # the lab's exploding addon
    assert [name for name in expected if name not in extras] == PRODUCTION_ORDER
