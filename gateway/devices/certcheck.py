"""Is this device certificate acceptable right now, for this WireGuard key? Pure: takes
bytes/objects and `now`, does no I/O, keeps no state. Used by the enrollment endpoint (mTLS)
and by periodic re-validation (issue #3, NISC smartphone guide 5.4 device authentication,
6.2(5) lost/stolen devices cut off; IPA SME sample 技術的対策 1.3).

Order of checks, first failure wins (each has a stable reason code for the auth log):
  no-certificate, malformed  -> parse the leaf and the presented chain
  untrusted-ca, bad-signature -> walk issuer names to a trust anchor, checking each signature
  not-yet-valid, expired     -> the leaf's validity window at `now`
  not-client-auth            -> leaf is an end entity (CA:FALSE), EKU has clientAuth,
                                keyUsage (when present) has digitalSignature
  chain-invalid              -> full RFC 5280 path validation by cryptography's ClientVerifier
                                (CA basicConstraints / keyUsage, path length, intermediate
                                validity, algorithms) — catches anything the pre-checks do not
  revoked-crl                -> every certificate below the anchor against CRLs signed by its
                                issuer
  bad-wg-key, key-not-bound  -> the presented WireGuard key and the binding (binding.py)

Why both a walk and ClientVerifier: `cryptography` 48 has `PolicyBuilder.build_client_verifier`
and we use it as the authority on the chain. Its VerificationError is a free-text message, so
the cheap pre-checks above come first to give the auth log a precise, stable reason.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (Criticality, ExtensionPolicy, PolicyBuilder, Store,
                                            VerificationError)

from gateway.devices.binding import (BindingCheck, BindingState, RecordedBinding, WireGuardKeyError,
                                     certificate_device_ids, check_binding, parse_wg_key)
from gateway.i18n import Text

MAX_CHAIN_DEPTH = 6


class Reason(StrEnum):
    OK = "ok"
    NO_CERTIFICATE = "no-certificate"
    MALFORMED = "malformed"
    UNTRUSTED_CA = "untrusted-ca"
    BAD_SIGNATURE = "bad-signature"
    NOT_YET_VALID = "not-yet-valid"
    EXPIRED = "expired"
    NOT_CLIENT_AUTH = "not-client-auth"
    CHAIN_INVALID = "chain-invalid"
    REVOKED_CRL = "revoked-crl"
    BAD_WG_KEY = "bad-wg-key"
    KEY_NOT_BOUND = "key-not-bound"


MESSAGES: dict[Reason, Text] = {
    Reason.OK: Text("端末証明書を確認しました", "device certificate accepted"),
    Reason.NO_CERTIFICATE: Text("クライアント証明書が提示されていません",
                                "no client certificate was presented"),
    Reason.MALFORMED: Text("証明書を読み取れません", "the certificate cannot be parsed"),
    Reason.UNTRUSTED_CA: Text("信頼済みの CA が発行した証明書ではありません",
                              "the certificate was not issued by a trusted CA"),
    Reason.BAD_SIGNATURE: Text("証明書の署名が発行者の鍵で検証できません",
                               "the certificate signature does not verify with its issuer's key"),
    Reason.NOT_YET_VALID: Text("証明書はまだ有効期間前です", "the certificate is not valid yet"),
    Reason.EXPIRED: Text("証明書の有効期限が切れています", "the certificate has expired"),
    Reason.NOT_CLIENT_AUTH: Text("クライアント認証用の端末証明書ではありません",
                                 "not a client-authentication device certificate"),
    Reason.CHAIN_INVALID: Text("証明書チェーンの検証に失敗しました", "certificate chain validation failed"),
    Reason.REVOKED_CRL: Text("証明書は失効しています(CRL)", "the certificate is revoked (CRL)"),
    Reason.BAD_WG_KEY: Text("WireGuard 公開鍵の形式が不正です", "the WireGuard public key is malformed"),
    Reason.KEY_NOT_BOUND: Text("WireGuard 公開鍵がこの証明書に結び付けられていません",
                               "the WireGuard public key is not bound to this certificate"),
}


@dataclass(frozen=True, slots=True)
class CertCheck:
    ok: bool
    reason: Reason
    message: Text
    detail: str = ""                       # technical English detail for logs
    serial: int | None = None
    subject: str | None = None             # RFC 4514
    issuer: str | None = None
    fingerprint_sha256: str | None = None  # lowercase hex over the leaf DER
    device_id: str | None = None
    device_id_source: str | None = None    # "san-uri" (urn:kanmon:device:<id>) or "subject-cn"
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    binding: BindingCheck | None = None
    crl_stale: bool = False                # an applicable CRL is past its nextUpdate
    chain: tuple[x509.Certificate, ...] = field(default=())   # verified, leaf first

    @property
    def serial_hex(self) -> str | None:
        return None if self.serial is None else format(self.serial, "x")

    def as_log_fields(self) -> dict[str, object]:
        """Fields for the auth-log record (the caller adds time and source IP)."""
        return {
            "result": "ok" if self.ok else "refused",
            "reason": str(self.reason),
            "detail": self.detail,
            "serial": self.serial_hex,
            "subject": self.subject,
            "issuer": self.issuer,
            "fingerprint_sha256": self.fingerprint_sha256,
            "device_id": self.device_id,
            "binding": None if self.binding is None else str(self.binding.state),
            "crl_stale": self.crl_stale,
        }


# ---------------------------------------------------------------- parsing

def _parse_one(data: bytes | x509.Certificate) -> list[x509.Certificate]:
    if isinstance(data, x509.Certificate):
        return [data]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"expected bytes or a Certificate, got {type(data).__name__}")
    raw = bytes(data)
    if raw.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificates(raw)
    return [x509.load_der_x509_certificate(raw)]


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _walk_to_anchor(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                    trusted: Sequence[x509.Certificate]) -> tuple[Reason, str] | None:
    """Follow issuer names up to a trust anchor, checking each signature. None = anchored."""
    current = leaf
    used: set[bytes] = set()
    for _ in range(MAX_CHAIN_DEPTH):
        anchors = [t for t in trusted if t.subject == current.issuer]
        if any(_issued_by(current, t) for t in anchors):
            return None
        named = [c for c in intermediates
                 if c.subject == current.issuer and c.fingerprint(hashes.SHA256()) not in used]
        signers = [c for c in named if _issued_by(current, c)]
        if not signers:
            if anchors or named:
                return (Reason.BAD_SIGNATURE,
                        f"signature of '{current.subject.rfc4514_string()}' does not verify with "
                        f"the key of issuer '{current.issuer.rfc4514_string()}'")
            return (Reason.UNTRUSTED_CA,
                    f"no trusted CA named '{current.issuer.rfc4514_string()}'")
        current = signers[0]
        used.add(current.fingerprint(hashes.SHA256()))
    return Reason.UNTRUSTED_CA, f"no trust anchor within {MAX_CHAIN_DEPTH} certificates"


def _client_auth_problem(leaf: x509.Certificate) -> str | None:
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "the certificate is a CA certificate, not an end entity"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "no extendedKeyUsage extension (clientAuth required)"
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        return "extendedKeyUsage lacks clientAuth"
    try:
        if not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature:
            return "keyUsage lacks digitalSignature"
    except x509.ExtensionNotFound:
        pass
    return None


def _require_client_auth(_policy: object, _cert: x509.Certificate,
                         eku: x509.ExtendedKeyUsage) -> None:
    if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise ValueError("extendedKeyUsage lacks clientAuth")


def _verifier_policies() -> tuple[ExtensionPolicy, ExtensionPolicy]:
    """CA side: the WebPKI defaults (basicConstraints CA:TRUE critical, keyUsage with
    keyCertSign, pathLen honoured). End-entity side: WebPKI defaults with two relaxations for
    MDM/SCEP-issued certificates, which often identify the device only by subject CN and
    come from issuers that omit authorityKeyIdentifier — the chain is still built by name and
    checked by signature — and one tightening: extendedKeyUsage must be present with
    clientAuth (WebPKI would accept a leaf without EKU)."""
    ca_policy = ExtensionPolicy.webpki_defaults_ca()
    ee_policy = (ExtensionPolicy.webpki_defaults_ee()
                 .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
                 .may_be_present(x509.AuthorityKeyIdentifier, Criticality.NON_CRITICAL, None)
                 .require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC,
                                  _require_client_auth))
    return ca_policy, ee_policy


def _extend_to_root(chain: tuple[x509.Certificate, ...],
                    trusted: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """When the anchor is a trusted intermediate (an MDM bundle often holds root and issuing
    CA), continue upwards through trusted certificates so that a root's CRL revoking that
    intermediate is honoured too."""
    extended = list(chain)
    for _ in range(MAX_CHAIN_DEPTH):
        top = extended[-1]
        if top.issuer == top.subject:
            break
        parents = [t for t in trusted if t.subject == top.issuer and t not in extended
                   and _issued_by(top, t)]
        if not parents:
            break
        extended.append(parents[0])
    return tuple(extended)


def _revocation(chain: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList],
                now: dt.datetime) -> tuple[str | None, bool]:
    """(detail of the first revoked certificate or None, whether an applicable CRL is stale).
    A CRL counts only when its issuer name matches and the issuer's key verifies it."""
    stale = False
    for cert, issuer in zip(chain, chain[1:]):
        for crl in crls:
            if crl.issuer != issuer.subject:
                continue
            try:
                if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                    continue
            except (TypeError, ValueError, UnsupportedAlgorithm):
                continue
            if crl.next_update_utc is not None and crl.next_update_utc < now:
                stale = True
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                why = ""
                try:
                    why = f", reason {entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value}"
                except x509.ExtensionNotFound:
                    pass
                return (f"serial {cert.serial_number:x} of '{cert.subject.rfc4514_string()}' "
                        f"revoked {entry.revocation_date_utc:%Y-%m-%dT%H:%M:%SZ}{why}"), stale
    return None, stale


# ---------------------------------------------------------------- the check

def check_device_certificate(leaf_pem_or_der: bytes | x509.Certificate | None,
                             chain: Sequence[bytes | x509.Certificate],
                             trusted_cas: Sequence[x509.Certificate],
                             crls: Sequence[x509.CertificateRevocationList],
                             now: dt.datetime,
                             wg_public_key: str | bytes,
                             recorded_binding: RecordedBinding | None = None) -> CertCheck:
    """Check a presented device certificate. `chain` holds the intermediates the client sent
    (PEM bundles, DER or Certificate objects; the leaf may be repeated there, it is ignored).
    `now` must be timezone-aware. Never raises on bad input: refusals come back as CertCheck."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if isinstance(leaf_pem_or_der, str):
        leaf_pem_or_der = leaf_pem_or_der.encode("ascii", "replace")
    if leaf_pem_or_der is None or (not isinstance(leaf_pem_or_der, x509.Certificate)
                                   and not bytes(leaf_pem_or_der).strip()):
        return _refuse(Reason.NO_CERTIFICATE, "no client certificate")

    try:
        parsed = _parse_one(leaf_pem_or_der)
        if not parsed:
            return _refuse(Reason.NO_CERTIFICATE, "empty PEM")
        leaf = parsed[0]
        intermediates = parsed[1:] + [c for item in chain for c in _parse_one(item)]
        fingerprint = leaf.fingerprint(hashes.SHA256()).hex()
        info = _leaf_info(leaf, fingerprint)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        return _refuse(Reason.MALFORMED, f"{type(exc).__name__}: {exc}")
    if isinstance(info, str):
        return _refuse(Reason.MALFORMED, info)
    intermediates = [c for c in intermediates if c.fingerprint(hashes.SHA256()).hex() != fingerprint]

    walk = _walk_to_anchor(leaf, intermediates, trusted_cas)
    if walk is not None:
        return _refuse(walk[0], walk[1], **info)
    if now < leaf.not_valid_before_utc:
        return _refuse(Reason.NOT_YET_VALID, f"valid from {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}", **info)
    if now > leaf.not_valid_after_utc:
        return _refuse(Reason.EXPIRED, f"expired {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}", **info)
    problem = _client_auth_problem(leaf)
    if problem is not None:
        return _refuse(Reason.NOT_CLIENT_AUTH, problem, **info)

    ca_policy, ee_policy = _verifier_policies()
    try:
        verifier = (PolicyBuilder().store(Store(list(trusted_cas))).time(now)
                    .max_chain_depth(MAX_CHAIN_DEPTH)
                    .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
                    .build_client_verifier())
        verified = verifier.verify(leaf, intermediates)
    except (VerificationError, ValueError) as exc:
        return _refuse(Reason.CHAIN_INVALID, str(exc), **info)
    verified_chain = tuple(verified.chain)

    revoked, stale = _revocation(_extend_to_root(verified_chain, trusted_cas), crls, now)
    if revoked is not None:
        return _refuse(Reason.REVOKED_CRL, revoked, crl_stale=stale, chain=verified_chain, **info)

    try:
        presented = parse_wg_key(wg_public_key)
    except WireGuardKeyError as exc:
        return _refuse(Reason.BAD_WG_KEY, str(exc), crl_stale=stale, chain=verified_chain, **info)
    binding = check_binding(leaf, fingerprint, presented, recorded_binding)
    if not binding.ok:
        detail = {
            BindingState.CERT_MISMATCH: "the certificate binds a different WireGuard key",
            BindingState.RECORDED_MISMATCH: "the key recorded at enrollment for this certificate differs",
            BindingState.UNRECORDED: "the certificate carries no WireGuard key and no binding is recorded for it",
        }.get(binding.state, str(binding.state))
        return _refuse(Reason.KEY_NOT_BOUND, detail, binding=binding, crl_stale=stale,
                       chain=verified_chain, **info)
    return CertCheck(ok=True, reason=Reason.OK, message=MESSAGES[Reason.OK], detail="",
                     binding=binding, crl_stale=stale, chain=verified_chain, **info)


def _leaf_info(leaf: x509.Certificate, fingerprint: str) -> dict[str, object] | str:
    """Identity fields of the leaf, or a string saying why they are malformed."""
    san_ids = certificate_device_ids(leaf)
    if len(set(san_ids)) > 1:
        return f"more than one device id in the certificate: {sorted(set(san_ids))}"
    if san_ids:
        device_id, source = san_ids[0], "san-uri"
    else:
        device_id, source = _cn(leaf.subject), "subject-cn"
        if device_id is None:
            source = None
    return {
        "serial": leaf.serial_number,
        "subject": leaf.subject.rfc4514_string(),
        "issuer": leaf.issuer.rfc4514_string(),
        "fingerprint_sha256": fingerprint,
        "device_id": device_id,
        "device_id_source": source,
        "not_before": leaf.not_valid_before_utc,
        "not_after": leaf.not_valid_after_utc,
    }


def _refuse(reason: Reason, detail: str, **fields: object) -> CertCheck:
    return CertCheck(ok=False, reason=reason, message=MESSAGES[reason], detail=detail,
                     **fields)  # type: ignore[arg-type]
