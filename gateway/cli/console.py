"""`kanmon console serve --config FILE`: the operator console (issue #21, gateway/console/).

Runs in the foreground until stopped (systemd/kanmon-console.service); exit 1 with a
bilingual message when it cannot start (no console: section, no organization CA, port taken).
"""

from __future__ import annotations

import argparse

from gateway.cli.common import EXIT_FAIL, EXIT_OK, add_config_argument, error, load_config_or_exit


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.console.serve import ConsoleStartError, serve

    cfg = load_config_or_exit(args.config)
    try:
        serve(cfg)
    except ConsoleStartError as exc:
        error(exc.text)
        return EXIT_FAIL
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    console = sub.add_parser("console", help="the operator console (web) / 管理コンソール")
    csub = console.add_subparsers(dest="console_command", required=True)
    serve = csub.add_parser("serve", help="serve the console over HTTPS on console.listen / "
                                          "console.listen で HTTPS のコンソールを提供(docs/CONSOLE.md)")
    add_config_argument(serve, help="gateway configuration (the console: section; its IdP in console.oidc:, else signin:) / "
                                    "設定ファイル(console: セクション。IdP は console.oidc:、なければ signin:)")
    serve.set_defaults(func=cmd_serve)
