"""The speed-ups on the decision path (issue #4 benchmarks) change no verdict.

- per-device views: rules whose device condition is false for a device are skipped without
  being tried; verdicts must equal a full evaluation for every device, stage and URL, and a
  changed device (a new DeviceContext) must see its new verdicts at once;
- host-only rules decided from the host lookup: still "unknown" where the host is unknown;
- the addons' caches (tenant-header scan, parsed addresses, metric children, the
  internal-destination answer) behave as the uncached code did.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from mitmproxy.test import tflow, tutils
from wireguard_tools import WireguardKey

from addons.blockpage import Helpdesk
from addons.enforce import Enforcer
from gateway.proxy.flowstate import METADATA_VERDICT
from addons.identity import DeviceDirectory, DeviceIdentity
from addons.policy import PolicyDecider, PolicyHolder
from gateway.proxy.connections import LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.policy import DeviceContext, compile_text, is_deferred, query_for_url
from gateway.policy.query import PolicyQuery
from gateway.registry.model import DeviceRecord
from gateway.verdict import Stage

POLICY = """
version: 1
settings: {default_action: allow}
lists:
  storage: {file: storage.txt}
rule_groups:
  - name: byod
    applies_to: {ownership: byod}
    rules:
      - {id: byod-jailbroken, action: block, match: {jailbroken: true}}
      - {id: byod-old-os, action: block, match: {os_version_below: {ios: "17.0", android: "13"}}}
      - {id: byod-storage, action: block, match: {list: storage}}
  - name: telework
    applies_to: {device_group: telework}
    rules:
      - {id: telework-line, action: block, unless: {underlay_network: [203.0.113.0/24]}}
rules:
  - {id: quarantined, action: block, match: {device_status: quarantined}}
  - {id: staff-news, action: monitor, match: {device_group: staff, domain: news.test}}
  - {id: webmail, action: block, match: {domain: [mail.test, webmail.test]}}
  - {id: apk, action: block, match: {file_extension: apk}}
  - {id: apk-type, action: block, match: {response_content_type: application/vnd.android.package-archive}}
  - {id: video, action: monitor, match: {response_content_type: "video/*"}}
"""
LISTS = {"storage": ("storage.txt", "box.test\ndrive.test\n")}
URLS = ["https://mail.test/inbox", "https://a.webmail.test/", "https://box.test/up", "https://x.drive.test/f.apk",
        "https://news.test/", "https://plain.test/app.apk", "https://plain.test/", "http://10.1.2.3/bench"]
DEVICES = [
    DeviceContext("d1", frozenset({"staff"}), "org"),
    DeviceContext("d2", frozenset({"staff"}), "byod", platform="ios", os_version="16.2"),
    DeviceContext("d3", frozenset({"staff"}), "byod", platform="ios", os_version="17.4"),
    DeviceContext("d4", frozenset(), "byod", platform="android", os_version="14", jailbroken=True),
    DeviceContext("d5", frozenset({"telework"}), "org", underlay_ip=ipaddress.ip_address("203.0.113.9")),
    DeviceContext("d6", frozenset({"telework"}), "org", underlay_ip=ipaddress.ip_address("192.0.2.9")),
    DeviceContext("d7", frozenset({"staff"}), "org", status="quarantined"),
]
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def reference_snapshot():
    """The same policy with the per-device views switched off: every rule is tried."""
    snap = compile_text(POLICY, LISTS)
    snap._device_checks = ()
    for rule in snap.rules:
        rule.host_only = False
    return snap


@pytest.mark.parametrize("stage", [Stage.DNS, Stage.TLS, Stage.REQUEST, Stage.RESPONSE, Stage.CONNECT])
def test_verdicts_equal_full_evaluation_for_every_device(stage):
    fast, slow = compile_text(POLICY, LISTS), reference_snapshot()
    checked = 0
    for device in DEVICES:
        for url in URLS:
            q = query_for_url(url, device, stage=stage, now=NOW)
            if stage is Stage.RESPONSE:
                q = q._replace(response_content_type="video/mp4")
            assert fast.decide(q) == slow.decide(q), (device.device_id, url, stage)
            assert fast.host_verdict(device, q.host, stage, NOW) == slow.host_verdict(device, q.host, stage, NOW)
            checked += 1
    assert checked == len(DEVICES) * len(URLS)


def test_device_conditions_still_decide():
    snap = compile_text(POLICY, LISTS)
    v = lambda device, url: snap.decide(query_for_url(url, device, now=NOW))  # noqa: E731
    assert v(DEVICES[1], "https://plain.test/").rule_id == "byod-old-os"
    assert v(DEVICES[2], "https://box.test/").rule_id == "byod-storage"
    assert is_deferred(v(DEVICES[0], "https://box.test/"))  # org devices may use it (response rules next)
    assert v(DEVICES[3], "https://plain.test/").rule_id == "byod-jailbroken"
    assert v(DEVICES[5], "https://plain.test/").rule_id == "telework-line"
    assert is_deferred(v(DEVICES[4], "https://plain.test/"))  # approved line: on to the response stage
    assert v(DEVICES[6], "https://plain.test/").rule_id == "quarantined"
    assert v(DEVICES[0], "https://news.test/").rule_id == "staff-news"
    assert v(DEVICES[5], "https://news.test/").rule_id == "telework-line"


def test_a_changed_device_sees_its_new_verdicts_at_once():
    snap = compile_text(POLICY, LISTS)
    org = DEVICES[0]
    assert is_deferred(snap.decide(query_for_url("https://box.test/", org, now=NOW)))
    moved = replace(org, ownership="byod", platform="android", os_version="14")
    assert snap.decide(query_for_url("https://box.test/", moved, now=NOW)).rule_id == "byod-storage"
    quarantined = replace(moved, status="quarantined")
    assert snap.decide(query_for_url("https://box.test/", quarantined, now=NOW)).rule_id == "byod-storage"
    assert snap.decide(query_for_url("https://plain.test/", quarantined, now=NOW)).rule_id == "quarantined"
    assert is_deferred(snap.decide(query_for_url("https://box.test/", org, now=NOW)))


def test_host_only_rule_is_unknown_where_the_host_is_not_known():
    snap = compile_text(POLICY, LISTS)
    rule = next(r for r in snap.rules if r.info.id == "webmail")
    assert rule.host_only
    assert not next(r for r in snap.rules if r.info.id == "staff-news").host_only  # has a group condition
    at_connect = snap.decide(PolicyQuery(Stage.CONNECT, DEVICES[0], host="mail.test", now=NOW))
    assert is_deferred(at_connect)  # the host is not known at CONNECT: no block yet
    assert snap.decide(PolicyQuery(Stage.DNS, DEVICES[0], host="x.mail.test", now=NOW)).rule_id == "webmail"
    assert is_deferred(snap.decide(PolicyQuery(Stage.DNS, DEVICES[0], host="mail.test.evil", now=NOW)))


def test_expiring_host_rule_is_not_taken_by_the_fast_path():
    text = """
version: 1
rules:
  - {id: old, action: block, expires: 2026-01-31, match: {domain: old.test}}
"""
    snap = compile_text(text)
    assert not snap.rules[0].host_only
    before = datetime(2026, 1, 30, tzinfo=UTC)
    after = datetime(2026, 3, 1, tzinfo=UTC)
    assert snap.decide(PolicyQuery(Stage.DNS, DEVICES[0], host="old.test", now=before)).rule_id == "old"
    assert snap.decide(PolicyQuery(Stage.DNS, DEVICES[0], host="old.test", now=after)).rule_id is None


def test_deferred_verdicts_are_reused_and_still_explain():
    snap = compile_text(POLICY, LISTS)
    a = snap.decide(query_for_url("https://plain.test/", DEVICES[0], now=NOW))
    b = snap.decide(query_for_url("https://other.test/", DEVICES[0], now=NOW))
    assert is_deferred(a) and a is b
    assert "apk-type" in a.explain and str(Stage.REQUEST) in a.explain


def test_unhashable_device_context_is_decided_without_the_cache():
    snap = compile_text(POLICY, LISTS)
    odd = DeviceContext("d9", ["staff"], "byod", platform="ios", os_version="16")  # a list: unhashable
    assert snap.decide(query_for_url("https://plain.test/", odd, now=NOW)).rule_id == "byod-old-os"


# -- addons ----------------------------------------------------------------------------

DEVICE = DeviceRecord("phone-1", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.2"),
                      ipaddress.ip_address("fd77:77::2"), owner="sato@example.jp")


class Chain:
    def __init__(self) -> None:
        self.metrics = GatewayMetrics()
        self.connections = LiveConnections()
        directory = DeviceDirectory()
        directory.replace([DEVICE])
        self.identity = DeviceIdentity(directory, self.connections, self.metrics)
        self.decider = PolicyDecider(PolicyHolder(compile_text(POLICY, LISTS), "<test>"), self.connections,
                                     decision_seconds=self.metrics.decision_seconds)
        self.enforcer = Enforcer(self.connections, self.metrics, Helpdesk("情報システム課", "IT desk", "1234"),
                                 [ipaddress.ip_network("10.77.0.0/24")], lambda _cid: None)
        self.client = tflow.tclient_conn()
        self.client.peername = ("10.77.0.2", 40000)
        self.identity.client_connected(self.client)

    def request(self, host: str, path: str = "/", server: str = "192.0.2.80", headers=()):
        flow = tflow.tflow(client_conn=self.client)
        flow.request = tutils.treq(host=host, port=80, scheme=b"http", path=path.encode(), authority=b"")
        flow.request.headers["host"] = host
        for name, value in headers:
            flow.request.headers.add(name, value)
        flow.server_conn.address = (server, 80)
        for addon in (self.identity, self.decider, self.enforcer):
            addon.requestheaders(flow)
        return flow


def test_client_tenant_headers_are_removed_in_any_case_and_others_kept():
    chain = Chain()
    flow = chain.request("plain.test", headers=[("X-GoogApps-Allowed-Domains", "evil.example"),
                                                ("RESTRICT-ACCESS-TO-TENANTS", "evil.onmicrosoft.com"),
                                                ("youtube-restrict", "Off"), ("Accept", "text/html")])
    names = [n.lower() for n in flow.request.headers.keys()]
    assert "x-googapps-allowed-domains" not in names
    assert "restrict-access-to-tenants" not in names
    assert "youtube-restrict" not in names
    assert flow.request.headers["accept"] == "text/html"
    plain = chain.request("plain.test", headers=[("Accept", "text/html"), ("X-Other", "1")])
    assert plain.request.headers["x-other"] == "1"


def test_decisions_and_histogram_count_every_request():
    chain = Chain()
    for i in range(3):
        flow = chain.request("mail.test")
        assert flow.metadata[METADATA_VERDICT].rule_id == "webmail"
        assert flow.response is not None and flow.response.status_code == 403
        count = chain.metrics.registry.get_sample_value(
            "kanmon_decisions_total", {"stage": "http-request", "verdict": "block", "rule": "webmail",
                                       "category": "none", "group": "none"})
        assert count == i + 1
    observed = chain.metrics.registry.get_sample_value("kanmon_decision_duration_seconds_count",
                                                       {"stage": "http-request"})
    assert observed == 3


def test_internal_destination_is_refused_every_time_and_outside_is_not():
    chain = Chain()
    for _ in range(2):
        assert chain.request("plain.test", server="10.77.0.1").metadata[METADATA_VERDICT].rule_id == "kanmon:internal-destination"
        assert chain.request("plain.test", server="192.0.2.80").response is None
    assert chain.enforcer.is_internal(("127.0.0.1", 80)) and chain.enforcer.is_internal(("127.0.0.1", 81))
    assert not chain.enforcer.is_internal(("not-an-address", 80))
    assert chain.enforcer.is_internal((b"10.77.0.9", 80)) is False  # bytes: never parsed as our address


# -- the two RE2 sets (host-keyed URL patterns apart from the others) -------------------

SHARED = """
version: 1
lists:
  abp: {file: abp.txt, format: abp}
rules:
  - {id: keyed, action: block, match: {url: ["files.test/secret/*"]}}
  - {id: free, action: monitor, match: {url: ["*/shared/*", "files.test/secret/*"], method: POST}}
  - {id: exempt, action: block, match: {domain: other.test}, unless: {url: ["other.test/ok/*"]}}
  - {id: listed, action: block, match: {list: abp}}
"""


@pytest.mark.parametrize("many", [0, 20])  # 20: more URL-only rules than are tried lazily
def test_a_pattern_used_by_keyed_and_free_rules_matches_for_both(many):
    text = SHARED + "".join(f"  - {{id: r{i}, action: block, match: {{url_regex: ['/only{i}/']}}}}\n" for i in range(many))
    snap = compile_text(text, {"abp": ("abp.txt", "||ads.test^\n/banner[0-9]+/\n")})
    free_set, keyed_set = snap._url_sets
    assert free_set is not None and keyed_set is not None
    d = DEVICES[0]

    def rule(url: str, method: str = "GET"):
        return snap.decide(query_for_url(url, d, method=method, now=NOW)).rule_id

    assert rule("https://files.test/secret/a") == "keyed"
    assert rule("https://FILES.test/Secret/a?x=1") == "keyed"
    assert rule("https://files.test/public/a") is None
    assert rule("https://x.test/shared/a", "POST") == "free"
    assert rule("https://x.test/shared/a") is None
    assert rule("https://other.test/ok/1") is None  # its unless URL matches
    assert rule("https://other.test/no") == "exempt"
    assert rule("https://x.test/img/banner42/a.png") == "listed"  # the list's /regex/ (free set)
    assert rule("https://ads.test/") == "listed"
    if many:
        assert rule("https://x.test/only17/a") == "r17"
        assert rule("https://files.test/secret/only3/") == "keyed"  # earlier rule wins
