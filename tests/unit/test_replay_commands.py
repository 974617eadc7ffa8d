"""`kanmon replay` and `policy diff --pcap` handlers, called with parsed arguments."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.packet import Raw
from scapy.utils import wrpcap

from gateway.cli.policy import register as register_policy
from gateway.cli.replay import register
from gateway.cli.policy import register_diff_pcap
from gateway.replay.policydiff import client_hello_sni, flows_from_pcap
from gateway.verdict import Stage

REPLAY = Path(__file__).resolve().parents[1] / "replay"
CORPUS, EXPECT, POLICY = REPLAY / "corpus.pcapng", REPLAY / "expect.yaml", REPLAY / "policy.yaml"


def run(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    register(sub)
    policy_sub = register_policy(sub)
    register_diff_pcap(policy_sub.choices["diff"])
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    return args.func(args, out=out, err=err), out.getvalue(), err.getvalue()


def test_list_prints_every_flow_with_its_mode():
    code, out, _ = run("replay", str(CORPUS), "--list")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 57
    assert lines[0].startswith("http-allowed\tstream\ttcp/stream -> 198.51.100.80:80")
    assert any(line.startswith("garbage-not-ip\tpackets") for line in lines)


@pytest.mark.parametrize("argv,message", [
    (["replay"], "capture file is required"),
    (["replay", str(CORPUS)], "--expect is required"),
    (["replay", str(CORPUS), "--expect", str(EXPECT)], "--lab-state DIR or --config C"),
    (["replay", "/nonexistent.pcap", "--expect", str(EXPECT), "--lab-state", "/tmp"], "cannot read the capture"),
    (["replay", str(CORPUS), "--expect", str(EXPECT), "--lab-state", "/nonexistent"], "not a lab state file"),
    (["replay", "--record", "--lab-state", "/tmp"], "--record needs --out"),
])
def test_usage_and_input_errors_exit_2_in_both_languages(argv, message):
    code, _, err = run(*argv)
    assert code == 2 and message in err
    assert any(ord(ch) > 0x3000 for ch in err), "the Japanese line is missing"


def test_bad_expectation_file_is_reported_with_its_line(tmp_path):
    bad = tmp_path / "e.yaml"
    bad.write_text("flows:\n  a: {outcome: allowed}\n  b: {outcome: sometimes}\n")
    code, _, err = run("replay", str(CORPUS), "--expect", str(bad), "--lab-state", "/tmp")
    assert code == 2 and f"{bad}:3: flows.b.outcome" in err


def test_lab_state_names_the_device(tmp_path):
    state = {"state_dir": "/x", "devices": {"dev1": {"netns": "n", "interface": "w", "ipv4": "10.77.0.2", "ipv6": None}}}
    (tmp_path / "replay-lab.json").write_text(json.dumps(state))
    from gateway.replay.target import target_from_lab_state
    t = target_from_lab_state(tmp_path, None)
    assert (t.device_id, t.device_netns, t.wg_interface, t.device_sources) == ("dev1", "n", "w", {4: "10.77.0.2"})
    code, _, err = run("replay", str(CORPUS), "--expect", str(EXPECT), "--lab-state", str(tmp_path), "--device", "dev9")
    assert code == 2 and "no device 'dev9'" in err


def test_flows_from_pcap_asks_the_questions_the_gateway_would():
    queries = {q.flow: q for q in flows_from_pcap(CORPUS)}
    assert queries["http-blocked"].stage == Stage.REQUEST and queries["http-blocked"].url == "http://blocked.test/replay/blocked"
    assert queries["tls-sni-blocked"].stage == Stage.TLS and queries["tls-sni-blocked"].host == "www.blocked.test"
    assert queries["tls-no-sni"].host is None and queries["dot-853"].dst_port == 853
    assert queries["dns-doh-name"].stage == Stage.DNS and queries["dns-doh-name"].host == "doh.test"
    assert queries["dns-tcp-blocked"].host == "blocked.test"
    assert "garbage-not-ip" not in queries


def test_client_hello_sni_parser_on_truncated_input():
    hello = bytes.fromhex("16030100")
    assert client_hello_sni(hello) == (False, None)
    from tests.replay.build import client_hello
    full = client_hello("a.example.test")
    assert client_hello_sni(full) == (True, "a.example.test")
    for cut in range(9, len(full)):
        client_hello_sni(full[:cut])  # never raises


def test_policy_diff_pcap_lists_the_flows_a_new_policy_judges_differently(tmp_path):
    new = tmp_path / "new.yaml"
    new.write_text("\n".join(line for line in POLICY.read_text().splitlines() if "block-doh" not in line) + "\n")
    code, out, _ = run("policy", "diff", str(POLICY), str(new), "--pcap", str(CORPUS))
    assert code == 0
    changed = [line.split("\t")[0] for line in out.splitlines() if "\t" in line]
    assert sorted(changed) == ["dns-doh-name", "doh-https", "doh-https-v6"]
    assert "3 of 39" in out
    code, out, _ = run("policy", "diff", str(POLICY), str(POLICY), "--pcap", str(CORPUS), "--json")
    assert code == 0 and out == ""


def test_policy_diff_still_takes_urls_and_needs_one_of_them(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://blocked.test/\n")
    code, out, _ = run("policy", "diff", str(POLICY), str(POLICY), "--urls", str(urls))
    assert code == 0 and "0 of 1" in out
    code, _, err = run("policy", "diff", str(POLICY), str(POLICY))
    assert code == 2 and "--urls or --pcap" in err
    bad = tmp_path / "bad.pcap"
    bad.write_text("no")
    code, _, err = run("policy", "diff", str(POLICY), str(POLICY), "--pcap", str(bad))
    assert code == 2 and "cannot read the capture" in err
