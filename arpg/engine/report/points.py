"""The report's sweep points: metrics files read into `Point`s, their columns, rows and sweeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from arpg import pipeline, stages
from arpg.checkpoint_io import read_json
from arpg.decoders import DECODERS
from arpg.engine.report.text import fmt
from arpg.errors import ArpgError
from arpg.paths import Layout, SweepPoint, format_cfg
from arpg.sweeps import Sweep

# Keys of a metrics JSON that describe the point rather than measure it.
_POINT_KEYS = {"model", "steps", "cfg", "order", "seed", "train_seed", "tag", "num_samples"}
# The columns naming a point in every quality table.
POINT_COLUMNS = ["model", "steps", "cfg", "order"]


@dataclass
class Point:
    """One sweep point as its metrics file holds it."""

    point: SweepPoint
    metrics: dict[str, float]
    intervals: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # metric -> {"se", "lo", "hi", ...}
    bootstrap: Mapping[str, Any] | None = None  # the metrics file's "bootstrap" record

    def band(self, metric: str) -> tuple[float, float, float] | None:
        """(se, lo, hi) of `metric` when its metrics file holds a finite interval for it."""
        entry = self.intervals.get(metric)
        if not isinstance(entry, Mapping):
            return None
        values = tuple(entry.get(k) for k in ("se", "lo", "hi"))
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return values  # type: ignore[return-value]
        return None


def read_output(path: Path, stage: str) -> Any:
    """The JSON a stage wrote, or an error naming the file and the stage that writes it."""
    if not path.is_file():
        raise ArpgError(f"{path} not found: the report needs the output of `arpg {stage}`; "
                        "run the pipeline (`snakemake --cores all`) or that stage first")
    return read_json(path, "stage output", written_by=f"arpg {stage}")


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


def point_of(job: pipeline.Job) -> SweepPoint:
    return stages.point_of(job.wildcards)


def read_points(evaluate_jobs: list[pipeline.Job], layout: Layout) -> list[Point]:
    """Each evaluated sweep point's metrics file, read."""
    points = []
    for job in evaluate_jobs:
        point = point_of(job)
        command = f"evaluate {stages.point_command(point)}"
        doc = read_output(layout.metrics(point), command)
        lacking = [k for k in ("bootstrap", "intervals") if k not in doc]
        if lacking:
            raise ArpgError(f"{layout.metrics(point)} lacks {' and '.join(lacking)}: it was not written by this "
                            f"`arpg evaluate`; delete it and rerun `arpg {command}`")
        # the interval records are read apart: flattened they would pose as metric columns
        intervals, bootstrap = doc.pop("intervals"), doc.pop("bootstrap")
        metrics = {k: v for k, v in numeric_leaves(doc).items() if k not in _POINT_KEYS}
        points.append(Point(point, metrics, intervals, bootstrap))
    return points


def metric_columns(points: list[Point]) -> list[str]:
    cols: dict[str, None] = {}
    for p in points:
        cols.update(dict.fromkeys(p.metrics))
    return sorted(cols, key=lambda c: (not c.startswith("fid"), not c.startswith("is_"), c))


def csv_row(p: Point, cols: list[str]) -> dict[str, Any]:
    """CSV row: the metrics and, where known, their `<metric>_se`, `_lo`, `_hi`."""
    row = {"model": p.point.model, "steps": p.point.steps, "cfg": format_cfg(p.point.cfg), "order": p.point.order,
           "train_seed": p.point.seed, **{c: p.metrics.get(c) for c in cols}}  # POINT_COLUMNS, the seed, the metrics
    for c in cols:
        band = p.band(c)
        if band is not None:
            row.update(zip((f"{c}_se", f"{c}_lo", f"{c}_hi"), band))
    return row


def md_row(p: Point, cols: list[str]) -> dict[str, Any]:
    """Markdown row: each metric as `value ± half-width` of its interval (the bare value without one)."""
    return {**csv_row(p, []), **{c: with_interval(p, c) for c in cols}}


def interval_columns(cols: list[str], points: list[Point]) -> list[str]:
    """The metric columns, each followed by `<metric>_se`, `_lo`, `_hi` when some point has its interval."""
    known = {c for p in points for c in cols if p.band(c) is not None}
    return [name for c in cols for name in ([c, f"{c}_se", f"{c}_lo", f"{c}_hi"] if c in known else [c])]


def half_width(p: Point, metric: str) -> float | None:
    band = p.band(metric)
    return None if band is None else (band[2] - band[1]) / 2


def with_interval(p: Point, metric: str) -> Any:
    """`21.74 ± 1.9` (interval half-width to 2 significant digits), or the bare value."""
    value, half = p.metrics.get(metric), half_width(p, metric)
    return value if value is None or half is None else f"{fmt(value)} ± {half:.2g}"


def sweep_rows(params, sweep: Sweep, points: list[Point]) -> list[Point]:
    """The points of `sweep`'s report table (arpg.sweeps: its own and their baselines), as read."""
    by_point = {p.point: p for p in points}
    return [by_point[sp] for sp in sweep.table(params) if sp in by_point]


def is_parallel(p: Point) -> bool:
    return DECODERS[p.point.model].parallel


def headline_columns(cols: list[str]) -> list[str]:
    """Metric columns shown in the markdown tables (the CSVs keep all)."""
    return [c for c in cols if "_std_" not in c and "subset_size" not in c]
