"""Per-image fidelity of uint8 images: PSNR and SSIM (tokenizer reconstructions, zero-shot edits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(pixels_a: torch.Tensor, pixels_b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images [B, ...] (peak 255); identical images give inf."""
    diff = pixels_a.double() - pixels_b.double()
    mse_B = diff.pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse_B)


# An exact match counts as 8-bit rounding error (the variance of a uniform rounding step, 1/12: 58.9 dB),
# so a region the model reproduces bit for bit (black background) gives a finite PSNR and a finite mean.
QUANTISATION_MSE = 1 / 12


def masked_psnr(pixels_a: torch.Tensor, pixels_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images [B, C, H, W] over the pixels where `mask` ([B or 1, 1, H, W])
    is True; the MSE is floored at QUANTISATION_MSE."""
    weight = mask.to(torch.float64).expand_as(pixels_a)  # [B, C, H, W]
    if bool((weight.flatten(1).sum(1) == 0).any()):
        raise ValueError("masked_psnr: an image has no pixel in the mask")
    sq = (pixels_a.double() - pixels_b.double()).pow(2) * weight
    mse_B = (sq.flatten(1).sum(1) / weight.flatten(1).sum(1)).clamp_min(QUANTISATION_MSE)
    return 10 * torch.log10(255.0 ** 2 / mse_B)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()  # [size]


def ssim(pixels_a: torch.Tensor, pixels_b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
    data range 255, valid window positions only), averaged over channels. Inputs uint8 [B, C, H, W]."""
    a = pixels_a.double()
    b = pixels_b.double()
    C = a.shape[1]
    g = _gaussian_window()
    kernel_C1SS = (g[:, None] * g[None, :]).expand(C, 1, -1, -1)

    def blur(x):
        return F.conv2d(x, kernel_C1SS, groups=C)  # [B, C, H-10, W-10]

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)
