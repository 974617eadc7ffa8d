"""Issue #15 (enrollment under load) and #18 (fail closed on the auth log), over real TLS on
loopback. Loopback has a whole /8, so a client socket bound to 127.0.0.2 is a second source
address: idle connections from it must not starve enrollments from 127.0.0.1.

- connection slots are shared out per source address at accept, before TLS: the source over
  its share is reset at once and counted; the others keep enrolling;
- a connection that does not finish the TLS handshake / send its request in time is closed
  and counted, and its slot is free again;
- a successful enrollment whose auth record cannot be written is refused with 503 and
  nothing is written (a log store that raises, and a real LogStore on a failing disk)."""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import socket
import ssl
import time

import pytest
from cryptography.hazmat.primitives import serialization
from wireguard_tools import WireguardKey

from gateway.config import load_config_text
from gateway.devices.ca import CaStore, build_org_ca, init_ca, pki_dir
from gateway.enroll.server import EnrollmentServer
from gateway.logstore.writer import LogStore
from gateway.metrics import GatewayMetrics
from gateway.registry.model import RegistryError
from gateway.registry.sqlite import SqliteRegistry
from gateway.yamlsource import SourceErrors
from tests.unit.test_enroll_server import CONFIG, DAY, Env, ListLog, new_key

ATTACKER = "127.0.0.2"


def start(tmp_path, logs=None, metrics=None, **server_kw) -> Env:
    state = tmp_path / "state"
    state.mkdir()
    cfg = load_config_text(CONFIG.format(state=state, rate=100000, burst=100000))
    ca = init_ca(pki_dir(state), "関門テスト市", now=dt.datetime.now(dt.UTC) - 30 * DAY)
    registry = SqliteRegistry(cfg.registry_path)
    logs = logs if logs is not None else ListLog()
    gw_key = str(WireguardKey.generate().public_key())
    inter_ca = build_org_ca("Interception", now=dt.datetime.now(dt.UTC)).cert.public_bytes(serialization.Encoding.PEM)
    server = EnrollmentServer(cfg, registry, logs, gw_key, inter_ca, port=0, metrics=metrics, **server_kw)
    server.start()
    return Env(tmp_path, cfg, ca, registry, logs, server, gw_key, inter_ca.decode())


@pytest.fixture
def envs():
    started: list[Env] = []
    yield started
    for env in started:
        env.server.stop()
        env.registry.close()


def idle_connection(env: Env, source: str = ATTACKER) -> socket.socket:
    """A TCP connection that sends nothing (no ClientHello)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(env.server.address)
    return sock


def closed_by_server(sock: socket.socket) -> str:
    """'reset' or 'closed' once the server ended the connection (recv blocks until then)."""
    try:
        return "closed" if sock.recv(1) == b"" else "data"
    except ConnectionResetError:
        return "reset"


def refused_at_once(env: Env, source: str) -> str:
    """Connect from `source` and see how the server ends it (the reset may even beat connect())."""
    try:
        sock = idle_connection(env, source)
    except ConnectionResetError:
        return "reset"
    with sock:
        return closed_by_server(sock)


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def enroll(env: Env, device_id: str) -> tuple[int, dict]:
    key = new_key()
    if env.registry.get(device_id) is None:
        env.register(device_id)
    _, ident = env.issue(device_id, key)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    return status, body


# ------------------------------------------------------------------ slots per source

def test_config_defaults_are_the_documented_ones(tmp_path, envs):
    envs.append(env := start(tmp_path))
    assert (env.server.handshake_timeout, env.server.request_timeout) == (5.0, 10.0)
    assert (env.server.slots.total, env.server.slots.per_source) == (128, 4)
    cfg = load_config_text(CONFIG.format(state=tmp_path, rate=1, burst=1).replace(
        "burst: 1}", "burst: 1, handshake_timeout: 2.5, request_timeout: 7, max_connections: 64, "
                    "max_connections_per_source: 2}"))
    assert (cfg.enrollment_handshake_timeout, cfg.enrollment_request_timeout) == (2.5, 7.0)
    assert (cfg.enrollment_max_connections, cfg.enrollment_max_connections_per_source) == (64, 2)
    for bad in ("handshake_timeout: 0", "request_timeout: -1", "max_connections: 0", "max_connections_per_source: 0",
                "handshake_timeout: 600"):
        with pytest.raises(SourceErrors) as exc:
            load_config_text(CONFIG.format(state=tmp_path, rate=1, burst=1).replace("burst: 1}", f"burst: 1, {bad}}}"))
        assert bad.split(":")[0] in str(exc.value.errors[0]), exc.value.errors


def test_idle_connections_from_one_address_do_not_starve_another(tmp_path, envs):
    metrics = GatewayMetrics()
    envs.append(env := start(tmp_path, metrics=metrics, handshake_timeout=60, max_connections=32,
                             max_connections_per_source=4))
    idle = [idle_connection(env) for _ in range(4)]
    wait_for(lambda: env.server.slots.held(ATTACKER) == 4, 10, "the four idle connections to hold their slots")
    # Over its share: refused at accept, before any TLS, whatever the attacker does next.
    assert {refused_at_once(env, ATTACKER) for _ in range(40)} <= {"reset", "closed"}
    assert env.server.slots.held(ATTACKER) == 4 and env.server.slots.held() == 4
    assert env.server.dropped.counts["source-limit"] == 40
    assert metrics.registry.get_sample_value("kanmon_enrollment_connections_dropped_total",
                                             {"reason": "source-limit"}) == 40
    # Another address enrolls; before the fix (32 shared slots, 40 idle connections) it could not.
    results = [enroll(env, f"dev-{i}") for i in range(5)]
    assert [status for status, _ in results] == [200] * 5, results
    for s in idle:
        s.close()
    wait_for(lambda: env.server.slots.held() == 0, 10, "the slots to be given back")


def test_all_slots_busy_is_refused_and_counted_too(tmp_path, envs):
    envs.append(env := start(tmp_path, handshake_timeout=60, max_connections=3, max_connections_per_source=2))
    held = [idle_connection(env, "127.0.0.2"), idle_connection(env, "127.0.0.2"), idle_connection(env, "127.0.0.3")]
    wait_for(lambda: env.server.slots.held() == 3, 10, "three slots held")
    assert refused_at_once(env, "127.0.0.4") in ("reset", "closed")
    assert env.server.dropped.counts == {"slots-full": 1}
    for s in held:
        s.close()
    wait_for(lambda: env.server.slots.held() == 0, 10, "the slots to be given back")
    assert enroll(env, "dev-1")[0] == 200


# ------------------------------------------------------------------ deadlines

def test_a_connection_that_never_starts_tls_is_closed_after_the_handshake_timeout(tmp_path, envs):
    metrics = GatewayMetrics()
    envs.append(env := start(tmp_path, metrics=metrics, handshake_timeout=0.5, request_timeout=30))
    sock = idle_connection(env)
    began = time.monotonic()
    assert closed_by_server(sock) in ("reset", "closed")
    took = time.monotonic() - began
    sock.close()
    assert 0.3 < took < 5, took        # 0.5 s configured; generous upper bound (shared machine)
    wait_for(lambda: env.server.slots.held() == 0, 10, "the slot to be given back")
    assert metrics.registry.get_sample_value("kanmon_enrollment_connections_dropped_total",
                                             {"reason": "handshake-timeout"}) == 1


def test_a_connection_that_sends_no_request_is_closed_after_the_request_timeout(tmp_path, envs):
    envs.append(env := start(tmp_path, handshake_timeout=30, request_timeout=0.5))
    ctx = ssl.create_default_context(cafile=str(CaStore(pki_dir(env.cfg.state_dir)).cert_path))
    ctx.check_hostname = False
    raw = idle_connection(env)
    with ctx.wrap_socket(raw) as tls:          # handshake done, then silence
        began = time.monotonic()
        try:
            assert tls.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
        took = time.monotonic() - began
    assert 0.3 < took < 5, took
    wait_for(lambda: env.server.dropped.counts.get("request-timeout") == 1, 10, "the timeout to be counted")
    wait_for(lambda: env.server.slots.held() == 0, 10, "the slot to be given back")
    assert env.logs.auth() == [], "no request, so no attempt to log"


def test_failed_handshakes_are_counted_and_logged_once_a_minute(tmp_path, envs, caplog):
    metrics = GatewayMetrics()
    envs.append(env := start(tmp_path, metrics=metrics))
    with caplog.at_level(logging.INFO, logger="kanmon.enroll"):
        for _ in range(20):
            with idle_connection(env) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")       # not a ClientHello
                closed_by_server(sock)
        wait_for(lambda: env.server.dropped.counts.get("tls-error") == 20, 10, "20 failed handshakes counted")
    assert metrics.registry.get_sample_value("kanmon_enrollment_connections_dropped_total",
                                             {"reason": "tls-error"}) == 20
    lines = [r.getMessage() for r in caplog.records if "tls-error" in r.getMessage()]
    assert len(lines) == 1 and ATTACKER in lines[0], lines
    assert enroll(env, "dev-1")[0] == 200


# ------------------------------------------------------------------ fail closed on the auth log

class FailingLog(ListLog):
    """An auth log on a full disk: every append raises."""

    def append(self, stream, record):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_enrollment_is_refused_when_its_auth_record_cannot_be_written(tmp_path, envs):
    metrics = GatewayMetrics()
    envs.append(env := start(tmp_path, logs=FailingLog(), metrics=metrics))
    env.register("dev-1")
    status, body = enroll(env, "dev-1")
    assert status == 503, body
    assert body["error"] == "auth-log-unavailable"
    assert "認証ログ" in body["message"]["ja"] and "authentication log" in body["message"]["en"]
    assert "detail" not in body, "no internals in a 5xx answer"
    assert env.registry.get("dev-1").wg_public_key is None, "nothing written without its auth record"
    assert env.registry.unshipped_audit() == []
    assert metrics.registry.get_sample_value("kanmon_fail_closed_blocks_total",
                                             {"stage": "enrollment", "reason": "auth-log-unavailable"}) == 1
    # A refusal stays the refusal it is (403), unlogged but not turned into a success.
    status, body, _ = env.request({"wg_public_key": new_key()})
    assert (status, body["error"]) == (403, "no-certificate")


def test_a_real_log_store_on_a_failing_disk_refuses_and_counts(tmp_path, envs):
    metrics = GatewayMetrics()
    failing = {"on": False}

    def opener(path):
        if failing["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, "ab", buffering=0)

    store = LogStore(tmp_path / "logs", opener=opener,
                     on_write_error=lambda stream, _exc: metrics.log_write_errors.labels(stream).inc())
    envs.append(env := start(tmp_path, logs=store, metrics=metrics))
    failing["on"] = True
    status, body = enroll(env, "dev-1")
    assert (status, body["error"]) == (503, "auth-log-unavailable")
    assert env.registry.get("dev-1").wg_public_key is None
    assert metrics.registry.get_sample_value("kanmon_log_write_errors_total", {"stream": "auth"}) == 1
    assert metrics.registry.get_sample_value("kanmon_fail_closed_blocks_total",
                                             {"stage": "enrollment", "reason": "auth-log-unavailable"}) == 1
    failing["on"] = False          # the disk has room again: the same device enrolls, and it is logged
    status, body = enroll(env, "dev-1")
    assert status == 200, body
    lines = [json.loads(line) for p in (tmp_path / "logs" / "auth").glob("*.jsonl")
             for line in p.read_text().splitlines()]
    outcomes = [(r["event.outcome"], r["device.id"]) for r in lines if r.get("event.action") == "enrollment"]
    assert outcomes == [("success", "dev-1")]


def test_a_registry_failure_after_the_success_record_is_logged_as_a_refusal(tmp_path, envs, monkeypatch):
    envs.append(env := start(tmp_path))
    env.register("dev-1")

    def update(*_args, **_kw):
        raise RegistryError("key already registered")

    monkeypatch.setattr(env.registry, "update", update)
    status, body = enroll(env, "dev-1")
    assert (status, body["error"]) == (409, "key-in-use")
    assert [(r["event.outcome"], r["kanmon.auth.reason"]) for r in env.logs.auth()] == \
        [("success", "ok"), ("failure", "key-in-use")]
