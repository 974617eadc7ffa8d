"""Policy language and compiled engine (issue 4). Pure except loader.load_policy.

    snapshot = load_policy("policies/example.yaml")      # SourceErrors on any problem
    verdict = snapshot.decide(PolicyQuery(stage=..., device=..., host=..., url=...))

See LANGUAGE.md in this directory for the language.
"""

from gateway.policy.compiler import compile_text
from gateway.policy.connection_table import ConnectionTable
from gateway.policy.loader import load_policy
from gateway.policy.query import DeviceContext, PolicyQuery, normalize_host, query_for_url
from gateway.policy.snapshot import RULE_NO_SNI, PolicySnapshot, RuleInfo, is_deferred
from gateway.policy.tenants import ALL_TENANT_HEADERS

__all__ = [
    "ALL_TENANT_HEADERS",
    "ConnectionTable",
    "DeviceContext",
    "PolicyQuery",
    "PolicySnapshot",
    "RULE_NO_SNI",
    "RuleInfo",
    "compile_text",
    "is_deferred",
    "load_policy",
    "normalize_host",
    "query_for_url",
]
