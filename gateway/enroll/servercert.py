"""The enrollment endpoint's own TLS identity.

Either the operator configures `enrollment.server_cert_file` / `server_key_file`, or the
gateway keeps one under <state>/enroll/: issued by the organization device CA when there is
one (devices already hold that CA in their PKCS#12 bundle, so they can verify the endpoint
without another trust step), otherwise self-signed. It is re-issued when it is missing, within
30 days of expiry, or when the configured names changed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.devices.ca import OrgCa

SERVER_VALID_DAYS = 397
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class ServerIdentity:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]   # issuer certificates to send after the leaf


def server_names(listen_host: str | None, endpoint: str | None, extra: tuple[str, ...]) -> list[str]:
    """Names (host names or IP addresses) the certificate must cover, in a stable order."""
    names: list[str] = []
    candidates = list(extra)
    if listen_host and listen_host not in ("0.0.0.0", "::"):
        candidates.append(listen_host)
    if endpoint:
        host = endpoint.rsplit(":", 1)[0].strip("[]")
        candidates.append(host)
    for name in candidates:
        if name and name not in names:
            names.append(name)
    return names or ["kanmon-enrollment"]


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def build_server_identity(names: list[str], now: dt.datetime, ca: OrgCa | None) -> ServerIdentity:
    """Pure: a new P-256 key and a serverAuth certificate for `names`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    issuer_name, signer = (ca.cert.subject, ca.key) if ca else (subject, key)
    start = now - dt.timedelta(minutes=5)
    end = start + dt.timedelta(days=SERVER_VALID_DAYS)
    if ca is not None:
        end = min(end, ca.cert.not_valid_after_utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
               .add_extension(_san(names), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                                        critical=False)
    cert = builder.sign(signer, hashes.SHA256())
    return ServerIdentity(cert, key, (ca.cert,) if ca else ())


def _names_of(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def load_identity(cert_path: Path, key_path: Path) -> ServerIdentity:
    certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return ServerIdentity(certs[0], key, tuple(certs[1:]))  # type: ignore[arg-type]


def load_or_create(directory: Path, names: list[str], now: dt.datetime, ca: OrgCa | None) -> ServerIdentity:
    """Reuse <directory>/server.{cert,key}.pem when still fit, else issue and store anew."""
    cert_path, key_path = directory / "server.cert.pem", directory / "server.key.pem"
    issuer_matches = True
    if cert_path.exists() and key_path.exists():
        try:
            current = load_identity(cert_path, key_path)
        except ValueError:
            current = None
        if current is not None:
            if ca is not None:
                issuer_matches = current.cert.issuer == ca.cert.subject
            if (issuer_matches and current.cert.not_valid_after_utc - now > RENEW_BEFORE
                    and sorted(_names_of(current.cert)) == sorted(_canonical(names))):
                return ServerIdentity(current.cert, current.key, (ca.cert,) if ca else current.chain)
    identity = build_server_identity(names, now, ca)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(key_path, identity.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    _write(cert_path, identity.cert.public_bytes(serialization.Encoding.PEM)
           + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in identity.chain))
    return identity


def _canonical(names: list[str]) -> list[str]:
    out = []
    for name in names:
        try:
            out.append(str(ipaddress.ip_address(name)))
        except ValueError:
            out.append(name)
    return out


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
