"""Issue #19 "Must show": every staff page kind in headless Chromium (Debian's, driven by
Playwright as in gateway/lab/browser.py), on a phone (390 px) and a desktop, with DOM
assertions and screenshots kept in artifacts/e2e/staff-pages/.

The pages are the responses the real addons produce (mitmproxy test flows through device
identity, the policy decider on a compiled policy, the quarantine gate, the sign-in gate, the
fail-closed guard and the enforcer); Chromium receives each response, status and headers
included, for the URL that was requested (Playwright's request routing answers it, so no
network is needed). tests/e2e/test_policy_e2e.py shows the page through the lab's tunnel too.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote

import pytest
from mitmproxy.test import tflow, tutils
from wireguard_tools import WireguardKey

from addons.enforce import Enforcer
from addons.failclosed import FailClosedActions, Guarded
from addons.flowverdict import record_verdict
from addons.identity import DeviceDirectory, DeviceIdentity
from addons.policy import PolicyDecider, PolicyHolder
from addons.quarantine import QuarantineGate
from gateway.proxy.connections import LiveConnections
from gateway.metrics import GatewayMetrics
from gateway.proxy.flowstate import METADATA_SIGNATURE
from gateway.pages.organization import Helpdesk, Organization
from gateway.policy import compile_text
from gateway.registry.model import DeviceRecord, DeviceStatus
from gateway.verdict import RULE_INFECTED, Action, Stage, Verdict
from tests.availability import unavailable

pytestmark = pytest.mark.e2e

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "e2e" / "staff-pages"
CHROMIUM = "/usr/bin/chromium"
VIEWPORTS = {"phone": {"width": 390, "height": 844}, "desktop": {"width": 1280, "height": 900}}
PORTAL = "signin.kanmon.internal"

# A 24x24 PNG, inline (a data: URL loads nothing from the network).
LOGO = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABgAAAAYCAIAAABvFaqvAAAAIklEQVR4nGOUit/CQA3ARBVTRg0a"
        "NWjUoFGDRg0aNYgiAAC0lAFd3yzyHgAAAABJRU5ErkJggg==")
ORG = Organization(
    name_ja="例市役所", name_en="Example City Office", logo_url=LOGO,
    helpdesk=Helpdesk("情報政策課 ヘルプデスク", "IT helpdesk", contact="内線 1234",
                      mail="helpdesk@example.lg.jp", phone="03-1234-5678"))
POLICY = """
version: 1
settings: {default_action: allow}
rules:
  - id: webmail
    description: Free web mail is not used for work. Use the city's own mail.
    description_ja: 業務ではフリーメールを使いません。市のメールを使ってください。
    alternative: https://mail.example.lg.jp/
    category: webmail
    reason: NISC smartphone guide 5.2(2)
    action: block
    match: {domain: [freemail.example]}
"""
# A long path of long words: it must wrap inside the URL, and nowhere else.
LONG_URL = ("https://inbox.freemail.example/mail/u/0/compose/" + "Internationalization-Configuration-" * 8
            + "?attachment=" + "a" * 180)
DEVICE = DeviceRecord("alice-phone", str(WireguardKey.generate().public_key()), ipaddress.ip_address("10.77.0.2"),
                      ipaddress.ip_address("fd77:77::2"), owner="alice@example.lg.jp")
QUARANTINED = replace(DEVICE, device_id="bob-phone", wg_public_key=str(WireguardKey.generate().public_key()),
                      ipv4=ipaddress.ip_address("10.77.0.3"), ipv6=ipaddress.ip_address("fd77:77::3"),
                      status=DeviceStatus.QUARANTINED)


@dataclass
class Served:
    kind: str
    url: str
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def request_id(self) -> str | None:
        return self.headers.get("X-Kanmon-Request-Id")


class Exploding:
    name = "exploding"

    def requestheaders(self, flow):
        raise RuntimeError("boom")


class Gateway:
    """The addon chain the gateway builds (gateway/app.py), without the proxy around it."""

    def __init__(self):
        self.metrics = GatewayMetrics()
        self.connections = LiveConnections()
        directory = DeviceDirectory()
        directory.replace([DEVICE, QUARANTINED])
        self.identity = DeviceIdentity(directory, self.connections, self.metrics)
        self.holder = PolicyHolder(compile_text(POLICY), "<test>")
        self.decider = PolicyDecider(self.holder, self.connections)
        self.quarantine = QuarantineGate(self.connections, ("mdm.example.lg.jp",))
        self.enforcer = Enforcer(self.connections, self.metrics, ORG.helpdesk, [ipaddress.ip_network("10.77.0.0/24")],
                                 lambda _cid: None, organization=ORG, policy_view=lambda: self.holder.current.snapshot,
                                 signin_portal=PORTAL)
        self.actions = FailClosedActions(self.connections, self.metrics, self.enforcer.block_http,
                                         lambda _cid: None, lambda _reason: None)

    def flow(self, url: str, ip: str = "10.77.0.2"):
        client = tflow.tclient_conn()
        client.peername = (ip, 40000)
        self.identity.client_connected(client)
        flow = tflow.tflow(client_conn=client)
        scheme, rest = url.split("://", 1)
        host, _, path = rest.partition("/")
        flow.request = tutils.treq(host=host, port=443 if scheme == "https" else 80, scheme=scheme.encode(),
                                   path=("/" + path).encode(), authority=b"")
        flow.request.headers["host"] = host
        flow.server_conn.address = ("198.51.100.80", flow.request.port)
        return flow

    def request(self, flow, *addons) -> None:
        for addon in (self.identity, self.decider, *addons, self.quarantine, self.enforcer):
            addon.requestheaders(flow)


def _served(kind: str, url: str, flow) -> Served:
    assert flow.response is not None, kind
    return Served(kind, url, flow.response.status_code, dict(flow.response.headers), flow.response.content)


@pytest.fixture(scope="module")
def served() -> dict[str, Served]:
    gw = Gateway()
    out = {}

    flow = gw.flow(LONG_URL)
    gw.request(flow)
    out["policy"] = _served("policy", LONG_URL, flow)

    url = "https://news.example.jp/today"
    flow = gw.flow(url, ip="10.77.0.3")
    gw.request(flow)
    out["quarantine"] = _served("quarantine", url, flow)

    url = "https://groupware.example.lg.jp/schedule"
    flow = gw.flow(url)
    gw.request(flow, Guarded(Exploding(), gw.actions))
    out["fault"] = _served("fault", url, flow)

    # The virus scan blocks at the response, naming the signature (gateway/pages/kinds.py).
    url = "https://files.example.jp/invoice.zip"
    flow = gw.flow(url)
    gw.request(flow)
    flow.response = tutils.tresp(status_code=200, content=b"PK\x03\x04 infected")
    flow.metadata[METADATA_SIGNATURE] = "Win.Test.EICAR_HDB-1"
    record_verdict(flow, Verdict(Action.BLOCK, RULE_INFECTED, "clamd: Win.Test.EICAR_HDB-1 FOUND", Stage.RESPONSE),
                   gw.connections)
    gw.enforcer.responseheaders(flow)
    out["infected"] = _served("infected", url, flow)

    # Sign-in: the sign-in gate of the unit tests (stub identity provider), with this
    # organization; an app's API call gets the sign-in-required page from the enforcer, a
    # browser the portal page from the gate.
    from tests.unit.test_signin_addon import Chain as SignInChain

    chain = SignInChain(Path(tempfile.mkdtemp(prefix="kanmon-pages-")))
    chain.gate.branding["organization"] = ORG
    chain.enforcer = Enforcer(chain.connections, chain.metrics, ORG.helpdesk, [ipaddress.ip_network("10.77.0.0/24")],
                              lambda _cid: None, organization=ORG, signin_portal=chain.gate.portal)
    url = "https://api.example.jp/v1/items"
    flow = chain.request(url, accept="application/json", method="POST")
    out["signin-required"] = _served("signin-required", url, flow)
    url = f"https://{chain.gate.portal}/"
    flow = chain.request(url)
    out["portal"] = _served("portal", url, flow)
    out["_idp_host"] = chain.gate.settings.issuer_host  # type: ignore[assignment]
    return out


@pytest.fixture(scope="module")
def browser(served):   # the flows first: Playwright's sync API holds an event loop in this thread
    if not os.path.exists(CHROMIUM) and shutil.which("chromium") is None:
        unavailable("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install -e .[test])")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"),
                               headless=True, args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                                                    "--disable-background-networking"])
        yield b
        b.close()


def show(browser, page_served: Served, viewport: str):
    """Open the served response in Chromium at the requested URL; everything else the page
    might load is refused (a self-contained page loads nothing)."""
    context = browser.new_context(viewport=VIEWPORTS[viewport], locale="ja-JP", is_mobile=viewport == "phone",
                                  has_touch=viewport == "phone", device_scale_factor=2 if viewport == "phone" else 1)
    page = context.new_page()
    others: list[str] = []

    def route(r):
        if r.request.url == page_served.url or unquote(r.request.url) == unquote(page_served.url):
            r.fulfill(status=page_served.status, headers=page_served.headers, body=page_served.body)
        else:
            others.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    response = page.goto(page_served.url, wait_until="load")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{page_served.kind}-{viewport}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return context, page, response, others


OVERFLOW = "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
BREAK_ALL = """() => [...document.querySelectorAll('body *')].filter(e => getComputedStyle(e).wordBreak === 'break-all')
                  .map(e => e.tagName + '#' + e.id)"""


def common_checks(page, served_page: Served, viewport: str, others: list[str]) -> None:
    scroll, client = page.evaluate(OVERFLOW)
    assert scroll <= client, f"{served_page.kind} on {viewport}: horizontal overflow {scroll} > {client}"
    assert page.evaluate(BREAK_ALL) == [], "word-break: break-all splits words"
    assert others == [], f"the page loaded something else: {others}"
    assert page.locator("html").get_attribute("lang") == "ja"
    assert page.locator("section[lang=ja]").count() == 1 and page.locator("section[lang=en]").count() == 1
    assert page.locator("#org-name-ja").inner_text() == "例市役所"
    assert page.locator("#org-name-en").inner_text() == "Example City Office"
    assert page.locator("#logo").evaluate("img => img.complete && img.naturalWidth") == 24, "the logo is shown"
    csp = served_page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp, "no script may run on a page served as another site"
    if served_page.request_id:
        mailto = unquote(page.locator("#helpdesk-mail").get_attribute("href"))
        assert mailto.startswith("mailto:helpdesk@example.lg.jp?subject=")
        assert served_page.request_id in mailto.split("&body=")[0], "the request id is in the mail's subject"
        assert served_page.request_id in mailto.split("&body=")[1]
        assert page.locator("#request-id").inner_text() == served_page.request_id
        assert page.locator("#helpdesk-phone").get_attribute("href") == "tel:03-1234-5678"


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_policy_block_page_shows_the_rules_staff_message_and_the_alternative(browser, served, viewport):
    s = served["policy"]
    assert s.status == 403 and s.headers["X-Kanmon-Rule"] == "webmail"
    context, page, response, others = show(browser, s, viewport)
    try:
        assert response.status == 403
        common_checks(page, s, viewport, others)
        assert page.locator("#staff-message-ja").inner_text() == "業務ではフリーメールを使いません。市のメールを使ってください。"
        assert page.locator("#staff-message-en").inner_text() == "Free web mail is not used for work. Use the city's own mail."
        for lang in ("ja", "en"):
            alt = page.locator(f"#alternative-{lang}")
            assert alt.is_visible() and alt.get_attribute("href") == "https://mail.example.lg.jp/"
        assert "このアクセスは組織のセキュリティポリシーによりブロックされました" in page.locator("h1").inner_text()
        assert "blocked by your organization's security policy" in page.locator("section[lang=en] h2").inner_text()
        url = page.locator("#url")
        assert url.inner_text() == LONG_URL
        assert url.evaluate("e => getComputedStyle(e).overflowWrap") == "anywhere"
        # Only the URL may break anywhere: staff text wraps between words.
        assert page.locator("#staff-message-en").evaluate("e => getComputedStyle(e).overflowWrap") != "anywhere"
        box = url.bounding_box()
        assert box["x"] + box["width"] <= VIEWPORTS[viewport]["width"]
    finally:
        context.close()


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_gateway_fault_is_503_temporarily_unavailable_not_a_policy_block(browser, served, viewport):
    s = served["fault"]
    context, page, response, others = show(browser, s, viewport)
    try:
        assert response.status == 503 and response.headers["retry-after"] == "30"
        assert response.headers["x-kanmon-rule"] == "kanmon:fail-closed"
        common_checks(page, s, viewport, others)
        text = page.locator("main").inner_text()
        assert "一時的に利用できません" in text and "Temporarily unavailable" in text and "try again" in text
        assert "ポリシーによるブロックではありません" in text and "not blocked by your organization's policy" in text
        assert "blocked by your organization's security policy" not in text
        assert page.locator(".staff-message").count() == 0
    finally:
        context.close()


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_quarantine_page_says_what_to_do(browser, served, viewport):
    s = served["quarantine"]
    context, page, response, others = show(browser, s, viewport)
    try:
        assert response.status == 403 and response.headers["x-kanmon-rule"] == "kanmon:quarantine"
        common_checks(page, s, viewport, others)
        text = page.locator("main").inner_text()
        assert "この端末は隔離されています" in text and "This device is quarantined" in text
        assert "更新・端末管理（MDM）・ヘルプデスクには接続できます" in text and "helpdesk still work" in text
        assert page.locator("#device").inner_text() == "bob-phone"
    finally:
        context.close()


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_infected_download_page_names_the_signature(browser, served, viewport):
    s = served["infected"]
    context, page, response, others = show(browser, s, viewport)
    try:
        assert response.status == 403 and response.headers["x-kanmon-page"] == "infected"
        common_checks(page, s, viewport, others)
        assert page.locator("#signature").inner_text() == "Win.Test.EICAR_HDB-1"
        assert "Win.Test.EICAR_HDB-1 が見つかりました" in page.locator("section[lang=ja]").inner_text()
        assert "found Win.Test.EICAR_HDB-1 in the file" in page.locator("section[lang=en]").inner_text()
        assert b"PK\x03\x04" not in s.body, "nothing of the infected file reaches the device"
    finally:
        context.close()


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_signin_required_page_links_to_the_portal(browser, served, viewport):
    s = served["signin-required"]
    context, page, response, others = show(browser, s, viewport)
    try:
        assert response.status == 403 and response.headers["x-kanmon-rule"] == "kanmon:signin-required"
        common_checks(page, s, viewport, others)
        link = page.locator("#signin-link").get_attribute("href")
        assert link.startswith(f"https://{PORTAL}/start?next=") and unquote(link.split("next=")[1]) == s.url
        assert "サインインが必要です" in page.locator("h1").inner_text()
    finally:
        context.close()


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_signin_portal_names_the_organization_and_the_identity_provider(browser, served, viewport):
    s = served["portal"]
    idp = served["_idp_host"]
    context, page, response, others = show(browser, s, viewport)
    try:
        assert response.status == 200
        common_checks(page, s, viewport, others)
        assert page.locator("#idp-host").inner_text() == idp
        ja, en = page.locator("section[lang=ja]").inner_text(), page.locator("section[lang=en]").inner_text()
        assert f"アドレスバーに {idp} と表示されているときだけ" in ja and "例市役所のアカウント" in ja
        assert f"only when the address bar shows {idp}" in en and "Example City Office account" in en
        assert page.locator("#signin-link").get_attribute("href").startswith(f"https://{PORTAL}/start")
    finally:
        context.close()
