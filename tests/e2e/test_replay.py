"""Issue #7 "Must show": the replay corpus green against the lab, with its size reported
(flows, bypass count = 0), and a wrong expectation failing with a readable diff.

The corpus (tests/replay/corpus.pcapng, built by tests/replay/build.py) is replayed from the
lab's first device through its WireGuard tunnel; the gateway runs tests/replay/policy.yaml.
The summary is kept in artifacts/replay/summary.json.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw
from scapy.utils import wrpcap

from gateway.lab.topology import WEB4, Lab
from gateway.cli.replay import register
from gateway.replay.target import write_lab_state
from tests.e2e.conftest import ARTIFACTS, require_lab

pytestmark = pytest.mark.e2e

REPLAY = Path(__file__).resolve().parents[1] / "replay"
CORPUS, EXPECT, POLICY = REPLAY / "corpus.pcapng", REPLAY / "expect.yaml", REPLAY / "policy.yaml"
SUMMARY = ARTIFACTS / "replay" / "summary.json"


def kanmon_replay(*argv: str) -> tuple[int, str, str]:
    """`kanmon replay ...` through the command's own register() (as cli.py wires it)."""
    parser = argparse.ArgumentParser(prog="kanmon")
    register(parser.add_subparsers())
    args = parser.parse_args(["replay", *argv])
    out, err = io.StringIO(), io.StringIO()
    code = args.func(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def rlab(tmp_path_factory):
    require_lab()
    lab = Lab(tmp_path_factory.mktemp("replaylab"), n_devices=2, config_overrides={"policy": {"path": str(POLICY)}})
    try:
        lab.build()
        lab.start_gateway()
        for device in lab.devices:
            lab.wait_for_peer(device)
        write_lab_state(lab)
        yield lab
    finally:
        dest = ARTIFACTS / "replay"
        dest.mkdir(parents=True, exist_ok=True)
        for src in (lab.workdir / "gateway.log", lab.web_dir / "access.log", lab.workdir / "dns-server.log"):
            if src.exists():
                shutil.copy(src, dest / src.name)
        lab.teardown()


def test_replay_corpus_holds_every_expectation_and_nothing_bypasses(rlab: Lab):
    code, out, err = kanmon_replay(str(CORPUS), "--expect", str(EXPECT), "--lab-state", str(rlab.workdir),
                                   "--device", rlab.devices[0].device_id, "--summary-json", str(SUMMARY), "-v")
    summary = json.loads(SUMMARY.read_text())
    print(f"\nreplay corpus: {summary['flows']} flows ({summary['stream_flows']} TCP streams, "
          f"{summary['packet_flows']} packet flows), outcomes {summary['outcomes']}, "
          f"bypass count = {summary['bypass_count']}, {summary['internet_frames']} internet-side frames, "
          f"{summary['seconds']} s")
    assert code == 0, out + err
    assert summary["ok"] and summary["mismatches"] == []
    assert summary["bypass_count"] == 0
    assert summary["flows"] >= 50
    # The witness really watched: allowed flows' upstream connections were seen there.
    assert summary["internet_observed"] and summary["internet_frames"] > 0
    # Blocked flows never reached the origin; allowed ones did, from the gateway's uplink.
    uris = [r["uri"] for r in rlab.nginx_requests()]
    assert "/replay/allowed" in uris and "/replay/allowed-v6" in uris
    assert not [u for u in uris if u.startswith("/replay/blocked") or u.startswith("/replay/syn-data")]
    assert {r["remote"] for r in rlab.nginx_requests()} <= {"198.51.100.1", "2001:db8:100::1"}


def test_wrong_expectation_exits_1_with_a_readable_diff(rlab: Lab, tmp_path: Path):
    dev = rlab.devices[0]
    sport = 47001
    pkts = [IP(src=dev.ipv4, dst=WEB4) / TCP(sport=sport, dport=80, flags="S", seq=100),
            IP(src=dev.ipv4, dst=WEB4) / TCP(sport=sport, dport=80, flags="PA", seq=101, ack=1)
            / Raw(b"GET /replay/wrong HTTP/1.1\r\nHost: blocked.test\r\nConnection: close\r\n\r\n")]
    capture = tmp_path / "wrong.pcap"
    wrpcap(str(capture), pkts)
    flow = f"tcp {dev.ipv4}:{sport}>{WEB4}:80"
    expect = tmp_path / "wrong.yaml"
    expect.write_text(f'flows:\n  "{flow}": {{outcome: allowed, rule: some-other-rule}}\n')
    code, out, err = kanmon_replay(str(capture), "--expect", str(expect), "--lab-state", str(rlab.workdir))
    assert code == 1, out + err
    assert "期待と異なります" in out and "expectations do not hold" in out
    assert f"{flow} [tcp/stream -> {WEB4}:80]: outcome: allowed -> blocked" in out
    assert "rule: some-other-rule -> lab-block-blocked-test" in out


def test_bad_inputs_exit_2_with_the_reason(rlab: Lab, tmp_path: Path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("flows:\n  x: {outcome: maybe}\n")
    code, _, err = kanmon_replay(str(CORPUS), "--expect", str(bad_yaml), "--lab-state", str(rlab.workdir))
    assert code == 2 and f"{bad_yaml}:2" in err
    not_pcap = tmp_path / "not.pcap"
    not_pcap.write_text("hello")
    code, _, err = kanmon_replay(str(not_pcap), "--expect", str(EXPECT), "--lab-state", str(rlab.workdir))
    assert code == 2 and "cannot read the capture" in err
    code, _, err = kanmon_replay(str(CORPUS), "--expect", str(EXPECT), "--lab-state", str(rlab.workdir),
                                 "--device", "nope")
    assert code == 2 and "no device 'nope'" in err


def test_record_then_replay_a_real_browse(rlab: Lab, tmp_path: Path):
    import threading
    import time

    from gateway.replay.capture import read_capture, split_flows
    dev = rlab.devices[0]
    capture = tmp_path / "recorded.pcap"
    recorded: dict = {}
    recorder = threading.Thread(target=lambda: recorded.update(result=kanmon_replay(
        "--record", "--lab-state", str(rlab.workdir), "--device", dev.device_id, "--out", str(capture),
        "--seconds", "4")))
    recorder.start()
    time.sleep(1.5)
    result = dev.curl("http://www.example.test/replay/recorded", "--resolve", f"www.example.test:80:{WEB4}")
    assert result.stdout.endswith("HTTP_CODE=200"), result.stderr
    recorder.join(timeout=30)
    code, out, err = recorded["result"]
    assert code == 0 and "recorded" in out, err
    every = split_flows(read_capture(capture))
    flows = [f for f in every if f.dport == 80]
    assert len(flows) == 1 and flows[0].mode == "stream"
    assert flows[0].payload.startswith(b"GET /replay/recorded HTTP/1.1")
    # Besides the browse, the recording may hold the link's own chatter (IPv6 router
    # solicitations from the tunnel's link-local address): the gateway answers none of it.
    expect = tmp_path / "recorded.yaml"
    expect.write_text("flows:\n" + "".join(
        f'  "{f.id}": {{outcome: allowed, status: 200}}\n' if f.dport == 80 else f'  "{f.id}": {{outcome: dropped}}\n'
        for f in every))
    code, out, err = kanmon_replay(str(capture), "--expect", str(expect), "--lab-state", str(rlab.workdir))
    assert code == 0, out + err
    assert [r["uri"] for r in rlab.nginx_requests()].count("/replay/recorded") == 2  # browsed, then replayed


def test_a_packet_leaving_around_the_proxy_is_counted_as_a_bypass(rlab: Lab, tmp_path: Path):
    """The witness is not blind: a UDP packet sent from the gateway namespace straight to the
    internet while a replay runs (what a steering bug would do) fails the replay."""
    import threading
    import time

    from gateway.lab.topology import SPARE4
    dev = rlab.devices[0]
    capture = tmp_path / "one.pcap"
    wrpcap(str(capture), [IP(src=dev.ipv4, dst=WEB4) / TCP(sport=47002, dport=80, flags="S", seq=1)
                          / Raw(b"SYN with data")])
    flow = f"tcp {dev.ipv4}:47002>{WEB4}:80"
    expect = tmp_path / "one.yaml"
    expect.write_text(f'flows:\n  "{flow}": {{outcome: answered}}\n')
    leak_code = ("import socket, time\n"
                 "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 "for _ in range(6):\n"
                 f"    s.sendto(b'leak', ('{SPARE4}', 9999)); time.sleep(0.3)\n")
    leaker = threading.Thread(target=lambda: (time.sleep(0.8), rlab.gw.python(leak_code)))
    leaker.start()
    code, out, err = kanmon_replay(str(capture), "--expect", str(expect), "--lab-state", str(rlab.workdir))
    leaker.join(timeout=30)
    assert code == 1, out + err
    assert f"UDP to {SPARE4}:9999" in out and "迂回" in out
