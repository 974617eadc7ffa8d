"""How a WireGuard public key is bound to a device certificate (see BINDING.md).

Two sources of binding, checked by `check_binding`:

* CERTIFICATE — certificates issued by our organization CA carry the key in a SAN URI
  ``urn:kanmon:wg:<key>`` (base64url, no padding). The certificate alone proves the binding.
* ENROLLMENT — certificates from an external CA (MDM/SCEP) do not carry our URI. The binding
  (certificate SHA-256 fingerprint -> WireGuard key) is recorded in the registry at enrollment
  and every later re-validation compares against that record.

Pure: no I/O, no globals. NISC smartphone guide 5.4 (device authentication for the VPN) and
IPA SME sample 技術的対策 1.3 (device authentication) are what this enforces.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509

from gateway.i18n import Text

WG_URI_PREFIX = "urn:kanmon:wg:"
DEVICE_URI_PREFIX = "urn:kanmon:device:"
WG_KEY_LEN = 32

# Device ids travel in URIs, file names, log lines and nftables comments: keep them plain.
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class WireGuardKeyError(ValueError):
    """A WireGuard key is not 32 bytes of base64 (standard or URL-safe); ``text`` says so in
    Japanese and English."""

    def __init__(self, text: Text) -> None:
        super().__init__(text.en)
        self.text = text


def _not_base64(text: str) -> Text:
    return Text(f"base64 の WireGuard 鍵ではありません: {text[:60]!r}", f"not a base64 WireGuard key: {text[:60]!r}")


def parse_wg_key(value: str | bytes) -> bytes:
    """Return the 32 raw key bytes. Accepts standard base64 (as printed by `wg pubkey`),
    URL-safe base64, with or without padding, or the raw 32 bytes."""
    if isinstance(value, bytes) and len(value) == WG_KEY_LEN:
        return value
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if not text or not re.fullmatch(r"[A-Za-z0-9+/_-]{42,43}={0,2}", text):
        raise WireGuardKeyError(_not_base64(text))
    stripped = text.rstrip("=")
    padded = stripped + "=" * (-len(stripped) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except binascii.Error as exc:
        raise WireGuardKeyError(_not_base64(text)) from exc
    if len(raw) != WG_KEY_LEN:
        raise WireGuardKeyError(Text(f"WireGuard の鍵は {WG_KEY_LEN} バイトです({len(raw)} バイトでした)",
                                     f"a WireGuard key is {WG_KEY_LEN} bytes, got {len(raw)}"))
    return raw


def wg_key_text(raw: bytes) -> str:
    """The standard form used by wg(8) and wg-quick configs: base64 with padding."""
    return base64.b64encode(raw).decode("ascii")


def wg_key_uri(key: str | bytes) -> str:
    """SAN URI carrying a WireGuard public key: base64url without padding (43 characters).
    URL-safe so that no character has a reserved meaning in a URI (RFC 3986 / RFC 8141:
    '/' and '=' do, '+' is a sub-delimiter); unpadded because the length is fixed."""
    raw = parse_wg_key(key)
    return WG_URI_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def device_uri(device_id: str) -> str:
    if not DEVICE_ID_RE.match(device_id):
        raise ValueError(f"device id must match {DEVICE_ID_RE.pattern}: {device_id!r}")
    return DEVICE_URI_PREFIX + device_id


def _san_uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def certificate_wg_keys(cert: x509.Certificate) -> list[bytes]:
    """Every WireGuard key the certificate binds (normally zero or one). A URI with our
    prefix but an unparsable key yields b"" so that callers refuse instead of ignoring it."""
    keys: list[bytes] = []
    for uri in _san_uris(cert):
        if uri.startswith(WG_URI_PREFIX):
            try:
                keys.append(parse_wg_key(uri[len(WG_URI_PREFIX):]))
            except WireGuardKeyError:
                keys.append(b"")
    return keys


def certificate_device_ids(cert: x509.Certificate) -> list[str]:
    return [u[len(DEVICE_URI_PREFIX):] for u in _san_uris(cert) if u.startswith(DEVICE_URI_PREFIX)]


@dataclass(frozen=True, slots=True)
class RecordedBinding:
    """What the registry stores at enrollment for a certificate without our URI."""

    cert_fingerprint_sha256: str   # lowercase hex of SHA-256 over the certificate DER
    wg_public_key: str             # standard base64

    def key_bytes(self) -> bytes:
        return parse_wg_key(self.wg_public_key)


class BindingSource(StrEnum):
    CERTIFICATE = "certificate"    # SAN URI urn:kanmon:wg:... in the certificate
    ENROLLMENT = "enrollment"      # registry record made at enrollment (MDM certificates)


class BindingState(StrEnum):
    CERT_MATCH = "cert-match"                  # certificate URI == presented key
    CERT_MISMATCH = "cert-mismatch"            # certificate binds another key (or several)
    RECORDED_MATCH = "recorded-match"          # record for this certificate == presented key
    RECORDED_MISMATCH = "recorded-mismatch"    # record for this certificate, another key
    UNRECORDED = "unrecorded"                  # no URI and no record for this certificate


@dataclass(frozen=True, slots=True)
class BindingCheck:
    state: BindingState
    source: BindingSource

    @property
    def ok(self) -> bool:
        return self.state in (BindingState.CERT_MATCH, BindingState.RECORDED_MATCH)

    @property
    def may_record(self) -> bool:
        """True only when nothing binds this certificate yet: the enrollment endpoint may
        then record (fingerprint, key) if its own policy allows (first enrollment)."""
        return self.state is BindingState.UNRECORDED


def check_binding(cert: x509.Certificate, fingerprint_sha256: str, presented_key: bytes,
                  recorded: RecordedBinding | None) -> BindingCheck:
    """Decide whether `presented_key` (32 raw bytes) is bound to `cert`.

    A key carried in the certificate always wins: a record cannot override it. Without a URI
    the record must name this exact certificate (fingerprint); a record for an older
    certificate of the same device counts as no record (UNRECORDED), so the caller decides
    whether a renewed MDM certificate may be re-bound."""
    in_cert = certificate_wg_keys(cert)
    if in_cert:
        if len(in_cert) == 1 and in_cert[0] == presented_key:
            if recorded is not None and recorded.cert_fingerprint_sha256 == fingerprint_sha256 \
                    and _recorded_key(recorded) != presented_key:
                return BindingCheck(BindingState.RECORDED_MISMATCH, BindingSource.CERTIFICATE)
            return BindingCheck(BindingState.CERT_MATCH, BindingSource.CERTIFICATE)
        return BindingCheck(BindingState.CERT_MISMATCH, BindingSource.CERTIFICATE)
    if recorded is None or recorded.cert_fingerprint_sha256.lower() != fingerprint_sha256:
        return BindingCheck(BindingState.UNRECORDED, BindingSource.ENROLLMENT)
    if _recorded_key(recorded) == presented_key:
        return BindingCheck(BindingState.RECORDED_MATCH, BindingSource.ENROLLMENT)
    return BindingCheck(BindingState.RECORDED_MISMATCH, BindingSource.ENROLLMENT)


def _recorded_key(recorded: RecordedBinding) -> bytes | None:
    try:
        return recorded.key_bytes()
    except WireGuardKeyError:
        return None
