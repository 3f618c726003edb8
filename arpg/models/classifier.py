"""Small CNN classifier: the dataset-specific feature extractor for IS / FID / KID / PR.

Its logits give the Inception Score and conditional accuracy; its penultimate
features (the ReLU'd hidden layer before the last linear) give FID / KID /
precision-recall, the role Inception's pool3 plays on ImageNet.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from arpg.checkpoint_io import load_state_strict, read_checkpoint
from arpg.data.pixels import from_uint8
from arpg.errors import CheckpointError, ConfigError

CHECKPOINT_KIND = "classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    resolution: int = 32  # input side; must be divisible by 8 (three stride-2 stages)
    width: int = 16  # channels of the first conv; doubled twice on the way down
    feature_dim: int = 128  # penultimate width: the FID / KID / PR feature size

    def __post_init__(self):
        if self.resolution % 8:
            raise ConfigError(f"classifier input resolution {self.resolution} must be divisible by 8 "
                              "(data.resolution); pick a multiple of 8")


def _conv_block(c_in: int, c_out: int, kernel: int = 3, stride: int = 2) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Classifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        # Strided convs instead of conv + max-pool (4x fewer MACs: training must fit a
        # 2-minute CPU budget); the wide first kernel is cheap with 1-3 input channels.
        self.body = nn.Sequential(
            _conv_block(config.in_channels, w, kernel=5),  # [B, w, H/2, W/2]
            _conv_block(w, 2 * w),  # [B, 2w, H/4, W/4]
            _conv_block(2 * w, 2 * w, stride=1),  # [B, 2w, H/4, W/4]
            _conv_block(2 * w, 4 * w),  # [B, 4w, H/8, W/8]
        )
        side = config.resolution // 8
        self.hidden = nn.Linear(4 * w * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    @staticmethod
    def normalize(images_BCHW: torch.Tensor) -> torch.Tensor:
        """uint8 pixels in [0, 255] -> float in [-1, 1], the classifier's input."""
        return from_uint8(images_BCHW)

    def forward(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: float [B, C, H, W] in [-1, 1] -> (logits [B, K], features [B, D])."""
        h_BCHW = self.body(x_BCHW)  # [B, 4w, H/8, W/8]
        features_BD = F.relu(self.hidden(h_BCHW.flatten(1)))  # [B, D]
        logits_BK = self.head(features_BD)  # [B, K]
        return logits_BK, features_BD


def save_classifier(model: Classifier, path: str | Path, extra: dict | None = None) -> None:
    from arpg.utils import atomic_torch_save

    atomic_torch_save({"kind": CHECKPOINT_KIND, "config": asdict(model.config),
                       "state_dict": model.state_dict(), **(extra or {})}, path)


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> Classifier:
    """Rebuild the classifier from its checkpoint; mismatches name the keys."""
    path = Path(path)
    remake = "arpg train-classifier"
    if not path.is_file():
        raise CheckpointError(f"classifier checkpoint not found at {path}; run `{remake}` first")
    blob = read_checkpoint(path, "classifier checkpoint", written_by=remake)
    kind = blob.get("kind") if isinstance(blob, dict) else type(blob).__name__
    if kind != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not a classifier checkpoint (kind={kind!r}); rerun `{remake}`")
    model = Classifier(ClassifierConfig(**blob["config"]))
    load_state_strict(model, blob["state_dict"], f"classifier checkpoint {path}", f"rerun `{remake}`")
    return model.to(device).eval()
