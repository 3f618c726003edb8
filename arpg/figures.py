"""Every matplotlib figure of the study, each drawn by one function here.

The profile's figures (`profile_figures`) are drawn from its document (profile.json); the report
draws the same ones from the same file, so a figure name means one figure wherever it appears.
The report's quality figures take plain rows. All are written by `arpg.utils.save_figure`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

from arpg.utils import save_figure

# The profile's figures, in the order `profile_figures` writes them.
THROUGHPUT = "throughput_vs_steps.png"
MEMORY = "memory.png"
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
    ax.set_xlabel("ARPG steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------- profile (profile.json)

def _ok_rows(doc: Mapping) -> list[dict]:
    return [r for r in doc["rows"] if r["status"] == "ok"]


def _models(doc: Mapping) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in doc["rows"]))


def throughput_vs_steps(doc: Mapping, path: Path) -> Path:
    """images/s vs ARPG steps per model (spread as error bars, +VQ decode dashed), raster as a line."""
    plt = _plt()
    ok = _ok_rows(doc)
    fig, panels = _per_model_axes(plt, _models(doc))
    for ax, model in panels:
        for i, batch in enumerate(sorted({r["batch"] for r in ok if r["model"] == model})):
            color = f"C{i}"
            arpg = sorted((r for r in ok if (r["model"], r["kind"], r["batch"]) == (model, "arpg", batch)),
                          key=lambda r: r["steps"])
            if arpg:
                steps = [r["steps"] for r in arpg]
                ax.errorbar(steps, [r["gen_img_s_median"] for r in arpg],
                            yerr=[[r["gen_img_s_median"] - r["gen_img_s_min"] for r in arpg],
                                  [r["gen_img_s_max"] - r["gen_img_s_median"] for r in arpg]],
                            color=color, marker="o", label=f"ARPG b={batch}")
                if arpg[0].get("e2e_img_s_median"):
                    ax.plot(steps, [r["e2e_img_s_median"] for r in arpg], color=color, ls="--", marker=".",
                            label=f"ARPG b={batch} (+VQ decode)")
            for r in ok:
                if (r["model"], r["kind"], r["batch"]) == (model, "raster", batch):
                    ax.axhline(r["gen_img_s_median"], color=color, ls=":",
                               label=f"raster b={batch} ({r['steps']} steps)")
        _log_steps_axis(ax, "images / s", model)
    return save_figure(fig, path)


def memory(doc: Mapping, path: Path) -> Path:
    """Generation memory and analytic KV cache, ARPG beside raster, per model and batch."""
    plt = _plt()
    ok = _ok_rows(doc)
    models = _models(doc)
    groups = sorted({(r["model"], r["batch"]) for r in ok}, key=lambda g: (models.index(g[0]), g[1]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.2
    for j, (kind, what, key) in enumerate([("arpg", "ARPG gen. memory", "gen_mem_bytes"),
                                           ("raster", "raster gen. memory", "gen_mem_bytes"),
                                           ("arpg", "ARPG KV cache", "kv_cache_bytes"),
                                           ("raster", "raster KV cache", "kv_cache_bytes")]):
        heights = []
        for model, batch in groups:
            vals = [r[key] for r in ok if (r["model"], r["batch"], r["kind"]) == (model, batch, kind)]
            heights.append(max(vals) / 2**20 if vals else 0.0)
        ax.bar([i + (j - 1.5) * width for i in range(len(groups))], heights, width, label=what,
               color=f"C{j % 2}", hatch="//" if j >= 2 else None, alpha=1.0 if j < 2 else 0.5)
    ax.set_xticks(range(len(groups)), [f"{m}\nb={b}" for m, b in groups])
    ax.set_ylabel("MiB above the loaded model\n(generation peak, max over steps)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def speedup_vs_steps(doc: Mapping, path: Path) -> Path:
    """ARPG / raster images/s vs ARPG steps per model and batch, with the step ratio n/S."""
    plt = _plt()
    gains = doc["speedups"]
    fig, panels = _per_model_axes(plt, _models(doc))
    for ax, model in panels:
        mine = [g for g in gains if g["model"] == model]
        for i, batch in enumerate(sorted({g["batch"] for g in mine})):
            pts = sorted((g for g in mine if g["batch"] == batch), key=lambda g: g["steps"])
            ax.plot([g["steps"] for g in pts], [g["speedup_gen"] for g in pts], marker="o", color=f"C{i}",
                    label=f"speed-up b={batch}")
        if mine:
            pts = sorted({(g["steps"], g["step_ratio"]) for g in mine})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="step ratio n/S")
        _log_steps_axis(ax, "ARPG / raster images/s", model)
    return save_figure(fig, path)


def profile_figures(doc: Mapping, out_dir: Path) -> list[Path]:
    """images/s vs steps per model, memory bars, speed-up vs steps: PNGs in out_dir."""
    return [throughput_vs_steps(doc, out_dir / THROUGHPUT), memory(doc, out_dir / MEMORY),
            speedup_vs_steps(doc, out_dir / SPEEDUP)]


# --------------------------------------------------------------------------- report (quality)

Curve = Sequence[tuple[float, float, float | None]]  # (x, y, interval half-width or None)


def fid_vs_steps(path: Path, curves: Mapping[str, Mapping[str, Curve]], level: float | None = None) -> Path:
    """One panel per FID column: {column: {"arpg" | "raster": [(steps, fid, half-width)]}}, with the
    half-widths (intervals at `level`) as error bars where known."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (col, by_model) in zip(axes[0], curves.items()):
        for model, marker in (("arpg", "o-"), ("raster", "s")):
            pts = by_model.get(model)
            if pts:
                xs, ys, halves = zip(*pts)
                ax.errorbar(xs, ys, yerr=_yerr(halves), fmt=marker, capsize=3,
                            label="ARPG (random order)" if model == "arpg" else "raster baseline")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decoding steps")
        bars = level is not None and any(h is not None for pts in by_model.values() for _, _, h in pts)
        ax.set_ylabel(f"{col} (bars: {level:.0%} interval)" if bars else col)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def fid_vs_throughput(path: Path, pairs: list[dict], front: list[dict], fid_col: str) -> Path:
    """FID against images/s of the study models (pairs: rows with `img_s`, `fid_col`, its `_lo` / `_hi`,
    `model`, `steps`, `batch`), each point labelled with its steps, and the Pareto front dotted."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, marker in (("arpg", "o"), ("raster", "s")):
        pts = [p for p in pairs if p["model"] == model]
        if not pts:
            continue
        halves = [None if p.get(f"{fid_col}_lo") is None else (p[f"{fid_col}_hi"] - p[f"{fid_col}_lo"]) / 2
                  for p in pts]
        ax.errorbar([p["img_s"] for p in pts], [p[fid_col] for p in pts], yerr=_yerr(halves), fmt=marker,
                    capsize=3, label=model)
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
