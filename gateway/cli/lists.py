"""`kanmon lists status|diff|update`: the operator's view of the category feeds."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gateway.cli.common import CONFIG_ENV, EXIT_USAGE, error, load_config_or_exit
from gateway.feeds.status import feed_status  # shared with the console (issue #21)
from gateway.i18n import Text

T_NO_FEEDS = Text("このポリシーにはフィードがありません: {p}", "this policy declares no feeds: {p}")
T_UNKNOWN = Text("そのようなフィードはありません: {n}", "no such feed: {n}")
T_INVALID = Text("ポリシーに誤りがあります:", "The policy is invalid:")
T_UNREADABLE = Text("ポリシーファイルを読めません:", "Cannot read the policy file:")
T_NO_POLICY = Text("設定 {c} にポリシーがありません（policy: も適用済みのポリシーもありません）",
                   "the configuration {c} names no policy (no policy: and none applied)")
T_WHERE = Text("--config（または環境変数 KANMON_CONFIG）か --policy を指定してください",
               "give --config (or KANMON_CONFIG) or --policy")
T_NEVER = Text("まだありません", "never")
T_DIFF_NONE = Text("{n}: 変更はありません", "{n}: no change")
T_REFUSED = Text("{n}: 拒否しました（{r}）: {m} — 前回の正常なコピーを使い続けます",
                 "{n}: refused ({r}): {m} — the last good copy keeps serving")


def _context(args: argparse.Namespace):
    from gateway.feeds.store import feeds_dir
    from gateway.policy.compiler import parse_policy
    from gateway.yamlsource import MAX_YAML_BYTES, SourceErrors, UnreadableSource, read_text_file

    if args.policy:   # --policy wins over $KANMON_CONFIG
        policy, state_dir = Path(args.policy), args.state_dir
    elif args.config:
        cfg = load_config_or_exit(args.config)
        policy, state_dir = cfg.active_policy_path(), cfg.state_dir
        if policy is None:
            raise SystemExit(error(T_NO_POLICY.format(c=args.config)))
    else:
        raise SystemExit(error(T_WHERE))
    try:
        _doc, sources = parse_policy(read_text_file(policy, MAX_YAML_BYTES), str(policy))
    except SourceErrors as exc:
        print((T_UNREADABLE if isinstance(exc, UnreadableSource) else T_INVALID).render(), file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    specs = [s.feed for s in sources if s.feed is not None]
    if args.feed:
        specs = [s for s in specs if s.name == args.feed]
        if not specs:
            print(T_UNKNOWN.format(n=args.feed).render(), file=sys.stderr)
            raise SystemExit(EXIT_USAGE)
    if not specs:
        print(T_NO_FEEDS.format(p=policy).render(), file=sys.stderr)
    return specs, feeds_dir(state_dir), Path(policy).parent


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else T_NEVER.render()


def cmd_status(args: argparse.Namespace) -> int:
    specs, directory, _ = _context(args)
    now = time.time()
    rows = [feed_status(s, directory, now) for s in specs]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']}: {r['source']} ({r['format']})")
        print(f"  last success / 最終成功: {_when(r['last_success'])}   copy age / コピーの経過: "
              f"{r['age_seconds'] if r['age_seconds'] is not None else '-'} s")
        for cat, n in sorted(r["entries"].items()):
            print(f"  {cat}: {n} entries / 件")
        print(f"  skipped lines / 読み飛ばした行: {r['skipped_lines']}")
        print(f"  last error / 最後のエラー: {r['last_error'] or '-'}")
        for e in r["exceptions"]:
            print(f"  allow {e['host']} until {e['expires']}: {e['reason']}")
    return 0 if all(r["copy_fetched_at"] for r in rows) else 1


def cmd_diff(args: argparse.Namespace) -> int:
    """What an update would add and remove; stores nothing."""
    from gateway.feeds.checks import FeedRefused
    from gateway.feeds.store import load_snapshot
    from gateway.feeds.update import diff, obtain

    specs, directory, base = _context(args)
    rc = 0
    for spec in specs:
        previous = load_snapshot(directory, spec.name)
        try:
            snap, _ = obtain(spec, base, None, None, time.time())
        except FeedRefused as exc:
            print(T_REFUSED.format(n=spec.name, r=exc.reason, m=exc.text.render()).render())
            rc = 1
            continue
        added, removed = diff(previous, snap)
        if not any(added.values()) and not any(removed.values()):
            print(T_DIFF_NONE.format(n=spec.name).render())
            continue
        for cat in sorted(added):
            for sign, names in (("+", added[cat]), ("-", removed[cat])):
                shown = sorted(names)
                for name in shown[: args.limit]:
                    print(f"{sign} {spec.name}/{cat} {name}")
                if len(shown) > args.limit:
                    print(f"{sign} {spec.name}/{cat} … {len(shown) - args.limit} more / 他 {len(shown) - args.limit} 件")
    return rc


def cmd_update(args: argparse.Namespace) -> int:
    """Fetch now. A running gateway sees the new copy at its next feed check and swaps the
    policy without a restart."""
    from gateway.feeds.update import update_feed

    specs, directory, base = _context(args)
    rc = 0
    for spec in specs:
        result = update_feed(spec, directory, base)
        if result.outcome == "refused":
            print(T_REFUSED.format(n=spec.name, r=result.reason, m=result.message.render()).render())
            rc = 1
        elif result.outcome == "unchanged":
            print(f"{spec.name}: unchanged / 変更なし")
        else:
            print(f"{spec.name}: updated / 更新 ({result.snapshot.total()} entries / 件, "
                  f"+{sum(map(len, result.added.values()))} -{sum(map(len, result.removed.values()))}, "
                  f"{result.snapshot.skipped()} lines skipped / 行を読み飛ばし)")
    return rc


def register(sub: argparse._SubParsersAction) -> None:
    lists = sub.add_parser("lists", help="category feeds: status, diff, update / カテゴリフィード")
    lsub = lists.add_subparsers(dest="lists_command", required=True)
    for name, func, help_ in (("status", cmd_status, "per feed: source, last success, age, entries, errors"),
                              ("diff", cmd_diff, "what an update would add and remove (stores nothing)"),
                              ("update", cmd_update, "fetch the feeds now")):
        p = lsub.add_parser(name, help=help_)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--config", default=os.environ.get(CONFIG_ENV) or None,
                           help=f"gateway configuration (policy and state directory; default: ${CONFIG_ENV})")
        where.add_argument("--policy", help="policy file (with --state-dir)")
        p.add_argument("--state-dir", help="state directory (default: $KANMON_STATE_DIR or /var/lib/kanmon)")
        p.add_argument("--feed", help="only this feed")
        if name == "status":
            p.add_argument("--json", action="store_true")
        if name == "diff":
            p.add_argument("--limit", type=int, default=50, help="names shown per category and direction")
        p.set_defaults(func=func)
