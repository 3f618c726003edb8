"""Training-free decoding strategies for ARPG: which positions each step decodes (spec section 3).

ARPG's pass-2 queries are independent of each other and can target any position, so the set a
step decodes can be chosen freely without retraining. Orders here are permutations of the raster
indices r * W + c, consumed step by step in the chunks of `sampler.step_counts`:

  region-2x2 / region-4x4  PAR: the grid cut into 2x2 (4x4) blocks; the same relative position of
                           every block is decoded together (raster inside a block, blocks in raster
                           order), so a step's tokens are a block side apart
  locality                 LPD's principle (Zhang et al., arXiv 2507.01957): within a step, positions
                           far from each other (they are sampled independently) and close to tokens
                           already decoded (strong context); the first step spreads over the grid.
                           Built per sample from the step counts, ties broken by the caller's generator.

  confidence               MaskGIT / MAR: each step queries every remaining position and commits the
                           most confident draws (`confident_step`, called from the sampler's loop).
"""

from __future__ import annotations

import math

import torch

from arpg.engine.logits import mix_guidance, sample_tokens
from arpg.errors import ArpgError

REGION_ORDERS = {"region-2x2": 2, "region-4x4": 4}  # name -> blocks per side
LOCALITY = "locality"
CONFIDENCE = "confidence"
# a tie-break far below every distance difference (distances on the grid differ by >= 0.01)
_TIE_NOISE = 1e-4


def region_order(blocks: int, h: int, w: int) -> torch.Tensor:
    """PAR's order [h*w]: relative position (raster within a block) major, block (raster) minor."""
    if h % blocks or w % blocks:
        raise ArpgError(f"order region-{blocks}x{blocks} needs a grid divisible by {blocks}; the grid is {h}x{w}")
    bh, bw = h // blocks, w // blocks
    order = [(R * bh + r) * w + (C * bw + c)
             for r in range(bh) for c in range(bw) for R in range(blocks) for C in range(blocks)]
    return torch.tensor(order, dtype=torch.long)  # [N]


def grid_distances(h: int, w: int, device=None) -> torch.Tensor:
    """Euclidean distances [N, N] between the cells of an h x w grid (raster indices)."""
    rc_N2 = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2).double()
    diff_NN2 = rc_N2[:, None, :] - rc_N2[None, :, :]
    return diff_NN2.pow(2).sum(-1).sqrt().to(device)  # [N, N], exact (cdist may take a matmul shortcut)


def locality_orders(counts: list[int], h: int, w: int, batch_size: int, generator: torch.Generator,
                    known_BN: torch.Tensor | None = None) -> torch.Tensor:
    """Orders [B, N]: the known positions first (raster order), then each step's group chosen greedily.

    A step of k tokens over `free` undecoded positions aims at a spacing s = sqrt(free / k) (k points
    spread over that area). Each pick maximises  min(distance to this step's picks, s) - distance to
    the nearest decoded token: spread up to s, then as close to the context as possible. With
    nothing decoded yet the second term is 0 for every position, so the first step is a
    farthest-point spread from a random start.
    """
    device = generator.device
    n = h * w
    dist_NN = grid_distances(h, w, device)  # [N, N]
    decoded_BN = (torch.zeros(batch_size, n, dtype=torch.bool, device=device) if known_BN is None
                  else known_BN.to(device=device, dtype=torch.bool).clone())
    if sum(counts) != n - int(decoded_BN[0].sum()):
        raise ArpgError(f"locality order: step counts sum to {sum(counts)}, but {n - int(decoded_BN[0].sum())} "
                        "positions are free")
    big = torch.tensor(float(h + w), dtype=torch.float64, device=device)  # beyond every grid distance
    rows_B = torch.arange(batch_size, device=device)
    near_dec_BN = _nearest(dist_NN, decoded_BN, big)  # [B, N] distance to the nearest decoded token
    raster_BN = torch.arange(n, device=device).expand(batch_size, n)
    picks = [raster_BN.masked_select(decoded_BN).view(batch_size, -1)]  # [B, K]: the known, raster order
    for k in counts:
        # every sample has as many decoded tokens as the others: "none yet" holds for all or none
        attract_BN = near_dec_BN if bool(decoded_BN[0].any()) else torch.zeros_like(near_dec_BN)
        spacing = math.sqrt(int((~decoded_BN[0]).sum()) / k)
        near_sel_BN = torch.full_like(near_dec_BN, float("inf"))  # distance to this step's picks
        noise_BN = torch.rand(batch_size, n, generator=generator, device=device, dtype=torch.float64) * _TIE_NOISE
        step = []
        for _ in range(k):
            score_BN = (near_sel_BN.clamp(max=spacing) - attract_BN + noise_BN).masked_fill(decoded_BN, float("-inf"))
            pick_B = score_BN.argmax(dim=1)  # [B]
            decoded_BN[rows_B, pick_B] = True
            near_sel_BN = torch.minimum(near_sel_BN, dist_NN[pick_B])
            step.append(pick_B)
        step_BK = torch.stack(step, dim=1)  # [B, k]
        near_dec_BN = torch.minimum(near_dec_BN, dist_NN[step_BK].amin(dim=1))
        picks.append(step_BK)
    return torch.cat(picks, dim=1)  # [B, N]


def _nearest(dist_NN: torch.Tensor, decoded_BN: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """Distance [B, N] from every cell to the nearest decoded one (`big` where none is)."""
    return torch.where(decoded_BN[:, None, :], dist_NN[None], big).amin(dim=2)  # [B, N]


def confident_step(model, cache, orders_BN: torch.Tensor, decoded: int, k: int, weight: float, noise: float,
                    opts, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Query every remaining position (pass 2 only; pass 1 holds just the committed tokens), draw a
    token at each, commit the k with the highest log-probability (+ noise * Gumbel). The committed
    positions move to the front of the remaining part of orders_BN (in place), so it stays the
    decoding order. -> positions [B, k], tokens [B, k]."""
    B, N = orders_BN.shape
    rest_BR = orders_BN[:, decoded:]  # [B, R]
    copies = cache.batch_size // B
    logits_BRV = mix_guidance(model.query(cache, rest_BR.repeat(copies, 1)), B, weight)  # [B, R, V]
    drawn_BR, logprob_BR = sample_tokens(logits_BRV, temperature=opts.temperature, top_k=opts.top_k,
                                         top_p=opts.top_p, generator=generator, with_logprob=True)
    if noise > 0:
        u_BR = torch.rand(logprob_BR.shape, generator=generator, device=logprob_BR.device).clamp_(1e-20, 1 - 1e-7)
        logprob_BR = logprob_BR - noise * torch.log(-torch.log(u_BR))  # + noise * Gumbel(0, 1)
    pick_BK = logprob_BR.topk(k, dim=1).indices  # [B, k]
    R = rest_BR.shape[1]
    key_BR = torch.arange(R, device=rest_BR.device).expand(B, R).clone()
    key_BR.scatter_(1, pick_BK, torch.arange(k, device=rest_BR.device).expand(B, k) - R)  # picks first
    orders_BN[:, decoded:] = rest_BR.gather(1, key_BR.argsort(dim=1))
    return orders_BN[:, decoded:decoded + k], drawn_BR.gather(1, pick_BK)
