"""Issue #19 at the enforcer (mitmproxy test flows): which page a block gets, DNS blocks
answered with the sinkhole by default, and a broken catalog stopping the start."""

from __future__ import annotations

import ipaddress

import pytest
from mitmproxy import dns
from mitmproxy.test import tflow, tutils

from addons.enforce import Enforcer
from addons.flowverdict import record_verdict
from addons.identity import DeviceDirectory, DeviceIdentity
from gateway.proxy.flowstate import METADATA_DNS_BLOCK, METADATA_SIGNATURE, METADATA_VERDICT
from gateway.proxy.connections import LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.pages import catalog
from gateway.pages.catalog import CatalogError
from gateway.pages.organization import Helpdesk, Organization
from gateway.registry.model import DeviceRecord
from gateway.verdict import RULE_MALFORMED_AUTHORITY, RULE_SIGNIN_REQUIRED, Action, Stage, Verdict

DEVICE = DeviceRecord("phone-1", None, ipaddress.ip_address("10.77.0.2"))
ORG = Organization("例市", "Ex City", None, Helpdesk("課", "desk", mail="help@example.lg.jp"))


class Chain:
    def __init__(self, **enforcer_kw):
        self.metrics = GatewayMetrics()
        self.connections = LiveConnections()
        directory = DeviceDirectory()
        directory.replace([DEVICE])
        self.identity = DeviceIdentity(directory, self.connections, self.metrics)
        self.enforcer = Enforcer(self.connections, self.metrics, ORG.helpdesk, [ipaddress.ip_network("10.77.0.0/24")],
                                 lambda _cid: None, organization=ORG, **enforcer_kw)

    def client(self):
        client = tflow.tclient_conn()
        client.peername = ("10.77.0.2", 40000)
        self.identity.client_connected(client)
        return client

    def blocked(self, verdict: Verdict, **metadata):
        flow = tflow.tflow(client_conn=self.client())
        flow.request = tutils.treq(host="files.example.jp", port=80, scheme=b"http", path=b"/a.zip", authority=b"")
        flow.request.headers["host"] = "files.example.jp"
        flow.server_conn.address = ("198.51.100.80", 80)
        flow.metadata.update(metadata)
        record_verdict(flow, verdict, self.connections)
        self.enforcer.requestheaders(flow)
        return flow

    def dns(self, verdict: Verdict, mode: str | None, qtype=dns.types.A):
        flow = tflow.tdnsflow(client_conn=self.client())
        flow.request.questions[0].type = qtype
        flow.response = None
        flow.metadata[METADATA_VERDICT] = verdict
        if mode is not None:
            flow.metadata[METADATA_DNS_BLOCK] = mode
        self.enforcer.dns_request(flow)
        return flow.response


BLOCK = Verdict(Action.BLOCK, "webmail", "rule webmail (block)", Stage.REQUEST, category="webmail")


def test_an_infected_download_gets_its_own_page_naming_the_signature():
    flow = Chain().blocked(BLOCK, **{METADATA_SIGNATURE: "Eicar-<Test>-Signature"})
    page = flow.response.get_text()
    assert flow.response.status_code == 403 and flow.response.headers["X-Kanmon-Page"] == "infected"
    assert "Eicar-&lt;Test&gt;-Signature" in page and "<Test>" not in page
    assert "ウイルス" in page and "virus" in page


def test_sign_in_required_links_to_the_portal_with_the_page_to_return_to():
    flow = Chain(signin_portal="signin.kanmon.internal").blocked(
        Verdict(Action.BLOCK, RULE_SIGNIN_REQUIRED, "sign-in required", Stage.REQUEST))
    page = flow.response.get_text()
    assert flow.response.headers["X-Kanmon-Page"] == "signin-required"
    assert 'href="https://signin.kanmon.internal/start?next=http%3A%2F%2Ffiles.example.jp%2Fa.zip"' in page


def test_a_malformed_request_is_400_and_says_so():
    flow = Chain().blocked(Verdict(Action.BLOCK, RULE_MALFORMED_AUTHORITY, "bad host", Stage.REQUEST))
    assert flow.response.status_code == 400 and flow.response.headers["X-Kanmon-Page"] == "bad-request"
    assert "blocked by your organization" not in flow.response.get_text()


def test_a_policy_page_without_policy_shows_the_category_message():
    page = Chain().blocked(BLOCK).response.get_text()
    assert "Free web mail services are not used for work" in page and "フリーメールを使いません" in page
    assert "mailto:help@example.lg.jp?subject=" in page


@pytest.mark.parametrize("mode, qtype, expect", [
    (None, dns.types.A, "198.18.0.1"),          # the default: the sinkhole (issue #19)
    ("sinkhole", dns.types.AAAA, "100::1"),
    ("nxdomain", dns.types.A, None),
])
def test_dns_blocks_answer_the_sinkhole_unless_told_nxdomain(mode, qtype, expect):
    response = Chain().dns(Verdict(Action.BLOCK, "webmail", "x", Stage.DNS), mode, qtype)
    if expect is None:
        assert response.response_code == dns.response_codes.NXDOMAIN and response.answers == []
    else:
        assert response.response_code == dns.response_codes.NOERROR and len(response.answers) == 1
        data = response.answers[0].data
        address = ipaddress.IPv4Address(data) if len(data) == 4 else ipaddress.IPv6Address(data)
        assert str(address) == expect


def test_the_enforcer_does_not_start_with_a_broken_catalog(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog.CATALOG, "locale_dir", tmp_path)   # no catalog at all
    catalog.translations.cache_clear()
    try:
        with pytest.raises(CatalogError) as exc:
            Chain()
        assert "読めません" in exc.value.text.ja and "cannot read" in exc.value.text.en
    finally:
        catalog.translations.cache_clear()


def test_the_lab_browser_script_checks_a_viewport_step():
    from gateway.lab.browser import BrowserScriptError, validate_steps
    assert validate_steps([{"action": "viewport", "width": 390, "height": 844}, {"action": "overflow"}])
    for bad in ({"action": "viewport", "width": "390", "height": 844}, {"action": "viewport", "width": 390},
                {"action": "viewport", "width": 0, "height": 844}):
        with pytest.raises(BrowserScriptError, match="width and height"):
            validate_steps([bad])
