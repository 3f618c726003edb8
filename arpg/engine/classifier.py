"""Training loop and batched inference for the evaluation classifier (arpg/models/classifier.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from arpg.errors import DataError
from arpg.models.classifier import Classifier, ClassifierConfig
from arpg.utils import deterministic_algorithms, make_generator, require_finite


@dataclass(frozen=True)
class ClassifierTrainConfig:
    batch_size: int = 256
    lr: float = 2e-3
    epochs: int = 3
    warmup_fraction: float = 0.05
    seed: int = 0

    @classmethod
    def from_params(cls, params: Mapping) -> "ClassifierTrainConfig":
        c = params["classifier"]
        return cls(batch_size=c["batch_size"], lr=c["lr"], epochs=c["epochs"], seed=params["seed"])


def model_config_from_params(params: Mapping) -> ClassifierConfig:
    d = params["data"]
    width = params["classifier"]["width"]
    return ClassifierConfig(in_channels=d["channels"], num_classes=d["num_classes"],
                            resolution=d["resolution"], width=width, feature_dim=8 * width)


def to_tensor_BCHW(images_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] (numpy, possibly memory-mapped) -> contiguous uint8 tensor [N, C, H, W]."""
    if images_NHWC.dtype != np.uint8 or images_NHWC.ndim != 4:
        raise DataError(f"expected uint8 images [N, H, W, C], got {images_NHWC.dtype} {images_NHWC.shape}; "
                        "rerun `arpg prepare-data` / `arpg sample`")
    # np.array copies: memory-mapped arrays are read-only, which torch.from_numpy warns about.
    return torch.from_numpy(np.array(images_NHWC)).permute(0, 3, 1, 2).contiguous()


def _lr_at(progress: float, base: float, warmup: float) -> float:
    """Linear warm-up over the first `warmup` of training, then cosine to 0 at progress 1."""
    if progress < warmup:
        return base * max(progress, 1e-3) / warmup
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / (1.0 - warmup))))


def train_classifier(images_NHWC: np.ndarray, labels_N: np.ndarray, model_config: ClassifierConfig,
                     config: ClassifierTrainConfig, device: torch.device,
                     log: Callable[[dict, int], None] | None = None, log_every: int = 50) -> tuple[Classifier, dict]:
    """Train from scratch with AdamW + warm-up / cosine over `epochs` (a step count: the weights
    never depend on the machine's speed); returns (model in eval mode, run stats)."""
    images_NCHW = to_tensor_BCHW(images_NHWC)  # [N, C, H, W] uint8
    labels_N = torch.as_tensor(np.array(labels_N), dtype=torch.long)  # a copy: memmaps are read-only
    n = images_NCHW.shape[0]
    if n != labels_N.shape[0]:
        raise DataError(f"{n} training images but {labels_N.shape[0]} labels; rerun `arpg prepare-data`")
    if labels_N.min() < 0 or labels_N.max() >= model_config.num_classes:
        raise DataError(f"labels span [{int(labels_N.min())}, {int(labels_N.max())}] but data.num_classes is "
                        f"{model_config.num_classes}; fix data.num_classes in params")
    # Weight init draws from the global RNG inside nn.Module constructors: seed it in a fork so
    # the init is reproducible without disturbing anyone else's global state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = Classifier(model_config).to(device)
    gen = make_generator(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = config.epochs * steps_per_epoch
    step, loss = 0, torch.tensor(float("nan"))
    model.train()
    with deterministic_algorithms(device):
        for epoch in range(config.epochs):
            order_N = torch.randperm(n, generator=gen)  # [N]
            for first in range(0, n, config.batch_size):
                idx_B = order_N[first:first + config.batch_size]  # [B]
                x_BCHW = Classifier.normalize(images_NCHW[idx_B].to(device))  # [B, C, H, W]
                y_B = labels_N[idx_B].to(device)  # [B]
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step / total, config.lr, config.warmup_fraction)
                logits_BK, _ = model(x_BCHW)  # [B, K]
                loss = F.cross_entropy(logits_BK, y_B)
                require_finite(loss.item(), "classifier loss", step + 1, "lower classifier.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if log is not None and step % log_every == 0:
                    log({"train_loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}, step)
    model.eval()
    stats = {"steps": step, "epochs": config.epochs, "final_train_loss": loss.item(), "train_images": n}
    return model, stats


@torch.no_grad()
def predict(model: Classifier, images_NHWC: np.ndarray, batch_size: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, K], features [N, D]) on CPU, float32."""
    model.eval()
    logits, features = [], []
    for first in range(0, len(images_NHWC), batch_size):
        x_BCHW = Classifier.normalize(to_tensor_BCHW(images_NHWC[first:first + batch_size]).to(device))
        logits_BK, features_BD = model(x_BCHW)
        logits.append(logits_BK.float().cpu())
        features.append(features_BD.float().cpu())
    return torch.cat(logits), torch.cat(features)


def accuracy(logits_NK: torch.Tensor, labels_N: np.ndarray | torch.Tensor) -> float:
    """Share of rows whose arg-max class equals the label."""
    labels_N = torch.as_tensor(np.array(labels_N), dtype=torch.long)  # a copy: memmaps are read-only
    return float((logits_NK.argmax(dim=1) == labels_N).float().mean())
