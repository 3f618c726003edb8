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
from torch_fidelity.metric_kid import kernel_poly  # noqa: E402
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


KID_CACHE_BYTES = 1 << 28  # largest kernel cache KidKernels keeps (the default study's: 44 MB; ImageNet's: 20 GB)


class KidKernels:
    """KID (torch-fidelity's: unbiased MMD^2 of its polynomial kernel, averaged over random subsets) of
    any rows of one generated set against one reference set.

    torch-fidelity computes three subset-by-subset kernel matrices for every subset; the bootstrap asks
    for KID of 21 resamples of the same rows, so where they fit in KID_CACHE_BYTES the generated x
    generated and reference x generated kernels are computed once and a subset's matrices read out of
    them (float32 products of other shapes round differently: KID agrees to ~1e-7); larger sets get
    each subset's matrices computed as torch-fidelity does. Either way they are summed in
    torch-fidelity's order. A reference subset's kernel sum is kept: every call with one seed and one
    generated-set size draws the same subsets."""

    def __init__(self, gen_ND: torch.Tensor, ref_MD: torch.Tensor, cache_bytes: int = KID_CACHE_BYTES):
        self.gen_ND, self.ref_MD = gen_ND.cpu().numpy(), ref_MD.cpu().numpy()
        n, m = len(self.gen_ND), len(self.ref_MD)
        self.cached = n * (n + m) * self.gen_ND.itemsize <= cache_bytes
        if self.cached:
            self.k_gen_NN = kernel_poly(self.gen_ND, self.gen_ND)  # [N, N]
            self.k_ref_gen_MN = kernel_poly(self.ref_MD, self.gen_ND)  # [M, N]: a reference subset's rows contiguous
        self._ref_sums: dict[bytes, np.floating] = {}

    def _ref_sum(self, cols_S: np.ndarray) -> np.floating:
        key = cols_S.tobytes()
        if key not in self._ref_sums:
            ref_SD = self.ref_MD[cols_S]
            k_SS = kernel_poly(ref_SD, ref_SD)
            self._ref_sums[key] = (k_SS.sum(axis=1) - np.diagonal(k_SS)).sum()
        return self._ref_sums[key]

    def _subset_kernels(self, rows_S: np.ndarray, cols_S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[S, S] generated x generated and generated x reference kernels of one subset."""
        if not self.cached:
            gen_SD = self.gen_ND[rows_S]
            return kernel_poly(gen_SD, gen_SD), kernel_poly(gen_SD, self.ref_MD[cols_S])
        k_gen_SS = np.take(self.k_gen_NN[rows_S], rows_S, axis=1)
        return k_gen_SS, np.ascontiguousarray(np.take(self.k_ref_gen_MN[cols_S], rows_S, axis=1).T)

    def kid(self, rows_N: np.ndarray, subsets: int, subset_size: int, seed: int) -> tuple[float, float]:
        """(mean, std) over `subsets` subsets of `subset_size` of the generated rows `rows_N` (indices,
        repeats allowed) and of the reference, drawn as torch-fidelity's kid_features_to_metric draws them."""
        rng = np.random.RandomState(seed)
        m = subset_size
        mmd_K = np.zeros(subsets)
        for i in range(subsets):
            rows_S = rows_N[rng.choice(len(rows_N), m, replace=False)]
            cols_S = rng.choice(len(self.ref_MD), m, replace=False)
            k_gen_SS, k_cross_SS = self._subset_kernels(rows_S, cols_S)
            gen_sum = (k_gen_SS.sum(axis=1) - np.diagonal(k_gen_SS)).sum()
            cross_sum = k_cross_SS.sum(axis=0).sum()
            mmd_K[i] = (gen_sum + self._ref_sum(cols_S)) / (m * (m - 1)) - 2 * cross_sum / (m * m)
        return float(np.mean(mmd_K)), float(np.std(mmd_K))


def compute_metrics(images_NHWC: np.ndarray, labels_N: np.ndarray | None, reference: Mapping,
                    extractor: str, weights: str | os.PathLike | None, config: EvalConfig,
                    device: torch.device) -> dict[str, float]:
    """FID, KID, IS (if the extractor has logits), precision/recall and, for the classifier,
    conditional accuracy of `images` against `reference`; names end in the extractor."""
    feats = extract_features(images_NHWC, extractor, weights, config.batch_size, device)
    return metrics_from_features(feats, labels_N, reference, extractor, config)


def metrics_from_features(feats: Mapping[str, torch.Tensor], labels_N: np.ndarray | torch.Tensor | None,
                          reference: Mapping, extractor: str, config: EvalConfig,
                          kernels: KidKernels | None = None) -> dict[str, float]:
    """The metrics of `compute_metrics` from already-extracted features ({layer: [N, D]}); KID from
    `kernels` when given (built on these features), none when config.kid_subsets is 0."""
    s = spec(extractor)
    sfx = s.suffix
    gen_ND = feats[s.fid_layer]  # [N, D]
    ref_MD = torch.from_numpy(np.asarray(reference["features"]))  # [M, D]
    n, m = len(gen_ND), len(ref_MD)
    out: dict[str, float] = {}

    fid = fid_statistics_to_metric(fid_features_to_statistics(gen_ND),
                                   {"mu": reference["mu"], "sigma": reference["sigma"]}, verbose=False)
    out[f"fid_{sfx}"] = fid["frechet_inception_distance"]

    if config.kid_subsets:
        subset = kid_subset(config, n, m)
        kernels = kernels if kernels is not None else KidKernels(gen_ND, ref_MD)
        out[f"kid_{sfx}"], out[f"kid_std_{sfx}"] = kernels.kid(np.arange(n), config.kid_subsets, subset,
                                                               config.seed)
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


def kid_subset(config: EvalConfig, num_generated: int, num_reference: int) -> int:
    """KID subsets cannot exceed either set; smaller sets use all of the smaller one."""
    return min(config.kid_subset_size, num_generated, num_reference)


def prc_reference(ref_MD: torch.Tensor, num_generated: int, seed: int) -> torch.Tensor:
    """The reference rows precision / recall compare with: k-NN radii depend on set size, so sets
    are compared at equal size (a seeded subset of the reference when it is the larger)."""
    if len(ref_MD) <= num_generated:
        return ref_MD
    return ref_MD[torch.randperm(len(ref_MD), generator=make_generator(seed))[:num_generated]]
