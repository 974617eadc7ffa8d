"""Issue #16: registries are opened only through gateway.registry.factory. `kanmon replay
--config` opened registry.sqlite3 directly, so a device of a PostgreSQL registry was "not in
the registry" and could not be replayed; the factory's SQLite and PostgreSQL choices are
checked here through the callers that must use it."""

from __future__ import annotations

import ipaddress

import pytest
from wireguard_tools import WireguardKey

from gateway.registry.factory import REGISTRY_URL_ENV, open_registry, open_state_dir_registry
from gateway.registry.model import DeviceRecord
from gateway.registry.postgres import PgRegistry
from gateway.registry.sqlite import SqliteRegistry
from gateway.replay.target import TargetError, target_from_config


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.delenv(REGISTRY_URL_ENV, raising=False)
    state = tmp_path / "state"
    cfg = tmp_path / "kanmon.yaml"
    cfg.write_text(f"""
state_dir: {state}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
""")
    return state, cfg


def _add(registry, device_id: str) -> DeviceRecord:
    v4, v6 = registry.allocate_addresses(ipaddress.ip_network("10.77.0.0/24"), None)
    return registry.add(DeviceRecord(device_id=device_id, wg_public_key=str(WireguardKey.generate().public_key()),
                                     ipv4=v4, ipv6=v6))


def _target(cfg, device_id):
    return target_from_config(cfg, device_id, interface=None, device_netns="dev-ns", internet_netns=None,
                              internet_interface=None)


def test_replay_target_reads_a_device_of_a_postgresql_registry(config, monkeypatch, postgres):
    state, cfg = config
    url = postgres.create_database("replaytarget")
    monkeypatch.setenv(REGISTRY_URL_ENV, url)
    registry = PgRegistry(url, node="test")
    try:
        rec = _add(registry, "pg-phone")
    finally:
        registry.close()
    target = _target(cfg, "pg-phone")
    assert target.device_id == "pg-phone" and target.device_ipv4 == str(rec.ipv4)
    assert not (state / "registry.sqlite3").exists()      # no stray SQLite registry was created
    with pytest.raises(TargetError, match="no device 'absent'"):
        _target(cfg, "absent")


def test_replay_target_reads_the_embedded_sqlite_registry(config):
    state, cfg = config
    state.mkdir()
    registry = SqliteRegistry(state / "registry.sqlite3")
    try:
        rec = _add(registry, "local-phone")
    finally:
        registry.close()
    target = _target(cfg, "local-phone")
    assert target.device_ipv4 == str(rec.ipv4) and target.wg_interface == "wg0"


def test_state_dir_registry_is_never_created(tmp_path):
    assert open_state_dir_registry(tmp_path) is None
    assert not (tmp_path / "registry.sqlite3").exists()
    SqliteRegistry(tmp_path / "registry.sqlite3").close()
    registry = open_state_dir_registry(tmp_path)
    try:
        assert isinstance(registry, SqliteRegistry) and registry.all() == []
    finally:
        registry.close()


def test_factory_picks_postgresql_when_a_url_is_set(config, monkeypatch, postgres):
    from gateway.config import load_config
    _, cfg = config
    url = postgres.create_database("factorypick")
    monkeypatch.setenv(REGISTRY_URL_ENV, url)
    registry = open_registry(load_config(cfg))
    try:
        assert isinstance(registry, PgRegistry)
    finally:
        registry.close()
