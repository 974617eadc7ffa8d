"""`kanmon report review|incident` end to end: logs written with the real LogStore, the CLI
handler, and the HTML opened in headless Chromium (Debian `chromium`): sections present,
every <img> a data: URI that decodes as a PNG and that the browser actually loaded; the
screenshot is kept in artifacts/reports/. Bad input: bilingual error, exit 2, no file."""

from __future__ import annotations

import argparse
import base64
import io
import os
import re
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from gateway.logstore import LogStore
from gateway.cli.report import register
from tests.unit.test_reports_aggregation import write_month
from tests.availability import unavailable

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "reports"
NOW = datetime(2026, 2, 2, 9, tzinfo=UTC)

REVIEW_SECTIONS = ("summary", "blocked-by-category", "blocked-by-group", "blocked-by-day", "top-blocked-domains",
                   "top-blocking-rules", "auth-failures", "auth-bursts", "unusual-devices", "unknown-devices",
                   "device-actions", "expiring-rules")
INCIDENT_SECTIONS = ("summary", "actions", "destinations", "blocks", "connections", "dns", "mail", "auth")

POLICY = """\
version: 1
settings:
  default_action: allow
  timezone: Asia/Tokyo
rules:
  - id: temp-storage
    owner: 情報政策課
    expires: 2026-02-10
    action: allow
    match: {domain: [files.example.org]}
  - id: old-exception
    owner: ops
    expires: 2026-01-20
    action: allow
    match: {domain: [old.example.org]}
  - id: far-future
    expires: 2027-01-20
    action: block
    match: {domain: [x.example.org]}
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(["report", *argv])
    args.now = lambda: NOW
    return args.func(args)


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("logs")
    write_month(directory)
    return directory


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY, encoding="utf-8")
    return path


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "section" and attributes.get("id"):
            self.sections.append(attributes["id"])
        if tag == "img":
            self.images.append(attributes)


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def decode_png(src: str) -> Image.Image:
    match = re.fullmatch(r"data:image/png;base64,([A-Za-z0-9+/=]+)", src)
    assert match, src[:60]
    data = base64.b64decode(match.group(1), validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ---- headless Chromium ----------------------------------------------------------------------

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    unavailable("chromium not installed (apt-get install chromium chromium-driver)")


def chromium(*args: str) -> subprocess.CompletedProcess:
    binary = _chromium()
    with tempfile.TemporaryDirectory(prefix="kanmon-chromium-") as profile:
        return subprocess.run(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120)


LOAD_PROBE = ('<script>window.addEventListener("load",()=>{for(const i of document.images)'
              '{i.setAttribute("data-loaded",i.complete&&i.naturalWidth>0?"yes":"no")}})</script>')


def check_in_browser(report: Path, sections: tuple[str, ...], screenshot: Path) -> Page:
    """Screenshot the report, then dump the DOM of a copy with a probe that marks each
    image the browser decoded; returns the parsed DOM."""
    done = chromium(f"--screenshot={screenshot}", "--window-size=1200,3000", report.as_uri())
    assert screenshot.is_file(), done.stderr[-2000:]
    shot = Image.open(screenshot)
    assert shot.size == (1200, 3000)
    # not a blank page: many distinct colours (text, bars)
    assert len(shot.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    probed = report.with_name(report.stem + "-probe.html")
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", LOAD_PROBE + "</body>"), encoding="utf-8")
    done = chromium("--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    page = parse(done.stdout)
    for section in sections:
        assert section in page.sections, section
    assert page.images, "the report has charts"
    for image in page.images:
        decode_png(image["src"])
        assert image.get("data-loaded") == "yes", image.get("alt")
    return page


def test_review_report_renders_in_chromium(logs, policy, tmp_path):
    out = tmp_path / "review-2026-01.html"
    assert run(["review", "--month", "2026-01", "--logs", str(logs), "--out", str(out), "--policy", str(policy),
                "--tz", "Asia/Tokyo"]) == 0
    html = out.read_text(encoding="utf-8")
    page = parse(html)
    assert tuple(s for s in page.sections if s in REVIEW_SECTIONS) == REVIEW_SECTIONS
    # bilingual, and the guideline it implements is cited
    assert "月次ログレビュー 2026-01" in html and "Monthly log review 2026-01" in html
    assert "3.8.5" in html
    # self-contained: no external resources
    assert not re.search(r'(src|href)="(?!data:)', html)
    # expiring rules from the policy: the one expiring in 8 days and the expired one, not 2027
    expiring = html.split('id="expiring-rules"')[1].split("</section>")[0]
    assert "temp-storage" in expiring and "old-exception" in expiring and "far-future" not in expiring
    assert "期限切れ" in expiring and "expired" in expiring
    assert "d6" in html.split('id="unusual-devices"')[1].split("</section>")[0]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(out, ARTIFACTS / out.name)
    check_in_browser(out, REVIEW_SECTIONS, ARTIFACTS / "review-2026-01.png")


def test_incident_report_renders_in_chromium(logs, tmp_path, capsys):
    out = tmp_path / "incident-d4.html"
    assert run(["incident", "--device", "d4", "--since", "2026-01-01T00:00:00+09:00", "--logs", str(logs),
                "--out", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert "インシデント速報" in html and "Incident flash report" in html
    actions = html.split('id="actions"')[1].split("</section>")[0]
    assert "隔離" in actions and "quarantined" in actions and "enrollment token guessing" in actions
    auth = html.split('id="auth"')[1].split("</section>")[0]
    # the stable reason in both languages (with its code), then the record's own detail
    assert auth.count('期限切れの証明書</span> / <span lang="en" class="en">expired certificate</span><code class="code">expired</code>') == 7
    assert auth.count("certificate expired at 2026-01-01") == 7
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    check_in_browser(out, INCIDENT_SECTIONS, ARTIFACTS / "incident-d4.png")


def test_report_charts_are_pngs_without_a_browser(logs, tmp_path):
    out = tmp_path / "r.html"
    assert run(["review", "--month", "2026-01", "--logs", str(logs), "--out", str(out)]) == 0
    page = parse(out.read_text(encoding="utf-8"))
    images = [decode_png(i["src"]) for i in page.images]
    assert len(images) >= 5 and all(i.width > 300 and i.height > 100 for i in images)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask      # an ordinary file, not mkstemp's 0600


# ---- bad input -------------------------------------------------------------------------------

def _bad(argv: list[str], capsys, *expect: str) -> str:
    code = run(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert any(re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", line) for line in lines), err   # Japanese
    assert any(line.isascii() for line in lines), err                                     # English
    for text in expect:
        assert text in err
    return err


def test_bad_input_is_a_bilingual_usage_error_and_writes_nothing(logs, tmp_path, capsys):
    out = tmp_path / "out.html"
    for month in ("2026-13", "2026/01", "last-month"):
        _bad(["review", "--month", month, "--logs", str(logs), "--out", str(out)], capsys, "YYYY-MM", month)
    _bad(["review", "--month", "2026-01", "--logs", str(tmp_path / "missing"), "--out", str(out)], capsys,
         "log directory does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(["review", "--month", "2026-01", "--logs", str(empty), "--out", str(out)], capsys, "no log files")
    _bad(["review", "--month", "2025-06", "--logs", str(logs), "--out", str(out)], capsys, "no log records for 2025-06")
    _bad(["review", "--month", "2026-01", "--logs", str(logs), "--out", str(out), "--tz", "Mars/Olympus"], capsys,
         "unknown time zone")
    _bad(["review", "--month", "2026-01", "--logs", str(logs), "--out", str(tmp_path / "no" / "dir.html")], capsys,
         "output directory does not exist")
    _bad(["incident", "--device", "nobody", "--since", "2026-01-01", "--logs", str(logs), "--out", str(out)], capsys,
         "no log records for device nobody")
    _bad(["incident", "--device", "d4", "--since", "yesterday", "--logs", str(logs), "--out", str(out)], capsys,
         "cannot parse --since")
    _bad(["incident", "--device", "d4", "--since", "2026-01-10", "--until", "2026-01-09", "--logs", str(logs),
          "--out", str(out)], capsys, "--since must be before --until")
    _bad(["incident", "--device", "d4", "--since", "2026-01-01", "--limit", "0", "--logs", str(logs),
          "--out", str(out)], capsys, "--limit")
    assert not out.exists()
    assert list(tmp_path.glob(".out.html.*")) == []


def test_bad_policy_reports_file_and_line(logs, tmp_path, capsys):
    bad = tmp_path / "policy.yaml"
    bad.write_text("version: 1\nrules:\n  - id: x\n    action: explode\n    match: {domain: [a.example]}\n",
                   encoding="utf-8")
    out = tmp_path / "out.html"
    err = _bad(["review", "--month", "2026-01", "--logs", str(logs), "--out", str(out), "--policy", str(bad)], capsys,
               "the policy file is invalid")
    assert f"{bad}:4" in err
    assert not out.exists()


def test_an_existing_report_is_replaced_whole(logs, tmp_path):
    out = tmp_path / "r.html"
    out.write_text("old", encoding="utf-8")
    assert run(["review", "--month", "2026-01", "--logs", str(logs), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_a_quiet_month_still_reports_when_only_audit_records_exist(tmp_path):
    # a month with records in one stream only is not "no logs"
    clock = {"now": datetime(2026, 3, 5, tzinfo=UTC)}
    with LogStore(tmp_path / "logs", clock=lambda: clock["now"]) as store:
        store.append("audit", {"user.name": "admin", "event.action": "device-revoked", "event.outcome": "success",
                               "device.id": "d9", "event.reason": "stolen"})
    out = tmp_path / "r.html"
    assert run(["review", "--month", "2026-03", "--logs", str(tmp_path / "logs"), "--out", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    assert "d9" in html.split('id="device-actions"')[1] and "stolen" in html
