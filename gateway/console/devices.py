"""Devices: the list (search, filters), a device's page, registration with its QR code, and
the lifecycle actions (revoke, suspend, quarantine, release, resume) with a reason.

Every action goes through gateway/runtime/lifecycle.py, the code path of `kanmon device`,
then ``apply_now`` asks the running gateway to apply it and waits for its confirmation: the
device is cut off when the page answers (the ≤ 100 ms of issue #3 is measured from the
registry write the click makes)."""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import Blueprint, abort, make_response, redirect, request, url_for

from gateway.console import auth
from gateway.console.app import render_page
from gateway.console.audit import actor
from gateway.console.catalog import M_
from gateway.console.live import DeviceLive, live_of
from gateway.posture import POSTURE_REASON_PREFIX, PosturePolicy, apply_posture, assess
from gateway.registry.model import AuditEntry, DeviceRecord, DeviceStatus, Ownership, RegistryError
from gateway.runtime import lifecycle
from gateway.signin.operators import ROLE_AUDITOR, ROLE_HELPDESK

log = logging.getLogger("kanmon.console.devices")
bp = Blueprint("devices", __name__)

ACTIONS = {   # action -> (target status or None for release, needs a reason)
    "revoke": (DeviceStatus.REVOKED, True),
    "suspend": (DeviceStatus.SUSPENDED, True),
    "quarantine": (DeviceStatus.QUARANTINED, True),
    "resume": (DeviceStatus.ACTIVE, False),
    "release": (None, False),
}
ACTION_LABELS = {"revoke": M_("Revoke"), "suspend": M_("Suspend"), "quarantine": M_("Quarantine"),
                 "resume": M_("Resume"), "release": M_("Release")}
HANDSHAKE_FILTERS = ("any", "15m", "24h", "stale", "never")
HANDSHAKE_LABELS = {"any": M_("any time"), "15m": M_("within 15 minutes"), "24h": M_("within 24 hours"),
                    "stale": M_("more than 24 hours ago"), "never": M_("never")}
REASON_LABELS = {"lost": M_("Lost"), "stolen": M_("Stolen"), "retired": M_("Retired or returned"),
                 "compromised": M_("Compromised"), "policy-violation": M_("Policy violation"), "other": M_("Other")}
POSTURE_FILTERS = ("any", "compliant", "noncompliant", "unknown")
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MAX_REASON = 500
PAGE_SIZE = 100   # rows per page of the device list: 10 000 devices were one 5 MB page


def posture_policy(cfg) -> PosturePolicy:
    return PosturePolicy.from_pairs(getattr(cfg, "posture_min_os", ()), getattr(cfg, "posture_quarantine_jailbroken", True))


def posture_of(cfg, rec: DeviceRecord) -> str:
    if rec.os_version is None and rec.platform is None:
        return "unknown"
    return "compliant" if assess(posture_policy(cfg), rec.platform, rec.os_version, rec.jailbroken).compliant \
        else "noncompliant"


@dataclass(frozen=True)
class Row:
    rec: DeviceRecord
    status: str
    posture: str
    live: DeviceLive


def _in_network(endpoint: str | None, text: str) -> bool:
    if not endpoint:
        return False
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(text, strict=False)
    except ValueError:
        return text.lower() in endpoint.lower()


def _handshake_matches(live: DeviceLive, wanted: str, now: float) -> bool:
    age = None if live.last_handshake is None else now - live.last_handshake
    return {"any": True, "15m": age is not None and age <= 900, "24h": age is not None and age <= 86400,
            "stale": age is not None and age > 86400, "never": age is None}.get(wanted, True)


@bp.get("/devices")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def device_list():
    svc = auth.services()
    args = request.args
    f = {k: args.get(k, "").strip()[:200] for k in ("q", "owner", "group", "status", "ownership", "posture",
                                                       "handshake", "network")}
    now = datetime.now(UTC)
    peers = live_of(svc.cfg)
    rows = []
    for rec in svc.registry.all():
        row = Row(rec, str(rec.effective_status(now)), posture_of(svc.cfg, rec), peers.get(rec))
        if f["q"]:
            hay = " ".join([rec.device_id, rec.owner, rec.department, str(rec.ipv4), str(rec.ipv6 or ""),
                            " ".join(rec.groups), rec.platform or ""]).lower()
            if f["q"].lower() not in hay:
                continue
        if f["owner"] and f["owner"].lower() != rec.owner.lower():
            continue
        if f["group"] and f["group"] not in rec.groups:
            continue
        if f["status"] and f["status"] != row.status:
            continue
        if f["ownership"] and f["ownership"] != str(rec.ownership):
            continue
        if f["posture"] not in ("", "any") and f["posture"] != row.posture:
            continue
        if f["handshake"] and not _handshake_matches(row.live, f["handshake"], now.timestamp()):
            continue
        if f["network"] and not _in_network(row.live.endpoint, f["network"]):
            continue
        rows.append(row)
    pages = max(1, -(-len(rows) // PAGE_SIZE))
    page = _page_number(args.get("page", ""), pages)
    shown = rows[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]
    filters = {k: v for k, v in f.items() if v}
    return render_page("devices.html", rows=shown, total=len(rows), page=page, pages=pages, filters=filters,
                       f=f, statuses=[str(s) for s in DeviceStatus],
                       ownerships=[str(o) for o in Ownership], postures=POSTURE_FILTERS, handshakes=HANDSHAKE_FILTERS,
                       handshake_labels=HANDSHAKE_LABELS,
                       now=now.timestamp(), messages=_take_notices())


def _page_number(text: str, pages: int) -> int:
    """The page asked for, within 1..pages (anything else: the nearest page, never an error)."""
    text = text.strip()[:12]
    number = int(text) if text.isdecimal() else 1
    return min(max(number, 1), pages)


def _device_or_404(device_id: str) -> DeviceRecord:
    rec = auth.services().registry.get(device_id)
    if rec is None:
        abort(404)
    return rec


@bp.get("/devices/<device_id>")
@auth.requires_role(ROLE_HELPDESK, ROLE_AUDITOR)
def device_page(device_id: str):
    svc = auth.services()
    rec = _device_or_404(device_id)
    now = datetime.now(UTC)
    history = svc.registry.audit_of(rec.device_id, 50)
    live = live_of(svc.cfg).get(rec)
    blocks = last_blocks(svc.cfg, rec.device_id, now)
    op = auth.current_operator()
    return render_page("device.html", rec=rec, status=str(rec.effective_status(now)), posture=posture_of(svc.cfg, rec),
                       history=history, live=live, blocks=blocks, now=now.timestamp(),
                       can_act=op is not None and op.has(ROLE_HELPDESK) and not op.read_only,
                       actions=_possible_actions(rec), labels=ACTION_LABELS, revoke_reasons=lifecycle.REVOKE_REASONS, reason_labels=REASON_LABELS,
messages=_take_notices(), history_label=history_label)


def _possible_actions(rec: DeviceRecord) -> list[str]:
    if rec.status is DeviceStatus.REVOKED:
        return []
    out = ["revoke"]
    if rec.status is not DeviceStatus.SUSPENDED:
        out.append("suspend")
    else:
        out.append("resume")
    if rec.status is DeviceStatus.QUARANTINED:
        out.append("release")
    else:
        out.append("quarantine")
    return out


def history_label(action: str) -> str:
    """An audit action of the device's history in the page's language (the reports' table;
    an action it does not know is shown as written)."""
    from flask import g

    from gateway.reports.labels import AUDIT_ACTIONS, words_or_code
    return words_or_code(AUDIT_ACTIONS, action).render(g.get("lang", "ja"))


def last_blocks(cfg, device_id: str, now: datetime, limit: int = 20) -> list[dict]:
    """The device's latest blocked requests of the last 24 h from the log store (read-only)."""
    from gateway.logstore.search import search

    found: list[dict] = []
    for stream in ("proxy", "conn", "dns"):
        try:
            for record in search(cfg.log_dir, stream, since=now - timedelta(hours=24), device=device_id, verdict="block"):
                found.append({"stream": stream, "at": record.get("@timestamp", ""), "rule": record.get("rule.id", ""),
                              "target": record.get("url.full") or record.get("dns.question.name")
                              or record.get("destination.ip") or ""})
        except OSError as exc:   # no log directory yet, unreadable: the page says so by showing none
            log.info("log store not readable for %s: %s", stream, exc)
    found.sort(key=lambda r: r["at"], reverse=True)
    return found[:limit]


@bp.post("/devices/<device_id>/action")
@auth.requires_role(ROLE_HELPDESK)
def device_action(device_id: str):
    svc = auth.services()
    action = request.form.get("action", "")
    if action not in ACTIONS:
        abort(400)
    reason = request.form.get("reason", "").strip()[:MAX_REASON]
    status, needs_reason = ACTIONS[action]
    if action == "revoke" and reason not in lifecycle.REVOKE_REASONS:
        return _notice_back(device_id, "error", M_("Choose why the device is revoked."))
    if needs_reason and not reason:
        return _notice_back(device_id, "error", M_("A reason is required."))
    if reason.startswith(POSTURE_REASON_PREFIX):
        return _notice_back(device_id, "error", M_("This reason is reserved for automatic posture quarantines."))
    if status is None:
        change = lifecycle.release(svc.registry, device_id, posture_policy(svc.cfg), actor=actor(), reason=reason)
    else:
        change = lifecycle.change_status(svc.registry, device_id, status, actor=actor(), reason=reason)
    if change.missing:
        abort(404)
    if not change.ok:
        return _notice_back(device_id, "error", change.refused.render())
    applied = svc.apply_now(svc.cfg, svc.registry)
    notices = [("ok", M_("Done: %(device)s is now %(status)s."), {"device": device_id,
                                                                   "status": str(change.record.status)})]
    if applied.warning is not None:
        notices.append(("warning", applied.warning.render(), {}))
    if change.note is not None:
        notices.append(("warning", change.note.render(), {}))
    _notice(*notices)
    return redirect(url_for("devices.device_page", device_id=device_id), code=303)


# -- certificate renewal ---------------------------------------------------------------------

RENEW_DAYS = 365


@bp.post("/devices/<device_id>/renew")
@auth.requires_role(ROLE_HELPDESK)
def renew(device_id: str):
    """A new device certificate from the organization CA for the registered WireGuard key (what
    `kanmon device renew` does without --csr): the PKCS#12 and its password are shown once (kept
    in this session only, until downloaded)."""
    import secrets as _secrets

    from gateway.devices.ca import CaStore, DeviceCaError, device_pkcs12, issue_device_certificate, pki_dir

    svc = auth.services()
    reason = request.form.get("reason", "").strip()[:MAX_REASON]
    check = lifecycle.renewable(svc.registry, device_id)
    if check.missing:
        abort(404)
    if not check.ok:
        return _notice_back(device_id, "error", check.refused.render())
    rec = check.record
    if rec.wg_public_key is None:
        return _notice_back(device_id, "error", M_("The device has not enrolled yet: it has no key to certify."))
    if not rec.owner:
        return _notice_back(device_id, "error", M_("A certificate needs an owner: register the device's owner first."))
    now = datetime.now(UTC)
    not_after = now + timedelta(days=RENEW_DAYS)
    if rec.valid_until is not None:
        not_after = min(not_after, rec.valid_until)
    try:
        ca = CaStore(pki_dir(svc.cfg.state_dir)).load_org_ca()
        issued = issue_device_certificate(ca, rec.device_id, rec.wg_public_key, rec.owner, now, not_after)
        password = _secrets.token_urlsafe(12)
        p12 = device_pkcs12(issued, ca.cert, password.encode(), rec.device_id)
    except DeviceCaError as exc:
        return _notice_back(device_id, "error", exc.text.render())
    try:
        lifecycle.record_renewal(svc.registry, rec, issued.certificate, issued.fingerprint_sha256, None,
                                 actor=actor(), reason=reason)
    except RegistryError as exc:
        return _notice_back(device_id, "error", str(exc))
    applied = svc.apply_now(svc.cfg, svc.registry)
    token = _secrets.token_urlsafe(16)
    session = auth.g.get("console_session")
    session.downloads[token] = (f"{rec.device_id}.p12", p12)
    return render_page("renewed.html", rec=rec, password=password, token=token,
                       not_after=issued.certificate.not_valid_after_utc.strftime("%Y-%m-%d"),
                       warning=applied.warning.render() if applied.warning else None)


@bp.get("/devices/<device_id>/certificate/<token>")
@auth.requires_role(ROLE_HELPDESK)
def certificate_download(device_id: str, token: str):
    """The renewed PKCS#12, once, to the session that made it."""
    session = auth.g.get("console_session")
    downloads = session.downloads if session is not None else {}
    item = downloads.get(token)
    if item is None or not item[0].startswith(device_id + "."):
        abort(404)
    # taken out only by a GET (a HEAD from a link checker or a prefetch must not use it up);
    # pop() decides between two GETs at once: one gets the file, the other 404
    if request.method == "GET" and downloads.pop(token, None) is None:
        abort(404)
    name, data = item
    response = make_response(data)
    response.headers["Content-Type"] = "application/x-pkcs12"
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


# -- registration ------------------------------------------------------------------------------

@bp.get("/devices/new")
@auth.requires_role(ROLE_HELPDESK)
def register_form():
    return render_page("register.html", ownerships=[str(o) for o in Ownership], values={}, errors=[])


@bp.post("/devices/new")
@auth.requires_role(ROLE_HELPDESK)
def register():
    """A new device with a WireGuard key pair made here: registered at once, and its
    wg-quick configuration shown as a QR code once (the private key is not stored)."""
    from wireguard_tools import WireguardKey

    from gateway.devices.clientconfig import ClientConfigError, qr_png, wg_quick_config

    svc = auth.services()
    cfg = svc.cfg
    form = {k: request.form.get(k, "").strip()[:200] for k in ("device_id", "owner", "department", "groups",
                                                                  "ownership", "platform", "os_version", "reason")}
    errors = []
    if not DEVICE_ID.match(form["device_id"]):
        errors.append(M_("The device id must be 1 to 64 letters, digits, '.', '_', '@' or '-'."))
    if not form["owner"]:
        errors.append(M_("The owner is required."))
    if form["ownership"] not in [str(o) for o in Ownership]:
        errors.append(M_("Choose the ownership."))
    if form["reason"].startswith(POSTURE_REASON_PREFIX):
        errors.append(M_("This reason is reserved for automatic posture quarantines."))
    if not cfg.endpoint:
        errors.append(M_("The configuration has no tunnel.endpoint: devices cannot be given a configuration."))
    if not errors and svc.registry.get(form["device_id"]) is not None:
        errors.append(M_("A device with this id is already registered."))
    if errors:
        return render_page("register.html", 400, ownerships=[str(o) for o in Ownership], values=form, errors=errors)
    try:
        gateway_public = str(WireguardKey(cfg.wg_private_key_file.read_text().strip()).public_key())
    except (OSError, ValueError):
        return render_page("register.html", 503, ownerships=[str(o) for o in Ownership], values=form,
                           errors=[M_("The gateway's WireGuard key cannot be read (has the gateway run once?).")])
    private = WireguardKey.generate()
    try:
        ipv4, ipv6 = svc.registry.allocate_addresses(cfg.ipv4_prefix, cfg.ipv6_prefix)
        record = DeviceRecord(device_id=form["device_id"], wg_public_key=str(private.public_key()), ipv4=ipv4, ipv6=ipv6,
                              owner=form["owner"], department=form["department"],
                              groups=frozenset(g.strip() for g in form["groups"].split(",") if g.strip()),
                              ownership=Ownership(form["ownership"]), platform=form["platform"] or None,
                              os_version=form["os_version"] or None)
        record = apply_posture(posture_policy(cfg), record).record
        rec = svc.registry.add(record, audit=AuditEntry(actor(), "device-added", form["reason"] or record.status_reason))
    except RegistryError as exc:
        return render_page("register.html", 409, ownerships=[str(o) for o in Ownership], values=form, errors=[str(exc)])
    applied = svc.apply_now(cfg, svc.registry)
    dns = [str(cfg.gateway_ipv4)] + ([str(cfg.gateway_ipv6)] if cfg.gateway_ipv6 else [])
    try:
        text = wg_quick_config(private_key=str(private), address_v4=str(rec.ipv4),
                               address_v6=str(rec.ipv6) if rec.ipv6 else None, gateway_public_key=gateway_public,
                               endpoint=cfg.device_endpoint(rec.ipv4), dns=dns, mtu=cfg.wg_mtu)
        qr = "data:image/png;base64," + base64.b64encode(qr_png(text, scale=5)).decode("ascii")
    except ClientConfigError as exc:
        return render_page("register.html", 500, ownerships=[str(o) for o in Ownership], values=form,
                           errors=[exc.text.render()])
    response = render_page("registered.html", rec=rec, qr=qr, config_text=text,
                           warning=applied.warning.render() if applied.warning else None)
    return response


# -- notices (shown once on the next page) -----------------------------------------------------

def _notice(*items: tuple[str, str, dict]) -> None:
    session = auth.g.get("console_session")
    if session is not None:
        session.notices.extend(items)


def _notice_back(device_id: str, kind: str, msgid: str):
    _notice((kind, msgid, {}))
    return redirect(url_for("devices.device_page", device_id=device_id), code=303)


def _take_notices() -> list[tuple[str, str]]:
    from gateway.console.catalog import gettext_for
    session = auth.g.get("console_session")
    if session is None or not session.notices:
        return []
    translate = gettext_for(auth.g.get("lang", "ja"))
    out = [(kind, translate(msgid, **{k: translate(v) if k == "status" else v for k, v in values.items()})
            if values else translate(msgid)) for kind, msgid, values in session.notices]
    session.notices.clear()
    return out
