"""The report's zero-shot section: the edits `arpg zero-shot` measured, their table and what they show."""

from __future__ import annotations

import math
from typing import Any, Mapping

from arpg.decoders import DECODERS, zero_shot_decoder
from arpg.engine.report.noise import Bootstrap, difference, judged
from arpg.engine.report.points import Point, read_output, with_interval
from arpg.engine.report.text import fmt, markdown_table, signed
from arpg.paths import SweepPoint, format_cfg
from arpg.tracking import experiment_name
from arpg.commands.zero_shot import CONTINUATION, EXPANSION

EXPANSION_SHARE = 0.8  # expansion must keep this share of unconditional sampling's accuracy (issue #17)
TABLE_HEAD = ["task", "mask", "known", "model", "steps", "known kept"]


def cell_point(cell: Mapping[str, Any], cfg: float, bootstrap: Mapping | None) -> Point:
    """A measured cell as a report `Point`, so the sweep's interval and difference code applies."""
    d = DECODERS[cell["model"]]
    order = d.native_order if not d.parallel else "random"
    return Point(SweepPoint(cell["model"], int(cell["steps"]), float(cfg), order), dict(cell["metrics"]),
                 dict(cell["intervals"]), bootstrap)


def _shown(cells: list[Mapping]) -> list[str]:
    """The metric columns of the table: FID, KID and accuracy of every extractor, then the PSNRs."""
    names = list(dict.fromkeys(k for c in cells for k in c["metrics"]))
    return [n for n in names if n.startswith(("fid_", "kid_", "accuracy_")) and not n.startswith(
        ("kid_std", "kid_subset"))] + [n for n in ("psnr", "psnr_tokenizer") if n in names]


def _label(cell: Mapping) -> str:
    d = DECODERS[cell["model"]]
    steps = f"{cell['steps']} steps" if d.parallel else "one token per step"
    return f"{d.short_label} {cell['task']} ({cell['mask']}, {cell['fraction']:.0%} known, {steps})"


def read_tasks(params, layout) -> dict:
    """The `zero_shot` jobs' outputs as one document: the shared settings once, every task's cells in
    `zeroshot.tasks` order."""
    docs = [read_output(layout.zeroshot_json(task), f"zero-shot --task {task}")
            for task in params["zeroshot"]["tasks"]]
    merged = {k: v for k, v in docs[0].items() if k not in ("task", "cells")}
    merged["cells"] = [c for d in docs for c in d["cells"]]
    return merged


def zero_shot_section(params, doc: Mapping, sweep: list[Point], boot: Bootstrap
                      ) -> tuple[list[str], list[dict], list[str], dict[str, float]]:
    """Markdown, CSV rows and columns, and MLflow headline metrics of the zero-shot section."""
    from arpg.commands.zero_shot import csv_rows

    cells, cfg = list(doc["cells"]), doc["cfg"]
    points = [cell_point(c, cfg, doc["bootstrap"]) for c in cells]
    shown = _shown(cells)
    table = [{"task": c["task"], "mask": c["mask"], "known": f"{c['fraction']:.0%}",
              "model": DECODERS[c["model"]].short_label, "steps": c["steps"],
              "known kept": "yes" if c["known_tokens_kept"] else "NO",
              **{m: with_interval(p, m) for m in shown}} for c, p in zip(cells, points)]
    rows, cols = csv_rows(dict(doc))
    zs = zero_shot_decoder()
    md = [f"## Zero-shot editing, measured ({zs.label})\n",
          f"`arpg zero-shot` edits {doc['num_images']} test images (class-balanced), each with its own "
          f"label as the class, at guidance {format_cfg(cfg)} (the step sweep's); every known token "
          "fraction is exact (a region grown cell by cell from a centre point: the grid's for `centre`, one "
          "drawn per image from a seeded generator for `random-block`; `top-rows`: the first tokens in raster "
          "order, the lower part generated, the only edit the raster order allows). Inpainting hides the "
          "region, outpainting keeps it. The completed images are measured like a sweep point (FID / KID / "
          "accuracy against the reference split, bootstrap intervals over images); `psnr`: "
          f"{doc['psnr']['hidden']} (expansion: {doc['psnr']['bicubic']}); `psnr_tokenizer`: the same "
          "region of the tokenizer's own reconstruction, the most an edit in token space can reach. "
          "Expanded images are down-scaled (area) to the training resolution for FID and accuracy.\n",
          markdown_table(table, TABLE_HEAD + shown),
          "Table: `zeroshot.csv` (every metric with `_se`, `_lo`, `_hi`).\n"]
    md += _findings(params, cells, points, sweep, boot)
    md.append(f"MLflow: the `zero-shot-<task>` child runs of the study run in experiment "
              f"`{experiment_name(params)}` (tag `arpg.stage` = `zero-shot`), one per task: metric "
              "`<cell>.<metric>` per cell (cell names as in `zeroshot.csv`'s `key`), the task's metrics JSON "
              "and CSV as artifacts. The galleries below show single edits.\n")
    headline = {f"zeroshot.{c['key']}.{m}": c["metrics"][m] for c in cells for m in shown
                if m.startswith(("fid_", "accuracy_")) and isinstance(c["metrics"][m], float)
                and math.isfinite(c["metrics"][m])}
    return md, rows, cols, headline


def _findings(params, cells, points, sweep, boot) -> list[str]:
    steps = params["sample"]["steps_default"]
    zs = zero_shot_decoder()
    uncond = next((p for p in sweep if p.point.model == zs.name and p.point.steps == steps
                   and p.point.order == zs.native_order), None)
    fid = next((m for m in _shown(cells) if m.startswith("fid_")), None)
    acc = next((m for m in _shown(cells) if m.startswith("accuracy_")), None)
    lines = ["### What the measurements show\n"]
    kept = [c["key"] for c in cells if not c["known_tokens_kept"]]
    lines.append("- Known tokens: " + ("every cell returned every known token unchanged." if not kept
                                       else f"**changed in {', '.join(kept)}**: those edits are not zero-shot."))
    by_key = dict(zip((c["key"] for c in cells), zip(cells, points)))
    inpaint = next((by_key[c["key"]] for c in cells if c["task"] == "inpainting" and c["fraction"] == 0.5
                    and c["steps"] == steps and c["mask"] == "centre"), None)
    if uncond is not None and inpaint is not None and fid:
        lines.append(_versus("The context must help", inpaint, uncond, fid, boot,
                             f"unconditional {zs.short_label} sampling at {steps} steps (the step sweep)"))
    elif fid:
        lines.append(f"- The context must help: no centre-mask inpainting cell at 50% known and {steps} steps "
                     "(sample.steps_default) to compare with the step sweep; add 0.5 to zeroshot.fractions, "
                     f"centre to zeroshot.masks and {steps} to zeroshot.steps.")
    if uncond is not None and acc:
        lines += [_expansion_line(c, p, uncond, acc, boot) for c, p in zip(cells, points)
                  if c["task"] == EXPANSION and acc in c["metrics"]]
    for c, p in zip(cells, points):
        if c["task"] != CONTINUATION or c["parallel"]:
            continue
        rivals = [by_key[o["key"]] for o in cells if o["task"] == CONTINUATION and o["parallel"]
                  and o["fraction"] == c["fraction"]]
        for metric in (m for m in (fid, acc, "psnr") if m):
            lines += [_versus(f"Random order vs {DECODERS[c['model']].short_label} from the top rows",
                              rival, (c, p), metric, boot, _label(c)) for rival in rivals]
    return [*lines, ""]


def _versus(title: str, b: tuple[Mapping, Point], a: tuple[Mapping, Point] | Point, metric: str, boot: Bootstrap,
            a_text: str) -> str:
    """One finding: b's `metric` against a's, the difference b - a with its interval and verdict."""
    cell_b, point_b = b
    point_a = a[1] if isinstance(a, tuple) else a
    diff, se = difference(point_a, point_b, metric, boot)
    verdict, interval = judged(diff, se, boot, lower_is_better=metric.startswith(("fid_", "kid_")))
    return (f"- {title}, `{metric}`: {_label(cell_b)} {with_interval(point_b, metric)} against "
            f"{a_text} {with_interval(point_a, metric)}: {signed(diff)}{interval}, {verdict}.")


def _expansion_line(cell: Mapping, point: Point, uncond: Point, acc: str, boot: Bootstrap) -> str:
    """Expansion accuracy against EXPANSION_SHARE x the unconditional accuracy (both with intervals)."""
    target = EXPANSION_SHARE * uncond.metrics[acc]
    diff = point.metrics[acc] - target
    band_e, band_u = point.band(acc), uncond.band(acc)
    se = math.hypot(band_e[0], EXPANSION_SHARE * band_u[0]) if boot.on and band_e and band_u else None
    verdict, interval = judged(diff, se, boot, lower_is_better=False)
    verdict = {"better, beyond the noise": "above the target, beyond the noise",
               "worse, beyond the noise": "**below the target**, beyond the noise"}.get(verdict, verdict)
    return (f"- Expansion keeps the class: `{acc}` of {_label(cell)} {with_interval(point, acc)} against "
            f"{EXPANSION_SHARE} x the unconditional {uncond.point.steps}-step accuracy "
            f"{with_interval(uncond, acc)} = {fmt(target)}: {signed(diff)}{interval}, {verdict}.")
