"""The expectation file of a replay: which outcome each flow of a capture must have.

```yaml
# tests/replay/expect.yaml
max_bypass: 0                 # packets allowed to reach the internet around the proxy (default 0)
flows:
  http-blocked: {outcome: blocked, rule: lab-block-blocked-test}
  http-allowed: {outcome: allowed, status: 200}
  dns-https-ech: {outcome: allowed, ech_stripped: true}
  quic-initial: {outcome: refused, why: "UDP 443 rejected so clients fall back to TCP"}
```

Flow names are the capture's `flow=NAME` comments, or the computed names `kanmon replay
--list` prints for a capture without them. Every flow of the capture needs an expectation
and every expectation a flow: a capture that drifted from its expectations fails.

Outcomes (what the device saw, confirmed by the gateway's logs where it writes any):
- `allowed`  HTTP answered by the origin (no `X-Kanmon-Rule`), TLS handshake answered with
             no block record, DNS answered NOERROR;
- `blocked`  the block page (`X-Kanmon-Rule`), or a `proxy`/`conn` record with a block verdict
             for the flow (TLS blocked at SNI: the proxy still answers the ClientHello);
- `reset`    the connection was reset with nothing else to say;
- `nxdomain` DNS answered NXDOMAIN;
- `refused`  connection refused, ICMP port-unreachable (QUIC), or DNS REFUSED;
- `dropped`  nothing came back (and, per the bypass check, nothing went out);
- `answered` a packet-level flow got a reply from the gateway itself (e.g. the proxy's
             SYN-ACK to a SYN carrying data) — said apart from `allowed` because no
             request was judged.
`rule` (optional) is the rule id that must have decided; `status` the HTTP status.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.yamlsource import SourceErrors, load_yaml_file, load_yaml_text, schema_errors

OUTCOMES = ("allowed", "blocked", "reset", "nxdomain", "refused", "dropped", "answered")

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["flows"],
    "properties": {
        "max_bypass": {"type": "integer", "minimum": 0},
        "description": {"type": "string"},
        "flows": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["outcome"],
                "properties": {
                    "outcome": {"enum": list(OUTCOMES)},
                    "rule": {"type": ["string", "null"]},
                    "status": {"type": "integer", "minimum": 100, "maximum": 599},
                    "ech_stripped": {"type": "boolean"},
                    "why": {"type": "string"},
                },
            },
        },
    },
}

_MISSING = object()


@dataclass(frozen=True)
class Expectation:
    flow: str
    outcome: str
    rule: object = _MISSING   # str | None when given (None: "no rule decided"), else unchecked
    status: int | None = None
    ech_stripped: bool | None = None
    why: str | None = None
    line: int = 0

    @property
    def checks_rule(self) -> bool:
        return self.rule is not _MISSING


@dataclass(frozen=True)
class ExpectationSet:
    filename: str
    flows: dict[str, Expectation]
    max_bypass: int = 0


def _build(doc) -> ExpectationSet:
    errors = schema_errors(doc, SCHEMA)
    if errors:
        raise SourceErrors(errors)
    data = doc.data
    flows = {}
    for name, spec in data["flows"].items():
        flows[str(name)] = Expectation(
            flow=str(name), outcome=spec["outcome"], rule=spec.get("rule", _MISSING), status=spec.get("status"),
            ech_stripped=spec.get("ech_stripped"), why=spec.get("why"), line=doc.line_of(("flows", name)))
    return ExpectationSet(doc.filename, flows, data.get("max_bypass", 0))


def load_expectations(path: str | Path) -> ExpectationSet:
    """Raises SourceErrors (each `file:line: key: message`)."""
    doc = load_yaml_file(path)
    if not isinstance(doc.data, dict):
        raise SourceErrors([doc.error((), "expected a mapping with a 'flows' key")])
    return _build(doc)


def parse_expectations(text: str, filename: str = "<string>") -> ExpectationSet:
    doc = load_yaml_text(text, filename)
    if not isinstance(doc.data, dict):
        raise SourceErrors([doc.error((), "expected a mapping with a 'flows' key")])
    return _build(doc)
