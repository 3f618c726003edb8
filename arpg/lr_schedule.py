"""Learning-rate schedules (as VAR's lr_control.py): linear warm-up, then half-cosine decay.

Two spellings, each the exact arithmetic its stage has always used (a rewrite would move the
last bits of every learning rate, so of every weight):

* `lr_by_step`: the generators (`arpg train`), in optimizer steps with an absolute floor `min_lr`;
* `lr_by_progress`: the tokenizer and the classifier, in the share of the step budget done, with a
  floor that is a share of the peak.

Every budget is a step count, never wall-clock time, so the rates are a function of the params alone.
"""

from __future__ import annotations

import math
from typing import Iterable


def lr_by_step(step: int, *, peak: float, floor: float, warmup_steps: int, max_steps: int) -> float:
    """Rate of optimizer step `step` (0-based): linear warm-up reaching `peak` at step
    `warmup_steps - 1`, then half-cosine from `peak` down to `floor` at the last step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_by_progress(progress: float, *, peak: float, warmup_share: float, floor_share: float) -> float:
    """Rate at `progress` (steps done / budget, in [0, 1]): linear warm-up over the first
    `warmup_share` (from 0.1% of it, so the first step moves), then half-cosine from `peak` to
    `floor_share * peak` at progress 1."""
    if progress < warmup_share:
        return peak * max(progress, 1e-3) / warmup_share
    t = min(1.0, (progress - warmup_share) / (1 - warmup_share))
    return peak * (floor_share + (1 - floor_share) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(param_groups: Iterable[dict], lr: float) -> float:
    """Give every parameter group the rate `lr`; returns it."""
    for group in param_groups:
        group["lr"] = lr
    return lr
