"""JSON schema of a policy file. Structural checks only; meaning (CIDRs, regexes, list
and tenant references, dates) is checked in model.py so every error still names its line."""

from __future__ import annotations

from typing import Any

from gateway.policy.tenants import PROVIDERS

ACTIONS = ["allow", "block", "monitor", "no-inspect", "tenant-restrict"]
DEFAULT_ACTIONS = ["allow", "block", "monitor"]
NO_SNI_CHOICES = ["allow", "block", "monitor", "no-inspect", "rules"]
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _str_or_list(item: dict[str, Any] | None = None) -> dict[str, Any]:
    item = item or {"type": "string", "minLength": 1}
    return {"oneOf": [item, {"type": "array", "items": item, "minItems": 1}]}


_PORT = {"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535}, {"type": "string", "pattern": r"^[0-9]{1,5}(-[0-9]{1,5})?$"}]}
_TIME_WINDOW = {
    "type": "object",
    "additionalProperties": False,
    "required": ["from", "to"],
    "properties": {
        "days": {"type": "array", "items": {"enum": DAYS + ["weekdays", "weekend", "all"]}, "minItems": 1},
        "from": {"type": "string", "pattern": r"^([01][0-9]|2[0-3]):[0-5][0-9]$"},
        "to": {"type": "string", "pattern": r"^([01][0-9]|2[0-4]):[0-5][0-9]$"},
    },
}

CONDITIONS: dict[str, Any] = {
    # device
    "device_group": _str_or_list(),
    "ownership": {"enum": ["org", "byod"]},
    "device_id": _str_or_list(),
    "user": _str_or_list(),
    "device_status": _str_or_list(),
    # signed-in user (OIDC sign-in, issue #9)
    "signed_in": {"type": "boolean"},
    "user_group": _str_or_list(),
    "amr": _str_or_list(),
    "acr": _str_or_list(),
    "mfa": {"type": "boolean"},
    "mfa_within": {"oneOf": [{"type": "integer", "minimum": 1},
                             {"type": "string", "pattern": r"^\s*[0-9]+\s*[smhd]\s*$"}]},
    # posture
    "platform": _str_or_list(),
    "os_version_below": {"type": "object", "minProperties": 1, "additionalProperties": {"type": ["string", "number"]}},
    "jailbroken": {"type": "boolean"},
    "underlay_network": _str_or_list(),
    # host
    "domain": _str_or_list(),
    "domain_exact": _str_or_list(),
    "list": _str_or_list(),
    # url
    "url": _str_or_list(),
    "url_regex": _str_or_list(),
    "scheme": _str_or_list(),
    "method": _str_or_list(),
    # destination
    "dst_cidr": _str_or_list(),
    "dst_port": {"oneOf": [_PORT, {"type": "array", "items": _PORT, "minItems": 1}]},
    "protocol": {"enum": ["tcp", "udp"]},
    "system": _str_or_list(),
    "system_class": {"type": "string", "pattern": r"^\s*(<=|>=|==|<|>|=)?\s*[1-3]\s*$"},
    # content
    "request_content_type": _str_or_list(),
    "response_content_type": _str_or_list(),
    "file_extension": _str_or_list(),
    "body_size_over": {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^\s*[0-9]+\s*([kKmMgG]i?[bB]?|[bB])?\s*$"}]},
    # time
    "time": {"oneOf": [_TIME_WINDOW, {"type": "array", "items": _TIME_WINDOW, "minItems": 1}]},
}

_CONDITION_BLOCK = {"type": "object", "additionalProperties": False, "properties": CONDITIONS}

_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "action"],
    "properties": {
        "id": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"},
        "description": {"type": "string"},
        # issue #19: the block page's staff message (description: English, description_ja:
        # Japanese) and the approved alternative (an http(s) URL)
        "description_ja": {"type": "string"},
        "alternative": {"type": "string", "maxLength": 2048},
        "reason": {"type": "string"},
        "owner": {"type": "string"},
        "expires": {},  # a YAML date; checked in model.py
        "status": {"enum": ["active", "retired"]},
        "category": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]*$"},
        "action": {"enum": ACTIONS},
        "tenant": {"type": "string"},
        "dns_block": {"enum": ["nxdomain", "sinkhole"]},
        "match": _CONDITION_BLOCK,
        "unless": _CONDITION_BLOCK,
    },
}

_APPLIES_TO = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {k: CONDITIONS[k] for k in ("device_group", "ownership", "device_id", "user", "platform", "device_status",
                                             "signed_in", "user_group", "mfa")},
}

POLICY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["version"],
    "properties": {
        "version": {"const": 1},
        "settings": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "default_action": {"enum": DEFAULT_ACTIONS},
                # An IANA name (Asia/Tokyo, UTC, Etc/GMT+9): bounded, no path tricks (issue #15:
                # 5,000 characters used to reach the file system as one file name).
                "timezone": {"type": "string", "maxLength": 64, "pattern": r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$"},
                "no_sni": {"enum": NO_SNI_CHOICES},
                "dns_block": {"enum": ["nxdomain", "sinkhole"]},
            },
        },
        "lists": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "file": {"type": "string"},
                    "format": {"enum": ["auto", "domains", "hosts", "abp", "ut1"]},
                    "match": {"enum": ["suffix", "exact"]},
                    "description": {"type": "string"},
                    # A category feed (issue #17, gateway/feeds): url instead of file.
                    "url": {"type": "string", "maxLength": 2048, "pattern": r"^(https?://[^\s]+|/[^\s]*|\.{0,2}[^\s:]+)$"},
                    "categories": {"type": "array", "minItems": 1, "maxItems": 200,
                                   "items": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_-]{0,63}$"}},
                    "refresh": {"type": ["string", "integer"]},
                    "timeout": {"type": ["string", "integer"]},
                    "max_bytes": {"type": "integer", "minimum": 1, "maximum": 512 * 1024 * 1024},
                    "sha256": {"type": "string", "pattern": r"^[0-9a-fA-F]{64}$"},
                    "public_key": {"type": "string", "maxLength": 100},
                    "signature_url": {"type": "string", "maxLength": 2048, "pattern": r"^(https?://[^\s]+|/[^\s]*|\.{0,2}[^\s:]+)$"},
                    "max_shrink": {"type": "number", "minimum": 0, "maximum": 1},
                    "accept_public_suffixes": {"type": "array", "items": {"type": "string", "maxLength": 253}},
                    "allow": {"type": "array", "items": {
                        "type": "object", "additionalProperties": False, "required": ["host", "reason", "expires"],
                        "properties": {"host": {"type": "string", "maxLength": 253}, "reason": {"type": "string"},
                                       "expires": {}}}},
                },
            },
        },
        "systems": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["class"],
                "properties": {
                    "class": {"enum": [1, 2, 3]},
                    "hosts": {"type": "array", "items": {"type": "string"}},
                    "cidrs": {"type": "array", "items": {"type": "string"}},
                    "description": {"type": "string"},
                    "owner": {"type": "string"},
                },
            },
        },
        "tenants": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "required": ["provider"],
                "properties": {
                    "provider": {"enum": list(PROVIDERS)},
                    "description": {"type": "string"},
                    "allowed_domains": {"type": "array", "items": {"type": "string"}},
                    "tenants": {"type": "array", "items": {"type": "string"}},
                    "context": {"type": "string"},
                    "tenant_policy": {"type": "string", "pattern": r"^[^:\s]+:[^:\s]+$"},
                    "restrict_msa": {"type": "boolean"},
                    "workspaces": {"type": "array", "items": {"type": "string"}},
                    "requester": {"type": "string"},
                    "team_ids": {"type": "array", "items": {"type": "string"}},
                    "mode": {"enum": ["strict", "moderate"]},
                },
            },
        },
        "rule_groups": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "rules"],
                "properties": {
                    "name": {"type": "string"},
                    "description": {"type": "string"},
                    "applies_to": _APPLIES_TO,
                    "rules": {"type": "array", "items": _RULE},
                },
            },
        },
        "rules": {"type": "array", "items": _RULE},
        # issue #19: per category (a rule's `category`), what the block page tells staff
        "categories": {
            "type": "object",
            "propertyNames": {"pattern": r"^[a-z0-9][a-z0-9_-]*$"},
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "description": {"type": "string", "minLength": 1},
                    "description_ja": {"type": "string", "minLength": 1},
                    "alternative": {"type": "string", "maxLength": 2048},
                },
            },
        },
    },
}
