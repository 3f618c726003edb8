"""The CSV series behind DVC's `plots:` (one file per decoder, so each is its own line) and the plot
specs dvc.yaml names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arpg.decoders import DECODERS
from arpg.engine.report.document import PLOTS_DIR, Report, fid_vs_img_s_series, fid_vs_steps_series
from arpg.engine.report.points import suffix
from arpg.engine.report.speed import pareto_pairs, speed_rows
from arpg.paths import format_cfg
from arpg.report_catalog import FID_PNG, MEMORY_PNG, THROUGHPUT_PNG

def _plot_fid_columns(params) -> list[str]:
    return [f"fid_{suffix(x)}" for x in params["evaluate"]["extractors"]]


def write_plot_series(rep: Report, sweep: list, fid_cols: list[str]) -> None:
    """The CSVs behind DVC's plots (plot_specs): one file per decoder, so each is its own line; every
    file is written, header only where a decoder has no such points."""
    fids = _plot_fid_columns(rep.params)
    timed: dict[tuple, dict] = {}
    if "profile" in rep.rules and fid_cols:
        speed = speed_rows(rep.profile)
        pairs = pareto_pairs(sweep, speed, fid_cols[0], rep.params["sample"]["precision"])
        timed = {(r["model"], r["steps"]): r for r in pairs}
    (rep.out / PLOTS_DIR).mkdir(exist_ok=True)
    for model in DECODERS:
        mine = [p for p in sweep if p.point.model == model]
        point_cols = {"steps": None, "cfg": None, "order": None}
        rows = [{"steps": p.point.steps, "cfg": format_cfg(p.point.cfg), "order": p.point.order,
                 **{c: p.metrics.get(c) for c in fids}} for p in mine]
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
        ("throughput_image", str(out / THROUGHPUT_PNG)),
        ("memory_image", str(out / MEMORY_PNG)),
    ]
