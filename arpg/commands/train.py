"""`arpg train --model NAME`: train one study model, a decoder of arpg/decoders.py (or import its
released weights, `train.<name>_pretrained`).

Everything else comes from the `train:` section of the params file. With
`train.nproc > 1` the command re-launches itself under torchrun (DDP; gloo on CPU,
nccl on CUDA); launched by torchrun directly, it joins the existing group.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any, Mapping

from arpg.config import NOT_RESULT_KEYS
from arpg.decoders import DECODERS, decoder
from arpg.errors import ConfigError
from arpg.paths import seed_run
from arpg.stages import (TOKEN_SPACE_KEYS, Ctx, Job, Rule, check_train_seed, gpu_count, key_list, log_path,
                         pretrained_weights, section_keys, seed_args, torchrun)

if TYPE_CHECKING:  # annotations only: importing this module (Snakemake does) loads no torch
    import torch
    import torch.nn as nn

    from arpg.data.tokens import TokenData


# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    """One decoder's generator, trained on the tokens or imported from its released weights."""
    params, lay = ctx.params, ctx.layout
    train, tok, model, run = params["train"], params["tokenizer"], w["model"], w["run"]
    # a name of no decoder is a placeholder: Snakemake's pattern ("{model}": outputs and log only) or
    # DVC's foreach template ("${item.model}"), which then matches no decoder's job (their own keys)
    pretrained = pretrained_weights(params, model) if model in DECODERS else None
    outputs = (str(lay.model_checkpoint(model, run)), str(lay.model_metrics(model, run)))
    # train.seeds chooses which jobs exist; each job's own seed is its `run`
    others = tuple(k for d in DECODERS.values() if d.name != model for k in (d.model_key, d.pretrained_key))
    keys = key_list("device", "seed", TOKEN_SPACE_KEYS,
                    section_keys(params, "train", drop=others + NOT_RESULT_KEYS["train"] + ("seeds",)))
    args = ("train", "--model", model, *seed_args(run))
    log = log_path(ctx, "train", w, ("model", "run"))
    if pretrained:
        if len(train["seeds"]) > 1:
            raise ConfigError(f"train.seeds {train['seeds']}: {model} imports fixed released weights "
                              f"({DECODERS[model].pretrained_key}), so its seeds would be one model; "
                              "set train.seeds: [0]")
        # Released weights: the command loads them strictly and re-saves model.pt; no training.
        return Job("train", dict(w), args, (), outputs, keys, external=(pretrained,), log=log)
    if train["use_flipped"] and not tok["tokenize_flip"]:
        raise ConfigError(f"{params.get('name')}: train.use_flipped is true but tokenizer.tokenize_flip "
                          "is false, so no flipped tokens exist; enable one and disable the other")
    inputs = [str(lay.tokens("train")), str(lay.token_labels("train"))]
    if train["use_flipped"]:
        inputs.append(str(lay.tokens("train_flip")))
    nproc = train["nproc"]
    return Job("train", dict(w), args, tuple(inputs), outputs, keys, launcher=torchrun(nproc),
               threads=train["threads"] * nproc, gpus=gpu_count(params, nproc), log=log)


RULE = Rule("train", ("model", "run"), _job,
            lambda p: [{"model": m, "run": seed_run(s)} for m in DECODERS for s in p["train"]["seeds"]],
            desc="Train one decoder on the token grids, or import its released weights.")


def configure(parser) -> None:
    parser.add_argument("--model", required=True, choices=tuple(DECODERS),
                        help="which study model: " + ", ".join(f"{d.name} ({d.label})" for d in DECODERS.values()))
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed, one of train.seeds (added to `seed` for every draw of the training)")
    parser.epilog = ("Model size, optimiser, budgets and checkpointing come from the `train:` section of the "
                     "params file. A killed run resumes from its last checkpoint when started again.")


def run(args, params) -> int:
    nproc = params["train"]["nproc"]
    check_train_seed(params, args.seed)
    if nproc > 1 and "WORLD_SIZE" not in os.environ and not params["train"][DECODERS[args.model].pretrained_key]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "arpg", "train", "--params", str(params.path), "--model", args.model, "--seed", str(args.seed)]
        print(f"launching {nproc} processes: {' '.join(cmd[1:])}", flush=True)
        return subprocess.run(cmd, check=False).returncode

    run_train(params, args.model, args.seed)
    return 0


def codebook_size(params: Mapping[str, Any]) -> int:
    """Vocabulary of the token grids: the tokenizer's codebook (the data check catches a mismatch)."""
    return int(params["tokenizer"]["codebook_size"])


def model_name(params: Mapping[str, Any], decoder_name: str) -> str:
    return params["train"][decoder(decoder_name).model_key]


def build_study_model(params: Mapping[str, Any], decoder_name: str, train_seed: int = 0, **overrides) -> nn.Module:
    """The registry model named by train.<decoder>_model, initialised from a seed of its own (that of
    training seed `train_seed`)."""
    from arpg.config import token_grid
    from arpg.engine.train import STREAM_INIT
    from arpg.models.registry import build_model
    from arpg.utils import derive_seed, make_generator, seeded_global_rng

    name = model_name(params, decoder_name)
    with seeded_global_rng(None):  # module constructors draw default inits (then overwritten) from it
        model = build_model(name, codebook_size=codebook_size(params), num_classes=params["data"]["num_classes"],
                            grid_size=token_grid(params),
                            generator=make_generator(derive_seed(params["seed"] + train_seed, STREAM_INIT)),
                            **overrides)
    return model


def load_study_data(params: Mapping[str, Any]) -> TokenData:
    from arpg.config import token_grid
    from arpg.data.arrays import load_token_labels, load_tokens
    from arpg.data.tokens import TokenData

    layout = params.layout
    splits = ["train", "train_flip"] if params["train"]["use_flipped"] else ["train"]
    return TokenData([load_tokens(layout, s) for s in splits], [load_token_labels(layout, s) for s in splits],
                     grid_size=token_grid(params), codebook_size=codebook_size(params),
                     num_classes=params["data"]["num_classes"], names=[f"{s} tokens" for s in splits])


def _write_outputs(params, decoder_name: str, model: nn.Module, metrics: dict, tracker, run: str = "") -> None:
    from arpg.models.checkpoint import save_generator
    from arpg.utils import write_json

    layout = params.layout
    checkpoint, written = layout.model_checkpoint(decoder_name, run), layout.model_metrics(decoder_name, run)
    save_generator(model, checkpoint, model_name(params, decoder_name))
    write_json(written, metrics)
    tracker.log_artifact(written)
    print(f"wrote {checkpoint} and {written}")


def import_pretrained(params, decoder_name: str, tracker) -> dict:
    """Skip training: strictly load the configured released checkpoint, re-save it in our layout."""
    from arpg.config import token_grid
    from arpg.models.checkpoint import load_generator
    from arpg.utils import require_file

    key = decoder(decoder_name).param_keys[1]
    path = require_file(params["train"][decoder(decoder_name).pretrained_key], f"{key} checkpoint",
                        f"put the file there or set {key}: null to train the model")
    name = model_name(params, decoder_name)
    model = load_generator(path, name, codebook_size=codebook_size(params),
                           num_classes=params["data"]["num_classes"], grid_size=token_grid(params), what=key)
    metrics = {"model": name, "kind": decoder_name, "pretrained": str(path), "steps": 0,
               "parameters": sum(p.numel() for p in model.parameters()),
               "uniform_loss": math.log(codebook_size(params))}
    print(f"{decoder_name}: using pretrained weights {path} ({name}); training skipped")
    _write_outputs(params, decoder_name, model, metrics, tracker)
    return metrics


def run_train(params, decoder_name: str, train_seed: int = 0) -> dict | None:
    """`arpg train --model <decoder> [--seed S]`: train (or import) one study model; returns the metrics
    on rank 0."""
    from arpg import dist

    with dist.session(params["device"]) as (info, device):
        return _run_train(params, decoder_name, train_seed, info, device)


def _run_train(params, decoder_name: str, train_seed: int, info, device: torch.device) -> dict | None:
    import dataclasses

    from arpg.engine.train import TrainConfig, train
    from arpg.tracking import NullRun, stage_run
    from arpg.utils import deterministic_algorithms

    name, run = model_name(params, decoder_name), seed_run(train_seed)
    cfg = TrainConfig.from_params(params)
    cfg = dataclasses.replace(cfg, seed=cfg.seed + train_seed)  # every draw of the training: its own seed
    run_params = {"model": decoder_name, "name": name, "seed": cfg.seed, "train_seed": train_seed,
                  "train_steps": cfg.max_steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "world_size": info.world_size}
    tracking = (stage_run(params, "train", run_name=f"train-{decoder_name}{run}", run_params=run_params)
                if info.is_main else contextlib.nullcontext(NullRun()))
    with tracking as tracker:
        if params["train"][decoder(decoder_name).pretrained_key]:
            return import_pretrained(params, decoder_name, tracker) if info.is_main else None
        data = load_study_data(params)
        model = build_study_model(params, decoder_name, train_seed)
        n_params = sum(p.numel() for p in model.parameters())
        if info.is_main:
            print(f"{decoder_name}: {name}, {n_params:,} parameters, {len(data):,} sequences of {data.seq_len} "
                  f"tokens, {info.world_size} process(es) on {device}")
        with deterministic_algorithms(device):
            result = train(model, decoder_name, data, cfg, state_path=params.layout.model_state(decoder_name, run),
                           device=device, dist_info=info, tracker=tracker, name=name)
        if not info.is_main:
            return None
        uniform = math.log(codebook_size(params))
        model.load_state_dict(result.sampling_state)
        # results only: speed goes to the log and MLflow, so the file is the same on any machine
        metrics = {"model": name, "kind": decoder_name, **({"train_seed": train_seed} if train_seed else {}),
                   "parameters": n_params, "steps": result.steps,
                   "final_loss": result.final_loss, "uniform_loss": uniform,
                   "world_size": info.world_size, "weights": "ema" if cfg.ema > 0 else "final",
                   "ema_decay": cfg.ema,
                   "precision": "bf16" if cfg.precision == "bf16" and device.type == "cuda" else "fp32"}
        tracker.log_metrics({"final_loss": result.final_loss, "uniform_loss": uniform,
                             "train_tokens_per_s": result.tokens_per_s, "train_wall_s": result.wall_s},
                            result.steps)
        final = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
        print(f"{decoder_name}: {result.steps} steps, final loss {final} vs "
              f"uniform-guess ln({codebook_size(params)}) = {uniform:.4f}; {result.tokens_per_s:,.0f} tokens/s, "
              f"{result.wall_s:.1f} s; sampling weights: {metrics['weights']}")
        _write_outputs(params, decoder_name, model, metrics, tracker, run)
        return metrics
