"""Sample-quality metrics from extracted features: FID, KID, IS, precision / recall, accuracy.

All maths is torch-fidelity's; names end in the extractor (`fid_classifier`, ...). Convention
(torch-fidelity's): input 1 = generated samples, input 2 = real reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from arpg.compat import ensure_torchvision_importable
from arpg.engine.evaluate import extract_features, spec
from arpg.utils import make_generator

ensure_torchvision_importable()
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402
from torch_fidelity.metric_prc import prc_features_to_metric  # noqa: E402

PRC_BATCH = 1000  # rows of the pairwise-distance blocks in precision-recall (bounds memory)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 200
    kid_subset_size: int = 500
    precision_recall: bool = True
    seed: int = 0
    kid_subsets: int = 100  # torch-fidelity's default
    isc_splits: int = 10  # torch-fidelity's default
    prc_neighborhood: int = 3  # torch-fidelity's default

    @classmethod
    def from_params(cls, params: Mapping) -> "EvalConfig":
        e = params["evaluate"]
        return cls(batch_size=e["batch_size"], kid_subset_size=e["kid_subset_size"],
                   precision_recall=e["precision_recall"], seed=params["seed"])


def compute_metrics(images_NHWC: np.ndarray, labels_N: np.ndarray | None, reference: Mapping,
                    extractor: str, weights: str | os.PathLike | None, config: EvalConfig,
                    device: torch.device) -> dict[str, float]:
    """FID, KID, IS (if the extractor has logits), precision/recall and, for the classifier,
    conditional accuracy of `images` against `reference`; names end in the extractor."""
    feats = extract_features(images_NHWC, extractor, weights, config.batch_size, device)
    return metrics_from_features(feats, labels_N, reference, extractor, config)


def metrics_from_features(feats: Mapping[str, torch.Tensor], labels_N: np.ndarray | torch.Tensor | None,
                          reference: Mapping, extractor: str, config: EvalConfig) -> dict[str, float]:
    """The metrics of `compute_metrics` from already-extracted features ({layer: [N, D]})."""
    s = spec(extractor)
    sfx = s.suffix
    gen_ND = feats[s.fid_layer]  # [N, D]
    ref_MD = torch.from_numpy(np.asarray(reference["features"]))  # [M, D]
    n, m = len(gen_ND), len(ref_MD)
    out: dict[str, float] = {}

    fid = fid_statistics_to_metric(fid_features_to_statistics(gen_ND),
                                   {"mu": reference["mu"], "sigma": reference["sigma"]}, verbose=False)
    out[f"fid_{sfx}"] = fid["frechet_inception_distance"]

    # KID subsets cannot exceed either set; smaller sets use all of the smaller one.
    subset = min(config.kid_subset_size, n, m)
    kid = kid_features_to_metric(gen_ND, ref_MD, kid_subsets=config.kid_subsets, kid_subset_size=subset,
                                 rng_seed=config.seed, verbose=False)
    out[f"kid_{sfx}"] = kid["kernel_inception_distance_mean"]
    out[f"kid_std_{sfx}"] = kid["kernel_inception_distance_std"]
    out[f"kid_subset_size_{sfx}"] = subset

    if s.isc_layer is not None:
        isc = isc_features_to_metric(feats[s.isc_layer], splits=config.isc_splits, shuffle=True,
                                     rng_seed=config.seed)
        out[f"isc_{sfx}"] = isc["inception_score_mean"]
        out[f"isc_std_{sfx}"] = isc["inception_score_std"]

    if config.precision_recall:
        ref_MD = prc_reference(ref_MD, n, config.seed)
        prc = prc_features_to_metric(gen_ND, ref_MD, prc_neighborhood=config.prc_neighborhood,
                                     prc_batch_size=PRC_BATCH, save_cpu_ram=True, verbose=False)
        out[f"precision_{sfx}"] = prc["precision"]
        out[f"recall_{sfx}"] = prc["recall"]

    if extractor == "classifier" and labels_N is not None:
        from arpg.engine.classifier import accuracy

        out[f"accuracy_{sfx}"] = accuracy(feats["logits"], labels_N)
    return out


def prc_reference(ref_MD: torch.Tensor, num_generated: int, seed: int) -> torch.Tensor:
    """The reference rows precision / recall compare with: k-NN radii depend on set size, so sets
    are compared at equal size (a seeded subset of the reference when it is the larger)."""
    if len(ref_MD) <= num_generated:
        return ref_MD
    return ref_MD[torch.randperm(len(ref_MD), generator=make_generator(seed))[:num_generated]]
