"""Issue #18 "Must show", received mail: a virus (our own clamd signature, real clamd) in mail a
device fetches over IMAP (implicit TLS, through the gateway) is kept from the device, and the
device quarantines itself: registry, webhook alert with trigger ``mail-virus`` and the message's
evidence, remediation host still reachable, `kanmon device release` restores it."""

from __future__ import annotations

import json

import pytest

from gateway.lab.mailservers import MAIL_HOST, mail_prerequisites
from gateway.lab.topology import MAIL4, SPARE4, Lab, wait_until
from tests.availability import unavailable
from tests.e2e.conftest import require_lab, running_lab
from tests.e2e.test_mail_e2e import device_python, imap_fetch_all, load_mailbox
from tests.e2e.test_scan_quarantine_e2e import WEBHOOK_PORT, code, device_status, start_webhook
from tests.mailcorpus.build import TEST_VIRUS_MARKER

pytestmark = pytest.mark.e2e


def test_virus_in_received_mail_quarantines_the_device(tmp_path):
    require_lab()
    missing = mail_prerequisites()
    if missing:
        unavailable("mail servers missing: " + ", ".join(missing) +
                    " (apt-get install -y --no-install-recommends postfix dovecot-imapd dovecot-pop3d clamav-daemon)")
    workdir = tmp_path / "lab"
    hooks = tmp_path / "webhook.jsonl"
    lab = Lab(workdir, n_devices=1, mail=True, mail_signatures={"Kanmon.Test.Marker": TEST_VIRUS_MARKER})
    lab.config_overrides = {
        "mail": {"organization_hosts": [MAIL_HOST, MAIL4],
                 "clamd_socket": str(workdir / "mail" / "clamd" / "clamd.sock")},
        "auto_quarantine": {"mail_virus": True, "download_virus": False},
        "alerts": {"gateway_name": "kanmon-lab", "webhook": {"url": f"http://{SPARE4}:{WEBHOOK_PORT}/hook", "timeout": 2},
                   "retries": 3, "retry_base_seconds": 0.5},
        "quarantine": {"allow_hosts": ["mdm.test"]},
    }
    with running_lab(lab, "test_mail_virus_quarantine_e2e", start=False):
        start_webhook(lab, hooks)
        lab.start_gateway()
        dev = lab.devices[0]
        lab.wait_for_peer(dev)
        assert code(dev.curl("https://www.example.test/before", timeout=10)) == "200"

        load_mailbox(lab, ["clean-iso2022jp", "virus"])
        got = device_python(lab, imap_fetch_all(MAIL_HOST), timeout=120)
        import base64
        fetched = [base64.b64decode(m) for m in got["messages"].values()]
        assert len(fetched) == 2 and not [m for m in fetched if TEST_VIRUS_MARKER in m]

        wait_until(lambda: device_status(lab, dev.device_id)["status"] == "quarantined", 10, "the automatic quarantine")
        reason = device_status(lab, dev.device_id)["status_reason"]
        assert reason.startswith("[auto] mail-virus") and "Kanmon.Test.Marker" in reason
        wait_until(lambda: hooks.exists() and "device-auto-quarantined" in hooks.read_text(), 15, "the webhook alert")
        [alert] = [json.loads(x) for x in hooks.read_text().splitlines() if "device-auto-quarantined" in x]
        details = alert["details"]
        assert details["device.id"] == dev.device_id and details["kanmon.trigger"] == "mail-virus"
        assert details["user.name"] == f"user{dev.index}@example.test"
        evidence = details["kanmon.evidence"]
        assert evidence["signature"].startswith("Kanmon.Test.Marker") and evidence["network.protocol"] == "imap"
        assert evidence["email.message_id"] and len(evidence["kanmon.mail.sha256"]) == 64
        assert lab.metric_value("kanmon_auto_quarantines_total", trigger="mail-virus") == 1

        wait_until(lambda: code(dev.curl("http://www.example.test/q", "-i", timeout=5)) == "403", 5, "quarantine")
        assert code(dev.curl("https://mdm.test/enroll", timeout=10)) == "200"
        lab.kanmon("device", "release", dev.device_id, "--config", str(lab.config_path))
        wait_until(lambda: code(dev.curl("https://www.example.test/after", timeout=5)) == "200", 10, "the release")
