"""What `kanmon replay` prints: a bilingual header, the differences flow by flow, the
bypasses, and a JSON summary (pure; the caller writes it)."""

from __future__ import annotations

from typing import Any

from gateway.i18n import Text
from gateway.replay.capture import Flow
from gateway.replay.judge import Verdict

T_OK = Text("リプレイ結果: 期待どおり（フロー {flows} 件、迂回 {bypass} 件）",
            "Replay: all expectations hold ({flows} flows, {bypass} bypasses)")
T_FAIL = Text("リプレイ結果: 期待と異なります（フロー {flows} 件中 {bad} 件で相違、迂回 {bypass} 件 / 許容 {max_bypass} 件）",
              "Replay: expectations do not hold ({bad} of {flows} flows differ, {bypass} bypasses / {max_bypass} allowed)")
T_DIFF_HEAD = Text("相違（期待 → 観測）:", "Differences (expected -> observed):")
T_BYPASS_HEAD = Text("プロキシを経由せずインターネットに届いたパケット:", "Packets that reached the internet without the proxy:")
T_NOT_WATCHED = Text("注意: インターネット側を観測していないため、迂回の検査は行っていません",
                     "note: the internet side was not watched, so bypasses were not checked")
T_COUNTS = Text("結果の内訳: {counts}（インターネット側で観測したフレーム {frames} 件）",
                "Outcomes: {counts} ({frames} frames seen on the internet side)")


def render(verdict: Verdict, flows: list[Flow], *, verbose: bool = False) -> str:
    bad_flows = sorted({m.flow for m in verdict.mismatches})
    n_bypass = len(verdict.bypasses)
    lines = []
    if verdict.ok:
        lines.append(T_OK.format(flows=len(flows), bypass=n_bypass).render())
    else:
        lines.append(T_FAIL.format(flows=len(flows), bad=len(bad_flows), bypass=n_bypass,
                                   max_bypass=verdict.max_bypass).render())
    counts = ", ".join(f"{k} {v}" for k, v in sorted(verdict.counts.items()))
    lines.append(T_COUNTS.format(counts=counts, frames=verdict.internet_frames).render())
    if not verdict.internet_observed:
        lines.append(T_NOT_WATCHED.render())
    if verdict.mismatches:
        lines.append("")
        lines.append(T_DIFF_HEAD.render())
        by_id = {f.id: f for f in flows}
        for m in verdict.mismatches:
            flow = by_id.get(m.flow)
            where = f" [{flow.summary()}]" if flow else ""
            lines.append(f"  - {m.flow}{where}: {m.field}: {m.expected!s} -> {m.observed!s}")
            if m.detail:
                lines.append(f"      {m.detail}")
    if verdict.bypasses:
        lines.append("")
        lines.append(T_BYPASS_HEAD.render())
        for b in verdict.bypasses[:50]:
            lines.append(f"  ! {b.summary}: {b.reason}")
        if len(verdict.bypasses) > 50:
            lines.append(f"  ! ... (+{len(verdict.bypasses) - 50})")
    if verbose:
        lines.append("")
        for obs in verdict.observations.values():
            lines.append(f"  {obs.flow:34} {obs.outcome:9} {obs.rule or '-':26} {obs.detail}")
    return "\n".join(lines) + "\n"


def summary(verdict: Verdict, flows: list[Flow], *, capture: str, expect: str, device: str, seconds: float) -> dict[str, Any]:
    return {
        "capture": capture,
        "expectations": expect,
        "device": device,
        "ok": verdict.ok,
        "flows": len(flows),
        "stream_flows": sum(1 for f in flows if f.mode == "stream"),
        "packet_flows": sum(1 for f in flows if f.mode != "stream"),
        "outcomes": verdict.counts,
        "mismatches": [{"flow": m.flow, "field": m.field, "expected": m.expected, "observed": m.observed,
                        "detail": m.detail} for m in verdict.mismatches],
        "bypass_count": len(verdict.bypasses),
        "bypasses": [{"packet": b.summary, "reason": b.reason} for b in verdict.bypasses],
        "internet_observed": verdict.internet_observed,
        "internet_frames": verdict.internet_frames,
        "seconds": round(seconds, 2),
        "observations": {o.flow: {"outcome": o.outcome, "rule": o.rule, "status": o.status, "detail": o.detail}
                         for o in verdict.observations.values()},
    }
