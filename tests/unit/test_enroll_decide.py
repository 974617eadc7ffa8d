"""Pure pieces of the enrollment endpoint: request parsing, token buckets, auth-log fields,
server certificate names."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress

import pytest
from cryptography import x509

from gateway.devices.ca import build_org_ca
from gateway.enroll.decide import RequestProblem, auth_log_record, parse_enroll_request, refusal
from gateway.enroll.ratelimit import ConnectionSlots, TokenBuckets, source_key
from gateway.enroll.servercert import build_server_identity, load_or_create, server_names

KEY = "A" * 43 + "="


def test_parse_accepts_both_key_spellings_and_normalizes():
    raw = bytes(range(200, 232))
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert "-" in urlsafe or "_" in urlsafe
    req = parse_enroll_request(('{"wg_public_key": "%s", "platform": " iOS ", "os_version": "17.4",'
                                ' "jailbroken": false}' % urlsafe).encode())
    assert req.wg_public_key == base64.b64encode(raw).decode() and req.platform == "iOS" and req.jailbroken is False
    minimal = parse_enroll_request(b'{"wg_public_key": "%s"}' % KEY.encode())
    assert (minimal.platform, minimal.os_version, minimal.jailbroken) == (None, None, None)


@pytest.mark.parametrize("body", [b"", b"null", b'"x"', b'{"wg_public_key": 5}', b'{"wg_public_key": "%s",'
                                  b' "platform": 3}' % KEY.encode(), b'{"wg_public_key": "%s", "jailbroken": 1}' % KEY.encode()])
def test_parse_refusals_are_bilingual(body):
    with pytest.raises(RequestProblem) as exc:
        parse_enroll_request(body)
    assert exc.value.text.ja and exc.value.text.en


def test_token_bucket_burst_then_rate():
    buckets = TokenBuckets(rate_per_minute=6, burst=2)       # one token per 10 s
    assert buckets.take("a", 0.0) == 0.0 and buckets.take("a", 0.0) == 0.0
    wait = buckets.take("a", 0.0)
    assert wait == pytest.approx(10.0)
    assert buckets.take("b", 0.0) == 0.0                      # per source
    assert buckets.take("a", 5.0) == pytest.approx(5.0)
    assert buckets.take("a", 10.0) == 0.0
    assert buckets.retry_after_header(0.2) == "1" and buckets.retry_after_header(9.1) == "10"


def test_token_bucket_table_is_bounded():
    buckets = TokenBuckets(rate_per_minute=60, burst=1, max_sources=100)
    for i in range(1000):
        buckets.take(f"10.0.{i // 256}.{i % 256}", float(i) / 1000)
    assert len(buckets) <= 100


def test_connection_slots_per_source_then_in_total():
    slots = ConnectionSlots(total=5, per_source=2)
    assert [slots.acquire("192.0.2.1") for _ in range(3)] == [None, None, ConnectionSlots.SOURCE_FULL]
    assert slots.acquire("2001:db8:1:2::a") is None and slots.acquire("2001:db8:1:2::b") is None
    assert slots.acquire("2001:db8:1:2:ffff::1") == ConnectionSlots.SOURCE_FULL      # the same /64
    assert slots.acquire("::ffff:192.0.2.1") == ConnectionSlots.SOURCE_FULL          # IPv4-mapped
    assert slots.acquire("198.51.100.1") is None
    assert slots.acquire("198.51.100.2") == ConnectionSlots.ALL_FULL and slots.held() == 5
    slots.release("192.0.2.1")
    assert slots.held("192.0.2.1") == 1 and slots.acquire("198.51.100.2") is None
    for ip in ("192.0.2.1", "2001:db8:1:2::a", "2001:db8:1:2::b", "198.51.100.1", "198.51.100.2"):
        slots.release(ip)
    assert slots.held() == 0 and slots._by_source == {}       # nothing kept for gone sources
    with pytest.raises(RuntimeError):
        slots.release("192.0.2.1")                             # a double release is a bug, said loudly


def test_source_key():
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert source_key("2001:db8:0:1::1") != source_key("2001:db8::1")
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7" and source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("not an address") == "not an address"


def test_auth_log_record_of_a_refusal_without_certificate():
    rec = auth_log_record(refusal("rate-limited", "retry after 3s"), "192.0.2.7", request=None)
    assert rec["event.action"] == "enrollment" and rec["event.outcome"] == "failure"
    assert rec["source.ip"] == "192.0.2.7" and rec["device.id"] is None and rec["user.name"] is None
    assert rec["kanmon.auth.reason"] == "rate-limited" and "retry after 3s" in rec["event.reason"]
    assert rec["http.response.status_code"] == 429


def test_server_names_and_certificate(tmp_path):
    assert server_names("0.0.0.0", "100.64.0.1:51820", ()) == ["100.64.0.1"]
    assert server_names("192.0.2.1", "vpn.example.jp:51820", ("enroll.example.jp",)) == \
        ["enroll.example.jp", "192.0.2.1", "vpn.example.jp"]
    now = dt.datetime.now(dt.UTC)
    ca = build_org_ca("Org", now=now)
    ident = build_server_identity(["100.64.0.1", "vpn.example.jp"], now, ca)
    san = ident.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("100.64.0.1")]
    assert ident.cert.issuer == ca.cert.subject and ident.chain == (ca.cert,)
    ident.cert.verify_directly_issued_by(ca.cert)
    first = load_or_create(tmp_path, ["100.64.0.1"], now, ca)
    again = load_or_create(tmp_path, ["100.64.0.1"], now, ca)
    assert again.cert == first.cert                                   # reused
    renamed = load_or_create(tmp_path, ["100.64.0.2"], now, ca)
    assert renamed.cert != first.cert                                 # names changed: re-issued
    assert (tmp_path / "server.key.pem").stat().st_mode & 0o777 == 0o600
