"""Image conversions, one of each: uint8 arrays -> tensors, uint8 pixels <-> [-1, 1] floats.

Prepared images and samples are uint8 [N, H, W, C] numpy arrays (often memory-mapped); the
networks (tokenizer, classifier) take float [B, C, H, W] in [-1, 1], LlamaGen's convention.
"""

from __future__ import annotations

import numpy as np
import torch

from arpg.errors import DataError


def to_tensor_NCHW(images_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] (numpy, possibly memory-mapped) -> contiguous uint8 tensor [N, C, H, W]."""
    if images_NHWC.dtype != np.uint8 or images_NHWC.ndim != 4:
        raise DataError(f"expected uint8 images [N, H, W, C], got {images_NHWC.dtype} {images_NHWC.shape}; "
                        "rerun `arpg prepare-data` / `arpg sample`")
    # np.array copies: memory-mapped arrays are read-only, which torch.from_numpy warns about.
    return torch.from_numpy(np.array(images_NHWC)).permute(0, 3, 1, 2).contiguous()


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1] (the inverse of `to_uint8` up to rounding)."""
    return pixels.float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 pixels, LlamaGen's clamp(127.5 x + 128, 0, 255)."""
    return (127.5 * images + 128).clamp(0, 255).to(torch.uint8)


def image_grid(images_NHWC: np.ndarray, labels_N: np.ndarray, columns: int):
    """One row per class (first `columns` samples of each), uint8 pixels side by side."""
    from PIL import Image

    classes = np.unique(labels_N)
    H, W, C = images_NHWC.shape[1:]
    canvas = np.zeros((len(classes) * H, columns * W, C), dtype=np.uint8)
    for row, c in enumerate(classes):
        for col, img in enumerate(images_NHWC[labels_N == c][:columns]):
            canvas[row * H:(row + 1) * H, col * W:(col + 1) * W] = img
    return Image.fromarray(canvas[..., 0] if C == 1 else canvas)
