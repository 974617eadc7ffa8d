"""Interception TLS toward devices (issue #22), through the tunnel of the namespace lab:
the ECDSA P-256 interception CA's leaves are accepted by real clients (curl, OpenSSL via
Python, Chromium), TLS sessions resume (TLS 1.2 and 1.3), and a gateway configured for RSA
(or one that made an RSA CA before) keeps working."""

from __future__ import annotations

import json
import shutil

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.lab.topology import Lab, wait_until

# Run inside the device namespace: two connections per TLS version, the second offering the
# first one's session. Prints one JSON line: version -> [[negotiated, reused, leaf key], ...].
RESUME = r"""
import json, socket, ssl, sys
ca, host = sys.argv[1], sys.argv[2]
out = {}
for name, version in (("1.2", ssl.TLSVersion.TLSv1_2), ("1.3", ssl.TLSVersion.TLSv1_3)):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ctx.maximum_version = version
    session, rows = None, []
    for _ in range(2):
        with socket.create_connection((host, 443), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=host, session=session) as tls:
                row = [tls.version(), tls.session_reused, None, tls.getpeercert(binary_form=True).hex()]
                tls.sendall(b"GET / HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
                body = b""
                while chunk := tls.recv(65536):   # TLS 1.3: the session tickets arrive with the answer
                    body += chunk
                row[2] = body.split(b"\r\n", 1)[0].decode()
                rows.append(row)
                session = tls.session
    out[name] = rows
print(json.dumps(out))
"""


def _resume(lab: Lab, host: str = "www.example.test") -> dict:
    dev = lab.devices[0]
    script = lab.workdir / "resume.py"
    script.write_text(RESUME)
    proc = dev.ns.run(shutil.which("python3") or "python3", str(script), str(lab.interception_ca), host,
                      timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _ca_key(lab: Lab):
    return x509.load_pem_x509_certificate(lab.interception_ca.read_bytes()).public_key()


def test_ecdsa_leaves_are_accepted_and_sessions_resume(make_lab):
    lab = make_lab(n_devices=1)
    assert isinstance(_ca_key(lab), ec.EllipticCurvePublicKey)     # the default: ECDSA P-256
    dev = lab.devices[0]
    # curl verifies the leaf against the interception CA only (--cacert), as an enrolled phone does.
    out = dev.curl("https://www.example.test/")
    assert out.stdout.endswith("HTTP_CODE=200") and "hello from www.example.test via https" in out.stdout, out
    results = _resume(lab)
    for version, rows in results.items():
        (v1, reused1, status1, der1), (v2, reused2, status2, der2) = rows
        assert (v1, v2) == (f"TLSv{version}",) * 2
        assert status1 == status2 == "HTTP/1.1 200 OK"
        assert (reused1, reused2) == (False, True), f"TLS {version}: the second connection was not resumed"
        leaf = x509.load_der_x509_certificate(bytes.fromhex(der1))
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName) == ["www.example.test"]
    # Chromium (NSS trust store holding the interception CA, no certificate error ignored).
    from gateway.lab.browser import run_browser
    page = run_browser(dev, [{"action": "goto", "url": "https://www.example.test/"},
                             {"action": "text", "selector": "body"}], timeout=120)
    assert page["ok"], page
    assert page["steps"][0]["value"] == 200 and "hello from www.example.test via https" in page["steps"][1]["value"]


def test_rsa_ca_by_configuration_and_an_existing_ca_is_kept(make_lab):
    lab = make_lab(n_devices=1, overrides={"proxy": {"ca_key": "rsa-2048"}})
    key = _ca_key(lab)
    assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
    out = lab.devices[0].curl("https://www.example.test/")
    assert out.stdout.endswith("HTTP_CODE=200"), out
    rows = _resume(lab)["1.3"]
    assert [r[1] for r in rows] == [False, True]
    assert isinstance(x509.load_der_x509_certificate(bytes.fromhex(rows[0][3])).public_key(), rsa.RSAPublicKey)
    # The configuration changes to the default (ECDSA): the devices trust the RSA CA, which stays.
    ca_before = lab.interception_ca.read_bytes()
    lab.stop_gateway()
    lab.write_config({"proxy": {"ca_key": "ecdsa-p256"}})
    lab.start_gateway()
    lab.wait_for_peer(lab.devices[0])
    assert lab.interception_ca.read_bytes() == ca_before
    assert "the interception CA" in lab.gateway.log_text() and "rsa-2048" in lab.gateway.log_text()
    # (the device's tunnel session is renewed after the restart: the first tries may not get through)
    wait_until(lambda: lab.devices[0].curl("https://www.example.test/", timeout=3).stdout.endswith("HTTP_CODE=200"),
               30, "an HTTPS request after the restart", interval=0.5)
    assert isinstance(x509.load_der_x509_certificate(bytes.fromhex(_resume(lab)["1.3"][0][3])).public_key(),
                      rsa.RSAPublicKey)
