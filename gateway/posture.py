"""Device posture: is the reported platform / OS version / jailbreak flag acceptable, and
what does that mean for the device's status? Pure: no I/O, no globals.

NISC smartphone guide 5.3 (keep the OS up to date, no jailbroken/rooted devices) and IPA SME
sample 技術的対策 (OS updates) are what this enforces: an out-of-date or jailbroken device is
quarantined automatically (it stays connected but may reach only remediation destinations)
and released automatically once it reports a compliant posture again — but only when the
quarantine was made by this module. An operator's quarantine is never lifted here.

Posture quarantines are recognised by the `POSTURE_REASON_PREFIX` at the start of
`status_reason`; operators cannot write a reason with that prefix (gateway/cli/device.py refuses it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from gateway.i18n import Text
from gateway.registry.model import DeviceRecord, DeviceStatus

POSTURE_REASON_PREFIX = "[posture] "

# Leading dotted numbers of a version string. Vendors add suffixes ("17.4 (21E219)",
# "13 QKQ1.200830.002", "14.0-beta"), which PEP 440 parsers (packaging.version) reject, so
# we read the numeric prefix ourselves: that is all an OS-version floor needs.
_VERSION_RE = re.compile(r"^\s*v?(\d+(?:\.\d+)*)")


class VersionError(ValueError):
    pass


def parse_version(text: str) -> tuple[int, ...]:
    """'17.4.1' -> (17, 4, 1); trailing zeros dropped so that '17' == '17.0' == '17.0.0'."""
    match = _VERSION_RE.match(text or "")
    if not match:
        raise VersionError(f"not a version number: {text!r}")
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def version_at_least(version: str, minimum: str) -> bool:
    """Numeric, component-wise: 17.10 > 17.4.1 > 17.4 == 17.4.0."""
    return parse_version(version) >= parse_version(minimum)


def normalize_platform(platform: str | None) -> str | None:
    """Platform names compare case-insensitively ('iOS' == 'ios'); blanks mean unknown."""
    if platform is None:
        return None
    value = platform.strip().lower()
    return value or None


@dataclass(frozen=True)
class PosturePolicy:
    min_os: Mapping[str, str]            # normalized platform -> minimum version text
    quarantine_jailbroken: bool = True

    @classmethod
    def from_pairs(cls, pairs, quarantine_jailbroken: bool = True) -> "PosturePolicy":
        return cls({normalize_platform(p): v for p, v in pairs}, quarantine_jailbroken)


@dataclass(frozen=True)
class PostureAssessment:
    compliant: bool
    problems: tuple[Text, ...] = ()

    @property
    def reason(self) -> Text:
        """One bilingual line for status_reason (without the posture prefix)."""
        return Text("; ".join(p.ja for p in self.problems), "; ".join(p.en for p in self.problems))


def assess(policy: PosturePolicy, platform: str | None, os_version: str | None,
           jailbroken: bool) -> PostureAssessment:
    """A platform without a configured minimum has no version requirement; a version that
    was not reported is not judged (nothing to judge yet); a version that was reported but
    cannot be read, for a platform with a minimum, is non-compliant (it cannot be shown to
    be up to date)."""
    problems: list[Text] = []
    if jailbroken and policy.quarantine_jailbroken:
        problems.append(Text("脱獄(root 化)された端末です", "the device is jailbroken (rooted)"))
    key = normalize_platform(platform)
    minimum = policy.min_os.get(key) if key else None
    if minimum is not None and os_version is not None and os_version.strip():
        try:
            ok = version_at_least(os_version, minimum)
        except VersionError:
            problems.append(Text(f"{platform} の OS バージョン {os_version!r} を読み取れません(最低 {minimum})",
                                 f"cannot read the {platform} OS version {os_version!r} (minimum {minimum})"))
        else:
            if not ok:
                problems.append(Text(f"{platform} {os_version} は最低バージョン {minimum} より古い OS です",
                                     f"{platform} {os_version} is older than the minimum {minimum}"))
    return PostureAssessment(not problems, tuple(problems))


def is_posture_quarantine(record: DeviceRecord) -> bool:
    return record.status is DeviceStatus.QUARANTINED and record.status_reason.startswith(POSTURE_REASON_PREFIX)


def posture_reason(assessment: PostureAssessment) -> str:
    """status_reason of a posture quarantine: Japanese and English on one line."""
    text = assessment.reason
    return f"{POSTURE_REASON_PREFIX}{text.ja} / {text.en}"


@dataclass(frozen=True)
class PostureOutcome:
    record: DeviceRecord
    action: str | None          # audit action: "device-quarantined", "device-released" or None
    assessment: PostureAssessment


def apply_posture(policy: PosturePolicy, record: DeviceRecord) -> PostureOutcome:
    """The record with its status brought in line with its (already updated) posture.

    * non-compliant and active -> quarantined, reason says why (prefix marks it as ours);
    * non-compliant and already posture-quarantined -> reason refreshed;
    * compliant and posture-quarantined -> active again;
    * an operator's quarantine, a suspension or a revocation is never changed here
      (they are stricter than, or independent of, posture)."""
    result = assess(policy, record.platform, record.os_version, record.jailbroken)
    if not result.compliant:
        if record.status is DeviceStatus.ACTIVE:
            return PostureOutcome(replace(record, status=DeviceStatus.QUARANTINED,
                                          status_reason=posture_reason(result)), "device-quarantined", result)
        if is_posture_quarantine(record) and record.status_reason != posture_reason(result):
            return PostureOutcome(replace(record, status_reason=posture_reason(result)), "device-quarantined", result)
        return PostureOutcome(record, None, result)
    if is_posture_quarantine(record):
        return PostureOutcome(replace(record, status=DeviceStatus.ACTIVE, status_reason=""), "device-released", result)
    return PostureOutcome(record, None, result)
