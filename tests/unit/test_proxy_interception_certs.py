"""Interception CA key types and the bounded leaf-certificate cache (issue #22).

gateway/proxy/interceptca.py makes the CA mitmproxy loads (ECDSA P-256 by default, RSA-2048
by choice, an existing one kept); gateway/proxy/certcache.py keeps leaves in an LRU of a
configured size. The handshake with a real TLS client through the lab is in
tests/e2e/test_interception_tls.py."""

from __future__ import annotations

import ssl
import subprocess
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mitmproxy import certs

from gateway.config import load_config_text
from gateway.proxy import interceptca
from gateway.proxy.certcache import BoundedCertStore, CachingTlsConfig
from gateway.proxy.master import ProxySettings
from gateway.yamlsource import SourceErrors

BASE = textwrap.dedent("""\
    state_dir: /var/lib/kanmon
    tunnel:
      interface: kmwg0
      listen_port: 51820
      ipv4_prefix: 10.77.0.0/24
    uplink:
      interface: eth0
    proxy:
      upstream_dns: [192.0.2.53]
    """)


def store_in(confdir, key_type: str, capacity: int) -> BoundedCertStore:
    interceptca.ensure_ca(confdir, key_type)
    plain = certs.CertStore.from_store(confdir, "mitmproxy", 2048)   # how mitmproxy loads it
    return BoundedCertStore.adopt(plain, capacity)


def leaf(store: BoundedCertStore, name: str) -> certs.CertStoreEntry:
    return store.get_cert(name, [x509.DNSName(name)])


@pytest.mark.parametrize("key_type, key_class", [("ecdsa-p256", ec.EllipticCurvePrivateKey),
                                                 ("rsa-2048", rsa.RSAPrivateKey)])
def test_the_ca_is_made_with_the_configured_key_and_its_leaves_verify(tmp_path, key_type, key_class):
    in_use, created = interceptca.ensure_ca(tmp_path, key_type)
    assert (in_use, created) == (key_type, True)
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca-cert.pem", "mitmproxy-ca-cert.cer", "mitmproxy-ca-cert.p12",
                 "mitmproxy-ca.p12", "mitmproxy-dhparam.pem"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0   # the key is the owner's only
    store = store_in(tmp_path, key_type, 10)
    assert isinstance(store.default_privatekey, key_class)
    entry = leaf(store, "www.example.test")
    assert isinstance(entry.cert.public_key(), type(store.default_privatekey.public_key()))
    # openssl checks the chain as a TLS client would, name and purpose included.
    (tmp_path / "leaf.pem").write_bytes(entry.cert.to_pem())
    check = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "mitmproxy-ca-cert.pem"),
                            "-purpose", "sslserver", "-verify_hostname", "www.example.test", str(tmp_path / "leaf.pem")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    wrong = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "mitmproxy-ca-cert.pem"),
                            "-verify_hostname", "other.example.test", str(tmp_path / "leaf.pem")],
                           capture_output=True, text=True)
    assert wrong.returncode != 0


def test_an_existing_ca_is_kept_whatever_the_configuration_asks(tmp_path):
    certs.CertStore.create_store(tmp_path, "mitmproxy", 2048)     # a deployment made before: mitmproxy's RSA CA
    before = (tmp_path / "mitmproxy-ca.pem").read_bytes()
    assert interceptca.ensure_ca(tmp_path, "ecdsa-p256") == ("rsa-2048", False)
    assert (tmp_path / "mitmproxy-ca.pem").read_bytes() == before
    store = store_in(tmp_path, "ecdsa-p256", 10)
    assert isinstance(leaf(store, "a.test").cert.public_key(), rsa.RSAPublicKey)


def test_an_unknown_key_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown CA key type"):
        interceptca.ensure_ca(tmp_path, "dsa-1024")
    assert not (tmp_path / "mitmproxy-ca.pem").exists()


def test_the_cache_keeps_the_most_recently_used_leaves_up_to_its_bound(tmp_path):
    store = store_in(tmp_path, "ecdsa-p256", 3)
    first = {n: leaf(store, n) for n in ("a.test", "b.test", "c.test")}
    assert len(store) == 3
    assert leaf(store, "a.test") is first["a.test"]         # a hit: no new certificate, and now the newest
    leaf(store, "d.test")                                    # evicts the least recently used: b.test
    assert len(store) == 3 and len([k for k in store.certs if isinstance(k, tuple)]) == 3
    assert leaf(store, "a.test") is first["a.test"]
    assert leaf(store, "c.test") is first["c.test"]
    again = leaf(store, "b.test")                            # made anew (and evicts d.test)
    assert again is not first["b.test"] and again.cert.serial != first["b.test"].cert.serial
    assert len(store) == 3


def test_the_cache_stays_bounded_over_many_names(tmp_path):
    store = store_in(tmp_path, "ecdsa-p256", 50)
    for i in range(400):
        leaf(store, f"h{i}.test")
    assert len(store) == 50 and len(store.certs) == 50 and len(store._key_of) == 50
    assert leaf(store, "h399.test") is leaf(store, "h399.test")


def test_the_tls_addon_puts_a_bounded_store_of_the_configured_size_in_place(tmp_path):
    from mitmproxy.test import taddons
    interceptca.ensure_ca(tmp_path, "ecdsa-p256")
    addon = CachingTlsConfig(123)
    with taddons.context(addon) as tctx:
        tctx.configure(addon, confdir=str(tmp_path))
        assert isinstance(addon.certstore, BoundedCertStore) and addon.certstore.capacity == 123
        assert isinstance(addon.certstore.default_privatekey, ec.EllipticCurvePrivateKey)


def test_leaves_serve_a_python_tls_handshake(tmp_path):
    # The EC CA's leaf with its key in a server context; Python's ssl (OpenSSL) verifies it.
    store = store_in(tmp_path, "ecdsa-p256", 10)
    entry = leaf(store, "www.example.test")
    (tmp_path / "leaf.pem").write_bytes(entry.cert.to_pem())
    (tmp_path / "leaf.key").write_bytes(entry.privatekey.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "mitmproxy-ca-cert.pem"))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="www.example.test")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert c.version() is not None and c.getpeercert()["subjectAltName"] == (("DNS", "www.example.test"),)


def test_configuration_defaults_and_values():
    cfg = load_config_text(BASE, "k.yaml")
    assert (cfg.proxy_ca_key, cfg.leaf_cert_cache) == ("ecdsa-p256", 10_000)
    settings = ProxySettings.from_config(cfg)
    assert (settings.ca_key, settings.leaf_cert_cache) == ("ecdsa-p256", 10_000)
    cfg = load_config_text(BASE + "  ca_key: rsa-2048\n  leaf_cert_cache: 500\n", "k.yaml")
    assert (cfg.proxy_ca_key, cfg.leaf_cert_cache) == ("rsa-2048", 500)


@pytest.mark.parametrize("line, expected", [
    ("  ca_key: rsa-1024\n", "proxy.ca_key:"),
    ("  ca_key: ecdsa\n", "proxy.ca_key:"),
    ("  leaf_cert_cache: 0\n", "proxy.leaf_cert_cache:"),
    ("  leaf_cert_cache: many\n", "proxy.leaf_cert_cache:"),
])
def test_bad_values_are_refused_in_both_languages(line, expected):
    with pytest.raises(SourceErrors) as exc:
        load_config_text(BASE + line, "k.yaml")
    errors = [str(e) for e in exc.value.errors]
    assert len(errors) == 1 and errors[0].startswith(f"k.yaml:10: {expected}"), errors
    ja, _, en = errors[0].partition(" / ")
    assert en and any(ord(ch) > 0x3000 for ch in ja), errors   # Japanese first, then English
