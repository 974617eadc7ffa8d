"""A damaged registry file is refused, never silently replaced (issue #15): an empty or
non-SQLite file, corrupt pages, a schema version from a newer Kanmon; a single bad row is
reported by device and the rest still listed; `kanmon registry check` diagnoses all of it
without changing the file."""

from __future__ import annotations

import gc
import sqlite3

import pytest

from gateway import cli
from gateway.registry.model import RegistryDamaged
from gateway.registry.sqlite import SqliteRegistry


@pytest.fixture
def gw(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(f"""
state_dir: {state}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
""")
    return cfg, state / "registry.sqlite3"


def kanmon(*argv: str) -> int:
    return cli.main(list(argv))


def with_devices(cfg, *ids: str) -> None:
    for device_id in ids:
        assert kanmon("device", "add", "--config", str(cfg), "--id", device_id, "--owner", "sato") == 0
    gc.collect()   # the commands leave their connection to the process exit: close them as a real exit does


def test_zero_byte_registry_is_refused_and_left_empty(gw, capsys):
    cfg, path = gw
    with_devices(cfg, "dev-1")
    path.write_bytes(b"")
    capsys.readouterr()
    assert kanmon("device", "list", "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "0 バイト" in err and "the file is empty (0 bytes)" in err
    assert kanmon("device", "revoke", "--config", str(cfg), "dev-1", "--reason", "lost") == 2
    assert "No such device" not in capsys.readouterr().err
    assert path.stat().st_size == 0              # nothing was created over the evidence
    with pytest.raises(RegistryDamaged) as caught:
        SqliteRegistry(path)
    assert caught.value.code == "empty"
    assert path.stat().st_size == 0


def test_non_sqlite_file_is_refused_unchanged(gw, capsys):
    cfg, path = gw
    junk = b"this is not a database\n" * 100
    path.write_bytes(junk)
    assert kanmon("device", "list", "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "SQLite データベースではありません" in err and "not a SQLite database (file is not a database)" in err
    assert "Traceback" not in err
    assert path.read_bytes() == junk


def test_missing_file_is_the_first_start_and_is_created(gw):
    cfg, path = gw
    assert not path.exists()
    assert kanmon("device", "list", "--config", str(cfg)) == 0
    assert path.read_bytes()[:16] == b"SQLite format 3\x00"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".new")]   # temp file gone


def test_a_deleted_registry_is_not_a_first_start(gw, capsys):
    cfg, path = gw
    with_devices(cfg, "dev-1")
    for leftover in path.parent.glob("registry.sqlite3*"):
        if not leftover.name.endswith(".created"):
            leftover.unlink()                     # rm registry.sqlite3 (and its -wal/-shm)
    capsys.readouterr()
    assert kanmon("device", "list", "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "deleted or moved" in err and "削除または移動" in err
    assert kanmon("device", "revoke", "--config", str(cfg), "dev-1", "--reason", "lost") == 2
    assert not path.exists()                      # no empty allowlist was started in its place
    assert kanmon("registry", "check", "--config", str(cfg)) == 1
    assert "deleted or moved" in capsys.readouterr().out
    (path.parent / "registry.sqlite3.created").unlink()   # the documented way to start afresh
    assert kanmon("device", "list", "--config", str(cfg)) == 0
    assert path.exists()


def test_corrupt_pages_give_a_clear_error_not_a_traceback(gw, capsys):
    cfg, path = gw
    with_devices(cfg, *(f"dev-{i}" for i in range(40)))
    reg = SqliteRegistry(path)
    reg._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    reg.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 3 * 4096
    data[4096:len(data)] = b"\xa5" * (len(data) - 4096)   # every page after the header page
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert kanmon("device", "list", "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "壊れています" in err and "corrupt" in err
    assert kanmon("registry", "check", "--config", str(cfg)) == 1
    out = capsys.readouterr().out
    assert "integrity_check" in out or "corrupt" in out
    assert path.read_bytes() == bytes(data)


def test_future_schema_version_is_refused(gw, capsys):
    cfg, path = gw
    with_devices(cfg, "dev-1")
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=9")
    db.commit()
    db.close()
    capsys.readouterr()
    assert kanmon("device", "list", "--config", str(cfg)) == 2
    err = capsys.readouterr().err
    assert "スキーマ版 9" in err and "schema version 9" in err and "Upgrade Kanmon" in err
    assert kanmon("registry", "check", "--config", str(cfg)) == 1
    assert "schema version 9 is newer" in capsys.readouterr().out
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 9
    db.close()


def break_row(path, device_id: str, column: str, value: str) -> None:
    db = sqlite3.connect(path)
    db.execute(f"UPDATE devices SET {column}=? WHERE device_id=?", (value, device_id))
    db.commit()
    db.close()


@pytest.mark.parametrize("column,value", [("groups_json", "not json"), ("ipv4", "10.77.0.999"),
                                          ("valid_until", "yesterday")])
def test_one_bad_row_is_reported_and_the_rest_listed(gw, capsys, column, value):
    cfg, path = gw
    with_devices(cfg, "dev-1", "dev-2", "dev-3")
    break_row(path, "dev-2", column, value)
    capsys.readouterr()
    assert kanmon("device", "list", "--config", str(cfg)) == 1
    captured = capsys.readouterr()
    listed = [line.split("\t")[0] for line in captured.out.splitlines()[1:]]   # after the header row
    assert listed == ["dev-1", "dev-3"]
    assert "'dev-2'" in captured.err and "damaged" in captured.err and "壊れている" in captured.err
    reg = SqliteRegistry(path)
    try:
        assert [r.device_id for r in reg.all()] == ["dev-1", "dev-3"]
        _rev, changed = reg.changed_since(0)
        assert [r.device_id for r in changed] == ["dev-1", "dev-3"]   # the reconciler never admits it
        reg.all()
        assert [b.device_id for b in reg.bad_rows] == ["dev-2"]          # once, however often it is read
        with pytest.raises(RegistryDamaged, match="dev-2"):
            reg.get("dev-2")
    finally:
        reg.close()
    assert kanmon("registry", "check", "--config", str(cfg)) == 1
    out = capsys.readouterr().out
    assert "'dev-2'" in out and "dev-1" not in out


def test_registry_check_exit_codes(gw, tmp_path, capsys):
    cfg, path = gw
    assert kanmon("registry", "check", "--config", str(cfg)) == 2        # no registry yet
    assert not path.exists()                                              # and check did not create one
    with_devices(cfg, "dev-1")
    assert kanmon("registry", "check", "--config", str(cfg)) == 0
    assert "sound" in capsys.readouterr().out
    path.write_bytes(b"")
    assert kanmon("registry", "check", "--config", str(cfg)) == 1
    assert path.stat().st_size == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: [\n")
    with pytest.raises(SystemExit) as exited:
        kanmon("registry", "check", "--config", str(bad))
    assert exited.value.code == 2


def test_postgresql_registry_of_a_newer_schema_is_refused(gw, capsys, monkeypatch, postgres):
    from gateway.registry.factory import REGISTRY_URL_ENV
    from gateway.registry.postgres import PgRegistry, connect

    cfg, path = gw
    url = postgres.create_database("futureschema")
    PgRegistry(url).close()
    conn = connect(url)
    conn.execute("INSERT INTO kanmon_schema VALUES (99, now())")
    with pytest.raises(RegistryDamaged) as refused:
        PgRegistry(url)
    assert refused.value.code == "future-schema" and "schema version 99" in refused.value.text.en
    monkeypatch.setenv(REGISTRY_URL_ENV, url)
    assert kanmon("device", "list", "--config", str(cfg)) == 2
    assert "スキーマ版は 99" in capsys.readouterr().err
    assert conn.execute("SELECT max(version) AS v FROM kanmon_schema").fetchone()["v"] == 99
    conn.close()
    assert not path.exists()
