"""Decisions of the compiled policy: precedence, every condition and action, stages."""

from __future__ import annotations

import textwrap
from datetime import datetime, timezone
from ipaddress import ip_address

import pytest

from gateway.policy import ConnectionTable, DeviceContext, PolicyQuery, compile_text, is_deferred, query_for_url
from gateway.policy.snapshot import RULE_NO_SNI
from gateway.verdict import RULE_NO_DECISION, Action, Stage

NOW = datetime(2026, 6, 10, 3, 0, tzinfo=timezone.utc)  # Wed 12:00 in Tokyo
STAFF = DeviceContext("d-staff", frozenset({"staff"}), "org", user="sato", platform="ios", os_version="17.4")
BYOD = DeviceContext("d-byod", frozenset({"byod"}), "byod", user="suzuki", platform="android", os_version="12")


def snap(body: str, lists: dict[str, str] | None = None, **kw):
    text = "version: 1\n" + textwrap.dedent(body)
    return compile_text(text, {k: (f"{k}.txt", v) for k, v in (lists or {}).items()}, filename="p.yaml", compiled_at=NOW, **kw)


def http(s, url, device=STAFF, stage=Stage.REQUEST, method="GET", **extra):
    return s.decide(query_for_url(url, device, stage=stage, method=method, now=NOW, **extra))


def dns(s, host, device=STAFF):
    return s.decide(PolicyQuery(Stage.DNS, device, host=host, now=NOW))


def test_first_match_in_order_wins_and_default_applies():
    s = snap("""
    settings: {default_action: block}
    rules:
      - {id: allow-sub, action: allow, match: {domain: ok.example.com}}
      - {id: block-dom, action: block, match: {domain: example.com}}
      - {id: allow-dom, action: allow, match: {domain: example.com}}
    """)
    assert http(s, "https://ok.example.com/").rule_id == "allow-sub"
    assert http(s, "https://a.ok.example.com/").action is Action.ALLOW
    v = http(s, "https://www.example.com/")
    assert (v.action, v.rule_id) == (Action.BLOCK, "block-dom")
    d = http(s, "https://other.org/")
    assert (d.action, d.rule_id) == (Action.BLOCK, None)
    assert "default" in d.explain


def test_groups_come_before_top_level_rules_and_apply_only_to_their_devices():
    s = snap("""
    rule_groups:
      - name: byod
        applies_to: {device_group: byod}
        rules:
          - {id: byod-block, action: block, match: {domain: news.example}}
    rules:
      - {id: all-allow, action: monitor, match: {domain: news.example}}
    """)
    assert http(s, "https://news.example/", BYOD).rule_id == "byod-block"
    assert http(s, "https://news.example/", STAFF).rule_id == "all-allow"
    assert s.rule("byod-block").group == "byod"


def test_precedence_is_the_same_at_every_stage():
    s = snap("""
    rules:
      - {id: a, action: allow, match: {domain: x.example}}
      - {id: b, action: block, match: {domain: example}}
    """)
    for stage in (Stage.DNS, Stage.TLS, Stage.REQUEST, Stage.RESPONSE):
        q = PolicyQuery(stage, STAFF, host="x.example", url="https://x.example/", scheme="https", method="GET", now=NOW)
        assert s.decide(q).rule_id == "a"
        q2 = q._replace(host="y.example", url="https://y.example/")
        assert s.decide(q2).rule_id == "b"


def test_domain_exact_and_suffix():
    s = snap("""
    rules:
      - {id: exact, action: block, match: {domain_exact: login.example.com}}
      - {id: suffix, action: monitor, match: {domain: example.com}}
    """)
    assert http(s, "https://login.example.com/").rule_id == "exact"
    assert http(s, "https://a.login.example.com/").rule_id == "suffix"
    assert http(s, "https://example.com/").rule_id == "suffix"
    assert http(s, "https://notexample.com/").rule_id is None


def test_url_wildcard_and_regex():
    s = snap("""
    rules:
      - {id: wc, action: block, match: {url: "https://files.example.com/upload/*"}}
      - {id: wc-sub, action: block, match: {url: "*.cdn.example/*.exe"}}
      - {id: re, action: block, match: {url_regex: "/tracking/[0-9]+"}}
    """)
    assert http(s, "https://files.example.com/upload/a.txt").rule_id == "wc"
    assert http(s, "https://files.example.com/UPLOAD/a.txt").rule_id == "wc"  # case-insensitive
    assert http(s, "https://files.example.com/download/a").rule_id is None
    assert http(s, "http://files.example.com/upload/a").rule_id is None  # scheme named
    assert http(s, "https://a.cdn.example/x/setup.exe?v=1").rule_id == "wc-sub"
    assert http(s, "https://cdn.example/setup.exe").rule_id == "wc-sub"
    assert http(s, "https://a.cdn.example/setup.exe.txt").rule_id is None
    assert http(s, "https://any.org/tracking/123").rule_id == "re"
    assert http(s, "https://any.org/tracking/abc").rule_id is None


def test_url_rules_are_undecided_before_http_and_decided_by_host_when_possible():
    s = snap("""
    rules:
      - {id: allow-path, action: allow, match: {url: "mail.example.com/public/*"}}
      - {id: block-host, action: block, match: {domain: mail.example.com}}
    """)
    v = dns(s, "mail.example.com")
    assert is_deferred(v) and v.rule_id == RULE_NO_DECISION and v.action is Action.ALLOW
    assert "allow-path" in v.explain
    assert dns(s, "other.example.com").rule_id is None  # the URL rule is bucketed by host
    assert http(s, "https://mail.example.com/public/x").rule_id == "allow-path"
    assert http(s, "https://mail.example.com/inbox").rule_id == "block-host"


def test_same_action_undecided_rule_does_not_hold_back_a_block():
    s = snap("""
    rules:
      - {id: ext, action: block, match: {file_extension: apk}}
      - {id: dom, action: block, match: {domain: bad.example}}
    """)
    assert dns(s, "bad.example").rule_id == "dom"  # "ext" is undecided at DNS but blocks too
    # Undecided block before the default allow: DNS must pass and leave it to HTTP.
    v = dns(s, "good.example")
    assert is_deferred(v) and v.action is Action.ALLOW
    strict = snap("""
    settings: {default_action: block}
    rules:
      - {id: ext, action: block, match: {file_extension: apk}}
    """)
    d = dns(strict, "good.example")
    assert (d.action, d.rule_id) == (Action.BLOCK, None)  # blocked either way


def test_scheme_method_port_protocol_cidr():
    s = snap("""
    rules:
      - {id: http-post, action: block, match: {scheme: http, method: [POST, PUT]}}
      - {id: smb, action: block, match: {dst_port: [445, "137-139"], protocol: tcp}}
      - {id: net, action: block, match: {dst_cidr: 192.0.2.0/24}}
    """)
    assert http(s, "http://a.example/", method="POST").rule_id == "http-post"
    assert http(s, "https://a.example/", method="POST").rule_id is None
    assert http(s, "http://a.example/", method="GET").rule_id is None
    tls = PolicyQuery(Stage.TLS, STAFF, host="a.example", dst_ip=ip_address("198.51.100.1"), dst_port=138, now=NOW)
    assert s.decide(tls).rule_id == "smb"
    assert is_deferred(s.decide(tls._replace(protocol="udp")))  # http-post cannot be ruled out at TLS
    tcp = tls._replace(stage=Stage.TCP)  # raw TCP: no URL will ever come, URL conditions are false
    assert s.decide(tcp._replace(protocol="udp")).rule_id is None
    assert s.decide(tcp._replace(dst_port=443, dst_ip=ip_address("192.0.2.9"))).rule_id == "net"
    assert is_deferred(dns(s, "a.example"))  # destination not known from a DNS name


def test_content_type_extension_and_body_size():
    s = snap("""
    rules:
      - {id: apk-type, action: block, match: {response_content_type: application/vnd.android.package-archive}}
      - {id: video, action: monitor, match: {response_content_type: "video/*"}}
      - {id: upload-zip, action: block, match: {request_content_type: application/zip}}
      - {id: exe, action: block, match: {file_extension: [exe, .msi]}}
      - {id: big, action: block, match: {body_size_over: 10MiB}}
    """)
    resp = query_for_url("https://a.example/dl", STAFF, stage=Stage.RESPONSE, now=NOW)
    assert s.decide(resp._replace(response_content_type="application/vnd.android.package-archive; charset=x")).rule_id == "apk-type"
    assert s.decide(resp._replace(response_content_type="video/mp4")).rule_id == "video"
    assert s.decide(resp._replace(response_content_type="text/html")).rule_id is None
    req = query_for_url("https://a.example/up", STAFF, method="POST", now=NOW)
    assert s.decide(req).rule_id == RULE_NO_DECISION  # response types not known yet
    # apk-type (block) and video (monitor) are undecided before the response: no decision yet
    assert s.decide(req._replace(request_content_type="application/zip")).rule_id == RULE_NO_DECISION
    assert s.decide(req._replace(stage=Stage.RESPONSE, request_content_type="application/zip")).rule_id == "upload-zip"
    R = Stage.RESPONSE
    assert http(s, "https://a.example/tool.EXE?x=1", stage=R).rule_id == "exe"
    assert http(s, "https://a.example/setup.msi", stage=R).rule_id == "exe"
    assert http(s, "https://a.exe/", stage=R).rule_id is None  # a host name is not a file name
    assert s.decide(req._replace(stage=Stage.RESPONSE, body_size=10 * 1024 * 1024 + 1)).rule_id == "big"
    assert s.decide(req._replace(stage=Stage.RESPONSE, body_size=10 * 1024 * 1024)).rule_id is None


@pytest.mark.parametrize(
    ("utc", "expected"),
    [
        (datetime(2026, 6, 10, 3, 0, tzinfo=timezone.utc), "work"),  # Wed 12:00 JST
        (datetime(2026, 6, 10, 13, 30, tzinfo=timezone.utc), "night"),  # Wed 22:30 JST
        (datetime(2026, 6, 10, 20, 0, tzinfo=timezone.utc), "night"),  # Thu 05:00 JST (window from Wed)
        (datetime(2026, 6, 13, 3, 0, tzinfo=timezone.utc), None),  # Sat 12:00 JST
        (datetime(2026, 6, 12, 22, 0, tzinfo=timezone.utc), None),  # Sat 07:00 JST: Fri night window over
        (datetime(2026, 6, 12, 20, 0, tzinfo=timezone.utc), "night"),  # Sat 05:00 JST: Fri night window
        (datetime(2026, 6, 7, 20, 0, tzinfo=timezone.utc), None),  # Mon 05:00 JST: Sun has no night window
    ],
)
def test_time_windows_in_policy_timezone(utc, expected):
    s = snap("""
    rules:
      - {id: work, action: monitor, match: {time: {days: [weekdays], from: "09:00", to: "18:00"}}}
      - {id: night, action: block, match: {time: [{days: [mon, tue, wed, thu, fri], from: "22:00", to: "06:00"}]}}
    """)
    q = query_for_url("https://a.example/", STAFF, now=utc)
    assert s.decide(q).rule_id == expected


def test_time_zone_setting_changes_the_window():
    body = """
    settings: {timezone: %s}
    rules:
      - {id: work, action: block, match: {time: {from: "09:00", to: "18:00"}}}
    """
    q = query_for_url("https://a.example/", STAFF, now=datetime(2026, 6, 10, 3, 0, tzinfo=timezone.utc))
    assert snap(body % "Asia/Tokyo").decide(q).rule_id == "work"  # 12:00 JST
    assert snap(body % "UTC").decide(q).rule_id is None  # 03:00 UTC


def test_device_conditions_and_posture():
    s = snap("""
    rules:
      - {id: jb, action: block, match: {jailbroken: true}}
      - {id: old, action: block, match: {os_version_below: {android: "13", ios: "16.4"}}}
      - {id: quarantine, action: block, match: {device_status: quarantined}}
      - {id: by-user, action: monitor, match: {user: suzuki, platform: [ios, Android]}}
      - {id: by-id, action: monitor, match: {device_id: d-staff, ownership: org}}
      - {id: line, action: block, match: {device_group: byod}, unless: {underlay_network: 203.0.113.0/24}}
    """)
    from dataclasses import replace as dc_replace
    assert http(s, "https://a/", dc_replace(STAFF, jailbroken=True)).rule_id == "jb"
    assert http(s, "https://a/", BYOD).rule_id == "old"  # android 12 < 13
    assert http(s, "https://a/", dc_replace(STAFF, os_version="16.3.1")).rule_id == "old"
    assert http(s, "https://a/", dc_replace(STAFF, os_version=None)).rule_id == "old"  # unknown counts as below
    assert http(s, "https://a/", dc_replace(STAFF, platform="windows", os_version=None)).rule_id == "by-id"
    assert http(s, "https://a/", dc_replace(STAFF, status="quarantined")).rule_id == "quarantine"
    new_byod = dc_replace(BYOD, os_version="14")
    assert http(s, "https://a/", new_byod).rule_id == "by-user"
    other = dc_replace(new_byod, user="tanaka", underlay_ip=ip_address("192.0.2.5"))
    assert http(s, "https://a/", other).rule_id == "line"
    assert http(s, "https://a/", dc_replace(other, underlay_ip=ip_address("203.0.113.7"))).rule_id is None
    assert s.rule("jb").decided_at is Stage.CONNECT


def test_systems_inventory_class_condition():
    s = snap("""
    systems:
      hr: {class: 3, hosts: [hr.example.lg.jp], cidrs: [10.30.0.0/16]}
      gw: {class: 2, hosts: [gw.example.lg.jp]}
    rules:
      - {id: byod-class3, action: block, match: {ownership: byod, system_class: "> 2"}}
      - {id: gw, action: monitor, match: {system: gw}}
    """)
    assert http(s, "https://hr.example.lg.jp/", BYOD).rule_id == "byod-class3"
    assert http(s, "https://a.hr.example.lg.jp/", BYOD).rule_id == "byod-class3"
    assert http(s, "https://hr.example.lg.jp/", STAFF).rule_id is None
    assert http(s, "https://gw.example.lg.jp/", BYOD).rule_id == "gw"
    by_ip = PolicyQuery(Stage.TLS, BYOD, host=None, dst_ip=ip_address("10.30.1.1"), dst_port=443, now=NOW)
    assert s.decide(by_ip._replace(stage=Stage.TCP)).rule_id == "byod-class3"
    assert s.decide(by_ip._replace(stage=Stage.TCP, dst_ip=ip_address("10.31.0.1"))).rule_id is None
    assert is_deferred(dns(s, "unknown.example", BYOD))  # address unknown at DNS
    assert s.rule("byod-class3").decided_at is Stage.TLS


def test_expired_and_retired_rules_do_not_apply():
    s = snap("""
    rules:
      - {id: retired, status: retired, action: block, match: {domain: a.example}}
      - {id: expired, expires: 2026-06-09, action: block, match: {domain: a.example}}
      - {id: today, expires: 2026-06-10, action: monitor, match: {domain: a.example}}
    """)
    assert http(s, "https://a.example/").rule_id == "today"  # expires at the end of its day (JST)
    later = query_for_url("https://a.example/", STAFF, now=datetime(2026, 6, 10, 15, 0, tzinfo=timezone.utc))
    assert s.decide(later).rule_id is None  # 2026-06-11 00:00 JST
    assert s.rule("retired") is None and [r.id for r in s.retired] == ["retired"]
    assert [r.id for r in s.expiring(NOW, 0)] == ["expired"]
    assert {r.id for r in s.expiring(NOW, 1)} == {"expired", "today"}


def test_actions_no_inspect_monitor_and_tenant_headers():
    s = snap("""
    tenants:
      g: {provider: google, allowed_domains: [example.lg.jp, example.jp]}
      ms1: {provider: microsoft, tenants: [contoso.onmicrosoft.com, fabrikam.com], context: 11111111-2222}
      ms2: {provider: microsoft, tenant_policy: "tid:pid"}
      msa: {provider: microsoft, restrict_msa: true}
      slack: {provider: slack, workspaces: [T111, T222], requester: T111}
      dbx: {provider: dropbox, team_ids: ["dbtid:AAA", "dbtid:BBB"]}
      yt: {provider: youtube, mode: moderate}
    rules:
      - {id: bank, action: no-inspect, match: {domain: bank.example}}
      - {id: watch, action: monitor, category: news, match: {domain: news.example}}
      - {id: g, action: tenant-restrict, tenant: g, match: {domain_exact: accounts.google.com}}
      - {id: ms1, action: tenant-restrict, tenant: ms1, match: {domain_exact: login.microsoftonline.com}}
      - {id: ms2, action: tenant-restrict, tenant: ms2, match: {domain_exact: login.microsoft.com}}
      - {id: msa, action: tenant-restrict, tenant: msa, match: {domain_exact: login.live.com}}
      - {id: slack, action: tenant-restrict, tenant: slack, match: {domain: slack.com}}
      - {id: dbx, action: tenant-restrict, tenant: dbx, match: {domain: dropbox.com}}
      - {id: yt, action: tenant-restrict, tenant: yt, match: {domain: youtube.com}}
    """)
    assert http(s, "https://bank.example/").action is Action.NO_INSPECT
    tls = s.decide(PolicyQuery(Stage.TLS, STAFF, host="bank.example", now=NOW))
    assert tls.action is Action.NO_INSPECT and tls.rule_id == "bank"
    w = http(s, "https://news.example/")
    assert (w.action, w.category, w.passes) == (Action.MONITOR, "news", True)
    expect = {
        "accounts.google.com": {"X-GoogApps-Allowed-Domains": "example.lg.jp,example.jp"},
        "login.microsoftonline.com": {"Restrict-Access-To-Tenants": "contoso.onmicrosoft.com,fabrikam.com",
                                      "Restrict-Access-Context": "11111111-2222"},
        "login.microsoft.com": {"sec-Restrict-Tenant-Access-Policy": "tid:pid"},
        "login.live.com": {"sec-Restrict-Tenant-Access-Policy": "restrict-msa"},
        "app.slack.com": {"X-Slack-Allowed-Workspaces": "T111,T222", "X-Slack-Allowed-Workspaces-Requester": "T111"},
        "www.dropbox.com": {"X-Dropbox-allowed-Team-Ids": "dbtid:AAA,dbtid:BBB"},
        "www.youtube.com": {"YouTube-Restrict": "Moderate"},
    }
    for host, headers in expect.items():
        v = http(s, f"https://{host}/")
        assert v.action is Action.TENANT_RESTRICT
        assert dict(v.headers) == headers


def test_no_sni_setting():
    q = PolicyQuery(Stage.TLS, STAFF, host=None, dst_ip=ip_address("192.0.2.1"), dst_port=443, now=NOW)
    v = snap("rules: []\n").decide(q)
    assert (v.action, v.rule_id) == (Action.BLOCK, RULE_NO_SNI)  # default: block
    assert snap("settings: {no_sni: no-inspect}\n").decide(q).action is Action.NO_INSPECT
    by_rules = snap("""
    settings: {no_sni: rules}
    rules:
      - {id: net, action: monitor, match: {dst_cidr: 192.0.2.0/24}}
    """)
    assert by_rules.decide(q).rule_id == "net"


def test_lists_match_all_formats_and_regex_entries():
    s = snap(
        """
    lists:
      plain: {file: plain.txt}
      hosts: {file: hosts.txt}
      abp: {file: abp.txt}
    rules:
      - {id: plain, action: block, match: {list: plain}}
      - {id: hosts, action: block, match: {list: hosts}}
      - {id: abp, action: block, match: {list: [abp]}}
    """,
        {
            "plain": "# c\nmail.example.com  # webmail\n例え.jp\n",
            "hosts": "0.0.0.0 tracker.example localhost\n127.0.0.1 a.example b.example\n",
            "abp": "[Adblock Plus 2.0]\n! comment\n||store.example^\n/\\/upload\\/[0-9]+/\n",
        },
    )
    assert http(s, "https://x.mail.example.com/").rule_id == "plain"
    assert http(s, "https://xn--r8jz45g.jp/").rule_id == "plain"
    assert http(s, "https://tracker.example/").rule_id == "hosts"
    assert http(s, "https://sub.tracker.example/").rule_id is None  # hosts entries are exact names
    assert http(s, "https://b.example/").rule_id == "hosts"
    assert http(s, "https://a.store.example/").rule_id == "abp"
    assert http(s, "https://elsewhere.example/upload/12").rule_id == "abp"
    assert dns(s, "store.example").rule_id == "abp"
    assert s.lists == {"plain": 2, "hosts": 3, "abp": 2}


def test_connection_table_caches_path_independent_verdicts():
    s = snap("""
    rules:
      - {id: path, action: block, match: {url: "files.example/upload/*"}}
      - {id: dom, action: block, match: {domain: bad.example}}
      - {id: night, action: block, match: {domain: late.example, time: {from: "22:00", to: "06:00"}}}
    """)
    table = ConnectionTable.for_snapshot(s, max_entries=2)
    assert table.version == s.version
    v = table.lookup(STAFF, "bad.example", Stage.TLS, NOW)
    assert v is not None and v.rule_id == "dom"
    again = table.lookup(STAFF, "bad.example", Stage.REQUEST, NOW)
    assert again.rule_id == "dom" and again.stage is Stage.REQUEST and table.hits == 1
    assert table.lookup(STAFF, "files.example", Stage.TLS, NOW) is None  # the path matters
    assert s.host_verdict(STAFF, "late.example", Stage.TLS, NOW) is None  # the clock matters
    assert table.lookup(STAFF, "ok.example", Stage.TLS, NOW).rule_id is None
    assert len(table) == 2  # bounded
    table.lookup(BYOD, "bad.example", Stage.TLS, NOW)
    assert table.invalidate(BYOD.device_id) == 1
    assert table.invalidate(BYOD.device_id) == 0


def test_version_is_a_content_hash():
    a = snap("rules: []\n")
    b = snap("rules: []\n")
    c = snap("rules: [{id: x, action: block}]\n")
    assert a.version == b.version != c.version
    la = snap("lists: {l: {file: l.txt}}\n", {"l": "a.example\n"})
    lb = snap("lists: {l: {file: l.txt}}\n", {"l": "b.example\n"})
    assert la.version != lb.version


def test_host_normalization_in_queries():
    s = snap("rules: [{id: d, action: block, match: {domain: Example.COM.}}]\n")
    assert http(s, "https://WWW.EXAMPLE.com./x").rule_id == "d"
    assert http(s, "https://user@www.example.com:8443/x").rule_id == "d"
