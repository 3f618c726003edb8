"""The decoders a study compares: one entry each, the only place that names them.

Training, sampling, the sweeps, evaluation, the profile, the report and the CLI iterate
`DECODERS`; adding a decoder is its own modules plus one `Decoder` entry here. A decoder's
name is the `model` wildcard, the `--model` value and its folder under the Layout
(`models/<name>/`, `samples/<name>/`, `metrics/<name>/`); its params keys are
`train.<name>_model` (a size of arpg/models/registry.py) and `train.<name>_pretrained`.

Snakemake imports this module (through arpg/pipeline.py): no torch here. A decoder's network is
built from its size (arpg/models/registry.py, `network`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from arpg.errors import ArpgError

_NAME = re.compile(r"[a-z][a-z0-9]*")  # no '-' or '_': job keys and params keys split on them


@dataclass(frozen=True)
class Decoder:
    name: str            # the `model` wildcard, --model value, Layout folder (they predate "decoder")
    label: str           # in text: "ARPG", "raster baseline"
    network: str         # the network (models/registry.py NETWORKS) its sizes build
    parallel: bool       # True: any step count and order (steps, guidance and orders swept)
    native_order: str    # its order; a sequential decoder decodes only in it, one token per step
    zero_shot: bool = False  # edits images from pre-filled tokens (the gallery)
    short: str = ""          # in tables and plot legends ("raster"); the label when empty

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ArpgError(f"decoder name {self.name!r}: use lower-case letters and digits, starting with a letter")

    @property
    def short_label(self) -> str:
        return self.short or self.label

    @property
    def model_key(self) -> str:
        """Its key under `train:`: the registry size it trains."""
        return f"{self.name}_model"

    @property
    def pretrained_key(self) -> str:
        """Its key under `train:`: its released weights (null: train it)."""
        return f"{self.name}_pretrained"

    @property
    def param_keys(self) -> tuple[str, str]:
        """The same, dotted: train.<name>_model, train.<name>_pretrained."""
        return (f"train.{self.model_key}", f"train.{self.pretrained_key}")


DECODERS: dict[str, Decoder] = {d.name: d for d in (
    Decoder("arpg", "ARPG", network="arpg", parallel=True, native_order="random", zero_shot=True),
    Decoder("raster", "raster baseline", network="raster", parallel=False, native_order="raster", short="raster"),
)}


def decoder(name: str) -> Decoder:
    """The registered decoder called `name`, or an error listing those that are."""
    try:
        return DECODERS[name]
    except KeyError:
        raise ArpgError(f"unknown decoder {name!r}; registered: {', '.join(DECODERS)} (arpg/decoders.py)") from None


def labels(*, parallel: bool, short: bool = False) -> str:
    """The labels of the parallel (or the sequential) decoders joined for prose: 'ARPG', 'raster baseline'."""
    names = [d.short_label if short else d.label for d in DECODERS.values() if d.parallel is parallel]
    return " and ".join(names) or "none"


def native_orders(*, parallel: bool) -> str:
    """Their native orders joined for prose: 'random'."""
    return " / ".join(dict.fromkeys(d.native_order for d in DECODERS.values() if d.parallel is parallel))


def is_native(decoder: str, order: str) -> bool:
    """`order` is the decoder's own (ARPG: random; a sequential baseline: raster)."""
    return order == DECODERS[decoder].native_order


def in_native_order(row: Mapping) -> bool:
    """A measured row (`kind`, `order`) decoded in its decoder's own order."""
    return is_native(row["kind"], row["order"])


def zero_shot_decoder() -> Decoder | None:
    """The decoder the gallery edits with: the first registered one that can (None: no gallery)."""
    return next((d for d in DECODERS.values() if d.zero_shot), None)


@contextmanager
def registered_in(registry: dict, extra: Any, what: str) -> Iterator[Any]:
    """Add `extra` to `registry` under its name for the duration of a `with` block (tests). The
    registry is changed in place, so every module that iterates it sees the new entry."""
    if extra.name in registry:
        raise ArpgError(f"{what} {extra.name!r} is registered already")
    registry[extra.name] = extra
    try:
        yield extra
    finally:
        del registry[extra.name]


def registered(extra: Decoder):
    """Register the decoder `extra` for the duration of a `with` block (tests)."""
    return registered_in(DECODERS, extra, "decoder")
