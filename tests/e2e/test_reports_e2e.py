"""Issue #18 reports from the logs a running gateway wrote: the lab of the firewall-log and
tunnel-log test (tests/e2e/test_evidence_e2e.py) produces drops (QUIC, other UDP,
device to device), a first handshake, an upload and a block through the proxy, a roaming
device and a quarantine; `kanmon report review` and `kanmon report incident` render that
state directory, and headless Chromium (Debian's, driven by Playwright as in
gateway/lab/browser.py) checks the pages: sections present, the counts the DOM shows equal
the counts in the log, the sign-off block and the IPA 9.5 form present, Japanese labels
present, no Python dict text. Screenshots and the HTML are kept in artifacts/reports/."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.lab.browser import CHROMIUM, CHROMIUM_ARGS
from gateway.lab.topology import SPARE4, Lab, wait_until
from tests.e2e.conftest import ARTIFACTS
from tests.e2e.test_evidence_e2e import firewall_records, pings, reset_peer, send_udp, wait_for
from tests.availability import unavailable

pytestmark = pytest.mark.e2e

REPORTS = ARTIFACTS / "reports"
UPLOAD_BYTES = 30_000
DICT_TEXT = r"\{'|': |\"weight\"|'name'"


def _browser_or_skip() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append("chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip)")
    if missing:
        unavailable("missing " + ", ".join(missing))


def open_report(path: Path, screenshot: Path, probe: str) -> dict:
    """Load ``path`` in headless Chromium, save a full-page screenshot, and return what the
    JavaScript ``probe`` (an arrow function) returns for the page. Print media is emulated
    for a second screenshot (``-print.png``): the page as the reviewer will print it."""
    from playwright.sync_api import sync_playwright

    home = Path(tempfile.mkdtemp(prefix="kanmon-report-browser-"))
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                         env=dict(os.environ, HOME=str(home)))
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 1600})
                page.goto(path.as_uri(), wait_until="load")
                result = page.evaluate(probe)
                page.screenshot(path=str(screenshot), full_page=True)
                page.emulate_media(media="print")
                result["print_signoff_break"] = page.evaluate(
                    "() => getComputedStyle(document.querySelector('#sign-off, #report-form')).breakBefore")
                page.screenshot(path=str(screenshot.with_name(screenshot.stem + "-print.png")), full_page=True)
                return result
            finally:
                browser.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


# Reads each counts table of the page: {section id: {row key (code or text): [cells...]}}.
PROBE = """() => {
  const tables = {}, lists = {};
  for (const section of document.querySelectorAll('section')) {
    const rows = {};
    lists[section.id] = Array.from(section.querySelectorAll('tbody tr')).map(
      tr => Array.from(tr.querySelectorAll('td')).map(td => td.textContent.trim()));
    for (const tr of section.querySelectorAll('tbody tr')) {
      const first = tr.querySelector('td');
      if (!first) continue;
      const code = first.querySelector('code.code');
      const key = code ? code.textContent.trim() : first.textContent.trim();
      rows[key] = Array.from(tr.querySelectorAll('td')).slice(1).map(td => td.textContent.trim());
    }
    tables[section.id] = rows;
  }
  const sections = Array.from(document.querySelectorAll('section')).map(s => s.id);
  const signoff = Array.from(document.querySelectorAll('#sign-off th, #report-form th')).map(th => th.textContent);
  return {sections, tables, lists, signoff, text: document.body.innerText, lang: document.documentElement.lang,
          ja: document.querySelectorAll('[lang=ja]').length, en: document.querySelectorAll('[lang=en]').length};
}"""


def _number(cell: str) -> int:
    return int(cell.replace(",", ""))


def test_review_and_incident_reports_from_a_running_gateway_in_chromium(make_lab, tmp_path):
    _browser_or_skip()
    lab: Lab = make_lab(n_devices=2, overrides={"logs": {"firewall_interval": 1}})
    a, b = lab.devices
    started = datetime.now(UTC)

    # -- first handshakes, then drops of three kinds
    for device in (a, b):
        wait_until(lambda: pings(device), 20, f"{device.device_id}'s tunnel to answer")
    wait_for(lab, "session start of a", lambda: [r for r in lab.log_records("auth")
                                                 if r.get("kanmon.tunnel.event") == "session-start"
                                                 and r.get("device.id") == a.device_id])
    send_udp(a, SPARE4, 443, count=3)
    send_udp(a, SPARE4, 5000, count=5)
    a.curl(f"http://{b.ipv4}:8000/", timeout=2)
    for reason in ("quic", "not-tcp", "device-to-device"):
        wait_for(lab, f"{reason} record", lambda: firewall_records(lab, **{"kanmon.firewall.reason": reason,
                                                                            "device.id": a.device_id}))

    # -- through the proxy: an upload (bytes sent) and a block
    body = lab.workdir / "upload.bin"
    body.write_bytes(b"x" * UPLOAD_BYTES)
    a.curl("https://files.example.test/upload", "--data-binary", f"@{body}", "-H", "content-type: application/octet-stream")
    a.curl("https://www.blocked.test/", timeout=10)
    wait_for(lab, "proxy records", lambda: [r for r in lab.log_records("proxy") if r.get("url.domain") == "www.blocked.test"])

    # -- roaming: off the approved line (100.64.0.0/28 holds the first address, not the second)
    dev_if = f"{lab.prefix}d{a.index}"
    old, new = f"100.64.0.{10 + a.index}", f"100.64.0.{60 + a.index}"
    a.ns.run("ip", "addr", "del", f"{old}/24", "dev", dev_if)
    a.ns.run("ip", "addr", "add", f"{new}/24", "dev", dev_if)
    reset_peer(lab, a)
    wait_until(lambda: pings(a), 20, "the tunnel to answer from the new address")
    wait_for(lab, "endpoint change of a", lambda: [r for r in lab.log_records("auth")
                                                   if r.get("event.action") == "wireguard-endpoint-changed"
                                                   and r.get("device.id") == a.device_id])

    # -- the response: quarantine
    lab.kanmon("device", "quarantine", a.device_id, "--reason", "suspicious UDP and roaming", "--config",
               str(lab.config_path))
    wait_for(lab, "quarantine audit", lambda: [r for r in lab.log_records("audit")
                                               if r.get("event.action") == "device-quarantined"])
    time_of_last = datetime.now(UTC)
    wait_until(lambda: bool(firewall_records(lab)) and datetime.now(UTC) - time_of_last > timedelta(seconds=2.5),
               10, "the firewall aggregation to flush", interval=0.5)

    # ---- render both reports from the lab's state directory --------------------------------------
    logs = lab.state_dir / "logs"
    month = started.strftime("%Y-%m")
    lines = tmp_path / "approved-lines.yaml"
    lines.write_text("staff: [100.64.0.0/28]\n")
    REPORTS.mkdir(parents=True, exist_ok=True)
    review = REPORTS / "e2e-review.html"
    incident = REPORTS / "e2e-incident.html"
    lab.kanmon("report", "review", "--month", month, "--logs", str(logs), "--out", str(review),
               "--approved-lines", str(lines))
    lab.kanmon("report", "incident", "--device", a.device_id, "--since", (started - timedelta(minutes=5)).isoformat(),
               "--logs", str(logs), "--out", str(incident), "--level", "1", "--reporter", "情報システム課 e2e")

    # what the logs say (this month), to compare with what the pages show
    in_month = lambda r: str(r.get("@timestamp", "")).startswith(month)  # noqa: E731
    packets: Counter = Counter()
    for r in firewall_records(lab):
        if in_month(r):
            packets[r["kanmon.firewall.reason"]] += r["kanmon.firewall.packets"]
    events = Counter(r["kanmon.tunnel.event"] for r in lab.log_records("auth")
                     if r.get("event.dataset") == "kanmon.tunnel" and in_month(r))
    assert packets["quic"] >= 1 and packets["not-tcp"] >= 1 and packets["device-to-device"] >= 1, packets
    assert events["session-start"] >= 2 and events["roamed"] >= 1, events

    # ---- the review in Chromium ------------------------------------------------------------------
    page = open_report(review, REPORTS / "e2e-review.png", PROBE)
    for section in ("summary", "month-over-month", "firewall-drops", "tunnel-sessions", "device-actions", "sign-off"):
        assert section in page["sections"], section
    fw = page["tables"]["firewall-drops"]
    for reason, count in packets.items():
        this, last, _change = fw[reason][:3]           # this month, last month, change
        assert _number(this) == count, (reason, fw[reason], count)
        assert _number(last) == 0                      # the lab's first month
    tunnel = page["tables"]["tunnel-sessions"]
    for event, count in events.items():
        assert _number(tunnel[event][0]) == count, (event, tunnel[event], count)
    # the roaming session from outside the approved line, named with its device and address
    assert any(key == a.device_id and new in cells for key, cells in tunnel.items()), tunnel
    assert _number(page["tables"]["device-actions"]["device-quarantined"][0]) == 1
    for words in ("確認者", "確認日", "所見", "対応"):
        assert any(words in th for th in page["signoff"]), (words, page["signoff"])
    text = page["text"]
    for words in ("月次ログレビュー", "ファイアウォールで遮断した通信", "QUIC（UDP 443", "端末間の通信", "接続元の変更（ローミング）",
                  "先月", "結果の記録：レビュー結果を記録し", "Monthly log review", "device to device"):
        assert words in text, words
    assert not re.search(DICT_TEXT, text)
    assert page["lang"] == "ja" and page["ja"] > 50 and page["en"] > 50
    assert page["print_signoff_break"] == "page"
    assert (REPORTS / "e2e-review.png").stat().st_size > 20_000

    # ---- the incident report in Chromium ---------------------------------------------------------
    page = open_report(incident, REPORTS / "e2e-incident.png", PROBE)
    for section in ("summary", "report-form", "timeline", "actions", "registered-domains", "blocks"):
        assert section in page["sections"], section
    form = " ".join(page["signoff"])
    for words in ("区分", "事故レベル", "想定される原因", "再発防止策", "報告者", "発生日時", "発覚日時"):
        assert words in form, words
    text = page["text"]
    assert "情報システム課 e2e" in text and "レベル 1" in text
    timeline = page["lists"]["timeline"]
    assert any("ローミング" in what and f"{old} → {new}" == detail for _, what, detail in timeline), timeline
    assert any("隔離" in what and "suspicious UDP and roaming" in detail for _, what, detail in timeline), timeline
    assert [when for when, _, _ in timeline] == sorted(when for when, _, _ in timeline)
    assert "隔離" in text and "quarantined" in text
    domains = page["tables"]["registered-domains"]
    assert _number(domains["example.test"][2]) >= UPLOAD_BYTES, domains   # bytes sent, this device
    assert "blocked.test" in domains and _number(domains["blocked.test"][4]) >= 1
    assert not re.search(DICT_TEXT, text)
    assert (REPORTS / "e2e-incident.png").stat().st_size > 20_000
