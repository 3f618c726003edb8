"""`arpg evaluate --model M --steps S --cfg C --order O`: FID / KID / IS / precision-recall of one sweep point.

Every extractor in evaluate.extractors, plus the classifier's accuracy, each with a bootstrap
standard error and 95% interval (evaluate.bootstrap replicates; 0: none).

Metrics JSON: the point estimates as flat `<metric>_<extractor>` keys, plus
`"intervals": {"fid_classifier": {"se", "lo", "hi", "replicates"}, ...}` (null where not finite) and
`"bootstrap": {"replicates", "level", "method", "kid_subsets"}`."""

from __future__ import annotations

from arpg.decoders import DECODERS
from arpg.stages import (POINT_WILDCARDS, Ctx, Job, Rule, add_point_arguments, evaluate_keys, extractors_of, gpu_count,
                         inception_external, log_path, point_args, point_eval_inputs, point_from_args, point_instances,
                         point_path)


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    return Job("evaluate", dict(w), ("evaluate", *point_args(w)),
               (point_path(lay.samples, w), *point_eval_inputs(ctx, w)),
               (point_path(lay.metrics, w),), evaluate_keys(params),
               external=inception_external(params, extractors_of(params)), threads=params["point_threads"],
               gpus=gpu_count(params),
               log=log_path(ctx, "evaluate", w, POINT_WILDCARDS))


RULE = Rule("evaluate", POINT_WILDCARDS, _job, point_instances,
            desc="Measure FID, IS, KID, precision/recall and accuracy of one sweep point's samples.")


def configure(parser) -> None:
    add_point_arguments(parser, DECODERS)
    parser.add_argument("--export-adm", metavar="PATH.npz", default=None,
                        help="also write the samples as an ADM-evaluator batch (arr_0 uint8 [N, H, W, 3])")


def run(args, params) -> None:
    from arpg.checkpoint_io import read_npz
    from arpg.engine.bootstrap import BootstrapConfig, evaluate_images
    from arpg.engine.evaluate import export_adm_npz
    from arpg.stages import point_command
    from arpg.tracking import stage_run
    from arpg.utils import resolve_device, write_json

    layout = params.layout
    point = point_from_args(args)
    path = layout.samples(point)
    device = resolve_device(params["device"])
    bootstrap = BootstrapConfig.from_params(params)
    split = params["evaluate"]["reference_split"]
    run_params = {"model": point.model, "steps": point.steps, "cfg": point.cfg, "order": point.order,
                  "train_seed": point.seed, "seed": params["sample"]["seed"], "extractors": ",".join(params["evaluate"]["extractors"])}
    # the run is open before any work (reading the samples), so any failure ends it FAILED
    with stage_run(params, "evaluate", run_name=f"evaluate-{point.model}-{point.tag}",
                   run_params=run_params) as run:
        blob = read_npz(path, f"samples of {point.model} {point.tag}", keys=("arr_0", "labels"),
                        written_by=f"arpg sample {point_command(point)}")
        images, labels = blob["arr_0"], blob["labels"]
        metrics, intervals, bootstrap_seconds = evaluate_images(params, images, labels, device)
        out = {"model": point.model, "steps": point.steps, "cfg": point.cfg, "order": point.order,
               **({"train_seed": point.seed} if point.seed else {}), "seed": params["sample"]["seed"], "num_samples": int(len(images)), "reference_split": split,
               "extractors": list(params["evaluate"]["extractors"]), **metrics,
               "bootstrap": bootstrap.record(), "intervals": intervals}
        write_json(layout.metrics(point), out)
        run.log_metrics(metrics)
        run.log_metrics({f"{name}_se": v["se"] for name, v in intervals.items() if v["se"] is not None})
        run.log_artifact(layout.metrics(point))
    for name, value in metrics.items():
        band = intervals.get(name)
        spread = f"  (se {band['se']:.3g}, 95% [{band['lo']:.6g}, {band['hi']:.6g}])" \
            if band and None not in (band["se"], band["lo"], band["hi"]) else ""
        print(f"{name}: {value:.6g}{spread}")
    print(f"bootstrap: {bootstrap.replicates} replicates in {bootstrap_seconds:.2f} s")
    print(f"wrote {layout.metrics(point)}")
    if args.export_adm:
        print(f"wrote ADM batch {export_adm_npz(images, args.export_adm)}")
