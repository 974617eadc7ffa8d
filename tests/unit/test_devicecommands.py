"""`kanmon device ...` handlers, called with parsed argparse namespaces: certificate issuing,
awaiting enrollment, quarantine/release, renew, posture update and CSV import, export-config
(text, QR PNG decoded back with zbarimg, .mobileconfig)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import plistlib
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from wireguard_tools import WireguardKey

from gateway.cli import device as device_cli
from gateway.devices.binding import certificate_wg_keys, parse_wg_key
from gateway.devices.ca import build_org_ca, init_ca, pki_dir
from gateway.devices.clientconfig import PRIVATE_KEY_PLACEHOLDER
from gateway.posture import POSTURE_REASON_PREFIX
from gateway.registry.model import DeviceStatus
from gateway.registry.sqlite import SqliteRegistry
from tests.availability import unavailable


@pytest.fixture
def gw(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(f"""
state_dir: {state}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, ipv6_prefix: "fd77:77::/64",
         endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
posture: {{min_os: {{ios: "17.0", android: "13"}}}}
""")
    init_ca(pki_dir(state), "関門テスト町", now=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    (state / "wg-private.key").write_text(str(WireguardKey.generate()) + "\n")
    return Gw(tmp_path, cfg, state)


class Gw:
    def __init__(self, tmp, cfg, state):
        self.tmp, self.cfg, self.state = tmp, cfg, state
        parser = argparse.ArgumentParser()
        device_cli.register(parser.add_subparsers())
        self.parser = parser

    def run(self, *argv: str) -> int:
        args = self.parser.parse_args(["device", argv[0], "--config", str(self.cfg), *argv[1:]])
        return args.func(args)

    def get(self, device_id):
        reg = SqliteRegistry(self.state / "registry.sqlite3")
        try:
            return reg.get(device_id)
        finally:
            reg.close()

    def audit(self):
        reg = SqliteRegistry(self.state / "registry.sqlite3")
        try:
            return [(e.action, e.device_id, e.reason) for e in reg.unshipped_audit()]
        finally:
            reg.close()


def key() -> str:
    return str(WireguardKey.generate().public_key())


def test_add_without_key_awaits_enrollment(gw, capsys):
    assert gw.run("add", "--id", "dev-1", "--owner", "sato") == 0
    rec = gw.get("dev-1")
    assert rec.wg_public_key is None and str(rec.ipv4) == "10.77.0.2"
    assert "awaits enrollment" in capsys.readouterr().err
    assert gw.audit() == [("device-added", "dev-1", "")]


def test_add_issue_cert_with_public_key_binds_it(gw):
    out = gw.tmp / "out"
    k = key()
    assert gw.run("add", "--id", "dev-1", "--owner", "sato", "--public-key", k, "--issue-cert", "--out", str(out)) == 0
    cert = x509.load_pem_x509_certificate((out / "dev-1.cert.pem").read_bytes())
    assert certificate_wg_keys(cert) == [parse_wg_key(k)]
    rec = gw.get("dev-1")
    assert rec.wg_public_key == k
    assert rec.cert_fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert rec.cert_serial == format(cert.serial_number, "x")
    password = (out / "dev-1.p12-password.txt").read_text().strip().encode()
    p12 = pkcs12.load_pkcs12((out / "dev-1.p12").read_bytes(), password)
    assert p12.cert.certificate == cert
    assert (out / "dev-1.key.pem").stat().st_mode & 0o777 == 0o600
    assert not (out / "dev-1.wg.key").exists()


def test_add_issue_cert_without_key_generates_one_and_awaits_enrollment(gw):
    out = gw.tmp / "out"
    assert gw.run("add", "--id", "dev-1", "--owner", "sato", "--issue-cert", "--out", str(out)) == 0
    private = WireguardKey((out / "dev-1.wg.key").read_text().strip())
    cert = x509.load_pem_x509_certificate((out / "dev-1.cert.pem").read_bytes())
    assert certificate_wg_keys(cert) == [parse_wg_key(str(private.public_key()))]
    assert gw.get("dev-1").wg_public_key is None


def test_add_with_csr_certifies_the_csr_key(gw):
    dev_key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whatever")]))
           .sign(dev_key, hashes.SHA256()))
    csr_path = gw.tmp / "dev.csr"
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out = gw.tmp / "out"
    assert gw.run("add", "--id", "dev-1", "--owner", "sato", "--public-key", key(), "--csr", str(csr_path),
                  "--out", str(out)) == 0
    cert = x509.load_pem_x509_certificate((out / "dev-1.cert.pem").read_bytes())
    assert cert.public_key().public_numbers() == dev_key.public_key().public_numbers()
    assert not (out / "dev-1.key.pem").exists() and not (out / "dev-1.p12").exists()


def test_add_refusals_leave_nothing_behind(gw, capsys):
    out = gw.tmp / "out"
    assert gw.run("add", "--id", "dev-1", "--public-key", "not-a-key") == 2
    assert gw.run("add", "--id", "dev-1", "--issue-cert", "--out", str(out)) == 2       # no owner
    assert gw.run("add", "--id", "dev-1", "--owner", "x", "--issue-cert") == 2          # no --out
    assert gw.get("dev-1") is None and not out.exists()
    k = key()
    assert gw.run("add", "--id", "dev-1", "--public-key", k) == 0
    # the registry refuses a second device with the same key: the files written are removed
    assert gw.run("add", "--id", "dev-2", "--owner", "x", "--public-key", k, "--issue-cert", "--out", str(out)) == 2
    assert gw.get("dev-2") is None
    assert not out.exists() or not list(out.iterdir())
    assert gw.run("add", "--id", "dev-1", "--public-key", key()) == 1                   # duplicate id
    assert "conflicts" in capsys.readouterr().err


def test_add_refuses_to_overwrite_files(gw):
    out = gw.tmp / "out"
    out.mkdir()
    (out / "dev-1.cert.pem").write_text("precious")
    assert gw.run("add", "--id", "dev-1", "--owner", "x", "--issue-cert", "--out", str(out)) == 2
    assert (out / "dev-1.cert.pem").read_text() == "precious"
    assert gw.get("dev-1") is None


def test_quarantine_and_release(gw, capsys):
    gw.run("add", "--id", "dev-1", "--public-key", key())
    assert gw.run("quarantine", "dev-1", "--reason", "malware found / マルウェア検知") == 0
    rec = gw.get("dev-1")
    assert rec.status is DeviceStatus.QUARANTINED and rec.status_reason == "malware found / マルウェア検知"
    assert gw.run("quarantine", "dev-1", "--reason", POSTURE_REASON_PREFIX + "fake") == 2
    assert gw.run("release", "dev-1") == 0
    assert gw.get("dev-1").status is DeviceStatus.ACTIVE
    assert gw.run("release", "dev-1") == 1             # not quarantined
    assert gw.run("release", "nope") == 1
    actions = [a for a, _, _ in gw.audit()]
    assert actions == ["device-added", "device-quarantined", "device-released"]


def test_update_posture_quarantines_and_releases(gw):
    gw.run("add", "--id", "dev-1", "--public-key", key(), "--platform", "iOS", "--os-version", "17.4.1")
    assert gw.get("dev-1").status is DeviceStatus.ACTIVE
    assert gw.run("update", "dev-1", "--os-version", "16.7.2") == 0
    rec = gw.get("dev-1")
    assert rec.status is DeviceStatus.QUARANTINED and "16.7.2" in rec.status_reason and "より古い" in rec.status_reason
    assert gw.run("update", "dev-1", "--os-version", "17.10") == 0
    assert gw.get("dev-1").status is DeviceStatus.ACTIVE
    assert gw.run("update", "dev-1", "--jailbroken", "yes") == 0
    assert "jailbroken" in gw.get("dev-1").status_reason
    assert gw.run("update", "dev-1", "--jailbroken", "maybe") == 2
    assert gw.run("update", "dev-1") == 2
    actions = [a for a, _, _ in gw.audit()]
    assert actions == ["device-added", "device-quarantined", "device-released", "device-quarantined"]


def test_posture_never_lifts_an_operator_quarantine(gw):
    gw.run("add", "--id", "dev-1", "--public-key", key(), "--platform", "android", "--os-version", "12")
    assert gw.get("dev-1").status is DeviceStatus.QUARANTINED           # posture, at add
    gw.run("release", "dev-1")
    gw.run("quarantine", "dev-1", "--reason", "lost and found, under investigation")
    gw.run("update", "dev-1", "--os-version", "14")
    rec = gw.get("dev-1")
    assert rec.status is DeviceStatus.QUARANTINED and rec.status_reason.startswith("lost and found")


def test_import_posture_csv(gw, capsys):
    for i in (1, 2, 3):
        gw.run("add", "--id", f"dev-{i}", "--public-key", key())
    csv_path = gw.tmp / "mdm.csv"
    # Shift_JIS with a Japanese note column: MDM exports in Japan often look like this
    csv_path.write_bytes("device_id,platform,os_version,jailbroken,備考\n"
                         "dev-1,iOS,17.5,no,営業部\n"
                         "dev-2,Android,12,false,\n"
                         "dev-3,iOS,18.0,yes,\n"
                         "ghost,iOS,18.0,no,\n".encode("cp932"))
    assert gw.run("import-posture", str(csv_path)) == 1        # ghost is unknown
    assert gw.get("dev-1").status is DeviceStatus.ACTIVE and gw.get("dev-1").os_version == "17.5"
    assert gw.get("dev-2").status is DeviceStatus.QUARANTINED
    assert gw.get("dev-3").status is DeviceStatus.QUARANTINED and gw.get("dev-3").jailbroken
    err = capsys.readouterr().err
    assert f"{csv_path}:5: ghost" in err


def test_import_posture_bad_file_changes_nothing(gw, capsys):
    gw.run("add", "--id", "dev-1", "--public-key", key())
    bad = gw.tmp / "bad.csv"
    bad.write_text("device_id,platform,os_version,jailbroken\ndev-1,iOS,10,no\n,iOS,17,no\ndev-1,iOS,17,perhaps\n")
    assert gw.run("import-posture", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3: device_id" in err and f"{bad}:4: jailbroken" in err
    assert gw.get("dev-1").os_version is None          # the valid first row was not applied either
    missing = gw.tmp / "missing.csv"
    missing.write_text("device_id,platform\ndev-1,iOS\n")
    assert gw.run("import-posture", str(missing)) == 2
    assert "os_version, jailbroken" in capsys.readouterr().err
    assert gw.run("import-posture", str(gw.tmp / "nope.csv")) == 2


def test_renew_issues_a_new_certificate_for_the_same_key(gw):
    out1, out2 = gw.tmp / "o1", gw.tmp / "o2"
    k = key()
    gw.run("add", "--id", "dev-1", "--owner", "sato", "--public-key", k, "--issue-cert", "--out", str(out1))
    first = gw.get("dev-1").cert_fingerprint
    assert gw.run("renew", "dev-1", "--out", str(out2), "--days", "30") == 0
    cert = x509.load_pem_x509_certificate((out2 / "dev-1.cert.pem").read_bytes())
    rec = gw.get("dev-1")
    assert rec.cert_fingerprint != first and rec.cert_fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert certificate_wg_keys(cert) == [parse_wg_key(k)] and rec.wg_public_key == k
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    gw.run("revoke", "dev-1", "--reason", "lost")
    assert gw.run("renew", "dev-1", "--out", str(gw.tmp / "o3")) == 1            # refused: revoked
    assert "device-renewed" in [a for a, _, _ in gw.audit()]


def test_export_config_text_qr_png_and_mobileconfig(gw, capsys):
    if shutil.which("zbarimg") is None:
        unavailable("zbarimg (zbar-tools) not installed")
    private = WireguardKey.generate()
    gw.run("add", "--id", "dev_1", "--public-key", str(private.public_key()))
    capsys.readouterr()
    key_file = gw.tmp / "dev.key"
    key_file.write_text(str(private) + "\n")
    mitm = gw.state / "mitmproxy"
    mitm.mkdir()
    inter = build_org_ca("Interception", now=dt.datetime.now(dt.UTC)).cert
    (mitm / "mitmproxy-ca-cert.pem").write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    png, profile = gw.tmp / "qr.png", gw.tmp / "dev.mobileconfig"
    assert gw.run("export-config", "dev_1", "--private-key-file", str(key_file), "--qr-png", str(png),
                  "--mobileconfig", str(profile)) == 0
    assert str(private) not in capsys.readouterr().out     # files were asked for: no key on the terminal
    assert gw.run("export-config", "dev_1", "--private-key-file", str(key_file)) == 0
    text = capsys.readouterr().out
    assert f"PrivateKey = {private}" in text and "Endpoint = vpn.example.test:51820" in text
    assert "DNS = 10.77.0.1, fd77:77::1" in text and "Address = 10.77.0.2/32, fd77:77::2/128" in text
    assert "MTU = 1420" in text                    # tunnel.mtu, as the gateway's own interface (#19)
    decoded = subprocess.run(["zbarimg", "--raw", "-q", str(png)], capture_output=True, check=True).stdout
    assert decoded.decode().rstrip("\n") == text.rstrip("\n")
    plist = plistlib.loads(verified_profile(profile.read_bytes(), pki_dir(gw.state) / "ca" / "ca.cert.pem"))
    assert plist["PayloadIdentifier"] == "jp.kanmon.dev-1"
    vpn, ca = plist["PayloadContent"]
    # Always on (NISC smartphone guide 5.4): connect on every network, no user override.
    assert vpn["OnDemandEnabled"] == 1 and vpn["OnDemandRules"] == [{"Action": "Connect"}]
    assert vpn["OnDemandUserOverrideDisabled"] is True
    assert vpn["VendorConfig"]["WgQuickConfig"] == text
    assert ca["PayloadContent"] == inter.public_bytes(serialization.Encoding.DER)
    assert plist["PayloadOrganization"] == "関門テスト町"
    assert gw.run("export-config", "dev_1", "--qr", "--private-key-file", str(key_file)) == 0
    assert "▀" in capsys.readouterr().out           # Unicode half blocks


def verified_profile(signed: bytes, ca_file) -> bytes:
    """The plist inside a CMS-signed profile, after openssl verified the signature and the
    chain to `ca_file` (fails the test otherwise)."""
    out = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-binary", "-CAfile", str(ca_file)],
                         input=signed, capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout


def test_export_config_profile_is_signed_and_tampering_is_detected(gw, capsys):
    private = WireguardKey.generate()
    gw.run("add", "--id", "dev_1", "--public-key", str(private.public_key()))
    key_file = gw.tmp / "dev.key"
    key_file.write_text(str(private) + "\n")
    (gw.state / "mitmproxy").mkdir()
    inter = build_org_ca("Interception", now=dt.datetime.now(dt.UTC)).cert
    (gw.state / "mitmproxy" / "mitmproxy-ca-cert.pem").write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    profile = gw.tmp / "dev.mobileconfig"
    assert gw.run("export-config", "dev_1", "--private-key-file", str(key_file), "--mobileconfig", str(profile)) == 0
    assert str(private) not in capsys.readouterr().out   # a file was asked for: the key is not printed
    signed = profile.read_bytes()
    ca_file = pki_dir(gw.state) / "ca" / "ca.cert.pem"
    plist = plistlib.loads(verified_profile(signed, ca_file))
    assert plist["PayloadContent"][0]["VendorConfig"]["WgQuickConfig"].startswith("[Interface]")
    # another CA does not verify it; a changed byte in the embedded plist breaks the signature
    stranger = gw.tmp / "stranger.pem"
    stranger.write_bytes(build_org_ca("Stranger", now=dt.datetime.now(dt.UTC)).cert.public_bytes(serialization.Encoding.PEM))
    assert subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-binary", "-CAfile", str(stranger)],
                          input=signed, capture_output=True).returncode != 0
    at = signed.index(b"UserDefinedName")
    tampered = signed[:at] + b"UserDefinedNamf" + signed[at + 15:]
    assert subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-binary", "-CAfile", str(ca_file)],
                          input=tampered, capture_output=True).returncode != 0
    # the signer is a leaf of the organization CA, reused by the next export
    signer_path = pki_dir(gw.state) / "ca" / "profile-signer.cert.pem"
    first = signer_path.read_bytes()
    assert gw.run("export-config", "dev_1", "--private-key-file", str(key_file), "--mobileconfig", str(profile),
                  "--no-on-demand") == 0
    assert signer_path.read_bytes() == first
    vpn = plistlib.loads(verified_profile(profile.read_bytes(), ca_file))["PayloadContent"][0]
    assert "OnDemandEnabled" not in vpn


def test_export_config_refusals(gw, capsys):
    k = WireguardKey.generate()
    gw.run("add", "--id", "dev-1", "--public-key", key())
    gw.run("add", "--id", "dev-2")
    other = gw.tmp / "other.key"
    other.write_text(str(k))
    assert gw.run("export-config", "dev-1", "--private-key-file", str(other)) == 2        # not its key
    assert gw.run("export-config", "dev-2", "--private-key-file", str(other)) == 1        # not enrolled
    assert gw.run("export-config", "dev-1", "--qr") == 2                                  # placeholder -> no QR
    assert gw.run("export-config", "nope") == 1
    capsys.readouterr()
    assert gw.run("export-config", "dev-1") == 0
    assert PRIVATE_KEY_PLACEHOLDER in capsys.readouterr().out
    assert gw.run("export-config", "dev-1", "--mobileconfig", str(gw.tmp / "x.mobileconfig"),
                  "--private-key-file", str(other)) == 2


def test_export_config_takes_the_key_issue_cert_generated_and_registers_it(gw, capsys):
    """`device add --issue-cert` writes a WireGuard key; `export-config --private-key-file` with
    it used to refuse ("not enrolled"). The registered certificate binds that key: it is
    registered (audited) and the config carries it (issue #19)."""
    out = gw.tmp / "out"
    assert gw.run("add", "--id", "dev-1", "--owner", "sato", "--issue-cert", "--out", str(out)) == 0
    assert gw.get("dev-1").wg_public_key is None
    stranger = gw.tmp / "stranger.key"
    stranger.write_text(str(WireguardKey.generate()) + "\n")
    capsys.readouterr()
    # another key, even beside the right certificate: not bound, nothing registered
    assert gw.run("export-config", "dev-1", "--private-key-file", str(stranger), "--cert",
                  str(out / "dev-1.cert.pem")) == 2
    assert "not the one bound in the certificate" in capsys.readouterr().err
    # no certificate beside the key: still "not enrolled", and the message says what is missing
    assert gw.run("export-config", "dev-1", "--private-key-file", str(stranger)) == 1
    err = capsys.readouterr().err
    assert "not enrolled yet" in err and "stranger" not in err and "dev-1.cert.pem" in err
    # a certificate that is not the one registered for the device (another device's)
    other = gw.tmp / "other"
    assert gw.run("add", "--id", "dev-2", "--owner", "sato", "--issue-cert", "--out", str(other)) == 0
    capsys.readouterr()
    assert gw.run("export-config", "dev-1", "--private-key-file", str(other / "dev-2.wg.key"), "--cert",
                  str(other / "dev-2.cert.pem")) == 2
    assert "not the certificate registered for dev-1" in capsys.readouterr().err
    assert gw.get("dev-1").wg_public_key is None and gw.get("dev-2").wg_public_key is None
    # the key device add wrote, with its certificate beside it
    private = WireguardKey((out / "dev-1.wg.key").read_text().strip())
    assert gw.run("export-config", "dev-1", "--private-key-file", str(out / "dev-1.wg.key")) == 0
    assert f"PrivateKey = {private}" in capsys.readouterr().out
    assert gw.get("dev-1").wg_public_key == str(private.public_key())
    assert ("device-key-registered", "dev-1", f"bound in certificate {gw.get('dev-1').cert_serial}") in gw.audit()
    # again: the key is registered now, the export just works
    assert gw.run("export-config", "dev-1", "--private-key-file", str(out / "dev-1.wg.key")) == 0


def test_export_config_persistent_keepalive(gw, capsys, monkeypatch):
    """Optional PersistentKeepalive (issue #19): tunnel.persistent_keepalive, overridden by
    --persistent-keepalive (0: off); out of range refused in both languages."""
    private = WireguardKey.generate()
    gw.run("add", "--id", "dev-1", "--public-key", str(private.public_key()))
    key_file = gw.tmp / "dev.key"
    key_file.write_text(str(private) + "\n")
    capsys.readouterr()
    assert gw.run("export-config", "dev-1", "--private-key-file", str(key_file)) == 0
    assert "PersistentKeepalive" not in capsys.readouterr().out          # default: off
    assert gw.run("export-config", "dev-1", "--private-key-file", str(key_file), "--persistent-keepalive", "25") == 0
    assert "\nPersistentKeepalive = 25\n" in capsys.readouterr().out
    gw.cfg.write_text(gw.cfg.read_text().replace('endpoint: "vpn.example.test:51820"',
                                                  'endpoint: "vpn.example.test:51820", persistent_keepalive: 30'))
    assert gw.run("export-config", "dev-1", "--private-key-file", str(key_file)) == 0
    text = capsys.readouterr().out
    assert "\nPersistentKeepalive = 30\n" in text and text.index("Endpoint") < text.index("PersistentKeepalive")
    assert gw.run("export-config", "dev-1", "--private-key-file", str(key_file), "--persistent-keepalive", "0") == 0
    assert "PersistentKeepalive" not in capsys.readouterr().out
    # the iOS profile carries the same text (Android imports the .conf or the QR code of it)
    (gw.state / "mitmproxy").mkdir()
    inter = build_org_ca("Interception", now=dt.datetime.now(dt.UTC)).cert
    (gw.state / "mitmproxy" / "mitmproxy-ca-cert.pem").write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    profile = gw.tmp / "dev.mobileconfig"
    assert gw.run("export-config", "dev-1", "--private-key-file", str(key_file), "--mobileconfig", str(profile)) == 0
    plist = plistlib.loads(verified_profile(profile.read_bytes(), pki_dir(gw.state) / "ca" / "ca.cert.pem"))
    assert "\nPersistentKeepalive = 30\n" in plist["PayloadContent"][0]["VendorConfig"]["WgQuickConfig"]
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert gw.run("export-config", "dev-1", "--private-key-file", str(key_file), "--persistent-keepalive", "70000") == 2
    assert "PersistentKeepalive は 1〜65535 秒です" in capsys.readouterr().err


def test_config_persistent_keepalive_is_checked(tmp_path, monkeypatch, capsys):
    from gateway.cli import main
    from gateway.config import load_config_text

    base = "state_dir: {s}\ntunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24{k}}}\nuplink: {{interface: eth0}}\n"
    assert load_config_text(base.format(s=tmp_path, k="")).wg_persistent_keepalive is None
    assert load_config_text(base.format(s=tmp_path, k=", persistent_keepalive: 25")).wg_persistent_keepalive == 25
    monkeypatch.setenv("KANMON_LANG", "ja")
    cfg = tmp_path / "kanmon.yaml"
    for bad, says in (("0", "0 は小さすぎます（最小 1）"), ("70000", "70000 は大きすぎます（最大 65535）"),
                      ("often", "型が違います")):
        cfg.write_text(base.format(s=tmp_path, k=f", persistent_keepalive: {bad}"))
        with pytest.raises(SystemExit) as exit_:
            main(["config", "check", str(cfg)])
        assert exit_.value.code == 2
        assert f"kanmon.yaml:2: tunnel.persistent_keepalive: {says}" in capsys.readouterr().err
