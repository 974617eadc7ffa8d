"""Issue #18, automatic quarantine's other triggers, through the tunnel with the compiled policy
engine: one block by a rule whose category is listed (here `malware`, as a rule on a feed's
malware list would be) quarantines the device at once; blocks of a category listed under
`repeated_blocks` quarantine it only when N of them fall within M minutes. Each time the
webhook gets device, user, trigger and evidence, and `device release` restores the device."""

from __future__ import annotations

import json
import textwrap

import pytest

from gateway.lab.topology import SPARE4, wait_until
from tests.e2e.test_scan_quarantine_e2e import WEBHOOK_PORT, code, device_status, start_webhook

pytestmark = pytest.mark.e2e

POLICY = textwrap.dedent("""
    version: 1
    settings: {default_action: allow, timezone: Asia/Tokyo, no_sni: block}
    rules:
      - {id: feed-malware, action: block, category: malware, reason: "マルウェア配布サイト / malware site", match: {domain: [blocked.test]}}
      - {id: sideload-sites, action: block, category: sideload, reason: "アプリの直接配布 / sideload source", match: {domain: [tracker.test]}}
""")


def alerts(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if "device-auto-quarantined" in x]


def test_category_hit_and_repeated_blocks_quarantine_the_device(make_lab, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    hooks = tmp_path / "webhook.jsonl"
    lab = make_lab(n_devices=2, start=False, overrides={
        "policy": {"path": str(policy)},
        "auto_quarantine": {"categories": ["malware"], "repeated_blocks": [{"category": "sideload", "count": 10, "minutes": 5}]},
        "alerts": {"gateway_name": "kanmon-lab", "webhook": {"url": f"http://{SPARE4}:{WEBHOOK_PORT}/hook", "timeout": 2},
                   "retries": 5, "retry_base_seconds": 0.5},
        "quarantine": {"allow_hosts": ["mdm.test"]},
    })
    lab.start_gateway()   # the webhook receiver is down at first: delivery is retried, traffic never waits
    for device in lab.devices:
        lab.wait_for_peer(device)
    a, b = lab.devices

    # -- one hit on a malware destination: quarantined at once
    assert code(a.curl("https://www.example.test/ok", timeout=10)) == "200"
    a.curl("https://blocked.test/payload", timeout=5)
    wait_until(lambda: device_status(lab, a.device_id)["status"] == "quarantined", 5, "the category quarantine")
    assert code(b.curl("https://www.example.test/meanwhile", timeout=10)) == "200"   # data path unaffected
    wait_until(lambda: lab.metric_value("kanmon_alert_deliveries_total", channel="webhook", outcome="retried") >= 1,
               10, "a failed delivery to be retried")
    start_webhook(lab, hooks)
    wait_until(lambda: alerts(hooks), 20, "the webhook alert, delivered by a retry")
    [first] = alerts(hooks)
    assert first["details"]["device.id"] == a.device_id and first["details"]["kanmon.trigger"] == "category"
    evidence = first["details"]["kanmon.evidence"]
    assert evidence["category"] == "malware" and evidence["rule.id"] == "feed-malware"
    assert evidence["destination"].rstrip(".") == "blocked.test"
    assert code(a.curl("https://mdm.test/enroll", timeout=10)) == "200"
    wait_until(lambda: code(a.curl("https://www.example.test/q", timeout=5)) == "403", 5, "the quarantine to apply")

    # -- sideload blocks: one request is not enough (it makes 2-4 blocks: the A and AAAA queries,
    # then the ClientHello to the sinkhole, once per address family tried); ten within five minutes are
    b.curl("https://tracker.test/app", timeout=5)
    assert device_status(lab, b.device_id)["status"] == "active"
    for _ in range(12):
        if device_status(lab, b.device_id)["status"] == "quarantined":
            break
        b.curl("https://tracker.test/app", timeout=5)
    wait_until(lambda: device_status(lab, b.device_id)["status"] == "quarantined", 5, "the repeated-blocks quarantine")
    wait_until(lambda: len(alerts(hooks)) == 2, 15, "the second webhook alert")
    second = alerts(hooks)[1]["details"]
    assert second["device.id"] == b.device_id and second["kanmon.trigger"] == "repeated-blocks"
    assert second["kanmon.evidence"]["count"] == 10 and second["kanmon.evidence"]["category"] == "sideload"
    assert lab.metric_value("kanmon_auto_quarantines_total", trigger="category") == 1
    assert lab.metric_value("kanmon_auto_quarantines_total", trigger="repeated-blocks") == 1

    # -- release restores both
    for device in (a, b):
        lab.kanmon("device", "release", device.device_id, "--config", str(lab.config_path))
        wait_until(lambda: code(device.curl("https://www.example.test/back", timeout=5)) == "200", 10, "the release")
