"""docs/CONSOLE.md's set-up as a new operator follows it (issue #21): the documented `console:`
example (its IdP under `console.oidc:`, no device sign-in) passes `kanmon config check` inside the shipped example configuration,
and what goes wrong on a first start is said in Japanese and English with what to do
(the address is not this host's, the port is taken, no organization CA, an unreadable client
secret), by `kanmon console serve` itself and not by the web server's English-only exit.
Also: a staff member whose phone is locked, or whose sign-in is refused, sees whom to call."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from gateway.cli import main
from tests.availability import unavailable
from tests.unit.console_fixtures import client_of, console_config, registry_with_devices, signed_in

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "CONSOLE.md"
EXAMPLE = ROOT / "systemd" / "kanmon.yaml.example"


def doc_config_example() -> str:
    """The first YAML block of docs/CONSOLE.md: the `console:` (with its `oidc:` IdP) an operator adds."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks and "console:" in blocks[0] and "  oidc:" in blocks[0]
    return blocks[0]


def host_config(tmp_path: Path, listen: str | None = None, secret: bool = True) -> Path:
    """/etc/kanmon/kanmon.yaml as the doc has it: the shipped example plus the doc's block; the
    host paths (/etc/kanmon, /var/lib/kanmon, /opt/kanmon) moved under tmp_path."""
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    if secret:
        (etc / "oidc-client-secret").write_text("s3cret\n")
    text = (EXAMPLE.read_text(encoding="utf-8") + "\n" + doc_config_example())
    text = text.replace("/var/lib/kanmon", str(tmp_path / "state")).replace("/etc/kanmon", str(etc)) \
               .replace("/opt/kanmon", str(ROOT))
    if listen is not None:
        text = text.replace("listen: 10.0.0.1:9443", f"listen: {listen}")
    path = etc / "kanmon.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def both_languages(monkeypatch):
    monkeypatch.delenv("KANMON_LANG", raising=False)   # both languages, as on a fresh host


def test_the_documented_console_config_passes_config_check(tmp_path, capsys, both_languages):
    path = host_config(tmp_path)
    assert main(["config", "check", str(path)]) == 0, capsys.readouterr()
    from gateway.config import load_config
    cfg = load_config(path)
    assert (cfg.console.host, cfg.console.port) == ("10.0.0.1", 9443)
    assert cfg.console.redirect_uri == "https://console.kanmon.internal:9443/callback"
    assert cfg.console.roles["helpdesk"] == ("it-helpdesk",)
    assert cfg.signin is None and cfg.console.idp.issuer == "https://login.example.lg.jp/realms/staff"


def test_an_unreadable_client_secret_is_named_without_claiming_signin_is_missing(tmp_path, capsys, both_languages):
    """The doc's console.oidc: points at /etc/kanmon/oidc-client-secret; before the operator creates
    it, config check names that file, and does not also say the signin: section is missing."""
    path = host_config(tmp_path, secret=False)
    with pytest.raises(SystemExit) as exit_:
        main(["config", "check", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "oidc-client-secret" in err and "を読めません" in err and "cannot read" in err
    assert "console.oidc.client_secret_file:" in err
    assert "give console.oidc:" not in err and "IdP の設定が必要" not in err


def test_serve_without_an_organization_ca_says_what_to_run(tmp_path, capsys, both_languages):
    path = host_config(tmp_path, listen="127.0.0.1:9443")
    assert main(["console", "serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "組織 CA がありません" in err and "no organization CA" in err and "kanmon ca init" in err


def _with_ca(path: Path, capsys) -> None:
    assert main(["ca", "init", "--org", "○○市", "--config", str(path)]) == 0
    capsys.readouterr()


def test_serve_on_an_address_of_another_host_is_refused_bilingually(tmp_path, capsys, both_languages):
    """The doc's listen address (10.0.0.1) kept as is on a host without it: Werkzeug alone would
    print 'Cannot assign requested address' in English and exit; the console says what to fix."""
    path = host_config(tmp_path, listen="192.0.2.1:9443")   # TEST-NET-1: never this host's
    _with_ca(path, capsys)
    with socket.socket() as probe:   # a host that has this address cannot run the test
        try:
            probe.bind(("192.0.2.1", 0))
            unavailable("192.0.2.1 is an address of this host")
        except OSError:
            pass
    assert main(["console", "serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "192.0.2.1:9443 で待ち受けできません" in err and "cannot listen on 192.0.2.1:9443" in err
    assert "管理用アドレス" in err and "management address" in err and "console.listen" in err


def test_serve_on_a_taken_port_is_refused_bilingually(tmp_path, capsys, both_languages):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = host_config(tmp_path, listen=f"127.0.0.1:{port}")
        _with_ca(path, capsys)
        assert main(["console", "serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"ポート {port} はほかのプログラムが使っています" in err and f"port {port} is used by another program" in err


ORGANIZATION = """\
organization:
  name_ja: 例市役所
  name_en: Example City Office
  helpdesk: {name_ja: 情報システム課, name_en: the IT helpdesk, mail: helpdesk@city.example.jp, phone: 03-1234-5678}
"""


@pytest.fixture
def console_with_helpdesk(tmp_path):
    from gateway.console.app import create_app
    from tests.unit.console_fixtures import FakeApply, FakeIdp

    cfg = console_config(tmp_path, ORGANIZATION)
    app = create_app(cfg, oidc=FakeIdp(), registry=registry_with_devices(cfg), apply_now=FakeApply())
    app.testing = True
    return app


@pytest.mark.parametrize("lang,name", [("ja", "情報システム課"), ("en", "the IT helpdesk")])
def test_my_devices_names_whom_to_call(console_with_helpdesk, lang, name):
    c = client_of(console_with_helpdesk)
    c.environ_base["HTTP_ACCEPT_LANGUAGE"] = lang
    signed_in(c, "alice")
    page = c.get("/me/devices").get_data(as_text=True)
    contact = re.search(r'<p id="helpdesk-contact">(.*?)</p>', page, re.S)
    assert contact, page
    assert name in contact.group(1) and 'href="tel:03-1234-5678"' in contact.group(1)
    assert 'href="mailto:helpdesk@city.example.jp"' in contact.group(1)
    assert ("連絡先" in contact.group(1)) == (lang == "ja")


def test_a_refused_sign_in_names_whom_to_call(console_with_helpdesk):
    c = client_of(console_with_helpdesk)
    page = signed_in(c, "nomfa").get_data(as_text=True)
    assert 'data-reason="mfa-missing"' in page
    assert re.search(r'<p id="helpdesk-contact">[^<]*情報システム課.*?03-1234-5678', page, re.S)


def test_a_change_refused_because_the_console_was_opened_by_address_says_where_to_open_it(console_with_helpdesk):
    """CONSOLE.md: open the console at public_url; under an IP address the Origin differs and a
    change is refused. The 403 page says so, with the address to use, not only 'no permission'."""
    from tests.unit.console_fixtures import ORIGIN, csrf_of

    c = client_of(console_with_helpdesk)
    signed_in(c, "alice")
    token = csrf_of(c)

    def report(base: str):
        return c.post("/me/devices/lost", base_url=base, data={"device_id": "alice-phone", "csrf_token": token},
                      headers={"Origin": base, "Sec-Fetch-Site": "same-origin"})

    r = report("https://10.0.0.1:9443")                     # the operator typed the address
    page = r.get_data(as_text=True)
    assert r.status_code == 403
    assert 'id="wrong-address"' in page and f'href="{ORIGIN}/"' in page and "https://10.0.0.1:9443 で開かれて" in page
    r = report(ORIGIN)          # a 403 at public_url (here: the session cookie is localhost's) has no such hint
    assert r.status_code == 403 and 'id="wrong-address"' not in r.get_data(as_text=True)


@pytest.mark.parametrize("change,needle_ja,needle_en", [
    (("idle_timeout: 10m", "idle_timeout: 15min"), "'15min' は時間として読めません", "'15min' is not a duration: write a number"),
    (("absolute_timeout: 1h", "absolute_timeout: 0"), "0 は時間として読めません", "0 is not a duration"),
    (("public_url: https://console.test:9443", "public_url: http://console.test:9443"),
     "https://名前:ポート の形で", "give the URL browsers open as https://NAME:PORT"),
    (("public_url: https://console.test:9443", "public_url: https://console.test:9443/console"),
     "パスなし", "without a path"),
])
def test_a_mistyped_duration_or_public_url_says_what_to_write(tmp_path, change, needle_ja, needle_en):
    """Not the schema's 'not valid under any of the given schemas' or a raw regular expression."""
    from gateway.config import load_config_text
    from gateway.yamlsource import SourceErrors
    from tests.unit.console_fixtures import console_config_text

    text = console_config_text(tmp_path)
    assert change[0] in text
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text.replace(*change), "k.yaml")
    message = "\n".join(str(e) for e in exc.value.errors)
    assert needle_ja in message and needle_en in message and "k.yaml:" in message
    assert "schemas" not in message and "^https" not in message


def test_the_request_log_has_no_colour_codes_and_no_query_string():
    """A request line in the journal: no ANSI escapes, and not the IdP's one-time code of /callback."""
    import logging

    from gateway.console.serve import RequestLogFilter

    # what Werkzeug's WSGIRequestHandler.log_request hands its logger for a 400 on /callback
    record = logging.LogRecord("werkzeug", logging.INFO, __file__, 1, '127.0.0.1 - - [x] "%s" %s %s', (
        "\x1b[31m\x1b[1mGET /callback?code=one-time-code&state=st1 HTTP/1.1\x1b[0m", "400", "-"), None)
    assert RequestLogFilter().filter(record)
    assert record.getMessage() == '127.0.0.1 - - [x] "GET /callback HTTP/1.1" 400 -'



@pytest.mark.parametrize("address", ["10.77.0.1", "[fd77:77::1]"])
def test_the_gateways_tunnel_address_is_not_a_management_address(tmp_path, address):
    """A newcomer looking for 'the gateway's address' may pick the tunnel's: only devices are there."""
    from gateway.config import load_config_text
    from gateway.yamlsource import SourceErrors
    from tests.unit.console_fixtures import console_config_text

    text = console_config_text(tmp_path)
    assert "ipv4_prefix: 10.77.0.0/24" in text and "ipv6_prefix: fd77:77::/64" in text
    with pytest.raises(SourceErrors) as exc:
        load_config_text(text.replace("listen: 127.0.0.1:9443", f"listen: '{address}:9443'"), "k.yaml")
    message = "\n".join(str(e) for e in exc.value.errors)
    assert "端末のトンネル側のアドレス" in message and "on the devices' tunnel side" in message
    assert load_config_text(text.replace("listen: 127.0.0.1:9443", "listen: 10.78.0.1:9443"), "k.yaml").console


def test_console_help_is_in_both_languages(capsys, both_languages):
    for argv in (["console", "--help"], ["console", "serve", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capsys.readouterr().out.split())     # argparse wraps the lines
        assert "console.listen で HTTPS のコンソールを提供" in out or "設定ファイル(console: セクション" in out
        assert "over HTTPS" in out or "console.oidc:" in out


@pytest.mark.parametrize("lang,added,lost", [("ja", "登録", "紛失の届出(本人)"), ("en", "added", "reported lost (by the owner)")])
def test_a_devices_history_is_in_the_pages_language(console_with_helpdesk, lang, added, lost):
    """The audit actions of a device's history were shown as codes (device-added) to a Japanese operator."""
    from tests.unit.console_fixtures import csrf_of, post

    owner = client_of(console_with_helpdesk)
    signed_in(owner, "alice")
    assert post(owner, "/me/devices/lost", {"device_id": "alice-phone"}, token=csrf_of(owner)).status_code in (200, 303)
    c = client_of(console_with_helpdesk)
    c.environ_base["HTTP_ACCEPT_LANGUAGE"] = lang
    signed_in(c, "helpdesk")
    page = c.get("/devices/alice-phone").get_data(as_text=True)
    rows = dict(re.findall(r'<tr data-action="([^"]+)"><td[^>]*>[^<]*</td><td[^>]*>([^<]*)</td>', page))
    assert rows["device-added"] == added and rows["device-reported-lost"] == lost
