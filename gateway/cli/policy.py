"""Operator commands: ``kanmon policy check|test|diff``. The lead's cli.py calls
``register(subparsers)``; every handler returns the exit code of the
convention in gateway/cli/common.py (0 ok, 1 a finding or refusal, 2 bad input: a policy
with errors is bad input in check, test, diff and apply alike). ``policy apply`` and
``test --device ID`` (registry lookup) are added by cli.py; ``device_context_from_args`` is
the hook it extends."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from ipaddress import ip_address
from typing import Any, TextIO

from gateway.cli.common import (EXIT_FAIL, EXIT_OK, EXIT_USAGE, NO_SUCH_DEVICE, add_config_argument, load_config_or_exit,
                                os_reason)
from gateway.i18n import Text
from gateway.policy.loader import load_policy
from gateway.policy.query import DeviceContext, PolicyQuery
from gateway.policy.snapshot import PolicySnapshot
from gateway.policy.urltest import (KNOWN_SCHEMES, T_URL_EMPTY, T_URL_GUESSED, T_URL_NO_HOST, T_URL_SCHEME,  # noqa: F401
                                    RequestShape, decide, judge_urls, policy_query, read_urls, url_warning,
                                    verdict_changes)
from gateway.verdict import Stage, Verdict
from gateway.yamlsource import SourceErrors, UnreadableSource

T_INVALID = Text("ポリシーにエラーがあります（適用されません）:", "The policy has errors (nothing applied):")
T_UNREADABLE = Text("ポリシーファイルを読めません（適用されません）:", "Cannot read the policy file (nothing applied):")
T_VALID = Text("ポリシーは有効です: {path}（版 {version}、ルール {rules} 件、リスト {lists} 件、廃止 {retired} 件）",
               "Policy is valid: {path} (version {version}, {rules} rules, {lists} lists, {retired} retired)")
T_STAGES = Text("判定される段階: {counts}", "Decided at stage: {counts}")
T_EXPIRING = Text("警告: ルール {id}（{file}:{line}）は {date} に期限切れになります（{days} 日以内）",
                  "warning: rule {id} ({file}:{line}) expires on {date} (within {days} days)")
T_EXPIRED = Text("警告: ルール {id}（{file}:{line}）は {date} に期限切れです（適用されません）",
                 "warning: rule {id} ({file}:{line}) expired on {date} (no longer applies)")
T_NO_URLS = Text("URL がありません（引数か標準入力で渡してください）", "no URLs given (pass them as arguments or on standard input)")
T_BAD_ARG = Text("引数が不正です: {detail}", "bad argument: {detail}")
T_DEVICE_NEEDS_CONFIG = Text("--device には --config（ゲートウェイの設定、または環境変数 KANMON_CONFIG）が必要です",
                             "--device needs --config (the gateway configuration, or KANMON_CONFIG)")
T_BAD_UNDERLAY = Text("--underlay-ip が IP アドレスではありません: {value}", "--underlay-ip is not an IP address: {value}")
T_URLS_FILE = Text("URL ファイルを読めません: {detail}", "cannot read the URL file: {detail}")
T_DIFF_SUMMARY = Text("{total} 件中 {changed} 件の URL で判定が変わります（旧 {old} → 新 {new}）",
                      "{changed} of {total} URLs change verdict (old {old} -> new {new})")


def register(subparsers: Any) -> Any:
    """Adds the `policy` group; returns its sub-parsers so the gateway can add `apply`."""
    policy = subparsers.add_parser("policy", help="check, test and compare policies / ポリシーの検査・試験・比較")
    sub = policy.add_subparsers(dest="policy_command", required=True)

    check = sub.add_parser("check", help="validate a policy file / ポリシーを検査")
    check.add_argument("path")
    check.add_argument("--expiring-days", type=int, default=30, metavar="N",
                       help="warn about rules that expire within N days (default 30)")
    check.set_defaults(func=cmd_check)

    test = sub.add_parser("test", help="show the verdict for URLs / URL の判定を表示")
    test.add_argument("--policy", required=True)
    test.add_argument("--device", metavar="ID",
                      help="a registered device, as the gateway sees it now (registry record and signed-in user); needs --config")
    add_config_argument(test, required=False, help="gateway configuration (for --device and the feed copies)")
    add_device_arguments(test)
    add_request_arguments(test)
    test.add_argument("--json", action="store_true", help="one JSON object per line")
    test.add_argument("urls", nargs="*", help="URLs (read from standard input when none are given). Without a scheme: "
                                              "judged as https:// with a warning (exit 0); an unknown scheme (htps://): "
                                              "judged by the host with a warning, exit 2; empty or without a host: "
                                              "warning, not judged, exit 2")
    test.set_defaults(func=cmd_test)

    diff = sub.add_parser("diff", help="URLs whose verdict differs between two policies / 判定が変わる URL")
    diff.add_argument("old")
    diff.add_argument("new")
    diff.add_argument("--urls", required=True, help="file with one URL per line")
    add_device_arguments(diff)
    add_request_arguments(diff)
    diff.add_argument("--json", action="store_true")
    diff.set_defaults(func=cmd_diff)
    return sub


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device-group", "--group", dest="device_group", action="append", default=[], metavar="G")
    parser.add_argument("--ownership", choices=["org", "byod"], default="org")
    parser.add_argument("--device-id", default="policy-test")
    parser.add_argument("--user")
    parser.add_argument("--platform")
    parser.add_argument("--os-version")
    parser.add_argument("--jailbroken", action="store_true")
    parser.add_argument("--underlay-ip")
    parser.add_argument("--status", default="active")


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    # Default stage: the response, where every fact is known, so the answer is final (a
    # response without --content-type matches no content-type condition).
    parser.add_argument("--stage", choices=[str(s) for s in (Stage.DNS, Stage.TLS, Stage.REQUEST, Stage.RESPONSE)],
                        default=str(Stage.RESPONSE))
    parser.add_argument("--method", default="GET")
    parser.add_argument("--content-type", help="response Content-Type")
    parser.add_argument("--request-content-type")
    parser.add_argument("--body-size", type=int, help="request body size in bytes")


def shape_from_args(args: argparse.Namespace) -> RequestShape:
    """The request facts of `policy test|diff` (gateway/policy/urltest.py is the shared code path)."""
    return RequestShape(Stage(args.stage), args.method, args.content_type, args.request_content_type, args.body_size)


def query_from_args(url: str, device: DeviceContext, args: argparse.Namespace, now: datetime) -> PolicyQuery:
    return policy_query(url, device, shape_from_args(args), now)


def decide_from_args(snap: PolicySnapshot, url: str, device: DeviceContext, args: argparse.Namespace,
                     now: datetime) -> Verdict:
    """``snap.decide(query_from_args(...))``; at the HTTP stages through ``decide_url``."""
    return decide(snap, url, device, shape_from_args(args), now)


def _bad_arg(exc: ValueError) -> Text:
    detail = exc.args[0] if exc.args else exc
    return detail if isinstance(detail, Text) else T_BAD_ARG.format(detail=exc)


def device_context_from_args(args: argparse.Namespace) -> DeviceContext:
    """The device a test query is made for. Raises ValueError on a bad value."""
    try:
        underlay = ip_address(args.underlay_ip) if getattr(args, "underlay_ip", None) else None
    except ValueError:
        raise ValueError(T_BAD_UNDERLAY.format(value=args.underlay_ip)) from None
    return DeviceContext(
        device_id=args.device_id,
        groups=frozenset(args.device_group),
        ownership=args.ownership,
        user=args.user,
        platform=args.platform.lower() if args.platform else None,
        os_version=args.os_version,
        jailbroken=args.jailbroken,
        underlay_ip=underlay,
        status=args.status,
    )


def _load(path: str, err: TextIO, feeds_dir: Any = None) -> PolicySnapshot | None:
    return _load_with_code(path, err, feeds_dir)[0]


def _load_with_code(path: str, err: TextIO, feeds_dir: Any = None) -> tuple[PolicySnapshot | None, int]:
    """The snapshot, or None and the exit code: 2 (bad input) when the file cannot be read
    (missing, not a regular file, too large) or has errors -- the same in check, test, diff
    and apply. Category feeds come from their last good copies in ``feeds_dir`` (default:
    $KANMON_STATE_DIR/feeds), never the network."""
    try:
        return load_policy(path, feeds_dir=feeds_dir), 0
    except SourceErrors as exc:
        unreadable = isinstance(exc, UnreadableSource)
        print((T_UNREADABLE if unreadable else T_INVALID).render(), file=err)
        for e in exc.errors:
            print(str(e), file=err)
        return None, EXIT_USAGE


def cmd_check(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    snap, code = _load_with_code(args.path, err)
    if snap is None:
        return code
    print(T_VALID.format(path=args.path, version=snap.version, rules=len(snap.rules), lists=len(snap.lists),
                         retired=len(snap.retired)).render(), file=out)
    counts: dict[str, int] = {}
    for rule in snap.rules:
        counts[str(rule.info.decided_at)] = counts.get(str(rule.info.decided_at), 0) + 1
    print(T_STAGES.format(counts=", ".join(f"{k} {v}" for k, v in counts.items())).render(), file=out)
    now = datetime.now(timezone.utc)
    today = now.astimezone(snap.tz).date()
    for info in snap.expiring(now, args.expiring_days):
        text = T_EXPIRED if info.expires < today else T_EXPIRING
        print(text.format(id=info.id, file=info.filename, line=info.line, date=info.expires, days=args.expiring_days).render(), file=out)
    return 0


_read_urls = read_urls


def cmd_test(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None, stdin: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    registered = getattr(args, "device", None)
    try:
        if registered:
            if not getattr(args, "config", None):
                print(T_DEVICE_NEEDS_CONFIG.render(), file=err)
                return EXIT_USAGE
            from gateway.cli.policydevice import DeviceLookupError, registered_device_context
            try:
                device, _ = registered_device_context(args.config, registered)
            except DeviceLookupError:
                print(NO_SUCH_DEVICE.format(d=registered).render(), file=err)
                return EXIT_FAIL
        else:
            device = device_context_from_args(args)
    except ValueError as exc:
        print(_bad_arg(exc).render(), file=err)
        return EXIT_USAGE
    feeds_dir = None
    if getattr(args, "config", None):  # the gateway's own feed copies
        feeds_dir = load_config_or_exit(args.config).state_dir / "feeds"
    snap = _load(args.policy, err, feeds_dir)
    if snap is None:
        return 2
    urls = list(args.urls) or _read_urls(stdin or sys.stdin)
    if not urls:
        print(T_NO_URLS.render(), file=err)
        return 2
    now = datetime.now(timezone.utc)
    code = EXIT_OK
    for result in judge_urls(snap, urls, device, shape_from_args(args), now):
        url, v = result.url, result.verdict
        if result.warning is not None:
            print(result.warning.render(), file=err)
        if result.kind in ("guess", "skip"):  # a typo or nothing to judge: bad input
            code = EXIT_USAGE
        if v is None:
            continue
        if args.json:
            obj = {"url": url, "verdict": str(v.action), "rule": v.rule_id, "explain": v.explain}
            if registered:
                obj.update({"device": device.device_id, "user": device.user, "mfa": device.mfa})
            print(json.dumps(obj, ensure_ascii=False), file=out)
        else:
            who = f"\t{device.device_id}/{device.user or '-'}" if registered else ""
            print(f"{v.action}\t{v.rule_id or '-'}\t{url}\t{v.explain}{who}", file=out)
    return code


def cmd_diff(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    try:
        device = device_context_from_args(args)
    except ValueError as exc:
        print(_bad_arg(exc).render(), file=err)
        return 2
    try:
        with open(args.urls, encoding="utf-8") as fh:
            urls = _read_urls(fh)
    except OSError as exc:
        reason = os_reason(exc)
        print(Text(f"URL ファイルを読めません: {args.urls}: {reason.ja}", f"cannot read the URL file: {args.urls}: {reason.en}")
              .render(), file=err)
        return EXIT_USAGE
    except UnicodeDecodeError as exc:
        print(T_URLS_FILE.format(detail=exc).render(), file=err)
        return EXIT_USAGE
    old, new = _load(args.old, err), _load(args.new, err)
    if old is None or new is None:
        return 2
    now = datetime.now(timezone.utc)
    changed = 0
    for change in verdict_changes(old, new, urls, device, shape_from_args(args), now):
        url, a, b = change.url, change.old, change.new
        changed += 1
        if args.json:
            print(json.dumps({"url": url, "old": {"verdict": str(a.action), "rule": a.rule_id},
                              "new": {"verdict": str(b.action), "rule": b.rule_id, "explain": b.explain}}, ensure_ascii=False), file=out)
        else:
            print(f"{url}\t{a.action} ({a.rule_id or 'default'}) -> {b.action} ({b.rule_id or 'default'})", file=out)
    print(T_DIFF_SUMMARY.format(total=len(urls), changed=changed, old=old.version, new=new.version).render(), file=err if args.json else out)
    return 0


# -- `policy diff --pcap` (issue #13): the verdicts of a capture's flows under two policies --------

T_BAD_CAPTURE = Text("キャプチャを読めません: {detail}", "cannot read the capture: {detail}")
T_SUMMARY = Text("キャプチャの {total} 件の問い合わせ中 {changed} 件で判定が変わります（旧 {old} → 新 {new}）",
                 "{changed} of {total} questions from the capture change verdict (old {old} -> new {new})")
T_NEED_ONE = Text("--urls か --pcap のどちらかを指定してください", "give --urls or --pcap")


def cmd_diff_pcap(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    from gateway.replay.capture import CaptureError      # only `diff --pcap` pays for the capture reader
    from gateway.replay.policydiff import flows_from_pcap, policy_query
    out, err = out or sys.stdout, err or sys.stderr
    try:
        device = device_context_from_args(args)
    except ValueError as exc:
        print(_bad_arg(exc).render(), file=err)
        return 2
    try:
        queries = flows_from_pcap(args.pcap)
    except CaptureError as exc:
        print(T_BAD_CAPTURE.format(detail=exc).render(), file=err)
        return 2
    old, new = _load(args.old, err), _load(args.new, err)
    if old is None or new is None:
        return 2
    now = datetime.now(timezone.utc)
    changed = 0
    for q in queries:
        pq = policy_query(q, device, now)
        a, b = old.decide(pq), new.decide(pq)
        if a.action == b.action and a.rule_id == b.rule_id:
            continue
        changed += 1
        if getattr(args, "json", False):
            print(json.dumps({"flow": q.flow, "stage": str(q.stage), "url": q.url, "host": q.host,
                              "destination": f"{q.dst_ip}:{q.dst_port}",
                              "old": {"verdict": str(a.action), "rule": a.rule_id},
                              "new": {"verdict": str(b.action), "rule": b.rule_id, "explain": b.explain}},
                             ensure_ascii=False), file=out)
        else:
            print(f"{q.flow}\t{q.label()}\t{a.action} ({a.rule_id or 'default'}) -> {b.action} ({b.rule_id or 'default'})",
                  file=out)
    print(T_SUMMARY.format(total=len(queries), changed=changed, old=old.version, new=new.version).render(),
          file=err if getattr(args, "json", False) else out)
    return 0


def register_diff_pcap(diff_parser: argparse.ArgumentParser) -> None:
    """Give `policy diff` a `--pcap CAPTURE` alternative to `--urls FILE`: `--urls` stops
    being required, and the handler goes to `cmd_diff_pcap` when `--pcap` is given."""
    diff_parser.add_argument("--pcap", help="capture (pcap/pcapng): compare the verdicts of its flows")
    for action in diff_parser._actions:  # argparse has no public way to relax a declared option
        if "--urls" in action.option_strings:
            action.required = False
    url_handler = diff_parser.get_default("func")

    def dispatch(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
        if getattr(args, "pcap", None):
            return cmd_diff_pcap(args, out, err)
        if not getattr(args, "urls", None):
            print(T_NEED_ONE.render(), file=err or sys.stderr)
            return 2
        return url_handler(args, out, err)

    diff_parser.set_defaults(func=dispatch)
