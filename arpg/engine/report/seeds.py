"""The report's figures over training seeds: each point of a sweep that samples every seed's model
(arpg.sweeps: `over_seeds`), its per-seed values and their combination (arpg/engine/replicates.py),
and the differences the report judges with them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from arpg.engine.replicates import METHOD, Combined, combine, difference
from arpg.engine.report.noise import Bootstrap
from arpg.engine.report.points import Point
from arpg.engine.report.text import fmt
from arpg.paths import SweepPoint, seed_run
from arpg.sweeps import SWEEPS

SEEDS_COLUMNS = ["model", "steps", "cfg", "order", "metric", "seeds", "per_seed", "mean", "se", "lo", "hi", "df",
                 "between_sd", "within_sd"]


@dataclass(frozen=True)
class Seeds:
    """Every combined figure of the study: {(first-seed point, metric): Combined}, with the per-seed values."""

    seeds: list[int]
    combined: dict[tuple[SweepPoint, str], Combined]
    per_seed: dict[tuple[SweepPoint, str], list[float]]
    level: float

    @property
    def several(self) -> bool:
        return len(self.seeds) > 1

    def of(self, p: Point, metric: str) -> Combined | None:
        return self.combined.get((p.point, metric)) if self.several else None

    def difference(self, a: Point, b: Point, metric: str) -> tuple[float, float, float] | None:
        """(b - a, lo, hi) over training seeds, or None where a point was not sampled from every seed."""
        ca, cb = self.of(a, metric), self.of(b, metric)
        if ca is None or cb is None:
            return None
        diff, _, lo, hi = difference(ca, cb, self.level)
        return diff, lo, hi


def read_seeds(params, points: list[Point], metrics: list[str], boot: Bootstrap) -> Seeds:
    """Combine each `over_seeds` sweep point's metrics over train.seeds (points lacking a seed or an
    interval are left out)."""
    seeds = list(params["train"]["seeds"])
    by_point = {p.point: p for p in points}
    level = boot.level or 0.95
    combined, per_seed = {}, {}
    for sweep in SWEEPS.values():
        if not sweep.over_seeds:
            continue
        for first in sweep.table(params):
            replicas = [by_point.get(replace(first, run=seed_run(s))) for s in seeds]
            if any(r is None for r in replicas):
                continue
            for metric in metrics:
                bands = [r.band(metric) for r in replicas]
                if any(b is None for b in bands) or any(metric not in r.metrics for r in replicas):
                    continue
                values = [r.metrics[metric] for r in replicas]
                per_seed[first, metric] = values
                combined[first, metric] = combine(values, [b[0] for b in bands], level)
    return Seeds(seeds, combined, per_seed, level)


def seeds_section(seeds: Seeds) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown of "Across training seeds" and its CSV rows."""
    md = ["## Across training seeds\n"]
    if not seeds.several:
        md.append(f"One training seed per decoder (`train.seeds: {seeds.seeds}`): every interval in this report "
                  "resamples one trained model, so it holds sampling noise only. Retraining moves FID several "
                  "times more (paper section 6); list more seeds in `train.seeds` to measure it.\n")
        return md, []
    rows = []
    for (p, metric), c in seeds.combined.items():
        rows.append({"model": p.model, "steps": p.steps, "cfg": p.cfg, "order": p.order, "metric": metric,
                     "seeds": c.seeds, "per_seed": " / ".join(fmt(v) for v in seeds.per_seed[p, metric]),
                     "mean": c.mean, "se": c.se, "lo": c.lo, "hi": c.hi, "df": c.df,
                     "between_sd": c.between_sd, "within_sd": c.within_sd})
    md.append(f"Each decoder trained from {len(seeds.seeds)} seeds (`train.seeds: {seeds.seeds}`; seed s adds s to "
              f"`seed` for every draw of its training); the step and guidance sweeps sampled from each model. "
              f"Figures: {METHOD}, at {seeds.level:.0%}. `per_seed`: each seed's value (seed order as listed); "
              "`between_sd`: the training draw's estimated sd, `within_sd`: the sampling se's rms. Assumes the "
              "seeds are independent draws of the training and each sample set's se is its sampling noise. "
              "The comparisons below use these intervals wherever both points were sampled from every seed.\n")
    return md, rows
