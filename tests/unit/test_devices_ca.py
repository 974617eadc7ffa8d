"""The CA store on disk, device issuing (new key or CSR), bundle and CRL import, and the
`ca` CLI handlers. Every refusal leaves the store unchanged."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.cli import ca as commands
from gateway.devices.binding import wg_key_uri
from gateway.devices.ca import (CaStore, DeviceCaError, build_org_ca, device_pkcs12, import_crl,
                                init_ca, issue_device_certificate, load_csr, pki_dir, trust_bundle)
from gateway.devices.certcheck import Reason, check_device_certificate

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)


def wg_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def snapshot(root) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = fh.read()
    return out


def ext_ca(name: str, *, is_ca: bool = True, key_cert_sign: bool = True):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + 365 * DAY)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=key_cert_sign,
                                         crl_sign=key_cert_sign, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def crl(issuer_cert, signer_key, serials, *, last=None, number=None):
    last = last or NOW - dt.timedelta(hours=1)
    b = (x509.CertificateRevocationListBuilder().issuer_name(issuer_cert.subject)
         .last_update(last).next_update(last + 7 * DAY))
    if number is not None:
        b = b.add_extension(x509.CRLNumber(number), critical=False)
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s)
                                      .revocation_date(last).build())
    return b.sign(signer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# ------------------------------------------------------------------ init

def test_init_ca_writes_private_files_and_refuses_to_overwrite(tmp_path):
    ca = init_ca(tmp_path, "関門テスト株式会社")
    store = CaStore(tmp_path)
    for path in (store.key_path, store.cert_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.ca_dir.stat().st_mode) == 0o700
    loaded = store.load_org_ca()
    assert loaded.cert == ca.cert
    assert isinstance(loaded.key.curve, ec.SECP256R1)
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "関門テスト株式会社"
    before = snapshot(tmp_path)
    with pytest.raises(DeviceCaError) as err:
        init_ca(tmp_path, "Other")
    assert err.value.code == "ca-exists" and err.value.text.ja and err.value.text.en
    assert snapshot(tmp_path) == before


def test_init_ca_rejects_empty_org(tmp_path):
    with pytest.raises(DeviceCaError) as err:
        init_ca(tmp_path, "  ")
    assert err.value.code == "bad-org"
    assert not CaStore(tmp_path).has_org_ca()


def test_load_org_ca_detects_mismatched_key(tmp_path):
    init_ca(tmp_path, "A")
    other = build_org_ca("B", now=NOW)
    CaStore(tmp_path).key_path.write_bytes(other.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(DeviceCaError) as err:
        CaStore(tmp_path).load_org_ca()
    assert err.value.code == "ca-corrupt"


# ------------------------------------------------------------------ issuing

def test_issue_with_new_key_pair_binds_device_and_key():
    ca = build_org_ca("Org", now=NOW - DAY)
    key = wg_key()
    issued = issue_device_certificate(ca, "tablet-17", key, "佐藤花子", NOW, NOW + 30 * DAY)
    cert = issued.certificate
    assert issued.private_key is not None
    assert issued.private_key.public_key().public_numbers() == cert.public_key().public_numbers()
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == ["urn:kanmon:device:tablet-17", wg_key_uri(key)]
    assert "=" not in wg_key_uri(key) and "/" not in wg_key_uri(key) and len(wg_key_uri(key)) == 14 + 43
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.USER_ID)[0].value == "佐藤花子"
    cert.verify_directly_issued_by(ca.cert)
    assert check_device_certificate(issued.cert_pem, [], [ca.cert], [], NOW + DAY, key).ok


def test_issue_from_csr_certifies_the_csr_key():
    ca = build_org_ca("Org", now=NOW - DAY)
    device_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
           .sign(device_key, hashes.SHA256()))
    key = wg_key()
    issued = issue_device_certificate(ca, "phone-9", key, "owner", NOW, NOW + DAY,
                                      csr=csr.public_bytes(serialization.Encoding.PEM))
    assert issued.private_key is None and issued.key_pem is None
    assert issued.certificate.public_key().public_numbers() == device_key.public_key().public_numbers()
    assert issued.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "phone-9"
    assert check_device_certificate(issued.certificate, [], [ca.cert], [], NOW + dt.timedelta(hours=1), key).ok


def _csr_with_bad_signature() -> bytes:
    signer = ec.generate_private_key(ec.SECP256R1())
    der = bytearray((x509.CertificateSigningRequestBuilder()
                     .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
                     .sign(signer, hashes.SHA256())).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF
    return bytes(der)


def test_csr_with_bad_signature_is_refused():
    ca = build_org_ca("Org", now=NOW - DAY)
    bad = _csr_with_bad_signature()
    assert x509.load_der_x509_csr(bad).is_signature_valid is False   # the fixture is what it claims
    with pytest.raises(DeviceCaError) as err:
        issue_device_certificate(ca, "d1", wg_key(), "o", NOW, NOW + DAY, csr=bad)
    assert err.value.code == "csr-bad-signature"
    assert "署名" in err.value.text.ja and "signature" in err.value.text.en


def test_csr_garbage_and_ed25519_are_refused():
    with pytest.raises(DeviceCaError) as err:
        load_csr(b"not a csr")
    assert err.value.code == "csr-malformed"
    ed = ed25519.Ed25519PrivateKey.generate()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])).sign(ed, None))
    with pytest.raises(DeviceCaError) as err:
        load_csr(csr.public_bytes(serialization.Encoding.PEM))
    assert err.value.code == "csr-bad-key"


@pytest.mark.parametrize("kwargs,code", [
    ({"device_id": "bad id/with slash"}, "bad-device-id"),
    ({"wg_public_key": "short"}, "bad-wg-key"),
    ({"owner": ""}, "bad-owner"),
    ({"not_after": NOW - DAY}, "bad-validity"),
    ({"not_after": NOW + 20000 * DAY}, "outside-ca-validity"),
    ({"not_before": NOW.replace(tzinfo=None)}, "naive-time"),
])
def test_issue_refuses_bad_parameters(kwargs, code):
    ca = build_org_ca("Org", now=NOW - DAY, valid_days=365)
    args = {"device_id": "d1", "wg_public_key": wg_key(), "owner": "o",
            "not_before": NOW, "not_after": NOW + DAY} | kwargs
    with pytest.raises(DeviceCaError) as err:
        issue_device_certificate(ca, **args)
    assert err.value.code == code


def test_pkcs12_round_trip():
    ca = build_org_ca("Org", now=NOW - DAY)
    issued = issue_device_certificate(ca, "d1", wg_key(), "o", NOW, NOW + DAY)
    for legacy in (False, True):
        blob = device_pkcs12(issued, ca.cert, b"pass-1234", "d1", legacy=legacy)
        key, cert, extra = pkcs12.load_key_and_certificates(blob, b"pass-1234")
        assert cert == issued.certificate and extra == [ca.cert]
        assert key.public_key().public_numbers() == issued.private_key.public_key().public_numbers()
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates(device_pkcs12(issued, ca.cert, b"x", "d1"), b"wrong")


# ------------------------------------------------------------------ trust

def test_trust_bundle_of_cas(tmp_path):
    _, a = ext_ca("MDM Root")
    _, b = ext_ca("MDM Issuing")
    bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (a, b))
    trusted = trust_bundle(tmp_path, bundle)
    assert trusted == [a, b]
    store = CaStore(tmp_path)
    assert set(store.trusted_cas()) == {a, b}
    for path in store.trusted_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    trust_bundle(tmp_path, bundle)                       # idempotent
    assert len(store.trusted_cas()) == 2


def test_bundle_with_a_non_ca_certificate_is_refused_whole(tmp_path):
    _, good = ext_ca("Good Root")
    _, leaf = ext_ca("Just A Device", is_ca=False, key_cert_sign=False)
    bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (good, leaf))
    with pytest.raises(DeviceCaError) as err:
        trust_bundle(tmp_path, bundle)
    assert err.value.code == "bundle-not-ca"
    assert "#2 CN=Just A Device" in err.value.text.en and "CA:TRUE" in err.value.text.en
    assert "#2 CN=Just A Device" in err.value.text.ja
    assert "Good Root" not in err.value.text.en
    assert CaStore(tmp_path).trusted_cas() == []           # nothing trusted, not even the good one


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n"])
def test_bundle_garbage_is_refused(tmp_path, data):
    with pytest.raises(DeviceCaError) as err:
        trust_bundle(tmp_path, data)
    assert err.value.code in ("bundle-malformed", "bundle-empty")
    assert CaStore(tmp_path).trusted_cas() == []


# ------------------------------------------------------------------ CRL import

def test_import_crl_from_trusted_ca_is_honoured(tmp_path):
    ca = init_ca(tmp_path, "Org", now=NOW - DAY)  # valid at NOW however long the suite has run
    key = wg_key()
    issued = issue_device_certificate(ca, "d1", key, "o", NOW - DAY, NOW + DAY)
    imported = import_crl(tmp_path, crl(ca.cert, ca.key, [issued.certificate.serial_number], number=1))
    assert imported.revoked_count == 1 and stat.S_IMODE(imported.path.stat().st_mode) == 0o600
    store = CaStore(tmp_path)
    result = check_device_certificate(issued.cert_pem, [], store.trusted_cas(), store.crls(), NOW, key)
    assert result.reason is Reason.REVOKED_CRL


def test_import_crl_of_an_external_trusted_ca_as_der(tmp_path):
    key, cert = ext_ca("MDM Root")
    trust_bundle(tmp_path, cert.public_bytes(serialization.Encoding.PEM))
    der = x509.load_pem_x509_crl(crl(cert, key, [7])).public_bytes(serialization.Encoding.DER)
    assert import_crl(tmp_path, der).revoked_count == 1


def test_crl_not_signed_by_a_trusted_ca_is_refused(tmp_path):
    ca = init_ca(tmp_path, "Org", now=NOW - DAY)  # valid at NOW however long the suite has run
    stranger_key, stranger = ext_ca("Stranger")
    before = snapshot(tmp_path)
    for data in (crl(stranger, stranger_key, [1]),           # unknown issuer
                 crl(ca.cert, stranger_key, [1])):           # our name, someone else's signature
        with pytest.raises(DeviceCaError) as err:
            import_crl(tmp_path, data)
        assert err.value.code == "crl-untrusted"
    with pytest.raises(DeviceCaError) as err:
        import_crl(tmp_path, b"garbage")
    assert err.value.code == "crl-malformed"
    assert snapshot(tmp_path) == before


def test_older_crl_never_replaces_newer(tmp_path):
    ca = init_ca(tmp_path, "Org", now=NOW - DAY)  # valid at NOW however long the suite has run
    import_crl(tmp_path, crl(ca.cert, ca.key, [1, 2], number=5))
    with pytest.raises(DeviceCaError) as err:
        import_crl(tmp_path, crl(ca.cert, ca.key, [], number=4))
    assert err.value.code == "crl-older"
    assert [len(list(c)) for c in CaStore(tmp_path).crls()] == [2]
    import_crl(tmp_path, crl(ca.cert, ca.key, [1, 2, 3], number=6))
    assert [len(list(c)) for c in CaStore(tmp_path).crls()] == [3]


# ------------------------------------------------------------------ CLI handlers

def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_init_trust_import(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "both")
    state = tmp_path / "state"
    assert run(["ca", "init", "--state-dir", str(state), "--org", "テスト町"]) == 0
    out = capsys.readouterr().out
    assert "組織の端末 CA を作成しました" in out and "created the organization device CA" in out
    assert run(["ca", "init", "--state-dir", str(state), "--org", "again"]) == 1
    err = capsys.readouterr().err
    assert "既にあります" in err and "already exists" in err

    key, cert = ext_ca("MDM Root")
    pem_file = tmp_path / "mdm.pem"
    pem_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    assert run(["ca", "trust", "--state-dir", str(state), str(pem_file)]) == 0
    assert "CN=MDM Root" in capsys.readouterr().out

    crl_file = tmp_path / "mdm.crl"
    crl_file.write_bytes(crl(cert, key, [1, 2, 3]))
    assert run(["ca", "import-crl", "--state-dir", str(state), str(crl_file)]) == 0
    assert "3 revoked" in capsys.readouterr().out

    assert run(["ca", "show", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "org CA: " in out and "external CA: CN=MDM Root" in out and "3 revoked" in out
    assert len(CaStore(pki_dir(state)).trusted_cas()) == 2


def test_cli_refusals_are_bilingual_input_errors(tmp_path, capsys):
    state = tmp_path / "state"
    _, leaf = ext_ca("Device", is_ca=False, key_cert_sign=False)
    bad = tmp_path / "leaf.pem"
    bad.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    assert run(["ca", "trust", "--state-dir", str(state), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "CA 証明書ではありません" in err and "not a CA certificate" in err
    assert run(["ca", "trust", "--state-dir", str(state), str(tmp_path / "missing.pem")]) == 2
    err = capsys.readouterr().err
    assert "ファイルを読めません" in err and "cannot read file" in err
    stranger_key, stranger = ext_ca("Stranger")
    crl_file = tmp_path / "s.crl"
    crl_file.write_bytes(crl(stranger, stranger_key, [1]))
    assert run(["ca", "import-crl", "--state-dir", str(state), str(crl_file)]) == 2
    err = capsys.readouterr().err
    assert "信頼済み CA ではない" in err and "not a trusted CA" in err


def test_start_before_the_ca_is_narrowed_to_the_ca_start():
    ca = build_org_ca("Org", now=NOW)
    issued = issue_device_certificate(ca, "d1", wg_key(), "o", NOW - 10 * DAY, NOW + DAY)
    assert issued.certificate.not_valid_before_utc == ca.cert.not_valid_before_utc


def test_bundle_ca_without_key_cert_sign_is_refused(tmp_path):
    _, cert = ext_ca("CA Flag But No Signing", is_ca=True, key_cert_sign=False)
    with pytest.raises(DeviceCaError) as err:
        trust_bundle(tmp_path, cert.public_bytes(serialization.Encoding.PEM))
    assert "keyCertSign" in err.value.text.en and "CA:TRUE" not in err.value.text.en
    assert CaStore(tmp_path).trusted_cas() == []
