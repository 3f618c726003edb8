"""Load the prepared arrays written by `arpg prepare-data` (memory-mapped)."""

from __future__ import annotations

import numpy as np

from arpg.errors import DataError
from arpg.paths import Layout

SPLITS = ("train", "test")


def _load(path, what: str, stage: str = "prepare-data") -> np.ndarray:
    from arpg.checkpoint_io import read_npy

    return read_npy(path, what, written_by=f"arpg {stage}")


def load_images(layout: Layout, split: str) -> np.ndarray:
    """uint8 [N, H, W, C], memory-mapped."""
    return _load(layout.images(split), f"prepared {split} images")


def load_images_NCHW(layout: Layout, split: str, channels: int):
    """The prepared split as a uint8 tensor [N, C, H, W] (copied out of the memory map)."""
    from arpg.data.pixels import to_tensor_NCHW

    images_NHWC = load_images(layout, split)
    if images_NHWC.ndim != 4 or images_NHWC.shape[-1] != channels:
        raise DataError(f"prepared {split} images have shape {images_NHWC.shape}, expected [N, H, W, {channels}] "
                        "(data.channels); re-run `arpg prepare-data`")
    return to_tensor_NCHW(images_NHWC)


def load_labels(layout: Layout, split: str) -> np.ndarray:
    """int64 [N]."""
    return np.asarray(_load(layout.labels(split), f"prepared {split} labels"))


def load_tokens(layout: Layout, split: str) -> np.ndarray:
    """Token grids [N, h, w] written by `arpg tokenize`; split in train, train_flip, test."""
    return _load(layout.tokens(split), f"{split} token grids", "tokenize")


def load_token_labels(layout: Layout, split: str) -> np.ndarray:
    return np.asarray(_load(layout.token_labels(split), f"{split} token labels", "tokenize"))
