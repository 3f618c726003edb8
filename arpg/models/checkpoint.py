"""Save / strictly load generators, interchangeable with released checkpoints.

Ours: {"state_dict", "config", "kind", "name"} (state dict in the released key layout: ARPG's for
"arpg", LlamaGen's GPT for "raster"). Released: a dict holding the state dict under "state_dict"
(ARPG), "model" or "module" (LlamaGen), no config: the architecture comes from a registry name.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from arpg.checkpoint_io import check_state_dict, read_checkpoint
from arpg.errors import CheckpointError
from arpg.models.registry import NETWORKS, build_model, network_of, network_of_size
from arpg.utils import atomic_torch_save

_STATE_KEYS = ("state_dict", "model", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


def save_generator(model: nn.Module, path: str | os.PathLike, name: str) -> dict:
    """Atomically write {"state_dict", "config", "kind", "name"}; returns what was written."""
    model = getattr(model, "module", model)  # unwrap DDP
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(model.config),
        "kind": network_of(model),
        "name": name,
    }
    atomic_torch_save(payload, path)
    return payload


def _state_dict_of(obj, path: Path) -> dict:
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj  # a bare state dict
    raise CheckpointError(
        f"{path}: no state dict found (looked for keys {list(_STATE_KEYS)}); is this a generator checkpoint?"
    )


def _strip_wrappers(sd: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _sizes_fix() -> str:
    from arpg.decoders import DECODERS

    keys = " / ".join(d.param_keys[0] for d in DECODERS.values())
    return f"check the model name and codebook_size / num_classes / grid_size ({keys}, tokenizer.codebook_size)"


def load_generator(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    codebook_size: int | None = None,
    num_classes: int | None = None,
    grid_size: int | None = None,
    device="cpu",
    what: str = "generator checkpoint",
    written_by: str | None = None,
) -> nn.Module:
    """Strictly load our checkpoint (config inside) or a released one (built from registry `name`).

    Given codebook_size / num_classes / grid_size must agree with the checkpoint. For a released
    checkpoint, codebook_size and num_classes default to the weight shapes; grid_size is required
    (RoPE tables are not stored). Returns the model in eval mode on `device`. `what` names the file
    in messages; `written_by` is the command that made it, if the pipeline did (see `read_checkpoint`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found at {path}; train it (arpg train) or fix the path")
    obj = read_checkpoint(path, what, written_by=written_by)
    sd = _strip_wrappers(_state_dict_of(obj, path))
    wanted = {"codebook_size": codebook_size, "num_classes": num_classes, "grid_size": grid_size}

    if isinstance(obj, dict) and "config" in obj and "kind" in obj:
        config = dict(obj["config"])
        for field, value in wanted.items():
            if value is not None and config.get(field) != value:
                raise CheckpointError(
                    f"{path} was trained with {field}={config.get(field)}, but {value} was asked for; "
                    "use matching tokens/params or retrain"
                )
        if name is not None and obj.get("name") not in (None, name):
            raise CheckpointError(f"{path} holds {obj.get('name')!r}, not {name!r}; fix the model name")
        if obj["kind"] not in NETWORKS:
            raise CheckpointError(f"{path}: unknown network (\"kind\") {obj['kind']!r} (expected one of "
                                  f"{', '.join(NETWORKS)})")
        net = NETWORKS[obj["kind"]]
        with torch.device("meta"):  # shapes only; real tensors come from the checkpoint
            model = net.model(net.config(**config))
    else:
        if name is None:
            raise CheckpointError(
                f"{path} is a released checkpoint without a config; pass the registry name "
                "(e.g. ARPG-L for arpg_300m.pt, ARPG-XL for arpg_700m.pt, ARPG-XXL for arpg_1b.pt)"
            )
        if grid_size is None:
            raise CheckpointError(f"{path}: released checkpoints need grid_size (16 for ImageNet 256x256)")
        inferred_v, inferred_c = NETWORKS[network_of_size(name)].model.token_space(sd)
        V = codebook_size if codebook_size is not None else inferred_v
        C = num_classes if num_classes is not None else inferred_c
        if V is None or C is None:
            raise CheckpointError(f"{path} has no head/embedding weights of a {name} model; is it the right file?")
        with torch.device("meta"):
            model = build_model(name, codebook_size=V, num_classes=C, grid_size=grid_size)

    check_state_dict(model, sd, f"{what} {path}", _sizes_fix())
    model = model.to_empty(device="cpu")
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()


def load_study_models(params, decoder_name: str, device: torch.device, run: str | None = None):
    """The trained generator (of training seed `run`, paths.seed_run; None: the first of train.seeds) and
    the tokenizer, strictly loaded, eval mode, on `device`; the generator decodes at sample.precision
    (cpu_kernels.STUDY_KERNEL on a CPU)."""
    from arpg.config import token_grid
    from arpg.decoders import decoder
    from arpg.models.cpu_kernels import prepare_for_decoding
    from arpg.models.vq import TRAIN_COMMAND, VQConfig, load_tokenizer
    from arpg.config import unrecorded
    from arpg.paths import run_seed
    from arpg.sweeps import first_run

    layout = params.layout
    tokenizer = load_tokenizer(layout.tokenizer_checkpoint, VQConfig.from_params(params),
                               written_by=TRAIN_COMMAND).to(device).eval()
    if run is None:  # the first seed's model: the job's input path names it already
        run = first_run(unrecorded(params))
    path = layout.model_checkpoint(decoder_name, run)
    generator = load_generator(path, codebook_size=params["tokenizer"]["codebook_size"],
                               num_classes=params["data"]["num_classes"], grid_size=token_grid(params),
                               device=device, written_by=f"arpg train --model {decoder_name}"
                                                         + (f" --seed {run_seed(run)}" if run else ""))
    if network_of(generator) != decoder(decoder_name).network:  # e.g. another decoder's model.pt copied here
        raise CheckpointError(f"{path} holds a {type(generator).__name__}, not a model of the "
                              f"{decoder(decoder_name).label}; rerun `arpg train --model {decoder_name}` (or "
                              "snakemake) to write it")
    prepare_for_decoding(generator, params["sample"]["precision"], "sample.precision")
    return generator, tokenizer
