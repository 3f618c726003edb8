"""The report, section by section: `build` reads top to bottom, one function per section.

Each section function returns its markdown lines and writes its CSV tables, figures and copies
through `Report`, which records every written path.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arpg import figures, report_catalog as catalog
from arpg.decoders import DECODERS, labels, zero_shot_decoder
from arpg.engine.profile.sweep import PRECISION_SPEEDUP_COLUMNS, precision_suffix
from arpg.engine.report.document import COPIED_DIRS, Report
from arpg.engine.report.findings import findings
from arpg.engine.report.models import classifier_section, tokenizer_section, training_section
from arpg.engine.report.noise import (DIFFERENCE_COLUMNS, Bootstrap, bootstrap_of, difference, interval_text,
                                     judged, noise_section)
from arpg.engine.report.plots import write_plot_series
from arpg.engine.report.points import (POINT_COLUMNS, Point, csv_row, extractor_of, half_width, headline_columns,
                                       interval_columns, md_row, metric_columns, point_of,
                                       read_output, read_points, sweep_rows, with_interval)
from arpg.engine.report.speed import GAIN_COLUMNS, SPEED_COLUMNS, hardware, measured_how, pareto_front, pareto_pairs, speed_rows
from arpg.engine.report.stage_times import stage_times_section
from arpg.engine.report.selection import CHOICE_COLUMNS, Choice, choice_rows, choice_text, read_choices
from arpg.engine.report.seeds import SEEDS_COLUMNS, Seeds, read_seeds, seeds_section
from arpg.engine.report.text import markdown_table, signed
from arpg.engine.report.zero_shot import read_tasks, zero_shot_section
from arpg.paths import format_cfg
from arpg.sweeps import SWEEPS
from arpg.utils import write_json

# What each evaluate.extractors entry measures in (stated next to every metric).
EXTRACTOR_TEXT = {
    "classifier": "the study's own CNN classifier (`arpg train-classifier`, trained on the prepared data): "
                  "penultimate-layer features for FID/KID/precision-recall, its softmax for IS and accuracy",
    "inception-fid": "Inception-v3 with the TF-FID weights (pool3, 2048-d; the weights of the ADM / TTUR "
                     "evaluators), images resized to 299x299",
    "inception": "Inception-v3 from the user-given weights file `evaluate.inception_weights` "
                 "(paper protocol; samples also exported as an ADM `.npz`)",
}


@dataclass(frozen=True)
class Quality:
    """The sweep points and the parts of them the sections show."""

    points: list[Point]
    cols: list[str]  # every metric column, FID first
    boot: Bootstrap
    tables: dict[str, list[Point]]  # each sweep's table (arpg.sweeps.SWEEPS)
    seeds: Seeds  # the over_seeds sweeps' points combined over train.seeds
    choices: dict[str, Choice]  # each decoder's guidance chosen on its selection sets

    @property
    def sweep(self) -> list[Point]:
        """Quality vs steps."""
        return self.tables.get("steps", [])

    @property
    def strategies(self) -> list[Point]:
        """Each decoding strategy and the native order at the strategy step counts."""
        return self.tables.get("strategies", [])

    @property
    def fid_cols(self) -> list[str]:
        return [c for c in self.cols if c.startswith("fid")] or self.cols[:1]

    @property
    def shown(self) -> list[str]:
        return headline_columns(self.cols)

    @property
    def judged(self) -> list[str]:
        """The metrics whose differences the report judges."""
        return [c for c in self.shown if c.startswith(("fid_", "accuracy_"))]


def read_quality(rep: Report) -> Quality:
    params = rep.params
    points = read_points(rep.jobs_of("evaluate"), params.layout)
    cols, boot = metric_columns(points), bootstrap_of(points)
    judged = [c for c in headline_columns(cols) if c.startswith(("fid_", "accuracy_"))]
    tables = {s.name: sweep_rows(params, s, points) for s in SWEEPS.values()}
    fid = next((c for c in cols if c.startswith("fid")), None)
    return Quality(points, cols, boot, tables, read_seeds(params, points, judged, boot),
                   read_choices(rep, tables.get("guidance", []), fid) if fid else {})


def build(params, out_dir: Path | None = None) -> dict[str, Any]:
    """Write the report into report.dir (or `out_dir`); returns headline numbers and written paths."""
    rep = Report.open(params, out_dir)
    quality = read_quality(rep)
    md = _title(rep)
    md += _findings(rep, quality)
    md += _data(rep)
    md += _extractors(rep, quality)
    md += _quality(rep, quality)
    md += _seeds(rep, quality)
    md += _noise(rep, quality)
    md += _speed(rep, quality)
    md += tokenizer_section(rep)
    md += classifier_section(rep)
    md += training_section(rep)
    for owned in COPIED_DIRS:  # a grid of a sweep point no longer in the params would stay otherwise
        shutil.rmtree(rep.out / owned, ignore_errors=True)
    md += _grids(rep, quality)
    md += _zero_shot(rep, quality)
    md += _galleries(rep)
    md += stage_times_section(rep)
    write_plot_series(rep, quality.sweep, quality.fid_cols)
    rep.text(catalog.README_MD, "\n".join(md))
    rep.headline.update(_fid_headline(quality))
    write_json(rep.out / catalog.METRICS_JSON, rep.headline)
    rep.written.append(rep.out / catalog.METRICS_JSON)
    return {"paths": rep.written, "metrics": rep.headline, "dir": rep.out}


def _fid_headline(q: Quality) -> dict[str, float]:
    """The steps sweep's FIDs as MLflow metrics (`fid_classifier.arpg.s8`)."""
    return {f"{c}.{p.point.model}.s{p.point.steps}": p.metrics[c]
            for p in q.sweep for c in q.fid_cols if c in p.metrics}


def _title(rep: Report) -> list[str]:
    params = rep.params
    return [f"# ARPG study report: {params['name']}\n",
            f"Generated by `arpg report` from the stage outputs under `{rep.layout.out}` "
            f"(params `{Path(params.path).name}`, hash `{params.digest}`). Every number below is read "
            "from those files; nothing is typed in.\n"]


def _findings(rep: Report, q: Quality) -> list[str]:
    """What this study finds, first: each claim with its interval, beside the paper's."""
    if not q.fid_cols:
        return []
    return findings(rep.params, q.points, q.tables.get("guidance", []), q.fid_cols[0], q.boot, q.seeds,
                    q.choices, rep.profile if "profile" in rep.rules else None)


def _data(rep: Report) -> list[str]:
    data = rep.params["data"]
    manifest = read_output(rep.layout.data_manifest, "prepare-data")
    rows = [{"split": k, "images": v.get("count"), "shape": "x".join(map(str, v.get("shape", [])[1:]))}
            for k, v in manifest.get("splits", {}).items()]
    return ["## Data\n", f"Source `{data['source']}`, {data['num_classes']} classes, "
            f"{data['resolution']}x{data['resolution']} pixels.\n", markdown_table(rows)]


def _extractors(rep: Report, q: Quality) -> list[str]:
    extractors = list(rep.params["evaluate"]["extractors"])
    md = ["## Feature extractors\n", "Each metric column names its extractor:\n"]
    md += [f"- `{x}`: {EXTRACTOR_TEXT[x]}" for x in extractors]
    unattributed = [c for c in q.cols if extractor_of(c, extractors) is None]
    if unattributed:
        md.append("- not feature-based: " + ", ".join(f"`{c}`" for c in unattributed))
    md.append("")
    rep.csv(catalog.EXTRACTORS_CSV, [{"metric": c, "extractor": extractor_of(c, extractors) or "-"}
                                      for c in q.cols], ["metric", "extractor"])
    return md


def _quality(rep: Report, q: Quality) -> list[str]:
    """The quality CSVs (every point, and each sweep's table) and each sweep's section."""
    metric_cols = interval_columns(q.cols, q.points)
    csv_cols = POINT_COLUMNS + metric_cols
    seeds = ["train_seed"] if len(rep.params["train"]["seeds"]) > 1 else []  # quality.csv: every seed's points
    rep.csv(catalog.QUALITY_CSV, [csv_row(p, q.cols) for p in q.points], POINT_COLUMNS + seeds + metric_cols)
    md, first = [], True
    for sweep in SWEEPS.values():
        rows = q.tables[sweep.name]
        rep.csv(sweep.csv, [csv_row(p, q.cols) for p in rows], csv_cols)
        if not rows:
            continue
        md.append(f"## {sweep.text(sweep.heading, rep.params)}\n")
        if sweep.intro:
            md.append(sweep.text(sweep.intro, rep.params) + "\n")
        if first:  # above the first table: how its intervals were made
            md.append(interval_text(q.boot))
            first = False
        md.append(markdown_table([md_row(p, q.shown) for p in rows], POINT_COLUMNS + q.shown))
        md += _SWEEP_FIGURES.get(sweep.name, lambda rep, q: [])(rep, q)
    return md


def _steps_figure(rep: Report, q: Quality) -> list[str]:
    if not q.fid_cols:
        return []
    curves = {col: {model: [(p.point.steps, p.metrics[col], half_width(p, col)) for p in q.sweep
                            if p.point.model == model and col in p.metrics] for model in DECODERS}
              for col in q.fid_cols}
    rep.figure(figures.fid_vs_steps(rep.out / catalog.FID_PNG, curves, q.boot.level))
    return [f"![FID vs steps]({catalog.FID_PNG})\n"]


def _strategies_figure(rep: Report, q: Quality) -> list[str]:
    """Decoding strategies against the native order, per step count: curves with intervals, findings."""
    cols = [c for c in q.shown if c.startswith(("accuracy_", "fid_"))]
    panels = {col: {f"{d.short_label}, {order}": ("o-" if order == d.native_order else "s--",
                                                  [(p.point.steps, p.metrics[col], half_width(p, col)) for p in rows])
                    for d, order, rows in _strategy_lines(q.strategies, col)} for col in cols}
    if any(panels.values()):
        rep.figure(figures.curves_vs_steps(rep.out / catalog.STRATEGIES_PNG, panels, q.boot.level))
    return [f"![quality vs steps per strategy]({catalog.STRATEGIES_PNG})\n", *_strategy_findings(q, cols)]


def _strategy_findings(q: Quality, cols: list[str]) -> list[str]:
    """Per metric and step count S: the best strategy at S against the native order at 2S (the
    step sweep's point), with the difference's interval: does a strategy halve the steps?"""
    native = {(p.point.model, p.point.steps): p for p in q.sweep}
    lines = []
    for col in cols:
        lower_is_better = col.startswith("fid_")
        for steps in sorted({p.point.steps for p in q.strategies}):
            tried = [p for p in q.strategies if p.point.steps == steps and col in p.metrics
                     and p.point.order != DECODERS[p.point.model].native_order]
            if not tried:
                continue
            best = (min if lower_is_better else max)(tried, key=lambda p: p.metrics[col])
            ref = native.get((best.point.model, 2 * steps))
            if ref is None or col not in ref.metrics:
                continue
            diff, se = difference(ref, best, col, q.boot)
            verdict, interval = judged(diff, se, q.boot, lower_is_better)
            lines.append(f"- `{col}`: at {steps} steps the best strategy, {best.point.order}, gives "
                         f"{with_interval(best, col)} against {with_interval(ref, col)} for the "
                         f"{ref.point.order} order at {2 * steps} steps: {signed(diff)}{interval}, {verdict}.")
    return ["Does a strategy halve the steps? The best strategy at each step count against the "
            "native order at twice the steps:\n", *lines, ""] if lines else []


# What a sweep's section shows below its table besides (by sweep name).
def _guidance_figure(rep: Report, q: Quality) -> list[str]:
    """FID against accuracy over each decoder's guidance values: the trade-off guidance moves along."""
    fid = next((c for c in q.fid_cols if c.startswith("fid")), None)
    acc = next((c for c in q.cols if c.startswith("accuracy")), None)
    rows = q.tables.get("guidance", [])
    if fid is None or acc is None or not rows:
        return []
    curves = {model: [(p.point.cfg, p.metrics[fid], half_width(p, fid), p.metrics[acc], half_width(p, acc))
                      for p in rows if p.point.model == model and fid in p.metrics and acc in p.metrics]
              for model in DECODERS}
    rep.figure(figures.guidance_frontier(rep.out / catalog.GUIDANCE_PNG, curves, fid, acc))
    md = [f"![guidance frontier]({catalog.GUIDANCE_PNG})\n"]
    if q.choices:
        rep.csv(catalog.GUIDANCE_CHOICE_CSV, choice_rows(q.choices), CHOICE_COLUMNS)
        md.append(choice_text(q.choices, fid))
    return md


_SWEEP_FIGURES = {"steps": _steps_figure, "guidance": _guidance_figure, "strategies": _strategies_figure}


def _strategy_lines(points: list[Point], col: str):
    """(decoder, order, its points by steps) per decoder and order that has `col`."""
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        if col in p.metrics:
            groups.setdefault((p.point.model, p.point.order), []).append(p)
    return [(DECODERS[model], order, sorted(rows, key=lambda p: p.point.steps))
            for (model, order), rows in groups.items()]


def _seeds(rep: Report, q: Quality) -> list[str]:
    md, rows = seeds_section(q.seeds)
    if rows:
        rep.csv(catalog.SEEDS_CSV, rows, SEEDS_COLUMNS)
        md.append(markdown_table(rows, SEEDS_COLUMNS))
    return md


def _noise(rep: Report, q: Quality) -> list[str]:
    md, rows = noise_section(rep.params, q.points, q.judged, q.boot, q.seeds)
    if rows:
        rep.csv(catalog.DIFFERENCES_CSV, rows, DIFFERENCE_COLUMNS)
    return md


def _speed(rep: Report, q: Quality) -> list[str]:
    """Throughput and memory from profile.json, with the profile's own figures drawn from it."""
    if "profile" not in rep.rules:
        return []
    profile_doc = rep.profile
    speed = speed_rows(profile_doc)
    gains = profile_doc.get("speedups", [])
    rep.csv(catalog.SPEED_CSV, speed, SPEED_COLUMNS)
    rep.csv(catalog.SPEEDUPS_CSV, gains, GAIN_COLUMNS)
    par, seq = labels(parallel=True, short=True), labels(parallel=False, short=True)
    md = ["## Throughput and memory\n", f"Timings from: {hardware(profile_doc)}.\n",
          "`img_s`: generated token grids per second (median over repeats); `img_s_e2e`: images per second "
          "with VQ decoding to pixels (its time measured once per batch size: it does not depend on the "
          "decoder); `peak_mem_mib`: peak memory "
          f"of the run; speed-ups are {par} over the {seq} twin of the same backbone and batch.\n",
          markdown_table(speed, SPEED_COLUMNS), f"### Speed-up of {par} over {seq} decoding\n",
          "Each decoder at each precision runs the linear kernel measured fastest for its own row counts "
          "on this machine (`kernel` above; arpg/models/cpu_kernels.py); precision `best`: each decoder at its "
          "own fastest precision and kernel. " + measured_how(profile_doc) + "\n",
          markdown_table(gains, GAIN_COLUMNS)]
    by_precision = profile_doc.get("precision_speedups", [])
    if by_precision:
        rep.csv(catalog.PRECISION_SPEEDUPS_CSV, by_precision, PRECISION_SPEEDUP_COLUMNS)
        md += ["### bf16 over fp32\n", markdown_table(by_precision, PRECISION_SPEEDUP_COLUMNS)]
    lacking = sorted({r["skip_reason"] for r in profile_doc["rows"] if r.get("status") == "skipped"
                      and r["skip_reason"].startswith("bf16:")})
    md += [f"_Not measured: {reason}._\n" for reason in lacking]
    if speed:
        rep.figure(figures.throughput_vs_steps(profile_doc, rep.out / catalog.THROUGHPUT_PNG))
        rep.figure(figures.memory(profile_doc, rep.out / catalog.MEMORY_PNG))
        md += [f"![images/s vs steps]({catalog.THROUGHPUT_PNG})\n", f"![memory]({catalog.MEMORY_PNG})\n"]
    if q.fid_cols:
        md += _quality_vs_speed(rep, q, speed)
    for g in gains:
        rep.headline[f"speedup_gen.{g['model']}.b{g['batch']}.s{g['steps']}"
                     + precision_suffix(g["precision"])] = g["speedup_gen"]
    return md


def _quality_vs_speed(rep: Report, q: Quality, speed: list[dict]) -> list[str]:
    fid = q.fid_cols[0]
    shown = list({id(p): p for p in (*q.sweep, *q.strategies)}.values())  # steps sweep + decoding strategies
    pairs = pareto_pairs(shown, speed, fid, rep.params["sample"]["precision"])
    if not pairs:
        return ["_No FID-vs-speed pairs: the profile has no rows of the study models (`default` in "
                "profile.models) at the sampled step counts._\n"]
    rep.csv(catalog.PARETO_CSV, pairs)
    rep.figure(figures.fid_vs_throughput(rep.out / catalog.FID_VS_THROUGHPUT_PNG, pairs, pareto_front(pairs, fid),
                                         fid))
    by_point = {(p.point.model, p.point.steps, format_cfg(p.point.cfg), p.point.order): p for p in shown}
    rows = [{**r, fid: with_interval(by_point[r["model"], r["steps"], r["cfg"], r["order"]], fid)} for r in pairs]
    return [f"### Quality vs speed ({fid} vs images/s of the study models)\n",
            markdown_table(rows, ["model", "steps", "cfg", "order", "img_s", "batch", fid]),
            f"![FID vs images/s]({catalog.FID_VS_THROUGHPUT_PNG})\n"]


def _grids(rep: Report, q: Quality) -> list[str]:
    """Every sample grid copied into grids/<model>/<tag>.png; those of the steps sweep shown."""
    md = ["## Sample grids\n"]
    shown = {p.point for p in q.sweep}
    for job in rep.jobs_of("sample"):
        p = point_of(job)
        rep.copy(rep.layout.sample_grid(p), f"grids/{p.model}/{p.tag}.png")
        if p in shown:
            md.append(f"**{p.model}, {p.steps} steps, cfg {format_cfg(p.cfg)}, {p.order}**\n\n"
                      f"![{p.model} {p.tag}](grids/{p.model}/{p.tag}.png)\n")
    md.append("All grids: `grids/<model>/<tag>.png`.\n")
    return md


def _zero_shot(rep: Report, q: Quality) -> list[str]:
    if "zero_shot" not in rep.rules:
        return []
    md, rows, cols, headline = zero_shot_section(rep.params, read_tasks(rep.params, rep.layout), q.sweep, q.boot)
    rep.csv(catalog.ZERO_SHOT_CSV, rows, cols)
    rep.headline.update(headline)
    return md


def _galleries(rep: Report) -> list[str]:
    if "gallery" not in rep.rules:
        return []
    gallery = read_output(rep.layout.gallery_json, "gallery")
    md = [f"## Zero-shot galleries ({zero_shot_decoder().label})\n"]
    for task in rep.params["gallery"]["tasks"]:
        rep.copy(rep.layout.gallery_image(task), f"gallery/{task}.png")
        info = gallery.get("tasks", {}).get(task)
        note = ", ".join(f"{k}: {v}" for k, v in info.items()
                         if not isinstance(v, (dict, list)) and k != "image") if isinstance(info, dict) else ""
        md.append(f"**{task}**{' (' + note + ')' if note else ''}\n\n![{task}](gallery/{task}.png)\n")
    return md


