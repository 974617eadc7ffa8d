"""`kanmon replay`: replay a capture through a device's tunnel and check every verdict.

    kanmon replay CAPTURE --expect EXPECT.yaml --lab-state DIR [--device ID]
    kanmon replay CAPTURE --expect EXPECT.yaml --config C --device ID [--device-netns NS] [--interface wg0]
                  [--internet-netns NS --internet-interface IF --uplink-address ADDR ...]
    kanmon replay CAPTURE --list                       # the flows of a capture and how each is replayed
    kanmon replay --record --device ID --out F.pcap (--lab-state DIR | --config C --device-netns NS --interface IF)

Exit codes: 0 every expectation holds and no bypass; 1 a difference (printed as a diff); 2 bad
input (capture, expectation file, target). The design is in gateway/replay/__init__.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

from gateway.cli.common import CONFIG_ENV
from gateway.i18n import Text

T_NEED_EXPECT = Text("--expect が必要です（または --list / --record）", "--expect is required (or --list / --record)")
T_NEED_TARGET = Text("--lab-state DIR か --config C（と --device ID）で対象の端末を指定してください",
                     "name the device with --lab-state DIR or --config C (and --device ID)")
T_NEED_CAPTURE = Text("キャプチャファイルを指定してください", "a capture file is required")
T_NEED_OUT = Text("--record には --out FILE が必要です", "--record needs --out FILE")
T_BAD_CAPTURE = Text("キャプチャを読めません: {detail}", "cannot read the capture: {detail}")
T_BAD_EXPECT = Text("期待値ファイルにエラーがあります:", "the expectation file has errors:")
T_BAD_TARGET = Text("対象の端末を特定できません: {detail}", "cannot find the device to replay from: {detail}")
T_FAILED = Text("リプレイを実行できません: {detail}", "the replay could not run: {detail}")
T_RECORDED = Text("{count} パケットを {out} に記録しました", "recorded {count} packets into {out}")


def register(subparsers: Any) -> Any:
    p = subparsers.add_parser("replay", help="replay a capture through a device tunnel and check verdicts / "
                                             "キャプチャを端末のトンネルで再生し判定を検証")
    p.add_argument("capture", nargs="?", help="pcap / pcapng of the device's traffic")
    p.add_argument("--expect", help="expectation YAML (see gateway/replay/expectations.py)")
    p.add_argument("--device", help="device id (default: the lab's first device)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--lab-state", help="directory (or file) with replay-lab.json of a running lab")
    where.add_argument("--config", default=os.environ.get(CONFIG_ENV) or None,
                       help=f"gateway config of a live gateway (device from its registry; default: ${CONFIG_ENV})")
    p.add_argument("--device-netns", help="with --config: the device's network namespace (default: this one)")
    p.add_argument("--interface", help="with --config: the device's WireGuard interface (default wg0)")
    p.add_argument("--internet-netns", help="with --config: namespace where the uplink side can be watched")
    p.add_argument("--internet-interface", help="with --config: interface in front of the gateway's uplink to watch")
    p.add_argument("--uplink-address", action="append", default=[],
                   help="with --config: the gateway's uplink address(es) upstream connections come from")
    p.add_argument("--capture-source", action="append", default=[],
                   help="the recording device's address(es) in the capture (default: most frequent source)")
    p.add_argument("--summary-json", help="also write the summary as JSON to this file")
    p.add_argument("--verbose", "-v", action="store_true", help="print every flow's observation")
    p.add_argument("--list", action="store_true", help="list the capture's flows and exit")
    p.add_argument("--record", action="store_true", help="record the device's tunnel traffic instead")
    p.add_argument("--out", help="with --record: the pcap to write")
    p.add_argument("--seconds", type=float, default=60.0, help="with --record: how long (default 60; Ctrl-C stops)")
    p.set_defaults(func=cmd_replay)
    return p


def _target(args: argparse.Namespace):
    from gateway.replay.target import target_from_config, target_from_lab_state
    if args.lab_state:
        return target_from_lab_state(args.lab_state, args.device)
    if args.config:
        if not args.device:
            from gateway.replay.target import TargetError
            raise TargetError("--config needs --device ID")
        return target_from_config(args.config, args.device, interface=args.interface, device_netns=args.device_netns,
                                  internet_netns=args.internet_netns, internet_interface=args.internet_interface,
                                  uplink_addresses=tuple(args.uplink_address))
    return None


def cmd_replay(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    from gateway.replay.target import TargetError
    if args.record:
        return _cmd_record(args, out, err)
    if not args.capture:
        print(T_NEED_CAPTURE.render(), file=err)
        return 2
    from gateway.replay.capture import CaptureError, read_capture, split_flows
    if args.list:
        try:
            packets = read_capture(args.capture)
        except CaptureError as exc:
            print(T_BAD_CAPTURE.format(detail=exc).render(), file=err)
            return 2
        source = set(args.capture_source) or None
        for flow in split_flows(packets, source):
            print(f"{flow.id}\t{flow.mode}\t{flow.summary()}\t{len(flow.packets)} packets", file=out)
        return 0
    if not args.expect:
        print(T_NEED_EXPECT.render(), file=err)
        return 2
    from gateway.replay.expectations import load_expectations
    from gateway.yamlsource import SourceErrors
    try:
        expect = load_expectations(args.expect)
    except SourceErrors as exc:
        print(T_BAD_EXPECT.render(), file=err)
        for e in exc.errors:
            print(str(e), file=err)
        return 2
    try:
        read_capture(args.capture)  # reject a bad capture before touching any namespace
        target = _target(args)
    except CaptureError as exc:
        print(T_BAD_CAPTURE.format(detail=exc).render(), file=err)
        return 2
    except TargetError as exc:
        print(T_BAD_TARGET.format(detail=exc).render(), file=err)
        return 2
    if target is None:
        print(T_NEED_TARGET.render(), file=err)
        return 2
    from gateway.replay.report import render, summary
    from gateway.replay.runner import ReplayError, replay
    try:
        run = replay(args.capture, expect, target, capture_source=args.capture_source or None)
    except (ReplayError, OSError, subprocess.SubprocessError) as exc:
        print(T_FAILED.format(detail=exc).render(), file=err)
        return 2
    out.write(render(run.verdict, run.flows, verbose=args.verbose))
    if args.summary_json:
        data = summary(run.verdict, run.flows, capture=args.capture, expect=args.expect, device=target.device_id,
                       seconds=run.seconds)
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n")
    return 0 if run.verdict.ok else 1


def _cmd_record(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from gateway.replay.target import TargetError
    if not args.out:
        print(T_NEED_OUT.render(), file=err)
        return 2
    try:
        target = _target(args)
    except TargetError as exc:
        print(T_BAD_TARGET.format(detail=exc).render(), file=err)
        return 2
    if target is None:
        print(T_NEED_TARGET.render(), file=err)
        return 2
    cmd = [sys.executable, "-m", "gateway.replay.record", "--interface", target.wg_interface,
           "--out", str(Path(args.out).resolve()), "--seconds", str(args.seconds)]
    if target.device_netns:
        cmd = ["ip", "netns", "exec", target.device_netns, *cmd]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.seconds + 30)
    except (OSError, subprocess.SubprocessError) as exc:
        print(T_FAILED.format(detail=exc).render(), file=err)
        return 2
    if proc.returncode != 0:
        print(T_FAILED.format(detail=proc.stderr.strip()[-2000:]).render(), file=err)
        return 2
    count = next((line.split()[1] for line in proc.stdout.splitlines() if line.startswith("packets ")), "0")
    print(T_RECORDED.format(count=count, out=args.out).render(), file=out)
    return 0
