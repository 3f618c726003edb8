"""`arpg zero-shot --task T`: one task of inpainting, outpainting, completion from the top rows and
resolution expansion, measured on `zeroshot.num_images` test images.

Writes the task's zero-shot metrics JSON (one record per cell: the point estimates under `metrics`,
their intervals under `intervals` as in a sweep point's metrics file) and the same as a CSV table.

Cells: inpainting and outpainting at each known fraction and mask of `zeroshot:`, by the zero-shot
decoder at each of `zeroshot.steps`; the completion of the lower part from the top rows
(`continuation`) by it and by every raster-order decoder (one token per step, from the same known
tokens); resolution expansion (gallery.expand_to, gallery.expansion) at each step count. The cells
are planned here, without torch, because the stage's declaration plans one job per task from them
(the tasks run side by side); arpg/engine/zero_shot_eval.py runs and measures one cell."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from arpg.decoders import DECODERS, zero_shot_decoder
from arpg.errors import ArpgError
from arpg.sweeps import first_run
from arpg.stages import (POINT_COMPUTE_KEYS, STUDY_DECODING_KEYS, TOKEN_SPACE_KEYS, VQ_KEYS, Ctx, Job, Rule,
                         evaluate_keys, extractors_of, gpu_count, inception_external, key_list, log_path,
                         point_eval_inputs)

CONTINUATION = "continuation"  # the lower part completed from the top rows (the raster order's prefix)
EXPANSION = "resolution-expansion"
TASKS = ("inpainting", "outpainting", CONTINUATION, EXPANSION)  # of the gallery and the measured stage


@dataclass(frozen=True)
class Cell:
    """One measured edit: task, mask, known fraction, decoder and steps (None: one token per step)."""

    task: str
    mask: str
    fraction: float
    model: str
    steps: int | None

    @property
    def key(self) -> str:
        """`inpainting-centre-50-arpg-s8`: the cell's name in the JSON, the CSV and MLflow."""
        steps = f"s{self.steps}" if self.steps is not None else "seq"
        return f"{self.task}-{self.mask}-{round(100 * self.fraction)}-{self.model}-{steps}"

    @property
    def mask_key(self) -> int:
        """Seeds the cell's masks: the same masks for every decoder and step count (paired cells)."""
        return zlib.crc32(f"{self.task}-{self.mask}-{self.fraction}".encode())


def raster_decoders() -> list[str]:
    """Sequential decoders whose order allows completing from the top rows (the raster prefix)."""
    return [d.name for d in DECODERS.values() if not d.parallel and d.native_order == "raster"]


def cells(params, task: str) -> list[Cell]:
    """The cells of one task (one `zero_shot` job; its params reads are the job's keys), in table order."""
    from arpg.config import token_grid

    zs, zero_shot = params["zeroshot"], zero_shot_decoder()
    if zero_shot is None:
        raise ArpgError("no registered decoder edits zero-shot (arpg/decoders.py); drop the zero-shot stage")
    if task not in TASKS:
        raise ArpgError(f"unknown zero-shot task {task!r}; use one of {', '.join(TASKS)} (zeroshot.tasks)")
    steps = list(zs["steps"])
    if task == EXPANSION:  # one known token per training-grid cell (either expansion method)
        share = (token_grid(params) / params["gallery"]["expand_to"]) ** 2
        return [Cell(task, params["gallery"]["expansion"], share, zero_shot.name, s) for s in steps]
    out: list[Cell] = []
    for fraction in zs["fractions"]:
        for mask in zs["masks"]:
            if task == CONTINUATION:
                if mask != "top-rows":
                    continue
                out += [Cell(task, mask, fraction, zero_shot.name, s) for s in steps]
                out += [Cell(task, mask, fraction, name, None) for name in raster_decoders()]
            elif mask != "top-rows":  # top rows known: the continuation task
                out += [Cell(task, mask, fraction, zero_shot.name, s) for s in steps]
    if not out:
        raise ArpgError(f"zeroshot: the masks give task {task} no cell (continuation needs the top-rows mask, "
                        "inpainting / outpainting centre or random-block); widen zeroshot.masks")
    return out


def cell_models(params, task: str) -> list[str]:
    """The decoders whose checkpoints one task's job loads."""
    return list(dict.fromkeys(c.model for c in cells(params, task)))


def all_cells(params) -> list[Cell]:
    """Every task's cells, in `zeroshot.tasks` order (the report's table)."""
    return [c for task in params["zeroshot"]["tasks"] for c in cells(params, task)]



# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    """One task's cells (a job per task: the tasks run side by side)."""
    params, lay, task = ctx.params, ctx.layout, w["task"]
    # a name of no task is a placeholder (Snakemake's "{task}" pattern: outputs and log only)
    models = cell_models(params, task) if task in TASKS else []
    inputs = (*(str(lay.model_checkpoint(m, first_run(params))) for m in models), str(lay.tokenizer_checkpoint),
              str(lay.images("test")), str(lay.labels("test")), *point_eval_inputs(ctx, w))
    keys = key_list(POINT_COMPUTE_KEYS, "zeroshot.num_images", "zeroshot.batch_size", "zeroshot.steps",
                    "sample.cfg_default", STUDY_DECODING_KEYS, VQ_KEYS, TOKEN_SPACE_KEYS,
                    [k for k in evaluate_keys(params) if k != "sample.seed"])
    keys += ("gallery.expand_to", "gallery.expansion") if task == EXPANSION else ("zeroshot.fractions",
                                                                                  "zeroshot.masks")
    return Job("zero_shot", dict(w), ("zero-shot", "--task", task), inputs,
               (str(lay.zeroshot_json(task)), str(lay.zeroshot_csv(task))), keys,
               external=inception_external(params, extractors_of(params)), threads=params["point_threads"],
               gpus=gpu_count(params), log=log_path(ctx, "zero_shot", w, ("task",)))


# priority: a task's job runs minutes, the longest of the sweep phase: they start first, and the short
# sample and evaluate jobs fill the cores at the end instead of one long job running alone
RULE = Rule("zero_shot", ("task",), _job,
            lambda p: [{"task": t} for t in p["zeroshot"]["tasks"]] if zero_shot_decoder() else [],
            desc="Measure one zero-shot task's edits' quality over its known fractions, masks and step counts.",
            priority=10)


def configure(parser) -> None:
    parser.add_argument("--task", required=True, choices=TASKS, help="the edit measured")
    parser.epilog = ("Known fractions, masks, step counts and the image count come from `zeroshot:`; "
                     "guidance from sample.cfg_default; the expansion from gallery.expand_to / expansion.")


def run(args, params) -> None:
    from arpg import dist

    with dist.session(params["device"]) as (_, device):
        _zero_shot(params, args.task, device)


def csv_rows(doc: dict) -> tuple[list[dict], list[str]]:
    """One row per cell: what it is, each metric and, where it has one, its `_se`, `_lo`, `_hi`."""
    rows, metric_cols = [], {}
    for cell in doc["cells"]:
        row = {k: v for k, v in cell.items() if k not in ("metrics", "intervals")}
        for name, value in cell["metrics"].items():
            band = {f"{name}_{k}": cell["intervals"][name][k] for k in ("se", "lo", "hi")} \
                if name in cell["intervals"] else {}
            row.update({name: value, **band})
            metric_cols.update(dict.fromkeys([name, *band]))
        rows.append(row)
    head = [k for k in doc["cells"][0] if k not in ("metrics", "intervals")]
    return rows, head + list(metric_cols)


def _zero_shot(params, task: str, device) -> None:
    import time

    from arpg.decoders import zero_shot_decoder
    from arpg.engine.bootstrap import BootstrapConfig
    from arpg.engine.image_metrics import QUANTISATION_MSE
    from arpg.engine.zero_shot_eval import PSNR_TEXT, load_sources, measure, run_cell
    from arpg.models.checkpoint import load_study_models
    from arpg.progress import Progress
    from arpg.tracking import stage_run
    from arpg.utils import write_csv, write_json

    layout, zs = params.layout, params["zeroshot"]
    todo = cells(params, task)
    run_params = {"task": task, "seed": params["seed"], "num_images": zs["num_images"],
                  "cfg": params["sample"]["cfg_default"], "steps": ",".join(map(str, zs["steps"])),
                  "cells": len(todo)}
    # the run is open before any work (loading, encoding the sources), so any failure ends it FAILED
    with stage_run(params, "zero-shot", run_name=f"zero-shot-{task}", run_params=run_params) as run:
        models, tokenizer = {}, None
        for name in cell_models(params, task):
            models[name], tokenizer = load_study_models(params, name, device)
        src = load_sources(params, tokenizer, device)
        doc = {"task": task, "seed": params["seed"], "num_images": len(src.index), "cfg": run_params["cfg"],
               "zero_shot_decoder": zero_shot_decoder().name, "reference_split": params["evaluate"]["reference_split"],
               "extractors": list(params["evaluate"]["extractors"]),
               "bootstrap": BootstrapConfig.from_params(params).record(),
               "psnr": {**PSNR_TEXT, "mse_floor": QUANTISATION_MSE}, "cells": []}
        bar = Progress(len(todo), f"zero-shot {task}", unit="cell")
        for cell in todo:
            start = time.monotonic()  # the log only, never the metrics file
            record = measure(cell, run_cell(cell, params, models, tokenizer, src, device), params, src, device)
            doc["cells"].append(record)
            run.log_metrics({f"{cell.key}.{k}": v for k, v in record["metrics"].items()})
            run.log_metrics({f"{cell.key}.known_tokens_kept": float(record["known_tokens_kept"])})
            m = record["metrics"]
            print(f"{cell.key}: " + ", ".join(f"{k} {m[k]:.4g}" for k in m if not k.startswith("kid_std"))
                  + f"; known kept {record['known_tokens_kept']} ({time.monotonic() - start:.1f} s)")
            bar.update(1)
            bar.report(cell=cell.key)
        bar.close()
        write_json(layout.zeroshot_json(task), doc)
        rows, cols = csv_rows(doc)
        write_csv(layout.zeroshot_csv(task), rows, cols)
        run.log_artifact(layout.zeroshot_json(task))
        run.log_artifact(layout.zeroshot_csv(task))
    print(f"wrote {layout.zeroshot_json(task)} and {layout.zeroshot_csv(task)}")
