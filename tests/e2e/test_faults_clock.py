"""Issue 7 "Faults": clock jump, for real. The gateway process runs under libfaketime whose
offset the test moves while the gateway runs; the devices, the registry commands and the test
itself keep the real time.

Defined outcome (gateway/runtime/reconcile.py): validity follows the wall clock. A forward step past
a device's usage-period end cuts it at the next reconcile pass, with nobody running a
command; a backward step re-admits it (the reconciler sees the step against the monotonic
clock and makes its next pass a full one); a revoked device stays out whatever the clock
says. The operator is told: a warning in the gateway log for each step, and the peer count
in kanmon_wireguard_peers.

libfaketime comes from the PyPI package `libfaketime` (pinned in the report), which ships
its own build of the library; its environment (get_reload_information) is used with:
- FAKETIME_TIMESTAMP_FILE + FAKETIME_NO_CACHE=1: the offset is re-read on every call, so
  rewriting the file steps the running process's clock;
- DONT_FAKE_MONOTONIC=1: a real step (NTP, `date -s`) moves CLOCK_REALTIME only. With the
  monotonic clock faked too, a step back freezes every asyncio timer (the loop clock is
  monotonic) for the size of the step, and nothing could tell the step from elapsed time.
Not Debian's `faketime` 0.9.10 (bookworm): with the monotonic clock excluded it breaks
Python >= 3.11's time.sleep (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) gets a
negative time: EINVAL, libfaketime issue #426), so every subprocess.run(timeout=...) in the
gateway -- the nft calls of the reconciler -- raises. The PyPI build fakes clock_gettime
only and leaves sleeping alone, which is what a stepped host clock does too.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.lab.topology import Lab, wait_until
from gateway.registry.model import AuditEntry
from gateway.registry.sqlite import SqliteRegistry
from tests.e2e.test_gateway_lifecycle import http_code
from tests.availability import unavailable

pytestmark = pytest.mark.e2e

JUMP = dt.timedelta(hours=2)
PERIOD = dt.timedelta(hours=1)


def faketime_environment(clock_file: Path) -> dict[str, str]:
    """Environment that runs a process on a wall clock offset by the contents of `clock_file`."""
    try:
        import libfaketime
    except ImportError:
        reason = "libfaketime missing (pip install libfaketime==3.0.1)"
        unavailable(reason)
    _, env = libfaketime.get_reload_information()
    library = Path(env["LD_LIBRARY_PATH"]) / env["LD_PRELOAD"].split(":")[0]
    assert library.is_file(), library
    return {"LD_PRELOAD": str(library), "DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1",
            "FAKETIME_TIMESTAMP_FILE": str(clock_file)}


def set_offset(clock_file: Path, offset: str) -> None:
    """Step the gateway's wall clock: libfaketime re-reads the file on every time call, so
    replace it atomically (a half-written offset would be read as a date)."""
    tmp = clock_file.with_suffix(".tmp")
    tmp.write_text(offset + "\n")
    os.replace(tmp, clock_file)


def peers(lab: Lab) -> str:
    return lab.gw.run("wg", "show", lab.wg_interface, "allowed-ips").stdout


def log_since(lab: Lab, offset: int) -> str:
    return lab.gateway.log_text()[offset:]


def test_clock_jump_forward_cuts_back_readmits_and_a_revoked_device_stays_out(make_lab, tmp_path):
    clock_file = tmp_path / "gateway-clock"
    set_offset(clock_file, "+0")
    faketime = faketime_environment(clock_file)
    lab = make_lab(n_devices=3, start=False)
    timed, steady, revoked = lab.devices
    # `timed` and `revoked` may be used until one hour from now (real time). `revoked` will
    # also be revoked: after the step back its period is valid again, its revocation is not.
    until = dt.datetime.now(dt.UTC) + PERIOD
    registry = SqliteRegistry(lab.state_dir / "registry.sqlite3")
    for dev in (timed, revoked):
        registry.update(replace(registry.get(dev.device_id), valid_until=until),
                        audit=AuditEntry("test", "device-updated", "usage period ends in an hour"))
    registry.close()

    lab.start_gateway(env=faketime)
    for dev in lab.devices:
        lab.wait_for_peer(dev)
    for dev in lab.devices:
        assert http_code(dev.curl(f"http://www.example.test/{dev.device_id}-before")) == "200"
    lab.kanmon("device", "revoke", revoked.device_id, "--reason", "lost", "--config", str(lab.config_path))
    wait_until(lambda: revoked.public_key not in peers(lab), 10, "the revoked device's peer to go")
    assert lab.metric_value("kanmon_wireguard_peers") == 2

    # -- forward: +2 h, past the end of the usage period. Nobody runs a command. ----------
    mark = len(lab.gateway.log_text())
    set_offset(clock_file, f"+{int(JUMP.total_seconds())}")
    stepped = time.monotonic()
    wait_until(lambda: timed.public_key not in peers(lab), 10, "the period-expired device's peer to go")
    cut_seconds = time.monotonic() - stepped
    assert http_code(timed.curl("http://www.example.test/after-forward-step", timeout=3)) == "000"
    assert http_code(steady.curl("http://www.example.test/steady-after-forward-step")) == "200"
    assert not [r for r in lab.nginx_requests() if "after-forward-step" in r["uri"] and "steady" not in r["uri"]]
    assert steady.public_key in peers(lab) and lab.metric_value("kanmon_wireguard_peers") == 1
    text = log_since(lab, mark)
    assert "wall clock stepped forward by 7200 s" in text, text[-3000:]
    assert lab.metric_value("kanmon_clock_jumps_total", direction="forward") == 1
    # The gateway's own clock really moved: its access record of the steady device's request
    # is stamped two hours ahead of the real time.
    def proxy_records(marker: str) -> list[dict]:
        return [r for r in lab.log_records("proxy") if marker in (r.get("url.full") or "")]

    wait_until(lambda: proxy_records("steady-after-forward-step"), 10, "the proxy log record")
    record = proxy_records("steady-after-forward-step")[0]
    stamped = dt.datetime.fromisoformat(record["@timestamp"].replace("Z", "+00:00"))
    assert abs((stamped - dt.datetime.now(dt.UTC)) - JUMP) < dt.timedelta(minutes=1), record["@timestamp"]

    # -- backward: the real time again, the period has not ended yet. ----------------------
    mark = len(lab.gateway.log_text())
    set_offset(clock_file, "+0")
    stepped = time.monotonic()
    wait_until(lambda: timed.public_key in peers(lab), 10, "the period-expired device's peer to come back")
    readmit_seconds = time.monotonic() - stepped
    wait_until(lambda: http_code(timed.curl("http://www.example.test/after-backward-step", timeout=2)) == "200",
               30, "the re-admitted device to browse again", interval=0.5)
    browse_seconds = time.monotonic() - stepped
    text = log_since(lab, mark)
    assert "wall clock stepped backward by 7200 s" in text, text[-3000:]
    assert lab.metric_value("kanmon_clock_jumps_total", direction="backward") == 1
    # The revoked device, whose usage period is valid again by this clock, stays out.
    assert revoked.public_key not in peers(lab)
    assert http_code(revoked.curl("http://www.example.test/revoked-after-backward-step", timeout=3)) == "000"
    assert not [r for r in lab.nginx_requests() if "revoked-after-backward-step" in r["uri"]]
    assert lab.metric_value("kanmon_wireguard_peers") == 2
    assert http_code(steady.curl("http://www.example.test/steady-after-backward-step")) == "200"
    print(f"\nclock step +{JUMP}: cut after {cut_seconds:.2f} s; step back: peer restored after "
          f"{readmit_seconds:.2f} s, browsing again after {browse_seconds:.1f} s")
    assert cut_seconds < 5, "cut at the next pass (polled every 50 ms)"
    assert readmit_seconds < 5, "the step back is detected and triggers a full pass (not the 30 s safety pass)"
