"""`arpg sample`: class-balanced samples of one sweep point (model, steps, cfg, order).

Writes `samples.npz` (`arr_0` uint8 [N, H, W, C] as the ADM evaluator expects,
`labels` int64 [N], `tokens` [N, h, w]) and a PNG grid with one row per class.
Under torchrun the fixed, seeded batches are split across ranks (rank r takes
batches r, r + W, ...) and rank 0 merges them: the result equals one process.
"""

from __future__ import annotations

import contextlib
import os
import time

from arpg.decoders import DECODERS
from arpg.errors import ArpgError
from arpg.stages import (POINT_COMPUTE_KEYS, POINT_WILDCARDS, TOKEN_SPACE_KEYS, VQ_KEYS, Ctx, Job, Rule,
                         add_point_arguments, check_train_seed, gpu_count, key_list, log_path, point_args,
                         point_from_args, point_instances, point_path, section_keys, torchrun)
from arpg.sweeps import sweep_keys

GRID_COLUMNS = 10  # samples per class shown in the PNG grid


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    nproc = params["sample"]["nproc"]
    return Job("sample", dict(w), ("sample", *point_args(w)),
               (str(lay.model_checkpoint(w["model"], w["run"])), str(lay.tokenizer_checkpoint)),
               (point_path(lay.samples, w), point_path(lay.sample_grid, w)),
               # sample.nproc only shards the work: every batch has its own seed, so it is not a result key
               key_list(POINT_COMPUTE_KEYS, VQ_KEYS, TOKEN_SPACE_KEYS,
                        section_keys(params, "sample", drop=(*_sample_sweep_keys(), "nproc"))),
               launcher=torchrun(nproc), threads=params["point_threads"] * nproc, gpus=gpu_count(params, nproc),
               log=log_path(ctx, "sample", w, POINT_WILDCARDS))


def _sample_sweep_keys() -> tuple[str, ...]:
    """The keys of sample.* that choose *which* points exist (arpg.sweeps), not what one point does."""
    return tuple(k.split(".", 1)[1] for k in sweep_keys() if k.startswith("sample."))


RULE = Rule("sample", POINT_WILDCARDS, _job, point_instances,
            desc="Generate the class-balanced sample set of one sweep point.")


def configure(parser) -> None:
    add_point_arguments(parser, DECODERS)


def check_point(point, n_tokens: int) -> None:
    from arpg.engine.sampler import ORDERS

    if point.order not in ORDERS:
        raise ArpgError(f"unknown order {point.order!r}; use one of {', '.join(ORDERS)}")
    decoder = DECODERS[point.model]
    if not decoder.parallel and (point.order != decoder.native_order or point.steps != n_tokens):
        raise ArpgError(f"the {decoder.label} decodes one token per step in {decoder.native_order} order: use "
                        f"--steps {n_tokens} --order {decoder.native_order} "
                        f"(got --steps {point.steps} --order {point.order})")
    if not 1 <= point.steps <= n_tokens:
        raise ArpgError(f"--steps {point.steps} must be between 1 and the {n_tokens} tokens of the grid")


def run(args, params) -> None:
    import numpy as np
    import torch

    from arpg import dist
    from arpg.config import token_count
    from arpg.data.pixels import image_grid
    from arpg.engine.sample_set import generate_class_balanced, make_draw, merge_batches
    from arpg.engine.sampler import SamplerConfig
    from arpg.models.checkpoint import load_study_models
    from arpg.machine import cpu_name
    from arpg.progress import batch_progress
    from arpg.tracking import stage_run
    from arpg.utils import atomic_save_npz, atomic_save_png

    point = point_from_args(args)
    check_point(point, token_count(params))
    check_train_seed(params, args.seed)
    cfg = params["sample"]
    opts = SamplerConfig.from_params(cfg, steps=point.steps, cfg=point.cfg)
    num_classes = params["data"]["num_classes"]
    total = num_classes * cfg["num_per_class"]
    layout = params.layout
    with dist.session(params["device"]) as (info, device):
        run_params = {"model": point.model, "steps": point.steps, "cfg": point.cfg, "order": point.order,
                      "train_seed": point.seed, "seed": cfg["seed"], "schedule": opts.schedule, "cfg_schedule": opts.cfg_schedule,
                      "temperature": opts.temperature, "top_k": opts.top_k, "top_p": opts.top_p,
                      "num_samples": total, "nproc": info.world_size}
        # rank 0's run is open before any work, so a failure while decoding ends it FAILED
        with (stage_run(params, "sample", f"sample-{point.model}-{point.tag}", run_params) if info.is_main
              else contextlib.nullcontext()) as run:
            generator_model, tokenizer = load_study_models(params, point.model, device, point.run)
            draw = make_draw(point.model, generator_model, tokenizer, opts, point.order)
            speed_tags = {"arpg.img_s.cpu": cpu_name(), "arpg.img_s.device": str(device),
                          "arpg.img_s.threads": torch.get_num_threads(), "arpg.img_s.batch_size": cfg["batch_size"],
                          "arpg.img_s.nproc": info.world_size,
                          "arpg.img_s.load_avg_1m": f"{os.getloadavg()[0]:.2f}"}
            start = time.perf_counter()
            part = generate_class_balanced(
                draw, num_classes=num_classes, num_per_class=cfg["num_per_class"], batch_size=cfg["batch_size"],
                seed=cfg["seed"], device=device, rank=info.rank, world_size=info.world_size,
                progress=batch_progress(f"sample {point.model} {point.tag}"
                                        + (f" rank {info.rank}" if info.world_size > 1 else "")))
            seconds = time.perf_counter() - start
            parts = dist.gather_to_main(part, info)
            if not info.is_main:
                return
            labels_N, outputs = merge_batches(parts)
            tokens_Nhw = torch.cat([t for t, _ in outputs]).numpy()
            images_NHWC = torch.cat([img for _, img in outputs]).numpy()
            labels_np = labels_N.numpy().astype(np.int64)
            atomic_save_npz(layout.samples(point), arr_0=images_NHWC, labels=labels_np, tokens=tokens_Nhw)
            atomic_save_png(image_grid(images_NHWC, labels_np, min(GRID_COLUMNS, cfg["num_per_class"])),
                            layout.sample_grid(point))
            # The point's measured decoding speed (MLflow only: no output file holds a wall-clock number):
            # every image of the job over rank 0's wall time of its decoding loop (token decoding and pixel
            # decoding, first batch included). The report's quality-vs-speed pairs use the profile's timings.
            run.log_metrics({"img_s": total / seconds, "decode_seconds": seconds})
            run.set_tags(speed_tags)
            run.log_artifact(layout.sample_grid(point))
    print(f"wrote {total} samples to {layout.samples(point)} and {layout.sample_grid(point)}")
