"""`kanmon user sessions` and `kanmon user signout`, called through ``register`` on an argparse
parser with a real config file and the registry's SQLite file under a temp state dir."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from gateway.registry.sqlite import SqliteRegistry
from gateway.cli import user as commands
from gateway.signin.sessions import UserSession
from gateway.signin.store import SessionStore


@pytest.fixture
def gw(tmp_path, monkeypatch):
    monkeypatch.setenv("KANMON_LANG", "both")
    monkeypatch.setenv("SUDO_USER", "ops-sato")
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(f"""
state_dir: {state}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, ipv6_prefix: "fd77:77::/64"}}
uplink: {{interface: eth0}}
""")
    return Gw(cfg, state)


class Gw:
    def __init__(self, cfg, state):
        self.cfg, self.state = cfg, state
        self.registry_path = state / "registry.sqlite3"
        SqliteRegistry(self.registry_path)
        parser = argparse.ArgumentParser()
        commands.register(parser.add_subparsers())
        self.parser = parser

    def run(self, *argv: str) -> int:
        args = self.parser.parse_args(["user", *argv, "--config", str(self.cfg)])
        return args.func(args)

    def store(self) -> SessionStore:
        return SessionStore(self.registry_path)

    def add(self, device_id: str, user: str, *, minutes_left: int = 60, ip: str = "10.77.0.2") -> UserSession:
        now = datetime.now(UTC)
        s = UserSession(session_id=f"s-{device_id}-{user}", device_id=device_id, tunnel_ip=ip, user=user,
                        subject=f"sub-{user}", issuer="https://idp.example", mfa=True, amr=frozenset({"otp"}),
                        created_at=now - timedelta(minutes=5), expires_at=now + timedelta(minutes=minutes_left))
        store = self.store()
        try:
            return store.start(s)
        finally:
            store.close()


def test_signout_ends_every_session_of_the_user(gw, capsys):
    gw.add("dev-1", "田中")
    gw.add("dev-2", "田中", ip="10.77.0.3")
    keep = gw.add("dev-3", "suzuki", ip="10.77.0.4")
    assert gw.run("signout", "田中", "--reason", "lost phone") == 0
    out, err = capsys.readouterr()
    assert "サインアウトしました: 田中 (端末 dev-1)" in out and "signed out: 田中 (device dev-2)" in out
    assert "ゲートウェイは動いていません" in err and "no gateway is running" in err
    store = gw.store()
    assert [s.session_id for s in store.active()] == [keep.session_id]
    assert {s.end_reason for s in store.of_user("田中")} == {"lost phone"}
    audit = SqliteRegistry(gw.registry_path).unshipped_audit()
    assert sorted((e.action, e.actor, e.device_id) for e in audit) == [
        ("user.signout", "ops-sato", "dev-1"), ("user.signout", "ops-sato", "dev-2")]


def test_signout_default_reason(gw):
    s = gw.add("dev-1", "tanaka")
    assert gw.run("signout", "tanaka") == 0
    assert gw.store().get(s.session_id).end_reason == "signed out by an operator"


def test_signout_of_unknown_user_fails_bilingually_and_changes_nothing(gw, capsys):
    keep = gw.add("dev-1", "tanaka")
    assert gw.run("signout", "nobody") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "利用者 nobody の有効なセッションはありません" in err and "user nobody has no active session" in err
    assert [s.session_id for s in gw.store().active()] == [keep.session_id]
    # a second sign-out of the same user finds nothing left either
    assert gw.run("signout", "tanaka") == 0 and gw.run("signout", "tanaka") == 1


def test_signout_pokes_the_running_gateway(gw, capsys):
    # a stand-in gateway process: exits 7 when poked with SIGUSR1
    child = subprocess.Popen(
        [sys.executable, "-c", "import signal, sys, time\n"
         "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(7))\nprint('ready', flush=True)\ntime.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        (gw.state / "kanmon.pid").write_text(f"{child.pid}\n")
        gw.add("dev-1", "tanaka")
        assert gw.run("signout", "tanaka") == 0
        assert child.wait(timeout=10) == 7
        assert "no gateway is running" not in capsys.readouterr().err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sessions_lists_active_ones(gw, capsys):
    gw.add("dev-1", "tanaka")
    gw.add("dev-2", "suzuki", ip="10.77.0.3")
    gw.add("dev-3", "old", minutes_left=-1, ip="10.77.0.4")
    assert gw.run("sessions", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["user"] for r in rows) == ["suzuki", "tanaka"]
    assert all(r["mfa"] is True and r["amr"] == ["otp"] and r["ended_at"] is None for r in rows)
    assert gw.run("sessions") == 0
    out = capsys.readouterr().out
    assert "tanaka\tdev-1\t10.77.0.2\tmfa=yes" in out and "old" not in out


def test_sessions_of_one_user_with_and_without_ended(gw, capsys):
    gw.add("dev-1", "tanaka")
    assert gw.run("signout", "tanaka") == 0
    capsys.readouterr()
    assert gw.run("sessions", "--user", "tanaka") == 0
    out = capsys.readouterr().out
    assert "有効なセッションはありません" in out and "no sessions" in out
    assert gw.run("sessions", "--user", "tanaka", "--all", "--json") == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["device_id"] == "dev-1" and row["end_reason"] == "signed out by an operator"


def test_bad_config_exits_2_before_touching_anything(gw, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: /nonexistent\ntunnel: {interface: kmwg0}\n")
    args = gw.parser.parse_args(["user", "signout", "tanaka", "--config", str(bad)])
    with pytest.raises(SystemExit) as exc:
        args.func(args)
    assert exc.value.code == 2
    assert "bad.yaml:" in capsys.readouterr().err


def test_signout_needs_a_user_and_a_config(gw, capsys):
    with pytest.raises(SystemExit) as exc:
        gw.parser.parse_args(["user", "signout", "--config", str(gw.cfg)])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        gw.parser.parse_args(["user", "signout", "tanaka"])
