"""`arpg zero-shot`: zero-shot editing measured on the test split, cell by cell (arpg/commands/zero_shot.py).

Every cell is decoded at the step sweep's guidance (sample.cfg_default), with the source image's
label as the class, and measured like a sweep point (bootstrap.evaluate_images: FID / KID /
accuracy of the study's extractors against the reference split), plus the mean PSNR of the
generated region against the original (expansion: of the output against the bicubic up-scale).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from arpg.decoders import DECODERS
from arpg.engine.zero_shot import complete, expand_resolution, known_count, known_mask, pick_images
from arpg.commands.zero_shot import CONTINUATION, EXPANSION, Cell

MASK_STREAM, DECODE_STREAM = 0x2E40, 0x2E41  # seed streams: the masks, the decoding draws
PSNR_TEXT = {  # what a cell's `psnr` compares (uint8 pixels, peak 255, mean over images)
    "hidden": "PSNR of the generated region against the original image, mean over images",
    "bicubic": "PSNR of the expanded image against the plain bicubic up-scale of the input, mean over images",
}


@dataclass
class Sources:
    """The test images edited: pixels [N, C, H, W] in [-1, 1], uint8 [N, C, H, W], labels [N], tokens."""

    images_NCHW: torch.Tensor
    pixels_NCHW: torch.Tensor
    labels_N: torch.Tensor
    tokens_Nhw: torch.Tensor
    reconstruction_NCHW: torch.Tensor  # uint8: the tokenizer's decode of the tokens (the edit's ceiling)
    index: list[int]


def load_sources(params, tokenizer, device: torch.device) -> Sources:
    from arpg.data.arrays import load_images, load_labels
    from arpg.data.pixels import from_uint8, to_uint8

    layout, zs = params.layout, params["zeroshot"]
    images_N, labels_N = load_images(layout, "test"), load_labels(layout, "test")
    index = pick_images(labels_N, zs["num_images"])  # class-balanced, the first of each class first
    # a channels-last view as the gallery's (for RGB the encoder's bits depend on it)
    pixels_NCHW = torch.from_numpy(np.ascontiguousarray(images_N[index])).permute(0, 3, 1, 2).to(device)
    images_NCHW = from_uint8(pixels_NCHW)  # [N, C, H, W]
    with torch.inference_mode():
        tokens = [tokenizer.encode(b) for b in images_NCHW.split(zs["batch_size"])]
        tokens_Nhw = torch.cat(tokens)  # [N, h, w]
        recon_NCHW = torch.cat([to_uint8(tokenizer.decode(t).clamp(-1, 1)) for t in tokens])  # [N, C, H, W]
    return Sources(images_NCHW, pixels_NCHW, torch.from_numpy(labels_N[index]).long().to(device),
                   tokens_Nhw, recon_NCHW, index)


@dataclass
class Edited:
    """A cell's outputs over every source: uint8 images [N, C, H, W] (training resolution), per-image
    PSNR [N], PSNR of the tokenizer's reconstruction in the same region [N] (None: expansion), kept."""

    pixels_NCHW: torch.Tensor
    psnr_N: torch.Tensor
    psnr_tokenizer_N: torch.Tensor | None
    known_tokens: int
    generated_tokens: int
    known_kept: bool


def run_cell(cell: Cell, params, models: dict, tokenizer, src: Sources, device: torch.device) -> Edited:
    """Decode one cell batch by batch, each batch from its own seeded generators."""
    from arpg.engine.sampler import SamplerConfig
    from arpg.utils import derive_seed, make_generator

    zs, seed = params["zeroshot"], params["seed"]
    steps = cell.steps if cell.steps is not None else 1  # a sequential decoder ignores it
    sampler = SamplerConfig.from_params(params["sample"], steps=steps, cfg=params["sample"]["cfg_default"])
    parts = []
    for b, start in enumerate(range(0, len(src.labels_N), zs["batch_size"])):
        rows = slice(start, start + zs["batch_size"])
        decode_gen = make_generator(derive_seed(seed, DECODE_STREAM, zlib.crc32(cell.key.encode()), b), device)
        mask_gen = make_generator(derive_seed(seed, MASK_STREAM, cell.mask_key, b))  # CPU: masks are small
        parts.append(_edit_batch(cell, params, models[cell.model], tokenizer, src, rows, sampler, decode_gen,
                                 mask_gen))
    return Edited(torch.cat([p.pixels_NCHW for p in parts]), torch.cat([p.psnr_N for p in parts]),
                  None if parts[0].psnr_tokenizer_N is None else torch.cat([p.psnr_tokenizer_N for p in parts]),
                  parts[0].known_tokens, parts[0].generated_tokens, all(p.known_kept for p in parts))


@torch.inference_mode()
def _edit_batch(cell: Cell, params, model, tokenizer, src: Sources, rows: slice, sampler, decode_gen,
                mask_gen) -> Edited:
    from arpg.data.pixels import to_uint8
    from arpg.engine.image_metrics import masked_psnr
    from arpg.engine.sampler import generate_raster
    from arpg.engine.zero_shot import pixel_mask

    labels_B, tokens_Bhw = src.labels_N[rows], src.tokens_Nhw[rows]
    B, side = tokens_Bhw.shape[0], tokens_Bhw.shape[-1]
    if cell.task == EXPANSION:
        completion, big_BCHW = expand_resolution(model, tokenizer, src.images_NCHW[rows], labels_B,
                                                 expand_to=params["gallery"]["expand_to"], sampler=sampler,
                                                 generator=decode_gen, method=cell.mask)
        out_BCHW = tokenizer.decode(completion.tokens_Bhw).clamp(-1, 1)  # [B, C, E f, E f]
        psnr_B = masked_psnr(to_uint8(out_BCHW), to_uint8(big_BCHW), torch.ones(1, 1, 1, 1, dtype=torch.bool))
        small_BCHW = F.interpolate(out_BCHW, size=src.images_NCHW.shape[-2:], mode="area")  # training resolution
        known = int(completion.known_hw.sum())
        return Edited(to_uint8(small_BCHW), psnr_B.cpu(), None, known, completion.known_hw.numel() - known,
                      completion.known_kept)
    known_Bhw = known_mask("inpainting" if cell.task == CONTINUATION else cell.task, cell.mask, side,
                           cell.fraction, B, mask_gen).to(tokens_Bhw.device)  # [B, h, w]
    if DECODERS[cell.model].parallel:
        out_Bhw = complete(model, tokens_Bhw, known_Bhw, labels_B, sampler=sampler, generator=decode_gen).tokens_Bhw
    else:
        K = known_count(side, cell.fraction)
        out_Bhw = generate_raster(model, labels_B, cfg=sampler.cfg, cfg_schedule=sampler.cfg_schedule,
                                  temperature=sampler.temperature, top_k=sampler.top_k, top_p=sampler.top_p,
                                  generator=decode_gen,
                                  prefix_BK=tokens_Bhw.reshape(B, -1)[:, :K]).view(B, side, side)  # [B, h, w]
    pixels_BCHW = to_uint8(tokenizer.decode(out_Bhw).clamp(-1, 1))  # [B, C, H, W]
    hidden_B1HW = ~pixel_mask(known_Bhw, pixels_BCHW.shape[-1] // side)  # the generated pixels
    original_BCHW = src.pixels_NCHW[rows]
    known = int(known_Bhw[0].sum())
    return Edited(pixels_BCHW, masked_psnr(pixels_BCHW, original_BCHW, hidden_B1HW).cpu(),
                  masked_psnr(src.reconstruction_NCHW[rows], original_BCHW, hidden_B1HW).cpu(), known,
                  side * side - known, bool(torch.equal(out_Bhw[known_Bhw], tokens_Bhw[known_Bhw])))


def measure(cell: Cell, edited: Edited, params, src: Sources, device: torch.device) -> dict:
    """The cell's record: what was done, every metric and its interval."""
    from arpg.engine.bootstrap import evaluate_images, mean_interval

    images_NHWC = edited.pixels_NCHW.permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, C] uint8
    metrics, intervals, _ = evaluate_images(params, images_NHWC, src.labels_N.cpu().numpy(), device)
    metrics["psnr"], intervals["psnr"] = mean_interval(edited.psnr_N)
    if edited.psnr_tokenizer_N is not None:
        metrics["psnr_tokenizer"], intervals["psnr_tokenizer"] = mean_interval(edited.psnr_tokenizer_N)
    total = edited.known_tokens + edited.generated_tokens
    return {"key": cell.key, "task": cell.task, "mask": cell.mask,
            "fraction": edited.known_tokens / total,
            "model": cell.model, "steps": cell.steps if cell.steps is not None else edited.generated_tokens,
            "parallel": DECODERS[cell.model].parallel, "known_tokens": edited.known_tokens,
            "generated_tokens": edited.generated_tokens, "known_tokens_kept": edited.known_kept,
            "psnr_against": "bicubic" if cell.task == EXPANSION else "hidden",
            "metrics": metrics, "intervals": intervals}
