"""Organization device CA, trusted external CA bundles and imported CRLs.

Layout of a `CaStore` rooted at the directory the caller gives (normally <state>/pki):

    ca/ca.key.pem        org device CA private key (PKCS#8 PEM, 0600)
    ca/ca.cert.pem       org device CA certificate (0600 like everything here)
    trusted/<sha256>.pem one file per trusted external CA certificate (MDM / SCEP)
    crl/<sha256>.crl.pem newest CRL per issuing CA, named by the issuer certificate fingerprint

Key algorithm: ECDSA P-256 with SHA-256, for the CA and for device keys. Ed25519 would be
smaller and faster, but (1) `cryptography`'s chain verifier (x509.verification, which
certcheck.py relies on) refuses Ed25519 keys as a WebPKI-forbidden algorithm, (2) iOS
and Android keystores and MDM/SCEP stacks do not accept Ed25519 client identities, and
(3) TLS client authentication to the enrollment endpoint from phones needs P-256 or RSA.

I/O lives in CaStore and the init/trust/import functions; `issue_device_certificate` and
`validate_ca_bundle` / `validate_crl` are pure so the enrollment path and tests can use them
without a disk. Guideline references: NISC smartphone guide 5.4 (device authentication,
device certificates), 6.2(5) (cut off lost devices — the CRL path), IPA SME sample
組織的対策 6 / 技術的対策 1.3 (device authentication by certificate).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.devices.binding import DEVICE_ID_RE, WireGuardKeyError, device_uri, wg_key_uri
from gateway.i18n import Text

DEVICE_CURVE = ec.SECP256R1()
MIN_RSA_BITS = 2048
ALLOWED_CURVES = ("secp256r1", "secp384r1", "secp521r1")


class DeviceCaError(Exception):
    """A refusal with a stable code and a bilingual message; nothing was written."""

    def __init__(self, code: str, text: Text) -> None:
        super().__init__(text.en)
        self.code = code
        self.text = text


@dataclass(frozen=True, slots=True)
class OrgCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey | None   # None when a CSR was signed

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes | None:
        if self.private_key is None:
            return None
        return self.private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    @property
    def fingerprint_sha256(self) -> str:
        return fingerprint_sha256(self.certificate)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _utc(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None:
        raise DeviceCaError("naive-time", Text(
            f"{what} にタイムゾーンがありません(UTC などを指定してください)",
            f"{what} has no time zone (give an aware datetime, e.g. UTC)"))
    return value.astimezone(dt.timezone.utc)


def _now(now: dt.datetime | None) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) if now is None else _utc(now, "now")


# ---------------------------------------------------------------- pure: CA creation / issuing

def build_org_ca(org_name: str, *, now: dt.datetime, valid_days: int = 3650,
                 common_name: str | None = None) -> OrgCa:
    """A self-signed device CA. pathLen 0: it signs device certificates only, never sub-CAs."""
    org_name = org_name.strip()
    if not org_name:
        raise DeviceCaError("bad-org", Text("組織名が空です", "organization name is empty"))
    if not 1 <= valid_days <= 36500:
        raise DeviceCaError("bad-validity", Text(
            f"CA の有効日数が範囲外です: {valid_days}", f"CA validity days out of range: {valid_days}"))
    key = ec.generate_private_key(DEVICE_CURVE)
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, org_name),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"{org_name} Kanmon device CA"),
    ])
    start = now - dt.timedelta(minutes=5)   # tolerate small clock skew on devices
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return OrgCa(key=key, cert=cert)


def load_csr(csr: bytes | x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    """Parse a CSR (PEM or DER) and check its self-signature (proof of key possession)."""
    if isinstance(csr, x509.CertificateSigningRequest):
        req = csr
    else:
        try:
            req = (x509.load_pem_x509_csr(csr) if csr.lstrip().startswith(b"-----BEGIN")
                   else x509.load_der_x509_csr(csr))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise DeviceCaError("csr-malformed", Text(
                f"CSR を読み取れません: {exc}", f"cannot parse the CSR: {exc}")) from exc
    try:
        valid = req.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DeviceCaError("csr-bad-signature", Text(
            f"CSR の署名を検証できません: {exc}", f"cannot verify the CSR signature: {exc}")) from exc
    if not valid:
        raise DeviceCaError("csr-bad-signature", Text(
            "CSR の署名が不正です(鍵の所持を証明していません)",
            "the CSR signature is invalid (it does not prove possession of the key)"))
    _check_device_key(req.public_key())
    return req


def _check_device_key(public_key: object) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in ALLOWED_CURVES:
        return
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= MIN_RSA_BITS:
        return
    raise DeviceCaError("csr-bad-key", Text(
        f"CSR の鍵の種類は使えません(ECDSA P-256/P-384/P-521 か RSA {MIN_RSA_BITS} ビット以上)",
        f"unsupported CSR key type (use ECDSA P-256/P-384/P-521 or RSA >= {MIN_RSA_BITS} bits)"))


def issue_device_certificate(ca: OrgCa, device_id: str, wg_public_key: str | bytes, owner: str,
                             not_before: dt.datetime, not_after: dt.datetime,
                             csr: bytes | x509.CertificateSigningRequest | None = None
                             ) -> IssuedCertificate:
    """Issue a device client certificate binding `wg_public_key` (SAN URI urn:kanmon:wg:...).

    Subject CN = device id, O = the CA's organization, UID = owner. SAN URIs
    urn:kanmon:device:<id> (where certcheck.py reads the device id) and urn:kanmon:wg:<key>.
    With `csr` the CSR's key is certified (after its signature is checked) and its subject and
    extensions are ignored; without, a new P-256 key pair is generated and returned."""
    if not DEVICE_ID_RE.match(device_id or ""):
        raise DeviceCaError("bad-device-id", Text(
            f"端末 ID は英数字と . _ - で 64 文字までです: {device_id!r}",
            f"a device id is letters, digits, '.', '_', '-' (max 64): {device_id!r}"))
    try:
        wg_uri = wg_key_uri(wg_public_key)
    except WireGuardKeyError as exc:
        raise DeviceCaError("bad-wg-key", Text(
            f"WireGuard 公開鍵が不正です: {exc.text.ja}", f"invalid WireGuard public key: {exc.text.en}")) from exc
    owner = (owner or "").strip()
    if not owner or len(owner) > 128:
        raise DeviceCaError("bad-owner", Text(
            "所有者は 1〜128 文字で指定してください", "owner must be 1 to 128 characters"))
    start, end = _utc(not_before, "not_before"), _utc(not_after, "not_after")
    if end <= start:
        raise DeviceCaError("bad-validity", Text(
            "有効期限の終了が開始より前です", "not_after is not after not_before"))
    # A start before the CA existed is narrowed to the CA's start (harmless); an end after
    # the CA expires is refused, since the certificate would silently die early.
    start = max(start, ca.cert.not_valid_before_utc)
    if end > ca.cert.not_valid_after_utc or end <= start:
        raise DeviceCaError("outside-ca-validity", Text(
            f"端末証明書の有効期間が CA の有効期間({ca.cert.not_valid_before_utc:%Y-%m-%d}〜"
            f"{ca.cert.not_valid_after_utc:%Y-%m-%d})を外れています",
            f"the device certificate validity must lie within the CA's "
            f"({ca.cert.not_valid_before_utc:%Y-%m-%d} to {ca.cert.not_valid_after_utc:%Y-%m-%d})"))

    private_key: ec.EllipticCurvePrivateKey | None = None
    if csr is None:
        private_key = ec.generate_private_key(DEVICE_CURVE)
        public_key = private_key.public_key()
    else:
        public_key = load_csr(csr).public_key()

    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
    orgs = ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if orgs:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, str(orgs[0].value)))
    attrs.append(x509.NameAttribute(NameOID.USER_ID, owner))
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs)).issuer_name(ca.cert.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(device_uri(device_id)),
            x509.UniformResourceIdentifier(wg_uri)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCertificate(certificate=cert, private_key=private_key)


def device_pkcs12(issued: IssuedCertificate, ca_cert: x509.Certificate, password: bytes,
                  friendly_name: str, *, legacy: bool = False) -> bytes:
    """The device identity as PKCS#12 for import into a phone keystore. `legacy=True` uses
    3DES/SHA-1 (needed by Android < 12 and iOS < 15 keystore importers); the default is
    AES-256 with PBKDF2-SHA256."""
    if issued.private_key is None:
        raise DeviceCaError("no-private-key", Text(
            "CSR で発行した証明書には秘密鍵がありません(端末が保持しています)",
            "a certificate issued from a CSR has no private key here (the device holds it)"))
    if not password:
        raise DeviceCaError("no-password", Text(
            "PKCS#12 にはパスワードが必要です", "a PKCS#12 bundle needs a password"))
    if legacy:
        enc = (serialization.PrivateFormat.PKCS12.encryption_builder()
               .kdf_rounds(50000)
               .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
               .hmac_hash(hashes.SHA1()).build(password))
    else:
        enc = serialization.BestAvailableEncryption(password)
    return pkcs12.serialize_key_and_certificates(friendly_name.encode("utf-8"), issued.private_key,
                                                 issued.certificate, [ca_cert], enc)


# ---------------------------------------------------------------- pure: validating input

def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def ca_problems(cert: x509.Certificate, now: dt.datetime) -> list[Text]:
    """Why `cert` cannot serve as a trusted CA (empty list = fine)."""
    problems: list[Text] = []
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        problems.append(Text("CA 証明書ではありません(basicConstraints CA:TRUE がない)",
                             "not a CA certificate (no basicConstraints CA:TRUE)"))
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        signs = ku.key_cert_sign
    except x509.ExtensionNotFound:
        signs = False
    if not signs:
        problems.append(Text("keyUsage に keyCertSign がありません",
                             "keyUsage lacks keyCertSign"))
    if cert.not_valid_after_utc < now:
        problems.append(Text(f"有効期限切れです({cert.not_valid_after_utc:%Y-%m-%d})",
                             f"expired ({cert.not_valid_after_utc:%Y-%m-%d})"))
    key = cert.public_key()
    if not ((isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ALLOWED_CURVES)
            or (isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS)):
        problems.append(Text("鍵の種類が検証器で使えません(ECDSA P-256/384/521 か RSA 2048 以上)",
                             "key type the verifier refuses (need ECDSA P-256/384/521 or RSA >= 2048)"))
    return problems


def validate_ca_bundle(pem_bytes: bytes, now: dt.datetime) -> list[x509.Certificate]:
    """Every certificate in the PEM bundle, or DeviceCaError naming each offending one."""
    try:
        certs = x509.load_pem_x509_certificates(pem_bytes)
    except ValueError as exc:
        raise DeviceCaError("bundle-malformed", Text(
            f"PEM の CA 証明書バンドルを読み取れません: {exc}",
            f"cannot parse the PEM CA bundle: {exc}")) from exc
    errors_ja: list[str] = []
    errors_en: list[str] = []
    for index, cert in enumerate(certs, start=1):
        for problem in ca_problems(cert, now):
            errors_ja.append(f"#{index} {_describe(cert)}: {problem.ja}")
            errors_en.append(f"#{index} {_describe(cert)}: {problem.en}")
    if errors_en:
        raise DeviceCaError("bundle-not-ca", Text(
            "バンドルを信頼できません(何も登録していません):\n  " + "\n  ".join(errors_ja),
            "refusing the bundle (nothing was trusted):\n  " + "\n  ".join(errors_en)))
    return certs


def load_crl(crl_bytes: bytes) -> x509.CertificateRevocationList:
    try:
        if crl_bytes.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(crl_bytes)
        return x509.load_der_x509_crl(crl_bytes)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise DeviceCaError("crl-malformed", Text(
            f"CRL を読み取れません(PEM または DER): {exc}",
            f"cannot parse the CRL (PEM or DER): {exc}")) from exc


def crl_signer(crl: x509.CertificateRevocationList,
               trusted: list[x509.Certificate]) -> x509.Certificate | None:
    """The trusted CA whose name matches the CRL issuer and whose key verifies its signature."""
    for ca in trusted:
        if ca.subject != crl.issuer:
            continue
        try:
            if crl.is_signature_valid(ca.public_key()):  # type: ignore[arg-type]
                return ca
        except (TypeError, ValueError, UnsupportedAlgorithm):
            continue
    return None


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


CRL_CLOCK_SKEW = dt.timedelta(minutes=5)
# What reading `.extensions` raises on a bad extension (DuplicateExtension is no ValueError).
_EXTENSION_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def crl_problems(crl: x509.CertificateRevocationList, now: dt.datetime | None = None) -> list[Text]:
    """Why the (signature-checked) CRL is not well-formed: every extension of the CRL and of
    each entry parsed strictly (cryptography raises on a duplicated or malformed extension,
    but only when `.extensions` is read -- a CRL that was stored unread would break every
    later import), and its dates in order."""
    problems: list[Text] = []
    try:
        crl.extensions                                   # noqa: B018 - parsing is the check
    except _EXTENSION_ERRORS as exc:
        problems.append(Text(f"CRL の拡張が不正です: {exc}", f"the CRL has an invalid extension: {exc}"))
    try:
        for index, entry in enumerate(crl, start=1):
            try:
                entry.extensions                         # noqa: B018
            except _EXTENSION_ERRORS as exc:
                problems.append(Text(f"失効エントリ {index}(シリアル {entry.serial_number:x})の拡張が不正です: {exc}",
                                     f"revoked entry {index} (serial {entry.serial_number:x}) has an invalid "
                                     f"extension: {exc}"))
    except ValueError as exc:
        problems.append(Text(f"失効エントリを読めません: {exc}", f"cannot read the revoked entries: {exc}"))
    last, nxt = crl.last_update_utc, crl.next_update_utc
    if now is not None and last > now + CRL_CLOCK_SKEW:
        problems.append(Text(f"発行日時 {last:%Y-%m-%d %H:%M}Z が未来です", f"its issue time {last:%Y-%m-%d %H:%M}Z is in the future"))
    if nxt is not None and nxt <= last:
        problems.append(Text(f"次回更新 {nxt:%Y-%m-%d %H:%M}Z が発行日時 {last:%Y-%m-%d %H:%M}Z 以前です",
                             f"its next update {nxt:%Y-%m-%d %H:%M}Z is not after its issue time {last:%Y-%m-%d %H:%M}Z"))
    return problems


def validate_crl(crl_bytes: bytes, trusted: list[x509.Certificate], now: dt.datetime | None = None
                 ) -> tuple[x509.CertificateRevocationList, x509.Certificate]:
    """The CRL and the trusted CA that signed it, checked completely before anything is
    stored: parsed, issuer = a trusted CA's subject, signature by that CA's key, the CA may
    sign CRLs (keyUsage cRLSign when present), every extension well-formed, dates in order."""
    crl = load_crl(crl_bytes)
    signer = crl_signer(crl, trusted)
    if signer is None:
        raise DeviceCaError("crl-untrusted", Text(
            f"CRL の発行者 {crl.issuer.rfc4514_string()} は信頼済み CA ではないか、署名が一致しません"
            "(先に `kanmon ca trust` で CA を登録してください)",
            f"the CRL issuer {crl.issuer.rfc4514_string()} is not a trusted CA or its signature "
            "does not verify (trust the CA first with `kanmon ca trust`)"))
    problems = crl_problems(crl, now)
    try:
        if not signer.extensions.get_extension_for_class(x509.KeyUsage).value.crl_sign:
            problems.append(Text("署名した CA の keyUsage に cRLSign がありません", "the signing CA's keyUsage lacks cRLSign"))
    except x509.ExtensionNotFound:
        pass
    if problems:
        raise DeviceCaError("crl-malformed", Text(
            "CRL を取り込みません(何も保存していません):\n  " + "\n  ".join(p.ja for p in problems),
            "refusing the CRL (nothing was stored):\n  " + "\n  ".join(p.en for p in problems)))
    return crl, signer


# ---------------------------------------------------------------- I/O: the store on disk

def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 (never briefly world-readable)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class ImportedCrl:
    issuer: str
    path: Path
    revoked_count: int
    next_update: dt.datetime | None


PKI_SUBDIR = "pki"


def pki_dir(state_dir: str | os.PathLike[str]) -> Path:
    """Where the CLI keeps the CaStore inside the gateway state directory."""
    return Path(state_dir) / PKI_SUBDIR


class CaStore:
    """The device PKI files under one directory (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.ca_dir = self.root / "ca"
        self.trusted_dir = self.root / "trusted"
        self.crl_dir = self.root / "crl"
        self.key_path = self.ca_dir / "ca.key.pem"
        self.cert_path = self.ca_dir / "ca.cert.pem"

    def has_org_ca(self) -> bool:
        return self.key_path.exists() or self.cert_path.exists()

    def load_org_ca(self) -> OrgCa:
        try:
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except FileNotFoundError as exc:
            raise DeviceCaError("no-ca", Text(
                f"組織の端末 CA がありません: {self.ca_dir}(`kanmon ca init` で作成)",
                f"no organization device CA in {self.ca_dir} (create it with `kanmon ca init`)")
            ) from exc
        except ValueError as exc:
            raise DeviceCaError("ca-corrupt", Text(
                f"組織の端末 CA ファイルが壊れています: {exc}",
                f"the organization device CA files are corrupt: {exc}")) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or \
                key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise DeviceCaError("ca-corrupt", Text(
                "CA の秘密鍵と証明書が一致しません", "the CA private key does not match its certificate"))
        return OrgCa(key=key, cert=cert)

    def org_ca_cert(self) -> x509.Certificate | None:
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except FileNotFoundError:
            return None

    def trusted_cas(self) -> list[x509.Certificate]:
        """The org CA certificate (when present) plus every trusted external CA."""
        certs: list[x509.Certificate] = []
        own = self.org_ca_cert()
        if own is not None:
            certs.append(own)
        if self.trusted_dir.is_dir():
            for path in sorted(self.trusted_dir.glob("*.pem")):
                certs.extend(x509.load_pem_x509_certificates(path.read_bytes()))
        return certs

    def crls(self) -> list[x509.CertificateRevocationList]:
        if not self.crl_dir.is_dir():
            return []
        return [x509.load_pem_x509_crl(p.read_bytes()) for p in sorted(self.crl_dir.glob("*.crl.pem"))]


def init_ca(root: str | os.PathLike[str], org_name: str, *, now: dt.datetime | None = None,
            valid_days: int = 3650, common_name: str | None = None) -> OrgCa:
    """Create the organization device CA under root/ca/. Refuses to overwrite one."""
    store = CaStore(root)
    if store.has_org_ca():
        raise DeviceCaError("ca-exists", Text(
            f"組織の端末 CA は既にあります: {store.ca_dir}(上書きしません)",
            f"an organization device CA already exists in {store.ca_dir} (not overwriting it)"))
    ca = build_org_ca(org_name, now=_now(now), valid_days=valid_days, common_name=common_name)
    for d in (store.root, store.ca_dir, store.trusted_dir, store.crl_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(store.key_path, ca.key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    _write_private(store.cert_path, ca.cert.public_bytes(serialization.Encoding.PEM))
    return ca


PROFILE_SIGNER_DAYS = 397


def profile_signer(root: str | os.PathLike[str], *, now: dt.datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, OrgCa]:
    """The certificate that signs exported iOS profiles: a leaf of the organization CA
    (digitalSignature; code signing and S/MIME purposes), kept beside the CA as
    ca/profile-signer.{cert,key}.pem and issued anew when missing, unreadable, issued by
    another CA or within 30 days of its end. Raises DeviceCaError without an org CA."""
    store = CaStore(root)
    ca = store.load_org_ca()
    when = _now(now)
    cert_path, key_path = store.ca_dir / "profile-signer.cert.pem", store.ca_dir / "profile-signer.key.pem"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if (cert.issuer == ca.cert.subject and isinstance(key, ec.EllipticCurvePrivateKey)
                and key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
                and cert.not_valid_after_utc - when > dt.timedelta(days=30)):
            return cert, key, ca
    except (OSError, ValueError):
        pass
    key = ec.generate_private_key(DEVICE_CURVE)
    start = when - dt.timedelta(minutes=5)
    org = ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(([org[0]] if org else [])
                                + [x509.NameAttribute(NameOID.COMMON_NAME, "Kanmon profile signing")]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(min(start + dt.timedelta(days=PROFILE_SIGNER_DAYS),
                                                     ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING,
                                              ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, ca


def trust_bundle(root: str | os.PathLike[str], pem_bytes: bytes, *,
                 now: dt.datetime | None = None) -> list[x509.Certificate]:
    """Trust every CA certificate in a PEM bundle (all or nothing). Returns them."""
    certs = validate_ca_bundle(pem_bytes, _now(now))
    if not certs:
        raise DeviceCaError("bundle-empty", Text(
            "バンドルに証明書がありません", "the bundle holds no certificate"))
    store = CaStore(root)
    for cert in certs:
        _write_private(store.trusted_dir / f"{fingerprint_sha256(cert)}.pem",
                       cert.public_bytes(serialization.Encoding.PEM))
    return certs


@dataclass(frozen=True, slots=True)
class PreparedCrl:
    """A CRL validated against the store and ready to be written (`store_crl`)."""

    crl: x509.CertificateRevocationList
    path: Path
    replaces_damaged: bool           # the stored CRL of this CA did not parse: it is replaced

    @property
    def imported(self) -> ImportedCrl:
        return ImportedCrl(issuer=self.crl.issuer.rfc4514_string(), path=self.path,
                           revoked_count=len(list(self.crl)), next_update=self.crl.next_update_utc)


def prepare_crl_import(root: str | os.PathLike[str], crl_bytes: bytes, *,
                       now: dt.datetime | None = None) -> PreparedCrl:
    """Validate a CRL for import without writing anything: signed by a trusted CA, well-formed,
    not older than the stored CRL of the same CA. A stored CRL that no longer parses (stored
    before the strict checks) is reported as replaceable instead of blocking every import."""
    store = CaStore(root)
    crl, signer = validate_crl(crl_bytes, store.trusted_cas(), _now(now))
    path = store.crl_dir / f"{fingerprint_sha256(signer)}.crl.pem"
    damaged = False
    if path.exists():
        try:
            current = x509.load_pem_x509_crl(path.read_bytes())
            if crl_problems(current):
                raise ValueError("stored CRL is malformed")
            cur_no = crl_number(current)
        except _EXTENSION_ERRORS:
            damaged = True
        if not damaged:
            new_no = crl_number(crl)
            older = (new_no < cur_no) if (new_no is not None and cur_no is not None) \
                else crl.last_update_utc < current.last_update_utc
            if older:
                raise DeviceCaError("crl-older", Text(
                    f"この CRL は取り込み済みのもの({current.last_update_utc:%Y-%m-%d %H:%M} 発行)より古いので取り込みません",
                    f"this CRL is older than the one already imported (issued "
                    f"{current.last_update_utc:%Y-%m-%d %H:%M}); not importing it"))
    return PreparedCrl(crl, path, damaged)


def store_crl(prepared: PreparedCrl) -> ImportedCrl:
    """Write a prepared CRL (atomically: the old one stays until the new one is complete)."""
    _write_private(prepared.path, prepared.crl.public_bytes(serialization.Encoding.PEM))
    return prepared.imported


def import_crl(root: str | os.PathLike[str], crl_bytes: bytes, *,
               now: dt.datetime | None = None) -> ImportedCrl:
    """Store a CRL signed by a trusted CA; it replaces an older CRL of the same CA and an
    older CRL never replaces a newer one. (`kanmon ca import-crl` revokes the devices on it
    between `prepare_crl_import` and `store_crl`, so a stored CRL is always applied.)"""
    return store_crl(prepare_crl_import(root, crl_bytes, now=now))
