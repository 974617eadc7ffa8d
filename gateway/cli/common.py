"""What every `kanmon` command group shares: exit codes, loading the configuration (or
exiting with every error in both languages), bilingual messages, the operator's name for
the audit log."""

from __future__ import annotations

import getpass
import os
import sys

from gateway.i18n import Text

# 0: done; 1: refused or a check failed (the state, not the input); 2: bad input or usage.
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def load_config_or_exit(path: str):
    """Parse and validate the config; on any problem print every error (file:line: key:
    message) in both languages and exit 2 before anything on the host is touched."""
    from gateway.config import load_config
    from gateway.yamlsource import SourceErrors

    try:
        return load_config(path)
    except SourceErrors as exc:
        print(Text("設定ファイルに誤りがあります。ホストには何も変更していません:",
                   "The configuration is invalid; nothing on the host was changed:").render(), file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


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
