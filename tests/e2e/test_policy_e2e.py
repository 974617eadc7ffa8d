"""Issue #4 "Must show", end to end through the tunnel with the compiled policy engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gateway.lab.topology import WEB4, Lab
from tests.e2e.conftest import ARTIFACTS, require_lab
from tests.availability import unavailable

pytestmark = pytest.mark.e2e

POLICIES = Path(__file__).resolve().parent / "policies"


def http_code(result) -> str:
    return result.stdout.rsplit("HTTP_CODE=", 1)[-1].strip()


def seen(lab: Lab, marker: str) -> list[dict]:
    return [r for r in lab.nginx_requests() if marker in r["uri"] or marker in r["host"]]


def echoed_headers(result) -> dict:
    assert http_code(result) == "200", (result.stdout, result.stderr)
    body = result.stdout.rsplit("HTTP_CODE=", 1)[0]
    assert body.startswith("{"), (result.stdout, result.stderr)
    return json.loads(body)


def dns_query(lab: Lab, name: str, qtype: str = "A") -> dict:
    code = textwrap.dedent(f"""
        import json
        from dnslib import DNSRecord, RCODE, QTYPE
        reply = DNSRecord.parse(DNSRecord.question({name!r}, {qtype!r}).send("10.77.0.1", 53, timeout=5))
        print(json.dumps({{"rcode": RCODE[reply.header.rcode],
                           "answers": [[QTYPE[r.rtype], str(r.rdata)] for r in reply.rr]}}))
    """)
    return json.loads(lab.devices[0].ns.python(code).stdout)


@pytest.fixture(scope="module")
def plab(tmp_path_factory):
    require_lab()
    work = tmp_path_factory.mktemp("plab")
    policy_dir = work / "policies"
    shutil.copytree(POLICIES, policy_dir)
    lab = Lab(work, n_devices=1, config_overrides={
        "policy": {"path": str(policy_dir / "lab.yaml")},
        "quarantine": {"allow_hosts": ["mdm.test"]},
        # issue #19: the block page names the organization and links its helpdesk
        "organization": {"name_ja": "ラボ市役所", "name_en": "Lab City Office",
                         "helpdesk": {"mail": "helpdesk@example.test", "phone": "03-1234-5678"}},
    })
    lab.policy_dir = policy_dir
    try:
        lab.build()
        lab.start_gateway()
        lab.wait_for_peer(lab.devices[0])
        yield lab
    finally:
        dest = ARTIFACTS / "e2e" / "test_policy_e2e"
        dest.mkdir(parents=True, exist_ok=True)
        if (work / "gateway.log").exists():
            shutil.copy(work / "gateway.log", dest / "gateway.log")
        lab.teardown()


def test_free_webmail_gets_the_block_page(plab: Lab):
    # The name resolves to the sinkhole, the device connects, the proxy shows why.
    assert dns_query(plab, "webmail.test")["answers"] == [["A", "198.18.0.1"]]
    for url in ("http://webmail.test/inbox", "https://www.webmail.test/inbox"):
        result = plab.devices[0].curl(url, "-i")
        assert http_code(result) == "403", result.stderr
        assert "x-kanmon-rule: block-webmail" in result.stdout.lower()
        assert "フリーメールの利用禁止" in result.stdout
    assert seen(plab, "webmail") == []


def test_tenant_headers_reach_the_upstream_and_client_copies_are_replaced(plab: Lab):
    dev = plab.devices[0]
    echoed = echoed_headers(dev.curl("https://accounts.google.com/echo-headers",
                                     "-H", "X-GoogApps-Allowed-Domains: evil.example"))
    assert echoed["x_googapps_allowed_domains"] == "example.lg.jp"
    echoed = echoed_headers(dev.curl("https://login.microsoftonline.com/echo-headers"))
    assert echoed["restrict_access_to_tenants"] == "example.onmicrosoft.com"
    assert echoed["restrict_access_context"] == "11111111-2222-3333-4444-555555555555"
    # Hosts without a tenant rule get no such header.
    echoed = echoed_headers(dev.curl("https://www.example.test/echo-headers",
                                     "-H", "X-GoogApps-Allowed-Domains: evil.example"))
    assert echoed["x_googapps_allowed_domains"] == ""


def test_apk_download_is_blocked(plab: Lab):
    result = plab.devices[0].curl("https://files.example.test/files/app.apk", "-i")
    assert http_code(result) == "403"
    assert "x-kanmon-rule: block-apk" in result.stdout.lower()
    assert seen(plab, "app.apk") == []
    ok = plab.devices[0].curl("https://files.example.test/files/report.pdf")
    assert http_code(ok) == "200"


def test_no_inspect_host_keeps_the_upstream_certificate(plab: Lab):
    dev = plab.devices[0]
    # Trusting only the lab's upstream CA: works only if the gateway did not intercept.
    result = dev.ns.run("curl", "-sS", "-v", "--max-time", "10", "--cacert", str(plab.ca.cert_path),
                        "https://bank.test/account", check=False)
    assert result.returncode == 0, result.stderr
    assert "issuer: CN=Kanmon Lab Test CA" in result.stderr
    # An intercepted host presents the gateway's certificate instead.
    intercepted = dev.ns.run("curl", "-sS", "-v", "--max-time", "10", "--cacert", str(plab.interception_ca),
                             "https://www.example.test/", check=False)
    assert intercepted.returncode == 0 and "mitmproxy" in intercepted.stderr
    conn = [r for r in plab.log_records("conn") + plab.log_records("proxy") if r.get("tls.client.server_name") == "bank.test"]
    assert not [r for r in plab.log_records("proxy") if "bank.test" in (r.get("url.full") or "")], \
        "no-inspect traffic is never decrypted, so no HTTP record can exist"
    del conn


def test_blocked_name_gets_nxdomain_and_doh_is_blocked(plab: Lab):
    assert dns_query(plab, "tracker.test")["rcode"] == "NXDOMAIN"
    assert dns_query(plab, "doh.test")["rcode"] == "NXDOMAIN"
    # Even with the address known (hard-coded resolvers), the TLS name is refused.
    result = plab.devices[0].curl("https://doh.test/dns-query?dns=AAAB", "--resolve", f"doh.test:443:{WEB4}", "-i")
    assert http_code(result) in ("403", "000")
    assert seen(plab, "dns-query") == []
    logged = [r for r in plab.log_records("dns") if r.get("dns.question.name") == "tracker.test"]
    assert logged and logged[-1]["rule.id"] == "block-tracker"


def test_ech_is_stripped_from_https_records(plab: Lab):
    answer = dns_query(plab, "ech.example.test", "HTTPS")
    assert answer["rcode"] == "NOERROR" and answer["answers"], answer
    rdata = answer["answers"][0][1]
    assert "alpn" in rdata and "ech" not in rdata.replace("alpn", "")


def test_reload_under_load_switches_at_one_point_without_failures(plab: Lab):
    dev = plab.devices[0]
    load = textwrap.dedent("""
        import json, threading, time, urllib.request, urllib.error
        results, stop = [], time.time() + 8
        def worker():
            while time.time() < stop:
                start = time.time()
                try:
                    code = urllib.request.urlopen("http://switch.test/s", timeout=10).status
                except urllib.error.HTTPError as e:
                    code = e.code
                except Exception as e:
                    code = repr(e)
                results.append((start, time.time(), code))
        threads = [threading.Thread(target=worker) for _ in range(4)]
        [t.start() for t in threads]; [t.join() for t in threads]
        print(json.dumps(results))
    """)
    proc = subprocess.Popen(dev.ns.cmd(sys.executable, "-c", load), stdout=subprocess.PIPE, text=True)
    time.sleep(3)
    t_apply = time.time()
    applied = plab.kanmon("policy", "apply", str(plab.policy_dir / "lab-switch.yaml"), "--config", str(plab.config_path))
    t_applied = time.time()
    assert "9907f6424edf88a4" in applied.stdout or "Applied" in applied.stdout
    results = json.loads(proc.communicate(timeout=60)[0])
    codes = {code for _, _, code in results}
    assert codes <= {200, 403}, f"failed requests during reload: {codes - {200, 403}}"
    before = [code for start, end, code in results if end < t_apply]
    after = [code for start, end, code in results if start > t_applied]
    assert before and set(before) == {200}
    assert after and set(after) == {403}
    # Put the original policy back for the other tests.
    plab.kanmon("policy", "apply", str(plab.policy_dir / "lab.yaml"), "--config", str(plab.config_path))


def test_broken_policy_is_refused_and_the_old_one_keeps_serving(plab: Lab):
    broken = plab.policy_dir / "broken.yaml"
    broken.write_text((plab.policy_dir / "lab.yaml").read_text().replace("action: block, reason: lab tracker",
                                                                         "action: explode, reason: lab tracker"))
    result = plab.kanmon("policy", "apply", str(broken), "--config", str(plab.config_path), check=False)
    assert result.returncode == 2   # a policy with errors is bad input (issue #19)
    assert f"{broken}:" in result.stderr and "action" in result.stderr
    assert dns_query(plab, "tracker.test")["rcode"] == "NXDOMAIN"
    # A policy corrupted on disk under the running gateway: SIGHUP refuses it, old one serves.
    live = plab.policy_dir / "lab.yaml"
    good = live.read_text()
    try:
        live.write_text(good + "rules: [oops\n")
        plab.gw.run("kill", "-HUP", (plab.state_dir / "kanmon.pid").read_text().strip())
        time.sleep(1.5)
        status = json.loads((plab.state_dir / "policy-status.json").read_text())
        assert status["result"] == "failure" and any(str(live) in e for e in status["errors"])
        assert dns_query(plab, "tracker.test")["rcode"] == "NXDOMAIN"
        assert http_code(plab.devices[0].curl("http://www.example.test/still-served")) == "200"
        # Issue #15: an alias bomb (6 GB before) and an impossible date are refused as quickly,
        # with file:line, counted, and the gateway keeps serving the old policy.
        from tests.unit.test_load_bounds import alias_bomb
        for hostile, line in ((good + alias_bomb(), good.count("\n") + 1),
                              (good.replace("rules:", "rules:\n  - {id: bad-date, action: block, expires: 2025-13-01}", 1), None)):
            live.write_text(hostile)
            plab.gw.run("kill", "-HUP", (plab.state_dir / "kanmon.pid").read_text().strip())
            time.sleep(1.5)
            status = json.loads((plab.state_dir / "policy-status.json").read_text())
            assert status["result"] == "failure", status
            assert any(e.startswith(f"{live}:{line}:" if line else f"{live}:") for e in status["errors"]), status
            assert dns_query(plab, "tracker.test")["rcode"] == "NXDOMAIN"
            assert http_code(plab.devices[0].curl("http://www.example.test/still-served")) == "200"
    finally:
        live.write_text(good)


def test_block_page_in_headless_chromium(plab: Lab):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        import os
        unavailable("chromium is not installed")
    out = ARTIFACTS / "e2e" / "block-page"
    out.mkdir(parents=True, exist_ok=True)
    profile = plab.workdir / "chromium-profile"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--lang=ja"]
    dom = plab.devices[0].ns.run(chromium, *flags, "--dump-dom", "http://webmail.test/inbox", timeout=90).stdout
    assert "このアクセスは組織のセキュリティポリシーによりブロックされました" in dom
    assert "block-webmail" in dom and "This access was blocked" in dom
    # issue #19: the rule's staff message and the approved alternative, through the tunnel
    assert '<p class="staff-message" id="staff-message-ja">業務ではフリーメールを使いません。</p>' in dom
    assert '<p class="staff-message" id="staff-message-en">Free web mail is not used for work.</p>' in dom
    assert 'id="alternative-ja" href="https://mail.example.test/"' in dom
    assert "ラボ市役所" in dom and "Lab City Office" in dom
    request_id = dom.split('id="request-id">', 1)[1].split("<", 1)[0]
    mailto = dom.split('id="helpdesk-mail" href="', 1)[1].split('"', 1)[0]
    assert len(request_id) == 16 and mailto.startswith("mailto:helpdesk@example.test?subject=")
    assert request_id in mailto.split("&amp;body=")[0], "the request id is in the mail's subject"
    # On a phone, through the tunnel: no horizontal overflow, even for a long URL.
    from gateway.lab.browser import run_browser
    long_url = "http://webmail.test/inbox/" + "Internationalization-Configuration-" * 6 + "?q=" + "x" * 150
    result = run_browser(plab.devices[0], [
        {"action": "viewport", "width": 390, "height": 844},
        {"action": "goto", "url": long_url},
        {"action": "text", "selector": "#staff-message-ja"},
        {"action": "overflow"},
        {"action": "screenshot", "path": str(out / "block-page-phone.png")},
    ], timeout=120)
    assert result["ok"], result
    status = [r["status"] for r in result["responses"] if r["url"].startswith("http://webmail.test/inbox/")]
    assert status == [403], result["responses"]
    values = {s["action"]: s.get("value") for s in result["steps"]}
    assert values["text"] == "業務ではフリーメールを使いません。"
    scroll, client = values["overflow"]
    assert client == 390 and scroll <= client, f"horizontal overflow on a phone: {scroll} > {client}"
    shot = out / "block-page.png"
    plab.devices[0].ns.run(chromium, *flags, f"--screenshot={shot}", "--window-size=900,900",
                           "http://webmail.test/inbox", timeout=90)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
