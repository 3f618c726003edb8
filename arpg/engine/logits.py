"""Logits to tokens: guidance mix, temperature, top-k / top-p, seeded multinomial draws."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then nucleus filtering along the last (vocabulary) dim; any leading dims.

    Removed entries become -inf. top-p keeps the smallest prefix of the sorted
    distribution whose mass reaches top_p (always at least the top token).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)  # [..., V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        remove_sorted = mass_before >= top_p  # the top token has mass_before 0: always kept
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)  # back to vocab order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def sample_tokens(logits_BQV: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator, with_logprob: bool = False):
    """Temperature, top-k / top-p, one multinomial draw per (sample, query) -> tokens [B, Q]
    (and, with_logprob, each draw's log-probability under that distribution, [B, Q])."""
    B, Q, V = logits_BQV.shape
    logits_BQV = filter_logits(logits_BQV.float() / temperature, top_k, top_p)
    probs_MV = logits_BQV.softmax(dim=-1).reshape(B * Q, V)  # [B*Q, V]
    tokens_M1 = torch.multinomial(probs_MV, 1, generator=generator)  # [B*Q, 1]
    if not with_logprob:
        return tokens_M1.view(B, Q)  # [B, Q]
    return tokens_M1.view(B, Q), probs_MV.gather(1, tokens_M1).log().view(B, Q)


def mix_guidance(logits_XQV: torch.Tensor, batch: int, weight: float) -> torch.Tensor:
    """[cond; uncond] -> u + (c - u) * w; passes through when the batch is not doubled."""
    if logits_XQV.shape[0] == batch:
        return logits_XQV
    cond_BQV, uncond_BQV = logits_XQV[:batch], logits_XQV[batch:]
    return uncond_BQV + (cond_BQV - uncond_BQV) * weight  # [B, Q, V]
