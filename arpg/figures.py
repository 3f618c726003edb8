"""Every matplotlib figure of the study, each drawn by one function here.

The profile's figures (`profile_figures`) are drawn from its document (profile.json); the report
draws the same ones from the same file, so a figure name means one figure wherever it appears.
The report's quality figures take plain rows. All are written by `arpg.utils.save_figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from arpg.decoders import DECODERS, in_native_order
from arpg.report_catalog import MEMORY_PNG as MEMORY, THROUGHPUT_PNG as THROUGHPUT
from arpg.utils import save_figure

# The profile's figures, in the order `profile_figures` writes them (the report draws the first two
# too, under the names arpg/report_catalog.py gives them).
SPEEDUP = "speedup_vs_steps.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _yerr(half_widths: Iterable[float | None]) -> list[float] | None:
    """Error-bar half-widths for matplotlib (0 where a point has none; None when no point has one)."""
    half_widths = list(half_widths)
    return None if all(h is None for h in half_widths) else [0.0 if h is None else h for h in half_widths]


def _per_model_axes(plt, models: list[str]):
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    return fig, zip(axes[0], models)


def _log_steps_axis(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decoding steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------- profile (profile.json)

def _speedup_pair() -> str:
    """'ARPG / raster': the profile's speed-ups are each parallel decoder over each sequential one."""
    short = [[d.short_label for d in DECODERS.values() if d.parallel is p] for p in (True, False)]
    return f"{' | '.join(short[0])} / {' | '.join(short[1])}"


def _ok_rows(doc: Mapping) -> list[dict]:
    """Measured rows in each decoder's own order (the strategies' rows go to the quality vs speed plot)."""
    return [r for r in doc["rows"] if r["status"] == "ok" and in_native_order(r)]


def _models(doc: Mapping) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in doc["rows"]))


def throughput_vs_steps(doc: Mapping, path: Path) -> Path:
    """images/s vs steps per model: parallel decoders as curves (spread as error bars, +VQ decode dashed),
    sequential ones as lines."""
    plt = _plt()
    ok = _ok_rows(doc)
    fig, panels = _per_model_axes(plt, _models(doc))
    for ax, model in panels:
        series = sorted({(r["batch"], r["precision"]) for r in ok if r["model"] == model})
        several = len({p for _, p in series}) > 1
        for i, (batch, precision) in enumerate(series):
            color, tag = f"C{i}", f"b={batch}" + (f" {precision}" if several else "")
            mine = [r for r in ok if (r["model"], r["batch"], r["precision"]) == (model, batch, precision)]
            for d in (d for d in DECODERS.values() if d.parallel):
                rows = sorted((r for r in mine if r["kind"] == d.name), key=lambda r: r["steps"])
                if not rows:
                    continue
                steps = [r["steps"] for r in rows]
                ax.errorbar(steps, [r["gen_img_s_median"] for r in rows],
                            yerr=[[r["gen_img_s_median"] - r["gen_img_s_min"] for r in rows],
                                  [r["gen_img_s_max"] - r["gen_img_s_median"] for r in rows]],
                            color=color, marker="o", label=f"{d.short_label} {tag}")
                if rows[0].get("e2e_img_s_median"):
                    ax.plot(steps, [r["e2e_img_s_median"] for r in rows], color=color, ls="--", marker=".",
                            label=f"{d.short_label} {tag} (+VQ decode)")
            for r in mine:
                d = DECODERS.get(r["kind"])
                if d is not None and not d.parallel:
                    ax.axhline(r["gen_img_s_median"], color=color, ls=":",
                               label=f"{d.short_label} {tag} ({r['steps']} steps)")
        _log_steps_axis(ax, "images / s", model)
    return save_figure(fig, path)


def memory(doc: Mapping, path: Path) -> Path:
    """Generation memory and analytic KV cache, the decoders side by side, per model and batch."""
    plt = _plt()
    ok = _ok_rows(doc)
    models = _models(doc)
    groups = sorted({(r["model"], r["batch"]) for r in ok}, key=lambda g: (models.index(g[0]), g[1]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / (2 * len(DECODERS))
    bars = [(d, what, key) for what, key in (("gen. memory", "gen_mem_bytes"), ("KV cache", "kv_cache_bytes"))
            for d in DECODERS.values()]
    for j, (d, what, key) in enumerate(bars):
        heights = []
        for model, batch in groups:
            vals = [r[key] for r in ok if (r["model"], r["batch"], r["kind"]) == (model, batch, d.name)]
            heights.append(max(vals) / 2**20 if vals else 0.0)
        cache = j >= len(DECODERS)  # the second half of the bars: the analytic KV cache
        ax.bar([i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))], heights, width,
               label=f"{d.short_label} {what}", color=f"C{j % len(DECODERS)}", hatch="//" if cache else None,
               alpha=0.5 if cache else 1.0)
    ax.set_xticks(range(len(groups)), [f"{m}\nb={b}" for m, b in groups])
    ax.set_ylabel("MiB above the loaded model\n(generation peak, max over steps)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def speedup_vs_steps(doc: Mapping, path: Path) -> Path:
    """Parallel / sequential images/s vs steps per model and batch, with the step ratio n/S."""
    plt = _plt()
    gains = doc["speedups"]
    fig, panels = _per_model_axes(plt, _models(doc))
    for ax, model in panels:
        mine = [g for g in gains if g["model"] == model]
        series = sorted({(g["batch"], g["precision"]) for g in mine})
        several = len({p for _, p in series}) > 1
        for i, (batch, precision) in enumerate(series):
            pts = sorted((g for g in mine if (g["batch"], g["precision"]) == (batch, precision)),
                         key=lambda g: g["steps"])
            ax.plot([g["steps"] for g in pts], [g["speedup_gen"] for g in pts], marker="o", color=f"C{i}",
                    label=f"speed-up b={batch}" + (f" {precision}" if several else ""))
        if mine:
            pts = sorted({(g["steps"], g["step_ratio"]) for g in mine})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="step ratio n/S")
        _log_steps_axis(ax, f"{_speedup_pair()} images/s", model)
    return save_figure(fig, path)


def profile_figures(doc: Mapping, out_dir: Path) -> list[Path]:
    """images/s vs steps per model, memory bars, speed-up vs steps: PNGs in out_dir."""
    return [throughput_vs_steps(doc, out_dir / THROUGHPUT), memory(doc, out_dir / MEMORY),
            speedup_vs_steps(doc, out_dir / SPEEDUP)]


# --------------------------------------------------------------------------- report (quality)

Curve = Sequence[tuple[float, float, float | None]]  # (x, y, interval half-width or None)


def fid_vs_steps(path: Path, curves: Mapping[str, Mapping[str, Curve]], level: float | None = None) -> Path:
    """One panel per FID column: {column: {decoder name: [(steps, fid, half-width)]}}, with the
    half-widths (intervals at `level`) as error bars where known."""
    panels = {col: {(f"{d.label} ({d.native_order} order)" if d.parallel else d.label):
                    ("o-" if d.parallel else "s", by_model[d.name])
                    for d in DECODERS.values() if by_model.get(d.name)} for col, by_model in curves.items()}
    return curves_vs_steps(path, panels, level)


def curves_vs_steps(path: Path, panels: Mapping[str, Mapping[str, tuple[str, Curve]]],
                    level: float | None = None) -> Path:
    """One panel per metric column: {column: {legend label: (matplotlib fmt, [(steps, value, half-width)])}},
    log-2 steps axis, the half-widths (intervals at `level`) as error bars where known."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (col, lines) in zip(axes[0], panels.items()):
        for label, (fmt, pts) in lines.items():
            xs, ys, halves = zip(*pts)
            ax.errorbar(xs, ys, yerr=_yerr(halves), fmt=fmt, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decoding steps")
        bars = level is not None and any(h is not None for _, pts in lines.values() for _, _, h in pts)
        ax.set_ylabel(f"{col} (bars: {level:.0%} interval)" if bars else col)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def fid_vs_throughput(path: Path, pairs: list[dict], front: list[dict], fid_col: str) -> Path:
    """FID against images/s of the study models (pairs: rows with `img_s`, `fid_col`, its `_lo` / `_hi`,
    `model`, `order`, `steps`, `batch`), one series per decoder and order (decoding strategies as
    triangles), each point labelled with its steps, and the Pareto front dotted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    series = list(dict.fromkeys((p["model"], p["order"]) for p in pairs))
    for d in DECODERS.values():  # each decoder in its own order first, then its strategies
        for model, order in sorted((s for s in series if s[0] == d.name), key=lambda s: s[1] != d.native_order):
            pts = [p for p in pairs if (p["model"], p["order"]) == (model, order)]
            halves = [None if p.get(f"{fid_col}_lo") is None else (p[f"{fid_col}_hi"] - p[f"{fid_col}_lo"]) / 2
                      for p in pts]
            native = order == d.native_order
            ax.errorbar([p["img_s"] for p in pts], [p[fid_col] for p in pts], yerr=_yerr(halves),
                        fmt=("o" if d.parallel else "s") if native else "^", capsize=3,
                        label=model if native else f"{model}, {order}")
            for p in pts:
                ax.annotate(str(p["steps"]), (p["img_s"], p[fid_col]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    if front:
        ax.plot([p["img_s"] for p in front], [p[fid_col] for p in front], "k:", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"images / s (study models, batch {pairs[0]['batch']})")
    ax.set_ylabel(fid_col)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def guidance_frontier(path: Path, curves: Mapping[str, list[tuple[float, float, float | None, float, float | None]]],
                      fid_col: str, acc_col: str) -> Path:
    """Each decoder's guidance frontier: {decoder name: [(cfg, fid, half-width, accuracy, half-width)]},
    FID against class accuracy, a point per guidance value (labelled), intervals as bars."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in DECODERS.values():
        pts = sorted(curves.get(d.name, []))
        if not pts:
            continue
        ax.errorbar([p[3] for p in pts], [p[1] for p in pts], xerr=_yerr(p[4] for p in pts),
                    yerr=_yerr(p[2] for p in pts), fmt="o-" if d.parallel else "s-", capsize=3, label=d.label)
        for cfg, fid, _, acc, _ in pts:
            ax.annotate(f"cfg {cfg:g}", (acc, fid), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(acc_col)
    ax.set_ylabel(fid_col)
    ax.set_title("Guidance frontier (lower right is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
