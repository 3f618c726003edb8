"""Training loop and batched inference for the evaluation classifier (arpg/models/classifier.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from arpg.data.batches import EpochBatches
from arpg.data.pixels import to_tensor_NCHW
from arpg.errors import DataError
from arpg.lr_schedule import lr_by_progress, set_lr
from arpg.models.classifier import Classifier, ClassifierConfig
from arpg.utils import deterministic_algorithms, make_generator, require_finite, seeded_global_rng

WARMUP_SHARE = 0.05  # linear warm-up over the first 5% of the steps, then cosine to 0


@dataclass(frozen=True)
class ClassifierTrainConfig:
    batch_size: int
    lr: float
    epochs: int
    seed: int

    @classmethod
    def from_params(cls, params: Mapping) -> "ClassifierTrainConfig":
        c = params["classifier"]
        return cls(batch_size=c["batch_size"], lr=c["lr"], epochs=c["epochs"], seed=params["seed"])


def model_config_from_params(params: Mapping) -> ClassifierConfig:
    d = params["data"]
    width = params["classifier"]["width"]
    return ClassifierConfig(in_channels=d["channels"], num_classes=d["num_classes"],
                            resolution=d["resolution"], width=width, feature_dim=8 * width)


def train_classifier(images_NHWC: np.ndarray, labels_N: np.ndarray, model_config: ClassifierConfig,
                     config: ClassifierTrainConfig, device: torch.device,
                     log: Callable[[dict, int], None] | None = None, log_every: int = 50) -> tuple[Classifier, dict]:
    """Train from scratch with AdamW + warm-up / cosine over `epochs` (a step count: the weights
    never depend on the machine's speed); returns (model in eval mode, run stats)."""
    images_NCHW = to_tensor_NCHW(images_NHWC)  # [N, C, H, W] uint8
    labels_N = torch.as_tensor(np.array(labels_N), dtype=torch.long)  # a copy: memmaps are read-only
    n = images_NCHW.shape[0]
    if n != labels_N.shape[0]:
        raise DataError(f"{n} training images but {labels_N.shape[0]} labels; rerun `arpg prepare-data`")
    if labels_N.min() < 0 or labels_N.max() >= model_config.num_classes:
        raise DataError(f"labels span [{int(labels_N.min())}, {int(labels_N.max())}] but data.num_classes is "
                        f"{model_config.num_classes}; fix data.num_classes in params")
    with seeded_global_rng(config.seed):  # nn.Module init can only draw from the global RNG
        model = Classifier(model_config).to(device)
    gen = make_generator(config.seed)
    batches = EpochBatches(n, config.batch_size, lambda epoch: torch.randperm(n, generator=gen), drop_last=False,
                           key="classifier.batch_size", items="training images")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    total = config.epochs * batches.steps_per_epoch
    loss = torch.tensor(float("nan"))
    model.train()
    with deterministic_algorithms(device):
        for step in range(total):
            idx_B = batches.next()  # [B]
            x_BCHW = Classifier.normalize(images_NCHW[idx_B].to(device))  # [B, C, H, W]
            y_B = labels_N[idx_B].to(device)  # [B]
            set_lr(optimizer.param_groups, lr_by_progress(step / total, peak=config.lr, warmup_share=WARMUP_SHARE,
                                                          floor_share=0.0))
            logits_BK, _ = model(x_BCHW)  # [B, K]
            loss = F.cross_entropy(logits_BK, y_B)
            require_finite(loss.item(), "classifier loss", step + 1, "lower classifier.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if log is not None and (step + 1) % log_every == 0:
                log({"train_loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}, step + 1)
    model.eval()
    stats = {"steps": total, "epochs": config.epochs, "final_train_loss": loss.item(), "train_images": n}
    return model, stats


@torch.no_grad()
def predict(model: Classifier, images_NHWC: np.ndarray, batch_size: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, K], features [N, D]) on CPU, float32."""
    model.eval()
    logits, features = [], []
    for first in range(0, len(images_NHWC), batch_size):
        x_BCHW = Classifier.normalize(to_tensor_NCHW(images_NHWC[first:first + batch_size]).to(device))
        logits_BK, features_BD = model(x_BCHW)
        logits.append(logits_BK.float().cpu())
        features.append(features_BD.float().cpu())
    return torch.cat(logits), torch.cat(features)


def accuracy(logits_NK: torch.Tensor, labels_N: np.ndarray | torch.Tensor) -> float:
    """Share of rows whose arg-max class equals the label."""
    labels_N = torch.as_tensor(np.array(labels_N), dtype=torch.long)  # a copy: memmaps are read-only
    return float((logits_NK.argmax(dim=1) == labels_N).float().mean())
