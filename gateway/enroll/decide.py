"""Enrollment decisions, pure: parse the request body, judge certificate + registry record +
key, compute the record to write, the response and the auth-log record. No I/O: the server
(server.py) passes the TLS peer certificates, the trust material, `now` and two lookup
functions over the registry.

Order of checks (first failure wins, each with a stable reason code for the auth log):
  bad-request                          body is not the JSON we expect (also: nested deeper than
                                       MAX_JSON_DEPTH, a number longer than MAX_NUMBER_CHARS,
                                       a key given twice)
  <certcheck reasons>                  chain, validity window, clientAuth, CRL, key binding
                                       (gateway/devices/certcheck.py)
  unknown-device                       the certificate's device id is not on the allowlist
  device-revoked, device-suspended     registry status
  outside-usage-period                 registry valid_from / valid_until (approved usage period)
  certificate-superseded               an org-CA certificate older than the one the registry
                                       holds for the device (`kanmon device renew` replaced it)
  key-in-use                           the WireGuard key is registered to another device
MDM certificates (no key in the certificate): the first enrollment records the binding
(certificate fingerprint -> key, BINDING.md) when the device is on the allowlist and holds no
other key yet; a different key later needs the operator (`kanmon device renew`).

Guidelines: NISC smartphone guide 5.4 (device authentication when the VPN connects),
6.2(5) (lost devices cut off), IPA SME sample 技術的対策 1.3 (device certificates) and the
auth log of 技術的対策 3.8.3 (日時・接続元 IP・ユーザーID・成功/失敗).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from cryptography import x509

from gateway.devices.binding import BindingSource, RecordedBinding, WireGuardKeyError, parse_wg_key, wg_key_text
from gateway.devices.certcheck import MESSAGES as CERT_MESSAGES
from gateway.devices.certcheck import CertCheck, Reason, check_device_certificate
from gateway.devices.clientconfig import wg_quick_config
from gateway.i18n import Text
from gateway.posture import PostureOutcome, PosturePolicy, apply_posture
from gateway.registry.model import DeviceRecord, DeviceStatus

MAX_FIELD_CHARS = 64
ENROLL_ACTOR = "enrollment"

REFUSALS: dict[str, tuple[int, Text]] = {
    "bad-request": (400, Text("リクエストが不正です", "bad request")),
    "not-found": (404, Text("そのパスはありません(POST /v1/enroll を使ってください)",
                            "no such path (use POST /v1/enroll)")),
    "method-not-allowed": (405, Text("POST だけを受け付けます", "only POST is accepted")),
    "too-large": (413, Text("リクエストが大きすぎます", "request too large")),
    "rate-limited": (429, Text("試行が多すぎます。しばらく待ってから再試行してください",
                               "too many attempts; wait and try again")),
    "unknown-device": (403, Text("この端末は登録されていません(許可リストにありません)",
                                 "this device is not registered (not on the allowlist)")),
    "device-revoked": (403, Text("この端末は失効しています", "this device has been revoked")),
    "device-suspended": (403, Text("この端末は利用停止中です", "this device is suspended")),
    "outside-usage-period": (403, Text("承認された利用期間外です", "outside the approved usage period")),
    "certificate-superseded": (403, Text("この証明書は更新済みで使えません(新しい証明書を使ってください)",
                                         "this certificate has been replaced (use the renewed certificate)")),
    "key-in-use": (409, Text("この WireGuard 公開鍵は別の端末に登録されています",
                             "this WireGuard public key is registered to another device")),
    "internal-error": (500, Text("内部エラーです。管理者に連絡してください",
                                 "internal error; contact the administrator")),
    # Fail closed (issue #18): no enrollment without its auth-log record.
    "auth-log-unavailable": (503, Text("認証ログを記録できないため、登録を受け付けられません。管理者に連絡してください",
                                       "the authentication log cannot be written, so enrollment is refused; "
                                       "contact the administrator")),
}


class RequestProblem(Exception):
    """The request body cannot be used; `text` tells the client exactly what is wrong."""

    def __init__(self, text: Text) -> None:
        super().__init__(text.en)
        self.text = text


@dataclass(frozen=True)
class EnrollRequest:
    wg_public_key: str            # standard base64 (as wg(8) prints it)
    platform: str | None = None
    os_version: str | None = None
    jailbroken: bool | None = None


_FIELDS = {"wg_public_key", "platform", "os_version", "jailbroken"}
_EXPECTED = Text("wg_public_key(必須)、platform、os_version、jailbroken",
                 "wg_public_key (required), platform, os_version, jailbroken")

# Bounds on the JSON itself (issue #15). A real request is one flat object of short values.
# Python's json recurses per nesting level (RecursionError near 1,000 levels) and converts
# integers of more than 4,300 digits with a ValueError: both are refused before that.
MAX_JSON_DEPTH = 32
MAX_NUMBER_CHARS = 100


def _shown(text: str, limit: int = 40) -> str:
    """Client-supplied text quoted in a message: short, and encodable (a lone surrogate from
    a JSON escape like "\\ud800" would break the UTF-8 answer and the log line)."""
    short = text if len(text) <= limit else text[:limit] + "…"
    return short.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before json.loads sees it. A scan by hand:
    the standard library parser has no depth limit, and no dependency offers one; the body
    is at most the server's MAX_BODY_BYTES, so one linear pass is cheap."""
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise RequestProblem(Text(f"JSON の入れ子が深すぎます({MAX_JSON_DEPTH} 段まで)",
                                          f"the JSON is nested too deeply (at most {MAX_JSON_DEPTH} levels)"))
        elif ch in "]}":
            depth -= 1


def _number(kind: Callable[[str], object]) -> Callable[[str], object]:
    def parse(digits: str) -> object:
        if len(digits) > MAX_NUMBER_CHARS:
            raise RequestProblem(Text(f"数値が長すぎます({MAX_NUMBER_CHARS} 文字まで)",
                                      f"a number is too long (at most {MAX_NUMBER_CHARS} characters)"))
        return kind(digits)
    return parse


def _no_constant(name: str) -> object:
    raise RequestProblem(Text(f"{name} は JSON の値ではありません", f"{name} is not a JSON value"))


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        names = ", ".join(_shown(k) for k in twice[:5])
        raise RequestProblem(Text(f"同じ項目が二度あります: {names}", f"duplicate fields: {names}"))
    return data


def _load_json(body: bytes) -> object:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestProblem(Text("本文が UTF-8 ではありません", "the body is not UTF-8")) from None
    _check_depth(text)
    try:
        return json.loads(text, parse_int=_number(int), parse_float=_number(float), parse_constant=_no_constant,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise RequestProblem(Text(f"本文が JSON ではありません: {exc}", f"the body is not JSON: {exc}")) from None
    except (RecursionError, ValueError) as exc:   # a bound above should have caught it first
        raise RequestProblem(Text(f"本文を JSON として読めません: {type(exc).__name__}",
                                  f"the body cannot be read as JSON: {type(exc).__name__}")) from None


def parse_enroll_request(body: bytes) -> EnrollRequest:
    data = _load_json(body)
    if not isinstance(data, dict):
        raise RequestProblem(Text(f"本文は JSON オブジェクトにしてください(項目: {_EXPECTED.ja})",
                                  f"the body must be a JSON object (fields: {_EXPECTED.en})"))
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        # A misspelt "jailbroken" must not silently count as "not jailbroken".
        names = ", ".join(_shown(name) for name in unknown[:5]) + (", …" if len(unknown) > 5 else "")
        raise RequestProblem(Text(f"不明な項目があります: {names}(使える項目: {_EXPECTED.ja})",
                                  f"unknown fields: {names} (expected: {_EXPECTED.en})"))
    key = data.get("wg_public_key")
    if not isinstance(key, str) or not key.strip():
        raise RequestProblem(Text("wg_public_key(WireGuard 公開鍵)が必要です",
                                  "wg_public_key (the WireGuard public key) is required"))
    try:
        key_text = wg_key_text(parse_wg_key(key))
    except WireGuardKeyError as exc:
        raise RequestProblem(Text(f"wg_public_key が不正です: {exc.text.ja}", f"wg_public_key is invalid: {exc.text.en}")) from None
    fields: dict[str, str | None] = {}
    for name in ("platform", "os_version"):
        value = data.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_FIELD_CHARS
                                  or not value.isprintable()):
            raise RequestProblem(Text(f"{name} は {MAX_FIELD_CHARS} 文字までの文字列です",
                                      f"{name} must be a string of at most {MAX_FIELD_CHARS} characters"))
        fields[name] = value.strip() if isinstance(value, str) and value.strip() else None
    jailbroken = data.get("jailbroken")
    if jailbroken is not None and not isinstance(jailbroken, bool):
        raise RequestProblem(Text("jailbroken は true か false です", "jailbroken must be true or false"))
    return EnrollRequest(key_text, fields["platform"], fields["os_version"], jailbroken)


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str                        # stable code: "ok", a certcheck Reason, or a REFUSALS key
    message: Text
    http_status: int
    detail: str = ""                   # technical English, for the log only
    check: CertCheck | None = None
    device_id: str | None = None
    record: DeviceRecord | None = None     # the registry record before
    write: DeviceRecord | None = None      # the record to write (None: nothing to change)
    audit_action: str | None = None
    audit_reason: str = ""
    posture: PostureOutcome | None = None


def refusal(reason: str, detail: str = "", **fields) -> Decision:
    status, message = REFUSALS[reason]
    return Decision(False, reason, message, status, detail, **fields)


def _cert_refusal(check: CertCheck, record: DeviceRecord | None, detail: str | None = None) -> Decision:
    status = 400 if check.reason is Reason.BAD_WG_KEY else 403
    return Decision(False, str(check.reason), CERT_MESSAGES[check.reason], status,
                    detail if detail is not None else check.detail, check, check.device_id, record)


def _recorded(record: DeviceRecord | None) -> RecordedBinding | None:
    if record is None or not record.cert_fingerprint or not record.wg_public_key:
        return None
    return RecordedBinding(record.cert_fingerprint, record.wg_public_key)


def decide_enrollment(leaf: bytes | x509.Certificate | None, chain: Sequence[bytes | x509.Certificate],
                      trusted: Sequence[x509.Certificate], crls: Sequence[x509.CertificateRevocationList],
                      now: datetime, request: EnrollRequest,
                      device_by_id: Callable[[str], DeviceRecord | None],
                      device_by_key: Callable[[str], DeviceRecord | None],
                      policy: PosturePolicy) -> Decision:
    key = request.wg_public_key
    check = check_device_certificate(leaf, chain, trusted, crls, now, key)
    record = device_by_id(check.device_id) if check.device_id else None
    recorded = _recorded(record)
    if recorded is not None:
        check = check_device_certificate(leaf, chain, trusted, crls, now, key, recorded_binding=recorded)

    if not check.ok:
        bound_later = (check.reason is Reason.KEY_NOT_BOUND and check.binding is not None
                       and check.binding.may_record)
        if not bound_later:
            return _cert_refusal(check, record)
        # MDM certificate without our key URI: every other check passed. Record the binding
        # only for an allowlisted device that holds no key, or this same key (BINDING.md).
        if record is None:
            return refusal("unknown-device", f"device id {check.device_id!r} from the certificate",
                           check=check, device_id=check.device_id)
        if record.wg_public_key not in (None, key):
            return _cert_refusal(check, record, "the device already holds another WireGuard key; "
                                                "a new key needs the operator (kanmon device renew)")
        check = check_device_certificate(leaf, chain, trusted, crls, now, key,
                                         recorded_binding=RecordedBinding(check.fingerprint_sha256 or "", key))
        if not check.ok:
            return _cert_refusal(check, record)

    fields = {"check": check, "device_id": check.device_id, "record": record}
    if not check.device_id:
        return _cert_refusal(replace(check, reason=Reason.MALFORMED), None, "no device id in the certificate")
    if record is None:
        return refusal("unknown-device", f"device id {check.device_id!r} from the certificate", **fields)
    if record.status is DeviceStatus.REVOKED:
        return refusal("device-revoked", record.status_reason, **fields)
    if record.effective_status(now) is DeviceStatus.SUSPENDED:
        until = record.suspended_until.isoformat() if record.suspended_until else "until resumed"
        return refusal("device-suspended", f"suspended {until}: {record.status_reason}", **fields)
    if (record.valid_from is not None and now < record.valid_from) or \
            (record.valid_until is not None and now >= record.valid_until):
        return refusal("outside-usage-period", f"usage period {record.valid_from} .. {record.valid_until}", **fields)
    if check.binding is not None and check.binding.source is BindingSource.CERTIFICATE \
            and record.cert_fingerprint and record.cert_fingerprint != check.fingerprint_sha256:
        return refusal("certificate-superseded", f"registry holds certificate {record.cert_fingerprint}", **fields)
    holder = device_by_key(key)
    if holder is not None and holder.device_id != record.device_id:
        return refusal("key-in-use", f"key registered to {holder.device_id!r}", **fields)

    # The approved usage period never outlasts the certificate: the reconciler then cuts the
    # device off at the certificate's expiry without any further check.
    valid_until = record.valid_until
    if check.not_after is not None and (valid_until is None or check.not_after < valid_until):
        valid_until = check.not_after
    updated = replace(
        record, wg_public_key=key, cert_serial=check.serial_hex, cert_fingerprint=check.fingerprint_sha256,
        valid_until=valid_until,
        platform=request.platform if request.platform is not None else record.platform,
        os_version=request.os_version if request.os_version is not None else record.os_version,
        jailbroken=request.jailbroken if request.jailbroken is not None else record.jailbroken)
    outcome = apply_posture(policy, updated)
    after = outcome.record
    if record.wg_public_key != key:
        action = "device-enrolled"
    elif outcome.action is not None:
        action = outcome.action
    else:
        action = "device-posture-reported"
    audit_reason = after.status_reason if outcome.action else ""
    return Decision(True, "ok", CERT_MESSAGES[Reason.OK], 200, "", check, record.device_id, record,
                    after if after != record else None, action if after != record else None,
                    audit_reason, outcome)


def enrollment_response(record: DeviceRecord, *, gateway_public_key: str, endpoint: str,
                        dns: Sequence[str], interception_ca_pem: str, mtu: int | None,
                        changed: bool, persistent_keepalive: int | None = None) -> dict:
    """What the device gets back. The private key stays on the device: the config carries
    `__DEVICE_PRIVATE_KEY__` (clientconfig.PRIVATE_KEY_PLACEHOLDER) for the client to fill in."""
    config = wg_quick_config(private_key=None, address_v4=str(record.ipv4),
                             address_v6=str(record.ipv6) if record.ipv6 else None,
                             gateway_public_key=gateway_public_key, endpoint=endpoint, dns=list(dns), mtu=mtu,
                             persistent_keepalive=persistent_keepalive)
    return {
        "device_id": record.device_id,
        "status": str(record.status),
        "status_reason": record.status_reason,
        "addresses": [f"{record.ipv4}/32"] + ([f"{record.ipv6}/128"] if record.ipv6 else []),
        "wg_quick_config": config,
        "interception_ca_pem": interception_ca_pem,
        "changed": changed,
    }


def error_body(reason: str, message: Text, detail: str = "") -> dict:
    body = {"error": reason, "message": {"ja": message.ja, "en": message.en}}
    if detail:
        body["detail"] = detail
    return body


def auth_log_record(decision: Decision, source_ip: str, *, request: EnrollRequest | None) -> dict:
    """The auth-stream record (gateway/logstore/FIELDS.md "auth")."""
    check = decision.check
    record = decision.record
    rec = {
        "event.dataset": "kanmon.auth",
        "event.action": "enrollment",
        "event.outcome": "success" if decision.ok else "failure",
        "event.reason": decision.message.en + (f": {decision.detail}" if decision.detail else ""),
        "kanmon.auth.reason": decision.reason,
        "device.id": decision.device_id,
        "source.ip": source_ip,
        "client.ip": source_ip,
        "user.name": record.owner if record is not None and record.owner else None,
        "http.response.status_code": decision.http_status,
        "x509.serial_number": check.serial_hex if check else None,
        "x509.subject.distinguished_name": check.subject if check else None,
        "x509.issuer.distinguished_name": check.issuer if check else None,
        "tls.client.hash.sha256": check.fingerprint_sha256 if check else None,
        "kanmon.peer.public_key": request.wg_public_key if request else None,
    }
    if check is not None and check.binding is not None:
        rec["kanmon.auth.binding"] = str(check.binding.state)
    if check is not None and check.crl_stale:
        rec["kanmon.auth.crl_stale"] = True
    if decision.posture is not None and not decision.posture.assessment.compliant:
        rec["kanmon.posture.problems"] = [p.en for p in decision.posture.assessment.problems]
    return rec
