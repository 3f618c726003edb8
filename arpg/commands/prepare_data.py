"""`arpg prepare-data`: decode the configured source into prepared arrays + manifest."""

from __future__ import annotations

from arpg.stages import Ctx, Job, Rule, key_list, log_path, section_keys


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    lay, data = ctx.layout, ctx.params["data"]
    outputs = [str(p) for split in ("train", "test") for p in (lay.images(split), lay.labels(split))]
    external = tuple(p for p in (data["path"], data["test_path"]) if p)
    keys = key_list("threads", section_keys(ctx.params, "data", drop=("on_corrupt", "test_path", "test_fraction")))
    if data["source"] == "imagefolder":  # a folder of files: decoding errors and a held-out split
        keys += ("data.on_corrupt", "data.test_path") + (() if data["test_path"] else ("data.test_fraction", "seed"))
    return Job("prepare_data", {}, ("prepare-data",), (), (*outputs, str(lay.data_manifest)), keys,
               external=external, threads=ctx.params["threads"], log=log_path(ctx, "prepare_data", w, ()))


RULE = Rule("prepare_data", (), _job, lambda p: [{}],
            desc="Decode the dataset into fixed-size image and label arrays, train and test splits.")


def configure(parser) -> None:
    parser.epilog = "Source, geometry and policies come from the `data:` section of the params file."


def run(args, params) -> None:
    from arpg.config import unrecorded
    from arpg.data.prepare import prepare
    from arpg.tracking import stage_run

    data = unrecorded(params)["data"]  # MLflow labels; prepare() reads what it uses
    with stage_run(params, "prepare-data", run_params={f"data.{k}": v for k, v in data.items()}) as run:
        manifest = prepare(params)
        for split, info in manifest["splits"].items():
            print(f"{split}: {info['count']} images {tuple(info['shape'][1:])}, "
                  f"pixel mean {info['pixel_mean']:.4f}"
                  + (f" (source {info['pixel_mean_source']:.4f})" if "pixel_mean_source" in info else "")
                  + f", per class {min(info['per_class'].values())}-{max(info['per_class'].values())}")
            run.log_metrics({f"{split}_count": info["count"], f"{split}_pixel_mean": info["pixel_mean"]})
        if manifest["skipped"]:
            print(f"skipped {len(manifest['skipped'])} unreadable file(s):")
            for item in manifest["skipped"]:
                print(f"  {item['file']}: {item['reason']}")
        run.log_metrics({"skipped": len(manifest["skipped"])})
        run.log_artifact(params.layout.data_manifest)
        print(f"wrote {params.layout.data_dir}")
