"""Llama-style building blocks shared by the ARPG and raster models (spec section 2).

Conventions: x_BTC activations, q/k/v_BHTD for attention, cos/sin tables [rows, head_dim // 2].
A position is an int in [-1, H*W): -1 is the class token (RoPE slot 0), p >= 0 the raster index
on the grid (RoPE slot p + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F



CLASS_ROPE = ("zero", "anchor")


@dataclass
class BackboneConfig:
    """Fields shared by ARPG and the raster GPT: one backbone, two decoders."""

    codebook_size: int = 16384
    num_classes: int = 1000
    grid_size: int = 16
    dim: int = 1024
    n_heads: int = 16
    ffn_multiple_of: int = 256
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    attn_dropout: float = 0.0
    # RoPE of the class token: "zero" as released (its q and k are zeroed, so attention to it
    # carries no position); "anchor" rotates it as a virtual grid cell (-1, -1), which gives every
    # query an absolute reference (see rope_2d). Released weights need "zero".
    class_rope: str = "zero"

    def __post_init__(self):
        if self.class_rope not in CLASS_ROPE:
            raise ValueError(f"class_rope {self.class_rope!r}: use one of {', '.join(CLASS_ROPE)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ValueError(
                f"dim {self.dim} / n_heads {self.n_heads} must give a head dim divisible by 4 (2D RoPE)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def seq_len(self) -> int:
        return self.grid_size * self.grid_size

def ffn_hidden_size(dim: int, multiple_of: int) -> int:
    """SwiGLU hidden size of the release: int(8 * dim / 3) rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    return -(-hidden // multiple_of) * multiple_of


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (bf16 mean-square loses precision), scale in the input dtype like the release
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), then dropout."""

    def __init__(self, dim: int, multiple_of: int, dropout: float = 0.0):
        super().__init__()
        hidden = ffn_hidden_size(dim, multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x_BTC: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x_BTC)) * self.w3(x_BTC)))


class PreNormBlock(nn.Module):
    """x + attn(norm(x), ...), then + ffn(norm(h)): the residual block of both decoders. Its four parts
    are registered under the names of the release's state dict (ARPG: attn / ffn / attn_norm /
    ffn_norm; LlamaGen: attention / feed_forward / attention_norm / ffn_norm), in that order."""

    def __init__(self, attn: nn.Module, ffn: nn.Module, dim: int, eps: float,
                 names: tuple[str, str, str, str] = ("attn", "ffn", "attn_norm", "ffn_norm")):
        super().__init__()
        self._parts = names
        for name, part in zip(names, (attn, ffn, RMSNorm(dim, eps), RMSNorm(dim, eps))):
            self.add_module(name, part)

    def forward(self, x_BTC, *attn_args, **attn_kwargs):
        attn, ffn, attn_norm, ffn_norm = (self._modules[n] for n in self._parts)
        h_BTC = x_BTC + attn(attn_norm(x_BTC), *attn_args, **attn_kwargs)
        return h_BTC + ffn(ffn_norm(h_BTC))


def rope_2d(grid_h: int, grid_w: int, head_dim: int, base: float = 10000.0,
            class_rope: str = "zero", scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [1 + grid_h * grid_w, head_dim // 2] (fp32).

    scale: row and column indices are multiplied by it (position interpolation: a grid k times the
    training grid with scale 1/k keeps every angle in the trained range, cell (k r, k c) at exactly
    the angles of trained cell (r, c)); the class slot keeps its own angles.

    Pairs 0 .. head_dim/4 - 1 rotate with the row index, the rest with the column index, each half
    over head_dim/4 frequencies base^(-2j / (head_dim/2)). Row 0 is the class slot: all zeros for
    class_rope="zero" (the release zeroes the class token's q and k; its weights depend on it), the
    angles of cell (-1, -1) for "anchor". RoPE only sees relative offsets, so with "zero" a query
    learns where it is only from the tokens already decoded; an anchored class key tells every
    query its offset from a fixed corner, i.e. its absolute position (docs/DESIGN.md has the
    measured effect on the embedded default).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs_F = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.float32)[: half // 2] / half))  # [hd/4]
    rows_R = torch.arange(grid_h, dtype=torch.float64).mul(scale).float()
    cols_W = torch.arange(grid_w, dtype=torch.float64).mul(scale).float()
    ang_row_RF = torch.outer(rows_R, freqs_F)  # [H, hd/4]
    ang_col_WF = torch.outer(cols_W, freqs_F)  # [W, hd/4]
    ang_HWK = torch.cat(
        [ang_row_RF[:, None, :].expand(grid_h, grid_w, -1), ang_col_WF[None, :, :].expand(grid_h, grid_w, -1)],
        dim=-1,
    )  # [H, W, hd/2]
    ang_PK = ang_HWK.reshape(grid_h * grid_w, half)  # [H*W, hd/2] raster order
    if class_rope == "zero":
        cos_1K = sin_1K = torch.zeros(1, half)
    elif class_rope == "anchor":
        ang_1K = -torch.cat([freqs_F, freqs_F])[None]  # row -1, column -1
        cos_1K, sin_1K = torch.cos(ang_1K), torch.sin(ang_1K)
    else:
        raise ValueError(f"class_rope {class_rope!r}: use one of {', '.join(CLASS_ROPE)}")
    cos = torch.cat([cos_1K, torch.cos(ang_PK)])  # [1 + H*W, hd/2]
    sin = torch.cat([sin_1K, torch.sin(ang_PK)])  # [1 + H*W, hd/2]
    return cos, sin


@dataclass(kw_only=True)
class KVCache:
    """Preallocated decoding state for one batch, written in place; `length` positions are filled.
    k, v: [n_layers, B, H, S, D] per-layer keys/values; cos, sin: the RoPE tables its positions use."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]


def cache_placement(weight: torch.Tensor, device=None, dtype=None) -> tuple[torch.device, torch.dtype]:
    """Where a model's cache lives: beside its weights and in their dtype, unless asked otherwise."""
    return (weight.device if device is None else torch.device(device)), (weight.dtype if dtype is None else dtype)


class RopeTables:
    """fp32 (cos, sin) of a square grid, memoised per (grid, device, position scale): an explicit
    cache beside the model, kept out of its state dict and out of .to(dtype) (released weights carry
    no table; bf16 angles would lose precision)."""

    def __init__(self, cfg: BackboneConfig):
        self.cfg = cfg
        self._tables: dict[tuple[int, str, float], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, grid_size: int, device, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        key = (int(grid_size), str(device), float(scale))
        if key not in self._tables:
            cfg = self.cfg
            cos, sin = rope_2d(grid_size, grid_size, cfg.head_dim, cfg.rope_base, cfg.class_rope, scale)
            self._tables[key] = (cos.to(device), sin.to(device))
        return self._tables[key]


def rope_lookup(cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows for positions in [-1, rows - 1): returns cos, sin of shape [*pos.shape, hd/2]."""
    slot = pos + 1  # class (-1) -> slot 0
    return cos[slot], sin[slot]


def apply_rope(x_BTHD: torch.Tensor, cos_BTK: torch.Tensor, sin_BTK: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by the angle of pair i; computed in fp32.

    cos/sin are [B, T, hd/2] or [T, hd/2] (broadcast over batch).
    """
    B, T, H, D = x_BTHD.shape
    x_BTHK2 = x_BTHD.float().reshape(B, T, H, D // 2, 2)
    x0, x1 = x_BTHK2[..., 0], x_BTHK2[..., 1]  # [B, T, H, hd/2] each
    c = cos_BTK.unsqueeze(-2).float()  # [(B,) T, 1, hd/2]
    s = sin_BTK.unsqueeze(-2).float()
    out_BTHK2 = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)  # [B, T, H, hd/2, 2]
    return out_BTHK2.reshape(B, T, H, D).type_as(x_BTHD)


def split_heads(x_BTC: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, C = x_BTC.shape
    return x_BTC.view(B, T, n_heads, C // n_heads)  # [B, T, H, D]


def merge_heads(y_BHTD: torch.Tensor) -> torch.Tensor:
    B, H, T, D = y_BHTD.shape
    return y_BHTD.transpose(1, 2).reshape(B, T, H * D)  # [B, T, C]


def cache_write_attend(
    q_BHQD: torch.Tensor,
    k_BHTD: torch.Tensor,
    v_BHTD: torch.Tensor,
    k_cache_BHSD: torch.Tensor,
    v_cache_BHSD: torch.Tensor,
    start: int,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write T new keys/values at [start, start + T) of preallocated buffers (in place) and attend
    over the filled prefix. attn_mask (bool [Q, start + T], True = visible) or None for full view."""
    end = start + k_BHTD.shape[2]
    if end > k_cache_BHSD.shape[2]:
        raise ValueError(f"KV cache overflow: {end} positions > capacity {k_cache_BHSD.shape[2]}")
    k_cache_BHSD[:, :, start:end] = k_BHTD
    v_cache_BHSD[:, :, start:end] = v_BHTD
    return attend(q_BHQD, k_cache_BHSD[:, :, :end], v_cache_BHSD[:, :, :end], attn_mask)  # [B, H, Q, D]


def self_attend(q_BHTD, k_BHTD, v_BHTD, cache=None, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention over the sequence (cache None: training, prefill), or the new tokens against
    a decoding cache (k_cache, v_cache, start[, mask]) that they are first written into."""
    if cache is None:
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True, dropout_p=dropout_p)
    return cache_write_attend(q_BHTD, k_BHTD, v_BHTD, *cache)  # [B, H, T, D]


def attend(q_BHQD, k_BHLD, v_BHLD, attn_mask=None, is_causal=False, dropout_p=0.0) -> torch.Tensor:
    """SDPA; a cache kept in another dtype than the activations (e.g. bf16 cache, fp32 model) is read
    as is and the few queries are cast to it, so no per-step copy of the cache is made."""
    y_BHQD = F.scaled_dot_product_attention(
        q_BHQD.to(k_BHLD.dtype), k_BHLD, v_BHLD, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p
    )
    return y_BHQD.to(q_BHQD.dtype)


def block_causal_mask(start: int, new: int, device=None) -> torch.Tensor:
    """Bool [new, start + new]: the j-th new token sees every cached key and new keys 0..j."""
    key_idx = torch.arange(start + new, device=device)
    query_idx = start + torch.arange(new, device=device)
    return key_idx[None, :] <= query_idx[:, None]  # [new, start + new]


def add_output_head(model: nn.Module, cfg: BackboneConfig, head_name: str, generator: torch.Generator | None) -> None:
    """What both backbones end with: the final RMSNorm (`norm`), the bias-free vocabulary head under
    its release's name, the RoPE tables; then every weight drawn N(0, 0.02) and the head zeroed."""
    model.norm = RMSNorm(cfg.dim, cfg.norm_eps)
    model.add_module(head_name, nn.Linear(cfg.dim, cfg.codebook_size, bias=False))
    model.output_head_name = head_name  # the layer whose output is the logits (cpu_kernels keeps it fp32)
    model.rope_tables = RopeTables(cfg)  # (grid, device) -> fp32 (cos, sin); may exceed the training grid
    init_weights(model, 0.02, generator)
    nn.init.zeros_(getattr(model, head_name).weight)


def init_weights(module: nn.Module, std: float = 0.02, generator: torch.Generator | None = None) -> None:
    """Release init: Linear and Embedding weights N(0, std), biases zero (norms keep their ones).
    Draws from `generator` (a dedicated stream) when given; the caller zeroes the head after."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            if m.weight.is_meta:  # shape-only build (parameter counting): nothing to draw
                continue
            nn.init.normal_(m.weight, mean=0.0, std=std, generator=generator)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
