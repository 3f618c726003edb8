"""The generator training's state file: everything a killed run needs to continue bit-exactly.

It holds the run's identity (the decoder, the size's registry name, model config, the trajectory-setting config),
the weights, optimizer, EMA, the conditioning generator and the progress below. Written
atomically by rank 0; a state file of a different run is refused, never silently resumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
import torch.nn as nn

from arpg.checkpoint_io import read_checkpoint
from arpg.dist import DistInfo, all_reduce_sum
from arpg.errors import CheckpointError
from arpg.utils import atomic_torch_save


@dataclass
class Progress:
    """Where a run stands: steps and tokens done, and the loss window of the next log line."""

    window_sum: torch.Tensor      # this rank's step losses since the last log (float64, scalar)
    window_count: int = 0
    step: int = 0
    tokens_seen: int = 0
    last_loss: float | None = None  # mean loss of the last logging window (all ranks)

    def advance(self, step_loss: torch.Tensor, tokens: int) -> None:
        self.step += 1
        self.tokens_seen += tokens
        self.window_sum += step_loss
        self.window_count += 1

    def flush_window(self, info: DistInfo) -> float | None:
        """Close the loss window: its mean over all ranks becomes `last_loss` (kept when empty)."""
        if self.window_count == 0:
            return self.last_loss
        total = torch.stack([self.window_sum, torch.tensor(float(self.window_count), dtype=torch.float64,
                                                           device=self.window_sum.device)])
        all_reduce_sum(total, info)
        self.window_sum.zero_()
        self.window_count = 0
        self.last_loss = float(total[0] / total[1])
        return self.last_loss


def run_identity(decoder_name: str, name: str, model: nn.Module, trajectory: dict) -> dict:
    """What a resume must match exactly."""
    config = getattr(model, "config", None)
    return {"kind": decoder_name, "name": name, "model_config": asdict(config) if is_dataclass(config) else None,
            "trajectory": trajectory}


def load_state(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return read_checkpoint(path, "train state", written_by="arpg train")


def _check_resumable(state: dict, path: Path, identity: dict) -> None:
    for key, want in identity.items():
        have = state.get(key)
        if have != want:
            if isinstance(have, dict) and isinstance(want, dict):
                diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                what = ", ".join(f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in diff)
            else:
                what = f"{have!r} -> {want!r}"
            raise CheckpointError(f"train state {path} belongs to a different run ({key} {what}); "
                                  "delete it to start over, or restore the params it was written with")


def restore(path: Path, identity: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
            gen: torch.Generator, device: torch.device, verbose: bool) -> tuple[Progress, dict | None]:
    """Load the state file (if any) into model, optimizer and generator in place; returns the
    progress to continue from and the saved EMA weights (None for a fresh run)."""
    progress = Progress(window_sum=torch.zeros((), dtype=torch.float64, device=device))
    state = load_state(path)
    if state is None:
        return progress, None
    _check_resumable(state, path, identity)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"train state {path} does not fit the model ({exc}); delete it") from exc
    optimizer.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    progress.step, progress.tokens_seen = state["step"], state["tokens_seen"]
    progress.last_loss, progress.window_count = state["last_loss"], state["window"][1]
    progress.window_sum.fill_(state["window"][0])
    if verbose:
        print(f"resuming {identity['name'] or identity['kind']} from {path} at step {progress.step}")
    return progress, state.get("ema")


def save_state(path: Path, identity: dict, model: nn.Module, optimizer: torch.optim.Optimizer, ema,
               gen: torch.Generator, progress: Progress) -> None:
    atomic_torch_save({
        **identity, "step": progress.step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None, "generator": gen.get_state(),
        "tokens_seen": progress.tokens_seen, "last_loss": progress.last_loss,
        "window": (float(progress.window_sum), progress.window_count),
    }, path)
