"""`kanmon ca import-crl` (issue #15/#16): a CRL is validated completely before it is stored
(a duplicated extension, which cryptography only rejects when `.extensions` is read, used to
be stored and then break every later import); the devices on it are revoked before the CRL
file is written, so a failed revocation leaves no stored CRL with an active device; the
registry is opened through the config's factory, so a PostgreSQL registry is revoked too."""

from __future__ import annotations

import argparse
import datetime as dt
import sqlite3

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from wireguard_tools import WireguardKey

from gateway.cli import ca as commands
from gateway.devices.ca import CaStore, DeviceCaError, init_ca, pki_dir, prepare_crl_import
from gateway.registry.model import DeviceRecord, DeviceStatus
from gateway.registry.sqlite import SqliteRegistry

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def org(tmp_path):
    state = tmp_path / "state"
    ca = init_ca(pki_dir(state), "関門テスト町", now=NOW - DAY)
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(f"""
state_dir: {state}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
""")
    return state, ca, cfg


def build_crl(ca, serials, *, number=1, last=None, delta=False) -> x509.CertificateRevocationList:
    last = last or NOW - dt.timedelta(hours=1)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(last).next_update(last + 7 * DAY).add_extension(x509.CRLNumber(number), critical=False))
    if delta:
        b = b.add_extension(x509.DeltaCRLIndicator(number), critical=False)
    for s in serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(last).build())
    return b.sign(ca.key, hashes.SHA256())


def pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def _tlv(data: bytes, pos: int) -> tuple[int, int]:
    """(start of content, end of element) of the DER element at pos."""
    first = data[pos + 1]
    if first < 0x80:
        return pos + 2, pos + 2 + first
    n = first & 0x7F
    start = pos + 2 + n
    return start, start + int.from_bytes(data[pos + 2:start], "big")


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def duplicated_extension_crl(ca, serials) -> bytes:
    """A CRL correctly signed by the CA whose two extensions are both CRLNumber: built with a
    DeltaCRLIndicator whose OID (2.5.29.27) is then changed to CRLNumber's (2.5.29.20) and
    the TBS signed again (the builder refuses duplicates, real-world encoders do not)."""
    der = build_crl(ca, serials, delta=True).public_bytes(serialization.Encoding.DER)
    content, _ = _tlv(der, 0)
    _, tbs_end = _tlv(der, content)
    _, alg_end = _tlv(der, tbs_end)
    tbs = der[content:tbs_end]
    assert tbs.count(b"\x06\x03\x55\x1d\x1b") == 1
    tbs = tbs.replace(b"\x06\x03\x55\x1d\x1b", b"\x06\x03\x55\x1d\x14")
    signature = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    body = tbs + der[tbs_end:alg_end] + b"\x03" + _len(len(signature) + 1) + b"\x00" + signature
    crl = x509.load_der_x509_crl(b"\x30" + _len(len(body)) + body)
    assert crl.is_signature_valid(ca.cert.public_key())
    with pytest.raises(x509.DuplicateExtension):
        crl.extensions                 # noqa: B018 - what the old import never read
    return pem(crl)


def add_device(registry, device_id: str, serial: int) -> None:
    v4, v6 = registry.allocate_addresses(__import__("ipaddress").ip_network("10.77.0.0/24"), None)
    registry.add(DeviceRecord(device_id=device_id, wg_public_key=str(WireguardKey.generate().public_key()),
                              ipv4=v4, ipv6=v6, cert_serial=format(serial, "x")))


def test_a_crl_with_a_duplicated_extension_is_refused_and_not_stored(org, tmp_path, capsys):
    state, ca, _ = org
    bad = tmp_path / "dup.crl"
    bad.write_bytes(duplicated_extension_crl(ca, [7]))
    assert run(["ca", "import-crl", "--state-dir", str(state), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "拡張が不正です" in err and "invalid extension" in err and "nothing was stored" in err
    assert CaStore(pki_dir(state)).crls() == []
    good = tmp_path / "good.crl"
    good.write_bytes(pem(build_crl(ca, [7], number=2)))
    assert run(["ca", "import-crl", "--state-dir", str(state), str(good)]) == 0   # later imports still work


def test_a_damaged_stored_crl_does_not_block_later_imports(org, tmp_path, capsys):
    state, ca, _ = org
    store = CaStore(pki_dir(state))
    from gateway.devices.ca import fingerprint_sha256
    store.crl_dir.mkdir(parents=True, exist_ok=True)
    (store.crl_dir / f"{fingerprint_sha256(ca.cert)}.crl.pem").write_bytes(duplicated_extension_crl(ca, [1]))
    good = tmp_path / "good.crl"
    good.write_bytes(pem(build_crl(ca, [1, 2], number=3)))
    assert run(["ca", "import-crl", "--state-dir", str(state), str(good)]) == 0
    assert "damaged and has been replaced" in capsys.readouterr().err
    assert [len(list(c)) for c in store.crls()] == [2]


def test_a_crl_issued_in_the_future_is_refused(org):
    state, ca, _ = org
    with pytest.raises(DeviceCaError) as refused:
        prepare_crl_import(pki_dir(state), pem(build_crl(ca, [1], last=NOW + DAY)))
    assert refused.value.code == "crl-malformed" and "in the future" in refused.value.text.en


def test_a_registry_failure_while_revoking_stores_no_crl(org, tmp_path, capsys, monkeypatch):
    state, ca, _ = org
    registry = SqliteRegistry(state / "registry.sqlite3")
    add_device(registry, "lost-phone", 0x51)
    registry.close()
    crl_file = tmp_path / "org.crl"
    crl_file.write_bytes(pem(build_crl(ca, [0x51])))

    def locked(self, record, audit=None):
        raise sqlite3.OperationalError("database is locked")

    with monkeypatch.context() as patched:
        patched.setattr(SqliteRegistry, "update", locked)
        assert run(["ca", "import-crl", "--state-dir", str(state), str(crl_file)]) == 1
    err = capsys.readouterr().err
    assert "database is locked" in err and "the CRL was not stored" in err and "CRL は保存していません" in err
    assert CaStore(pki_dir(state)).crls() == []          # no stored CRL with the device still active
    registry = SqliteRegistry(state / "registry.sqlite3")
    assert registry.get("lost-phone").status is DeviceStatus.ACTIVE
    registry.close()
    assert run(["ca", "import-crl", "--state-dir", str(state), str(crl_file)]) == 0   # running it again finishes it
    assert "device revoked by the CRL: lost-phone" in capsys.readouterr().out
    registry = SqliteRegistry(state / "registry.sqlite3")
    assert registry.get("lost-phone").status is DeviceStatus.REVOKED
    registry.close()
    assert [len(list(c)) for c in CaStore(pki_dir(state)).crls()] == [1]


def test_import_crl_with_config_uses_the_sqlite_registry_of_the_config(org, tmp_path, capsys):
    state, ca, cfg = org
    registry = SqliteRegistry(state / "registry.sqlite3")
    add_device(registry, "dev-1", 0x99)
    registry.close()
    crl_file = tmp_path / "org.crl"
    crl_file.write_bytes(pem(build_crl(ca, [0x99])))
    assert run(["ca", "import-crl", "--config", str(cfg), str(crl_file)]) == 0
    registry = SqliteRegistry(state / "registry.sqlite3")
    assert registry.get("dev-1").status is DeviceStatus.REVOKED
    registry.close()


def test_import_crl_revokes_devices_in_a_postgresql_registry(org, tmp_path, capsys, monkeypatch, postgres):
    """Issue #16: import-crl opened registry.sqlite3 directly and revoked nothing in a
    PostgreSQL registry. Now --config opens the registry through gateway.registry.factory.open_registry."""
    from gateway.registry.factory import REGISTRY_URL_ENV
    from gateway.registry.postgres import PgRegistry

    state, ca, cfg = org
    url = postgres.create_database("crlimport")
    monkeypatch.setenv(REGISTRY_URL_ENV, url)
    registry = PgRegistry(url, node="test")
    add_device(registry, "lost-phone", 0x5EED)
    add_device(registry, "kept-phone", 0x600D)
    registry.close()
    crl_file = tmp_path / "org.crl"
    crl_file.write_bytes(pem(build_crl(ca, [0x5EED])))
    assert run(["ca", "import-crl", "--config", str(cfg), str(crl_file)]) == 0
    assert "device revoked by the CRL: lost-phone" in capsys.readouterr().out
    registry = PgRegistry(url, node="test")
    try:
        assert registry.get("lost-phone").status is DeviceStatus.REVOKED
        assert registry.get("lost-phone").status_reason.startswith("[crl]")
        assert registry.get("kept-phone").status is DeviceStatus.ACTIVE
    finally:
        registry.close()
    assert not (state / "registry.sqlite3").exists()      # no stray SQLite registry was created


def test_state_dir_without_a_registry_says_no_device_was_checked(org, tmp_path, capsys):
    state, ca, _ = org
    crl_file = tmp_path / "org.crl"
    crl_file.write_bytes(pem(build_crl(ca, [1])))
    assert run(["ca", "import-crl", "--state-dir", str(state), str(crl_file)]) == 0
    err = capsys.readouterr().err
    assert "no device was checked" in err and "端末は確認していません" in err
