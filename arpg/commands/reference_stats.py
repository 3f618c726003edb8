"""`arpg reference-stats --extractor X`: features + FID statistics of the real reference split,
computed once per extractor and cached as a pipeline artifact."""

from __future__ import annotations

from arpg.stages import COMPUTE_KEYS, Ctx, Job, Rule, extractors_of, gpu_count, inception_external, key_list, log_path


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    extractor, split = w["extractor"], params["evaluate"]["reference_split"]
    inputs = [str(lay.images(split)), str(lay.labels(split))]
    if extractor == "classifier":
        inputs.append(str(lay.classifier_checkpoint))
    keys = key_list(COMPUTE_KEYS, "evaluate.reference_split", "evaluate.batch_size")
    if extractor == "inception":
        keys += ("evaluate.inception_weights",)
    return Job("reference_stats", dict(w), ("reference-stats", "--extractor", extractor), tuple(inputs),
               (str(lay.reference_stats(extractor, split)),), keys,
               external=inception_external(params, [extractor]), threads=params["threads"], gpus=gpu_count(params),
               log=log_path(ctx, "reference_stats", w, ("extractor",)))


RULE = Rule("reference_stats", ("extractor",), _job, lambda p: [{"extractor": x} for x in extractors_of(p)],
            desc="Compute one extractor's feature statistics of the real reference split.")


def configure(parser) -> None:
    from arpg.engine.evaluate import EXTRACTORS

    parser.add_argument("--extractor", required=True, choices=EXTRACTORS,
                        help="feature extractor (one of evaluate.extractors)")
    parser.epilog = "The split comes from evaluate.reference_split."


def run(args, params) -> None:
    import time

    from arpg.data.arrays import load_images
    from arpg.engine.evaluate import compute_reference, extractor_weights, file_digest, save_reference
    from arpg.tracking import stage_run
    from arpg.utils import resolve_device

    layout = params.layout
    split = params["evaluate"]["reference_split"]
    device = resolve_device(params["device"])
    out = layout.reference_stats(args.extractor, split)
    # the run is open before any work (the weights, the images), so any failure ends it FAILED
    with stage_run(params, "reference-stats", run_name=f"reference-stats-{args.extractor}-{split}",
                   run_params={"extractor": args.extractor, "split": split}) as run:
        weights = extractor_weights(params, args.extractor)
        images = load_images(layout, split)
        start = time.monotonic()
        reference = compute_reference(images, args.extractor, weights, params["evaluate"]["batch_size"], device)
        save_reference(out, reference, args.extractor, split, file_digest(weights))
        run.log_metrics({"images": len(images), "feature_dim": reference["features"].shape[1],
                         "seconds": time.monotonic() - start})
    print(f"{args.extractor} reference on {split} ({len(images)} images, "
          f"{reference['features'].shape[1]}-d features) -> {out}")
