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
