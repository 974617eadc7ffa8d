"""Issue #3 end to end: a phone enrolls over mTLS from its namespace, gets its WireGuard
config, brings the tunnel up with wireguard-go and browses; the proxy log names it. Every
refusal gets a JSON error, an auth-log record, and no peer.

`kanmon run` serves the endpoint on the management side (config `enrollment.listen`); its
auth records go to the gateway's own tamper-evident log store."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from wireguard_tools import WireguardKey

from gateway.devices.ca import CaStore, build_org_ca, init_ca, issue_device_certificate, pki_dir
from gateway.lab.topology import UNDERLAY_GW, wait_until

ENROLL_PORT = 8443
DAY = dt.timedelta(days=1)

def _auth_records(log_dir: Path) -> list[dict]:
    out = []
    for path in sorted((log_dir / "auth").glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in out if r.get("event.action") == "enrollment"]


def _write_identity(directory: Path, name: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.cert.pem", directory / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _enroll(ns, ca_cert: Path, wg_public: str, identity: tuple[Path, Path] | None) -> tuple[int, dict]:
    body = json.dumps({"wg_public_key": wg_public, "platform": "ios", "os_version": "17.5", "jailbroken": False})
    cmd = ["curl", "-sS", "--max-time", "15", "--cacert", str(ca_cert), "-H", "content-type: application/json",
           "--data", body, "-w", "\nHTTP_CODE=%{http_code}"]
    if identity is not None:
        cmd += ["--cert", str(identity[0]), "--key", str(identity[1])]
    out = ns.run(*cmd, f"https://{UNDERLAY_GW}:{ENROLL_PORT}/v1/enroll", check=False, timeout=30)
    text, _, code = out.stdout.rpartition("\nHTTP_CODE=")
    assert code.strip().isdigit(), out.stderr
    return int(code), json.loads(text)


def _peers(lab) -> str:
    return lab.gw.run("wg", "show", lab.wg_interface, "peers", check=False).stdout


def _tunnel_from_config(ns, interface: str, config: str, private_key: str, workdir: Path) -> None:
    """What wg-quick does with the returned config, done by hand (wg-quick is not needed)."""
    addresses, wg_lines = [], []
    for line in config.replace("__DEVICE_PRIVATE_KEY__", private_key).splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "Address":
            addresses = [a.strip() for a in value.split(",")]
        elif name.strip() not in ("DNS", "MTU"):
            wg_lines.append(line)
    conf = workdir / f"{interface}.conf"
    conf.write_text("\n".join(wg_lines) + "\n")
    conf.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "WG_PROCESS_FOREGROUND"}
    import subprocess
    subprocess.run(ns.cmd("wireguard-go", interface), check=True, env=env, capture_output=True)
    ns.run("wg", "setconf", interface, str(conf))
    for address in addresses:
        ns.run("ip", "addr", "add", address, "dev", interface, *(["nodad"] if ":" in address else []))
    ns.run("ip", "link", "set", interface, "mtu", "1420", "up")
    ns.run("ip", "route", "replace", "default", "dev", interface)
    ns.run("ip", "-6", "route", "replace", "default", "dev", interface)


def test_enrollment_end_to_end(make_lab):
    lab = make_lab(n_devices=0, start=False,
                   overrides={"enrollment": {"listen": f"{UNDERLAY_GW}:{ENROLL_PORT}", "rate_per_minute": 600, "burst": 30}})
    # The CA is back-dated (as `kanmon ca init` on an earlier day) so that an already expired
    # device certificate can be issued for the refusal case.
    init_ca(pki_dir(lab.state_dir), "関門ラボ市", now=dt.datetime.now(dt.UTC) - 30 * DAY)
    out_dir = lab.workdir / "issued"
    lab.kanmon("device", "add", "--config", str(lab.config_path), "--id", "phone-1", "--owner", "tanaka@example.test",
               "--group", "staff", "--issue-cert", "--out", str(out_dir))
    lab.start_gateway()
    log_dir = lab.state_dir / "logs"
    ca_cert = out_dir / "ca.cert.pem"

    phone = lab.add_device(1, register=False, device_id="phone-1")
    phone.ns.run("ip", "link", "del", phone.wg_interface)      # the lab's own tunnel: we build ours
    wg_private = (out_dir / "phone-1.wg.key").read_text().strip()
    wg_public = str(WireguardKey(wg_private).public_key())
    assert wg_public not in _peers(lab)

    # ---- refusals first: each gets an auth record and no peer is added
    store = CaStore(pki_dir(lab.state_dir))
    org_ca = store.load_org_ca()
    now = dt.datetime.now(dt.UTC)
    refusals = lab.workdir / "refusals"
    cases = []

    def registered(device_id: str) -> str:
        lab.kanmon("device", "add", "--config", str(lab.config_path), "--id", device_id, "--owner", "x@example.test")
        return device_id

    def issue(device_id, key, start, end, ca=org_ca):
        issued = issue_device_certificate(ca, device_id, key, "x@example.test", start, end)
        return issued, _write_identity(refusals, device_id, issued.certificate, issued.private_key)

    k = str(WireguardKey.generate().public_key())
    cases.append(("expired", registered("d-expired"), k, issue("d-expired", k, now - 20 * DAY, now - DAY)[1]))
    k = str(WireguardKey.generate().public_key())
    cases.append(("not-yet-valid", registered("d-future"), k, issue("d-future", k, now + DAY, now + 20 * DAY)[1]))
    k = str(WireguardKey.generate().public_key())
    stranger = build_org_ca("Stranger", now=now - 30 * DAY)
    cases.append(("untrusted-ca", registered("d-stranger"), k,
                  issue("d-stranger", k, now - DAY, now + 20 * DAY, stranger)[1]))
    k = str(WireguardKey.generate().public_key())
    on_crl, ident = issue(registered("d-crl"), k, now - DAY, now + 20 * DAY)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(org_ca.cert.subject)
           .last_update(now - dt.timedelta(minutes=1)).next_update(now + 7 * DAY)
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(on_crl.certificate.serial_number)
                                    .revocation_date(now - dt.timedelta(minutes=1)).build())
           .sign(org_ca.key, hashes.SHA256()))
    crl_path = lab.workdir / "org.crl.pem"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    lab.kanmon("ca", "import-crl", "--state-dir", str(lab.state_dir), str(crl_path))
    cases.append(("revoked-crl", "d-crl", k, ident))
    k = str(WireguardKey.generate().public_key())
    ident = issue(registered("d-revoked"), k, now - DAY, now + 20 * DAY)[1]
    lab.kanmon("device", "revoke", "--config", str(lab.config_path), "d-revoked", "--reason", "stolen")
    cases.append(("device-revoked", "d-revoked", k, ident))
    k_cert, k_other = (str(WireguardKey.generate().public_key()) for _ in range(2))
    ident = issue(registered("d-unbound"), k_cert, now - DAY, now + 20 * DAY)[1]
    cases.append(("key-not-bound", "d-unbound", k_other, ident))
    cases.append(("no-certificate", None, str(WireguardKey.generate().public_key()), None))

    for reason, device_id, key, identity in cases:
        status, body = _enroll(phone.ns, ca_cert, key, identity)
        assert (status, body["error"]) == (403, reason), body
        assert body["message"]["ja"] and body["message"]["en"]
        records = [r for r in _auth_records(log_dir) if r["kanmon.auth.reason"] == reason]
        assert records, f"no auth record for {reason}"
        assert records[-1]["event.outcome"] == "failure" and records[-1]["device.id"] == device_id
        assert records[-1]["source.ip"] == "100.64.0.11"
        time.sleep(0.2)      # longer than a reconcile poll: a wrongly added peer would show up
        assert key not in _peers(lab), reason

    # ---- the real phone enrolls, twice (idempotent)
    identity = (out_dir / "phone-1.cert.pem", out_dir / "phone-1.key.pem")
    status, body = _enroll(phone.ns, ca_cert, wg_public, identity)
    assert status == 200, body
    assert body["device_id"] == "phone-1" and body["status"] == "active"
    assert body["interception_ca_pem"] == lab.interception_ca.read_text()
    again_status, again = _enroll(phone.ns, ca_cert, wg_public, identity)
    assert again_status == 200 and again["wg_quick_config"] == body["wg_quick_config"] and not again["changed"]
    success = [r for r in _auth_records(log_dir) if r["event.outcome"] == "success"]
    assert [r["device.id"] for r in success] == ["phone-1", "phone-1"]
    assert success[0]["user.name"] == "tanaka@example.test"

    wait_until(lambda: wg_public in _peers(lab), 5, "the reconciler to add the enrolled peer")
    _tunnel_from_config(phone.ns, f"{lab.prefix}e1", body["wg_quick_config"], wg_private, lab.workdir)

    def browses() -> bool:
        out = phone.ns.run("curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
                           "http://www.example.test/", check=False, timeout=15)
        return out.stdout.strip() == "200"

    wait_until(browses, 20, "the enrolled phone to browse", interval=0.5)
    wait_until(lambda: any(r.get("device.id") == "phone-1" and "www.example.test" in str(r.get("url.full"))
                           for r in lab.log_records("proxy")), 10, "the proxy log to name phone-1")
