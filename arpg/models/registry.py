"""Named model sizes: the published ARPG / LlamaGen sizes and the small ones of the embedded default.

Each ARPG size and its LlamaGen partner share width, heads and total depth, so every comparison is
on the same backbone. Token grid, codebook size and class count come from the data, not the name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch.nn as nn

from arpg.errors import ArpgError
from arpg.models.arpg import ARPG, ARPGConfig
from arpg.models.raster import RasterConfig, RasterGPT
from arpg.sizes import SIZES  # the named sizes live in a torch-free module: the params schema lists them


@dataclass(frozen=True)
class Network:
    """A network kind: its module (with token_space(state_dict)) and its config dataclass."""

    model: type[nn.Module]
    config: type


# network kind -> Network; a size of arpg/sizes.py names its kind, and a checkpoint stores it
NETWORKS: dict[str, Network] = {"arpg": Network(ARPG, ARPGConfig), "raster": Network(RasterGPT, RasterConfig)}


def network(kind: str) -> Network:
    if kind not in NETWORKS:
        raise ArpgError(f"unknown model kind {kind!r}; known: {', '.join(NETWORKS)} (arpg/models/registry.py)")
    return NETWORKS[kind]


def kind_of(model: nn.Module) -> str:
    """The network kind of a built model."""
    for kind, net in NETWORKS.items():
        if isinstance(model, net.model):
            return kind
    raise ArpgError(f"{type(model).__name__} is none of the networks {', '.join(NETWORKS)} (arpg/models/registry.py)")


def _build(kind: str, size: dict, **kwargs) -> nn.Module:
    generator = kwargs.pop("generator", None)
    net = network(kind)
    return net.model(net.config(**size, **kwargs), generator=generator)


MODELS: dict[str, Callable[..., nn.Module]] = {
    name: partial(_build, kind, size) for name, (kind, size) in SIZES.items()
}


def model_kind(name: str) -> str:
    """The network kind (a key of NETWORKS) a registry name builds."""
    _check_name(name)
    return SIZES[name][0]


def _check_name(name: str) -> None:
    if name not in SIZES:
        from arpg.decoders import DECODERS

        keys = " / ".join(d.param_keys[0] for d in DECODERS.values())
        raise ArpgError(f"unknown model {name!r}; known models: {', '.join(SIZES)} (set {keys})")


def build_model(name: str, *, codebook_size: int, num_classes: int, grid_size: int, **overrides) -> nn.Module:
    """Build a registry size for a given token space; overrides set other config fields
    (e.g. dropouts) and `generator=` seeds the init from a dedicated stream."""
    _check_name(name)
    kind, size = SIZES[name]
    known = set(network(kind).config.__dataclass_fields__) | {"generator"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ArpgError(f"{name}: unknown config field(s) {unknown}; valid: {sorted(known)}")
    return MODELS[name](codebook_size=codebook_size, num_classes=num_classes, grid_size=grid_size, **overrides)
