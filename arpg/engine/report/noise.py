"""Which differences exceed the noise: the metrics files' bootstrap intervals, the sweeps' comparisons
and their section of the report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Mapping

from arpg.engine.report.points import Point, with_interval
from arpg.engine.report.text import fmt, markdown_table, signed
from arpg.errors import ArpgError
from arpg.sweeps import SWEEPS, Sweep

DIFFERENCE_COLUMNS = ["group", "comparison", "metric", "a", "b", "diff", "diff_se", "diff_lo", "diff_hi",
                      "significant", "noise"]
SAMPLING, SEEDS = "sampling", "training seeds and sampling"  # what a difference's interval holds


@dataclass(frozen=True)
class Bootstrap:
    """What the metrics files say about their intervals (one study: one record, in principle)."""

    replicates: list[int]  # distinct replicate counts over the points that have intervals
    level: float | None  # interval level (None: no point has intervals)
    methods: list[str]
    kid_subsets: list[int]

    @property
    def on(self) -> bool:
        return self.level is not None

    @property
    def z(self) -> float:
        """Two-sided normal quantile of the level (1.96 at 95%)."""
        return NormalDist().inv_cdf(0.5 + self.level / 2)


def bootstrap_of(points: list[Point]) -> Bootstrap:
    with_band = [p for p in points if p.bootstrap["replicates"] and p.intervals]
    records = [p.bootstrap for p in with_band]
    levels = sorted({float(r["level"]) for r in records})
    if len(levels) > 1:
        raise ArpgError(f"metrics files disagree on the bootstrap level ({levels}); rerun `arpg evaluate` "
                        "for every point (snakemake --cores all)")
    return Bootstrap(replicates=sorted({int(r["replicates"]) for r in records}),
                     level=levels[0] if levels else None,
                     methods=sorted({str(r.get("method")) for r in records if r.get("method")}),
                     kid_subsets=sorted({int(r["kid_subsets"]) for r in records if r.get("kid_subsets")}))


def interval_text(boot: Bootstrap) -> str:
    """One paragraph: how the quality tables' intervals were made (or that there are none)."""
    if not boot.on:
        return "Intervals are off (`evaluate.bootstrap: 0`): the tables show bare point estimates.\n"
    count = " or ".join(str(b) for b in boot.replicates)
    text = (f"Figures read `value ± h`: the full sample set's value and the half-width h of its {boot.level:.0%} "
            f"interval (value ± {boot.z:.2f} se), from {count} bootstrap replicates per point "
            f"({'; '.join(boot.methods)}). CSVs: `<metric>_se`, `<metric>_lo`, `<metric>_hi`.")
    if boot.kid_subsets:
        text += (f" Within a replicate KID averages {' or '.join(map(str, boot.kid_subsets))} random subsets, "
                 "fewer than its headline value does, so its interval also carries that average's subset noise "
                 "(slightly wide).")
    return text + "\n"


def noise_comparisons(params, points: list[Point]) -> list[tuple[Sweep, Point, Point]]:
    """(sweep, a, b) triples whose difference b - a the report tests: each sweep's pairs
    (arpg.sweeps.Sweep.pairs) whose points were both read."""
    by_point = {p.point: p for p in points}
    return [(sweep, by_point[a], by_point[b]) for sweep in SWEEPS.values() for a, b in sweep.pairs(params)
            if a in by_point and b in by_point]


def difference(a: Point, b: Point, metric: str, boot: Bootstrap) -> tuple[float, float | None]:
    """b - a of `metric` and the se of that difference (independent sets: sqrt(se_a^2 + se_b^2));
    None where intervals are off or a point has none."""
    band_a, band_b = a.band(metric), b.band(metric)
    se = math.hypot(band_a[0], band_b[0]) if boot.on and band_a is not None and band_b is not None else None
    return b.metrics[metric] - a.metrics[metric], se


def judged(diff: float, se: float | None, boot: Bootstrap, lower_is_better: bool) -> tuple[str, str]:
    """(verdict, interval text) of a difference b - a: better / worse beyond the noise, or as good within it."""
    if se is None:
        return "compared without an interval", ""
    half = boot.z * se
    better = diff < -half if lower_is_better else diff > half
    worse = diff > half if lower_is_better else diff < -half
    verdict = "better, beyond the noise" if better else "worse, beyond the noise" if worse else \
        "as good within the noise"
    return verdict, f" ({boot.level:.0%} interval of the difference [{fmt(diff - half)}, {fmt(diff + half)}])"


@dataclass(frozen=True)
class Judged:
    """b - a of one metric with its interval (lo / hi None: a point has none) and the noise it holds."""

    diff: float
    se: float | None  # sampling intervals only; over seeds the t quantile is not z
    lo: float | None
    hi: float | None
    noise: str  # SAMPLING or SEEDS

    @property
    def significant(self) -> bool | None:
        return None if self.lo is None else self.lo > 0 or self.hi < 0


def judge(a: Point, b: Point, metric: str, boot: Bootstrap, seeds=None) -> Judged:
    """b - a over training seeds where both points were sampled from every seed (`seeds`, a
    report.seeds.Seeds), else the first seed's values with independent sets' se = sqrt(se_a^2 + se_b^2)."""
    over_seeds = seeds.difference(a, b, metric) if seeds is not None else None
    if over_seeds is not None:
        diff, lo, hi = over_seeds
        return Judged(diff, None, lo, hi, SEEDS)
    diff, se = difference(a, b, metric, boot)
    if se is None:
        return Judged(diff, None, None, None, SAMPLING)
    return Judged(diff, se, diff - boot.z * se, diff + boot.z * se, SAMPLING)


def difference_rows(params, points: list[Point], metrics: list[str], boot: Bootstrap,
                    seeds=None) -> list[dict[str, Any]]:
    """Per comparison and metric: both values, b - a, its interval and whether it excludes 0 (None: a
    point has no interval). Where both points were sampled from every training seed (`seeds`, a
    report.seeds.Seeds with several), a and b are the seed means and the interval Welch's over seeds;
    otherwise the first seed's values with independent sets' se = sqrt(se_a^2 + se_b^2)."""
    rows = []
    for sweep, a, b in noise_comparisons(params, points):
        for metric in metrics:
            va, vb = a.metrics.get(metric), b.metrics.get(metric)
            if va is None or vb is None:
                continue
            j = judge(a, b, metric, boot, seeds)
            if j.noise == SEEDS:
                va, vb = seeds.of(a, metric).mean, seeds.of(b, metric).mean
            rows.append({"group": sweep.name,
                         "comparison": f"{sweep.point_label(b.point)} vs {sweep.point_label(a.point)}",
                         "metric": metric, "a": va, "b": vb, "diff": j.diff, "diff_se": j.se, "diff_lo": j.lo,
                         "diff_hi": j.hi, "significant": j.significant, "noise": j.noise, "_a": a, "_b": b,
                         "_seeds": seeds if j.noise == SEEDS else None})
    return rows


def _verdict(row: Mapping[str, Any]) -> str:
    return {True: "yes", False: "no", None: "no interval"}[row["significant"]]


def noise_section(params, points: list[Point], metrics: list[str], boot: Bootstrap,
                  seeds=None) -> tuple[list[str], list[dict]]:
    """Markdown of "Which differences exceed the noise" and its CSV rows."""
    md = ["## Which differences exceed the noise\n"]
    if not boot.on:
        md.append("Intervals are off (`evaluate.bootstrap: 0`), so no "
                  "difference between sweep points can be told from sampling noise. Set `evaluate.bootstrap` "
                  "(e.g. 20) and rerun `arpg evaluate` to get them.\n")
        return md, []
    rows = difference_rows(params, points, metrics, boot, seeds)
    md.append(_test_text(params, metrics, boot, len(rows)))
    if any(r["noise"] == SEEDS for r in rows):
        md.append(f"Where both points were sampled from every training seed (`noise`: {SEEDS}), a and b are "
                  "the means over seeds and the interval of b - a is Welch's t over seeds (section \"Across "
                  "training seeds\"): it holds the training draw as well as the sampling.\n")
    md += _verdict_lines(rows, metrics, boot)
    md.append("")
    md.append(_difference_table(rows, boot))
    csv_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    return md, csv_rows


def _test_text(params, metrics: list[str], boot: Bootstrap, comparisons: int) -> str:
    """What is compared and how the test decides (and what it does not correct for)."""
    count = " or ".join(str(b) for b in boot.replicates)
    return (
        f"Compared: {'; '.join(s.text(s.compared, params) for s in SWEEPS.values())}. "
        f"Metrics: {', '.join(f'`{m}`' for m in metrics)}. A difference b - a exceeds the noise at "
        f"{boot.level:.0%} when |b - a| > {boot.z:.2f} * sqrt(se_a^2 + se_b^2), with each se from {count} "
        f"bootstrap replicates of that point's generated set ({'; '.join(boot.methods)}). This treats the two "
        "sample sets as independent. They share their sampling seeds (same labels, same per-batch generator "
        "seeds), which most likely correlates their errors positively; the real interval of the difference is "
        "then narrower, so the test is conservative: it may miss a small real difference. Nor is it corrected "
        f"for the number of comparisons ({comparisons} here; at 95% about one in twenty differences that are "
        "pure noise still passes).\n")


def _verdict_lines(rows: list[dict], metrics: list[str], boot: Bootstrap) -> list[str]:
    """One bullet per group and metric: the comparisons that exceed the noise, those within it."""
    lines = []
    for sweep in SWEEPS.values():
        for metric in metrics:
            sel = [r for r in rows if r["group"] == sweep.name and r["metric"] == metric]
            if not sel:
                continue

            def listed(verdict):
                return "; ".join(f"{r['comparison']} ({signed(r['diff'])}, {boot.level:.0%} "
                                 f"[{fmt(r['diff_lo'])}, {fmt(r['diff_hi'])}])" if r["significant"] is not None
                                 else f"{r['comparison']} ({signed(r['diff'])})"
                                 for r in sel if r["significant"] is verdict) or "none"

            lines.append(f"- **{sweep.title}**, `{metric}`: exceed the noise: {listed(True)}. Within the noise: "
                         f"{listed(False)}." + (f" No interval: {listed(None)}." if any(
                             r["significant"] is None for r in sel) else ""))
    return lines


def _difference_table(rows: list[dict], boot: Bootstrap) -> str:
    table = [{"comparison": r["comparison"], "metric": r["metric"], "a": _shown(r, "_a"), "b": _shown(r, "_b"),
              "b - a": signed(r["diff"]),
              f"{boot.level:.0%} interval of b - a": "-" if r["diff_lo"] is None
              else f"[{fmt(r['diff_lo'])}, {fmt(r['diff_hi'])}]", "exceeds the noise": _verdict(r)}
             for r in rows]
    return markdown_table(table)


def _shown(row: Mapping[str, Any], side: str) -> str:
    """A compared value as the table shows it: the seed mean and its half-width, or the point's own."""
    point, metric = row[side], row["metric"]
    if row["_seeds"] is None:
        return with_interval(point, metric)
    c = row["_seeds"].of(point, metric)
    return f"{fmt(c.mean)} ± {c.half:.2g} ({c.seeds} seeds)"
