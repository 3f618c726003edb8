"""The report, section by section: `build` reads top to bottom, one function per section.

Each section function returns its markdown lines and writes its CSV tables, figures and copies
through `Report`, which records every written path.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from arpg import figures, pipeline
from arpg.config import unrecorded
from arpg.decoders import DECODERS, labels, zero_shot_decoder
from arpg.engine.report.noise import (DIFFERENCE_COLUMNS, Bootstrap, bootstrap_of, difference, interval_text,
                                     judged, noise_section)
from arpg.engine.report.zero_shot import read_tasks, zero_shot_section
from arpg.engine.report.points import (POINT_COLUMNS, Point, csv_row, extractor_of, half_width,
                                       headline_columns, interval_columns, md_row, metric_columns, numeric_leaves,
                                       point_of, read_output, read_points, suffix, sweep_rows, with_interval)
from arpg.engine.profile.results import PRECISION_SPEEDUP_COLUMNS, precision_suffix
from arpg.engine.report.speed import GAIN_COLUMNS, SPEED_COLUMNS, hardware, pareto_front, pareto_pairs, speed_rows
from arpg.engine.report.text import markdown_kv, markdown_table, signed
from arpg.errors import ArpgError
from arpg.paths import format_cfg
from arpg.sweeps import SWEEPS
from arpg.utils import atomic_path, atomic_write_text, write_csv, write_json

# What each evaluate.extractors entry measures in (stated next to every metric).
EXTRACTOR_TEXT = {
    "classifier": "the study's own CNN classifier (`arpg train-classifier`, trained on the prepared data): "
                  "penultimate-layer features for FID/KID/precision-recall, its softmax for IS and accuracy",
    "inception-fid": "Inception-v3 with the TF-FID weights (pool3, 2048-d; the weights of the ADM / TTUR "
                     "evaluators), images resized to 299x299",
    "inception": "Inception-v3 from the user-given weights file `evaluate.inception_weights` "
                 "(paper protocol; samples also exported as an ADM `.npz`)",
}
# Files of report.dir that DVC's `plots:` also names (plot_specs).
FID_PNG, SPEED_CSV = "fid_vs_steps.png", "speed.csv"
PARETO_CSV = "pareto.csv"  # the quality-vs-speed pairs (arpg report logs them onto MLflow runs too)
STRATEGIES_PNG = "quality_vs_steps_strategies.png"
# The headline numbers (the report's MLflow metrics): DVC's `metrics:`, what `dvc exp show` compares.
METRICS_JSON = "metrics.json"
# Folders of report.dir that hold only what one build writes: copies, and the plot series.
PLOTS_DIR = "plots"
COPIED_DIRS = ("grids", "gallery", PLOTS_DIR)


def fid_vs_steps_series(model: str) -> str:
    """One decoder's step sweep (native order, cfg_default): a line of DVC's fid_vs_steps plot."""
    return f"{PLOTS_DIR}/fid_vs_steps-{model}.csv"


def fid_vs_img_s_series(model: str) -> str:
    """The same points against their measured images/s (the profile's largest batch at sample.precision)."""
    return f"{PLOTS_DIR}/fid_vs_img_s-{model}.csv"


@dataclass
class Report:
    """The report being written: its params, its folder, and what it wrote so far."""

    params: Any
    out: Path
    rules: frozenset[str]  # the pipeline rules this study runs (optional stages: profile, tokenize, ...)
    written: list[Path] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)  # MLflow metrics of the report

    @classmethod
    def open(cls, params, out_dir: Path | None) -> "Report":
        """report.dir (or `out_dir`), once every stage output the report reads exists."""
        for required in pipeline.report_inputs(params, params.layout):
            if not Path(required).is_file():
                raise ArpgError(f"{required} not found: the report needs every stage output; "
                                "run `snakemake --cores all` (or the stage that writes it) first")
        out = Path(out_dir or params["report"]["dir"])
        out.mkdir(parents=True, exist_ok=True)
        return cls(params, out, frozenset(j.rule for j in pipeline.jobs(params)))

    @property
    def layout(self):
        return self.params.layout

    def csv(self, name: str, rows: list[Mapping[str, Any]], cols: list[str] | None = None) -> None:
        self.written.append(write_csv(self.out / name, rows, cols))

    def figure(self, path: Path) -> None:
        self.written.append(path)

    def copy(self, src: Path, name: str) -> None:
        with atomic_path(self.out / name, Path(name).suffix) as tmp:
            shutil.copyfile(src, tmp)
        self.written.append(self.out / name)

    def text(self, name: str, text: str) -> None:
        self.written.append(atomic_write_text(self.out / name, text))


@dataclass(frozen=True)
class Quality:
    """The sweep points and the parts of them the sections show."""

    points: list[Point]
    cols: list[str]  # every metric column, FID first
    boot: Bootstrap
    tables: dict[str, list[Point]]  # each sweep's table (arpg.sweeps.SWEEPS)

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


def read_quality(params) -> Quality:
    points = read_points(params, params.layout)
    return Quality(points, metric_columns(points), bootstrap_of(points),
                   {s.name: sweep_rows(params, s, points) for s in SWEEPS.values()})


def build(params, out_dir: Path | None = None) -> dict[str, Any]:
    """Write the report into report.dir (or `out_dir`); returns headline numbers and written paths."""
    rep = Report.open(params, out_dir)
    quality = read_quality(params)
    md = _title(rep)
    md += _data(rep)
    md += _extractors(rep, quality)
    md += _quality(rep, quality)
    md += _noise(rep, quality)
    md += _speed(rep, quality)
    md += _tokenizer(rep)
    md += _classifier(rep)
    md += _training(rep)
    for owned in COPIED_DIRS:  # a grid of a sweep point no longer in the params would stay otherwise
        shutil.rmtree(rep.out / owned, ignore_errors=True)
    md += _grids(rep, quality)
    md += _zero_shot(rep, quality)
    md += _galleries(rep)
    md += _stage_times(rep)
    _plot_series(rep, quality)
    rep.text("README.md", "\n".join(md))
    rep.headline.update(_fid_headline(quality))
    write_json(rep.out / METRICS_JSON, rep.headline)
    rep.written.append(rep.out / METRICS_JSON)
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
    rep.csv("metric_extractors.csv", [{"metric": c, "extractor": extractor_of(c, extractors) or "-"}
                                      for c in q.cols], ["metric", "extractor"])
    return md


def _quality(rep: Report, q: Quality) -> list[str]:
    """The quality CSVs (every point, and each sweep's table) and each sweep's section."""
    csv_cols = POINT_COLUMNS + interval_columns(q.cols, q.points)
    rep.csv("quality.csv", [csv_row(p, q.cols) for p in q.points], csv_cols)
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
    rep.figure(figures.fid_vs_steps(rep.out / FID_PNG, curves, q.boot.level))
    return [f"![FID vs steps]({FID_PNG})\n"]


def _strategies_figure(rep: Report, q: Quality) -> list[str]:
    """Decoding strategies against the native order, per step count: curves with intervals, findings."""
    cols = [c for c in q.shown if c.startswith(("accuracy_", "fid_"))]
    panels = {col: {f"{d.short_label}, {order}": ("o-" if order == d.native_order else "s--",
                                                  [(p.point.steps, p.metrics[col], half_width(p, col)) for p in rows])
                    for d, order, rows in _strategy_lines(q.strategies, col)} for col in cols}
    if any(panels.values()):
        rep.figure(figures.curves_vs_steps(rep.out / STRATEGIES_PNG, panels, q.boot.level))
    return [f"![quality vs steps per strategy]({STRATEGIES_PNG})\n", *_strategy_findings(q, cols)]


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
_SWEEP_FIGURES = {"steps": _steps_figure, "strategies": _strategies_figure}


def _strategy_lines(points: list[Point], col: str):
    """(decoder, order, its points by steps) per decoder and order that has `col`."""
    groups: dict[tuple[str, str], list[Point]] = {}
    for p in points:
        if col in p.metrics:
            groups.setdefault((p.point.model, p.point.order), []).append(p)
    return [(DECODERS[model], order, sorted(rows, key=lambda p: p.point.steps))
            for (model, order), rows in groups.items()]


def _noise(rep: Report, q: Quality) -> list[str]:
    md, rows = noise_section(rep.params, q.points, [c for c in q.shown if c.startswith(("fid_", "accuracy_"))],
                             q.boot)
    if rows:
        rep.csv("differences.csv", rows, DIFFERENCE_COLUMNS)
    return md


def _speed(rep: Report, q: Quality) -> list[str]:
    """Throughput and memory from profile.json, with the profile's own figures drawn from it."""
    if "profile" not in rep.rules:
        return []
    profile_doc = read_output(rep.layout.profile_json, "profile")
    speed = speed_rows(profile_doc)
    gains = profile_doc.get("speedups", [])
    rep.csv(SPEED_CSV, speed, SPEED_COLUMNS)
    rep.csv("speedups.csv", gains, GAIN_COLUMNS)
    par, seq = labels(parallel=True, short=True), labels(parallel=False, short=True)
    md = ["## Throughput and memory\n", f"Timings from: {hardware(profile_doc)}.\n",
          "`img_s`: generated token grids per second (median over repeats); `img_s_e2e`: images per second "
          "with VQ decoding to pixels (its time measured once per batch size: it does not depend on the "
          "decoder); `peak_mem_mib`: peak memory "
          f"of the run; speed-ups are {par} over the {seq} twin of the same backbone and batch.\n",
          markdown_table(speed, SPEED_COLUMNS), f"### Speed-up of {par} over {seq} decoding\n",
          "Each decoder at each precision runs the linear kernel measured fastest for its own row counts "
          "on this machine (`kernel` above; arpg/models/cpu_kernels.py); precision `best`: each decoder at its "
          "own fastest precision and kernel.\n",
          markdown_table(gains, GAIN_COLUMNS)]
    by_precision = profile_doc.get("precision_speedups", [])
    if by_precision:
        rep.csv("precision_speedups.csv", by_precision, PRECISION_SPEEDUP_COLUMNS)
        md += ["### bf16 over fp32\n", markdown_table(by_precision, PRECISION_SPEEDUP_COLUMNS)]
    lacking = sorted({r["skip_reason"] for r in profile_doc["rows"] if r.get("status") == "skipped"
                      and r["skip_reason"].startswith("bf16:")})
    md += [f"_Not measured: {reason}._\n" for reason in lacking]
    if speed:
        rep.figure(figures.throughput_vs_steps(profile_doc, rep.out / figures.THROUGHPUT))
        rep.figure(figures.memory(profile_doc, rep.out / figures.MEMORY))
        md += [f"![images/s vs steps]({figures.THROUGHPUT})\n", f"![memory]({figures.MEMORY})\n"]
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
    rep.csv(PARETO_CSV, pairs)
    rep.figure(figures.fid_vs_throughput(rep.out / "fid_vs_throughput.png", pairs, pareto_front(pairs, fid), fid))
    by_point = {(p.point.model, p.point.steps, format_cfg(p.point.cfg), p.point.order): p for p in shown}
    rows = [{**r, fid: with_interval(by_point[r["model"], r["steps"], r["cfg"], r["order"]], fid)} for r in pairs]
    return [f"### Quality vs speed ({fid} vs images/s of the study models)\n",
            markdown_table(rows, ["model", "steps", "cfg", "order", "img_s", "batch", fid]),
            "![FID vs images/s](fid_vs_throughput.png)\n"]


def _tokenizer(rep: Report) -> list[str]:
    tok_train = read_output(rep.layout.tokenizer_metrics, "train-tokenizer")
    source = (f"pretrained `{tok_train['pretrained']}`" if tok_train.get("pretrained")
              else "trained by `arpg train-tokenizer`")
    md = ["## Tokenizer\n", f"Weights: {source} ({tok_train.get('steps')} steps).\n"]
    if "tokenize" in rep.rules:
        tok = numeric_leaves(read_output(rep.layout.tokenize_metrics, "tokenize"))
        rep.csv("tokenizer.csv", [tok], list(tok))
        rep.copy(rep.layout.reconstructions, "tokenizer_reconstructions.png")
        md += ["Reconstruction and codebook use (`arpg tokenize`):\n", markdown_kv(tok),
               "![reconstructions](tokenizer_reconstructions.png)\n"]
    return md


def _classifier(rep: Report) -> list[str]:
    if "train_classifier" not in rep.rules:
        return []
    clf = numeric_leaves(read_output(rep.layout.classifier_metrics, "train-classifier"))
    rep.csv("classifier.csv", [clf], list(clf))
    return ["## Evaluation classifier (sanity row)\n", markdown_kv(clf)]


def _training(rep: Report) -> list[str]:
    rows = []
    for model in DECODERS:
        doc = read_output(rep.layout.model_metrics(model), f"train --model {model}")
        rows.append({"model": model, "name": doc.get("model") if isinstance(doc, dict) else None,
                     **numeric_leaves(doc)})
    cols = list(dict.fromkeys(k for r in rows for k in r))
    rep.csv("training.csv", rows, cols)
    return ["## Training\n", markdown_table(rows, cols)]


def _grids(rep: Report, q: Quality) -> list[str]:
    """Every sample grid copied into grids/<model>/<tag>.png; those of the steps sweep shown."""
    md = ["## Sample grids\n"]
    shown = {p.point for p in q.sweep}
    for job in [j for j in pipeline.jobs(rep.params) if j.rule == "sample"]:
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
    rep.csv("zeroshot.csv", rows, cols)
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


STAGE_TIME_COLUMNS = ["rule", "jobs", "timed", "wall_s", "longest_s", "longest_job", "cpu_s", "max_rss_mib",
                      "unit", "units", "cpu_ms_per_unit"]


def _work_unit(rep: Report, job) -> tuple[str, int] | None:
    """What `job` does, counted (so a cost regression shows per unit, not per study size). It
    annotates wall-clock readings, which no result depends on: like placing work, no read of inputs."""
    from arpg.commands.zero_shot import cells

    if job.rule == "profile":  # the configurations the profile measured (a skipped one costs nothing)
        rows = read_output(rep.layout.profile_json, "profile")["rows"]
        return "configurations", sum(r["status"] == "ok" for r in rows)
    params = unrecorded(rep.params)
    gallery = params["gallery"]
    if job.rule in ("sample", "evaluate"):
        return "images", params["data"]["num_classes"] * params["sample"]["num_per_class"]
    if job.rule == "zero_shot":
        return "cells", len(cells(params, job.wildcards["task"]))
    return {
        "train_tokenizer": ("steps", params["tokenizer"]["max_steps"]),
        "train": ("steps", params["train"]["max_steps"]),
        "train_classifier": ("epochs", params["classifier"]["epochs"]),
        "gallery": ("images", len(gallery["tasks"]) * gallery["num_images"] * gallery["samples"]),
    }.get(job.rule)


def _benchmark(path: Path, usage: Path | None = None) -> dict[str, float] | None:
    """Snakemake's benchmark record of one job (its last line: the last run), or None. A job forked
    by the warm server (arpg/warm.py) wrote its CPU time and peak memory to `usage`: they replace
    the benchmark's, which measured only the client process."""
    if not path.is_file():
        return None
    lines = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    row = dict(zip(lines[0], lines[-1]))

    def number(key: str) -> float:
        try:
            return float(row.get(key, "nan"))
        except ValueError:  # "NA" where psutil could not measure
            return float("nan")

    if not math.isfinite(number("s")):
        return None
    record = {"s": number("s"), "cpu_time": number("cpu_time"), "max_rss": number("max_rss")}
    if usage is not None and usage.is_file():
        record.update({k: float(v) for k, v in json.loads(usage.read_text()).items() if k in record})
    return record


def _stage_times(rep: Report) -> list[str]:
    """Per rule: wall and CPU time and peak memory of its jobs, from Snakemake's `benchmark:` files."""
    rows, all_jobs = [], pipeline.jobs(rep.params)
    for rule in pipeline.RULES:
        jobs = [j for j in all_jobs if j.rule == rule and rule != "report"]
        if not jobs:
            continue
        timed = [(j, b) for j in jobs if (b := _benchmark(Path(j.benchmark), Path(j.usage))) is not None]
        longest = max(timed, key=lambda jb: jb[1]["s"], default=None)
        rows.append({"rule": rule, "jobs": len(jobs), "timed": len(timed),
                     "wall_s": round(sum(b["s"] for _, b in timed), 1) if timed else None,
                     "longest_s": round(longest[1]["s"], 1) if longest else None,
                     "longest_job": longest[0].key if longest else None,
                     "cpu_s": round(sum(b["cpu_time"] for _, b in timed), 1) if timed else None,
                     "max_rss_mib": round(max(b["max_rss"] for _, b in timed)) if timed else None})
        counted = [u for j, _ in timed if (u := _work_unit(rep, j)) is not None]
        if counted and len(counted) == len(timed) and (units := sum(n for _, n in counted)):
            cpu_s = rows[-1]["cpu_s"]
            rows[-1].update(unit=counted[0][0], units=units,
                            cpu_ms_per_unit=round(1000 * cpu_s / units, 1) if math.isfinite(cpu_s) else None)
    rep.csv("stage_times.csv", rows, STAGE_TIME_COLUMNS)
    md = ["## Stage times\n",
          "Read from Snakemake's `benchmark:` files (`" + pipeline.log_dir(rep.params) + "/<rule>/...tsv`, beside the logs; "
          "one per job, written where the job ran; the report's own job is not in it). `wall_s` and `cpu_s` "
          "sum the rule's jobs; jobs of one rule may have run in parallel. `max_rss_mib`: the largest job's "
          "peak resident memory. A job forked by the warm server (arpg/warm.py) reports its own CPU time and "
          "memory beside its log (`.usage`), since Snakemake measures only the process that handed it over; the "
          "profile reports its CPU time with its configurations' short-lived processes, which Snakemake's "
          "sampling misses. "
          "`cpu_ms_per_unit`: CPU milliseconds per unit of work (training step, image, zero-shot cell, "
          "profiled configuration) over the timed jobs. These are wall-clock readings of the machine that "
          "ran the study; no result depends on them.\n"]
    if not any(r["timed"] for r in rows):
        md.append("No benchmark files were found: the study was not run by Snakemake here (`dvc repro` "
                  "writes none), so there are no stage times.\n")
        return md
    total = sum(r["wall_s"] or 0 for r in rows)
    md.append(markdown_table(rows, STAGE_TIME_COLUMNS))
    md.append(f"Sum of all jobs' wall times: {total / 60:.1f} min.\n")
    return md


def _plot_fid_columns(params) -> list[str]:
    return [f"fid_{suffix(x)}" for x in params["evaluate"]["extractors"]]


def _plot_series(rep: Report, q: Quality) -> None:
    """The CSVs behind DVC's plots (plot_specs): one file per decoder, so each is its own line; every
    file is written, header only where a decoder has no such points."""
    fids = _plot_fid_columns(rep.params)
    timed: dict[tuple, dict] = {}
    if "profile" in rep.rules and q.fid_cols:
        speed = speed_rows(read_output(rep.layout.profile_json, "profile"))
        pairs = pareto_pairs(q.sweep, speed, q.fid_cols[0], rep.params["sample"]["precision"])
        timed = {(r["model"], r["steps"]): r for r in pairs}
    (rep.out / PLOTS_DIR).mkdir(exist_ok=True)
    for model in DECODERS:
        sweep = [p for p in q.sweep if p.point.model == model]
        point_cols = {"steps": None, "cfg": None, "order": None}
        rows = [{"steps": p.point.steps, "cfg": format_cfg(p.point.cfg), "order": p.point.order,
                 **{c: p.metrics.get(c) for c in fids}} for p in sweep]
        rep.csv(fid_vs_steps_series(model), rows, [*point_cols, *fids])
        speed_of = [{**r, "img_s": timed[model, r["steps"]]["img_s"], "batch": timed[model, r["steps"]]["batch"]}
                    for r in rows if (model, r["steps"]) in timed]
        rep.csv(fid_vs_img_s_series(model), sorted(speed_of, key=lambda r: r["img_s"]),
                ["img_s", "batch", *point_cols, *fids])


def plot_specs(params) -> list[tuple[str, Any]]:
    """DVC `plots:` entries: one line per decoder (a file each), and the report's PNG figures."""
    out = Path(params["report"]["dir"])
    fid = _plot_fid_columns(params)
    return [
        ("fid_vs_steps", {"template": "linear", "x": "steps",
                          "y": {str(out / fid_vs_steps_series(m)): fid for m in DECODERS},
                          "title": "FID vs decoding steps (native order, cfg_default), one line per decoder"}),
        ("fid_vs_images_per_s", {"template": "linear", "x": "img_s",
                                 "y": {str(out / fid_vs_img_s_series(m)): fid for m in DECODERS},
                                 "title": "FID vs images/s (the profile's largest batch), one line per decoder"}),
        ("fid_vs_steps_image", str(out / FID_PNG)),
        ("throughput_image", str(out / figures.THROUGHPUT)),
        ("memory_image", str(out / figures.MEMORY)),
    ]
