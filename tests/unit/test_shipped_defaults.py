"""Issue #17 ("enforce the real internet out of the box"): the shipped configuration example
loads the shipped policy, its quarantine list agrees with the policy's remediation list, and
the example policy's secure defaults hold (storage banned for every device, a quarantined
device reaches its remediation hosts and nothing else, every list entry is sourced).
The 300-URL corpus is tests/unit/test_policy_corpus.py."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.policy import DeviceContext, load_policy, query_for_url
from gateway.policy.lists import parse_list
from gateway.verdict import Action, Stage

ROOT = Path(__file__).resolve().parents[2]
INSTALLED = Path("/opt/kanmon")      # README "Running as a service": ln -s "$PWD" /opt/kanmon
NOW = datetime(2026, 12, 7, 1, 0, tzinfo=timezone.utc)
ORG = DeviceContext("d-org", frozenset({"staff"}), "org", platform="ios", os_version="18.1")
BYOD_OLD = DeviceContext("d-byod", frozenset(), "byod", platform="android", os_version="11")
QUARANTINED = DeviceContext("d-q", frozenset({"staff"}), "org", platform="ios", os_version="18.1",
                            status="quarantined")


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "systemd" / "kanmon.yaml.example")


@pytest.fixture(scope="module")
def snap():
    return load_policy(ROOT / "policies" / "example.yaml")


def remediation_entries() -> set[str]:
    text = (ROOT / "policies" / "lists" / "remediation.txt").read_text(encoding="utf-8")
    entries, errors = parse_list(text, "remediation", "remediation.txt")
    assert not errors
    return set(entries.suffix) | set(entries.exact)


def decide(snap, url: str, device: DeviceContext, stage: Stage = Stage.RESPONSE):
    return snap.decide(query_for_url(url, device, stage=stage, now=NOW))


def test_example_config_loads_the_shipped_policy_mail_and_posture(cfg):
    assert cfg.policy_path == INSTALLED / "policies" / "example.yaml"
    # the path is the installed checkout: the same file as the one in this tree
    assert cfg.policy_path.relative_to(INSTALLED) == (ROOT / "policies" / "example.yaml").relative_to(ROOT)
    assert cfg.mail is not None and cfg.mail.policy_path == INSTALLED / "policies" / "mail.yaml"
    assert cfg.mail.organization_hosts and cfg.mail.starttls == "cut"
    assert dict(cfg.posture_min_os) == {"ios": "17.0", "android": "13"} and cfg.posture_quarantine_jailbroken


def test_quarantine_allow_hosts_are_the_remediation_list(cfg):
    # The gateway's quarantine gate (config) and the policy's DNS stage (list) must agree,
    # else a quarantined phone resolves a name and is then blocked, or the other way round.
    assert set(cfg.quarantine_allow_hosts) == {"." + h for h in remediation_entries()}


def test_quarantined_device_reaches_remediation_hosts_at_every_stage(snap):
    for host in sorted(remediation_entries()):
        for stage in (Stage.DNS, Stage.TLS, Stage.REQUEST, Stage.RESPONSE):
            v = decide(snap, f"https://{host}/", QUARANTINED, stage)
            assert (v.action, v.rule_id) == (Action.ALLOW, "quarantine-remediation"), (host, stage, v.explain)
        v = decide(snap, f"https://sub.{host}/x", QUARANTINED, Stage.DNS)
        assert v.action is Action.ALLOW, host


@pytest.mark.parametrize("url", ["https://www.example.com/", "https://accounts.google.com/",
                                 "https://www.youtube.com/", "https://portal.example.lg.jp/",
                                 "https://mesu.apple.com.evil.example/", "https://notmesu.apple.com/"])
def test_quarantined_device_reaches_nothing_else(snap, url):
    # accounts.google.com is tenant-restricted (a pass) for active devices; not in quarantine.
    for stage in (Stage.DNS, Stage.RESPONSE):
        v = decide(snap, url, QUARANTINED, stage)
        assert (v.action, v.rule_id) == (Action.BLOCK, "quarantined"), (url, stage, v.explain)


def test_storage_is_banned_for_every_device_not_only_byod(snap):
    byod = DeviceContext("d-b", frozenset(), "byod", platform="ios", os_version="18.1")
    for device in (ORG, byod):
        for url in ("https://www.dropbox.com/", "https://api.dropboxapi.com/2/files/list_folder",
                    "https://g.api.mega.co.nz/cs", "https://gigafile.nu/", "https://www.icloud.com/iclouddrive/"):
            v = decide(snap, url, device)
            assert v.action is Action.BLOCK and v.category == "storage", (device.ownership, url, v.explain)
    # the organization's tenant is not banned, it is tenant-restricted
    assert decide(snap, "https://drive.google.com/", ORG).action is Action.TENANT_RESTRICT
    assert decide(snap, "https://example-my.sharepoint.com/personal/x", ORG).action is Action.ALLOW


def test_old_os_byod_can_still_download_its_update(snap):
    assert decide(snap, "https://www.example.com/", BYOD_OLD).rule_id == "byod-old-os"
    v = decide(snap, "https://dl.google.com/android/ota/x.zip", BYOD_OLD)
    assert v.action is Action.ALLOW, v.explain


def test_every_shipped_list_entry_names_its_source():
    lists = sorted((ROOT / "policies" / "lists").glob("*.txt"))
    assert len(lists) >= 10
    for path in lists:
        text = path.read_text(encoding="utf-8")
        entries, errors = parse_list(text, path.stem, str(path))
        assert not errors, [str(e) for e in errors]
        assert len(entries) > 0, path.name
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if s and not s.startswith(("#", "!")):
                assert "# source:" in s, f"{path.name}:{n} has no source comment"


def test_every_list_file_is_used_by_the_example_policy(snap):
    text = (ROOT / "policies" / "example.yaml").read_text(encoding="utf-8")
    for path in (ROOT / "policies" / "lists").glob("*.txt"):
        assert f"lists/{path.name}" in text, f"{path.name} is shipped but example.yaml does not load it"
    assert all(count > 0 for count in snap.lists.values()), snap.lists
