"""Tenant-restriction headers per cloud provider, built once at compile time.

The providers' own documentation defines these headers; the gateway injects them on the
provider's login/API hosts (the rule's match says which) and replaces any copy the client
sent. Field names below are the policy's ``tenants.<name>`` keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.i18n import Text

Headers = tuple[tuple[str, str], ...]

PROVIDERS = ("google", "microsoft", "slack", "dropbox", "youtube")

# Every header name any provider uses, so the addon can strip client-sent copies.
ALL_TENANT_HEADERS = frozenset(
    {
        "x-googapps-allowed-domains",
        "restrict-access-to-tenants",
        "restrict-access-context",
        "sec-restrict-tenant-access-policy",
        "x-slack-allowed-workspaces",
        "x-slack-allowed-workspaces-requester",
        "x-dropbox-allowed-team-ids",
        "youtube-restrict",
    }
)


def tenant_headers(spec: Mapping[str, Any]) -> tuple[Headers, list[tuple[str, Text]]]:
    """Headers for one tenant entry, plus (key, message) problems found in it."""
    provider = spec.get("provider")
    problems: list[tuple[str, Text]] = []
    out: list[tuple[str, str]] = []

    def need(key: str) -> Any:
        value = spec.get(key)
        if value in (None, "", []):
            problems.append((key, Text(f"プロバイダ {provider} には必要です", f"required for provider {provider}")))
        return value

    if provider == "google":
        # Google Workspace: only accounts of these domains may sign in.
        domains = need("allowed_domains")
        if domains:
            out.append(("X-GoogApps-Allowed-Domains", ",".join(domains)))
    elif provider == "microsoft":
        # Tenant restrictions v1 (tenant list + the directory that set the policy) and/or
        # v2 (tenant id:policy id), or "restrict-msa" to block consumer Microsoft accounts.
        tenants, context = spec.get("tenants"), spec.get("context")
        policy, msa = spec.get("tenant_policy"), spec.get("restrict_msa", False)
        if tenants or context:
            if not tenants:
                problems.append(("tenants", Text("v1 の制限には context と一緒に tenants が必要です",
                                                  "v1 restriction needs tenants together with context")))
            if not context:
                problems.append(("context", Text("v1 の制限には tenants と一緒に context(ディレクトリ ID)が必要です",
                                                  "v1 restriction needs context (the directory id) together with tenants")))
            if tenants and context:
                out.append(("Restrict-Access-To-Tenants", ",".join(tenants)))
                out.append(("Restrict-Access-Context", context))
        if policy and msa:
            problems.append(("restrict_msa", Text(
                "restrict_msa と tenant_policy はどちらも sec-Restrict-Tenant-Access-Policy を設定します。テナントを 2 つ、"
                "ルールを 2 つに分けてください(login.live.com には restrict-msa)",
                "restrict_msa and tenant_policy both set sec-Restrict-Tenant-Access-Policy; use two tenant entries and "
                "two rules (login.live.com gets restrict-msa)")))
        elif policy:
            out.append(("sec-Restrict-Tenant-Access-Policy", policy))
        elif msa:
            out.append(("sec-Restrict-Tenant-Access-Policy", "restrict-msa"))
        if not out and not problems:
            problems.append(("provider", Text("microsoft のテナントには tenants+context、tenant_policy か restrict_msa が必要です",
                                               "microsoft tenant needs tenants+context, tenant_policy or restrict_msa")))
    elif provider == "slack":
        workspaces = need("workspaces")
        requester = need("requester")
        if workspaces and requester:
            out.append(("X-Slack-Allowed-Workspaces", ",".join(workspaces)))
            out.append(("X-Slack-Allowed-Workspaces-Requester", requester))
    elif provider == "dropbox":
        teams = need("team_ids")
        if teams:
            out.append(("X-Dropbox-allowed-Team-Ids", ",".join(teams)))
    elif provider == "youtube":
        mode = spec.get("mode", "strict")
        out.append(("YouTube-Restrict", "Strict" if mode == "strict" else "Moderate"))
    else:
        problems.append(("provider", Text(f"知らないプロバイダです: {provider!r}(使えるのは {', '.join(PROVIDERS)})",
                                           f"unknown provider {provider!r} (known: {', '.join(PROVIDERS)})")))
    return tuple(out), problems
