"""The interception CA: the certificate authority whose leaf certificates the devices see.

mitmproxy creates an RSA-2048 CA in its confdir on first start when none is there. Kanmon
creates it itself first, with the key type the configuration asks for (``proxy.ca_key``):

  ecdsa-p256  (default) every leaf certificate and every TLS handshake toward a device is
              signed with ECDSA P-256: a signature costs a fraction of an RSA-2048 one
              (see bench/proxy.py, scenario https-new-conn), and P-256 leaves are accepted by
              every current TLS client (Android 4+, iOS, Windows, Chromium, curl).
  rsa-2048    mitmproxy's own default, for a client that cannot verify ECDSA.

mitmproxy signs leaves with the CA's own key type (certs.dummy_cert reuses the CA key pair
for the leaf), so nothing else changes. The files are those mitmproxy writes (it loads them
unchanged): mitmproxy-ca.pem (key + certificate), -ca-cert.pem/.cer/.p12 (what devices are
given to trust, via enrollment and `kanmon device profile`), -dhparam.pem.

An existing CA is never replaced (devices trust it): a deployment made with RSA keeps its
RSA CA after an upgrade; ``existing_key_type`` tells the operator which one is in use.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mitmproxy import certs
from mitmproxy.options import CONF_BASENAME

CA_KEY_TYPES = ("ecdsa-p256", "rsa-2048")
DEFAULT_CA_KEY = "ecdsa-p256"
BASENAME = CONF_BASENAME          # "mitmproxy": the file names mitmproxy loads


def ca_file(confdir: Path) -> Path:
    return Path(confdir) / f"{BASENAME}-ca.pem"


def key_type_of(key: object) -> str:
    """The configuration name of a CA key, or a description for a type Kanmon does not make."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ecdsa-p256" if key.curve.name == "secp256r1" else f"ecdsa-{key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def existing_key_type(confdir: Path) -> str | None:
    """The key type of the CA already in ``confdir``, None when there is none."""
    path = ca_file(confdir)
    if not path.exists():
        return None
    return key_type_of(certs.load_pem_private_key(path.read_bytes(), None))


def _new_key(key_type: str):
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown CA key type {key_type!r} (known: {', '.join(CA_KEY_TYPES)})")


def build_ca(key_type: str, *, now: dt.datetime | None = None, name: str = BASENAME):
    """A new CA key and certificate with the extensions mitmproxy gives its own CA."""
    key = _new_key(key_type)
    now = now or dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .subject_name(subject).issuer_name(subject)
        .not_valid_before(now + certs.CERT_VALIDITY_OFFSET)
        .not_valid_after(now + certs.CERT_VALIDITY_OFFSET + certs.CA_EXPIRY)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def ensure_ca(confdir: Path, key_type: str = DEFAULT_CA_KEY) -> tuple[str, bool]:
    """Create the interception CA in ``confdir`` unless one is there. Returns (the key type
    in use, whether it was created now)."""
    confdir = Path(confdir)
    existing = existing_key_type(confdir)
    if existing is not None:
        return existing, False
    key, cert = build_ca(key_type)
    confdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_p12 = pkcs12.serialize_key_and_certificates(BASENAME.encode(), None, cert, None,
                                                     serialization.NoEncryption())
    # The secret files first, each written under a new name and renamed: a crash leaves
    # either no CA (made again next start) or a whole one, never a key without its certificate.
    _write(confdir / f"{BASENAME}-ca.p12",
           pkcs12.serialize_key_and_certificates(BASENAME.encode(), key, cert, None, serialization.NoEncryption()),
           0o600)
    _write(confdir / f"{BASENAME}-dhparam.pem", certs.DEFAULT_DHPARAM, 0o644)
    _write(confdir / f"{BASENAME}-ca-cert.pem", cert_pem, 0o644)
    _write(confdir / f"{BASENAME}-ca-cert.cer", cert_pem, 0o644)     # Android's file name
    _write(confdir / f"{BASENAME}-ca-cert.p12", cert_p12, 0o644)
    _write(ca_file(confdir), key_pem + cert_pem, 0o600)              # last: its presence means "made"
    return key_type, True


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
