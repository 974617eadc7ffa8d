"""The gateway holds two connections to the registry file (the device registry and the
session store, gateway/signin/store.py) while the operator CLI, another process, writes
devices into it: every write must be seen by the gateway's registry connection. Opening the
second connection must not drop the process's SQLite locks on the file (a Python open/close
of the file does: the CLI then deletes the WAL the gateway still reads, and the gateway's
revision stays where it was -- the sign-in e2e lab hung on exactly that)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gateway
from gateway.registry.sqlite import SqliteRegistry
from gateway.signin.store import SessionStore

# A separate process, as `kanmon device add` is: POSIX locks only keep other processes out.
_CLI_WRITE = """
import ipaddress, sys
from wireguard_tools import WireguardKey
from gateway.registry.model import DeviceRecord
from gateway.registry.sqlite import SqliteRegistry
reg = SqliteRegistry(sys.argv[1])
v4, v6 = reg.allocate_addresses(ipaddress.ip_network("10.77.0.0/24"), None)
reg.add(DeviceRecord(device_id=sys.argv[2], wg_public_key=str(WireguardKey.generate().public_key()), ipv4=v4, ipv6=v6))
print(reg.revision())
reg.close()
"""


def cli_add(path: Path, device_id: str) -> int:
    root = str(Path(gateway.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _CLI_WRITE, str(path), device_id], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


def test_writes_of_another_process_are_seen_after_the_session_store_opened_the_file(tmp_path):
    path = tmp_path / "registry.sqlite3"
    registry = SqliteRegistry(path)
    sessions = SessionStore(path)        # the same file, opened after the registry (as the gateway does)
    try:
        for device_id in ("alice-phone", "pool-tablet", "kiosk"):
            written = cli_add(path, device_id)
            assert registry.revision() == written, f"after adding {device_id}"
            assert registry.get(device_id) is not None
        assert sessions.revision() == 0
    finally:
        sessions.close()
        registry.close()


def test_a_second_registry_connection_in_the_process_keeps_the_first_current(tmp_path):
    path = tmp_path / "registry.sqlite3"
    first = SqliteRegistry(path)
    second = SqliteRegistry(path)
    try:
        for device_id in ("a", "b"):
            written = cli_add(path, device_id)
            assert first.revision() == written == second.revision()
    finally:
        second.close()
        first.close()
