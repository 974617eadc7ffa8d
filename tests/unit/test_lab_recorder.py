"""The bypass corpus's recording upstream (gateway/lab/recorder.py) records what it is sent,
plain or TLS on the same port, and answers lenient HTTP, so that "nothing reached the
upstream" in tests/e2e/test_bypass.py is a statement that could have failed."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from gateway.lab.recorder import Recorder, read_log
from gateway.lab.testca import TestCA as LabCA


@pytest.fixture
def recorder(tmp_path):
    ca = LabCA(tmp_path / "ca")
    pair = ca.issue_server("rec", ["www.example.test"], ["127.0.0.1"])
    log = tmp_path / "rec.jsonl"
    rec = Recorder(str(log), str(pair.cert_path), str(pair.key_path))
    srv = rec.serve("127.0.0.1", 0)
    yield srv.getsockname()[1], log, ca
    srv.close()


def _wait_for(log, predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conns, _ = read_log(log)
        if predicate(conns):
            return conns
        time.sleep(0.02)
    raise AssertionError(f"not recorded: {read_log(log)[0]}")


def test_plain_bytes_after_a_crlf_are_recorded_and_answered_as_http(recorder):
    port, log, _ = recorder
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"\r\nGET /m1 HTTP/1.1\r\nHost: blocked.test\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"host=blocked.test" in answer
    conns = _wait_for(log, lambda c: any(b"/m1" in x["data"] for x in c.values()))
    (conn,) = conns.values()
    assert conn["data"] == b"\r\nGET /m1 HTTP/1.1\r\nHost: blocked.test\r\n\r\n"
    assert conn["tls"] is False and conn["lport"] == port


def test_tls_on_the_same_port_records_sni_and_decrypted_bytes(recorder):
    port, log, ca = recorder
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="www.example.test") as s:
        s.sendall(b"GET /m2 HTTP/1.1\r\nHost: www.example.test\r\nContent-Length: 3\r\n\r\nabc")
        assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    conns = _wait_for(log, lambda c: any(b"/m2" in x["data"] for x in c.values()))
    (conn,) = conns.values()
    assert conn["tls"] is True and conn["sni"] == "www.example.test"
    assert conn["data"].endswith(b"\r\n\r\nabc")


def test_dns_paths_get_dns_content_types_and_other_lines_a_short_reply(recorder):
    port, log, _ = recorder
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /dns-query?dns=AAAB HTTP/1.1\r\nHost: a.test\r\n\r\n")
        answer = s.recv(4096)
    assert b"Content-Type: application/dns-message" in answer and b"DNSANSWER" in answer
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"\r\nEHLO x\r\n")
        assert s.recv(4096) == b"250 recorded\r\n"


def test_read_log_continues_from_an_offset(recorder):
    port, log, _ = recorder
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"first\n")
        s.recv(100)
    _wait_for(log, lambda c: len(c) == 1)
    _, offset = read_log(log)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"second\n")
        s.recv(100)
    conns = _wait_for(log, lambda c: any(b"second" in x["data"] for x in c.values()))
    later, _ = read_log(log, offset)
    assert [c["data"] for c in later.values() if c["data"]] == [b"second\n"]
    assert len(conns) == 2
