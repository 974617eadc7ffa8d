"""The CLI mistakes of issue #19, one test each, through `kanmon`'s own entry point
(gateway.cli.main): one exit-code convention (0 ok, 1 a finding or refusal, 2 bad input)
shown in every --help, errors in the chosen language, a missing config named as such,
KANMON_CONFIG as the default of --config (and `ca --config`), warnings for the URLs
`policy test` had to guess, `logs search --tz`, the header row of `device list`."""

from __future__ import annotations

import argparse
import gc
import json
from datetime import UTC, datetime, timedelta

import pytest

from gateway import cli
from gateway.logstore import LogStore

BAD_POLICY = "version: 1\nrules:\n  - {id: r, action: explode, match: {domain: a.example}}\n"
GOOD_POLICY = "version: 1\nrules:\n  - {id: webmail, action: block, match: {domain: gmail.com}}\n"


def kanmon(*argv: str) -> int:
    try:
        return cli.main(list(argv))
    except SystemExit as exc:   # argparse (--help, usage errors) and load_config_or_exit
        return exc.code if isinstance(exc.code, int) else 1


@pytest.fixture
def gw(tmp_path, monkeypatch):
    monkeypatch.delenv("KANMON_CONFIG", raising=False)
    monkeypatch.setenv("KANMON_LANG", "both")
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(f"""
state_dir: {state}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
""")
    yield cfg
    gc.collect()   # the commands leave their registry connection to the process exit


def test_the_same_bad_policy_exits_2_from_check_test_and_apply(gw, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    for argv in (("policy", "check", str(bad)),
                 ("policy", "test", "--policy", str(bad), "https://a.example/"),
                 ("policy", "apply", str(bad), "--config", str(gw))):
        assert kanmon(*argv) == 2, argv          # was 1, 2, 1
        err = capsys.readouterr().err
        assert f"{bad}:3: rules[0].action:" in err, argv
        assert "Traceback" not in err
    assert not (gw.parent / "state" / "policy-applied").exists()


def test_a_refusal_by_the_state_exits_1(gw, capsys):
    assert kanmon("device", "add", "--config", str(gw), "--id", "d1", "--owner", "sato") == 0
    assert kanmon("device", "revoke", "--config", str(gw), "d1", "--reason", "lost") == 0
    capsys.readouterr()
    assert kanmon("device", "resume", "--config", str(gw), "d1") == 1   # was 2: the input is fine, the state refuses
    err = capsys.readouterr().err
    assert "A revoked device cannot be reinstated: d1" in err and "失効した端末は復帰できません" in err
    assert kanmon("device", "show", "--config", str(gw), "nope") == 1
    assert kanmon("device", "resume", "--config", str(gw), "d1", "--bogus") == 2   # usage


@pytest.mark.parametrize("group", ["policy", "device", "ca", "logs", "lists", "report", "registry", "config",
                                   "cluster", "user", "mail", "replay"])
def test_every_help_states_the_exit_codes(group, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "both")
    assert kanmon("--help") == 0
    top = capsys.readouterr().out
    assert "exit codes:\n  0  ok, nothing found\n  1  a finding or a refusal" in top
    assert "  2  bad input or usage" in top and "終了コード:\n  0  正常" in top and "KANMON_CONFIG   " in top
    assert kanmon(group, "--help") == 0
    out = capsys.readouterr().out
    assert "exit codes:\n  0  ok, nothing found\n  1  a finding or a refusal" in out and "終了コード:\n  0  正常" in out
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon(group, "--help") == 0
    out = capsys.readouterr().out
    assert "終了コード" in out and "exit codes" not in out


def test_usage_errors_have_a_heading_in_the_chosen_language(capsys, monkeypatch):
    monkeypatch.delenv("KANMON_CONFIG", raising=False)
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("device", "list") == 2
    err = capsys.readouterr().err
    assert "引数が正しくありません: 次の引数が必要です: --config" in err and "bad arguments" not in err
    assert kanmon("device", "revoke", "d1", "--config", "k.yaml", "--reason", "gone") == 2
    err = capsys.readouterr().err
    assert "引数 --reason: 選べない値です: 'gone'（選べるのは 'lost', 'stolen'" in err and "invalid choice" not in err
    assert kanmon("logs", "search", "--dir", ".", "--stream", "proxy", "--limit", "ten") == 2
    assert "引数 --limit: 数値ではありません: 'ten'" in capsys.readouterr().err
    assert kanmon("device", "list", "--config", "k.yaml", "surplus") == 2
    assert "知らない引数です: surplus" in capsys.readouterr().err
    monkeypatch.setenv("KANMON_LANG", "en")
    assert kanmon("device", "list") == 2
    err = capsys.readouterr().err
    assert "bad arguments: the following arguments are required: --config" in err and "引数" not in err


def test_a_missing_config_is_file_not_found_in_the_chosen_language(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "missing.yaml"
    monkeypatch.setenv("KANMON_LANG", "en")
    for argv in (("config", "check", str(missing)), ("device", "list", "--config", str(missing)),
                 ("registry", "check", "--config", str(missing)), ("ca", "show", "--config", str(missing))):
        assert kanmon(*argv) == 2, argv
        err = capsys.readouterr().err
        assert "Cannot read the configuration file" in err, argv            # not "the configuration is invalid"
        assert f"{missing}: cannot read file: file not found" in err, argv
        assert "invalid" not in err and "Errno" not in err and "Traceback" not in err
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("config", "check", str(missing)) == 2
    err = capsys.readouterr().err
    assert "設定ファイルを読めません" in err and f"{missing}: ファイルを読めません: ファイルがありません" in err
    assert "cannot" not in err.lower()


def test_invalid_dates_in_policy_and_config_are_errors_not_tracebacks(gw, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "ja")
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - {id: r, action: block, expires: 2025-13-01, match: {domain: a.example}}\n")
    assert kanmon("policy", "check", str(policy)) == 2
    err = capsys.readouterr().err
    assert f"{policy}:3: rules[0].expires: 日付・時刻として正しくありません" in err and "Traceback" not in err
    gw.write_text(gw.read_text() + "organization: {name: x}\nposture: {min_os: {ios: 2025-13-01}}\n")
    assert kanmon("config", "check", str(gw)) == 2
    err = capsys.readouterr().err
    assert "日付・時刻として正しくありません" in err and "Traceback" not in err


def test_kanmon_config_is_the_default_of_config(gw, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_CONFIG", str(gw))
    monkeypatch.setenv("KANMON_LANG", "en")
    assert kanmon("config", "check") == 0
    assert f"Configuration is valid: {gw}" in capsys.readouterr().out
    assert kanmon("device", "add", "--id", "d1", "--owner", "sato") == 0
    capsys.readouterr()
    assert kanmon("device", "list") == 0
    assert "d1\t10.77.0." in capsys.readouterr().out
    assert kanmon("registry", "check") == 0
    # --config on the command line still wins
    other = gw.parent / "other.yaml"
    assert kanmon("device", "list", "--config", str(other)) == 2
    assert f"{other}: cannot read file: file not found" in capsys.readouterr().err


def test_every_config_option_defaults_to_kanmon_config(monkeypatch, tmp_path):
    """Guard: a group added later with a plain `--config` would not read KANMON_CONFIG."""
    monkeypatch.setenv("KANMON_CONFIG", str(tmp_path / "k.yaml"))
    found = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if "--config" in action.option_strings or action.dest == "config":
                found.append(path)
                assert action.default == str(tmp_path / "k.yaml"), path
                assert not action.required, path
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")

    walk(cli.build_parser([]), "kanmon")
    for expected in ("kanmon run", "kanmon config check", "kanmon device list", "kanmon ca init", "kanmon ca show",
                     "kanmon ca trust", "kanmon ca import-crl", "kanmon policy apply", "kanmon policy test",
                     "kanmon registry check", "kanmon lists status", "kanmon cluster status", "kanmon user sessions"):
        assert expected in found, (expected, found)


def test_ca_takes_config_and_keeps_state_dir(gw, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "en")
    state = gw.parent / "state"
    assert kanmon("ca", "init", "--config", str(gw), "--org", "関門町") == 0
    assert (state / "pki").is_dir()
    capsys.readouterr()
    monkeypatch.setenv("KANMON_CONFIG", str(gw))
    assert kanmon("ca", "show") == 0
    assert "org CA: " in capsys.readouterr().out
    other = tmp_path / "other-state"
    assert kanmon("ca", "show", "--state-dir", str(other)) == 0      # --state-dir wins over KANMON_CONFIG
    assert "no trusted CA" in capsys.readouterr().out
    monkeypatch.delenv("KANMON_CONFIG")
    assert kanmon("ca", "show") == 2
    assert "give --config (or KANMON_CONFIG) or --state-dir" in capsys.readouterr().err
    assert kanmon("ca", "show", "--config", str(gw), "--state-dir", str(other)) == 2   # one or the other


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(GOOD_POLICY)
    return path


def test_policy_test_warns_about_urls_it_cannot_judge(policy, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "en")
    assert kanmon("policy", "test", "--policy", str(policy), "", "https://ok.example/") == 2
    captured = capsys.readouterr()
    assert "warning: an empty URL cannot be judged (skipped)" in captured.err
    assert captured.out.splitlines() == ["allow\t-\thttps://ok.example/\tno rule matched: default action allow"]
    assert kanmon("policy", "test", "--policy", str(policy), "https:///path") == 2
    captured = capsys.readouterr()
    assert "a URL without a host cannot be judged (skipped): https:///path" in captured.err and captured.out == ""


def test_policy_test_warns_about_an_unknown_scheme(policy, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("policy", "test", "--policy", str(policy), "htps://gmail.com/") == 2
    captured = capsys.readouterr()
    assert "警告: 知らないスキーム 'htps' です" in captured.err and "warning" not in captured.err
    assert captured.out.startswith("block\twebmail\thtps://gmail.com/")   # still judged, by the host


def test_policy_test_warns_when_it_assumes_https(policy, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "both")
    assert kanmon("policy", "test", "--policy", str(policy), "gmail.com") == 0   # the documented shorthand
    captured = capsys.readouterr()
    assert "warning: no scheme; judged as https://gmail.com" in captured.err
    assert "スキームがないため https:// として判定しました: gmail.com" in captured.err
    assert captured.out.startswith("block\twebmail\tgmail.com")
    assert kanmon("policy", "test", "--policy", str(policy), "--stage", "dns", "gmail.com") == 0
    assert "warning" not in capsys.readouterr().err   # a bare name is what the DNS stage sees
    assert kanmon("policy", "test", "--policy", str(policy), "https://gmail.com/") == 0
    assert capsys.readouterr().err == ""


@pytest.fixture
def logs(tmp_path):
    moment = {"now": datetime(2026, 6, 1, 8, 0, tzinfo=UTC)}
    store = LogStore(tmp_path / "logs", clock=lambda: moment["now"])
    for day in range(2):
        moment["now"] = datetime(2026, 6, 1 + day, 8, 0, tzinfo=UTC)
        store.append("proxy", {"device.id": f"d{day}", "kanmon.verdict": "block", "url.full": f"https://m.jp/{day}"})
        moment["now"] += timedelta(days=1)
        store.rotate_if_needed()
    store.close()
    return tmp_path / "logs"


def test_logs_search_tz_prints_local_times_and_reads_bounds_in_the_zone(logs, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "en")
    assert kanmon("logs", "search", "--dir", str(logs), "--stream", "proxy", "--tz", "Asia/Tokyo") == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows] == ["2026-06-01T17:00:00.000000+09:00", "2026-06-02T17:00:00.000000+09:00"]
    # 2026-06-02T16:30 in Tokyo is 07:30Z: only the second record (08:00Z) is at or after it
    assert kanmon("logs", "search", "--dir", str(logs), "--stream", "proxy", "--tz", "Asia/Tokyo",
                  "--since", "2026-06-02T16:30") == 0
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == ["d1"]
    # without --tz the same bound is UTC (16:30Z): nothing; an explicit offset is kept as given
    assert kanmon("logs", "search", "--dir", str(logs), "--stream", "proxy", "--since", "2026-06-02T16:30") == 0
    assert capsys.readouterr().out == ""
    assert kanmon("logs", "search", "--dir", str(logs), "--stream", "proxy", "--tz", "Asia/Tokyo",
                  "--since", "2026-06-02T07:30Z") == 0
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == ["d1"]
    # --json stays UTC, machine-readable
    assert kanmon("logs", "search", "--dir", str(logs), "--stream", "proxy", "--tz", "Asia/Tokyo", "--json") == 0
    assert [json.loads(l)["@timestamp"] for l in capsys.readouterr().out.splitlines()][0] == "2026-06-01T08:00:00.000000Z"


@pytest.mark.parametrize("zone", ["Asia/Tokio", "Asia", "../../etc/passwd", "/etc/localtime"])
def test_logs_search_refuses_an_unknown_zone(logs, zone, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("logs", "search", "--dir", str(logs), "--stream", "proxy", "--tz", zone) == 2
    err = capsys.readouterr().err
    assert f"--tz のタイムゾーンがありません: {zone!r}" in err and "Traceback" not in err


def test_device_list_has_a_header_and_json_stays_machine_readable(gw, capsys, monkeypatch):
    assert kanmon("device", "add", "--config", str(gw), "--id", "d1", "--owner", "sato", "--group", "staff") == 0
    capsys.readouterr()
    monkeypatch.setenv("KANMON_LANG", "en")
    assert kanmon("device", "list", "--config", str(gw)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "device\tIPv4\tstatus\towner\tgroups"
    assert lines[1].split("\t")[0] == "d1" and lines[1].split("\t")[3:] == ["sato", "staff"]
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("device", "list", "--config", str(gw)) == 0
    assert capsys.readouterr().out.splitlines()[0] == "端末\tIPv4\t状態\t所有者\tグループ"
    assert kanmon("device", "list", "--config", str(gw), "--json") == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["device_id"] for r in records] == ["d1"]


def test_import_posture_errors_follow_the_language(gw, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "mdm.csv"
    bad.write_text("device_id,platform,os_version,jailbroken\n,ios,17.1,no\nd1,ios,17.1,maybe\n")
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("device", "import-posture", "--config", str(gw), str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: device_id: 空です" in err and f"{bad}:3: jailbroken: 'maybe' は yes か no で書いてください" in err
    assert "empty" not in err and "is not yes/no" not in err


def test_schema_error_details_follow_the_language(gw, tmp_path, capsys, monkeypatch):
    """jsonschema's messages were English under KANMON_LANG=ja (issue #19)."""
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - {id: r, action: blok, match: {domian: a.example}}\n")
    gw.write_text(gw.read_text().replace("listen_port: 51820", "listen_port: 70000") + "surprise_key: 1\n")
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("policy", "check", str(policy)) == 2
    err = capsys.readouterr().err
    assert f"{policy}:3: rules[0].action: 'blok' は使えません（使える値: allow, block, monitor" in err
    assert f"{policy}:3: rules[0].match.domian: 不明なキーです（使えるキー: " in err
    assert "unknown key" not in err and "is not one of" not in err
    assert kanmon("config", "check", str(gw)) == 2
    err = capsys.readouterr().err
    assert "tunnel.listen_port: 70000 は大きすぎます（最大 65535）" in err and "surprise_key: 不明なキーです" in err
    assert "maximum" not in err and "unknown key" not in err
    monkeypatch.setenv("KANMON_LANG", "en")
    assert kanmon("config", "check", str(gw)) == 2
    err = capsys.readouterr().err
    assert "tunnel.listen_port: 70000 is greater than the maximum of 65535" in err and "surprise_key: unknown key (known keys:" in err
    assert "不明" not in err


def test_unreadable_files_are_named_in_the_chosen_language(gw, tmp_path, capsys, monkeypatch):
    """Python's strerror ("No such file or directory", "[Errno 2]") was printed under KANMON_LANG=ja."""
    monkeypatch.setenv("KANMON_LANG", "ja")
    missing = tmp_path / "missing.eml"
    assert kanmon("mail", "scan", str(missing)) == 2
    assert capsys.readouterr().err.strip() == f"ファイルを読めません: {missing}: ファイルがありません"
    assert kanmon("ca", "trust", "--config", str(gw), str(tmp_path)) == 2
    assert capsys.readouterr().err.strip() == f"ファイルを読めません: {tmp_path}: ディレクトリです（ファイルを指定してください）"
    assert kanmon("device", "import-posture", "--config", str(gw), str(tmp_path / "x.csv")) == 2
    assert "ファイルがありません" in capsys.readouterr().err
    assert kanmon("lists", "status", "--policy", str(tmp_path / "p.yaml")) == 2
    err = capsys.readouterr().err
    assert "ポリシーファイルを読めません" in err and "誤り" not in err      # missing, not "invalid"
    monkeypatch.setenv("KANMON_LANG", "en")
    assert kanmon("policy", "diff", str(gw), str(gw), "--urls", str(tmp_path / "urls.txt")) == 2
    err = capsys.readouterr().err
    assert f"cannot read the URL file: {tmp_path / 'urls.txt'}: file not found" in err and "Errno" not in err
    assert kanmon("logs", "search", "--dir", str(tmp_path), "--stream", "proxy", "--limit", "-1") == 2
    assert "--limit must be 0 (no limit) or more" in capsys.readouterr().err


def test_config_check_details_follow_the_language(gw, capsys, monkeypatch):
    gw.write_text(gw.read_text().replace("interface: eth0", "interface: kmwg0")
                  .replace("10.77.0.0/24", "10.77.0.5/24"))
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("config", "check", str(gw)) == 2
    err = capsys.readouterr().err
    assert "uplink.interface: tunnel.interface と別のインターフェースにしてください" in err
    assert "tunnel.ipv4_prefix: ネットワークとして正しくありません" in err
    assert "must differ" not in err and "not a valid network" not in err


def test_a_directory_given_as_a_policy_is_named_in_japanese(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "ja")
    assert kanmon("policy", "check", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: ファイルを読めません: 通常のファイルではありません（ディレクトリ）" in err
    assert "（directory）" not in err
