"""The artifact readers and the one strict key check: every artifact arpg reads back (checkpoints,
.npy arrays, .npz archives, JSON outputs) goes through one of `read_checkpoint`, `read_npy`,
`read_npz`, `read_json`, which turn a missing, truncated or damaged file into a message naming the
file and the command that remakes it (never a bare traceback).

Unpickling runs with weights_only=True: it may rebuild tensors, containers, numbers and strings, plus
argparse.Namespace (released LlamaGen / ARPG training files pickle their `args`). A file that needs any
other global could run code when unpickled, so it is refused before anything in it runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from arpg.errors import CheckpointError

SAFE_GLOBALS = [argparse.Namespace]  # released training files: {"model", "optimizer", "steps", "args", ...}
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch's weights-only unpickler names what it refused


def read_checkpoint(path: str | os.PathLike, what: str, *, written_by: str | None = None) -> Any:
    """torch.load `path` on CPU, weights only; refuse (running nothing) a file that would run code.

    `what` names the file in messages ("tokenizer.pretrained", "train state"). `written_by` is the
    command that writes the file when the pipeline made it: an unreadable one is deleted and remade.
    None (a file the user gave) gets no advice to delete it.
    """
    path = Path(path)
    if not path.is_file():
        fix = f"run `{written_by}`" if written_by else "fix the path"
        raise CheckpointError(f"{what} not found at {path}; {fix}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _GLOBAL.search(str(exc))
        if refused is None:
            raise CheckpointError(_unreadable(path, what, written_by, exc)) from exc
        raise CheckpointError(
            f"{what} {path} was refused: unpickling it would load the Python global {refused.group(1)}, which "
            "can run arbitrary code (only tensors, containers, numbers, strings and argparse.Namespace are "
            "accepted); nothing in it was run. Fix: if you trust its source, re-save the same layout with plain "
            "tensors only, e.g. torch.save({'model': model.state_dict()}, new_path), and point at the new file"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, unreadable: one message
        raise CheckpointError(_unreadable(path, what, written_by, exc)) from exc


def read_npz(path: str | os.PathLike, what: str, *, written_by: str, keys: tuple[str, ...] = ()) -> dict:
    """Every array of a .npz archive the pipeline wrote (no pickles), read into memory; a missing,
    truncated or incomplete one (lacking one of `keys`) is named with the command that remakes it."""
    import numpy as np

    from arpg.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found at {path}; run `{written_by}` first")
    try:
        with np.load(path, allow_pickle=False) as blob:
            arrays = {k: blob[k] for k in blob.files}
    except Exception as exc:  # noqa: BLE001 - truncated zip, damaged member, not an archive: one message
        raise DataError(_unreadable(path, what, written_by, exc)) from exc
    lacking = [k for k in keys if k not in arrays]
    if lacking:
        raise DataError(f"{what} {path} lacks {', '.join(lacking)} (has {', '.join(arrays) or 'nothing'}); "
                        f"delete it and rerun `{written_by}`")
    return arrays


def read_npy(path: str | os.PathLike, what: str, *, written_by: str, mmap: bool = True):
    """A .npy array the pipeline wrote (no pickles), memory-mapped unless `mmap` is false; a missing
    or damaged one is named with the command that remakes it."""
    import numpy as np

    from arpg.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found at {path}; run `{written_by}` (or `snakemake --cores all`) first")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - truncated, bad header, a pickle: one message
        raise DataError(_unreadable(path, what, written_by, exc)) from exc


def read_json(path: str | os.PathLike, what: str, *, written_by: str) -> Any:
    """A JSON file the pipeline wrote; a missing or damaged one is named with the command that remakes it."""
    from arpg.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found at {path}; run `{written_by}` (or `snakemake --cores all`) first")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(_unreadable(path, what, written_by, exc)) from exc


def _unreadable(path: Path, what: str, written_by: str | None, exc: Exception) -> str:
    text = str(exc)
    if "Weights only load failed" in text:  # drop torch's preamble: it suggests weights_only=False
        text = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    cause = next((line.strip() for line in text.splitlines() if line.strip()), "empty, truncated or not a pickle")
    detail = f"{type(exc).__name__}: {cause}"
    if written_by is not None:
        return f"{what} {path} is unreadable ({detail}); delete it and rerun `{written_by}`"
    return (f"{what} {path} is unreadable: not a PyTorch checkpoint, or truncated ({detail}); check that it "
            "names the file you meant and that the file was copied completely")


def in_memory_copy(obj: Any) -> io.BytesIO:
    """`obj` re-serialized into memory, for third-party loaders that unpickle with weights_only=False
    (torch-fidelity's Inception): they only ever see what `read_checkpoint` accepted."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _listed(items: list[str], limit: int = 12) -> str:
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def check_state_dict(model: nn.Module, state: Mapping[str, Any], source: str, fix: str) -> None:
    """strict=True in words: raise CheckpointError listing every missing, unexpected and mis-shaped key."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a state dict; fix: {fix}")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [f"{k} (checkpoint {_shape(state[k])}, model {_shape(own[k])})"
                 for k in sorted(set(own) & set(state)) if _shape(state[k]) != _shape(own[k])]
    if not (missing or unexpected or misshaped):
        return
    config = getattr(model, "config", None)
    lines = [f"{source} does not fit the {type(model).__name__}" + (f" {config}:" if config is not None else ":")]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            lines.append(f"  {label} keys ({len(keys)}): {_listed(keys)}")
    lines.append(f"  fix: {fix}")
    raise CheckpointError("\n".join(lines))


def load_state_strict(model: nn.Module, state: Mapping[str, Any], source: str, fix: str) -> None:
    """`check_state_dict`, then load_state_dict(strict=True)."""
    check_state_dict(model, state, source, fix)
    model.load_state_dict(state, strict=True)
