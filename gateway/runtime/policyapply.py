"""Applying a policy: the one code path of `kanmon policy apply` and the console's policy page
(issue #21). Compile it here first with the gateway's feed copies (a broken file is refused
with file:line and nothing changes), record who applied what in the registry's audit trail
(the gateway ships it into the tamper-evident audit stream, as it does device changes), then
point the gateway at it and ask the running gateway to swap (SIGHUP), waiting until it
reports the new version in force or refuses it (the old policy then keeps serving).

Several nodes (a shared registry): the policy is published through the registry, every node
loads it, and this waits until every node reporting recently runs it."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.i18n import Text
from gateway.policy import load_policy
from gateway.registry.model import AuditEntry
from gateway.runtime.gatewayprocess import poke_reconcile, running_gateway_pid
from gateway.yamlsource import SourceErrors, UnreadableSource

ACTION = "policy-apply"

T_UNREADABLE = Text("ポリシーファイルを読めません。適用していません:", "Cannot read the policy file; nothing was applied:")
T_INVALID = Text("ポリシーに誤りがあります。適用していません:", "The policy is invalid; nothing was applied:")
T_NOT_RUNNING = Text("適用しました (ゲートウェイは停止中。次回起動時に使われます): {v}",
                     "Applied (the gateway is not running; it will use it at its next start): {v}")
T_APPLIED = Text("適用しました。バージョン {v} が有効です。", "Applied: version {v} is in force.")
T_REFUSED = Text("ゲートウェイが拒否しました。以前のポリシーが有効のままです:",
                 "The gateway refused it; the previous policy stays in force:")
T_TIMEOUT = Text("ゲートウェイの応答がありません ({t} 秒)", "No answer from the gateway within {t} s")
T_AUDIT_FAILED = Text("監査記録を書けないため適用していません: {e}", "Nothing was applied: the audit entry cannot be written: {e}")
T_CLUSTER_APPLIED = Text("全ノード ({n} 台) でバージョン {v} が有効です。", "version {v} is in force on all {n} nodes.")
T_CLUSTER_LAGGING = Text("保存しましたが、次のノードはまだ切り替わっていません: {l}",
                         "stored, but these nodes have not switched yet: {l}")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2      # gateway/cli/common.py's convention


@dataclass(frozen=True)
class ApplyOutcome:
    """``code``: the CLI's exit code (0 applied, 1 refused or no answer, 2 bad input)."""

    code: int
    kind: str        # applied, stored, unreadable, invalid, audit-failed, refused, timeout, lagging, registry
    text: Text
    errors: tuple[str, ...] = ()
    version: str | None = None

    @property
    def applied(self) -> bool:
        return self.code == EXIT_OK


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def policy_in_force(cfg: Any) -> tuple[Path | None, dict]:
    """(the policy file the gateway is pointed at, what the gateway last reported about it:
    ``{"result", "version", "path", "errors"}``, empty when it has not run)."""
    return cfg.active_policy_path(), _status(cfg.policy_status_path)


def apply_policy(cfg: Any, path: str | Path, actor: str, timeout: float = 15.0,
                 open_registry: Callable[[Any], Any] | None = None) -> ApplyOutcome:
    from gateway.registry.factory import open_registry as default_open, registry_url_of
    opener = open_registry or default_open
    if registry_url_of(cfg):
        return _apply_cluster(cfg, path, actor, timeout, opener)
    path = Path(path).resolve()
    try:
        snapshot = load_policy(path, feeds_dir=cfg.state_dir / "feeds")  # the gateway's last good feed copies
    except SourceErrors as exc:
        unreadable = isinstance(exc, UnreadableSource)   # missing, not a regular file, too large
        return ApplyOutcome(EXIT_USAGE, "unreadable" if unreadable else "invalid",
                            T_UNREADABLE if unreadable else T_INVALID, tuple(str(e) for e in exc.errors))
    before_path, before = policy_in_force(cfg)
    audit = AuditEntry(actor, ACTION, f"version {snapshot.version} ({path}); was {before.get('version') or '-'} "
                                      f"({before_path or '-'})")
    try:
        registry = opener(cfg)
        try:
            registry.append_audit(audit)
        finally:
            close = getattr(registry, "close", None)
            if close is not None:
                close()
    except Exception as exc:  # noqa: BLE001 - no audit entry, no change (fail closed)
        return ApplyOutcome(EXIT_FAIL, "audit-failed", T_AUDIT_FAILED.format(e=exc), version=snapshot.version)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    link = cfg.applied_policy_link
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path)
    os.replace(tmp, link)  # atomic: the gateway sees the old or the new pointer, never none

    pid = running_gateway_pid(cfg.pid_path)
    if pid is None:
        return ApplyOutcome(EXIT_OK, "stored", T_NOT_RUNNING.format(v=snapshot.version), version=snapshot.version)
    os.kill(pid, signal.SIGHUP)
    poke_reconcile(cfg.pid_path)   # the gateway ships registry audit entries on a reconcile pass: now
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(cfg.policy_status_path)
        if status.get("path") == str(path) and status.get("version") == snapshot.version and status.get("result") == "success":
            return ApplyOutcome(EXIT_OK, "applied", T_APPLIED.format(v=snapshot.version), version=snapshot.version)
        if status.get("result") == "failure" and status.get("path") == str(path):
            return ApplyOutcome(EXIT_FAIL, "refused", T_REFUSED, tuple(status.get("errors", [])), snapshot.version)
        time.sleep(0.05)
    return ApplyOutcome(EXIT_FAIL, "timeout", T_TIMEOUT.format(t=timeout), version=snapshot.version)


def _apply_cluster(cfg: Any, path: str | Path, actor: str, timeout: float, opener: Callable[[Any], Any]) -> ApplyOutcome:
    """Compile, store in the registry and make current; every node loads it (NOTIFY). Waits
    until every node reporting recently runs this version."""
    from gateway.registry.factory import registry_url_of
    from gateway.registry.postgres import PolicyError, PolicyStore, RegistryUnavailable
    from gateway.runtime.clusternode import STALE_SECONDS
    try:
        version = PolicyStore(registry_url_of(cfg)).publish(Path(path).resolve(), actor=actor, node=cfg.node_name)
    except SourceErrors as exc:
        return ApplyOutcome(EXIT_USAGE, "invalid", T_INVALID, tuple(str(e) for e in exc.errors))
    except (PolicyError, RegistryUnavailable) as exc:
        return ApplyOutcome(EXIT_FAIL, "registry", exc.text)
    deadline = time.monotonic() + timeout
    reg = opener(cfg)          # url is set: the shared PostgreSQL registry
    lagging: list[str] = []
    while time.monotonic() < deadline:
        live = [n for n in reg.nodes() if (n.age_seconds or 0) <= STALE_SECONDS]
        lagging = [n.name for n in live if n.policy_version != version]
        if not lagging:
            return ApplyOutcome(EXIT_OK, "applied", T_CLUSTER_APPLIED.format(v=version, n=len(live)), version=version)
        time.sleep(0.1)
    return ApplyOutcome(EXIT_FAIL, "lagging", T_CLUSTER_LAGGING.format(l=", ".join(lagging)), version=version)
