"""Each decoder's guidance, chosen without peeking: the guidance sweep's points measured on their
selection sets (`arpg select`: another sampling seed), the value with the lowest selection FID (mean
over the training seeds that drew one), and that point's evaluation figure, which the choice never saw."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from arpg.checkpoint_io import read_json
from arpg.decoders import DECODERS
from arpg.engine.report.points import Point
from arpg.paths import SweepPoint, format_cfg
from arpg.stages import point_command, point_of

CHOICE_COLUMNS = ["model", "steps", "order", "cfg", "selection_fid", "chosen", "train_seeds"]


@dataclass(frozen=True)
class Choice:
    point: Point                     # the chosen point (first training seed's; its figures are the evaluation set's)
    selection: dict[float, float]    # cfg -> selection FID (mean over the seeds that drew one)
    seeds: int                       # training seeds whose selection sets were measured


def read_choices(rep, guidance: list[Point], fid: str) -> dict[str, Choice]:
    """{decoder: its chosen guidance} from the select jobs' outputs ({} when the study draws none)."""
    layout = rep.layout
    by_first: dict[SweepPoint, list[float]] = {}
    first = {p.point.model: p.point.run for p in guidance}
    for job in rep.jobs_of("select"):
        point = point_of(job.wildcards)
        doc = read_json(layout.selection_metrics(point), "selection metrics",
                        written_by=f"arpg select {point_command(point)}")
        if fid in doc:
            by_first.setdefault(replace(point, run=first.get(point.model, point.run)), []).append(doc[fid])
    choices = {}
    for d in DECODERS.values():
        rows = [p for p in guidance if p.point.model == d.name and p.point in by_first]
        if not rows:
            continue
        mean = {p.point.cfg: sum(by_first[p.point]) / len(by_first[p.point]) for p in rows}
        best = min(rows, key=lambda p: (mean[p.point.cfg], p.point.cfg))
        choices[d.name] = Choice(best, mean, len(by_first[best.point]))
    return choices


def choice_rows(choices: dict[str, Choice]) -> list[dict[str, Any]]:
    return [{"model": name, "steps": c.point.point.steps, "order": c.point.point.order, "cfg": format_cfg(cfg),
             "selection_fid": value, "chosen": cfg == c.point.point.cfg, "train_seeds": c.seeds}
            for name, c in choices.items() for cfg, value in sorted(c.selection.items())]


def choice_text(choices: dict[str, Choice], fid: str) -> str:
    chosen = "; ".join(f"{DECODERS[name].short_label} cfg {format_cfg(c.point.point.cfg)}" for name, c in choices.items())
    return (f"**Chosen guidance** ({chosen}): each decoder's guidance values above were also sampled with "
            "another sampling seed (`arpg select`: the selection set) and measured alike; the value with the "
            f"lowest selection `{fid}` (mean over the training seeds that drew one) is chosen, and the comparisons "
            "at each decoder's chosen guidance report that point's own sample set, which the choice never saw. "
            "Table: `guidance_choice.csv`.\n")
