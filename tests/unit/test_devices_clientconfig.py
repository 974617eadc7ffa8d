"""wg-quick text, QR (decoded back with zbarimg from the Debian package zbar-tools), the
interception CA pass-through and the iOS .mobileconfig."""

from __future__ import annotations

import base64
import datetime as dt
import os
import plistlib
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from gateway.devices.ca import build_org_ca
from gateway.devices.clientconfig import (PRIVATE_KEY_PLACEHOLDER, ClientConfigError,
                                          interception_ca_der, ios_mobileconfig, qr_png, qr_terminal,
                                          wg_quick_config)
from tests.availability import unavailable

NOW = dt.datetime.now(dt.timezone.utc)


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


DEVICE_PRIV, GW_PUB, PSK = key(), key(), key()


def config(**overrides) -> str:
    params = dict(private_key=DEVICE_PRIV, address_v4="100.64.0.7/32", address_v6="fd7a:115c::7",
                  gateway_public_key=GW_PUB, endpoint="vpn.example.lg.jp:51820",
                  dns=["100.64.0.1", "fd7a:115c::1"], persistent_keepalive=25)
    params.update(overrides)
    return wg_quick_config(**params)


def parse_ini(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        elif "=" in line:
            name, value = line.split("=", 1)
            current[name.strip()] = value.strip()
    return sections


def test_config_routes_everything_through_the_gateway():
    text = config(preshared_key=PSK, mtu=1380)
    ini = parse_ini(text)
    assert ini["Interface"] == {"PrivateKey": DEVICE_PRIV, "Address": "100.64.0.7/32, fd7a:115c::7/128",
                                "DNS": "100.64.0.1, fd7a:115c::1", "MTU": "1380"}
    assert ini["Peer"] == {"PublicKey": GW_PUB, "PresharedKey": PSK, "AllowedIPs": "0.0.0.0/0, ::/0",
                           "Endpoint": "vpn.example.lg.jp:51820", "PersistentKeepalive": "25"}
    assert text.endswith("\n") and "FwMark" not in text and "PostUp" not in text


def test_optional_fields_are_left_out_and_keys_normalised():
    urlsafe_gw = GW_PUB.replace("+", "-").replace("/", "_").rstrip("=")
    ini = parse_ini(config(persistent_keepalive=None, address_v6=None, gateway_public_key=urlsafe_gw,
                           endpoint="[2001:db8::1]:51820"))
    assert "PersistentKeepalive" not in ini["Peer"] and "PresharedKey" not in ini["Peer"]
    assert ini["Interface"]["Address"] == "100.64.0.7/32"
    assert ini["Peer"]["PublicKey"] == GW_PUB            # standard base64 for wg-quick
    assert ini["Peer"]["Endpoint"] == "[2001:db8::1]:51820"


def test_placeholder_private_key():
    text = config(private_key=None)
    assert parse_ini(text)["Interface"]["PrivateKey"] == PRIVATE_KEY_PLACEHOLDER
    with pytest.raises(ClientConfigError):
        qr_png(text)
    with pytest.raises(ClientConfigError):
        ios_mobileconfig(config_text=text, profile_identifier="jp.example.kanmon.d1", tunnel_name="t",
                         organization="o", remote_address="vpn:1", interception_ca=None)


@pytest.mark.parametrize("overrides", [
    {"address_v4": "100.64.0.0/24"}, {"address_v4": "fd00::1/128"}, {"address_v6": "fd00::/64"},
    {"address_v4": "nonsense"}, {"gateway_public_key": "abc"}, {"private_key": "x" * 44},
    {"endpoint": "vpn.example.jp"}, {"endpoint": "vpn.example.jp:70000"}, {"endpoint": "[zz::1]:1"},
    {"endpoint": "bad host:51820"}, {"dns": []}, {"dns": ["not-an-ip"]},
    {"allowed_ips": ["10.0.0.1/8"]}, {"persistent_keepalive": 0}, {"mtu": 100},
])
def test_bad_parameters_are_refused_bilingually(overrides):
    with pytest.raises(ClientConfigError) as err:
        config(**overrides)
    assert err.value.text.ja and err.value.text.en


def test_qr_terminal_is_text_blocks():
    art = qr_terminal(config())
    assert len(art.splitlines()) > 20 and ("█" in art or "▀" in art or "\x1b[" in art)


def _zbarimg() -> str | None:
    return shutil.which("zbarimg")


def test_qr_png_decodes_back_to_the_exact_config(tmp_path):
    if _zbarimg() is None:
        unavailable("zbarimg not installed (apt-get install -y --no-install-recommends zbar-tools)")
    text = config(preshared_key=PSK)
    png = tmp_path / "device.png"
    png.write_bytes(qr_png(text))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # -Sbinary: the raw payload bytes, no charset guessing and no trailing newline added.
    decoded = subprocess.run([_zbarimg(), "--raw", "-q", "-Sbinary", str(png)],
                             capture_output=True, check=True, timeout=30).stdout
    assert decoded == text.encode("ascii")
    assert parse_ini(decoded.decode())["Interface"]["PrivateKey"] == DEVICE_PRIV


def _inspection_ca() -> x509.Certificate:
    return build_org_ca("Kanmon inspection", now=NOW).cert


def test_mobileconfig_bundles_wireguard_vpn_and_root_ca():
    text = config()
    ca = _inspection_ca()
    blob = ios_mobileconfig(config_text=text, profile_identifier="jp.example.kanmon.dev-042",
                            tunnel_name="関門 VPN", organization="テスト市", remote_address="vpn.example.lg.jp:51820",
                            interception_ca=ca.public_bytes(serialization.Encoding.PEM))
    assert blob.startswith(b"<?xml")
    profile = plistlib.loads(blob)
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    assert profile["PayloadIdentifier"] == "jp.example.kanmon.dev-042"
    by_type = {p["PayloadType"]: p for p in profile["PayloadContent"]}
    assert set(by_type) == {"com.apple.vpn.managed", "com.apple.security.root"}
    vpn = by_type["com.apple.vpn.managed"]
    assert vpn["VPNType"] == "VPN" and vpn["VPNSubType"] == "com.wireguard.ios"
    assert vpn["VendorConfig"]["WgQuickConfig"] == text
    assert vpn["VPN"] == {"RemoteAddress": "vpn.example.lg.jp:51820", "AuthenticationMethod": "Password"}
    assert vpn["UserDefinedName"] == "関門 VPN"
    root = by_type["com.apple.security.root"]
    assert x509.load_der_x509_certificate(root["PayloadContent"]) == ca
    uuids = [profile["PayloadUUID"]] + [p["PayloadUUID"] for p in profile["PayloadContent"]]
    assert len(set(uuids)) == 3
    ids = [p["PayloadIdentifier"] for p in profile["PayloadContent"]]
    assert all(i.startswith("jp.example.kanmon.dev-042.") for i in ids) and len(set(ids)) == 2


def test_mobileconfig_is_deterministic_per_device_and_distinct_across_devices():
    kwargs = dict(config_text=config(), tunnel_name="t", organization="o",
                  remote_address="vpn:51820", interception_ca=_inspection_ca())
    a1 = plistlib.loads(ios_mobileconfig(profile_identifier="jp.example.kanmon.a", **kwargs))
    a2 = plistlib.loads(ios_mobileconfig(profile_identifier="jp.example.kanmon.a", **kwargs))
    b = plistlib.loads(ios_mobileconfig(profile_identifier="jp.example.kanmon.b", **kwargs))
    assert a1["PayloadUUID"] == a2["PayloadUUID"] != b["PayloadUUID"]


def test_mobileconfig_without_ca_has_only_the_vpn():
    profile = plistlib.loads(ios_mobileconfig(config_text=config(), profile_identifier="jp.example.k.d",
                                              tunnel_name="t", organization="o", remote_address="v:1",
                                              interception_ca=None))
    assert [p["PayloadType"] for p in profile["PayloadContent"]] == ["com.apple.vpn.managed"]


def test_mobileconfig_refuses_non_ca_and_bad_identifier():
    ca = build_org_ca("x", now=NOW)
    leaf = (x509.CertificateBuilder().subject_name(ca.cert.subject).issuer_name(ca.cert.subject)
            .public_key(ca.key.public_key()).serial_number(3)
            .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca.key, hashes.SHA256()))
    base = dict(config_text=config(), tunnel_name="t", organization="o", remote_address="v:1")
    with pytest.raises(ClientConfigError) as err:
        ios_mobileconfig(profile_identifier="jp.example.k.d", interception_ca=leaf, **base)
    assert "CA" in err.value.text.en
    with pytest.raises(ClientConfigError):
        ios_mobileconfig(profile_identifier="no spaces allowed", interception_ca=None, **base)
    with pytest.raises(ClientConfigError):
        interception_ca_der(b"garbage")


def test_interception_ca_pass_through_der():
    ca = _inspection_ca()
    assert interception_ca_der(ca.public_bytes(serialization.Encoding.PEM)) == \
        ca.public_bytes(serialization.Encoding.DER)
