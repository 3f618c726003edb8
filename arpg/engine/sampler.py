"""Randomized parallel decoding (ARPG) and the raster baseline's sampler.

Pieces, each usable on its own:
  step_counts        tokens decoded per step for a schedule (spec section 3)
  fixed_order / make_orders   generation orders as permutations of the raster indices
  cfg_weight         guidance scale at a step (linear or constant)
  filter_logits / sample_tokens / mix_guidance   logits to tokens (engine/logits.py)
  strategies         locality, confidence and region orders (engine/strategies.py)
  generate_arpg      MAR-style loop over steps with a preallocated KV cache
  generate_raster    one token per step with the RasterGPT cache
(The class-balanced sample set, cut into seeded batches shared across processes: sample_set.py.)

Every random draw uses the caller's `torch.Generator`, which must live on the
model's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from arpg.engine.logits import filter_logits, mix_guidance, sample_tokens  # noqa: F401 - filter_logits: re-exported
from arpg.engine.strategies import (CONFIDENCE, LOCALITY, REGION_ORDERS, confident_step, locality_orders,
                                    region_order)
from arpg.errors import ArpgError

SCHEDULES = ("arccos", "cosine", "cosine-original", "linear")
CFG_SCHEDULES = ("linear", "constant")
ORDERS = ("random", "raster", "spiral-in", "spiral-out", "z-curve", "alternate",  # fixed or random permutations
          *REGION_ORDERS, LOCALITY, CONFIDENCE)  # decoding strategies (engine/strategies.py)


@dataclass(frozen=True)
class SamplerConfig:
    """Decoding options shared by both samplers (steps only matters to ARPG). No defaults: the study's
    values come from params (`from_params`), a direct caller states every one."""

    steps: int
    cfg: float
    cfg_schedule: str
    schedule: str
    temperature: float
    top_k: int
    top_p: float
    confidence_noise: float  # order "confidence": Gumbel noise on the confidences, annealed to 0 (MaskGIT)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ArpgError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ArpgError(f"unknown cfg schedule {self.cfg_schedule!r}; use one of {', '.join(CFG_SCHEDULES)}")
        if self.cfg < 1.0:
            raise ArpgError(f"guidance scale {self.cfg} < 1; use cfg >= 1 (1 disables guidance)")
        if self.temperature <= 0:
            raise ArpgError(f"temperature {self.temperature} must be > 0")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ArpgError(f"top_k {self.top_k} / top_p {self.top_p} out of range; need top_k >= 0, 0 < top_p <= 1")
        if self.steps < 1:
            raise ArpgError(f"steps {self.steps} must be >= 1")
        if self.confidence_noise < 0:
            raise ArpgError(f"confidence_noise {self.confidence_noise} must be >= 0 (0: no noise)")

    @classmethod
    def from_params(cls, sample: dict, *, steps: int, cfg: float) -> "SamplerConfig":
        """The `sample:` section of params plus the sweep point's steps / cfg."""
        return cls(steps=int(steps), cfg=float(cfg), cfg_schedule=sample["cfg_schedule"],
                   schedule=sample["schedule"], temperature=float(sample["temperature"]),
                   top_k=int(sample["top_k"]), top_p=float(sample["top_p"]),
                   confidence_noise=float(sample["confidence_noise"]))


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

def mask_ratio(schedule: str, step: int, steps: int) -> float:
    """Fraction r(s) of tokens still masked after 0-based step `step` of `steps`."""
    t = (step + 1) / steps
    if schedule == "arccos":
        return math.acos(t) / (math.pi / 2)
    if schedule == "cosine":  # the release's expression, left to right: pi/2 * (s + 1) / N, not pi/2 * t
        return math.cos(math.pi / 2 * (step + 1) / steps)  # (they differ where n * cos is an integer)
    if schedule == "linear":
        return 1.0 - t
    raise ArpgError(f"schedule {schedule!r} has no mask ratio; use one of arccos, cosine, linear")


def step_counts(n: int, steps: int, schedule: str) -> list[int]:
    """Tokens decoded at each of `steps` steps over `n` tokens; sums to n, each >= 1.

    arccos / cosine / linear (MaskGIT style, spec section 3): after step s,
    mask_len = clamp(floor(n * r(s)), lo, n - decoded - 1) tokens stay masked and
    the last step decodes the rest. The spec's lower bound is 1; we use
    max(1, steps - s - 1) so that every remaining step keeps a token (identical to
    the spec whenever the formula already leaves that many, i.e. all but very
    fine step counts).
    cosine-original (the paper): cumulative target after step s is
    min(floor((1 - cos(pi/2 (s+1)/N)) n + 1), n); the step decodes
    target - decoded tokens, at least one, at most what leaves one per remaining step.
    (The release counts the class token inside that target, so its per-step counts
    are one lower and the final step takes the difference.)
    """
    if schedule not in SCHEDULES:
        raise ArpgError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if not 1 <= steps <= n:
        raise ArpgError(f"{steps} steps cannot decode {n} tokens; use 1 <= steps <= {n}")
    counts, decoded = [], 0
    for s in range(steps):
        left_after = steps - s - 1  # steps still to come; each needs >= 1 token
        if left_after == 0:
            k = n - decoded
        elif schedule == "cosine-original":
            target = min(math.floor((1 - math.cos(math.pi / 2 * (s + 1) / steps)) * n + 1), n)
            k = min(max(target - decoded, 1), n - decoded - left_after)
        else:
            mask_len = math.floor(n * mask_ratio(schedule, s, steps))
            mask_len = min(max(mask_len, left_after, 1), n - decoded - 1)
            k = n - decoded - mask_len
        counts.append(k)
        decoded += k
    return counts


def cfg_weight(cfg: float, cfg_schedule: str, decoded_after: int, n: int) -> float:
    """Guidance scale of a step: constant w, or 1 + (w - 1) * decoded_after_step / n."""
    if cfg_schedule == "constant":
        return float(cfg)
    if cfg_schedule == "linear":
        return 1.0 + (float(cfg) - 1.0) * decoded_after / n
    raise ArpgError(f"unknown cfg schedule {cfg_schedule!r}; use one of {', '.join(CFG_SCHEDULES)}")


# --------------------------------------------------------------------------------------------
# Generation orders (permutations of the raster indices r * W + c)
# --------------------------------------------------------------------------------------------

def _spiral_in(h: int, w: int) -> list[int]:
    """Clockwise from the top-left corner, ring by ring towards the centre."""
    top, bottom, left, right = 0, h - 1, 0, w - 1
    out: list[int] = []
    while top <= bottom and left <= right:
        out += [top * w + c for c in range(left, right + 1)]
        out += [r * w + right for r in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [bottom * w + c for c in range(right - 1, left - 1, -1)]
        if left < right:
            out += [r * w + left for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return out


def _morton(r: int, c: int) -> int:
    code = 0
    for bit in range(16):
        code |= ((r >> bit) & 1) << (2 * bit + 1) | ((c >> bit) & 1) << (2 * bit)
    return code


def fixed_order(name: str, h: int, w: int) -> torch.Tensor:
    """A deterministic order [h*w] (int64) by name.

    raster: row by row. spiral-in: clockwise from the outer ring to the centre;
    spiral-out: its reverse. z-curve: Morton order (bits of row and column
    interleaved; for sides that are not powers of two, positions sorted by code).
    alternate: checkerboard, every (r + c) even position in raster order, then the
    odd ones, so the second half always has all four neighbours decoded.
    region-2x2 / region-4x4: PAR's order (engine/strategies.py).
    """
    cells = [(r, c) for r in range(h) for c in range(w)]
    if name == "raster":
        order = list(range(h * w))
    elif name == "spiral-in":
        order = _spiral_in(h, w)
    elif name == "spiral-out":
        order = _spiral_in(h, w)[::-1]
    elif name == "z-curve":
        order = sorted(range(h * w), key=lambda i: _morton(*cells[i]))
    elif name == "alternate":
        order = sorted(range(h * w), key=lambda i: (sum(cells[i]) % 2, i))
    elif name in REGION_ORDERS:
        return region_order(REGION_ORDERS[name], h, w)
    else:
        raise ArpgError(f"unknown order {name!r}; use one of {', '.join(ORDERS)} or an explicit permutation")
    return torch.tensor(order, dtype=torch.long)  # [N]


def make_orders(order: str | torch.Tensor, batch_size: int, h: int, w: int,
                generator: torch.Generator) -> torch.Tensor:
    """Orders [B, N] on the generator's device: `random` draws one permutation per sample."""
    n, device = h * w, generator.device
    if isinstance(order, str) and order in (LOCALITY, CONFIDENCE):
        raise ArpgError(f"order {order!r} is chosen while decoding (from the step counts or the model's "
                        "confidences), not up front; sample with generate_arpg(order=...)")
    if isinstance(order, str) and order == "random":
        return torch.rand(batch_size, n, generator=generator, device=device).argsort(dim=1)  # [B, N]
    if isinstance(order, str):
        return fixed_order(order, h, w).to(device).expand(batch_size, n).contiguous()  # [B, N]
    order = torch.as_tensor(order, dtype=torch.long, device=device)
    if order.dim() == 1:
        order = order.expand(batch_size, -1)
    if order.shape != (batch_size, n):
        raise ArpgError(f"explicit order has shape {tuple(order.shape)}; expected [{n}] or [{batch_size}, {n}]")
    if not torch.equal(order.sort(dim=1).values, torch.arange(n, device=device).expand(batch_size, n)):
        raise ArpgError(f"explicit order is not a permutation of 0..{n - 1} in every row; pass argsort of a key")
    return order.contiguous()  # [B, N]


def _class_ids(model, labels_B: torch.Tensor, guided: bool) -> torch.Tensor:
    """Class ids [B] or, with guidance, [cond; null] ids [2B]."""
    if guided:
        labels_B = torch.cat([labels_B, torch.full_like(labels_B, -1)])  # [2B]
    return model.class_ids(labels_B)


def _check_ready(model, generator: torch.Generator, device: torch.device) -> None:
    if model.training:
        raise ArpgError("sampling needs the model in eval mode (dropout off); call model.eval() first")
    if generator.device.type != device.type:
        raise ArpgError(f"sampling generator is on {generator.device} but the model on {device}; "
                        "create it with arpg.utils.make_generator(seed, device)")


# --------------------------------------------------------------------------------------------
# ARPG: randomized parallel decoding
# --------------------------------------------------------------------------------------------

@dataclass
class Context:
    """Known tokens for zero-shot tasks: `known_BN` marks them in `tokens_BN` (raster order).

    Every sample must have the same number of known positions (the batch decodes in lockstep).
    """

    tokens_BN: torch.Tensor
    known_BN: torch.Tensor


def _context_first(orders_BN: torch.Tensor, known_BN: torch.Tensor) -> torch.Tensor:
    """Reorder so known positions come first (in raster order), unknown ones keep their relative order."""
    B, N = orders_BN.shape
    rank_BN = torch.empty_like(orders_BN).scatter_(
        1, orders_BN, torch.arange(N, device=orders_BN.device).expand(B, N))  # rank of each position
    key_BN = torch.where(known_BN, torch.arange(N, device=orders_BN.device) - N, rank_BN)  # known: negative
    return key_BN.argsort(dim=1)  # [B, N]


@torch.inference_mode()
def generate_arpg(model, labels_B: torch.Tensor, *, steps: int, cfg: float = 1.0, cfg_schedule: str = "linear",
                  schedule: str = "arccos", temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  order: str | torch.Tensor = "random", generator: torch.Generator,
                  context: Context | None = None, grid_size: int | None = None,
                  return_orders: bool = False, confidence_noise: float = 4.5, rope_scale: float = 1.0):
    """Decode token grids with randomized parallel decoding -> tokens [B, N] in raster order.

    The keyword defaults are the release's generate() (arccos, linear guidance), kept so release-parity
    code reads like the release; every study stage passes all of them from params (SamplerConfig).

    Step 0 feeds pass 1 the class (plus any context); each later step feeds only
    the tokens sampled in the step before and queries only this step's target
    positions. With cfg > 1 the batch is doubled [cond; null class] and both
    halves receive the same tokens. `grid_size` > the model's grid decodes a
    larger grid (resolution expansion): RoPE extended past the trained positions, or with
    `rope_scale` < 1 interpolated into them (layers.rope_2d). With `return_orders`,
    also returns the decoding orders [B, N] (context positions first).
    order "locality" builds each step's group from the step counts; "confidence" queries every
    remaining position each step and commits the k most confident draws (Gumbel noise of scale
    confidence_noise * (1 - (s + 1) / steps) on the log-probabilities; 4.5 is MaskGIT's).
    """
    opts = SamplerConfig(steps=steps, cfg=cfg, cfg_schedule=cfg_schedule, schedule=schedule,
                         temperature=temperature, top_k=top_k, top_p=top_p, confidence_noise=confidence_noise)
    strategy = order if isinstance(order, str) and order in (LOCALITY, CONFIDENCE) else None
    device = labels_B.device
    _check_ready(model, generator, device)
    side = grid_size or model.config.grid_size
    B, N = labels_B.shape[0], side * side
    guided = opts.cfg != 1.0
    copies = 2 if guided else 1

    # the strategies choose positions as they go: the raster order holds the place until then
    orders_BN = make_orders("raster" if strategy else order, B, side, side, generator).to(device)  # [B, N]
    tokens_BN = torch.zeros(B, N, dtype=torch.long, device=device)
    n_known = 0
    if context is not None:
        known_BN = context.known_BN.to(device=device, dtype=torch.bool)
        if context.tokens_BN.shape != (B, N) or known_BN.shape != (B, N):
            raise ArpgError(f"context tensors must be [{B}, {N}] for a {side}x{side} grid; got "
                            f"{tuple(context.tokens_BN.shape)} and {tuple(known_BN.shape)}")
        per_sample = known_BN.sum(dim=1)  # [B]
        if not bool((per_sample == per_sample[0]).all()):
            raise ArpgError("context: every sample needs the same number of known tokens; split the batch by mask")
        n_known = int(per_sample[0])
        if n_known >= N:
            raise ArpgError("context: every position is known, nothing to generate; mask some positions")
        orders_BN = _context_first(orders_BN, known_BN)
        tokens_BN = torch.where(known_BN, context.tokens_BN.to(device).long(), tokens_BN)
    n_free = N - n_known
    counts = step_counts(n_free, opts.steps, opts.schedule)
    if strategy == LOCALITY:
        known = known_BN if n_known else None
        orders_BN = locality_orders(counts, side, side, B, generator, known).to(device)  # [B, N]

    # class + every token ever fed (the last step's tokens never are): allocated once, written in place
    cache = model.new_cache(B * copies, max_context=1 + N - counts[-1], grid_size=side, device=device,
                            rope_scale=rope_scale)
    feed_ids = _class_ids(model, labels_B, guided)[:, None]  # [cB, 1]
    feed_pos = torch.full_like(feed_ids, -1)  # [cB, 1]: the class slot
    if n_known:
        model.extend_context(cache, feed_ids, feed_pos)  # the class first, alone, as in training
        known_pos_BK = orders_BN[:, :n_known]  # [B, K]
        feed_pos = known_pos_BK.repeat(copies, 1)  # [cB, K]
        feed_ids = tokens_BN.gather(1, known_pos_BK).repeat(copies, 1)  # [cB, K]

    decoded = n_known
    for s, k in enumerate(counts):
        model.extend_context(cache, feed_ids, feed_pos)
        weight = cfg_weight(opts.cfg, opts.cfg_schedule, decoded + k - n_known, n_free)
        if strategy == CONFIDENCE:
            noise = opts.confidence_noise * (1 - (s + 1) / len(counts))
            pos_BK, new_BK = confident_step(model, cache, orders_BN, decoded, k, weight, noise, opts, generator)
        else:
            pos_BK = orders_BN[:, decoded:decoded + k]  # [B, k]
            logits_BKV = mix_guidance(model.query(cache, pos_BK.repeat(copies, 1)), B, weight)  # [B, k, V]
            new_BK = sample_tokens(logits_BKV, temperature=opts.temperature, top_k=opts.top_k,
                                   top_p=opts.top_p, generator=generator)  # [B, k]
        tokens_BN.scatter_(1, pos_BK, new_BK)
        feed_ids, feed_pos = new_BK.repeat(copies, 1), pos_BK.repeat(copies, 1)  # [cB, k]
        decoded += k
    return (tokens_BN, orders_BN) if return_orders else tokens_BN


# --------------------------------------------------------------------------------------------
# Raster baseline: one token per step
# --------------------------------------------------------------------------------------------

@torch.inference_mode()
def generate_raster(model, labels_B: torch.Tensor, *, cfg: float = 1.0, cfg_schedule: str = "linear",
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    generator: torch.Generator, prefix_BK: torch.Tensor | None = None) -> torch.Tensor:
    """LlamaGen-style decoding with the RasterGPT KV cache -> tokens [B, N] in raster order.

    `prefix_BK`: the first K tokens in raster order (the top rows) are given and kept; they are fed
    with the class in one pass and the remaining N - K are decoded one per step (guidance schedule
    over those N - K, as ARPG's over its unknown tokens)."""
    opts = SamplerConfig(steps=1, cfg=cfg, cfg_schedule=cfg_schedule, schedule=SCHEDULES[0],  # one token a step:
                         temperature=temperature, top_k=top_k, top_p=top_p,  # no step schedule applies
                         confidence_noise=0.0)
    device = labels_B.device
    _check_ready(model, generator, device)
    B, N = labels_B.shape[0], model.config.grid_size ** 2
    K = 0 if prefix_BK is None else prefix_BK.shape[1]
    if prefix_BK is not None and (prefix_BK.shape[0] != B or not 0 < K < N):
        raise ArpgError(f"raster prefix must be [{B}, K] with 0 < K < {N}; got {tuple(prefix_BK.shape)}")
    guided = opts.cfg != 1.0
    copies = 2 if guided else 1

    tokens_BN = torch.empty(B, N, dtype=torch.long, device=device)
    cache = model.new_cache(B * copies, max_context=N, device=device)  # class + N - 1 fed tokens
    positions_N = torch.arange(N, device=device)
    feed_ids = _class_ids(model, labels_B, guided)[:, None]  # [cB, 1]
    feed_pos = torch.full_like(feed_ids, -1)  # [cB, 1]
    if K:
        tokens_BN[:, :K] = prefix_BK
        feed_ids = torch.cat([feed_ids, prefix_BK.to(device).long().repeat(copies, 1)], dim=1)  # [cB, 1 + K]
        feed_pos = torch.cat([feed_pos, positions_N[:K].expand(B * copies, K)], dim=1)  # [cB, 1 + K]
    for i in range(K, N):
        logits_XV = model.extend(cache, feed_ids, feed_pos)[:, -1:]  # [cB, 1, V]
        logits_BV = mix_guidance(logits_XV, B, cfg_weight(opts.cfg, opts.cfg_schedule, i - K + 1, N - K))  # [B, 1, V]
        new_B1 = sample_tokens(logits_BV, temperature=opts.temperature, top_k=opts.top_k,
                               top_p=opts.top_p, generator=generator)  # [B, 1]
        tokens_BN[:, i] = new_B1[:, 0]
        feed_ids = new_B1.repeat(copies, 1)  # [cB, 1]
        feed_pos = positions_N[i].expand(B * copies, 1)  # [cB, 1]
    return tokens_BN
