"""Issue #2 "Must show": crash, restart, clean stop and bad configuration, on the real host state."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from gateway.lab.topology import Lab, wait_until

pytestmark = pytest.mark.e2e


def http_code(result) -> str:
    return result.stdout.rsplit("HTTP_CODE=", 1)[-1].strip()


def watch_syns(lab: Lab) -> None:
    """Count TCP SYNs arriving in the internet namespace (what 'reached the internet')."""
    lab.inet.run("nft", "-f", "-", input=(
        "table inet labwatch {\n"
        "  counter syns {}\n"
        "  chain in { type filter hook input priority 0; tcp flags & (syn | ack) == syn counter name syns; }\n"
        "}\n"))


def syn_count(lab: Lab) -> int:
    out = lab.inet.run("nft", "list", "counter", "inet", "labwatch", "syns").stdout
    return int(out.split("packets", 1)[1].split()[0])


def host_state(lab: Lab) -> tuple[str, str]:
    links = lab.gw.run("ip", "-o", "link", "show").stdout
    tables = lab.gw.run("nft", "list", "tables").stdout
    return links, tables


def test_kill9_blocks_new_connections_and_restart_recovers(make_lab):
    lab = make_lab(n_devices=1)
    dev = lab.devices[0]
    download = subprocess.Popen(dev.ns.cmd("curl", "-sS", "-o", "/dev/null", "--max-time", "60",
                                           "http://www.example.test/big"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert download.poll() is None, "the download must be running when the gateway dies"
    watch_syns(lab)

    lab.stop_gateway(signal.SIGKILL)
    assert download.wait(timeout=20) != 0, "the running download dies with the proxy"
    before = syn_count(lab)
    for i in range(5):
        result = dev.curl(f"http://www.example.test/while-down-{i}", timeout=3)
        assert http_code(result) == "000"
        udp_or_other = dev.curl(f"https://198.51.100.90:8443/while-down-{i}", timeout=2)
        assert http_code(udp_or_other) == "000"
    assert syn_count(lab) == before, "no packet of a new connection may reach the internet while the gateway is down"
    assert not [r for r in lab.nginx_requests() if "while-down" in r["uri"]]

    # The stale table and interface are still there; a plain restart takes them over.
    links, tables = host_state(lab)
    assert lab.wg_interface in links and "kanmon_lab" in tables
    lab.start_gateway()
    lab.wait_for_peer(dev)
    result = dev.curl("http://www.example.test/after-restart")
    assert http_code(result) == "200", "the device resumes without re-enrollment"
    assert "reusing existing wireguard-go WireGuard interface" in lab.gateway.log_text()


def test_sigterm_removes_table_and_interface(make_lab):
    lab = make_lab(n_devices=1)
    assert lab.stop_gateway(signal.SIGTERM) == 0
    links, tables = host_state(lab)
    assert lab.wg_interface not in links
    assert "kanmon_lab" not in tables
    # No tunnel, no path: the device reaches nothing.
    assert http_code(lab.devices[0].curl("http://www.example.test/after-stop", timeout=3)) == "000"


def test_invalid_config_is_refused_with_key_and_line_and_host_unchanged(make_lab):
    lab = make_lab(n_devices=0, start=False)
    before = host_state(lab)
    bad = lab.workdir / "bad.yaml"
    text = lab.config_path.read_text().replace("listen_port: 51820", "listen_port: 70000")
    text += "surprise_key: 1\n"
    bad.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "listen_port: 70000" in l)
    extra_line = len(text.splitlines())
    result = lab.kanmon("run", "--config", str(bad), check=False, ns=lab.gw)
    assert result.returncode == 2
    assert f"bad.yaml:{line}: tunnel.listen_port:" in result.stderr
    assert f"bad.yaml:{extra_line}: surprise_key: 不明なキーです" in result.stderr and "/ unknown key" in result.stderr
    assert "設定ファイルに誤りがあります" in result.stderr
    assert host_state(lab) == before
    assert not (lab.state_dir / "registry.sqlite3").exists()


def test_gateway_runs_on_jemalloc_unless_told_otherwise(make_lab):
    """Issue #7: glibc's malloc let RSS creep under long load; `kanmon run` restarts itself
    once with jemalloc preloaded. The restart keeps the PID (the process systemd and the lab
    started is the gateway), the memory is jemalloc's, and the operator can see and override it."""
    lab = make_lab(n_devices=1)
    pid = lab.gateway.proc.pid
    assert int((lab.state_dir / "kanmon.pid").read_text()) == pid, "the restart must keep the PID"
    maps = open(f"/proc/{pid}/maps").read()
    assert "libjemalloc" in maps, "the gateway must run on jemalloc when the host has it"
    assert lab.metric_value("kanmon_allocator_info", allocator="jemalloc") == 1
    assert "malloc: jemalloc" in lab.gateway.log_text()
    assert http_code(lab.devices[0].curl("http://www.example.test/on-jemalloc")) == "200"

    lab.stop_gateway(signal.SIGTERM)
    lab.start_gateway(env={"KANMON_ALLOCATOR": "glibc"})
    lab.wait_for_peer(lab.devices[0])
    assert "libjemalloc" not in open(f"/proc/{lab.gateway.proc.pid}/maps").read()
    assert lab.metric_value("kanmon_allocator_info", allocator="glibc") == 1
    # SIGTERM removed the interface: the device's session is gone and wireguard-go starts a
    # new handshake only after 15 s without an answer (keepalive + rekey timeout).
    codes = []

    def served() -> bool:
        codes.append(http_code(lab.devices[0].curl("http://www.example.test/on-glibc", timeout=5)))
        return codes[-1] == "200"

    wait_until(served, 45, f"a request through the restarted gateway (answers so far: {codes})")
