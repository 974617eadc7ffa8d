"""check_device_certificate: the happy path and every refusal reason, for certificates of
our org CA (key in a SAN URI) and of an external MDM CA (binding recorded at enrollment)."""

from __future__ import annotations

import base64
import datetime as dt
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.devices.binding import BindingSource, BindingState, RecordedBinding, wg_key_uri
from gateway.devices.ca import OrgCa, build_org_ca, issue_device_certificate
from gateway.devices.certcheck import Reason, check_device_certificate

NOW = dt.datetime(2026, 4, 1, 9, 0, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def org_ca():
    return build_org_ca("関門テスト市役所", now=NOW - 30 * DAY)


@pytest.fixture(scope="module")
def other_ca():
    return build_org_ca("Someone Else", now=NOW - 30 * DAY)


def issue(ca, key, *, start=NOW - DAY, end=NOW + 90 * DAY, device_id="dev-001"):
    return issue_device_certificate(ca, device_id, key, "yamada.taro", start, end)


def crl_for(ca, serials, *, last=NOW - DAY, nxt=NOW + 7 * DAY, signer=None):
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(last).next_update(nxt))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build())
    return builder.sign(signer or ca.key, hashes.SHA256())


def mdm_pki():
    """An external root -> intermediate -> device chain, the device cert with CN only (no
    SAN, no AKI), as SCEP issuers commonly produce."""
    root_key = ec.generate_private_key(ec.SECP384R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MDM Root")])
    ca_ext = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                           crl_sign=True, encipher_only=False, decipher_only=False)
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(1)
            .not_valid_before(NOW - 400 * DAY).not_valid_after(NOW + 4000 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ca_ext, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA384()))
    int_key = ec.generate_private_key(ec.SECP256R1())
    int_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MDM Issuing CA")])
    inter = (x509.CertificateBuilder().subject_name(int_name).issuer_name(root_name)
             .public_key(int_key.public_key()).serial_number(2)
             .not_valid_before(NOW - 300 * DAY).not_valid_after(NOW + 1000 * DAY)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(ca_ext, critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(int_key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                            critical=False)
             .sign(root_key, hashes.SHA384()))
    dev_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "iphone-7F3A")]))
            .issuer_name(int_name).public_key(dev_key.public_key()).serial_number(4242)
            .not_valid_before(NOW - 10 * DAY).not_valid_after(NOW + 355 * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(int_key, hashes.SHA256()))
    return root, (inter, int_key), leaf


# ------------------------------------------------------------------ happy paths

def test_org_certificate_with_bound_key_is_accepted(org_ca):
    key = wg_key()
    issued = issue(org_ca, key)
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW, key)
    assert result.ok and result.reason is Reason.OK, result.detail
    assert result.device_id == "dev-001" and result.device_id_source == "san-uri"
    assert result.serial == issued.certificate.serial_number
    assert result.fingerprint_sha256 == issued.fingerprint_sha256
    assert result.binding.state is BindingState.CERT_MATCH
    assert result.binding.source is BindingSource.CERTIFICATE
    assert [c.subject for c in result.chain] == [issued.certificate.subject, org_ca.cert.subject]
    assert "CN=dev-001" in result.subject
    assert result.message.ja and result.message.en


def test_der_str_input_and_urlsafe_key_spelling_are_accepted(org_ca):
    key = wg_key()
    issued = issue(org_ca, key)
    der = issued.certificate.public_bytes(serialization.Encoding.DER)
    urlsafe = wg_key_uri(key).rsplit(":", 1)[1]
    assert "=" not in urlsafe and len(urlsafe) == 43
    assert check_device_certificate(der, [], [org_ca.cert], [], NOW, urlsafe).ok
    assert check_device_certificate(issued.cert_pem.decode(), [], [org_ca.cert], [], NOW, key).ok


def test_mdm_certificate_with_recorded_binding_and_intermediate(org_ca):
    root, (inter, _), leaf = mdm_pki()
    key = wg_key()
    fp = leaf.fingerprint(hashes.SHA256()).hex()
    # First contact: nothing recorded yet -> refused, and the caller may record.
    first = check_device_certificate(pem(leaf), [pem(inter)], [org_ca.cert, root], [], NOW, key)
    assert first.reason is Reason.KEY_NOT_BOUND
    assert first.binding.state is BindingState.UNRECORDED and first.binding.may_record
    assert first.device_id == "iphone-7F3A" and first.device_id_source == "subject-cn"
    # After enrollment recorded (fingerprint, key): accepted.
    recorded = RecordedBinding(fp, key)
    ok = check_device_certificate(pem(leaf), [pem(inter)], [org_ca.cert, root], [], NOW, key, recorded)
    assert ok.ok, ok.detail
    assert ok.binding.source is BindingSource.ENROLLMENT
    assert len(ok.chain) == 3


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("leaf", [None, b"", b"   \n"])
def test_no_certificate(org_ca, leaf):
    result = check_device_certificate(leaf, [], [org_ca.cert], [], NOW, wg_key())
    assert not result.ok and result.reason is Reason.NO_CERTIFICATE
    assert result.serial is None


@pytest.mark.parametrize("garbage", [b"\x00\x01garbage", os.urandom(300),
                                     b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"])
def test_garbage_bytes_are_malformed(org_ca, garbage):
    result = check_device_certificate(garbage, [], [org_ca.cert], [], NOW, wg_key())
    assert not result.ok and result.reason is Reason.MALFORMED
    assert result.detail


def test_garbage_in_the_chain_is_malformed(org_ca):
    key = wg_key()
    result = check_device_certificate(issue(org_ca, key).cert_pem, [b"junk"], [org_ca.cert], [], NOW, key)
    assert result.reason is Reason.MALFORMED


def test_untrusted_ca(org_ca, other_ca):
    key = wg_key()
    issued = issue(other_ca, key)
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW, key)
    assert result.reason is Reason.UNTRUSTED_CA
    # The record still says who knocked, for the auth log.
    assert result.serial == issued.certificate.serial_number and result.device_id == "dev-001"


def test_untrusted_ca_even_when_client_sends_its_root(org_ca, other_ca):
    key = wg_key()
    result = check_device_certificate(issue(other_ca, key).cert_pem, [pem(other_ca.cert)],
                                      [org_ca.cert], [], NOW, key)
    assert result.reason is Reason.UNTRUSTED_CA


def test_forged_issuer_with_same_name_is_bad_signature(org_ca):
    # Same subject name as our CA, different key: the name matches, the signature does not.
    impostor = build_org_ca("関門テスト市役所", now=NOW - 30 * DAY)
    key = wg_key()
    result = check_device_certificate(issue(impostor, key).cert_pem, [], [org_ca.cert], [], NOW, key)
    assert result.reason is Reason.BAD_SIGNATURE


def test_tampered_certificate_is_bad_signature(org_ca):
    key = wg_key()
    der = bytearray(issue(org_ca, key).certificate.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the ECDSA signature value
    result = check_device_certificate(bytes(der), [], [org_ca.cert], [], NOW, key)
    assert result.reason is Reason.BAD_SIGNATURE and not result.ok


def test_expired(org_ca):
    key = wg_key()
    issued = issue(org_ca, key, start=NOW - 20 * DAY, end=NOW - DAY)
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW, key)
    assert result.reason is Reason.EXPIRED
    # One second before its end the same certificate passes: the boundary is real.
    ok = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW - DAY - dt.timedelta(seconds=1), key)
    assert ok.ok, ok.detail


def test_not_yet_valid(org_ca):
    key = wg_key()
    issued = issue(org_ca, key, start=NOW + DAY, end=NOW + 30 * DAY)
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW, key)
    assert result.reason is Reason.NOT_YET_VALID
    assert check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW + 2 * DAY, key).ok


def test_revoked_on_crl(org_ca):
    key = wg_key()
    issued = issue(org_ca, key)
    other_key = wg_key()
    other = issue(org_ca, other_key, device_id="dev-002")
    crl = crl_for(org_ca, [issued.certificate.serial_number])
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [crl], NOW, key)
    assert result.reason is Reason.REVOKED_CRL
    assert format(issued.certificate.serial_number, "x") in result.detail
    # A certificate not on the CRL still passes against the same CRL.
    assert check_device_certificate(other.cert_pem, [], [org_ca.cert], [crl], NOW, other_key).ok


def test_crl_signed_by_someone_else_is_ignored(org_ca, other_ca):
    key = wg_key()
    issued = issue(org_ca, key)
    forged = crl_for(org_ca, [issued.certificate.serial_number], signer=other_ca.key)
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [forged], NOW, key)
    assert result.ok, "a CRL our CA did not sign must not revoke anything"


def test_intermediate_revoked_by_root_crl():
    """Revocation applies to every certificate below the anchor, not only the leaf."""
    ca = build_org_ca("Root For CRL", now=NOW - 30 * DAY)   # used for its key only
    int_ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Sub")])
    ku = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False)
    # org CAs have pathLen 0, so make an external root with pathLen None for this case.
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Ext Root")])
    root2 = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
             .public_key(ca.key.public_key()).serial_number(10)
             .not_valid_before(NOW - 30 * DAY).not_valid_after(NOW + 300 * DAY)
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .add_extension(ku, critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()), critical=False)
             .sign(ca.key, hashes.SHA256()))
    sub = (x509.CertificateBuilder().subject_name(name).issuer_name(root_name)
           .public_key(int_ca_key.public_key()).serial_number(77)
           .not_valid_before(NOW - 30 * DAY).not_valid_after(NOW + 300 * DAY)
           .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
           .add_extension(ku, critical=True)
           .add_extension(x509.SubjectKeyIdentifier.from_public_key(int_ca_key.public_key()), critical=False)
           .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
           .sign(ca.key, hashes.SHA256()))
    sub_ca = OrgCa(key=int_ca_key, cert=sub)
    key = wg_key()
    dev = issue_device_certificate(sub_ca, "dev-sub", key, "owner", NOW - DAY, NOW + 30 * DAY)
    assert check_device_certificate(dev.cert_pem, [pem(sub)], [root2], [], NOW, key).ok
    root_crl = (x509.CertificateRevocationListBuilder().issuer_name(root_name)
                .last_update(NOW - DAY).next_update(NOW + DAY)
                .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(77)
                                         .revocation_date(NOW - DAY).build())
                .sign(ca.key, hashes.SHA256()))
    result = check_device_certificate(dev.cert_pem, [pem(sub)], [root2], [root_crl], NOW, key)
    assert result.reason is Reason.REVOKED_CRL and "CN=Sub" in result.detail
    # Same when the bundle trusted both root and intermediate (the path then ends at "Sub").
    assert check_device_certificate(dev.cert_pem, [], [root2, sub], [], NOW, key).ok
    result = check_device_certificate(dev.cert_pem, [], [root2, sub], [root_crl], NOW, key)
    assert result.reason is Reason.REVOKED_CRL and "CN=Sub" in result.detail


def test_stale_crl_still_revokes_and_is_flagged(org_ca):
    key = wg_key()
    issued = issue(org_ca, key)
    stale = crl_for(org_ca, [], last=NOW - 20 * DAY, nxt=NOW - 10 * DAY)
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [stale], NOW, key)
    assert result.ok and result.crl_stale
    fresh = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [crl_for(org_ca, [])], NOW, key)
    assert fresh.ok and not fresh.crl_stale


def test_key_not_bound_to_org_certificate(org_ca):
    issued = issue(org_ca, wg_key())
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW, wg_key())
    assert result.reason is Reason.KEY_NOT_BOUND
    assert result.binding.state is BindingState.CERT_MISMATCH and not result.binding.may_record


def test_recorded_binding_cannot_override_certificate_key(org_ca):
    bound = wg_key()
    attacker = wg_key()
    issued = issue(org_ca, bound)
    recorded = RecordedBinding(issued.fingerprint_sha256, attacker)
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW, attacker, recorded)
    assert result.reason is Reason.KEY_NOT_BOUND


def test_mdm_certificate_with_other_recorded_key_is_not_bound():
    root, (inter, _), leaf = mdm_pki()
    recorded = RecordedBinding(leaf.fingerprint(hashes.SHA256()).hex(), wg_key())
    result = check_device_certificate(pem(leaf), [pem(inter)], [root], [], NOW, wg_key(), recorded)
    assert result.reason is Reason.KEY_NOT_BOUND
    assert result.binding.state is BindingState.RECORDED_MISMATCH and not result.binding.may_record


def test_binding_recorded_for_an_older_certificate_is_unrecorded():
    root, (inter, _), leaf = mdm_pki()
    key = wg_key()
    recorded = RecordedBinding("00" * 32, key)
    result = check_device_certificate(pem(leaf), [pem(inter)], [root], [], NOW, key, recorded)
    assert result.reason is Reason.KEY_NOT_BOUND and result.binding.state is BindingState.UNRECORDED


@pytest.mark.parametrize("bad", ["", "not-a-key", base64.b64encode(b"x" * 31).decode()])
def test_malformed_wireguard_key(org_ca, bad):
    issued = issue(org_ca, wg_key())
    result = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW, bad)
    assert result.reason is Reason.BAD_WG_KEY


def _leaf(ca, *, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,), ca_flag=False, key_uri=None):
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-x")]))
         .issuer_name(ca.cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
         .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if key_uri:
        b = b.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(key_uri)]), critical=False)
    return b.sign(ca.key, hashes.SHA256())


@pytest.mark.parametrize("kwargs", [{"eku": ()}, {"eku": (ExtendedKeyUsageOID.SERVER_AUTH,)},
                                    {"ca_flag": True}])
def test_not_client_auth(org_ca, kwargs):
    key = wg_key()
    cert = _leaf(org_ca, key_uri=wg_key_uri(key), **kwargs)
    result = check_device_certificate(pem(cert), [], [org_ca.cert], [], NOW, key)
    assert result.reason is Reason.NOT_CLIENT_AUTH, result.detail


def test_chain_through_a_non_ca_intermediate_is_refused(org_ca):
    # A device certificate used as if it were an issuer: names and signature line up, but it
    # is not a CA, so the verifier must refuse the path.
    key = wg_key()
    holder_key = ec.generate_private_key(ec.SECP256R1())
    holder = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "holder")]))
              .issuer_name(org_ca.cert.subject).public_key(holder_key.public_key()).serial_number(5)
              .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(org_ca.key.public_key()), critical=False)
              .sign(org_ca.key, hashes.SHA256()))
    fake = OrgCa(key=holder_key, cert=holder)
    leaf = _leaf(fake, key_uri=wg_key_uri(key))
    result = check_device_certificate(pem(leaf), [pem(holder)], [org_ca.cert], [], NOW, key)
    assert not result.ok and result.reason is Reason.CHAIN_INVALID


def test_two_device_ids_are_malformed(org_ca):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")]))
            .issuer_name(org_ca.cert.subject).public_key(key.public_key()).serial_number(9)
            .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.SubjectAlternativeName([
                x509.UniformResourceIdentifier("urn:kanmon:device:a"),
                x509.UniformResourceIdentifier("urn:kanmon:device:b")]), critical=False)
            .sign(org_ca.key, hashes.SHA256()))
    result = check_device_certificate(pem(cert), [], [org_ca.cert], [], NOW, wg_key())
    assert result.reason is Reason.MALFORMED


def test_log_fields_carry_identity_and_reason(org_ca):
    key = wg_key()
    issued = issue(org_ca, key, start=NOW - 20 * DAY, end=NOW - DAY)
    fields = check_device_certificate(issued.cert_pem, [], [org_ca.cert], [], NOW, key).as_log_fields()
    assert fields["result"] == "refused" and fields["reason"] == "expired"
    assert fields["serial"] == format(issued.certificate.serial_number, "x")
    assert fields["device_id"] == "dev-001"


def test_naive_now_is_a_programming_error(org_ca):
    with pytest.raises(ValueError):
        check_device_certificate(b"x", [], [org_ca.cert], [], NOW.replace(tzinfo=None), wg_key())


def test_intermediate_without_key_cert_sign_is_refused(org_ca):
    """CA keyUsage is enforced on the path, not only basicConstraints."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KU Root")])

    def ku(cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                             crl_sign=cert_sign, encipher_only=False, decipher_only=False)
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(1)
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 99 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(ku(True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    results = {}
    for cert_sign in (True, False):
        int_key = ec.generate_private_key(ec.SECP256R1())
        inter = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "KU Sub")]))
                 .issuer_name(root_name).public_key(int_key.public_key()).serial_number(2)
                 .not_valid_before(NOW - DAY).not_valid_after(NOW + 99 * DAY)
                 .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                 .add_extension(ku(cert_sign), critical=True)
                 .add_extension(x509.SubjectKeyIdentifier.from_public_key(int_key.public_key()), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                                critical=False)
                 .sign(root_key, hashes.SHA256()))
        key = wg_key()
        dev = issue_device_certificate(OrgCa(key=int_key, cert=inter), "d", key, "o", NOW - DAY, NOW + DAY)
        results[cert_sign] = check_device_certificate(dev.cert_pem, [pem(inter)], [root], [], NOW, key)
    assert results[True].ok, results[True].detail
    assert results[False].reason is Reason.CHAIN_INVALID
