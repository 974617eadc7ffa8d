"""One replay from start to finish: read the capture, start the internet-side witness,
inject from the device namespace, wait for the logs, judge."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.replay.capture import STREAM, Flow, device_addresses, read_capture, rewrite_source, split_flows
from gateway.replay.expectations import ExpectationSet
from gateway.replay.judge import Verdict, decide
from gateway.replay.target import ReplayTarget

LOG_STREAMS = ("proxy", "conn", "dns")


class ReplayError(Exception):
    pass


@dataclass
class ReplayRun:
    flows: list[Flow]
    verdict: Verdict
    target: ReplayTarget
    capture: str
    seconds: float


def _project_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def retarget(flows: list[Flow], recorded: set[str], target: ReplayTarget) -> list[Flow]:
    """Flows as the target device sends them: the recording device's addresses become the
    target's; other (spoofed) sources stay."""
    mapping = {}
    for addr in recorded:
        new = target.device_sources.get(ipaddress.ip_address(addr).version)
        if new and new != addr:
            mapping[addr] = new
    for flow in flows:
        if flow.src in mapping:
            old, new = flow.src, mapping[flow.src]
            flow.src = new
            flow.packets = [rewrite_source(p, old, new) for p in flow.packets]
    return flows


def plan_for(flows: list[Flow], target: ReplayTarget, *, settle: float) -> dict[str, Any]:
    import base64
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    streams, packets = [], []
    for f in flows:
        if f.mode == STREAM:
            streams.append({"id": f.id, "family": f.family, "src": f.src, "sport": f.sport, "dst": f.dst,
                            "dport": f.dport, "payload": b64(f.payload)})
        else:
            packets.append({"id": f.id, "packets": [b64(p) for p in f.packets]})
    return {"interface": target.wg_interface, "streams": streams, "packets": packets, "settle": settle,
            "connect_timeout": 3.0, "idle_timeout": 0.8}


def _netns_cmd(netns: str | None, *args: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *args] if netns else list(args)


def run_inject(plan: dict[str, Any], target: ReplayTarget) -> dict[str, Any]:
    if target.device_netns is None:
        from gateway.replay.inject import inject
        return inject(plan)
    env = dict(os.environ, PYTHONPATH=_project_root())
    proc = subprocess.run(_netns_cmd(target.device_netns, sys.executable, "-m", "gateway.replay.inject"),
                          input=json.dumps(plan), capture_output=True, text=True, timeout=120, env=env)
    if proc.returncode != 0:
        raise ReplayError(f"injection in {target.device_netns} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


class InternetWitness:
    """The sniffer process on the internet side (see sniffer.py)."""

    def __init__(self, target: ReplayTarget):
        env = dict(os.environ, PYTHONPATH=_project_root())
        self.proc = subprocess.Popen(
            _netns_cmd(target.internet_netns, sys.executable, "-m", "gateway.replay.sniffer",
                       "--interface", str(target.internet_interface)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            raise ReplayError(f"internet-side sniffer did not start: {line} {self.proc.stderr.read()[-2000:]}")

    def stop(self) -> list[dict]:
        out, err = self.proc.communicate(input="", timeout=30)
        if self.proc.returncode != 0:
            raise ReplayError(f"internet-side sniffer failed: {err.strip()[-2000:]}")
        return json.loads(out.strip().splitlines()[-1])


def _timestamp(record: dict) -> float:
    try:
        return datetime.fromisoformat(str(record.get("@timestamp"))).timestamp()
    except ValueError:
        return 0.0


def read_records(state_dir: str | Path, since: float) -> dict[str, list[dict]]:
    """Records of the policy streams written since `since` (today's and yesterday's files)."""
    out: dict[str, list[dict]] = {}
    for stream in LOG_STREAMS:
        recs = []
        for path in sorted((Path(state_dir) / "logs" / stream).glob("*.jsonl"))[-2:]:
            for line in path.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and _timestamp(rec) >= since:
                    recs.append(rec)
        out[stream] = recs
    return out


def replay(capture: str | Path, expect: ExpectationSet, target: ReplayTarget, *, capture_source: list[str] | None = None,
           settle: float = 1.5, log_wait: float = 1.0) -> ReplayRun:
    started = time.time()
    packets = read_capture(capture)
    recorded = set(capture_source) if capture_source else device_addresses(packets)
    flows = retarget(split_flows(packets, recorded), recorded, target)
    plan = plan_for(flows, target, settle=settle)
    witness = InternetWitness(target) if target.internet_interface else None
    t0 = time.time()
    try:
        results = run_inject(plan, target)
        time.sleep(log_wait)  # the access log writes after the flow ends
    finally:
        frames = witness.stop() if witness else None
    records = read_records(target.state_dir, since=t0 - 0.5)
    verdict = decide(flows, expect, results, records, target.device_sources, frames, set(target.uplink_addresses),
                     set(target.upstream_dns), list(target.tunnel_prefixes))
    return ReplayRun(flows, verdict, target, str(capture), time.time() - started)
