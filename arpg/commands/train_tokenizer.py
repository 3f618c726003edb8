"""`arpg train-tokenizer`: train the VQ tokenizer, or import tokenizer.pretrained (a LlamaGen checkpoint)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from arpg.config import NOT_RESULT_KEYS
from arpg.stages import COMPUTE_KEYS, VQ_KEYS, Ctx, Job, Rule, gpu_count, key_list, log_path, section_keys


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    lay, tok = ctx.layout, ctx.params["tokenizer"]
    pretrained = tok["pretrained"]
    inputs = () if pretrained else (str(lay.images("train")),)
    keys = key_list(COMPUTE_KEYS, VQ_KEYS, "tokenizer.pretrained")
    if not pretrained:
        keys += key_list(section_keys(ctx.params, "tokenizer", drop=("eval_images", "tokenize_flip",
                                                                    *NOT_RESULT_KEYS["tokenizer"])), "seed")
    return Job("train_tokenizer", {}, ("train-tokenizer",), inputs,
               (str(lay.tokenizer_checkpoint), str(lay.tokenizer_metrics)), key_list(keys),
               external=(pretrained,) if pretrained else (), threads=ctx.params["threads"],
               gpus=0 if pretrained else gpu_count(ctx.params), log=log_path(ctx, "train_tokenizer", w, ()))


RULE = Rule("train_tokenizer", (), _job, lambda p: [{}],
            desc="Train the VQ tokenizer on the training images, or import released weights.")


def configure(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (logs still go to MLflow)")
    parser.epilog = ("Sizes, losses and budgets come from the `tokenizer:` section of the params file. "
                     "An interrupted run resumes from its last checkpoint when re-run.")


def run(args, params) -> None:
    from arpg.config import unrecorded
    from arpg.tracking import stage_run

    tok = params["tokenizer"]
    layout = params.layout
    run_params = ({f"tokenizer.{k}": v for k, v in unrecorded(params)["tokenizer"].items()}  # MLflow labels
                  | {"seed": unrecorded(params)["seed"], "model": "vq"})
    with stage_run(params, "train-tokenizer", run_params=run_params) as tracker:
        start = time.monotonic()
        if tok["pretrained"]:
            summary = import_pretrained(params)
            print(f"loaded {summary['pretrained']} strictly ({summary['parameters']:,} parameters); "
                  f"wrote {layout.tokenizer_checkpoint}")
        else:
            summary = train_from_params(params, tracker, progress=not args.no_progress)
            final = summary["final"]
            print(f"trained {summary['steps']} steps in {time.monotonic() - start:.1f} s; "
                  f"last window: loss {final.get('loss', float('nan')):.4f}, "
                  f"batch PSNR {final.get('batch_psnr', float('nan')):.2f} dB, "
                  f"codes used {final.get('usage_window', float('nan')):.1%}")
            print(f"wrote {layout.tokenizer_checkpoint}")
        tracker.log_metrics({"train_steps": summary["steps"], "train_minutes": (time.monotonic() - start) / 60})
        tracker.log_artifact(layout.tokenizer_metrics)


def train_from_params(params, run=None, progress: bool = True) -> dict:
    """Train the tokenizer the params describe (resuming from the layout's state file); write
    tokenizer.pt and its metrics JSON; return the summary written."""
    from arpg.data.arrays import load_images_NCHW
    from arpg.engine.tokenizer import TokenizerTrainConfig, train_tokenizer
    from arpg.models.vq import VQConfig, tokenizer_payload
    from arpg.utils import atomic_torch_save, deterministic_algorithms, resolve_device, write_json

    layout = params.layout
    vq_cfg = VQConfig.from_params(params)
    device = resolve_device(params["device"])
    images_NCHW = load_images_NCHW(layout, "train", vq_cfg.in_channels)
    with deterministic_algorithms(device):
        result = train_tokenizer(vq_cfg, TokenizerTrainConfig.from_params(params), images_NCHW, device,
                                 state_path=layout.tokenizer_state, run=run, progress=progress)
    atomic_torch_save(tokenizer_payload(result.model.cpu()), layout.tokenizer_checkpoint)
    summary = {"steps": result.steps, "images_seen": result.steps * params["tokenizer"]["batch_size"],
               "pretrained": None, "final": result.history[-1] if result.history else {}, "config": asdict(vq_cfg)}
    write_json(layout.tokenizer_metrics, summary)
    return summary


def import_pretrained(params) -> dict:
    """tokenizer.pretrained set: load the LlamaGen checkpoint strictly and write our tokenizer.pt from it."""
    from arpg.models.vq import VQConfig, load_tokenizer, tokenizer_payload
    from arpg.utils import atomic_torch_save, write_json

    layout = params.layout
    path = Path(params["tokenizer"]["pretrained"])
    vq_cfg = VQConfig.from_params(params)
    model = load_tokenizer(path, vq_cfg, what="tokenizer.pretrained")
    atomic_torch_save(tokenizer_payload(model), layout.tokenizer_checkpoint)
    summary = {"steps": 0, "pretrained": str(path),
               "parameters": sum(p.numel() for p in model.parameters()), "config": asdict(vq_cfg)}
    write_json(layout.tokenizer_metrics, summary)
    return summary
