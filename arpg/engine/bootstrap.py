"""Bootstrap intervals of the headline metrics: resampled generated feature rows, reference fixed.

`bootstrap_intervals` gives every headline figure a standard error and a 95% interval (see its
docstring for the method); `ResampledPrecisionRecall` makes the replicates' precision / recall
cheap. Convention (torch-fidelity's): input 1 = generated samples, input 2 = real reference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping

import numpy as np
import torch

from arpg.compat import ensure_torchvision_importable
from arpg.engine.evaluate import spec
from arpg.engine.metrics import PRC_BATCH, EvalConfig, KidKernels, kid_subset, metrics_from_features, prc_reference
from arpg.errors import DataError
from arpg.utils import make_generator

ensure_torchvision_importable()
from torch_fidelity.metric_prc import calc_cdist_part, prc_features_to_metric  # noqa: E402

BOOTSTRAP_STREAM = 0xB007  # seed stream of the resampling indices (apart from every other draw of the study)
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_KID_SUBSETS = 10  # KID subsets within a replicate (the headline uses EvalConfig.kid_subsets)
BOOTSTRAP_METRICS = ("fid", "kid", "isc", "precision", "recall", "accuracy")  # headline figures given intervals
BOOTSTRAP_METHOD = ("normal interval point +- z * se; se = standard deviation of the metric over bootstrap "
                    "replicates of the generated set (feature rows resampled with replacement within each "
                    "class label, reference fixed, features extracted once)")


@dataclass(frozen=True)
class BootstrapConfig:
    """Bootstrap replicates (0: no intervals) and the base seed of their resampling stream.

    Apart from EvalConfig: `arpg train-classifier` evaluates its sanity row with an EvalConfig
    and must neither read evaluate.bootstrap nor rerun when it changes."""

    replicates: int
    seed: int

    @classmethod
    def from_params(cls, params: Mapping) -> "BootstrapConfig":
        return cls(replicates=params["evaluate"]["bootstrap"], seed=params["seed"])

    def record(self) -> dict[str, float | int | str]:
        """How the intervals were made, for the metrics JSON (`"bootstrap"`)."""
        return {"replicates": self.replicates, "level": BOOTSTRAP_LEVEL, "method": BOOTSTRAP_METHOD,
                "kid_subsets": BOOTSTRAP_KID_SUBSETS}


def bootstrap_indices(num_rows: int, replicates: int, seed: int,
                      strata_N: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
    """[B, N] row indices of `replicates` resamples with replacement, from a dedicated generator.

    With `strata_N` (class labels) each row is redrawn from the rows of its own class, so every
    replicate keeps the class counts: the sampler draws a class-balanced set, so those counts are
    fixed by design, not a source of sampling noise."""
    from arpg.utils import derive_seed

    gen = make_generator(derive_seed(seed, BOOTSTRAP_STREAM))
    if strata_N is None:
        return torch.randint(num_rows, (replicates, num_rows), generator=gen)
    strata_N = torch.as_tensor(np.array(strata_N))  # a copy: memmaps are read-only
    if strata_N.shape != (num_rows,):
        raise DataError(f"bootstrap strata must be [{num_rows}] (one label per row), got {tuple(strata_N.shape)}")
    idx_BN = torch.empty(replicates, num_rows, dtype=torch.long)
    for label in torch.unique(strata_N):  # sorted labels: a fixed draw order
        rows_R = torch.nonzero(strata_N == label).squeeze(1)  # [R]
        idx_BN[:, rows_R] = rows_R[torch.randint(len(rows_R), (replicates, len(rows_R)), generator=gen)]
    return idx_BN


PRC_REPLICATE_NEIGHBOURS = 16  # nearest generated rows kept per row to read a replicate's k-NN radius from
PRC_REPLICATE_MAX_PAIRS = 50_000_000  # candidate (reference, generated) pairs kept at most (~600 MB)


class ResampledPrecisionRecall:
    """torch-fidelity's precision and recall of resamples of the generated set, from one pass over it.

    Recomputing them per replicate would cost a full k-NN pass each time (at 50k rows, minutes).
    Instead, with k = `neighborhood`:

    * precision, the share of generated rows inside some reference row's k-NN ball, is a mean of a
      per-row indicator that no other generated row changes: a resample only reweights it;
    * recall, the share of reference rows inside some generated row's ball, needs each resampled row's
      radius: torch-fidelity's `kthvalue(k + 1)` over the resample's distances, i.e. the distance
      at which the row's own copies (at distance 0) plus its neighbours, counted with their
      multiplicity in the resample, first reach k + 1. It is read off the row's `neighbours` nearest
      rows of the full set; a row whose neighbours hold too few resampled copies is done exactly,
      as is everything when the candidate pairs (reference rows within reach of a generated row's
      largest such radius) would exceed `max_pairs` (then every replicate is torch-fidelity's own
      computation on the resampled rows).

    Distances are torch-fidelity's (`calc_cdist_part`, same blocks). Convention as theirs: input 1
    generated, input 2 reference."""

    def __init__(self, gen_ND: torch.Tensor, ref_MD: torch.Tensor, neighborhood: int,
                 neighbours: int = PRC_REPLICATE_NEIGHBOURS, max_pairs: int = PRC_REPLICATE_MAX_PAIRS,
                 batch: int = PRC_BATCH):
        self.gen_ND, self.ref_MD, self.need, self.batch = gen_ND, ref_MD, neighborhood + 1, batch
        n, kept = len(gen_ND), min(neighbours, len(gen_ND) - 1)
        ref_radius_M = torch.cat([calc_cdist_part(block, ref_MD, batch).kthvalue(self.need, dim=1).values
                                  for block in ref_MD.split(batch)])
        in_ball, near_dist, near_idx, pair_gen, pair_ref, pair_dist = [], [], [], [], [], []
        num_pairs, start = 0, 0
        for block_BD in gen_ND.split(batch):
            rows_B = torch.arange(start, start + len(block_BD))
            gen_dist_BN = calc_cdist_part(block_BD, gen_ND, batch)  # [B, N]
            gen_dist_BN[torch.arange(len(block_BD)), rows_B] = math.inf  # itself: counted by multiplicity
            dist_BL, idx_BL = gen_dist_BN.topk(kept, dim=1, largest=False)  # ascending
            ref_dist_BM = calc_cdist_part(block_BD, ref_MD, batch)  # [B, M]
            in_ball.append((ref_dist_BM <= ref_radius_M).any(dim=1))
            near_dist.append(dist_BL)
            near_idx.append(idx_BL)
            if num_pairs <= max_pairs:
                local_P, ref_P = torch.nonzero(ref_dist_BM <= dist_BL[:, -1:], as_tuple=True)
                num_pairs += len(local_P)
                pair_gen.append(rows_B[local_P])
                pair_ref.append(ref_P)
                pair_dist.append(ref_dist_BM[local_P, ref_P])
            start += len(block_BD)
        self.in_ref_ball_N = torch.cat(in_ball)  # [N] bool
        self.near_dist_NL, self.near_idx_NL = torch.cat(near_dist), torch.cat(near_idx)  # [N, L]
        self.direct = num_pairs > max_pairs
        if not self.direct:
            self.pair_gen_P, self.pair_ref_P, self.pair_dist_P = (torch.cat(pair_gen), torch.cat(pair_ref),
                                                                   torch.cat(pair_dist))
        self.num_rows = n

    def __call__(self, idx_N: torch.Tensor) -> tuple[float, float]:
        """(precision, recall) of the generated rows `idx_N` (a resample, repeats allowed)."""
        if self.direct:
            prc = prc_features_to_metric(self.gen_ND[idx_N], self.ref_MD, prc_neighborhood=self.need - 1,
                                         prc_batch_size=self.batch, save_cpu_ram=True, verbose=False)
            return prc["precision"], prc["recall"]
        precision = self.in_ref_ball_N[idx_N].float().mean().item()
        counts_N = torch.bincount(idx_N, minlength=self.num_rows)
        reached_NL = counts_N[:, None] + counts_N[self.near_idx_NL].cumsum(dim=1) >= self.need  # [N, L]
        radius_N = self.near_dist_NL.gather(1, reached_NL.int().argmax(dim=1, keepdim=True)).squeeze(1)
        radius_N[counts_N >= self.need] = 0.0  # enough copies of itself
        exact_N = (counts_N > 0) & ~reached_NL[:, -1]  # too few resampled rows among its kept neighbours
        live_P = (counts_N[self.pair_gen_P] > 0) & ~exact_N[self.pair_gen_P]
        live_P &= self.pair_dist_P <= radius_N[self.pair_gen_P]
        covered_M = torch.zeros(len(self.ref_MD), dtype=torch.bool)
        covered_M[self.pair_ref_P[live_P]] = True
        for row in torch.nonzero(exact_N).squeeze(1).tolist():
            gen_dist_N = calc_cdist_part(self.gen_ND[row:row + 1], self.gen_ND, self.batch)[0]
            gen_dist_N[row] = 0.0
            order_N = gen_dist_N.argsort()
            first = int(torch.nonzero(counts_N[order_N].cumsum(0) >= self.need)[0])
            radius = gen_dist_N[order_N[first]]
            covered_M |= calc_cdist_part(self.gen_ND[row:row + 1], self.ref_MD, self.batch)[0] <= radius
        return precision, covered_M.float().mean().item()


def normal_quantile(level: float) -> float:
    """z of a two-sided interval at `level` (1.95996... for 0.95)."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN / inf: a non-finite figure is written as null."""
    return float(value) if math.isfinite(value) else None


def bootstrap_intervals(feats: Mapping[str, torch.Tensor], labels_N: np.ndarray | None, reference: Mapping,
                        extractor: str, config: EvalConfig, bootstrap: BootstrapConfig,
                        point: Mapping[str, float], kernels: KidKernels | None = None,
                        ) -> dict[str, dict[str, float | int | None]]:
    """{metric: {"se", "lo", "hi", "replicates"}} for the headline figures in `point` ({} when
    `bootstrap.replicates` is 0).

    Each replicate resamples the generated set's feature rows with replacement (within each class
    when labels are given: `bootstrap_indices`) and recomputes every metric on those rows
    (`metrics_from_features`; KID from `kernels`, the full set's, precision / recall from
    `ResampledPrecisionRecall`); the reference set stays fixed and no image goes through the
    extractor again. KID within a replicate averages BOOTSTRAP_KID_SUBSETS subsets instead of
    the headline's `config.kid_subsets`; the replicates' spread then also holds that smaller
    average's subset noise, so KID's se is somewhat conservative (12% above the se with 100 subsets
    in a measured case: 1000 rows, subsets of 500).

    `se` is the replicates' standard deviation (ddof 1, over the finite ones, whose count is
    `replicates`); the interval is the normal one, point +- z * se at BOOTSTRAP_LEVEL, centred on the
    full-set value. Not the percentile interval: a resample holds only ~63% distinct rows, which
    biases FID upward (its small-sample bias grows), KID upward (a repeated row is a pair of
    samples that match perfectly) and recall downward (copies shrink the k-NN radii), so the
    replicates' quantiles sit beside the full-set value (KID's replicate mean was about twice the
    full-set value in a measured case), and at a few dozen replicates the 2.5% / 97.5% quantiles
    are little more than the extremes. The se is stable at that count (about 1/sqrt(2(B-1))
    relative error: 16% at B = 20). Non-finite values are null."""
    if bootstrap.replicates == 0:
        return {}
    s = spec(extractor)
    names = [f"{m}_{s.suffix}" for m in BOOTSTRAP_METRICS if f"{m}_{s.suffix}" in point]
    layers = [layer for layer in s.layers if layer in feats]
    num_rows = len(feats[s.fid_layer])
    idx_BN = bootstrap_indices(num_rows, bootstrap.replicates, bootstrap.seed, labels_N)
    labels_N = None if labels_N is None else np.asarray(labels_N)
    replicate_config = dataclasses.replace(config, kid_subsets=0, precision_recall=False)
    gen_ND, ref_MD = feats[s.fid_layer], torch.from_numpy(np.asarray(reference["features"]))
    kid_name = f"kid_{s.suffix}"
    if kernels is None and kid_name in names:
        kernels = KidKernels(gen_ND, ref_MD)
    subset = kid_subset(config, num_rows, len(ref_MD))
    prc = None
    if config.precision_recall:
        prc = ResampledPrecisionRecall(gen_ND, prc_reference(ref_MD, num_rows, config.seed), config.prc_neighborhood)
    values_BM = np.empty((bootstrap.replicates, len(names)))
    for b, idx_N in enumerate(idx_BN):
        resampled = {layer: feats[layer][idx_N] for layer in layers}
        replicate = metrics_from_features(resampled, None if labels_N is None else labels_N[idx_N.numpy()],
                                          reference, extractor, replicate_config)
        if kid_name in names:
            replicate[kid_name], _ = kernels.kid(idx_N.numpy(), BOOTSTRAP_KID_SUBSETS, subset, config.seed)
        if prc is not None:
            replicate[f"precision_{s.suffix}"], replicate[f"recall_{s.suffix}"] = prc(idx_N)
        values_BM[b] = [replicate[name] for name in names]
    z = normal_quantile(BOOTSTRAP_LEVEL)
    out: dict[str, dict[str, float | int | None]] = {}
    for name, values_B in zip(names, values_BM.T):
        finite_B = values_B[np.isfinite(values_B)]
        se = float(np.std(finite_B, ddof=1)) if len(finite_B) >= 2 else math.nan
        out[name] = {"se": _finite_or_none(se), "lo": _finite_or_none(point[name] - z * se),
                     "hi": _finite_or_none(point[name] + z * se), "replicates": int(len(finite_B))}
    return out


def evaluate_images(params, images_NHWC: np.ndarray, labels_N: np.ndarray, device: torch.device,
                    ) -> tuple[dict[str, float], dict[str, dict], float]:
    """Every `evaluate.extractors` metric of uint8 images [N, H, W, C] against the reference split, each
    with its bootstrap interval: (metrics, intervals, seconds spent bootstrapping). The one evaluation
    behind `arpg evaluate` (a sweep point's samples) and `arpg zero-shot` (completed test images)."""
    import time

    from arpg.engine.evaluate import extract_features, extractor_weights, file_digest, load_reference

    config, bootstrap = EvalConfig.from_params(params), BootstrapConfig.from_params(params)
    split = params["evaluate"]["reference_split"]
    metrics: dict[str, float] = {}
    intervals: dict[str, dict] = {}
    seconds = 0.0  # the log only, never a metrics file (which stays byte-identical)
    for extractor in params["evaluate"]["extractors"]:
        weights = extractor_weights(params, extractor)
        reference = load_reference(params.layout.reference_stats(extractor, split), extractor, file_digest(weights))
        feats = extract_features(images_NHWC, extractor, weights, config.batch_size, device)  # once per extractor
        kernels = KidKernels(feats[spec(extractor).fid_layer], torch.from_numpy(np.asarray(reference["features"])))
        values = metrics_from_features(feats, labels_N, reference, extractor, config, kernels)
        start = time.monotonic()
        intervals.update(bootstrap_intervals(feats, labels_N, reference, extractor, config, bootstrap, values,
                                             kernels))
        seconds += time.monotonic() - start
        metrics.update(values)
    return metrics, intervals, seconds


def mean_interval(values_N: torch.Tensor | np.ndarray) -> tuple[float, dict[str, float | int | None]]:
    """Mean of per-image values and its normal interval at BOOTSTRAP_LEVEL (se = std / sqrt(n), ddof 1),
    as an `intervals` entry {"se", "lo", "hi", "n"} (per-image figures such as PSNR: independent images)."""
    values_N = np.asarray(values_N, dtype=np.float64)
    mean = float(values_N.mean())
    se = float(values_N.std(ddof=1) / math.sqrt(len(values_N))) if len(values_N) >= 2 else math.nan
    z = normal_quantile(BOOTSTRAP_LEVEL)
    return mean, {"se": _finite_or_none(se), "lo": _finite_or_none(mean - z * se),
                  "hi": _finite_or_none(mean + z * se), "n": int(len(values_N))}
