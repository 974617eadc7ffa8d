"""`kanmon mail ...`: the operator's tools for the mail filter.

    kanmon mail scan FILE.eml [--policy PATH] [--json] [--clamd SOCKET|HOST:PORT] [--no-virus-scan] [--no-dns]
    kanmon mail quarantine list --dir DIR
    kanmon mail quarantine show ID --dir DIR [--raw]
    kanmon mail quarantine release ID --dir DIR [--out FILE|-]
    kanmon mail quarantine delete ID --dir DIR

Exit codes: 0 ok (scan: verdict deliver), 1 check failed (scan: any other verdict),
2 usage or input error (unreadable file, bad policy, not a mail message).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.cli.common import cannot_read, error
from gateway.i18n import Text
from gateway.mail.clamd import ClamdScanner
from gateway.mail.engine import MailContext, MailVerdict, evaluate_message
from gateway.mail.indicators import MailAction, visible
from gateway.mail.message import MalformedMessage
from gateway.mail.policy import MailPolicy, load_mail_policy
from gateway.mail.quarantine import QuarantineError, QuarantineStore
from gateway.yamlsource import SourceErrors

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "policies" / "mail.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    mail = subparsers.add_parser("mail", help="mail filter tools / メールフィルタの操作")
    sub = mail.add_subparsers(dest="mail_command", required=True)

    scan = sub.add_parser("scan", help="judge one message / メール 1 通を判定")
    scan.add_argument("file", metavar="FILE.eml")
    scan.add_argument("--policy", default=str(DEFAULT_POLICY), help="mail policy YAML")
    scan.add_argument("--json", action="store_true", help="print one JSON object")
    scan.add_argument("--clamd", help="clamd unix socket path or HOST:PORT (default: policy clamd)")
    scan.add_argument("--no-virus-scan", action="store_true", help="skip the clamd scan")
    scan.add_argument("--no-dns", action="store_true", help="do not look up DKIM keys (skip local DKIM check)")
    scan.add_argument("--rcpt", action="append", default=[], metavar="ADDRESS",
                      help="judge as outgoing mail (SMTP submission) to this envelope recipient, Bcc included; "
                           "repeat for several (outbound guard, issue #20)")
    scan.set_defaults(func=scan_command)

    quarantine = sub.add_parser("quarantine", help="quarantined messages / 隔離メール")
    qsub = quarantine.add_subparsers(dest="quarantine_command", required=True)
    for name, func, needs_id in (("list", quarantine_list, False), ("show", quarantine_show, True),
                                 ("release", quarantine_release, True), ("delete", quarantine_delete, True)):
        p = qsub.add_parser(name)
        if needs_id:
            p.add_argument("id", metavar="ID")
        p.add_argument("--dir", required=True, help="quarantine directory")
        if name == "show":
            p.add_argument("--raw", action="store_true", help="print the original message bytes")
        if name == "release":
            p.add_argument("--out", default="-", help="where to write the released message (default: stdout)")
        p.set_defaults(func=func)


def _scanner(args: argparse.Namespace, policy: MailPolicy):
    if args.no_virus_scan:
        return None
    if args.clamd:
        if args.clamd.startswith("/") or ":" not in args.clamd:
            return ClamdScanner.unix(args.clamd)
        host, _, port = args.clamd.rpartition(":")
        return ClamdScanner.tcp(host, int(port)) if port.isdigit() else ClamdScanner.unix(args.clamd)
    if policy.clamd:
        c = policy.clamd
        return ClamdScanner(c.socket, c.host, c.port, c.timeout_seconds)
    return None


def scan_command(args: argparse.Namespace) -> int:
    try:
        policy = load_mail_policy(args.policy)
    except SourceErrors as exc:
        return error(Text("メールポリシーに誤りがあります:\n" + str(exc), "the mail policy has errors:\n" + str(exc)))
    try:
        raw = Path(args.file).read_bytes()
    except OSError as exc:
        return error(cannot_read(args.file, exc))
    dns_txt = None
    if not args.no_dns:
        from gateway.mail.dns_lookup import resolver_txt
        dns_txt = resolver_txt
    try:
        context = MailContext("outbound", rcpt_to=tuple(args.rcpt)) if args.rcpt else MailContext()
        verdict = evaluate_message(raw, policy, context, scanner=_scanner(args, policy), dns_txt=dns_txt)
    except MalformedMessage as exc:
        return error(Text(f"{args.file}: 判定できません: {exc.text.ja}", f"{args.file}: cannot judge: {exc.text.en}"))
    if args.json:
        print(json.dumps(verdict.as_dict(), ensure_ascii=False))
    else:
        print(format_verdict(verdict))
    return 0 if verdict.action == MailAction.DELIVER else 1


def format_verdict(verdict: MailVerdict) -> str:
    lines = [Text(f"判定: {verdict.action} (スコア {verdict.score})",
                  f"verdict: {verdict.action} (score {verdict.score})").render()]
    if not verdict.indicators:
        lines.append(Text("  検出した特徴はありません", "  no indicator fired").render())
    for ind in verdict.indicators:
        lines.append(f"  - {ind.name} ({ind.weight})")
        for line in ind.evidence.render().splitlines():
            lines.append(f"      {line}")
    for note in verdict.notes:
        lines.append(Text(f"  注: {note.ja}", f"  note: {note.en}").render())
    return "\n".join(lines)


def quarantine_list(args: argparse.Namespace) -> int:
    store = QuarantineStore(args.dir)
    try:
        entries = store.list()
    except (QuarantineError, OSError) as exc:
        return _quarantine_error(exc)
    if not entries and not store.damaged:
        print(Text("隔離メールはありません", "no quarantined messages").render())
    for e in entries:
        m = e.meta
        print(f"{e.id}\t{m.get('verdict')}\t{m.get('score')}\t{visible(m.get('from', ''), 60)}\t{visible(m.get('subject', ''), 60)}")
    for _entry_id, text in store.damaged:      # named, the others still listed (issue #15)
        print(text.render(), file=sys.stderr)
    return 1 if store.damaged else 0


def quarantine_show(args: argparse.Namespace) -> int:
    store = QuarantineStore(args.dir)
    try:
        if args.raw:
            sys.stdout.buffer.write(store.read(args.id))
            sys.stdout.flush()
            return 0
        entry = store.show(args.id)
    except (QuarantineError, OSError) as exc:
        return _quarantine_error(exc)
    m = entry.meta
    print(f"id: {entry.id}")
    for key in ("received", "verdict", "score", "from", "subject", "size", "sha256"):
        print(f"{key}: {visible(str(m.get(key, '')))}")
    for ind in m.get("indicators", []):
        print(f"  - {ind.get('name')} ({ind.get('weight')})")
        print(f"      {Text(str(ind.get('evidence_ja', '')), str(ind.get('evidence', ''))).render()}".replace("\n", "\n      "))
    return 0


def quarantine_release(args: argparse.Namespace) -> int:
    store = QuarantineStore(args.dir)

    def deliver(raw: bytes) -> None:
        if args.out == "-":
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
        else:
            out = Path(args.out)
            if out.exists():
                raise FileExistsError(f"{out} exists")
            tmp = out.with_name(out.name + ".part")
            tmp.write_bytes(raw)
            tmp.rename(out)

    try:
        store.release(args.id, deliver)
    except (QuarantineError, OSError) as exc:
        return _quarantine_error(exc)
    print(Text(f"{args.id} を解放しました", f"released {args.id}").render(), file=sys.stderr)
    return 0


def quarantine_delete(args: argparse.Namespace) -> int:
    try:
        QuarantineStore(args.dir).delete(args.id)
    except (QuarantineError, OSError) as exc:
        return _quarantine_error(exc)
    print(Text(f"{args.id} を削除しました", f"deleted {args.id}").render())
    return 0


def _quarantine_error(exc: Exception) -> int:
    if isinstance(exc, QuarantineError):
        return error(exc.text)
    return error(Text(f"隔離ディレクトリの操作に失敗しました: {exc}", f"quarantine directory operation failed: {exc}"))
