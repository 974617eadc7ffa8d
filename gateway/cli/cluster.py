"""`kanmon cluster ...`: the nodes sharing one PostgreSQL registry (status), device status
changes that a node queues in its local outbox while the registry is unreachable, and the
cluster-wide policy apply (issue #8; the rules are in gateway/runtime/clusternode.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from datetime import datetime

from gateway.cli.common import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, NO_SUCH_DEVICE, add_config_argument, load_config_or_exit,
                                operator_name)
from gateway.runtime.clusternode import STALE_SECONDS
from gateway.i18n import Text
from gateway.registry.factory import open_registry, outbox_path, registry_url_of
from gateway.registry.model import AuditEntry, DeviceStatus
from gateway.registry.outbox import QUEUEABLE, LocalOutbox

def _config(args):
    return load_config_or_exit(args.config)


def _url_or_error(cfg) -> str | None:
    url = registry_url_of(cfg)
    if url is None:
        print(Text("共有の端末登録データベースが設定されていません (registry.url または KANMON_REGISTRY_URL)。",
                   "No shared registry is configured (registry.url or KANMON_REGISTRY_URL).").render(), file=sys.stderr)
    return url


def node_rows(nodes, current_policy: str | None, now_revision: int | None) -> list[dict]:
    """Pure: the status table, one dict per node, with what is wrong with it."""
    rows = []
    for n in nodes:
        problems = []
        if n.age_seconds is not None and n.age_seconds > STALE_SECONDS:
            problems.append("stale")
        if current_policy is not None and n.policy_version != current_policy:
            problems.append("policy-differs")
        if not n.details.get("registry_up", True):
            problems.append("registry-down")
        rows.append({"name": n.name, "version": n.version, "policy_version": n.policy_version, "peers": n.peers,
                     "registry_revision": n.registry_revision, "cluster_revision": now_revision,
                     "last_reconcile_at": n.last_reconcile_at.isoformat() if n.last_reconcile_at else None,
                     "reported_seconds_ago": round(n.age_seconds, 1) if n.age_seconds is not None else None,
                     "endpoint": n.details.get("endpoint"), "outbox_pending": n.details.get("outbox_pending", 0),
                     "state": ",".join(problems) or "ok"})
    return rows


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.registry.postgres import PolicyStore, RegistryUnavailable
    cfg = _config(args)
    url = _url_or_error(cfg)
    if url is None:
        return EXIT_USAGE
    try:
        reg = open_registry(cfg)          # url is set: the shared PostgreSQL registry
        nodes, revision = reg.nodes(), reg.revision()
        current = PolicyStore(url).current()
    except RegistryUnavailable as exc:
        print(exc.text.render(), file=sys.stderr)
        return EXIT_FAIL
    rows = node_rows(nodes, current.version_id if current else None, revision)
    if args.json:
        print(json.dumps({"registry_revision": revision, "policy_version": current.version_id if current else None,
                          "nodes": rows}, ensure_ascii=False, indent=2))
    else:
        print(Text("登録リビジョン {r} / クラスタのポリシー {p}", "registry revision {r} / cluster policy {p}")
              .format(r=revision, p=current.version_id if current else "-").render())
        print(f"{'NODE':<12} {'VERSION':<8} {'POLICY':<17} {'PEERS':>5} {'REV':>6} {'SEEN':>6}  STATE")
        for r in rows:
            print(f"{r['name']:<12} {r['version']:<8} {(r['policy_version'] or '-'):<17} {r['peers']:>5} "
                  f"{r['registry_revision'] if r['registry_revision'] is not None else '-':>6} "
                  f"{r['reported_seconds_ago']:>5}s  {r['state']}")
    return EXIT_OK if rows and all(r["state"] == "ok" for r in rows) else EXIT_FAIL


def queue_status_change(cfg, device_id: str, status: DeviceStatus, reason: str, actor: str,
                        until: datetime | None = None) -> int:
    """Queue a restrictive change in the node's local outbox (registry unreachable)."""
    outbox = LocalOutbox(outbox_path(cfg))
    try:
        return outbox.queue(device_id, status, reason, actor, cfg.node_name, until)
    finally:
        outbox.close()


def _status_command(status: DeviceStatus):
    def handler(args: argparse.Namespace) -> int:
        from gateway.runtime.gatewayprocess import poke_reconcile
        from gateway.registry.postgres import RegistryUnavailable
        cfg = _config(args)
        url = _url_or_error(cfg)
        if url is None:
            return EXIT_USAGE
        until = datetime.fromisoformat(args.until) if getattr(args, "until", None) else None
        try:
            reg = open_registry(cfg)          # url is set: the shared PostgreSQL registry
            rec = reg.get(args.id)
            if rec is None:
                print(NO_SUCH_DEVICE.format(d=args.id).render(), file=sys.stderr)
                return EXIT_FAIL
            if rec.status is DeviceStatus.REVOKED:
                print(Text("既に失効しています: {d}", "already revoked: {d}").format(d=args.id).render())
                return EXIT_OK
            reg.update(replace(rec, status=status, status_reason=args.reason, suspended_until=until),
                       audit=AuditEntry(operator_name(), QUEUEABLE[status], args.reason))
            print(f"{rec.device_id} {status}")
        except RegistryUnavailable as exc:
            cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            seq = queue_status_change(cfg, args.id, status, args.reason, operator_name(), until)
            print(exc.text.render(), file=sys.stderr)
            print(Text("この変更 ({s}: {d}) はこのノードに保存しました (#{n})。このノードでは直ちに適用し、"
                       "データベースの復旧後に全ノードへ反映します。",
                       "This change ({s}: {d}) is queued on this node (#{n}): applied here at once, and on "
                       "every node when the registry is back.").format(s=status, d=args.id, n=seq).render(), file=sys.stderr)
            poke_reconcile(cfg.pid_path)
            return EXIT_FAIL
        poke_reconcile(cfg.pid_path)
        return EXIT_OK
    return handler


def cmd_policy_apply(args: argparse.Namespace) -> int:
    """Compile, store in the registry and make current; every node loads it (NOTIFY). Waits
    until every node reporting recently runs this version (gateway/runtime/policyapply.py)."""
    from gateway.cli.policyapply import print_apply_outcome
    from gateway.runtime.policyapply import apply_policy
    cfg = _config(args)
    url = _url_or_error(cfg)
    if url is None:
        return EXIT_USAGE
    return print_apply_outcome(apply_policy(cfg, args.path, operator_name(), args.timeout))


def register(sub: argparse._SubParsersAction) -> None:
    cluster = sub.add_parser("cluster", help="several nodes on one registry / 複数ノード構成")
    csub = cluster.add_subparsers(dest="cluster_command", required=True)
    status = csub.add_parser("status", help="every node's version, policy, peers, last reconcile")
    add_config_argument(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    for name, st in (("revoke", DeviceStatus.REVOKED), ("suspend", DeviceStatus.SUSPENDED),
                     ("quarantine", DeviceStatus.QUARANTINED)):
        p = csub.add_parser(name, help=f"{name} a device; queued on this node while the registry is unreachable")
        p.add_argument("id")
        add_config_argument(p)
        p.add_argument("--reason", required=True)
        if st is DeviceStatus.SUSPENDED:
            p.add_argument("--until")
        p.set_defaults(func=_status_command(st))
    apply = csub.add_parser("policy-apply", help="store a policy in the registry; every node loads it")
    apply.add_argument("path")
    add_config_argument(apply)
    apply.add_argument("--timeout", type=float, default=15.0)
    apply.set_defaults(func=cmd_policy_apply)
