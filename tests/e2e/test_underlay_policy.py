"""`underlay_network` in the running gateway (issue #4: "the device's outer (underlay) source
network, so groups can be limited to approved lines"): the gateway reads each peer's endpoint
from the WireGuard interface and the policy judges requests by it. The lab's devices tunnel
from 100.64.0.0/24."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import require_lab

pytestmark = pytest.mark.e2e

POLICY = """\
version: 1
settings: {default_action: allow}
rules:
  - id: intranet-approved-lines-only
    action: block
    reason: 承認済み回線からのみ / only from approved lines
    match: {domain: example.test}
    unless: {underlay_network: 100.64.0.0/24}
  - id: files-not-from-the-lab-line
    action: block
    reason: この回線からは不可 / not from this line
    match: {domain: files.example.test, underlay_network: 100.64.0.0/24}
    dns_block: sinkhole   # the name leads to the gateway: the block page says why
  - id: mail-only-from-another-line
    action: block
    dns_block: nxdomain   # the sinkhole is the default (issue #19); this test expects no answer
    match: {domain: mail.example.test}
    unless: {underlay_network: 203.0.113.0/24}
"""


def code(device, url: str) -> str:
    out = device.curl(url, "-s", "-o", "/dev/null", "-w", "HTTP_CODE=%{http_code}")
    return out.stdout.rsplit("HTTP_CODE=", 1)[-1].strip()


def test_underlay_network_conditions_use_the_peers_real_outer_address(make_lab, tmp_path):
    require_lab()
    policy = tmp_path / "underlay.yaml"
    policy.write_text(POLICY)
    lab = make_lab(n_devices=1, overrides={"policy": {"path": str(policy)}})
    dev = lab.devices[0]
    before = len(lab.nginx_requests())
    assert code(dev, "https://example.test/") == "200"          # from an approved line
    assert code(dev, "https://files.example.test/x") == "403"   # the rule that names this line
    assert code(dev, "https://mail.example.test/") == "000"     # approved line is another: NXDOMAIN
    hosts = [r["host"] for r in lab.nginx_requests()[before:]]
    assert hosts == ["example.test"], hosts
    assert "files-not-from-the-lab-line" in {r.get("rule.id") for r in lab.log_records("proxy")}
    assert "mail-only-from-another-line" in {r.get("rule.id") for r in lab.log_records("dns")}
