"""The report being written (`Report`: its folder, the study's jobs planned once, what it wrote).

Every file written goes through `Report`, which records it; arpg/report_catalog.py names and
captions each.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from arpg import pipeline
from arpg.engine.report.points import read_output
from arpg.errors import ArpgError
from arpg.utils import atomic_path, atomic_write_text, write_csv

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
    jobs: list[pipeline.Job]  # the study's jobs, planned once per report
    written: list[Path] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)  # MLflow metrics of the report

    @classmethod
    def open(cls, params, out_dir: Path | None) -> "Report":
        """report.dir (or `out_dir`), once every stage output the report reads exists."""
        jobs = pipeline.jobs(params)
        for required in next(j for j in jobs if j.rule == "report").inputs:
            if not Path(required).is_file():
                raise ArpgError(f"{required} not found: the report needs every stage output; "
                                "run `snakemake --cores all` (or the stage that writes it) first")
        out = Path(out_dir or params["report"]["dir"])
        out.mkdir(parents=True, exist_ok=True)
        return cls(params, out, jobs)

    @property
    def rules(self) -> frozenset[str]:
        """The pipeline rules this study runs (optional stages: profile, tokenize, ...)."""
        return frozenset(j.rule for j in self.jobs)

    def jobs_of(self, rule: str) -> list[pipeline.Job]:
        return [j for j in self.jobs if j.rule == rule]

    @cached_property
    def profile(self) -> dict:
        """profile.json, read once (the speed section, the plot series and the stage times use it)."""
        return read_output(self.layout.profile_json, "profile")

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
