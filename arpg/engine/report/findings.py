"""The report's first section, "What this study finds": at most eight lines, each a claim with its
interval and, where the paper makes the same claim (arpg/paper.py), the paper's figure and whether
this study agrees, disagrees or cannot tell at this scale."""

from __future__ import annotations

from typing import Any

from arpg import paper
from arpg.decoders import DECODERS
from arpg.engine.report.noise import Bootstrap, difference
from arpg.engine.report.points import Point, with_interval
from arpg.paths import format_cfg

MAX_LINES = 8


def findings(params, points: list[Point], guidance: list[Point], fid: str, boot: Bootstrap,
             profile: dict[str, Any] | None) -> list[str]:
    """The section's markdown (empty without a parallel and a sequential decoder's points)."""
    s = params["sample"]
    par = next((d for d in DECODERS.values() if d.parallel), None)
    seq = next((d for d in DECODERS.values() if not d.parallel), None)
    by_key = {(p.point.model, p.point.steps, p.point.cfg, p.point.order): p for p in points}
    tokens = _tokens(points, seq)
    if par is None or seq is None or tokens is None:
        return []

    def at(d, steps, cfg=s["cfg_default"]):
        return by_key.get((d.name, steps, float(cfg), d.native_order))

    few, full = at(par, s["steps_default"]), at(par, tokens)
    ours, theirs = few, at(seq, tokens)
    lines = [
        _compare(f"**Few steps suffice.** {par.short_label} at {s['steps_default']} of {tokens} steps vs {tokens}",
                 full, few, fid, boot, paper.FEW_STEPS, worse_only=True),
        _compare(f"**{par.short_label} vs {seq.short_label}, one guidance (cfg {format_cfg(s['cfg_default'])}).** "
                 f"{par.short_label} at {s['steps_default']} steps vs {seq.short_label}", theirs, ours, fid, boot,
                 paper.VERSUS_RASTER),
    ]
    best = {d.name: min((p for p in guidance if p.point.model == d.name and fid in p.metrics),
                        key=lambda p: p.metrics[fid], default=None) for d in (par, seq)}
    if best[par.name] and best[seq.name]:
        lines.append(_compare(
            f"**{par.short_label} vs {seq.short_label}, each at its best guidance** ({par.short_label} cfg "
            f"{format_cfg(best[par.name].point.cfg)}, {seq.short_label} cfg {format_cfg(best[seq.name].point.cfg)}, "
            "chosen on these same figures: optimistic for both; a held-out choice is pending)",
            best[seq.name], best[par.name], fid, boot, paper.VERSUS_RASTER))
    lines += _speed_lines(params, profile, par, seq)
    lines.append(f"**Training noise: cannot tell at this scale.** Every interval here resamples one trained model "
                 f"per decoder; paper section 6: {paper.TRAINING_NOISE.text}. Until training is replicated over "
                 "seeds, a verdict above may not survive retraining.")
    lines = [line for line in lines if line][:MAX_LINES]
    return ["## What this study finds\n", *(f"- {line}" for line in lines), "",
            f"Intervals: 95%, sampling noise of each point (below); paper figures: {paper.SOURCE}.\n"]


def _tokens(points: list[Point], seq) -> int | None:
    steps = [p.point.steps for p in points if seq is not None and p.point.model == seq.name]
    return max(steps) if steps else None


def _compare(what: str, a: Point | None, b: Point | None, fid: str, boot: Bootstrap, claim: paper.Claim,
             worse_only: bool = False) -> str:
    """`what`: b against a on `fid` (lower is better), the difference's interval, the paper's figure and
    the verdict. worse_only: the paper claims b is no worse (agree unless b is worse beyond the noise);
    otherwise that b is better (agree only when b is better beyond the noise)."""
    if a is None or b is None or fid not in a.metrics or fid not in b.metrics:
        return ""
    diff, se = difference(a, b, fid, boot)
    if se is None:
        verdict, interval = "Cannot tell (no intervals)", ""
    else:
        half = boot.z * se
        interval = f", {boot.level:.0%} [{diff - half:.3g}, {diff + half:.3g}]"
        better, worse = diff < -half, diff > half
        if worse_only:
            verdict = "Disagrees" if worse else "Agrees"
        else:
            verdict = "Agrees" if better else "Disagrees" if worse else "Cannot tell at this scale"
        verdict += " (beyond the noise)" if better or worse else " (within the noise)"
    return (f"{what}: `{fid}` {with_interval(b, fid)} vs {with_interval(a, fid)} ({diff:+.3g}{interval}). "
            f"Paper: {claim.text}. **{verdict}.**")


def _speed_lines(params, profile: dict[str, Any] | None, par, seq) -> list[str]:
    """The speed-up and memory at the default step count, largest batch, the quality stages' precision."""
    if not profile:
        return []
    s = params["sample"]
    gains = [g for g in profile.get("speedups", []) if g["model"] == "default" and g["decoder"] == par.name
             and g["baseline"] == seq.name and g["steps"] == s["steps_default"] and g["precision"] == s["precision"]]
    if not gains:
        return []
    g = max(gains, key=lambda g: g["batch"])
    faster = g["speedup_gen_low"] > 1
    level = g.get("speedup_level")
    interval = f"[{g['speedup_gen_low']:.2f}, {g['speedup_gen_high']:.2f}]" + (f" ({level:.0%})" if level else "")
    cpu = profile.get("meta", {}).get("cpu", "?")
    speed = (f"**Speed.** {par.short_label} at {g['steps']} steps decodes {g['speedup_gen']:.2f}x {interval} as fast "
             f"as {seq.short_label} (batch {g['batch']}, {g['precision']}, {cpu}; {g['step_ratio']:g}x fewer "
             f"steps). Paper: {paper.SPEEDUP.text}. **"
             + ("Agrees in direction, smaller here (a small model on a CPU)" if faster else "Disagrees") + ".**")
    lines = [speed]
    if g.get("gen_mem_ratio"):
        lines.append(f"**Memory.** Generation memory {g['gen_mem_ratio']:.2f}x {seq.short_label}'s (KV cache "
                     f"{g['kv_ratio']:.2f}x; batch {g['batch']}). Paper: {paper.MEMORY.text}. **"
                     + ("Agrees in direction" if g["gen_mem_ratio"] < 1 else "Disagrees") + ".**")
    return lines
