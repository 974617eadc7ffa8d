"""`kanmon user ...`: operator commands for signed-in users (issue #9).

    kanmon user sessions --config C [--user U] [--all] [--json]
    kanmon user signout USER --config C [--reason TEXT]

A sign-out ends every live session of the user at once; the running gateway is poked
(SIGUSR1) and cuts the user's live connections, like a device revocation. With a PostgreSQL
registry the sessions are shared: every other node sees the sign-out at its next reconcile
tick (it polls the session revision) and cuts the user's connections too.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from datetime import UTC, datetime

from gateway.cli.common import EXIT_FAIL, EXIT_OK, add_config_argument, load_config_or_exit, operator_name
from gateway.i18n import Text
from gateway.registry.model import RegistryError
from gateway.signin.sessions import UserSession
from gateway.signin.store import open_session_store



def _store(args: argparse.Namespace):

    cfg = load_config_or_exit(args.config)
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return open_session_store(cfg), cfg


def _unreachable(exc: Exception) -> int:
    """The session store (the registry's SQLite file or PostgreSQL) refused: say why, change nothing."""
    text = getattr(exc, "text", None)
    if text is None:
        text = Text("セッションの保存先を使えません({e})。何も変更していません。",
                    "the session store cannot be used ({e}); nothing was changed.").format(e=exc)
    print(text.render(), file=sys.stderr)
    return EXIT_FAIL


def _as_dict(s: UserSession) -> dict:
    def ts(v):
        return v.isoformat() if v else None
    return {"session_id": s.session_id, "user": s.user, "device_id": s.device_id, "tunnel_ip": s.tunnel_ip,
            "email": s.email, "groups": sorted(s.groups), "amr": sorted(s.amr), "acr": s.acr, "mfa": s.mfa,
            "auth_time": ts(s.auth_time), "created_at": ts(s.created_at), "expires_at": ts(s.expires_at),
            "ended_at": ts(s.ended_at), "end_reason": s.end_reason}


def cmd_sessions(args: argparse.Namespace) -> int:
    try:
        store, _ = _store(args)
    except (sqlite3.OperationalError, RegistryError) as exc:
        return _unreachable(exc)
    try:
        if args.user:
            sessions = store.of_user(args.user)
            if not args.all:
                now = datetime.now(UTC)
                sessions = [s for s in sessions if s.valid(now)]
        else:
            sessions = store.active()
    except (sqlite3.OperationalError, RegistryError) as exc:
        return _unreachable(exc)
    finally:
        store.close()
    if args.json:
        for s in sessions:
            print(json.dumps(_as_dict(s), ensure_ascii=False))
        return EXIT_OK
    if not sessions:
        print(Text("有効なセッションはありません", "no sessions").render())
        return EXIT_OK
    for s in sessions:
        state = "active" if s.ended_at is None else f"ended ({s.end_reason})"
        print(f"{s.user}\t{s.device_id}\t{s.tunnel_ip}\tmfa={'yes' if s.mfa else 'no'}\t"
              f"until {s.expires_at.isoformat() if s.expires_at else '-'}\t{state}")
    return EXIT_OK


def cmd_signout(args: argparse.Namespace) -> int:
    from gateway.runtime.gatewayprocess import poke_reconcile

    try:
        store, cfg = _store(args)
    except (sqlite3.OperationalError, RegistryError) as exc:
        return _unreachable(exc)
    try:
        ended = store.end(user=args.user, reason=args.reason or "signed out by an operator", actor=operator_name())
    except (sqlite3.OperationalError, RegistryError) as exc:
        text = getattr(exc, "text", None) or Text("セッションを終了できませんでした({e})。何も変更していません。",
                                                  "could not end the sessions ({e}); nothing was changed.").format(e=exc)
        print(text.render(), file=sys.stderr)
        return EXIT_FAIL
    finally:
        store.close()
    if not ended:
        print(Text("利用者 {u} の有効なセッションはありません", "user {u} has no active session").format(u=args.user).render(),
              file=sys.stderr)
        return EXIT_FAIL
    poked = poke_reconcile(cfg.pid_path)
    for s in ended:
        print(Text("サインアウトしました: {u} (端末 {d})", "signed out: {u} (device {d})").format(u=s.user, d=s.device_id).render())
    if not poked:
        print(Text("ゲートウェイは動いていません。次の起動時に反映されます。",
                   "no gateway is running here; it applies this when it starts.").render(), file=sys.stderr)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    user = sub.add_parser("user", help="signed-in users (OIDC sign-in) / サインインした利用者")
    usub = user.add_subparsers(dest="user_command", required=True)

    sessions = usub.add_parser("sessions", help="list sessions (default: the active ones)")
    add_config_argument(sessions)
    sessions.add_argument("--user", help="only this user")
    sessions.add_argument("--all", action="store_true", help="with --user: ended and expired sessions too")
    sessions.add_argument("--json", action="store_true")
    sessions.set_defaults(func=cmd_sessions)

    signout = usub.add_parser("signout", help="end every session of a user now (live connections are cut)")
    signout.add_argument("user")
    add_config_argument(signout)
    signout.add_argument("--reason", help="why (audit log)")
    signout.set_defaults(func=cmd_signout)
