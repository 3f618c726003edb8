"""The class-balanced sample set of a sweep point, cut into fixed, seeded batches.

Batch b holds a fixed slice of the labels (class-major) and draws from a generator seeded by
(seed, b), whichever process runs it: under torchrun rank r takes batches r, r + W, ..., and
merging every rank's batches in batch order gives exactly the set one process draws.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from arpg.decoders import DECODERS
from arpg.errors import ArpgError
from arpg.utils import derive_seed, make_generator


def class_batches(num_classes: int, num_per_class: int, batch_size: int) -> list[torch.Tensor]:
    """Labels of the whole sample set (class-major: 0,0,...,1,1,...) cut into fixed batches."""
    labels_N = torch.arange(num_classes).repeat_interleave(num_per_class)  # [C * n]
    return list(labels_N.split(batch_size))


def generate_class_balanced(draw: Callable[[torch.Tensor, torch.Generator], torch.Tensor], *,
                            num_classes: int, num_per_class: int, batch_size: int, seed: int,
                            device: torch.device, rank: int = 0, world_size: int = 1,
                            progress: Callable[[int, int], None] | None = None
                            ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Run `draw(labels_B, generator)` on this rank's batches (b = rank, rank + W, ...).

    Returns {batch index: (labels [B], draw's output)} on the CPU; merging the
    dicts of all ranks in batch order gives the same set as one process.
    """
    batches = class_batches(num_classes, num_per_class, batch_size)
    mine = list(range(rank, len(batches), world_size))
    out = {}
    for done, b in enumerate(mine):
        labels_B = batches[b].to(device)
        result = draw(labels_B, make_generator(derive_seed(seed, b), device))
        out[b] = (batches[b], tuple(t.cpu() for t in result) if isinstance(result, tuple) else result.cpu())
        if progress is not None:
            progress(done + 1, len(mine))
    return out


def merge_batches(parts: Sequence[dict]) -> tuple[torch.Tensor, list]:
    """Merge per-rank {batch: (labels, outputs)} into (labels [N], [outputs in batch order])."""
    merged = {}
    for part in parts:
        merged.update(part)
    keys = sorted(merged)
    if keys != list(range(len(keys))):
        raise ArpgError(f"sample batches {sorted(set(range(max(keys) + 1)) - set(keys))} are missing after "
                        "merging the ranks; rerun `arpg sample`")
    return torch.cat([merged[b][0] for b in keys]), [merged[b][1] for b in keys]


def make_draw(decoder: str, generator_model, tokenizer, opts, order: str):
    """labels_B, torch.Generator -> (tokens [B, h, w], uint8 images [B, H, W, C])."""
    from arpg.data.pixels import to_uint8
    from arpg.engine.sampler import generate_arpg, generate_raster

    side = generator_model.config.grid_size

    @torch.inference_mode()
    def draw(labels_B, gen):
        if DECODERS[decoder].parallel:
            tokens_BN = generate_arpg(generator_model, labels_B, steps=opts.steps, cfg=opts.cfg,
                                      cfg_schedule=opts.cfg_schedule, schedule=opts.schedule,
                                      temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                                      order=order, generator=gen, confidence_noise=opts.confidence_noise)
        else:
            tokens_BN = generate_raster(generator_model, labels_B, cfg=opts.cfg, cfg_schedule=opts.cfg_schedule,
                                        temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                                        generator=gen)
        tokens_Bhw = tokens_BN.view(-1, side, side)  # [B, h, w]
        pixels_BHWC = to_uint8(tokenizer.decode(tokens_Bhw)).permute(0, 2, 3, 1)  # [B, H, W, C]
        return tokens_Bhw, pixels_BHWC

    return draw
