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
    """A network: its module (with token_space(state_dict)) and its config dataclass."""

    model: type[nn.Module]
    config: type


# network name -> Network; a size of arpg/sizes.py names its network, and a checkpoint stores it (as "kind")
NETWORKS: dict[str, Network] = {"arpg": Network(ARPG, ARPGConfig), "raster": Network(RasterGPT, RasterConfig)}


def network(name: str) -> Network:
    if name not in NETWORKS:
        raise ArpgError(f"unknown network {name!r}; known: {', '.join(NETWORKS)} (arpg/models/registry.py)")
    return NETWORKS[name]


def network_of(model: nn.Module) -> str:
    """The network of a built model."""
    for name, net in NETWORKS.items():
        if isinstance(model, net.model):
            return name
    raise ArpgError(f"{type(model).__name__} is none of the networks {', '.join(NETWORKS)} (arpg/models/registry.py)")


def _build(network_name: str, size: dict, **kwargs) -> nn.Module:
    generator = kwargs.pop("generator", None)
    net = network(network_name)
    return net.model(net.config(**size, **kwargs), generator=generator)


MODELS: dict[str, Callable[..., nn.Module]] = {
    name: partial(_build, network_name, size) for name, (network_name, size) in SIZES.items()
}


def network_of_size(name: str) -> str:
    """The network (a key of NETWORKS) a size builds."""
    _check_name(name)
    return SIZES[name][0]


def _check_name(name: str) -> None:
    if name not in SIZES:
        from arpg.decoders import DECODERS

        keys = " / ".join(d.param_keys[0] for d in DECODERS.values())
        raise ArpgError(f"unknown size {name!r}; known sizes: {', '.join(SIZES)} (set {keys})")


def build_model(name: str, *, codebook_size: int, num_classes: int, grid_size: int, **overrides) -> nn.Module:
    """Build a registry size for a given token space; overrides set other config fields
    (e.g. dropouts) and `generator=` seeds the init from a dedicated stream."""
    _check_name(name)
    network_name, size = SIZES[name]
    known = set(network(network_name).config.__dataclass_fields__) | {"generator"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ArpgError(f"{name}: unknown config field(s) {unknown}; valid: {sorted(known)}")
    return MODELS[name](codebook_size=codebook_size, num_classes=num_classes, grid_size=grid_size, **overrides)
