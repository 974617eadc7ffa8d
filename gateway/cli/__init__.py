"""`kanmon` command line: the top of the house. Each command group is a module of this package
exposing `register(subparsers)`; they share gateway/cli/common.py (config loading, exit codes,
bilingual errors, operator name). `python -m gateway.cli` runs it too (gateway/cli/__main__.py)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import re
import sys

from gateway.cli.common import CONFIG_ENV, EXIT_CODES, EXIT_USAGE, add_config_argument, load_config_or_exit
from gateway.i18n import Text

# Command group -> the module that adds it (`register(subparsers)`). Only the group being run
# is imported: `kanmon device revoke` must not pay for matplotlib or the mail engine (a lost
# phone is cut off when the command has run, so its start-up time counts).
COMMAND_MODULES = {
    "device": "gateway.cli.device",
    "demo": "gateway.cli.demo",
    "mail": "gateway.cli.mail",
    "logs": "gateway.cli.logs",
    "ca": "gateway.cli.ca",
    "report": "gateway.cli.report",
    "replay": "gateway.cli.replay",
    "cluster": "gateway.cli.cluster",
    "user": "gateway.cli.user",
    "registry": "gateway.cli.registry",
    "lists": "gateway.cli.lists",
    "console": "gateway.cli.console",   # issue #21
}

def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("mitmproxy", "hpack", "passlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config)
    if os.geteuid() != 0:
        print(Text("kanmon run には root 権限 (CAP_NET_ADMIN) が必要です。",
                   "kanmon run needs root (CAP_NET_ADMIN).").render(), file=sys.stderr)
        return EXIT_USAGE
    from gateway.runtime import allocator

    try:
        chosen = allocator.ensure()  # may restart this process with jemalloc preloaded
    except allocator.AllocatorError as exc:
        print(Text("メモリアロケータの設定を満たせません: {e}", "The allocator setting cannot be met: {e}")
              .format(e=exc).render(), file=sys.stderr)
        return EXIT_USAGE
    if chosen.warning:
        logging.getLogger("kanmon.allocator").warning("%s", chosen.warning)
    import sqlite3

    from gateway.runtime.app import GatewayApp
    from gateway.runtime.errors import StartupError
    from gateway.registry.model import RegistryError
    from gateway.registry.postgres import RegistryUnavailable

    try:
        return asyncio.run(GatewayApp(cfg).run())
    except StartupError as exc:
        print(Text("起動に失敗しました: {e}", "Start-up failed: {e}").format(e=exc).render(), file=sys.stderr)
        return 1
    except RegistryUnavailable as exc:
        print(exc.text.render(), file=sys.stderr)
        return 1
    except (sqlite3.DatabaseError, RegistryError) as exc:
        # Fail closed: without a readable allowlist no device is admitted; tell the operator
        # what to do instead of printing a traceback.
        print(Text("端末レジストリ {p} を読めません ({e})。バックアップから復元してください。ゲートウェイは起動していません。",
                   "The device registry {p} is unreadable ({e}); restore it from a backup. The gateway did not start.")
              .format(p=cfg.registry_path, e=exc).render(), file=sys.stderr)
        return 2


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config)
    print(Text("設定は有効です: {p}", "Configuration is valid: {p}").format(p=cfg.source).render())
    return 0


ENVIRONMENT = Text(
    "環境変数:\n"
    f"  {CONFIG_ENV}   --config の既定値（例 /etc/kanmon/kanmon.yaml）\n"
    "  KANMON_LANG     メッセージの言語: ja、en、both（既定）",
    "environment:\n"
    f"  {CONFIG_ENV}   the default of --config (e.g. /etc/kanmon/kanmon.yaml)\n"
    "  KANMON_LANG     language of the messages: ja, en or both (default)")


class KanmonParser(argparse.ArgumentParser):
    """argparse with a bilingual heading on usage errors (its own detail stays English) and
    the exit-code convention in every help page."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(Text(f"引数が正しくありません: {_argparse_ja(message)}", f"bad arguments: {message}").render(), file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


# argparse's messages (English, no Japanese catalogue ships with Python), in Japanese: the
# ones an operator meets. Anything else keeps argparse's English after the Japanese heading.
_ARGPARSE_JA = (
    (re.compile(r"the following arguments are required: (.*)"), "次の引数が必要です: {0}"),
    (re.compile(r"one of the arguments (.*) is required"), "次のどれかの引数が必要です: {0}"),
    (re.compile(r"unrecognized arguments: (.*)"), "知らない引数です: {0}"),
    (re.compile(r"argument (\S+): invalid choice: (.*) \(choose from (.*)\)"), "引数 {0}: 選べない値です: {1}（選べるのは {2}）"),
    (re.compile(r"argument (\S+): invalid (int|float) value: (.*)"), "引数 {0}: 数値ではありません: {2}"),
    (re.compile(r"argument (\S+): expected one argument"), "引数 {0} には値が 1 つ必要です"),
    (re.compile(r"argument (\S+): not allowed with argument (.*)"), "引数 {0} は {1} と一緒に使えません"),
)


def _argparse_ja(message: str) -> str:
    for pattern, ja in _ARGPARSE_JA:
        match = pattern.fullmatch(message)
        if match:
            return ja.format(*match.groups())
    return message


def _with_exit_codes(parser: argparse.ArgumentParser) -> None:
    """The exit-code convention as the epilog of this parser and of every group below it."""
    parser.epilog = EXIT_CODES.render()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:  # argparse has no public walk over sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _with_exit_codes(child)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = KanmonParser(prog="kanmon", description="Kanmon (関門) network-edge enforcement gateway")
    parser.add_argument("--log-level", default=os.environ.get("KANMON_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the gateway in the foreground (systemd runs this)")
    add_config_argument(run)
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="configuration file tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a gateway configuration file")
    check.add_argument("config", nargs="?", default=os.environ.get(CONFIG_ENV) or None,
                       help=f"gateway configuration (default: ${CONFIG_ENV})")
    check.set_defaults(func=cmd_config_check)

    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    wanted = words[0] if words else None
    if wanted in (None, "policy") or wanted not in COMMAND_MODULES:
        from gateway.cli.policy import register as register_policy
        from gateway.cli.policy import register_diff_pcap
        from gateway.cli.policyapply import register_apply

        policy_sub = register_policy(sub)
        register_apply(policy_sub)
        register_diff_pcap(policy_sub.choices["diff"])
    for group, module in COMMAND_MODULES.items():
        if wanted in (None, group) or wanted not in COMMAND_MODULES and wanted != "policy":
            importlib.import_module(module).register(sub)
    _with_exit_codes(parser)
    parser.epilog += "\n\n" + ENVIRONMENT.render()
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _configure_logging(args.log_level)
    try:
        return args.func(args)
    except Exception as exc:
        import sqlite3

        from gateway.registry.model import RegistryDamaged
        if isinstance(exc, RegistryDamaged):
            print(exc.text.render(), file=sys.stderr)   # damaged registry: refused, nothing written over it
        elif isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            print(Text("データベースが壊れています ({e})。`kanmon registry check` で診断し、バックアップから復元してください。",
                       "a database is corrupt ({e}); diagnose it with `kanmon registry check` and restore it from a "
                       "backup.").format(e=exc).render(), file=sys.stderr)
        else:
            raise
        return EXIT_USAGE

