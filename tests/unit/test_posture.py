"""Posture rules: version comparison, assessment, automatic quarantine/release that never
touches an operator's quarantine, a suspension or a revocation; the config keys."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.config import load_config_text
from gateway.posture import (POSTURE_REASON_PREFIX, PosturePolicy, VersionError, apply_posture, assess,
                             parse_version, version_at_least)
from gateway.registry.model import DeviceRecord, DeviceStatus
from gateway.yamlsource import SourceErrors

POLICY = PosturePolicy.from_pairs([("iOS", "17.0"), ("android", "13")])


def rec(**kw) -> DeviceRecord:
    return DeviceRecord("dev-1", "k", ipaddress.IPv4Address("10.77.0.2"), **kw)


@pytest.mark.parametrize("version, minimum, ok", [
    ("17.4.1", "17.10", False),      # numeric, not lexical
    ("17.10", "17.4.1", True),
    ("17", "17.0", True),            # trailing zeros do not matter
    ("17.0.0", "17", True),
    ("16.7.10", "17.0", False),
    ("13", "13", True),
    ("14 (QKQ1.200830.002)", "13", True),   # vendor suffixes are ignored
    ("17.4 (21E219)", "17.4.1", False),
    ("v18.1", "18", True),
])
def test_version_comparison(version, minimum, ok):
    assert version_at_least(version, minimum) is ok


def test_unreadable_version():
    with pytest.raises(VersionError):
        parse_version("beta")
    result = assess(POLICY, "ios", "beta", False)
    assert not result.compliant and "cannot read" in result.reason.en


def test_assessment():
    assert assess(POLICY, "iOS", "17.4.1", False).compliant
    assert assess(POLICY, "windows", "1.0", False).compliant          # no minimum for the platform
    assert assess(POLICY, "ios", None, False).compliant               # not reported: nothing to judge
    old = assess(POLICY, "ios", "16.7", False)
    assert not old.compliant and "16.7" in old.reason.ja and "17.0" in old.reason.en
    both = assess(POLICY, "android", "12", True)
    assert len(both.problems) == 2 and "jailbroken" in both.reason.en
    lenient = PosturePolicy.from_pairs([], quarantine_jailbroken=False)
    assert assess(lenient, "android", "4", True).compliant


def test_non_compliant_active_device_is_quarantined_with_bilingual_reason():
    out = apply_posture(POLICY, rec(platform="ios", os_version="16.1"))
    assert out.action == "device-quarantined" and out.record.status is DeviceStatus.QUARANTINED
    reason = out.record.status_reason
    assert reason.startswith(POSTURE_REASON_PREFIX) and "より古い" in reason and "older than" in reason


def test_compliant_posture_quarantine_is_released_but_operator_quarantine_is_not():
    quarantined = apply_posture(POLICY, rec(platform="ios", os_version="16.1")).record
    from dataclasses import replace
    released = apply_posture(POLICY, replace(quarantined, os_version="17.2"))
    assert released.action == "device-released" and released.record.status is DeviceStatus.ACTIVE
    assert released.record.status_reason == ""
    operator = rec(platform="ios", os_version="17.2", status=DeviceStatus.QUARANTINED, status_reason="malware")
    out = apply_posture(POLICY, operator)
    assert out.action is None and out.record == operator


@pytest.mark.parametrize("status", [DeviceStatus.SUSPENDED, DeviceStatus.REVOKED])
def test_stricter_statuses_are_left_alone(status):
    r = rec(platform="ios", os_version="12", status=status, status_reason="x")
    out = apply_posture(POLICY, r)
    assert out.record == r and out.action is None and not out.assessment.compliant


def test_reason_refreshed_when_posture_changes_but_stays_bad():
    first = apply_posture(POLICY, rec(platform="ios", os_version="16.1")).record
    from dataclasses import replace
    out = apply_posture(POLICY, replace(first, jailbroken=True))
    assert out.record.status is DeviceStatus.QUARANTINED and "jailbroken" in out.record.status_reason
    assert apply_posture(POLICY, out.record).action is None     # idempotent


BASE = """
state_dir: /tmp/x
tunnel: {interface: wg0, listen_port: 51820, ipv4_prefix: 10.77.0.0/24}
uplink: {interface: eth0}
"""


def test_config_keys():
    cfg = load_config_text(BASE + 'posture: {min_os: {iOS: "17.4", android: 13}, quarantine_jailbroken: false}\n'
                           'enrollment: {listen: "0.0.0.0:8443", rate_per_minute: 2, burst: 3}\n')
    assert dict(cfg.posture_min_os) == {"ios": "17.4", "android": "13"}
    assert cfg.posture_quarantine_jailbroken is False
    assert (cfg.enrollment_host, cfg.enrollment_port, cfg.enrollment_rate_per_minute, cfg.enrollment_burst) == \
        ("0.0.0.0", 8443, 2.0, 3)
    plain = load_config_text(BASE)
    assert plain.enrollment_host is None and plain.posture_min_os == ()


@pytest.mark.parametrize("extra, message", [
    ("posture: {min_os: {ios: 17.10}}\n", "write the version in quotes"),
    ('posture: {min_os: {ios: "latest"}}\n', "not a version number"),
    ('enrollment: {listen: "nowhere"}\n', "must be ADDRESS:PORT"),
    ('enrollment: {listen: "0.0.0.0:8080"}\n', "port already used"),
    ('enrollment: {listen: "0.0.0.0:8443", server_cert_file: a.pem}\n', "go together"),
])
def test_config_errors_name_line_and_key(extra, message):
    with pytest.raises(SourceErrors) as exc:
        load_config_text(BASE + extra, "kanmon.yaml")
    text = "\n".join(str(e) for e in exc.value.errors)
    assert message in text and "kanmon.yaml:5:" in text
