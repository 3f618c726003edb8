"""The report's stage-time table: each rule's wall and CPU time and peak memory, from the
`benchmark:` files Snakemake writes beside the logs (and the warm server's `.usage` records)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from arpg import pipeline
from arpg.config import unrecorded
from arpg.engine.report.document import Report
from arpg.engine.report.text import markdown_table
from arpg.report_catalog import STAGE_TIMES_CSV

STAGE_TIME_COLUMNS = ["rule", "jobs", "timed", "wall_s", "longest_s", "longest_job", "cpu_s", "max_rss_mib",
                      "unit", "units", "cpu_ms_per_unit"]


def _work_unit(rep: Report, job) -> tuple[str, int] | None:
    """What `job` does, counted (so a cost regression shows per unit, not per study size). It
    annotates wall-clock readings, which no result depends on: like placing work, no read of inputs."""
    from arpg.commands.zero_shot import cells

    if job.rule == "profile":  # the configurations the profile measured (a skipped one costs nothing)
        rows = rep.profile["rows"]
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


def stage_times_section(rep: Report) -> list[str]:
    """Per rule: wall and CPU time and peak memory of its jobs, from Snakemake's `benchmark:` files."""
    rows = []
    for rule in pipeline.RULES:
        jobs = rep.jobs_of(rule) if rule != "report" else []
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
    rep.csv(STAGE_TIMES_CSV, rows, STAGE_TIME_COLUMNS)
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
