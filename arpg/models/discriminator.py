"""The tokenizer's optional adversary: a small PatchGAN (pix2pix / taming style).

Used by `arpg train-tokenizer` when tokenizer.adversarial_weight > 0 (hinge losses in
arpg/engine/tokenizer.py); never part of tokenizer.pt.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class PatchDiscriminator(nn.Module):
    """One real/fake logit per receptive-field patch."""

    def __init__(self, in_channels: int, width: int = 32, groups: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.GroupNorm(groups, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(groups, 2 * width), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 1, 3, padding=1),
        )

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(images_BCHW)  # [B, 1, H/4, W/4]
