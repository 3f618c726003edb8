"""`arpg select --model M --steps S --cfg C --order O [--seed T]`: one guidance-sweep point's selection set.

The same class-balanced sample set as `arpg sample`, drawn with another sampling seed (its own
stream of sample.seed), measured like `arpg evaluate` and kept only as its metrics: the report
chooses each decoder's guidance on these and reports the chosen point's evaluation set, which
the choice never saw (arpg.sweeps: a `selection` sweep's points).
"""

from __future__ import annotations

from arpg.decoders import DECODERS
from arpg.stages import (POINT_WILDCARDS, Ctx, Job, Rule, add_point_arguments, check_train_seed, gpu_count, key_list,
                         log_path, point_args, point_eval_inputs, point_from_args, point_path, point_wildcards)

SELECTION_STREAM = 0x5E1EC7  # seed stream of the selection sets (apart from the evaluation sets' sample.seed)


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    from arpg import pipeline

    params, lay = ctx.params, ctx.layout
    sample, evaluate = pipeline.RULES["sample"].build(ctx, w), pipeline.RULES["evaluate"].build(ctx, w)
    return Job("select", dict(w), ("select", *point_args(w)), (*sample.inputs, *point_eval_inputs(ctx, w)),
               (point_path(lay.selection_metrics, w),), key_list(sample.param_keys, evaluate.param_keys),
               external=evaluate.external, threads=params["point_threads"], gpus=gpu_count(params),
               log=log_path(ctx, "select", w, POINT_WILDCARDS))


def _instances(params) -> list[dict[str, str]]:
    from arpg.sweeps import selection_points

    return [point_wildcards(p) for p in sorted(selection_points(params), key=lambda p: (p.model, p.run, p.steps,
                                                                                         p.cfg))]


RULE = Rule("select", POINT_WILDCARDS, _job, _instances,
            desc="Measure a guidance point on a selection set drawn with another sampling seed.")


def configure(parser) -> None:
    add_point_arguments(parser, DECODERS)


def run(args, params) -> None:
    import numpy as np
    import torch

    from arpg.commands.sample import check_point
    from arpg.config import token_count
    from arpg.engine.bootstrap import evaluate_images
    from arpg.engine.sample_set import generate_class_balanced, make_draw, merge_batches
    from arpg.engine.sampler import SamplerConfig
    from arpg.models.checkpoint import load_study_models
    from arpg.tracking import stage_run
    from arpg.utils import derive_seed, resolve_device, write_json

    point = point_from_args(args)
    check_point(point, token_count(params))
    check_train_seed(params, args.seed)
    cfg, layout = params["sample"], params.layout
    seed = derive_seed(cfg["seed"], SELECTION_STREAM)
    device = resolve_device(params["device"])
    run_params = {"model": point.model, "steps": point.steps, "cfg": point.cfg, "order": point.order,
                  "train_seed": point.seed, "selection_seed": seed}
    with stage_run(params, "select", f"select-{point.model}-{point.tag}", run_params) as run:
        model, tokenizer = load_study_models(params, point.model, device, point.run)
        opts = SamplerConfig.from_params(cfg, steps=point.steps, cfg=point.cfg)
        draw = make_draw(point.model, model, tokenizer, opts, point.order)
        part = generate_class_balanced(draw, num_classes=params["data"]["num_classes"],
                                       num_per_class=cfg["num_per_class"], batch_size=cfg["batch_size"], seed=seed,
                                       device=device)
        labels_N, outputs = merge_batches([part])
        images_NHWC = torch.cat([img for _, img in outputs]).numpy()
        metrics, intervals, _ = evaluate_images(params, images_NHWC, labels_N.numpy().astype(np.int64), device)
        write_json(layout.selection_metrics(point), {
            "model": point.model, "steps": point.steps, "cfg": point.cfg, "order": point.order,
            **({"train_seed": point.seed} if point.seed else {}), "selection_seed": seed,
            "num_samples": int(len(images_NHWC)), **metrics, "intervals": intervals})
        run.log_metrics(metrics)
    print(f"wrote {layout.selection_metrics(point)}")
