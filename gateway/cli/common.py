"""What every `kanmon` command group shares: exit codes, loading the configuration (or
exiting with every error in both languages), bilingual messages, the operator's name for
the audit log."""

from __future__ import annotations

import getpass
import os
import sys

from gateway.i18n import Text

# The one exit-code convention of every `kanmon` command (issue #19), printed in `--help`:
# 0: done, nothing found; 1: a finding or a refusal (the state, not the input: tampering found,
# a check failed, no such device, the gateway refused); 2: bad input or usage (a file that is
# missing or invalid -- a policy or config with errors is bad input everywhere --, a bad
# argument or option value).
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

EXIT_CODES = Text(
    "終了コード:\n"
    "  0  正常（問題なし）\n"
    "  1  検出または拒否（改ざんの検出、検査の不合格、端末がない、失効した端末、ゲートウェイが拒否）\n"
    "  2  入力または使い方の誤り（ファイルがない・読めない、誤りのあるポリシーや設定、不正な引数）",
    "exit codes:\n"
    "  0  ok, nothing found\n"
    "  1  a finding or a refusal (tampering found, a check failed, no such device, a revoked device,\n"
    "     the gateway refused)\n"
    "  2  bad input or usage (a missing or unreadable file, a policy or config with errors, a bad argument)")

# The default of every `--config` option: `KANMON_CONFIG=/etc/kanmon/kanmon.yaml kanmon device list`.
CONFIG_ENV = "KANMON_CONFIG"
NO_CONFIG = Text("設定ファイルを --config か環境変数 KANMON_CONFIG で指定してください",
                 "give the configuration file with --config or the KANMON_CONFIG environment variable")


def add_config_argument(parser, required: bool = True, help: str = "gateway configuration") -> None:
    """`--config FILE`, defaulting to $KANMON_CONFIG; required only when that is unset."""
    default = os.environ.get(CONFIG_ENV) or None
    parser.add_argument("--config", default=default, required=required and default is None,
                        help=f"{help} (default: ${CONFIG_ENV})")


def load_config_or_exit(path: str):
    """Parse and validate the config; on any problem print every error (file:line: key:
    message) in both languages and exit 2 before anything on the host is touched."""
    from gateway.config import load_config
    from gateway.yamlsource import SourceErrors, UnreadableSource

    if not path:
        raise SystemExit(error(NO_CONFIG))
    try:
        return load_config(path)
    except UnreadableSource as exc:  # missing, a directory, unreadable: say so, not "invalid"
        print(Text("設定ファイルを読めません。ホストには何も変更していません:",
                   "Cannot read the configuration file; nothing on the host was changed:").render(), file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    except SourceErrors as exc:
        print(Text("設定ファイルに誤りがあります。ホストには何も変更していません:",
                   "The configuration is invalid; nothing on the host was changed:").render(), file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def os_reason(exc: OSError) -> Text:
    """Why a file could not be read or written, in both languages (Python's strerror is
    English only): "file not found", "permission denied", ..."""
    if isinstance(exc, FileNotFoundError):
        return Text("ファイルがありません", "file not found")
    if isinstance(exc, PermissionError):
        return Text("権限がありません", "permission denied")
    if isinstance(exc, IsADirectoryError):
        return Text("ディレクトリです（ファイルを指定してください）", "is a directory (give a file)")
    if isinstance(exc, NotADirectoryError):
        return Text("途中がディレクトリではありません", "a part of the path is not a directory")
    reason = exc.strerror or type(exc).__name__
    return Text(reason, reason)


def cannot_read(path: object, exc: OSError) -> Text:
    """"cannot read file: PATH: file not found", in both languages."""
    reason = os_reason(exc)
    return Text(f"ファイルを読めません: {path}: {reason.ja}", f"cannot read file: {path}: {reason.en}")


NO_SUCH_DEVICE = Text("端末がありません: {d}", "No such device: {d}")


def error(text: Text) -> int:
    """Print a bilingual error on stderr; the usage exit code, to return."""
    print(text.render(), file=sys.stderr)
    return EXIT_USAGE


def say(text: Text) -> None:
    """Print a bilingual message on stdout (flushed: long commands report progress)."""
    print(text.render(), flush=True)


def operator_name() -> str:
    """Who is acting, for the audit log: the invoking user behind sudo if any."""
    return os.environ.get("SUDO_USER") or getpass.getuser()
