"""`kanmon policy apply PATH --config C`: compile the policy here first (a broken file is
refused with file:line and nothing changes), point the gateway at it, and ask the running
gateway to swap (SIGHUP). Waits until the gateway reports the new version in force."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from gateway.runtime.gatewayprocess import running_gateway_pid
from gateway.cli.common import EXIT_FAIL, EXIT_USAGE, add_config_argument, load_config_or_exit
from gateway.i18n import Text
from gateway.policy import load_policy
from gateway.yamlsource import SourceErrors, UnreadableSource


def cmd_apply(args: argparse.Namespace) -> int:

    cfg = load_config_or_exit(args.config)
    from gateway.cli.cluster import cmd_policy_apply
    from gateway.registry.factory import registry_url_of
    if registry_url_of(cfg):
        return cmd_policy_apply(args)  # several nodes: the policy goes through the shared registry
    path = Path(args.path).resolve()
    try:
        snapshot = load_policy(path, feeds_dir=cfg.state_dir / "feeds")  # the gateway's last good feed copies
    except SourceErrors as exc:
        if isinstance(exc, UnreadableSource):  # missing, not a regular file, too large: an input error
            print(Text("ポリシーファイルを読めません。適用していません:", "Cannot read the policy file; nothing was applied:").render(),
                  file=sys.stderr)
        else:
            print(Text("ポリシーに誤りがあります。適用していません:", "The policy is invalid; nothing was applied:").render(), file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return EXIT_USAGE   # unreadable or with errors: bad input, as in `policy check` and `policy test`
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    link = cfg.applied_policy_link
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path)
    os.replace(tmp, link)  # atomic: the gateway sees the old or the new pointer, never none

    pid = running_gateway_pid(cfg.pid_path)
    if pid is None:
        print(Text("適用しました (ゲートウェイは停止中。次回起動時に使われます): {v}",
                   "Applied (the gateway is not running; it will use it at its next start): {v}")
              .format(v=snapshot.version).render())
        return 0
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = _status(cfg.policy_status_path)
        if status.get("path") == str(path) and status.get("version") == snapshot.version and status.get("result") == "success":
            print(Text("適用しました。バージョン {v} が有効です。", "Applied: version {v} is in force.").format(v=snapshot.version).render())
            return 0
        if status.get("result") == "failure" and status.get("path") == str(path):
            print(Text("ゲートウェイが拒否しました。以前のポリシーが有効のままです:",
                       "The gateway refused it; the previous policy stays in force:").render(), file=sys.stderr)
            for err in status.get("errors", []):
                print(f"  {err}", file=sys.stderr)
            return EXIT_FAIL   # refused by the gateway: a refusal, not bad input
        time.sleep(0.05)
    print(Text("ゲートウェイの応答がありません ({t} 秒)", "No answer from the gateway within {t} s").format(t=args.timeout).render(),
          file=sys.stderr)
    return EXIT_FAIL


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def register_apply(policy_sub) -> None:
    apply = policy_sub.add_parser("apply", help="compile a policy and swap it into the running gateway / ポリシーを適用")
    apply.add_argument("path")
    add_config_argument(apply, help="gateway configuration (state directory)")
    apply.add_argument("--timeout", type=float, default=15.0)
    apply.set_defaults(func=cmd_apply)
