"""Render the study report (markdown, CSV tables, PNG plots, copied grids and galleries).

Every number comes from a stage output listed by `arpg.pipeline.report_inputs`;
a missing output is an error naming the file and the stage that writes it. The
report says which feature extractor each metric used and on what hardware the
timings were taken. Quality figures carry the bootstrap intervals `arpg evaluate`
stored beside them, and "Which differences exceed the noise" tests the sweeps'
differences against them.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, Iterable, Mapping

from arpg import pipeline
from arpg.config import token_count
from arpg.errors import ArpgError
from arpg.paths import Layout, SweepPoint, format_cfg
from arpg.utils import save_figure

# What each evaluate.extractors entry measures in (stated next to every metric).
EXTRACTOR_TEXT = {
    "classifier": "the study's own CNN classifier (`arpg train-classifier`, trained on the prepared data): "
                  "penultimate-layer features for FID/KID/precision-recall, its softmax for IS and accuracy",
    "inception-fid": "Inception-v3 with the TF-FID weights (pool3, 2048-d; the weights of the ADM / TTUR "
                     "evaluators), images resized to 299x299",
    "inception": "Inception-v3 from the user-given weights file `evaluate.inception_weights` "
                 "(paper protocol; samples also exported as an ADM `.npz`)",
}
# Keys of a metrics JSON that describe the point rather than measure it.
_POINT_KEYS = {"model", "steps", "cfg", "order", "seed", "tag", "num_samples"}


@dataclass
class Point:
    point: SweepPoint
    metrics: dict[str, float]
    intervals: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # metric -> {"se", "lo", "hi", ...}
    bootstrap: Mapping[str, Any] | None = None  # the metrics file's "bootstrap" record (None: it has none)

    def band(self, metric: str) -> tuple[float, float, float] | None:
        """(se, lo, hi) of `metric` when its metrics file holds a finite interval for it."""
        entry = self.intervals.get(metric)
        if not isinstance(entry, Mapping):
            return None
        values = tuple(entry.get(k) for k in ("se", "lo", "hi"))
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return values  # type: ignore[return-value]
        return None


def _read_json(path: Path, stage: str) -> Any:
    if not path.is_file():
        raise ArpgError(f"{path} not found: the report needs the output of `arpg {stage}`; "
                        "run the pipeline (`snakemake --cores all`) or that stage first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArpgError(f"{path} is not valid JSON ({exc}); rerun `arpg {stage}`") from exc


def numeric_leaves(obj: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts to dotted keys, keeping finite numbers (not booleans)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out.update(numeric_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


def suffix(extractor: str) -> str:
    """How evaluate names metrics: fid_<suffix>, 'inception-fid' -> 'inception_fid'."""
    return extractor.replace("-", "_")


def extractor_of(metric: str, extractors: Iterable[str]) -> str | None:
    """The extractor a metric column was computed with, from its name (`fid_inception-fid`)."""
    for name in sorted(extractors, key=len, reverse=True):  # 'inception-fid' before 'inception'
        if metric.endswith((f"_{name}", f"_{suffix(name)}")):
            return name
    if "accuracy" in metric and "classifier" in extractors:
        return "classifier"
    return None


# --------------------------------------------------------------------------- reading

def point_of(job: pipeline.Job) -> SweepPoint:
    w = job.wildcards
    return SweepPoint(w["model"], int(w["steps"]), float(w["cfg"]), w["order"])


def read_points(params, layout: Layout) -> list[Point]:
    points = []
    for job in pipeline.jobs(params):
        if job.rule != "evaluate":
            continue
        point = point_of(job)
        doc = _read_json(layout.metrics(point), f"evaluate --model {point.model} --steps {point.steps} "
                         f"--cfg {format_cfg(point.cfg)} --order {point.order}")
        # the interval records are read apart: flattened they would pose as metric columns
        intervals = doc.pop("intervals", None) or {}
        bootstrap = doc.pop("bootstrap", None)
        metrics = {k: v for k, v in numeric_leaves(doc).items() if k not in _POINT_KEYS}
        points.append(Point(point, metrics, intervals, bootstrap))
    return points


def metric_columns(points: list[Point]) -> list[str]:
    cols: dict[str, None] = {}
    for p in points:
        cols.update(dict.fromkeys(p.metrics))
    return sorted(cols, key=lambda c: (not c.startswith("fid"), not c.startswith("is_"), c))


def _row(p: Point, cols: list[str]) -> dict[str, Any]:
    """CSV row: the metrics and, where known, their `<metric>_se`, `_lo`, `_hi`."""
    row = {"model": p.point.model, "steps": p.point.steps, "cfg": format_cfg(p.point.cfg), "order": p.point.order,
           **{c: p.metrics.get(c) for c in cols}}
    for c in cols:
        band = p.band(c)
        if band is not None:
            row.update(zip((f"{c}_se", f"{c}_lo", f"{c}_hi"), band))
    return row


def _md_row(p: Point, cols: list[str]) -> dict[str, Any]:
    """Markdown row: each metric as `value ± half-width` of its interval (the bare value without one)."""
    return {**_row(p, []), **{c: with_interval(p, c) for c in cols}}


def interval_columns(cols: list[str], points: list[Point]) -> list[str]:
    """The metric columns, each followed by `<metric>_se`, `_lo`, `_hi` when some point has its interval."""
    known = {c for p in points for c in cols if p.band(c) is not None}
    return [name for c in cols for name in ([c, f"{c}_se", f"{c}_lo", f"{c}_hi"] if c in known else [c])]


def half_width(p: Point, metric: str) -> float | None:
    band = p.band(metric)
    return None if band is None else (band[2] - band[1]) / 2


def _fmt_half(value: float) -> str:
    return f"{value:.2g}"


def with_interval(p: Point, metric: str) -> Any:
    """`21.74 ± 1.9` (interval half-width to 2 significant digits), or the bare value."""
    value, half = p.metrics.get(metric), half_width(p, metric)
    return value if value is None or half is None else f"{_fmt(value)} ± {_fmt_half(half)}"


def step_sweep(params, points: list[Point]) -> list[Point]:
    """ARPG over steps (random order, default cfg) and the raster baseline at the default cfg."""
    cfg = float(params["sample"]["cfg_default"])
    rows = [p for p in points if p.point.cfg == cfg and (
        (p.point.model == "arpg" and p.point.order == "random") or p.point.model == "raster")]
    return sorted(rows, key=lambda p: (p.point.model, p.point.steps))


def guidance_sweep(params, points: list[Point]) -> list[Point]:
    steps = params["sample"]["steps_default"]
    rows = [p for p in points if (p.point.model == "raster" or
                                  (p.point.steps == steps and p.point.order == "random"))]
    return sorted(rows, key=lambda p: (p.point.model, p.point.cfg))


def order_sweep(params, points: list[Point]) -> list[Point]:
    s = params["sample"]
    rows = [p for p in points if p.point.model == "arpg" and p.point.steps == s["steps_default"]
            and p.point.cfg == float(s["cfg_default"])]
    return sorted(rows, key=lambda p: p.point.order)


# --------------------------------------------------------------------------- noise

@dataclass(frozen=True)
class Bootstrap:
    """What the metrics files say about their intervals (one study: one record, in principle)."""

    replicates: list[int]  # distinct replicate counts over the points that have intervals
    level: float | None  # interval level (None: no point has intervals)
    methods: list[str]
    kid_subsets: list[int]
    points_without: int  # points whose file has no intervals (bootstrap 0, or written before intervals)

    @property
    def on(self) -> bool:
        return self.level is not None

    @property
    def z(self) -> float:
        """Two-sided normal quantile of the level (1.96 at 95%)."""
        return NormalDist().inv_cdf(0.5 + self.level / 2)


def bootstrap_of(points: list[Point]) -> Bootstrap:
    with_band = [p for p in points if p.bootstrap and p.bootstrap.get("replicates") and p.intervals]
    records = [p.bootstrap for p in with_band]
    levels = sorted({float(r["level"]) for r in records})
    if len(levels) > 1:
        raise ArpgError(f"metrics files disagree on the bootstrap level ({levels}); rerun `arpg evaluate` "
                        "for every point (snakemake --cores all)")
    return Bootstrap(replicates=sorted({int(r["replicates"]) for r in records}),
                     level=levels[0] if levels else None,
                     methods=sorted({str(r.get("method")) for r in records if r.get("method")}),
                     kid_subsets=sorted({int(r["kid_subsets"]) for r in records if r.get("kid_subsets")}),
                     points_without=len(points) - len(with_band))


def interval_text(boot: Bootstrap) -> str:
    """One paragraph: how the quality tables' intervals were made (or that there are none)."""
    if not boot.on:
        return ("Intervals are off (`evaluate.bootstrap: 0`, or metrics files written without intervals): the "
                "tables show bare point estimates.\n")
    count = " or ".join(str(b) for b in boot.replicates)
    text = (f"Figures read `value ± h`: the full sample set's value and the half-width h of its {boot.level:.0%} "
            f"interval (value ± {boot.z:.2f} se), from {count} bootstrap replicates per point "
            f"({'; '.join(boot.methods)}). CSVs: `<metric>_se`, `<metric>_lo`, `<metric>_hi`.")
    if boot.kid_subsets:
        text += (f" Within a replicate KID averages {' or '.join(map(str, boot.kid_subsets))} random subsets, "
                 "fewer than its headline value does, so its interval also carries that average's subset noise "
                 "(slightly wide).")
    if boot.points_without:
        text += f" {boot.points_without} point(s) have no interval (bare numbers)."
    return text + "\n"


def noise_comparisons(params, points: list[Point]) -> list[tuple[str, Point, Point]]:
    """(group, a, b) pairs whose difference b - a the report tests: every ARPG step count against the
    raster baseline (default cfg) and each step count against the next; every guidance value against
    the default cfg (each model); every order against random (ARPG at the default steps and cfg)."""
    s = params["sample"]
    cfg = float(s["cfg_default"])
    sweep = step_sweep(params, points)
    arpg = [p for p in sweep if p.point.model == "arpg"]
    out = [("steps", base, p) for base in sweep if base.point.model == "raster" for p in arpg]
    out += [("steps", a, b) for a, b in zip(arpg, arpg[1:])]
    guidance = guidance_sweep(params, points)
    for model in pipeline.MODELS:
        rows = [p for p in guidance if p.point.model == model]
        out += [("guidance", base, p) for base in rows if base.point.cfg == cfg for p in rows if p is not base]
    orders = order_sweep(params, points)
    out += [("orders", base, p) for base in orders if base.point.order == "random" for p in orders if p is not base]
    return out


def point_label(group: str, p: SweepPoint) -> str:
    """A point as the comparisons name it (the group's fixed settings are said once, in the text)."""
    name = "ARPG" if p.model == "arpg" else "raster"
    if group == "steps":
        return f"ARPG {p.steps} steps" if p.model == "arpg" else "raster"
    if group == "guidance":
        return f"{name} cfg {format_cfg(p.cfg)}"
    return f"{p.order} order"


def difference_rows(params, points: list[Point], metrics: list[str], boot: Bootstrap) -> list[dict[str, Any]]:
    """Per comparison and metric: both values, b - a, its interval (independent sets: se = sqrt(se_a^2 +
    se_b^2)) and whether it excludes 0 (None: a point has no interval)."""
    rows = []
    for group, a, b in noise_comparisons(params, points):
        for metric in metrics:
            va, vb = a.metrics.get(metric), b.metrics.get(metric)
            if va is None or vb is None:
                continue
            diff = vb - va
            band_a, band_b = a.band(metric), b.band(metric)
            row = {"group": group, "comparison": f"{point_label(group, b.point)} vs {point_label(group, a.point)}",
                   "metric": metric, "a": va, "b": vb, "diff": diff, "diff_se": None, "diff_lo": None,
                   "diff_hi": None, "significant": None, "_a": a, "_b": b}
            if boot.on and band_a is not None and band_b is not None:
                se = math.hypot(band_a[0], band_b[0])
                row.update(diff_se=se, diff_lo=diff - boot.z * se, diff_hi=diff + boot.z * se,
                           significant=abs(diff) > boot.z * se)
            rows.append(row)
    return rows


def _verdict(row: Mapping[str, Any]) -> str:
    return {True: "yes", False: "no", None: "no interval"}[row["significant"]]


def _signed(value: float) -> str:
    return ("+" if value > 0 else "") + _fmt(value)


def noise_section(params, points: list[Point], metrics: list[str], boot: Bootstrap) -> tuple[list[str], list[dict]]:
    """Markdown of "Which differences exceed the noise" and its CSV rows."""
    s = params["sample"]
    md = ["## Which differences exceed the noise\n"]
    if not boot.on:
        md.append("Intervals are off (`evaluate.bootstrap: 0`, or metrics files without intervals), so no "
                  "difference between sweep points can be told from sampling noise. Set `evaluate.bootstrap` "
                  "(e.g. 20) and rerun `arpg evaluate` to get them.\n")
        return md, []
    rows = difference_rows(params, points, metrics, boot)
    count = " or ".join(str(b) for b in boot.replicates)
    md.append(
        f"Compared: each ARPG step count against the raster baseline and against the next step count (random "
        f"order, cfg {format_cfg(s['cfg_default'])}); each guidance value against cfg "
        f"{format_cfg(s['cfg_default'])} (ARPG at {s['steps_default']} steps, and the raster baseline); each "
        f"order against random (ARPG, {s['steps_default']} steps, cfg {format_cfg(s['cfg_default'])}). "
        f"Metrics: {', '.join(f'`{m}`' for m in metrics)}. A difference b - a exceeds the noise at "
        f"{boot.level:.0%} when |b - a| > {boot.z:.2f} * sqrt(se_a^2 + se_b^2), with each se from {count} "
        f"bootstrap replicates of that point's generated set ({'; '.join(boot.methods)}). This treats the two "
        "sample sets as independent. They share their sampling seeds (same labels, same per-batch generator "
        "seeds), which most likely correlates their errors positively; the real interval of the difference is "
        "then narrower, so the test is conservative: it may miss a small real difference. Nor is it corrected "
        f"for the number of comparisons ({len(rows)} here; at 95% about one in twenty differences that are "
        "pure noise still passes).\n")
    for group, title in (("steps", "Steps"), ("guidance", "Guidance"), ("orders", "Orders")):
        for metric in metrics:
            sel = [r for r in rows if r["group"] == group and r["metric"] == metric]
            if not sel:
                continue

            def listed(verdict):
                return "; ".join(f"{r['comparison']} ({_signed(r['diff'])}, {boot.level:.0%} "
                                 f"[{_fmt(r['diff_lo'])}, {_fmt(r['diff_hi'])}])" if r["significant"] is not None
                                 else f"{r['comparison']} ({_signed(r['diff'])})"
                                 for r in sel if r["significant"] is verdict) or "none"

            md.append(f"- **{title}**, `{metric}`: exceed the noise: {listed(True)}. Within the noise: "
                      f"{listed(False)}." + (f" No interval: {listed(None)}." if any(
                          r["significant"] is None for r in sel) else ""))
    md.append("")
    table = [{"comparison": r["comparison"], "metric": r["metric"], "a": with_interval(r["_a"], r["metric"]),
              "b": with_interval(r["_b"], r["metric"]), "b - a": _signed(r["diff"]),
              f"{boot.level:.0%} interval of b - a": "-" if r["diff_lo"] is None
              else f"[{_fmt(r['diff_lo'])}, {_fmt(r['diff_hi'])}]", "exceeds the noise": _verdict(r)}
             for r in rows]
    md.append(markdown_table(table))
    csv_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    return md, csv_rows


DIFFERENCE_COLUMNS = ["group", "comparison", "metric", "a", "b", "diff", "diff_se", "diff_lo", "diff_hi",
                      "significant"]


# --------------------------------------------------------------------------- speed

def speed_rows(profile_doc: Mapping) -> list[dict[str, Any]]:
    rows = []
    for r in profile_doc["rows"]:
        if r.get("status") != "ok":
            continue
        rows.append({"model": r["model"], "kind": r["kind"], "net": r.get("net"), "steps": r["steps"],
                     "batch": r["batch"], "img_s": r["gen_img_s_median"], "img_s_e2e": r.get("e2e_img_s_median"),
                     "peak_mem_mib": _mib(r.get("peak_mem_bytes")), "gen_mem_mib": _mib(r.get("gen_mem_bytes")),
                     "kv_cache_mib": _mib(r.get("kv_cache_bytes")), "mem_kind": r.get("mem_kind")})
    return rows


def _mib(value) -> float | None:
    return None if value in (None, "") else float(value) / 2**20


def hardware(profile_doc: Mapping) -> str:
    meta = profile_doc.get("meta", {})
    rows = [r for r in profile_doc["rows"] if r.get("status") == "ok"] or profile_doc["rows"]
    if not rows:
        raise ArpgError("profile.json has no rows; rerun `arpg profile`")
    r = rows[0]
    device = r.get("device_name") or r.get("device")
    parts = [f"device {device} ({r.get('device')})", f"CPU {meta.get('cpu') or r.get('cpu')}",
             f"{r.get('threads')} threads", f"{meta.get('cpu_count')} logical cores",
             f"precision {r.get('precision')}", f"torch {meta.get('torch') or r.get('torch')}"]
    if "load_avg_1m" in meta:
        parts.append(f"1-min load average {meta['load_avg_1m']:.2f} when profiling started")
    if meta.get("time"):
        parts.append(f"measured {meta['time']}")
    return ", ".join(str(p) for p in parts)


def pareto_pairs(points: list[Point], speed: list[dict], fid_col: str) -> list[dict[str, Any]]:
    """Study points joined with the throughput of the study's own models at the same step count
    (with the FID's interval, `<fid>_lo` / `_hi`, None where the point has none)."""
    study = [r for r in speed if r["model"] == "default"]
    if not study:
        return []
    batch = max(r["batch"] for r in study)
    timing = {(r["kind"], r["steps"]): r for r in study if r["batch"] == batch}
    out = []
    for p in points:
        t = timing.get((p.point.model, p.point.steps))
        if t is not None and p.metrics.get(fid_col) is not None:
            band = p.band(fid_col)
            out.append({"model": p.point.model, "steps": p.point.steps, "cfg": format_cfg(p.point.cfg),
                        "order": p.point.order, "img_s": t["img_s"], "batch": batch, fid_col: p.metrics[fid_col],
                        f"{fid_col}_lo": None if band is None else band[1],
                        f"{fid_col}_hi": None if band is None else band[2]})
    return out


# --------------------------------------------------------------------------- writing

def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def markdown_table(rows: list[Mapping[str, Any]], cols: list[str] | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    cols = cols or list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown_kv(values: Mapping[str, Any]) -> str:
    """One record as a two-column table (wide single rows read badly)."""
    return markdown_table([{"metric": k, "value": v} for k, v in values.items()], ["metric", "value"])


def headline_columns(cols: list[str]) -> list[str]:
    """Metric columns shown in the markdown tables (the CSVs keep all)."""
    return [c for c in cols if "_std_" not in c and "subset_size" not in c]


def write_csv(path: Path, rows: list[Mapping[str, Any]], cols: list[str] | None = None) -> Path:
    cols = cols or (list(rows[0]) if rows else [])
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in cols})
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _yerr(half_widths: Iterable[float | None]) -> list[float] | None:
    """Error-bar half-widths for matplotlib (0 where a point has none; None when no point has one)."""
    half_widths = list(half_widths)
    return None if all(h is None for h in half_widths) else [0.0 if h is None else h for h in half_widths]


def plot_fid_vs_steps(path: Path, sweep: list[Point], fid_cols: list[str], level: float | None = None) -> Path:
    """FID against decoding steps, with the points' intervals (at `level`) as error bars where known."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(fid_cols), figsize=(5 * len(fid_cols), 4), squeeze=False)
    for ax, col in zip(axes[0], fid_cols):
        for model, marker in (("arpg", "o-"), ("raster", "s")):
            pts = [(p.point.steps, p.metrics[col], half_width(p, col))
                   for p in sweep if p.point.model == model and col in p.metrics]
            if pts:
                xs, ys, halves = zip(*pts)
                ax.errorbar(xs, ys, yerr=_yerr(halves), fmt=marker, capsize=3,
                            label="ARPG (random order)" if model == "arpg" else "raster baseline")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decoding steps")
        bars = level is not None and any(half_width(p, col) is not None for p in sweep)
        ax.set_ylabel(f"{col} (bars: {level:.0%} interval)" if bars else col)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_throughput(path: Path, speed: list[dict]) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, kind, batch) in sorted({(r["model"], r["kind"], r["batch"]) for r in speed}):
        pts = sorted((r["steps"], r["img_s"]) for r in speed
                     if (r["model"], r["kind"], r["batch"]) == (model, kind, batch))
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o-" if kind == "arpg" else "s--", label=f"{model} {kind} batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decoding steps")
    ax.set_ylabel("images / s (generation, median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def pareto_front(pairs: list[dict], fid_col: str) -> list[dict]:
    """Points no other point beats on both speed (higher img_s) and quality (lower FID), fastest first."""
    front, best = [], math.inf
    for p in sorted(pairs, key=lambda p: (-p["img_s"], p[fid_col])):  # fastest first: keep what lowers FID
        if p[fid_col] < best:
            front.append(p)
            best = p[fid_col]
    return front


def plot_pareto(path: Path, pairs: list[dict], fid_col: str) -> Path:
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
    front = pareto_front(pairs, fid_col)
    if front:
        ax.plot([p["img_s"] for p in front], [p[fid_col] for p in front], "k:", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"images / s (study models, batch {pairs[0]['batch']})")
    ax.set_ylabel(fid_col)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_memory(path: Path, speed: list[dict]) -> Path:
    plt = _plt()
    batch = max(r["batch"] for r in speed)
    rows = [r for r in speed if r["batch"] == batch and r["peak_mem_mib"] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows)), 4))
    labels = [f"{r['model']}\n{r['kind']} {r['steps']}" for r in rows]
    colors = ["tab:blue" if r["kind"] == "arpg" else "tab:orange" for r in rows]
    ax.bar(range(len(rows)), [r["peak_mem_mib"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel(f"peak memory, MiB (batch {batch})")
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_specs(params) -> list[tuple[str, Any]]:
    """DVC `plots:` entries for the report's CSV tables and PNG figures."""
    out = Path(params["report"]["dir"])
    fid = [f"fid_{suffix(x)}" for x in params["evaluate"]["extractors"]]
    return [
        ("fid_vs_steps", {"template": "linear", "x": "steps", "y": {str(out / "fid_vs_steps.csv"): fid},
                          "title": "FID vs decoding steps (ARPG and raster)"}),
        ("throughput_vs_steps", {"template": "linear", "x": "steps", "y": {str(out / "speed.csv"): ["img_s"]},
                                 "title": "images/s vs decoding steps"}),
        ("fid_vs_steps_image", str(out / "fid_vs_steps.png")),
        ("throughput_image", str(out / "throughput_vs_steps.png")),
        ("memory_image", str(out / "memory.png")),
    ]


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def build(params, out_dir: Path | None = None) -> dict[str, Any]:
    """Write the report into report.dir (or `out_dir`); returns headline numbers and written paths."""
    layout = params.layout
    out = Path(out_dir or params["report"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    for required in pipeline.report_inputs(params, layout):
        if not Path(required).is_file():
            raise ArpgError(f"{required} not found: the report needs every stage output; "
                            "run `snakemake --cores all` (or the stage that writes it) first")
    all_jobs = {j.rule: j for j in pipeline.jobs(params)}
    extractors = list(params["evaluate"]["extractors"])
    s = params["sample"]
    written: list[Path] = []
    md: list[str] = [f"# ARPG study report: {params['name']}\n",
                     f"Generated by `arpg report` from the stage outputs under `{layout.out}` "
                     f"(params `{Path(params.path).name}`, hash `{params.digest}`). Every number below is read "
                     "from those files; nothing is typed in.\n"]

    # --- data ------------------------------------------------------------------
    manifest = _read_json(layout.data_manifest, "prepare-data")
    data_rows = [{"split": k, "images": v.get("count"), "shape": "x".join(map(str, v.get("shape", [])[1:]))}
                 for k, v in manifest.get("splits", {}).items()]
    md += ["## Data\n", f"Source `{params['data']['source']}`, {params['data']['num_classes']} classes, "
           f"{params['data']['resolution']}x{params['data']['resolution']} pixels.\n", markdown_table(data_rows)]

    # --- feature extractors ------------------------------------------------------
    points = read_points(params, layout)
    cols = metric_columns(points)
    md += ["## Feature extractors\n", "Each metric column names its extractor:\n"]
    md += [f"- `{x}`: {EXTRACTOR_TEXT[x]}" for x in extractors]
    unattributed = [c for c in cols if extractor_of(c, extractors) is None]
    if unattributed:
        md.append("- not feature-based: " + ", ".join(f"`{c}`" for c in unattributed))
    md.append("")
    extractor_rows = [{"metric": c, "extractor": extractor_of(c, extractors) or "-"} for c in cols]
    written.append(write_csv(out / "metric_extractors.csv", extractor_rows, ["metric", "extractor"]))

    # --- quality -----------------------------------------------------------------
    base = ["model", "steps", "cfg", "order"]
    boot = bootstrap_of(points)
    csv_cols = base + interval_columns(cols, points)
    written.append(write_csv(out / "quality.csv", [_row(p, cols) for p in points], csv_cols))
    sweep = step_sweep(params, points)
    written.append(write_csv(out / "fid_vs_steps.csv", [_row(p, cols) for p in sweep], csv_cols))
    guidance = guidance_sweep(params, points)
    written.append(write_csv(out / "guidance.csv", [_row(p, cols) for p in guidance], csv_cols))
    orders = order_sweep(params, points)
    written.append(write_csv(out / "orders.csv", [_row(p, cols) for p in orders], csv_cols))
    fid_cols = [c for c in cols if c.startswith("fid")] or cols[:1]
    shown = headline_columns(cols)
    if fid_cols:
        written.append(plot_fid_vs_steps(out / "fid_vs_steps.png", sweep, fid_cols, boot.level))
    md += ["## Quality vs decoding steps: ARPG and the raster baseline\n",
           f"ARPG decodes in the given number of steps (random order, cfg {format_cfg(s['cfg_default'])}); the "
           f"raster baseline predicts one token per step ({token_count(params)} steps). "
           f"Table: `fid_vs_steps.csv`; all points: `quality.csv`.\n", interval_text(boot),
           markdown_table([_md_row(p, shown) for p in sweep], base + shown),
           "![FID vs steps](fid_vs_steps.png)\n",
           f"## Guidance scale (ARPG at {s['steps_default']} steps, raster)\n",
           markdown_table([_md_row(p, shown) for p in guidance], base + shown),
           f"## Generation orders (ARPG, {s['steps_default']} steps, cfg {format_cfg(s['cfg_default'])})\n",
           markdown_table([_md_row(p, shown) for p in orders], base + shown)]
    noise_metrics = [c for c in shown if c.startswith(("fid_", "accuracy_"))]
    noise_md, noise_rows = noise_section(params, points, noise_metrics, boot)
    md += noise_md
    if noise_rows:
        written.append(write_csv(out / "differences.csv", noise_rows, DIFFERENCE_COLUMNS))

    # --- speed -------------------------------------------------------------------
    headline: dict[str, float] = {}
    if "profile" in all_jobs:
        profile_doc = _read_json(layout.profile_json, "profile")
        speed = speed_rows(profile_doc)
        speed_cols = ["model", "kind", "net", "steps", "batch", "img_s", "img_s_e2e", "peak_mem_mib",
                      "gen_mem_mib", "kv_cache_mib", "mem_kind"]
        written.append(write_csv(out / "speed.csv", speed, speed_cols))
        gains = profile_doc.get("speedups", [])
        gain_cols = ["model", "batch", "steps", "tokens", "step_ratio", "speedup_gen", "speedup_gen_low",
                     "speedup_gen_high", "speedup_e2e", "kv_ratio", "gen_mem_ratio"]
        written.append(write_csv(out / "speedups.csv", gains, gain_cols))
        md += ["## Throughput and memory\n", f"Timings from: {hardware(profile_doc)}.\n",
               "`img_s`: generated token grids per second (median over repeats); `peak_mem_mib`: peak memory "
               "of the run; speed-ups are ARPG over the raster twin of the same backbone and batch.\n",
               markdown_table(speed, speed_cols), "### Speed-up of ARPG over raster decoding\n",
               markdown_table(gains, gain_cols)]
        if speed:
            written.append(plot_throughput(out / "throughput_vs_steps.png", speed))
            written.append(plot_memory(out / "memory.png", speed))
            md += ["![images/s vs steps](throughput_vs_steps.png)\n", "![memory](memory.png)\n"]
        if fid_cols:
            pairs = pareto_pairs(sweep, speed, fid_cols[0])
            if pairs:
                written.append(write_csv(out / "pareto.csv", pairs))
                written.append(plot_pareto(out / "fid_vs_throughput.png", pairs, fid_cols[0]))
                by_point = {(p.point.model, p.point.steps, format_cfg(p.point.cfg), p.point.order): p for p in sweep}
                pair_rows = [{**r, fid_cols[0]: with_interval(by_point[r["model"], r["steps"], r["cfg"], r["order"]],
                                                              fid_cols[0])} for r in pairs]
                md += [f"### Quality vs speed ({fid_cols[0]} vs images/s of the study models)\n",
                       markdown_table(pair_rows, ["model", "steps", "cfg", "order", "img_s", "batch", fid_cols[0]]),
                       "![FID vs images/s](fid_vs_throughput.png)\n"]
            else:
                md.append("_No FID-vs-speed pairs: the profile has no rows of the study models (`default` in "
                          "profile.models) at the sampled step counts._\n")
        for g in gains:
            headline[f"speedup_gen.{g['model']}.b{g['batch']}.s{g['steps']}"] = g["speedup_gen"]

    # --- tokenizer, classifier, training -------------------------------------------
    tok_train = _read_json(layout.tokenizer_metrics, "train-tokenizer")
    source = (f"pretrained `{tok_train['pretrained']}`" if tok_train.get("pretrained")
              else "trained by `arpg train-tokenizer`")
    md += ["## Tokenizer\n", f"Weights: {source} ({tok_train.get('steps')} steps).\n"]
    if "tokenize" in all_jobs:
        tok = numeric_leaves(_read_json(layout.tokenize_metrics, "tokenize"))
        written.append(write_csv(out / "tokenizer.csv", [tok], list(tok)))
        _copy(layout.reconstructions, out / "tokenizer_reconstructions.png")
        md += ["Reconstruction and codebook use (`arpg tokenize`):\n", markdown_kv(tok), "![reconstructions](tokenizer_reconstructions.png)\n"]
    if "train_classifier" in all_jobs:
        clf = numeric_leaves(_read_json(layout.classifier_metrics, "train-classifier"))
        written.append(write_csv(out / "classifier.csv", [clf], list(clf)))
        md += ["## Evaluation classifier (sanity row)\n", markdown_kv(clf)]
    train_rows = []
    for model in pipeline.MODELS:
        doc = _read_json(layout.model_metrics(model), f"train --model {model}")
        train_rows.append({"model": model, "name": doc.get("model") if isinstance(doc, dict) else None,
                           **numeric_leaves(doc)})
    train_cols = list(dict.fromkeys(k for r in train_rows for k in r))
    written.append(write_csv(out / "training.csv", train_rows, train_cols))
    md += ["## Training\n", markdown_table(train_rows, train_cols)]

    # --- grids and galleries ---------------------------------------------------------
    # These folders hold only what this build copies: a grid of a sweep point no longer in the
    # params would otherwise stay in the (committed) report.
    for owned in ("grids", "gallery"):
        shutil.rmtree(out / owned, ignore_errors=True)
    md.append("## Sample grids\n")
    for job in [j for j in pipeline.jobs(params) if j.rule == "sample"]:
        p = point_of(job)
        dst = _copy(layout.sample_grid(p), out / "grids" / p.model / f"{p.tag}.png")
        written.append(dst)
        if p in {q.point for q in sweep}:
            md.append(f"**{p.model}, {p.steps} steps, cfg {format_cfg(p.cfg)}, {p.order}**\n\n"
                      f"![{p.model} {p.tag}](grids/{p.model}/{p.tag}.png)\n")
    md.append("All grids: `grids/<model>/<tag>.png`.\n")
    if "gallery" in all_jobs:
        gallery = _read_json(layout.gallery_json, "gallery")
        md.append("## Zero-shot galleries (ARPG)\n")
        for task in params["gallery"]["tasks"]:
            dst = _copy(layout.gallery_image(task), out / "gallery" / f"{task}.png")
            written.append(dst)
            info = gallery.get("tasks", {}).get(task)
            note = ", ".join(f"{k}: {v}" for k, v in info.items()
                             if not isinstance(v, (dict, list)) and k != "image") \
                if isinstance(info, dict) else ""
            md.append(f"**{task}**{' (' + note + ')' if note else ''}\n\n![{task}](gallery/{task}.png)\n")

    readme = out / "README.md"
    readme.write_text("\n".join(md))
    written.append(readme)
    for p in sweep:
        for c in fid_cols:
            if c in p.metrics:
                headline[f"{c}.{p.point.model}.s{p.point.steps}"] = p.metrics[c]
    return {"paths": written, "metrics": headline, "dir": out}
