"""Phone-ready client output: wg-quick text, QR code (terminal + PNG), the gateway's
interception CA for the device to trust, and an iOS .mobileconfig bundling both.

Pure: everything takes explicit parameters and returns text/bytes; writing files is the
caller's job. Every client config routes everything through the tunnel (AllowedIPs
0.0.0.0/0, ::/0) with DNS = the gateway's tunnel addresses, so that web/DNS/mail policy
applies to all traffic (NISC smartphone guide 5.4: VPN end to end; 5.2 表5-1 filtering;
local-government revision points ④: public networks only through the VPN).

What the .mobileconfig relies on (read with care, not guessed):
* WireGuard for iOS, MOBILECONFIG.md in the wireguard-apple repository: a payload of
  PayloadType `com.apple.vpn.managed` with VPNType `VPN`, VPNSubType `com.wireguard.ios`
  (the app's bundle id), VendorConfig.WgQuickConfig = the wg-quick text (FwMark, Table,
  Pre/PostUp/Down and SaveConfig unsupported — we never emit them), and a `VPN` dict with a
  non-empty RemoteAddress and AuthenticationMethod `Password`. The app must be opened once
  before the tunnel moves into its keychain.
* Apple's Configuration Profile reference for the root-certificate payload:
  PayloadType `com.apple.security.root`, PayloadContent = the DER certificate as <data>.
  On iOS a root installed by a manually opened profile is trusted for TLS only after the
  user enables it under Settings > General > About > Certificate Trust Settings; an MDM-
  installed profile is trusted at once.
* Apple's VPN payload reference for on-demand: `OnDemandEnabled` 1 with `OnDemandRules`
  [{Action: Connect}] keeps the tunnel up on every network (NISC smartphone guide 5.4:
  untrusted networks only through the VPN), and `OnDemandUserOverrideDisabled` (iOS 14+)
  removes the user's switch to turn it off. Fail closed: while the gateway cannot be reached
  the phone has no network, rather than an unfiltered one.
* Signed profiles: a CMS (PKCS #7) SignedData wrapping the plist, DER, the plist embedded; iOS
  shows the profile as verified when the signer chains to a trusted root (the organization CA
  arrives with the device certificate).
"""

from __future__ import annotations

import io
import ipaddress
import plistlib
import re
import uuid
from collections.abc import Sequence

import segno
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.devices.binding import WireGuardKeyError, parse_wg_key, wg_key_text
from gateway.i18n import Text

ROUTE_ALL = ("0.0.0.0/0", "::/0")
# A private key never leaves the device when the device generated its own WireGuard key;
# the exported config then carries this marker for the user (or MDM) to fill in.
PRIVATE_KEY_PLACEHOLDER = "__DEVICE_PRIVATE_KEY__"
WIREGUARD_IOS_BUNDLE_ID = "com.wireguard.ios"
_REVERSE_DNS_RE = re.compile(r"^[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


class ClientConfigError(ValueError):
    def __init__(self, text: Text) -> None:
        super().__init__(text.en)
        self.text = text


_KEY_NAMES_JA = {"device private key": "端末の秘密鍵", "gateway public key": "ゲートウェイの公開鍵",
                 "preshared key": "事前共有鍵"}


def _key(value: str, what: str) -> str:
    try:
        return wg_key_text(parse_wg_key(value))
    except WireGuardKeyError as exc:
        raise ClientConfigError(Text(f"{_KEY_NAMES_JA.get(what, what)}が不正です: {exc.text.ja}",
                                     f"invalid {what}: {exc.text.en}")) from exc


def _single_host(value: str | ipaddress.IPv4Interface | ipaddress.IPv6Interface, version: int,
                 prefix: int) -> str:
    try:
        iface = ipaddress.ip_interface(str(value))
    except ValueError as exc:
        raise ClientConfigError(Text(f"トンネルアドレスが不正です: {value}",
                                     f"invalid tunnel address: {value}")) from exc
    if "/" not in str(value):
        iface = ipaddress.ip_interface(f"{iface.ip}/{prefix}")
    if iface.version != version or iface.network.prefixlen != prefix:
        raise ClientConfigError(Text(
            f"端末のトンネルアドレスは IPv{version} /{prefix} です: {value}",
            f"a device tunnel address must be IPv{version} /{prefix}: {value}"))
    return str(iface)


def _endpoint(value: str) -> str:
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s\[\]]+):(\d{1,5})", value.strip())
    if not match:
        raise ClientConfigError(Text(
            f"エンドポイントは host:port か [IPv6]:port です: {value!r}",
            f"endpoint must be host:port or [IPv6]:port: {value!r}"))
    host, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise ClientConfigError(Text(f"エンドポイントの IPv6 アドレスが不正です: {host}",
                                         f"invalid IPv6 endpoint address: {host}")) from exc
    elif not _HOST_RE.match(host):
        raise ClientConfigError(Text(f"エンドポイントのホスト名が不正です: {host}",
                                     f"invalid endpoint host name: {host}"))
    if not 1 <= int(port) <= 65535:
        raise ClientConfigError(Text(f"ポート番号が範囲外です: {port}", f"port out of range: {port}"))
    return value.strip()


def wg_quick_config(*, private_key: str | None,
                    address_v4: str | ipaddress.IPv4Interface,
                    address_v6: str | ipaddress.IPv6Interface | None,
                    gateway_public_key: str, endpoint: str,
                    dns: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
                    allowed_ips: Sequence[str] = ROUTE_ALL,
                    persistent_keepalive: int | None = None,
                    preshared_key: str | None = None,
                    mtu: int | None = None) -> str:
    """The device's wg-quick(8) config. `private_key=None` writes PRIVATE_KEY_PLACEHOLDER
    (device-generated key). `address_v6=None` is allowed for IPv4-only gateways: ::/0 still
    goes into the tunnel, so IPv6 is blackholed rather than leaked around the gateway."""
    priv = PRIVATE_KEY_PLACEHOLDER if private_key is None else _key(private_key, "device private key")
    addresses = [_single_host(address_v4, 4, 32)]
    if address_v6 is not None:
        addresses.append(_single_host(address_v6, 6, 128))
    if not dns:
        raise ClientConfigError(Text("DNS(ゲートウェイのトンネルアドレス)が必要です",
                                     "DNS (the gateway's tunnel addresses) is required"))
    try:
        dns_text = [str(ipaddress.ip_address(str(d))) for d in dns]
        nets = [str(ipaddress.ip_network(str(n), strict=True)) for n in allowed_ips]
    except ValueError as exc:
        raise ClientConfigError(Text(f"アドレスが不正です: {exc}", f"invalid address: {exc}")) from exc
    if not nets:
        raise ClientConfigError(Text("AllowedIPs が空です", "AllowedIPs is empty"))
    if persistent_keepalive is not None and not 1 <= persistent_keepalive <= 65535:
        raise ClientConfigError(Text("PersistentKeepalive は 1〜65535 秒です",
                                     "PersistentKeepalive must be 1 to 65535 seconds"))
    if mtu is not None and not 1280 <= mtu <= 9000:
        raise ClientConfigError(Text("MTU は 1280〜9000 です", "MTU must be 1280 to 9000"))
    lines = ["[Interface]", f"PrivateKey = {priv}", f"Address = {', '.join(addresses)}",
             f"DNS = {', '.join(dns_text)}"]
    if mtu is not None:
        lines.append(f"MTU = {mtu}")
    lines += ["", "[Peer]", f"PublicKey = {_key(gateway_public_key, 'gateway public key')}"]
    if preshared_key is not None:
        lines.append(f"PresharedKey = {_key(preshared_key, 'preshared key')}")
    lines += [f"AllowedIPs = {', '.join(nets)}", f"Endpoint = {_endpoint(endpoint)}"]
    if persistent_keepalive is not None:
        lines.append(f"PersistentKeepalive = {persistent_keepalive}")
    return "\n".join(lines) + "\n"


def _refuse_placeholder(config_text: str, what: Text) -> None:
    if PRIVATE_KEY_PLACEHOLDER in config_text:
        raise ClientConfigError(Text(
            f"秘密鍵が仮置きの設定からは{what.ja}を作れません(端末側で鍵を入れてください)",
            f"cannot make {what.en} from a config with a placeholder private key "
            "(the device must fill in its own key)"))


def _qr(config_text: str) -> segno.QRCode:
    _refuse_placeholder(config_text, Text("QR コード", "a QR code"))
    # Error correction M: what the WireGuard apps scan reliably from screens and paper; the
    # payload is exactly the config text (byte mode), nothing added.
    return segno.make(config_text, error="m", micro=False, boost_error=False)


def qr_terminal(config_text: str) -> str:
    """The QR code as text for a terminal (Unicode half blocks, ANSI colours)."""
    out = io.StringIO()
    _qr(config_text).terminal(out=out, compact=True, border=4)
    return out.getvalue()


def qr_png(config_text: str, *, scale: int = 6, border: int = 4) -> bytes:
    buf = io.BytesIO()
    _qr(config_text).save(buf, kind="png", scale=scale, border=border)
    return buf.getvalue()


def load_interception_ca(data: bytes | x509.Certificate) -> x509.Certificate:
    """The gateway's TLS-interception CA certificate (PEM or DER), checked to be a CA."""
    try:
        if isinstance(data, x509.Certificate):
            cert = data
        elif data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    except ValueError as exc:
        raise ClientConfigError(Text(f"インターセプト CA 証明書を読み取れません: {exc}",
                                     f"cannot parse the interception CA certificate: {exc}")) from exc
    if not is_ca:
        raise ClientConfigError(Text("インターセプト CA 証明書が CA 証明書ではありません",
                                     "the interception CA certificate is not a CA certificate"))
    return cert


def interception_ca_pem(data: bytes | x509.Certificate) -> bytes:
    return load_interception_ca(data).public_bytes(serialization.Encoding.PEM)


def interception_ca_der(data: bytes | x509.Certificate) -> bytes:
    """DER (.cer) is what Android's certificate installer and iOS Safari downloads accept."""
    return load_interception_ca(data).public_bytes(serialization.Encoding.DER)


def _uuid(identifier: str, part: str) -> str:
    # Deterministic: exporting the same device twice yields the same UUIDs, and the same
    # PayloadIdentifier makes iOS replace the old profile instead of adding a second one.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:kanmon:mobileconfig:{identifier}:{part}")).upper()


def ios_mobileconfig(*, config_text: str, profile_identifier: str, tunnel_name: str,
                     organization: str, remote_address: str,
                     interception_ca: bytes | x509.Certificate | None,
                     display_name: str | None = None, on_demand: bool = True) -> bytes:
    """An unsigned iOS configuration profile (XML plist) with the WireGuard VPN payload and,
    when given, the interception CA as a com.apple.security.root payload.
    `profile_identifier` is reverse-DNS and unique per device (e.g. jp.example.kanmon.dev-042);
    `remote_address` is shown by iOS as the VPN server (normally the endpoint host:port)."""
    _refuse_placeholder(config_text, Text("構成プロファイル", "a configuration profile"))
    if not _REVERSE_DNS_RE.match(profile_identifier):
        raise ClientConfigError(Text(
            f"プロファイル ID は逆ドメイン形式です(例 jp.example.kanmon.dev-1): {profile_identifier!r}",
            f"profile identifier must be reverse-DNS (e.g. jp.example.kanmon.dev-1): {profile_identifier!r}"))
    if not tunnel_name.strip() or not remote_address.strip():
        raise ClientConfigError(Text("トンネル名とリモートアドレスが必要です",
                                     "tunnel name and remote address are required"))
    vpn = {
        "PayloadDisplayName": "VPN",
        "PayloadType": "com.apple.vpn.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{profile_identifier}.wireguard",
        "PayloadUUID": _uuid(profile_identifier, "wireguard"),
        "UserDefinedName": tunnel_name,
        "VPNType": "VPN",
        "VPNSubType": WIREGUARD_IOS_BUNDLE_ID,
        "VendorConfig": {"WgQuickConfig": config_text},
        "VPN": {"RemoteAddress": remote_address, "AuthenticationMethod": "Password"},
    }
    if on_demand:
        vpn.update({"OnDemandEnabled": 1, "OnDemandRules": [{"Action": "Connect"}],
                    "OnDemandUserOverrideDisabled": True})
    content: list[dict[str, object]] = [vpn]
    if interception_ca is not None:
        cert = load_interception_ca(interception_ca)
        content.append({
            "PayloadDisplayName": f"{organization} Kanmon TLS inspection CA",
            "PayloadType": "com.apple.security.root",
            "PayloadVersion": 1,
            "PayloadIdentifier": f"{profile_identifier}.inspection-ca",
            "PayloadUUID": _uuid(profile_identifier, "inspection-ca"),
            "PayloadCertificateFileName": "kanmon-inspection-ca.cer",
            "PayloadContent": cert.public_bytes(serialization.Encoding.DER),
        })
    profile = {
        "PayloadDisplayName": display_name or f"{organization} VPN (Kanmon)",
        "PayloadDescription": ("業務用 VPN とゲートウェイの検査用 CA 証明書 / "
                               "Business VPN and the gateway's inspection CA certificate"),
        "PayloadOrganization": organization,
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": profile_identifier,
        "PayloadUUID": _uuid(profile_identifier, "profile"),
        "PayloadRemovalDisallowed": False,
        "PayloadContent": content,
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)


def sign_profile(profile: bytes, signer_cert: x509.Certificate, signer_key: object,
                 chain: Sequence[x509.Certificate] = ()) -> bytes:
    """The profile wrapped in a CMS SignedData (DER, content embedded, SHA-256), signed by
    `signer_cert` with the issuer certificates in `chain` included. Pure."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import pkcs7

    builder = pkcs7.PKCS7SignatureBuilder().set_data(profile).add_signer(
        signer_cert, signer_key, hashes.SHA256())  # type: ignore[arg-type]
    for cert in chain:
        builder = builder.add_certificate(cert)
    return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
