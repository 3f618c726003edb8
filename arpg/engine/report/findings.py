"""The report's first section, "What this study finds": at most eight lines, each a claim with its
interval and, where the paper makes the same claim (arpg/paper.py), the paper's figure and whether
this study agrees, disagrees or cannot tell at this scale."""

from __future__ import annotations

from typing import Any

from arpg import paper
from arpg.decoders import DECODERS
from arpg.engine.report.noise import SEEDS, Bootstrap, judge
from arpg.engine.report.points import Point, with_interval
from arpg.engine.report.seeds import Seeds
from arpg.engine.report.selection import Choice
from arpg.paths import format_cfg
from arpg.sweeps import first_run

MAX_LINES = 8


def findings(params, points: list[Point], guidance: list[Point], fid: str, boot: Bootstrap, seeds: Seeds,
             choices: dict[str, Choice], profile: dict[str, Any] | None) -> list[str]:
    """The section's markdown (empty without a parallel and a sequential decoder's points). A comparison
    of points sampled from every training seed uses the seed means and their interval (report.seeds)."""
    s = params["sample"]
    par = next((d for d in DECODERS.values() if d.parallel), None)
    seq = next((d for d in DECODERS.values() if not d.parallel), None)
    first = first_run(params)  # each point as the first seed's model samples it (seeds: combined from there)
    by_key = {(p.point.model, p.point.steps, p.point.cfg, p.point.order): p for p in points if p.point.run == first}
    tokens = _tokens(points, seq)
    if par is None or seq is None or tokens is None:
        return []

    def at(d, steps, cfg=s["cfg_default"]):
        return by_key.get((d.name, steps, float(cfg), d.native_order))

    few, full = at(par, s["steps_default"]), at(par, tokens)
    ours, theirs = few, at(seq, tokens)
    lines = [
        _compare(f"**Few steps suffice.** {par.short_label} at {s['steps_default']} of {tokens} steps vs {tokens}",
                 full, few, fid, boot, seeds, paper.FEW_STEPS, worse_only=True),
        _compare(f"**{par.short_label} vs {seq.short_label}, one guidance (cfg {format_cfg(s['cfg_default'])}).** "
                 f"{par.short_label} at {s['steps_default']} steps vs {seq.short_label}", theirs, ours, fid, boot,
                 seeds, paper.VERSUS_RASTER),
    ]
    if par.name in choices and seq.name in choices:  # chosen on selection sets the figures never saw
        best = {name: choices[name].point for name in (par.name, seq.name)}
        how = "chosen on a selection set drawn with another sampling seed"
    else:
        best = {d.name: min((p for p in guidance if p.point.model == d.name and fid in p.metrics),
                            key=lambda p: p.metrics[fid], default=None) for d in (par, seq)}
        how = "the best of the sweep, chosen on these same figures: optimistic for both"
    if best[par.name] and best[seq.name]:
        lines.append(_compare(
            f"**{par.short_label} vs {seq.short_label}, each at its own guidance** ({par.short_label} cfg "
            f"{format_cfg(best[par.name].point.cfg)}, {seq.short_label} cfg {format_cfg(best[seq.name].point.cfg)}, "
            f"{how})", best[seq.name], best[par.name], fid, boot, seeds, paper.VERSUS_RASTER))
    lines += _speed_lines(params, profile, par, seq)
    lines.append(_training_noise(seeds, few, fid, par, s["steps_default"]))
    lines = [line for line in lines if line][:MAX_LINES]
    return ["## What this study finds\n", *(f"- {line}" for line in lines), "",
            ("Intervals: 95%; over training seeds where a mean of seeds is shown (section \"Across training "
             "seeds\"), otherwise the sampling noise of one model's sample set" if seeds.several else
             "Intervals: 95%, sampling noise of each point (below)") + f"; paper figures: {paper.SOURCE}.\n"]


def _tokens(points: list[Point], seq) -> int | None:
    steps = [p.point.steps for p in points if seq is not None and p.point.model == seq.name]
    return max(steps) if steps else None


def _compare(what: str, a: Point | None, b: Point | None, fid: str, boot: Bootstrap, seeds: Seeds | None,
             claim: paper.Claim, worse_only: bool = False) -> str:
    """`what`: b against a on `fid` (lower is better), the difference's interval, the paper's figure and
    the verdict. worse_only: the paper claims b is no worse (agree unless b is worse beyond the noise);
    otherwise that b is better (agree only when b is better beyond the noise)."""
    if a is None or b is None or fid not in a.metrics or fid not in b.metrics:
        return ""
    judged = judge(a, b, fid, boot, seeds)
    diff, lo, hi = judged.diff, judged.lo, judged.hi
    shown = [with_interval(b, fid), with_interval(a, fid)]
    if judged.noise == SEEDS:
        shown = [f"{seeds.of(p, fid).mean:.4g} ± {seeds.of(p, fid).half:.2g}" for p in (b, a)]
        shown[0] += f" (mean of {len(seeds.seeds)} training seeds)"
    if lo is None:
        verdict, interval = "Cannot tell (no intervals)", ""
    else:
        interval = f", {boot.level or 0.95:.0%} [{lo:.3g}, {hi:.3g}]"
        better, worse = hi < 0, lo > 0
        if worse_only:
            verdict = "Disagrees" if worse else "Agrees"
        else:
            verdict = "Agrees" if better else "Disagrees" if worse else "Cannot tell at this scale"
        verdict += " (beyond the noise)" if better or worse else " (within the noise)"
    return (f"{what}: `{fid}` {shown[0]} vs {shown[1]} ({diff:+.3g}{interval}). "
            f"Paper: {claim.text}. **{verdict}.**")


def _training_noise(seeds: Seeds, p: Point | None, fid: str, par, steps: int) -> str:
    c = seeds.of(p, fid) if p is not None else None
    if c is None or c.between_sd is None:
        return (f"**Training noise: cannot tell at this scale.** Every interval here resamples one trained model "
                f"per decoder; paper section 6: {paper.TRAINING_NOISE.text}. Until training is replicated over "
                "seeds (`train.seeds`), a verdict above may not survive retraining.")
    ratio = c.between_sd / c.within_sd if c.within_sd else float("inf")
    return (f"**Training noise, measured.** {par.short_label} at {steps} steps over {c.seeds} training seeds: "
            f"between-training sd of `{fid}` {c.between_sd:.3g} against a sampling se of {c.within_sd:.3g} "
            f"({ratio:.2g}x; {c.seeds} seeds make it a rough estimate). Paper section 6: "
            f"{paper.TRAINING_NOISE.text}. **" + ("Agrees in direction" if ratio > 1 else "Disagrees at this scale")
            + ".** The comparisons above use intervals over seeds.")


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
