"""Errors written outside gateway/cli follow KANMON_LANG too (issue #19): the policy compiler and
its conditions, URL patterns and tenants, the mail policy, the sign-in settings, posture
versions in the config, and the device registry. With KANMON_LANG=ja every error line is in
Japanese (not an English detail after a Japanese heading); with en, in English."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.i18n import Text
from gateway.registry.model import DeviceRecord, RegistryError
from gateway.registry.sqlite import SqliteRegistry

JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")
REPO = Path(__file__).resolve().parents[2]

POLICY = """version: 1
tenants:
  g: {provider: google}
  m: {provider: microsoft}
systems:
  hr: {class: 3}
rules:
  - {id: dup, action: block, match: {dst_cidr: not-a-net}}
  - {id: dup, action: block, match: {list: nosuch}}
  - {id: t, action: tenant-restrict, tenant: nosuch}
  - {id: t2, action: tenant-restrict}
  - {id: t3, action: block, tenant: g}
  - {id: when, action: block, expires: 31/03/2027}
  - {id: sys, action: block, match: {system: missing}}
  - {id: wc, action: block, match: {url: ["http://a.example:xx/", "http://u@a.example/"]}}
  - {id: rx, action: block, match: {url_regex: "a[b"}}
  - {id: dom, action: block, match: {domain: ["ok.example", "bad domain"]}}
  - {id: sz, action: block, match: {response_content_type: "no type", dst_port: "9-1"}}
settings: {timezone: Mars/Olympus}
"""


def error_lines(stderr: str, source: Path) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.strip().startswith(str(source))]


def run(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("lang", ["ja", "en"])
def test_policy_errors_in_the_chosen_language(tmp_path, capsys, monkeypatch, lang):
    monkeypatch.setenv("KANMON_LANG", lang)
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    code, err = run(capsys, "policy", "check", str(policy))
    assert code == 2
    lines = error_lines(err, policy)
    assert len(lines) >= 14, err
    for line in lines:
        detail = line.split(": ", 2)[-1]
        assert bool(JAPANESE.search(detail)) == (lang == "ja"), line
    text = "\n".join(lines)
    if lang == "ja":
        for says in ("知らないタイムゾーンです: 'Mars/Olympus'", "ルール ID 'dup' が重複しています", "リスト 'nosuch' は定義されていません",
                     "テナント 'nosuch' は定義されていません", "tenant-restrict には tenant:", "日付ではありません: '31/03/2027'",
                     "システム 'missing' は定義されていません", "ポート 'xx' が正しくありません", "ユーザー情報",
                     "正規表現が正しくありません", "ドメイン名ではありません: 'bad domain'",
                     "IP ネットワークではありません", "プロバイダ google には必要です", "microsoft のテナントには"):
            assert says in text, (says, text)
    else:
        assert "unknown time zone 'Mars/Olympus'" in text and "not a date: '31/03/2027' (write YYYY-MM-DD)" in text


def test_mail_policy_errors_in_japanese(tmp_path, capsys, monkeypatch):
    from gateway.mail.policy import load_mail_policy
    from gateway.yamlsource import SourceErrors

    import shutil

    shutil.copytree(REPO / "policies", tmp_path, dirs_exist_ok=True)
    shipped = (REPO / "policies" / "mail.yaml").read_text(encoding="utf-8")
    path = tmp_path / "mail.yaml"
    path.write_text(shipped.replace("  quarantine: 100", "  quarantine: 10"), encoding="utf-8")
    monkeypatch.setenv("KANMON_LANG", "ja")
    with pytest.raises(SourceErrors) as exc:
        load_mail_policy(path)
    rendered = [str(e) for e in exc.value.errors]
    assert any("thresholds.quarantine: thresholds.neutralize (" in e and e.endswith("以上にしてください") for e in rendered), rendered
    assert all(JAPANESE.search(e.split(": ", 2)[-1]) for e in rendered), rendered
    # a list file it names is missing: named, in Japanese
    path.write_text(shipped, encoding="utf-8")
    (tmp_path / "mail-themes.txt").unlink()
    with pytest.raises(SourceErrors) as exc:
        load_mail_policy(path)
    (line,) = [str(e) for e in exc.value.errors]
    assert line.endswith(f"themes.lists[0]: {tmp_path / 'mail-themes.txt'} を読めません: ファイルを読めません: ファイルがありません")


def test_signin_and_posture_config_errors_in_japanese(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "ja")
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(f"""state_dir: {tmp_path}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}}
uplink: {{interface: eth0}}
posture: {{min_os: {{ios: "seventeen"}}}}
signin:
  issuer: https://idp.example
  client_id: c
  client_secret: x
  client_secret_file: /nonexistent
  scopes: [profile]
""")
    code, err = run(capsys, "config", "check", str(cfg))
    assert code == 2
    lines = error_lines(err, cfg)
    assert any("posture.min_os.ios: バージョン番号ではありません: 'seventeen'" in line for line in lines), lines
    assert any("signin: client_secret か client_secret_file のどちらか一方を書いてください" in line for line in lines), lines
    assert all(JAPANESE.search(line.split(": ", 2)[-1]) for line in lines), lines


def test_registry_errors_carry_both_languages(tmp_path, monkeypatch):
    import ipaddress

    registry = SqliteRegistry(tmp_path / "registry.sqlite3")
    try:
        ghost = DeviceRecord(device_id="ghost", wg_public_key=None, ipv4=ipaddress.IPv4Address("10.77.0.9"))
        with pytest.raises(RegistryError) as exc:
            registry.update(ghost)
        assert exc.value.text == Text("その端末は登録されていません: 'ghost'", "no such device: 'ghost'")
        assert str(exc.value) == "no such device: 'ghost'"
        registry.add(ghost)
        with pytest.raises(RegistryError) as exc:
            registry.add(DeviceRecord(device_id="ghost", wg_public_key=None, ipv4=ipaddress.IPv4Address("10.77.0.10")))
        assert exc.value.text.ja.startswith("端末 'ghost' は登録済みの端末と重なります")
        with pytest.raises(RegistryError) as exc:
            registry.allocate_addresses(ipaddress.IPv4Network("10.77.0.8/31"), None)
        assert exc.value.text.ja == "トンネルのプレフィックス 10.77.0.8/31 に空きアドレスがありません"
    finally:
        registry.close()
    # A command's message built with .format(e=exc) shows each language's half.
    line = Text("端末を登録できません: {e}", "Cannot add the device: {e}").format(e=exc.value)
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert line.render() == "端末を登録できません: トンネルのプレフィックス 10.77.0.8/31 に空きアドレスがありません"
    assert line.render("en") == "Cannot add the device: tunnel prefix 10.77.0.8/31 has no free address"
    # A plain message (older callers) still reads the same in both.
    assert RegistryError("x").text == Text("x", "x")


def test_start_up_refusals_in_the_chosen_language(tmp_path, monkeypatch):
    """`kanmon run` with a policy or mail policy that does not load: the journal line (cmd_run's
    "Start-up failed: {e}") is Japanese or English throughout, not an English heading."""
    from addons.chain import ChainError, load_extra_addon
    from gateway.config import load_config
    from gateway.runtime.app import GatewayApp
    from gateway.runtime.errors import StartupError

    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - {id: r, action: block, expires: 31/03/2027}\n")
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ntunnel: {{interface: kmwg0, listen_port: 51820, "
                   f"ipv4_prefix: 10.77.0.0/24}}\nuplink: {{interface: eth0}}\npolicy: {{path: {policy}}}\n")
    app = GatewayApp(load_config(cfg))
    app.cfg.state_dir.mkdir()
    with pytest.raises(StartupError) as exc:
        app.load_initial_policy()
    line = Text("起動に失敗しました: {e}", "Start-up failed: {e}").format(e=exc.value)
    assert line.ja == (f"起動に失敗しました: ポリシーをコンパイルできません:\n"
                       f"  {policy}:3: rules[0].expires: 日付ではありません: '31/03/2027'（YYYY-MM-DD で書いてください）")
    assert line.en == (f"Start-up failed: the policy does not compile:\n"
                       f"  {policy}:3: rules[0].expires: not a date: '31/03/2027' (write YYYY-MM-DD)")
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert not re.search(r"[A-Za-z]{5,}", line.render().replace(str(policy), "").replace("YYYY-MM-DD", "")
                         .replace("rules[0].expires", "")), line.render()
    with pytest.raises(ChainError) as chain:
        load_extra_addon("no.such.module:Addon")
    assert chain.value.text.ja.startswith("addons.extra: no.such.module:Addon を読み込めません")
    assert str(chain.value).startswith("addons.extra: cannot load no.such.module:Addon")


def test_tunnel_and_firewall_refusals_carry_both_languages(tmp_path, monkeypatch):
    """A host without nft, or a damaged WireGuard key file, stops `kanmon run` with a line in
    the chosen language (the gateway turns these into StartupError), not a traceback."""
    from gateway.net import steering
    from gateway.net.tunnel import TunnelError, load_or_create_private_key

    monkeypatch.setenv("PATH", str(tmp_path))          # no nft on this PATH
    with pytest.raises(steering.SteeringError) as nft:
        steering.table_exists("kanmon_test")
    assert nft.value.text == Text("nft がありません (apt-get install nftables)", "nft not found (apt-get install nftables)")
    key = tmp_path / "wg-private.key"
    key.write_text("not a key\n")
    with pytest.raises(TunnelError) as bad:
        load_or_create_private_key(key)
    assert bad.value.text.ja.startswith(f"{key}: WireGuard の秘密鍵ではありません")
    assert str(bad.value).startswith(f"{key}: not a WireGuard private key")
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert Text("起動に失敗しました: {e}", "Start-up failed: {e}").format(e=bad.value).render().startswith(
        f"起動に失敗しました: {key}: WireGuard の秘密鍵ではありません")


def test_feed_format_refusal_in_both_languages():
    """`kanmon lists status` shows a refused feed's last error; its detail follows the language."""
    from gateway.feeds import formats
    from gateway.feeds.update import T_FORMAT

    with pytest.raises(formats.FeedFormatError) as exc:
        formats.ut1_files_from_tar(b"this is not a tar.gz", ["adult"])
    line = T_FORMAT.format(e=exc.value)
    assert line.ja.startswith("フィードを読めません: UT1 のアーカイブ (tar.gz) ではありません: ")
    assert line.en.startswith("the feed cannot be read: not a UT1 archive (tar.gz): ")


def test_a_bad_wireguard_key_is_explained_in_each_language():
    """The enrollment API's 400 and export-config's refusal: no English detail on the Japanese side."""
    from gateway.devices.clientconfig import ClientConfigError, wg_quick_config
    from gateway.enroll.decide import RequestProblem, parse_enroll_request

    with pytest.raises(RequestProblem) as bad:
        parse_enroll_request(b'{"wg_public_key": "short"}')
    assert bad.value.text == Text("wg_public_key が不正です: base64 の WireGuard 鍵ではありません: 'short'",
                                  "wg_public_key is invalid: not a base64 WireGuard key: 'short'")
    with pytest.raises(ClientConfigError) as exc:
        wg_quick_config(private_key="A" * 43 + "=", address_v4="10.77.0.2", address_v6=None,
                        gateway_public_key="AAAA", endpoint="vpn.example.test:51820", dns=["10.77.0.1"])
    assert exc.value.text.ja == "ゲートウェイの公開鍵が不正です: base64 の WireGuard 鍵ではありません: 'AAAA'"
