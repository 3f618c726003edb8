"""`arpg profile`: images/s and peak memory of every decoder of arpg/decoders.py (CSV, JSON, plots, MLflow)."""

from __future__ import annotations

from arpg.decoders import DECODERS
from arpg.stages import DECODING_KEYS, TOKEN_SPACE_KEYS, Ctx, Job, Rule, gpu_count, key_list, log_path


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    prof = params["profile"]
    inputs = ()
    keys = key_list("device", "profile", DECODING_KEYS, "sample.confidence_noise", "seed")
    if "default" in prof["models"]:  # the study's own models (+ tokenizer, end-to-end, strategies) are timed too
        inputs = (*(str(lay.model_checkpoint(m)) for m in DECODERS), str(lay.tokenizer_checkpoint))
        keys += key_list(TOKEN_SPACE_KEYS, *(f"train.{d.model_key}" for d in DECODERS.values()),
                      "sample.strategies", "sample.strategy_steps")
    return Job("profile", {}, ("profile",), inputs, (str(lay.profile_csv), str(lay.profile_json)), keys,
               threads=prof["threads"], gpus=gpu_count(params), log=log_path(ctx, "profile", w, ()))


RULE = Rule("profile", (), _job, lambda p: [{}],
            desc="Time decoding and measure its memory, per model, step count, batch and precision.")


def configure(parser) -> None:
    parser.add_argument("--model", action="append", default=None, metavar="NAME",
                        help="profile only this entry of profile.models (repeatable); rows of the other "
                             "models already in profile.json are kept")
    parser.epilog = ("Sizes, steps, batch sizes, repeats, threads and precision come from the `profile:` "
                     "section of the params file; sampler options from `sample:`.")


def run(args, params) -> None:
    from arpg.checkpoint_io import read_json
    from arpg.config import unrecorded
    from arpg.engine import profile as prof
    from arpg.figures import profile_figures
    from arpg.progress import Progress
    from arpg.tracking import stage_run
    from arpg.warm import record_own_usage

    layout = params.layout
    specs = prof.plan(params, args.model)
    settings = {f"profile.{k}": v for k, v in unrecorded(params)["profile"].items()}  # MLflow labels
    with stage_run(params, "profile", run_params=settings) as run:
        print(f"profiling {len(specs)} configurations (one child process each; "
              f"threads={params['profile']['threads']}, repeats={params['profile']['repeats']})")
        bar = Progress(len(specs), "profile", unit="configuration")

        def log(line: str) -> None:  # once per configuration, measured or skipped
            print(line, flush=True)
            bar.update(1)
            bar.report(last=line.strip())

        rows = prof.run_profile(specs, log=log)  # every configuration's process has ended here
        record_own_usage()  # the stage times' CPU of this job includes its configurations'
        bar.close()
        if args.model and layout.profile_json.is_file():
            earlier = read_json(layout.profile_json, "the profile", written_by="arpg profile")
            kept = [r for r in earlier["rows"] if r["model"] not in args.model]
            rows = kept + rows
        meta = {**prof.environment(), "params_file": str(params.path), "params_hash": params.digest,
                "profile": params["profile"]}
        doc = prof.write_outputs(rows, layout.profile_csv, layout.profile_json, meta)
        plots = profile_figures(doc, layout.profile_dir)
        print(prof.summary(doc))
        run.log_metrics(prof.metrics(doc))
        for path in [layout.profile_csv, layout.profile_json, *plots]:
            run.log_artifact(path)
        print(f"wrote {layout.profile_csv}, {layout.profile_json} and {len(plots)} plots in {layout.profile_dir}")
