"""Issue 7 "Faults": each fault has a defined outcome that fails closed and tells the operator.

Real lab (gateway/lab/topology.py): devices behind wireguard-go, the gateway, a fake
internet. What "reached the internet" is read at the far end (nginx's access log, the lab
DNS server's query log, a SYN counter in the internet namespace).

Covered elsewhere: ClamAV down (tests/unit/test_mail_clamd.py::test_stopped_clamd_fails_closed
and test_mail_checks.py::test_scanner_unavailable_follows_policy: mail is quarantined);
log disk full (another engineer's test); kill -9 with a running download
(test_gateway_lifecycle.py) — extended here with concurrent load from several devices.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.lab.topology import Lab, wait_until
from gateway.registry.model import AuditEntry
from gateway.registry.sqlite import SqliteRegistry
from tests.e2e.test_gateway_lifecycle import http_code, syn_count, watch_syns

pytestmark = pytest.mark.e2e
POLICIES = Path(__file__).resolve().parent / "policies"


def dns_ask(lab: Lab, name: str, *, device: int = 0, timeout: float = 8) -> dict:
    """One A query from a device to the gateway's resolver: rcode (or TIMEOUT) and seconds."""
    code = textwrap.dedent(f"""
        import json, socket, time
        from dnslib import DNSRecord, RCODE
        start = time.monotonic()
        try:
            raw = DNSRecord.question({name!r}, "A").send("10.77.0.1", 53, timeout={timeout})
            reply = DNSRecord.parse(raw)
            out = {{"rcode": RCODE[reply.header.rcode], "answers": [str(r.rdata) for r in reply.rr]}}
        except socket.timeout:
            out = {{"rcode": "TIMEOUT", "answers": []}}
        out["seconds"] = time.monotonic() - start
        print(json.dumps(out))
    """)
    return json.loads(lab.devices[device].ns.python(code, timeout=timeout + 20).stdout)


def names_asked(lab: Lab) -> list[str]:
    return [q.get("name", q.get("qname", "")).rstrip(".") for q in lab.dns_queries()]


def gateway_alive(lab: Lab) -> bool:
    return lab.gateway is not None and lab.gateway.proc.poll() is None and "kanmon_" in lab.metrics_text()


def lab_dns_process(lab: Lab) -> subprocess.Popen:
    return next(p for p in lab.server_procs if "gateway.lab.dnsserver" in " ".join(map(str, p.args)))


# -- (a) upstream DNS down ------------------------------------------------------------------

def test_upstream_dns_down_fails_quickly_nothing_bypasses_and_recovers(make_lab):
    lab = make_lab(n_devices=1)
    dev = lab.devices[0]
    assert dns_ask(lab, "www.example.test")["rcode"] == "NOERROR"
    dns_proc = lab_dns_process(lab)
    os.killpg(dns_proc.pid, signal.SIGTERM)
    dns_proc.wait(timeout=10)
    lab.server_procs.remove(dns_proc)
    watch_syns(lab)
    before = syn_count(lab)

    answer = dns_ask(lab, "down-1.example.test", timeout=20)
    assert answer["rcode"] == "SERVFAIL" and not answer["answers"], answer
    # gateway/proxy/master.py UPSTREAM_DNS_TIMEOUT (3 s); before it, mitmproxy took ~15 s.
    assert answer["seconds"] < 5, f"the device waits {answer['seconds']:.1f} s for an answer"
    # A name needs the resolver: the browse fails on the device, nothing reaches the web server.
    assert http_code(dev.curl("http://down-2.example.test/while-dns-down", timeout=10)) == "000"
    assert syn_count(lab) == before
    assert not [r for r in lab.nginx_requests() if "while-dns-down" in r["uri"]]
    # Other resolvers are no way around it: port 53 to any address goes to the gateway's resolver.
    code = textwrap.dedent("""
        import socket
        from dnslib import DNSRecord, RCODE
        try:
            raw = DNSRecord.question("direct-1.example.test", "A").send("198.51.100.53", 53, timeout=6)
            print(RCODE[DNSRecord.parse(raw).header.rcode])
        except socket.timeout:
            print("TIMEOUT")
    """)
    direct = dev.ns.python(code, timeout=30).stdout.strip()
    assert direct in ("SERVFAIL", "TIMEOUT"), f"a query to another resolver address was answered: {direct}"
    assert gateway_alive(lab), "the gateway keeps running without its upstream resolver"
    assert "upstream DNS did not answer" in lab.gateway.log_text(), "the operator is told"

    lab._start_dns()  # the same server again (lab helper), query log appended
    wait_until(lambda: dns_ask(lab, "www.example.test", timeout=3)["rcode"] == "NOERROR", 20,
               "DNS to work again after the upstream resolver returned")
    assert http_code(dev.curl("http://www.example.test/after-dns-back")) == "200"


def test_hostile_dns_packets_kill_nothing(make_lab):
    """Queries mitmproxy cannot decode or re-encode (found by tests/fuzz/test_dns_path.py):
    an 'xn--' label, a label containing a dot, a truncated header. Nothing is forwarded for
    them and the resolver keeps answering everyone."""
    lab = make_lab(n_devices=2)
    packets = [
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04xn--\x04test\x00\x00\x01\x00\x01",
        b"\x12\x35\x01\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x01\x01.\x00\x00\x01\x00\x01",
        b"\x12\x36\x01",
    ]
    code = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2)
        for p in {packets!r}:
            s.sendto(p, ("10.77.0.1", 53))
            try:
                s.recvfrom(4096)
            except socket.timeout:
                pass
    """)
    lab.devices[0].ns.python(code, timeout=30)
    assert not [n for n in names_asked(lab) if n.startswith("xn--")], "an undecodable name was forwarded"
    assert gateway_alive(lab)
    for i in (0, 1):
        assert dns_ask(lab, "www.example.test", device=i)["rcode"] == "NOERROR"


# -- (d) policy file corrupted before restart ----------------------------------------------

def test_corrupted_policy_refuses_to_start_with_file_line_and_traffic_stays_refused(make_lab, tmp_path):
    policy_dir = tmp_path / "policies"
    shutil.copytree(POLICIES, policy_dir)
    policy = policy_dir / "lab.yaml"
    lab = make_lab(n_devices=1, overrides={"policy": {"path": str(policy)}})
    dev = lab.devices[0]
    assert http_code(dev.curl("http://www.example.test/before")) == "200"

    lab.stop_gateway(signal.SIGKILL)  # crash, then an operator's bad edit before the restart
    text = policy.read_text().splitlines()
    bad_line = next(i for i, line in enumerate(text) if "block-tracker" in line)
    text[bad_line] = text[bad_line].replace("action: block", "action: blok")
    text.insert(3, "  no_sni: \x07")
    policy.write_text("\n".join(text) + "\n")
    watch_syns(lab)
    before = syn_count(lab)

    result = lab.kanmon("run", "--config", str(lab.config_path), check=False, ns=lab.gw, timeout=90)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{policy}:4:" in result.stderr, result.stderr[-2000:]  # the control character's line
    for i in range(3):
        assert http_code(dev.curl(f"http://www.example.test/while-policy-broken-{i}", timeout=3)) == "000"
    assert syn_count(lab) == before, "nothing reaches the internet while the gateway is down"
    assert not [r for r in lab.nginx_requests() if "while-policy-broken" in r["uri"]]

    shutil.copy(POLICIES / "lab.yaml", policy)  # the operator fixes it; systemd restarts
    lab.start_gateway()
    lab.wait_for_peer(dev)
    assert http_code(dev.curl("http://www.example.test/after-fix")) == "200"
    assert http_code(dev.curl("http://tracker.test/after-fix")) != "200"


# -- (e) registry locked / corrupted -------------------------------------------------------

def test_locked_registry_keeps_enforcing_refuses_changes_clearly_and_recovers(make_lab):
    """Another process holds the registry's write lock (a backup tool, a stuck sqlite3
    shell). The registry runs in WAL mode, so the gateway's reads are never blocked: it
    keeps enforcing and reconciling (no error to count). An exclusive lock that would block
    readers too cannot be taken while the gateway holds the database open (SQLite refuses:
    'database is locked'), which the first step checks. Writers — the operator's CLI — wait
    the busy timeout (10 s) and then fail with a clear message, changing nothing."""
    lab = make_lab(n_devices=2)
    a, b = lab.devices
    registry_path = lab.state_dir / "registry.sqlite3"
    exclusive = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3
        db = sqlite3.connect({str(registry_path)!r}, isolation_level=None, timeout=2)
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("BEGIN EXCLUSIVE")
    """)], capture_output=True, text=True, timeout=60)
    assert exclusive.returncode != 0 and "database is locked" in exclusive.stderr
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sqlite3, sys
        db = sqlite3.connect({str(registry_path)!r}, isolation_level=None, timeout=30)
        db.execute("BEGIN EXCLUSIVE")   # in WAL mode: the write lock
        print("locked", flush=True)
        sys.stdin.readline()            # hold it until the test says so
        db.execute("ROLLBACK")
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        errors_before = lab.metric_value("kanmon_reconcile_errors_total")
        revoke = lab.kanmon("device", "revoke", "--config", str(lab.config_path), b.device_id, "--reason", "lost",
                            check=False, timeout=60)
        assert revoke.returncode != 0, "a change was reported as done while the registry was locked"
        assert "Traceback" not in revoke.stderr, revoke.stderr[-2000:]
        assert "lock" in revoke.stderr.lower(), revoke.stderr[-2000:]
        for dev in (a, b):  # the last known state is enforced: both browse, blocks still block
            assert http_code(dev.curl("http://www.example.test/while-locked")) == "200"
            assert http_code(dev.curl("http://blocked.test/while-locked")) == "403"
        assert gateway_alive(lab)
        assert lab.metric_value("kanmon_reconcile_errors_total") == errors_before
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    assert SqliteRegistry(registry_path).get(b.device_id).status.value == "active", "nothing half-applied"
    lab.kanmon("device", "revoke", "--config", str(lab.config_path), b.device_id, "--reason", "lost")
    wait_until(lambda: http_code(b.curl("http://www.example.test/after-revoke", timeout=2)) == "000", 30,
               "the revocation to apply after the lock was released")
    assert http_code(a.curl("http://www.example.test/after-unlock")) == "200"


def test_corrupted_registry_keeps_last_state_and_restart_refuses(make_lab):
    lab = make_lab(n_devices=1)
    dev = lab.devices[0]
    registry_path = lab.state_dir / "registry.sqlite3"
    errors_before = lab.metric_value("kanmon_reconcile_errors_total")
    size = registry_path.stat().st_size
    with open(registry_path, "r+b") as f:  # garbage over the whole file, header included
        f.write(os.urandom(max(size, 8192)))
    for extra in (registry_path.with_name("registry.sqlite3-wal"), registry_path.with_name("registry.sqlite3-shm")):
        if extra.exists():
            extra.write_bytes(os.urandom(extra.stat().st_size or 4096))
    os.kill(lab.gateway.proc.pid, signal.SIGUSR1)  # ask for a reconcile now (kanmon's own signal)
    wait_until(lambda: lab.metric_value("kanmon_reconcile_errors_total") > errors_before, 40,
               "a reconcile error to be counted for the corrupted registry")
    assert http_code(dev.curl("http://www.example.test/while-corrupt")) == "200", "last known state is enforced"
    assert http_code(dev.curl("http://blocked.test/while-corrupt")) == "403"
    assert gateway_alive(lab)

    assert lab.stop_gateway(signal.SIGTERM) == 0
    result = lab.kanmon("run", "--config", str(lab.config_path), check=False, ns=lab.gw, timeout=90)
    assert result.returncode == 2
    # It refuses, removes what it set up and names the cause and the remedy, in both languages.
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"The device registry {lab.state_dir / 'registry.sqlite3'} is unreadable" in result.stderr
    assert "バックアップから復元してください" in result.stderr and "file is not a database" in result.stderr
    assert "tunnel" in result.stderr and "removed" in result.stderr, result.stderr[-3000:]
    assert http_code(dev.curl("http://www.example.test/after-refused-start", timeout=3)) == "000"


# -- (f) validity periods follow the wall clock --------------------------------------------

def test_usage_period_end_cuts_the_device_at_that_time(make_lab):
    lab = make_lab(n_devices=2)
    short, other = lab.devices
    registry = SqliteRegistry(lab.state_dir / "registry.sqlite3")
    until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)
    rec = registry.get(short.device_id)
    registry.update(replace(rec, valid_until=until), audit=AuditEntry("test", "device-updated", "usage period ends soon"))
    registry.close() if hasattr(registry, "close") else None
    assert http_code(short.curl("http://www.example.test/inside-period")) == "200"
    wait_until(lambda: dt.datetime.now(dt.UTC) >= until, 15, "the end of the usage period")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and http_code(short.curl("http://www.example.test/probe", timeout=1)) != "000":
        time.sleep(0.2)
    cut_after = time.monotonic() - (deadline - 5)
    assert http_code(short.curl("http://www.example.test/after-period", timeout=3)) == "000"
    assert cut_after < 5, "the device is cut within seconds of its period's end, without any operator action"
    assert not [r for r in lab.nginx_requests() if "after-period" in r["uri"]]
    assert http_code(other.curl("http://www.example.test/other-unaffected")) == "200"
    peers = lab.gw.run("wg", "show", lab.wg_interface, "allowed-ips").stdout
    assert short.public_key not in peers and other.public_key in peers


# -- (g) kill -9 under concurrent load -----------------------------------------------------

def test_kill9_under_concurrent_load_nothing_passes_and_all_resume(make_lab):
    lab = make_lab(n_devices=3)
    stop = threading.Event()
    outcomes: list[tuple[float, float, str]] = []  # (started, ended, HTTP code)

    def load(dev) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.monotonic()
            code = http_code(dev.curl(f"http://www.example.test/load-{dev.index}-{n}", timeout=2))
            outcomes.append((started, time.monotonic(), code))
            # At most ~20 new connections a second per device: while the gateway is down every
            # attempt is refused at once, and an unpaced loop then opens connections faster
            # than the per-device rate limit (issue #14) allows, so it would go on measuring
            # the limit after the restart instead of the restart.
            time.sleep(max(0.0, 0.05 - (time.monotonic() - started)))

    workers = [threading.Thread(target=load, args=(d,), daemon=True) for d in lab.devices]
    for w in workers:
        w.start()
    time.sleep(2)
    watch_syns(lab)
    lab.stop_gateway(signal.SIGKILL)
    killed_at = time.monotonic()
    time.sleep(1.0)  # requests already in flight have ended by now
    before = syn_count(lab)
    seen_before = len(lab.nginx_requests())
    time.sleep(4)
    assert syn_count(lab) == before, "a new connection reached the internet while the gateway was down"
    assert len(lab.nginx_requests()) == seen_before
    # "While down" ends when the restart begins: the gateway serves as soon as start_gateway
    # returns, before every device's peer has been seen again below, so a request that ends
    # between those two moments may rightly get a 200.
    restart_began = time.monotonic()
    lab.start_gateway()
    for dev in lab.devices:
        lab.wait_for_peer(dev)
    restarted_at = time.monotonic()
    time.sleep(3)
    stop.set()
    for w in workers:
        w.join(timeout=30)
    during = [c for t0, t1, c in outcomes if t0 > killed_at and t1 < restart_began]
    after = [c for t0, t1, c in outcomes if t0 > restarted_at]
    assert during and set(during) == {"000"}, f"while down: {sorted(set(during))}"
    assert after and all(c == "200" for c in after), f"after restart: {sorted(set(after))}"
    assert len(after) >= len(lab.devices), "the devices browse again after the restart (no re-enrollment)"
