"""Zero-shot editing with ARPG through pre-filled context (spec section 3).

Known tokens go into pass 1 first (the class, then the known tokens at their
true positions); only the unknown positions are decoded, with [MASK] queries in
random parallel steps. Known tokens are copied through untouched.

  inpainting            unknown = a region (default: the centre square, half the side)
  outpainting           known = a region (default: the same centre square), the rest is generated
  resolution expansion  a grid larger than the training grid, two ways (gallery.expansion):
                        extend: RoPE tables extended past the trained positions; the up-scaled
                          image's tokens are the context on a lattice with the training grid's
                          density (one known token per original token cell);
                        interpolate: a grid k times the training grid (k an integer) whose RoPE
                          positions are scaled by 1/k (position interpolation), the original
                          image's own tokens at cells (k r, k c), i.e. at exactly their trained
                          angles; the cells between (fractional angles) are generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from arpg.engine.sampler import Context, SamplerConfig, generate_arpg
from arpg.errors import ArpgError
from arpg.commands.zero_shot import CONTINUATION, EXPANSION, TASKS

EXPANSIONS = ("extend", "interpolate")
# Masks of the measured edits (`arpg zero-shot`): a region grown cell by cell from a centre point, so it
# holds exactly the requested number of tokens; top-rows is the raster order's prefix.
MASKS = ("centre", "random-block", "top-rows")


def known_count(side: int, fraction: float) -> int:
    """Tokens known at `fraction` of a side x side grid (at least one known, one generated)."""
    count = round(fraction * side * side)
    if not 0 < count < side * side:
        raise ArpgError(f"known fraction {fraction} leaves {count} of {side * side} tokens known; "
                        "use zeroshot.fractions strictly between 0 and 1 that keep one token each side")
    return count


def nearest_cells(side: int, count: int, centre_B2: torch.Tensor) -> torch.Tensor:
    """Bool [B, side, side]: the `count` cells nearest each centre (row, col) [B, 2], by Chebyshev
    distance (a square block), ties by Euclidean distance, then raster index (a fixed choice)."""
    rc_N2 = torch.cartesian_prod(torch.arange(side), torch.arange(side)).double()  # [N, 2] raster order
    offset_BN2 = rc_N2[None] - centre_B2.double()[:, None]  # [B, N, 2]
    order_BN = torch.arange(side * side).expand(len(centre_B2), -1)  # raster index: the last tie-break
    for key_BN in (offset_BN2.pow(2).sum(-1), offset_BN2.abs().amax(-1)):  # Euclidean, then Chebyshev
        # stable sorts, least significant key first: equal keys keep the order of the earlier ones
        order_BN = order_BN.gather(1, key_BN.gather(1, order_BN).sort(dim=1, stable=True).indices)
    mask_BN = torch.zeros(len(centre_B2), side * side, dtype=torch.bool).scatter_(1, order_BN[:, :count], True)
    return mask_BN.view(-1, side, side)


def region(mask: str, side: int, count: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Bool [B, side, side] with exactly `count` cells set per image: a block at the centre, a block at a
    centre drawn per image from `generator`, or the first `count` cells in raster order (the top rows)."""
    if mask == "centre":
        return nearest_cells(side, count, torch.full((batch, 2), (side - 1) / 2))
    if mask == "random-block":
        centre_B2 = torch.rand(batch, 2, generator=generator, device=generator.device).cpu() * (side - 1)  # [B, 2]
        return nearest_cells(side, count, centre_B2)
    if mask == "top-rows":
        return (torch.arange(side * side) < count).view(1, side, side).expand(batch, side, side).clone()
    raise ArpgError(f"unknown zero-shot mask {mask!r}; use one of {', '.join(MASKS)} (zeroshot.masks)")


def known_mask(task: str, mask: str, side: int, fraction: float, batch: int,
               generator: torch.Generator) -> torch.Tensor:
    """Bool [B, side, side], True where the image's token is given, `fraction` of the grid known.

    inpainting: the region is the hole (context around it); outpainting: the region is what is known;
    top-rows: the known top rows whatever the task (the lower part is completed)."""
    count = known_count(side, fraction)
    if mask == "top-rows" or task == "outpainting":
        return region(mask, side, count, batch, generator)
    if task == "inpainting":
        return ~region(mask, side, side * side - count, batch, generator)
    raise ArpgError(f"zero-shot masks are for inpainting / outpainting, not {task!r}")


def centre_box(side: int, frac: float = 0.5) -> torch.Tensor:
    """Bool [side, side], True inside the centred square covering `frac` of the side."""
    size = max(1, round(side * frac))
    lo = (side - size) // 2
    box_HW = torch.zeros(side, side, dtype=torch.bool)
    box_HW[lo:lo + size, lo:lo + size] = True
    return box_HW


def lattice(side: int, big: int) -> torch.Tensor:
    """Bool [big, big]: one position per cell of a side x side grid spread over big x big."""
    if big < side:
        raise ArpgError(f"resolution expansion needs expand_to >= the training grid ({big} < {side}); "
                        "raise gallery.expand_to")
    idx = ((torch.arange(side) + 0.5) * big / side).floor().long()  # centres of the original cells
    mask_HW = torch.zeros(big, big, dtype=torch.bool)
    mask_HW[idx[:, None], idx[None, :]] = True
    return mask_HW


@dataclass
class Completion:
    """One zero-shot call: output tokens [B, h, w], the context it was given [B, h, w], known mask
    [h, w] (one for the batch) or [B, h, w] (one per image)."""

    tokens_Bhw: torch.Tensor
    context_Bhw: torch.Tensor
    known_hw: torch.Tensor

    @property
    def known_kept(self) -> bool:
        known_Bhw = self.known_hw.to(self.tokens_Bhw.device).expand_as(self.tokens_Bhw)
        return bool(torch.equal(self.tokens_Bhw[known_Bhw], self.context_Bhw[known_Bhw]))


def complete(model, tokens_Bhw: torch.Tensor, known_hw: torch.Tensor, labels_B: torch.Tensor, *,
             sampler: SamplerConfig, generator: torch.Generator, rope_scale: float = 1.0) -> Completion:
    """Keep the tokens where `known_hw` ([h, w], or [B, h, w] with the same count per image) is True,
    generate the others (random order, parallel steps; rope_scale: the grid's RoPE position scale, see
    layers.rope_2d)."""
    B, h, w = tokens_Bhw.shape
    if h != w or known_hw.shape[-2:] != (h, w) or known_hw.dim() not in (2, 3):
        raise ArpgError(f"zero-shot grids must be square with a matching mask; got tokens {tuple(tokens_Bhw.shape)}, "
                        f"mask {tuple(known_hw.shape)}")
    known_BN = known_hw.expand(B, h, w).reshape(B, h * w).to(tokens_Bhw.device)  # [B, N]
    n_free = int((~known_BN[0]).sum())
    steps = min(sampler.steps, n_free)  # a small hole cannot take more steps than it has tokens
    context = Context(tokens_BN=tokens_Bhw.reshape(B, h * w), known_BN=known_BN)
    out_BN = generate_arpg(model, labels_B, steps=steps, cfg=sampler.cfg, cfg_schedule=sampler.cfg_schedule,
                           schedule=sampler.schedule, temperature=sampler.temperature, top_k=sampler.top_k,
                           top_p=sampler.top_p, order="random", generator=generator, context=context,
                           grid_size=h, confidence_noise=sampler.confidence_noise, rope_scale=rope_scale)
    return Completion(out_BN.view(B, h, w), tokens_Bhw, known_hw)


def inpaint(model, tokens_Bhw, labels_B, *, sampler: SamplerConfig, generator: torch.Generator,
            hole_hw: torch.Tensor | None = None) -> Completion:
    """Regenerate the hole (default: centre square); everything else is context."""
    hole_hw = centre_box(tokens_Bhw.shape[-1]) if hole_hw is None else hole_hw
    return complete(model, tokens_Bhw, ~hole_hw, labels_B, sampler=sampler, generator=generator)


def outpaint(model, tokens_Bhw, labels_B, *, sampler: SamplerConfig, generator: torch.Generator,
             keep_hw: torch.Tensor | None = None) -> Completion:
    """Keep a region (default: centre square) and generate everything around it."""
    keep_hw = centre_box(tokens_Bhw.shape[-1]) if keep_hw is None else keep_hw
    return complete(model, tokens_Bhw, keep_hw, labels_B, sampler=sampler, generator=generator)


def upscale(images_BCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of [-1, 1] images to size x size, clamped back into range."""
    return F.interpolate(images_BCHW, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)


@torch.inference_mode()
def expand_resolution(model, tokenizer, images_BCHW: torch.Tensor, labels_B: torch.Tensor, *, expand_to: int,
                      sampler: SamplerConfig, generator: torch.Generator,
                      method: str = "extend") -> tuple[Completion, torch.Tensor]:
    """Generate on an expand_to x expand_to token grid from an image (`method`: see the module doc).

    Returns the completion and the bicubic up-scaled input images [B, C, expand_to*f, expand_to*f].
    """
    side = model.config.grid_size
    f = tokenizer.config.downsample
    big_BCHW = upscale(images_BCHW, expand_to * f)  # [B, C, E*f, E*f]
    if method == "extend":
        completion = complete(model, tokenizer.encode(big_BCHW), lattice(side, expand_to), labels_B,
                              sampler=sampler, generator=generator)
    elif method == "interpolate":
        if expand_to % side:
            raise ArpgError(f"expansion 'interpolate' needs gallery.expand_to a multiple of the training grid "
                            f"{side} (got {expand_to}); use {2 * side} or set gallery.expansion: extend")
        k = expand_to // side
        context_BEE = torch.zeros(images_BCHW.shape[0], expand_to, expand_to, dtype=torch.long,
                                  device=images_BCHW.device)
        context_BEE[:, ::k, ::k] = tokenizer.encode(images_BCHW)  # the image's own tokens, at (k r, k c)
        known_EE = torch.zeros(expand_to, expand_to, dtype=torch.bool)
        known_EE[::k, ::k] = True
        completion = complete(model, context_BEE, known_EE, labels_B, sampler=sampler, generator=generator,
                              rope_scale=1 / k)
    else:
        raise ArpgError(f"unknown expansion {method!r}; use one of {', '.join(EXPANSIONS)}")
    return completion, big_BCHW


# --------------------------------------------------------------------------------------------
# Gallery: one panel per task (input, mask, outputs side by side)
# --------------------------------------------------------------------------------------------

def pick_images(labels_N, count: int) -> list[int]:
    """Indices of `count` test images cycling through the classes (first unused image of each)."""
    import numpy as np

    labels_N = np.asarray(labels_N)
    by_class = [np.flatnonzero(labels_N == c).tolist() for c in np.unique(labels_N)]
    picked: list[int] = []
    while len(picked) < count:
        before = len(picked)
        for members in by_class:
            if members and len(picked) < count:
                picked.append(members.pop(0))
        if len(picked) == before:
            raise ArpgError(f"the test split has only {len(picked)} images; lower gallery.num_images")
    return picked


def pixel_mask(known_hw: torch.Tensor, factor: int) -> torch.Tensor:
    """Token mask [h, w] or [B, h, w] -> pixel mask [1 or B, 1, h f, w f] (broadcasts over channels)."""
    known_HW = known_hw.repeat_interleave(factor, -2).repeat_interleave(factor, -1)  # [(B,) H, W]
    return known_HW.reshape(-1, 1, *known_HW.shape[-2:])


def shade_unknown(images_BCHW: torch.Tensor, known_hw: torch.Tensor) -> torch.Tensor:
    """The input with unknown token cells drawn mid-grey (what the model is shown)."""
    known_B1HW = pixel_mask(known_hw, images_BCHW.shape[-1] // known_hw.shape[-1]).to(images_BCHW.device)
    return torch.where(known_B1HW, images_BCHW, torch.zeros_like(images_BCHW))  # 0 = grey in [-1, 1]


@torch.inference_mode()
def run_task(task: str, model, tokenizer, images_BCHW: torch.Tensor, labels_B: torch.Tensor, *,
             samples: int, expand_to: int, sampler: SamplerConfig, generator: torch.Generator,
             expansion: str = "extend") -> dict:
    """One task on B images, `samples` draws each -> tensors for the panel and a summary.

    Returns {"input", "mask", "outputs" [B, S, C, H, W] in [-1, 1], "known_kept", "known", "grid"}.
    """
    B = images_BCHW.shape[0]
    labels_X = labels_B.repeat_interleave(samples)  # [B*S]: draws of one image are adjacent
    images_XCHW = images_BCHW.repeat_interleave(samples, 0)  # [B*S, C, H, W]
    if task == EXPANSION:
        completion, big_XCHW = expand_resolution(model, tokenizer, images_XCHW, labels_X, expand_to=expand_to,
                                                 sampler=sampler, generator=generator, method=expansion)
        inputs_BCHW = big_XCHW[::samples]  # the up-scaled input, once per image
    elif task in ("inpainting", "outpainting", CONTINUATION):
        inputs_BCHW = images_BCHW
        context_Xhw = tokenizer.encode(images_BCHW).repeat_interleave(samples, 0)  # [B*S, h, w]
        if task == CONTINUATION:  # the top half of the rows known, the lower half generated
            top_hw = known_mask("inpainting", "top-rows", context_Xhw.shape[-1], 0.5, 1, generator)[0]
            completion = complete(model, context_Xhw, top_hw, labels_X, sampler=sampler, generator=generator)
        else:
            fn = inpaint if task == "inpainting" else outpaint
            completion = fn(model, context_Xhw, labels_X, sampler=sampler, generator=generator)
    else:
        raise ArpgError(f"unknown zero-shot task {task!r}; use one of {', '.join(TASKS)}")
    outputs_XCHW = tokenizer.decode(completion.tokens_Bhw).clamp(-1, 1)  # [B*S, C, H, W]
    return {"input": inputs_BCHW, "mask": shade_unknown(inputs_BCHW, completion.known_hw),
            "outputs": outputs_XCHW.view(B, samples, *outputs_XCHW.shape[1:]),
            "known_kept": completion.known_kept, "known": int(completion.known_hw.sum()),
            "grid": int(completion.known_hw.shape[0])}
