"""What a decision says: the action, the rule that made it, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Action(StrEnum):
    ALLOW = "allow"
    BLOCK = "block"
    MONITOR = "monitor"            # allow, but log and count
    NO_INSPECT = "no-inspect"      # decide on SNI only, never intercept TLS
    TENANT_RESTRICT = "tenant-restrict"  # allow with tenant-restriction headers injected


PASSING_ACTIONS = frozenset({Action.ALLOW, Action.MONITOR, Action.NO_INSPECT, Action.TENANT_RESTRICT})


class Stage(StrEnum):
    CONNECT = "connect"        # client connection accepted (device identity)
    DNS = "dns"
    TLS = "tls"                # ClientHello / SNI
    REQUEST = "http-request"
    RESPONSE = "http-response"
    TCP = "tcp"                # raw TCP (non-HTTP) flows
    UPSTREAM = "upstream"      # opening a server connection


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule_id: str | None
    explain: str
    stage: Stage
    # Extra request headers for tenant-restrict (name, value); replaces client copies.
    headers: tuple[tuple[str, str], ...] = field(default=())
    # Free-form category for metrics/reports (e.g. "webmail", "storage"); bounded set.
    category: str | None = None

    @property
    def passes(self) -> bool:
        return self.action in PASSING_ACTIONS

    def as_dict(self) -> dict[str, object]:
        return {
            "verdict": str(self.action),
            "rule": self.rule_id,
            "explain": self.explain,
            "stage": str(self.stage),
            "category": self.category,
        }


# Stages whose verdict holds for the whole client connection (not one request of it).
CONNECTION_STAGES = frozenset({Stage.CONNECT, Stage.TLS, Stage.TCP})


def strictest(held: Verdict | None, new: Verdict) -> Verdict:
    """The verdict that stands when a later stage (or addon) decides again on the same
    flow: a block already reached stands (with its own rule and reason; a later pass never
    loosens it); otherwise the newer, better-informed verdict stands. The one rule by which
    verdicts combine (README, "identify or deny")."""
    if held is not None and not held.passes:
        return held
    return new


# Rule ids used by the gateway itself (not operator rules).
RULE_FAIL_CLOSED = "kanmon:fail-closed"
RULE_UNKNOWN_DEVICE = "kanmon:unknown-device"
# The policy engine's "this stage cannot decide yet; let the flow go on to the stage that
# can" (an ALLOW that is not final). Never a final answer.
RULE_NO_DECISION = "kanmon:no-decision"
# The enforcer's fail-closed answer when a flow reaches it with no verdict at all (a BLOCK).
RULE_UNDECIDED = "kanmon:undecided"
RULE_INTERNAL_DESTINATION = "kanmon:internal-destination"
RULE_QUARANTINE = "kanmon:quarantine"
RULE_SIGNIN_REQUIRED = "kanmon:signin-required"   # issue #9: the device has no signed-in user
RULE_SIGNIN_PORTAL = "kanmon:signin-portal"       # the gateway's own sign-in pages
# Issue #14, "identify or deny": why a connection or request was refused before any rule.
RULE_UNIDENTIFIED_PROTOCOL = "kanmon:unidentified-protocol"   # neither TLS nor HTTP, no rule names the destination
RULE_MALFORMED_AUTHORITY = "kanmon:malformed-authority"       # Host / :authority / absolute target unparsable
RULE_AUTHORITY_MISMATCH = "kanmon:authority-mismatch"         # absolute target, :authority and Host disagree
RULE_NO_INSPECT_UNRESOLVED = "kanmon:no-inspect-unresolved"   # no-inspect SNI to an address our DNS did not give
RULE_INFECTED = "kanmon:infected"                           # issue #18: the virus scanner found a signature (the "infected" page)
RULE_SCAN_TOO_LARGE = "kanmon:scan-too-large"               # a risky download above scan.max_bytes, on_too_large: block
RULE_SCAN_UNAVAILABLE = "kanmon:scan-unavailable"           # no answer from clamd, on_unavailable: block (a "fault" page, 503)
RULE_DNS_BYPASS = "kanmon:dns-bypass"                         # DoT or DoH around the gateway's resolver
