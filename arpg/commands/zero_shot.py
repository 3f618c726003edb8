"""`arpg zero-shot --task T`: one task of inpainting, outpainting, completion from the top rows and
resolution expansion, measured on `zeroshot.num_images` test images (arpg/zeroshot_plan.py says what
each cell is).

Writes the task's zero-shot metrics JSON (one record per cell: the point estimates under `metrics`,
their intervals under `intervals` as in a sweep point's metrics file) and the same as a CSV table."""

from __future__ import annotations

from arpg.zeroshot_plan import TASKS


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
    from arpg.engine.zeroshot_eval import PSNR_TEXT, load_sources, measure, run_cell
    from arpg.zeroshot_plan import cell_models, cells
    from arpg.engine.image_metrics import QUANTISATION_MSE
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
