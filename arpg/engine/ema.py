"""Exponential moving average of a model's weights (the sampling weights when train.ema > 0)."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from arpg.errors import CheckpointError


class EMA:
    """shadow <- decay * shadow + (1 - decay) * weights after every optimizer step; buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value, 1.0 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise CheckpointError("EMA state does not match the model's keys; delete the train state to restart")
        for key, value in state.items():
            self.shadow[key].copy_(value)
