"""The enrollment endpoint over real TLS on 127.0.0.1: every refusal reason reaches the
client as a JSON error and the auth log as a record, and nothing is written to the registry;
success is idempotent; rate limit; malformed requests never produce a traceback."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import ssl
import threading
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from wireguard_tools import WireguardKey

from gateway.config import load_config_text
from gateway.devices.ca import CaStore, build_org_ca, import_crl, init_ca, issue_device_certificate, pki_dir
from gateway.enroll.server import EnrollmentServer
from gateway.registry.model import DeviceRecord, DeviceStatus
from gateway.registry.sqlite import SqliteRegistry

DAY = dt.timedelta(days=1)


class ListLog:
    def __init__(self):
        self.records: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def append(self, stream, record):
        with self.lock:
            self.records.append((stream, dict(record)))

    def auth(self):
        return [r for s, r in self.records if s == "auth"]


CONFIG = """
state_dir: {state}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, ipv6_prefix: "fd77:77::/64",
         endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
enrollment: {{listen: "127.0.0.1:8443", rate_per_minute: {rate}, burst: {burst}}}
posture: {{min_os: {{ios: "17.0", android: "13"}}, quarantine_jailbroken: true}}
"""


@pytest.fixture
def env(tmp_path):
    return make_env(tmp_path)


def make_env(tmp_path, rate=600, burst=100):
    state = tmp_path / "state"
    state.mkdir()
    cfg = load_config_text(CONFIG.format(state=state, rate=rate, burst=burst))
    ca = init_ca(pki_dir(state), "関門テスト市", now=dt.datetime.now(dt.UTC) - 30 * DAY)
    registry = SqliteRegistry(cfg.registry_path)
    logs = ListLog()
    gw_key = str(WireguardKey.generate().public_key())
    inter_ca = build_org_ca("Interception", now=dt.datetime.now(dt.UTC)).cert.public_bytes(serialization.Encoding.PEM)
    server = EnrollmentServer(cfg, registry, logs, gw_key, inter_ca, port=0)
    server.start()
    return Env(tmp_path, cfg, ca, registry, logs, server, gw_key, inter_ca.decode())


class Env:
    def __init__(self, tmp, cfg, ca, registry, logs, server, gw_key, inter_ca):
        self.tmp, self.cfg, self.ca, self.registry, self.logs, self.server = tmp, cfg, ca, registry, logs, server
        self.gw_key, self.inter_ca = gw_key, inter_ca
        self.n = 0

    def register(self, device_id, **kw):
        ipv4, ipv6 = self.registry.allocate_addresses(self.cfg.ipv4_prefix, self.cfg.ipv6_prefix)
        return self.registry.add(DeviceRecord(device_id=device_id, wg_public_key=None, ipv4=ipv4, ipv6=ipv6,
                                              owner="yamada@example.test", **kw))

    def identity(self, cert: x509.Certificate, key) -> tuple[str, str]:
        self.n += 1
        cert_path, key_path = self.tmp / f"c{self.n}.pem", self.tmp / f"k{self.n}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return str(cert_path), str(key_path)

    def issue(self, device_id, wg_pub, *, start=None, end=None, ca=None):
        now = dt.datetime.now(dt.UTC)
        issued = issue_device_certificate(ca or self.ca, device_id, wg_pub, "yamada@example.test",
                                          start or now - DAY, end or now + 90 * DAY)
        return issued, self.identity(issued.certificate, issued.private_key)

    def request(self, body, *, identity=None, method="POST", path="/v1/enroll", raw: bytes | None = None):
        ctx = ssl.create_default_context(cafile=str(CaStore(pki_dir(self.cfg.state_dir)).cert_path))
        ctx.check_hostname = False   # the test server listens on 127.0.0.1, named vpn.example.test
        if identity:
            ctx.load_cert_chain(*identity)
        host, port = self.server.address
        if raw is not None:
            with socket.create_connection((host, port), timeout=10) as s, ctx.wrap_socket(s) as t:
                t.sendall(raw)
                data = b""
                while chunk := t.recv(65536):
                    data += chunk
            head, _, payload = data.partition(b"\r\n\r\n")
            return int(head.split()[1]), json.loads(payload), {}
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=payload if method == "POST" else None,
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, json.loads(data), dict(resp.getheaders())


def new_key() -> str:
    return str(WireguardKey.generate().public_key())


@pytest.fixture(autouse=True)
def _stop(request):
    yield
    env = request.node.funcargs.get("env")
    if env is not None:
        env.server.stop()
        env.registry.close()


def assert_refused(env, status, body, reason, device_id=None, http_status=403):
    assert status == http_status, body
    assert body["error"] == reason
    assert body["message"]["ja"] and body["message"]["en"]
    last = env.logs.auth()[-1]
    assert last["event.action"] == "enrollment" and last["event.outcome"] == "failure"
    assert last["kanmon.auth.reason"] == reason
    assert last["source.ip"] == "127.0.0.1"
    assert last["device.id"] == device_id
    assert all(r.wg_public_key is None for r in env.registry.all())


# ------------------------------------------------------------------ success

def test_enrollment_returns_config_and_writes_key(env):
    env.register("dev-1")
    key = new_key()
    issued, ident = env.issue("dev-1", key)
    status, body, _ = env.request({"wg_public_key": key, "platform": "iOS", "os_version": "17.4.1",
                                   "jailbroken": False}, identity=ident)
    assert status == 200, body
    rec = env.registry.get("dev-1")
    assert rec.wg_public_key == key and rec.status is DeviceStatus.ACTIVE
    assert rec.cert_serial == format(issued.certificate.serial_number, "x")
    assert rec.cert_fingerprint == issued.fingerprint_sha256
    assert (rec.platform, rec.os_version, rec.jailbroken) == ("iOS", "17.4.1", False)
    # The usage period ends with the certificate: the reconciler cuts the device off then.
    assert rec.valid_until == issued.certificate.not_valid_after_utc
    cfg = body["wg_quick_config"]
    assert f"PublicKey = {env.gw_key}" in cfg
    assert "Endpoint = vpn.example.test:51820" in cfg
    assert f"Address = {rec.ipv4}/32, {rec.ipv6}/128" in cfg
    assert "DNS = 10.77.0.1, fd77:77::1" in cfg
    assert "AllowedIPs = 0.0.0.0/0, ::/0" in cfg
    assert "MTU = 1420" in cfg                   # tunnel.mtu (default 1420), as the gateway's interface
    assert body["interception_ca_pem"] == env.inter_ca and body["changed"] is True
    last = env.logs.auth()[-1]
    assert last["event.outcome"] == "success" and last["device.id"] == "dev-1"
    assert last["x509.serial_number"] == rec.cert_serial and "CN=dev-1" in last["x509.subject.distinguished_name"]
    assert last["user.name"] == "yamada@example.test" and last["kanmon.peer.public_key"] == key


def test_enrollment_is_idempotent(env):
    env.register("dev-1")
    key = new_key()
    _, ident = env.issue("dev-1", key)
    first = env.request({"wg_public_key": key}, identity=ident)
    revision = env.registry.revision()
    second = env.request({"wg_public_key": key}, identity=ident)
    assert first[0] == second[0] == 200
    assert first[1]["wg_quick_config"] == second[1]["wg_quick_config"]
    assert second[1]["changed"] is False
    assert env.registry.revision() == revision          # nothing written the second time
    assert [r["event.outcome"] for r in env.logs.auth()] == ["success", "success"]


def test_outdated_os_is_enrolled_but_quarantined_then_released(env):
    env.register("dev-1")
    key = new_key()
    _, ident = env.issue("dev-1", key)
    status, body, _ = env.request({"wg_public_key": key, "platform": "ios", "os_version": "16.7"}, identity=ident)
    assert status == 200 and body["status"] == "quarantined"
    assert "16.7" in body["status_reason"] and "17.0" in body["status_reason"]
    assert env.registry.get("dev-1").status is DeviceStatus.QUARANTINED
    status, body, _ = env.request({"wg_public_key": key, "platform": "ios", "os_version": "17.10"}, identity=ident)
    assert status == 200 and body["status"] == "active"
    assert env.registry.get("dev-1").status_reason == ""


# ------------------------------------------------------------------ refusals (real TLS)

def test_no_client_certificate(env):
    env.register("dev-1")
    status, body, _ = env.request({"wg_public_key": new_key()})
    assert_refused(env, status, body, "no-certificate")


def test_expired_certificate(env):
    env.register("dev-1")
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    _, ident = env.issue("dev-1", key, start=now - 20 * DAY, end=now - DAY)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert_refused(env, status, body, "expired", "dev-1")


def test_not_yet_valid_certificate(env):
    env.register("dev-1")
    key = new_key()
    now = dt.datetime.now(dt.UTC)
    _, ident = env.issue("dev-1", key, start=now + DAY, end=now + 20 * DAY)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert_refused(env, status, body, "not-yet-valid", "dev-1")


def test_untrusted_ca(env):
    env.register("dev-1")
    key = new_key()
    stranger = build_org_ca("Stranger Inc", now=dt.datetime.now(dt.UTC) - 30 * DAY)
    _, ident = env.issue("dev-1", key, ca=stranger)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert_refused(env, status, body, "untrusted-ca", "dev-1")


def test_certificate_on_crl(env):
    env.register("dev-1")
    key = new_key()
    issued, ident = env.issue("dev-1", key)
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(env.ca.cert.subject)
           .last_update(now - dt.timedelta(minutes=1)).next_update(now + 7 * DAY)
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(issued.certificate.serial_number)
                                    .revocation_date(now - dt.timedelta(minutes=1)).build())
           .sign(env.ca.key, hashes.SHA256()))
    import_crl(pki_dir(env.cfg.state_dir), crl.public_bytes(serialization.Encoding.PEM))
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert_refused(env, status, body, "revoked-crl", "dev-1")


def test_revoked_device(env):
    env.register("dev-1", status=DeviceStatus.REVOKED, status_reason="lost")
    key = new_key()
    _, ident = env.issue("dev-1", key)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert_refused(env, status, body, "device-revoked", "dev-1")


def test_suspended_device(env):
    env.register("dev-1", status=DeviceStatus.SUSPENDED,
                 suspended_until=dt.datetime.now(dt.UTC) + DAY)
    key = new_key()
    _, ident = env.issue("dev-1", key)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert_refused(env, status, body, "device-suspended", "dev-1")


def test_key_not_bound_to_certificate(env):
    env.register("dev-1")
    _, ident = env.issue("dev-1", new_key())
    status, body, _ = env.request({"wg_public_key": new_key()}, identity=ident)
    assert_refused(env, status, body, "key-not-bound", "dev-1")


def test_unknown_device(env):
    key = new_key()
    _, ident = env.issue("ghost-1", key)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert_refused(env, status, body, "unknown-device", "ghost-1")


def test_key_of_another_device(env):
    key = new_key()
    ipv4, ipv6 = env.registry.allocate_addresses(env.cfg.ipv4_prefix, env.cfg.ipv6_prefix)
    env.registry.add(DeviceRecord("other", key, ipv4, ipv6))
    env.register("dev-1")
    _, ident = env.issue("dev-1", key)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert status == 409 and body["error"] == "key-in-use"
    assert env.registry.get("dev-1").wg_public_key is None


def test_mdm_certificate_binding_is_recorded_at_first_enrollment(env):
    """An external CA's certificate (CN only, no key URI): the first enrollment records the
    binding; the same certificate with another key is refused afterwards."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MDM Root")])
    now = dt.datetime.now(dt.UTC)
    ku = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    root = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(root_key.public_key())
            .serial_number(1).not_valid_before(now - DAY).not_valid_after(now + 100 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ku, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    from gateway.devices.ca import trust_bundle
    trust_bundle(pki_dir(env.cfg.state_dir), root.public_bytes(serialization.Encoding.PEM))
    dev_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iphone-7F3A")]))
            .issuer_name(name).public_key(dev_key.public_key()).serial_number(4242)
            .not_valid_before(now - DAY).not_valid_after(now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(root_key, hashes.SHA256()))
    ident = env.identity(leaf, dev_key)
    env.register("iphone-7F3A")
    key = new_key()
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert status == 200, body
    rec = env.registry.get("iphone-7F3A")
    assert rec.wg_public_key == key and rec.cert_fingerprint == leaf.fingerprint(hashes.SHA256()).hex()
    assert env.logs.auth()[-1]["kanmon.auth.binding"] == "recorded-match"
    status, body, _ = env.request({"wg_public_key": new_key()}, identity=ident)
    assert status == 403 and body["error"] == "key-not-bound"
    assert env.registry.get("iphone-7F3A").wg_public_key == key


# ------------------------------------------------------------------ malformed requests

@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe", "UTF-8"),
    (json.dumps({}).encode(), "wg_public_key"),
    (json.dumps({"wg_public_key": "short"}).encode(), "invalid"),
    (json.dumps({"wg_public_key": "A" * 43 + "=", "jailbreak": True}).encode(), "unknown fields: jailbreak"),
    (json.dumps({"wg_public_key": "A" * 43 + "=", "jailbroken": "no"}).encode(), "true or false"),
    (json.dumps({"wg_public_key": "A" * 43 + "=", "os_version": "x" * 65}).encode(), "at most 64"),
])
def test_bad_body_is_a_clear_400(env, body, fragment):
    key = new_key()
    env.register("dev-1")
    _, ident = env.issue("dev-1", key)
    status, reply, _ = env.request(body, identity=ident)
    assert status == 400 and reply["error"] == "bad-request"
    assert fragment in reply["detail"] and "Traceback" not in json.dumps(reply)
    assert env.logs.auth()[-1]["kanmon.auth.reason"] == "bad-request"
    assert env.registry.get("dev-1").wg_public_key is None


def test_wrong_path_and_method(env):
    status, body, _ = env.request(None, method="GET")
    assert status == 405 and body["error"] == "method-not-allowed"
    status, body, _ = env.request({"wg_public_key": new_key()}, path="/v1/other")
    assert status == 404 and body["error"] == "not-found"


def test_oversized_body_and_garbage_request_line(env):
    status, body, _ = env.request(None, raw=b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Length: 20000\r\n\r\n{")
    assert status == 413 and body["error"] == "too-large"
    status, body, _ = env.request(None, raw=b"THIS IS NOT HTTP\r\n\r\n")
    assert status == 400 and body["error"] == "bad-request"


def test_plain_tcp_garbage_does_not_kill_the_server(env):
    host, port = env.server.address
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")      # not TLS
        try:
            s.recv(100)
        except ConnectionResetError:
            pass
    env.register("dev-1")
    key = new_key()
    _, ident = env.issue("dev-1", key)
    assert env.request({"wg_public_key": key}, identity=ident)[0] == 200


def test_rate_limit_per_source_ip(tmp_path):
    env = make_env(tmp_path, rate=1, burst=2)
    try:
        results = [env.request({"wg_public_key": new_key()}) for _ in range(4)]
        assert [r[0] for r in results] == [403, 403, 429, 429]
        assert int(results[2][2]["retry-after"]) >= 1
        assert results[2][1]["error"] == "rate-limited"
        reasons = [r["kanmon.auth.reason"] for r in env.logs.auth()]
        # the first 429 of a run is logged, the rest are not (a flood cannot fill the disk)
        assert reasons == ["no-certificate", "no-certificate", "rate-limited"]
    finally:
        env.server.stop()
        env.registry.close()


def test_outside_usage_period(env):
    env.register("dev-1", valid_until=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    key = new_key()
    _, ident = env.issue("dev-1", key)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert_refused(env, status, body, "outside-usage-period", "dev-1")


def test_superseded_org_certificate(env):
    """After `kanmon device renew` the registry holds the new certificate's fingerprint; the
    old (still unexpired) certificate no longer enrolls."""
    key = new_key()
    old, old_ident = env.issue("dev-1", key)
    new, _ = env.issue("dev-1", key)
    env.register("dev-1", cert_fingerprint=new.fingerprint_sha256)
    status, body, _ = env.request({"wg_public_key": key}, identity=old_ident)
    assert_refused(env, status, body, "certificate-superseded", "dev-1")


def test_importing_a_crl_revokes_enrolled_devices_on_it(env):
    from gateway.cli.ca import revoke_devices_on_crl

    for name in ("dev-1", "dev-2"):
        env.register(name)
    enrolled = {}
    for name in ("dev-1", "dev-2"):
        key = new_key()
        issued, ident = env.issue(name, key)
        status, body, _ = env.request({"wg_public_key": key}, identity=ident)
        assert status == 200, body
        enrolled[name] = issued
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(env.ca.cert.subject)
           .last_update(now - dt.timedelta(minutes=1)).next_update(now + 7 * DAY)
           .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                    .serial_number(enrolled["dev-2"].certificate.serial_number)
                                    .revocation_date(now - dt.timedelta(minutes=1)).build())
           .sign(env.ca.key, hashes.SHA256()))
    data = crl.public_bytes(serialization.Encoding.PEM)
    import_crl(pki_dir(env.cfg.state_dir), data)
    assert revoke_devices_on_crl(env.cfg.state_dir, data, "the org CA") == ["dev-2"]
    assert env.registry.get("dev-2").status is DeviceStatus.REVOKED
    assert env.registry.get("dev-2").status_reason.startswith("[crl]")
    assert env.registry.get("dev-1").status is DeviceStatus.ACTIVE
    assert [e.action for e in env.registry.unshipped_audit()][-1] == "device-revoked"
    assert revoke_devices_on_crl(env.cfg.state_dir, data, "the org CA") == []  # idempotent


def _server_chain_verifies(address, cafile) -> bool:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.check_hostname = False
    try:
        with socket.create_connection(address, timeout=10) as s, ctx.wrap_socket(s):
            return True
    except ssl.SSLCertVerificationError:
        return False


def test_ca_init_after_start_is_served_without_a_restart(tmp_path):
    """README order (#19): the service starts first (no org CA yet: a self-signed endpoint),
    then `kanmon ca init`. The next connection must present a certificate from the new CA,
    so a phone holding that CA can enroll without the operator restarting the gateway."""
    state = tmp_path / "state"
    state.mkdir()
    cfg = load_config_text(CONFIG.format(state=state, rate=600, burst=100))
    registry = SqliteRegistry(cfg.registry_path)
    inter_ca = build_org_ca("Interception", now=dt.datetime.now(dt.UTC)).cert.public_bytes(serialization.Encoding.PEM)
    server = EnrollmentServer(cfg, registry, ListLog(), new_key(), inter_ca, port=0)
    server.start()
    try:
        self_signed = x509.load_pem_x509_certificate((state / "enroll" / "server.cert.pem").read_bytes())
        assert self_signed.issuer == self_signed.subject            # no CA yet: self-signed
        other_ca = tmp_path / "other.pem"
        other_ca.write_bytes(build_org_ca("Other", now=dt.datetime.now(dt.UTC)).cert.public_bytes(serialization.Encoding.PEM))
        assert not _server_chain_verifies(server.address, other_ca)
        ca = init_ca(pki_dir(state), "関門テスト市", now=dt.datetime.now(dt.UTC) - DAY)
        ca_file = CaStore(pki_dir(state)).cert_path
        assert _server_chain_verifies(server.address, ca_file)     # the very next connection
        reissued = x509.load_pem_x509_certificate((state / "enroll" / "server.cert.pem").read_bytes())
        assert reissued.issuer == ca.cert.subject
        # A corrupt CA file later keeps the working identity (certificates are judged by certcheck).
        CaStore(pki_dir(state)).cert_path.write_bytes(b"not a certificate")
        other_ca.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
        assert _server_chain_verifies(server.address, other_ca)
    finally:
        server.stop()
        registry.close()


def test_enrollment_config_carries_persistent_keepalive_when_configured(env):
    """tunnel.persistent_keepalive (issue #19): a phone behind NAT keeps its mapping open;
    without the key the config has no keepalive (WireGuard's default: off)."""
    env.register("dev-1")
    key = new_key()
    _, ident = env.issue("dev-1", key)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert status == 200 and "PersistentKeepalive" not in body["wg_quick_config"]
    env.server.cfg = replace(env.cfg, wg_persistent_keepalive=25)
    status, body, _ = env.request({"wg_public_key": key}, identity=ident)
    assert status == 200, body
    assert body["wg_quick_config"].rstrip("\n").endswith("PersistentKeepalive = 25")
