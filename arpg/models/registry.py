"""Named model sizes: the published ARPG / LlamaGen sizes and the small ones of the embedded default.

Each ARPG size and its LlamaGen partner share width, heads and total depth, so every comparison is
on the same backbone. Token grid, codebook size and class count come from the data, not the name.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn as nn

from arpg.errors import ArpgError
from arpg.models.arpg import ARPG, ARPGConfig
from arpg.models.raster import RasterConfig, RasterGPT
from arpg.sizes import SIZES  # the named sizes live in a torch-free module: the params schema lists them


def _build(kind: str, size: dict, **kwargs) -> nn.Module:
    generator = kwargs.pop("generator", None)
    fields = {**size, **kwargs}
    if kind == "arpg":
        return ARPG(ARPGConfig(**fields), generator=generator)
    return RasterGPT(RasterConfig(**fields), generator=generator)


MODELS: dict[str, Callable[..., nn.Module]] = {
    name: partial(_build, kind, size) for name, (kind, size) in SIZES.items()
}


def model_kind(name: str) -> str:
    """'arpg' or 'raster' for a registry name."""
    _check_name(name)
    return SIZES[name][0]


def _check_name(name: str) -> None:
    if name not in SIZES:
        raise ArpgError(
            f"unknown model {name!r}; known models: {', '.join(SIZES)} (set train.arpg_model / raster_model)"
        )


def build_model(name: str, *, codebook_size: int, num_classes: int, grid_size: int, **overrides) -> nn.Module:
    """Build a registry size for a given token space; overrides set other config fields
    (e.g. dropouts) and `generator=` seeds the init from a dedicated stream."""
    _check_name(name)
    kind, size = SIZES[name]
    config_cls = ARPGConfig if kind == "arpg" else RasterConfig
    known = set(config_cls.__dataclass_fields__) | {"generator"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ArpgError(f"{name}: unknown config field(s) {unknown}; valid: {sorted(known)}")
    return MODELS[name](codebook_size=codebook_size, num_classes=num_classes, grid_size=grid_size, **overrides)
