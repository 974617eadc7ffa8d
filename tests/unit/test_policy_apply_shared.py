"""gateway/runtime/policyapply.py: `kanmon policy apply` and the console apply a policy by one
code path (issue #21): a bad policy is refused and nothing changes; a good one is recorded in
the audit trail with the operator's identity, then pointed at and swapped in by the running
gateway (here: this process, answering SIGHUP as the gateway does)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from gateway.cli import main as kanmon
from gateway.config import load_config
from gateway.registry.factory import open_registry
from gateway.runtime.policyapply import apply_policy, policy_in_force

GOOD = "version: 1\nrules:\n  - {id: a, action: block, match: {domain: a.example}}\n"
BAD = "version: 1\nrules:\n  - {id: a, action: blok, match: {domain: a.example}}\n"


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "kanmon.yaml"
    path.write_text(f"""
state_dir: {tmp_path / 'state'}
tunnel: {{interface: kmwg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24, endpoint: "vpn.example.test:51820"}}
uplink: {{interface: eth0}}
""")
    (tmp_path / "state").mkdir()
    return load_config(path)


def audit(cfg):
    reg = open_registry(cfg)
    try:
        return [e for e in reg.unshipped_audit() if e.action == "policy-apply"]
    finally:
        reg.close()


def test_bad_policy_is_refused_and_nothing_changes(cfg, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    outcome = apply_policy(cfg, bad, "console:alice")
    assert (outcome.code, outcome.kind) == (2, "invalid")
    assert any(f"{bad}:3" in e for e in outcome.errors)
    assert outcome.text.ja and outcome.text.en
    assert not cfg.applied_policy_link.exists() and not cfg.applied_policy_link.is_symlink()
    assert audit(cfg) == []


def test_missing_file_is_unreadable(cfg, tmp_path):
    outcome = apply_policy(cfg, tmp_path / "none.yaml", "console:alice")
    assert (outcome.code, outcome.kind) == (2, "unreadable")


def test_good_policy_with_no_gateway_running_is_stored_and_audited(cfg, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    outcome = apply_policy(cfg, good, "console:alice")
    assert (outcome.code, outcome.kind) == (0, "stored")
    assert cfg.active_policy_path() == good.resolve()
    [entry] = audit(cfg)
    assert entry.actor == "console:alice" and entry.device_id is None
    assert entry.reason.startswith(f"version {outcome.version} ({good.resolve()}); was -")


def test_running_gateway_swaps_or_refuses(cfg, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    cfg.pid_path.write_text(str(os.getpid()))
    answers = {"result": "success"}

    def gateway_reload(signum, frame):          # what GatewayApp.reload_policy writes
        path = cfg.active_policy_path()
        status = {"result": answers["result"], "path": str(path)}
        if answers["result"] == "success":
            from gateway.policy import load_policy
            status["version"] = load_policy(path, feeds_dir=cfg.state_dir / "feeds").version
        else:
            status["errors"] = ["list file vanished"]
        cfg.policy_status_path.write_text(json.dumps(status))

    pokes = []
    old = signal.signal(signal.SIGHUP, gateway_reload)
    old_usr1 = signal.signal(signal.SIGUSR1, lambda signum, frame: pokes.append(signum))   # reconcile: ships audit
    try:
        outcome = apply_policy(cfg, good, "console:alice", timeout=5)
        assert (outcome.code, outcome.kind) == (0, "applied")
        path, status = policy_in_force(cfg)
        assert path == good.resolve() and status["version"] == outcome.version
        answers["result"] = "failure"
        other = tmp_path / "other.yaml"
        other.write_text(GOOD.replace("a.example", "b.example"))
        refused = apply_policy(cfg, other, "console:bob", timeout=5)
        assert (refused.code, refused.kind, refused.errors) == (1, "refused", ("list file vanished",))
    finally:
        signal.signal(signal.SIGHUP, old)
        signal.signal(signal.SIGUSR1, old_usr1)
    assert [e.actor for e in audit(cfg)] == ["console:alice", "console:bob"]
    assert len(pokes) == 2          # each apply asked the gateway to ship its audit entry at once


def test_audit_failure_applies_nothing(cfg, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)

    class Broken:
        def append_audit(self, entry):
            raise OSError("disk full")

        def close(self):
            pass

    outcome = apply_policy(cfg, good, "console:alice", open_registry=lambda c: Broken())
    assert (outcome.code, outcome.kind) == (1, "audit-failed")
    assert "disk full" in outcome.text.en
    assert not cfg.applied_policy_link.is_symlink()


def test_the_cli_goes_the_same_way(cfg, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "operator1")
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    assert kanmon(["policy", "apply", str(good), "--config", str(cfg.source)]) == 0
    assert "will use it at its next start" in capsys.readouterr().out
    assert [e.actor for e in audit(cfg)] == ["operator1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert kanmon(["policy", "apply", str(bad), "--config", str(cfg.source)]) == 2
    err = capsys.readouterr().err
    assert "The policy is invalid; nothing was applied:" in err and f"  {bad}:3" in err
    assert cfg.active_policy_path() == good.resolve()
    assert Path(cfg.source).exists()


def test_policy_test_for_a_registered_device_goes_through_the_shared_context(cfg, tmp_path, capsys):
    """`kanmon policy test --device` and the console's test page build the device's context
    with gateway/runtime/devicecontext.py: its registry groups decide."""
    import ipaddress

    from gateway.registry.model import DeviceRecord
    from gateway.runtime.devicecontext import DeviceLookupError, registered_device_context
    reg = open_registry(cfg)
    reg.add(DeviceRecord(device_id="fin-1", wg_public_key=None, ipv4=ipaddress.IPv4Address("10.77.0.9"),
                         owner="sato", groups=frozenset({"finance"})))
    reg.close()
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - {id: fin, action: block, match: {domain: a.example, device_group: finance}}\n")
    assert kanmon(["policy", "test", "--policy", str(policy), "--device", "fin-1", "--config", str(cfg.source),
                   "--json", "https://a.example/"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert (line["verdict"], line["rule"], line["device"], line["user"]) == ("block", "fin", "fin-1", "sato")
    ctx, user = registered_device_context(cfg, "fin-1")
    assert ctx.groups == frozenset({"finance"}) and user == "sato"
    with pytest.raises(DeviceLookupError):
        registered_device_context(cfg, "nope")
    assert kanmon(["policy", "test", "--policy", str(policy), "--device", "nope", "--config", str(cfg.source),
                   "https://a.example/"]) == 1
