"""`kanmon policy apply PATH --config C`: compile the policy here first (a broken file is
refused with file:line and nothing changes), point the gateway at it, and ask the running
gateway to swap (SIGHUP). Waits until the gateway reports the new version in force."""

from __future__ import annotations

import argparse
import sys

from gateway.cli.common import add_config_argument, load_config_or_exit, operator_name
from gateway.runtime.policyapply import ApplyOutcome, apply_policy


def print_apply_outcome(outcome: ApplyOutcome) -> int:
    """The outcome of gateway/runtime/policyapply.py (shared with the console, issue #21) on
    the terminal: success on standard output, anything else on standard error."""
    stream = sys.stdout if outcome.applied else sys.stderr
    print(outcome.text.render(), file=stream)
    for err in outcome.errors:
        print(f"  {err}", file=stream)
    return outcome.code


def cmd_apply(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config)
    # Several nodes (registry.url): apply_policy publishes through the shared registry.
    return print_apply_outcome(apply_policy(cfg, args.path, operator_name(), args.timeout))


def register_apply(policy_sub) -> None:
    apply = policy_sub.add_parser("apply", help="compile a policy and swap it into the running gateway / ポリシーを適用")
    apply.add_argument("path")
    add_config_argument(apply, help="gateway configuration (state directory)")
    apply.add_argument("--timeout", type=float, default=15.0)
    apply.set_defaults(func=cmd_apply)
