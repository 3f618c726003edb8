"""Raster-order baseline: a LlamaGen-style class-conditional GPT on the same Llama blocks as ARPG.

Key layout is LlamaGen's (tok_embeddings, cls_embedding.embedding_table, layers.{i}.attention.
{wqkv,wo}, feed_forward.{w1,w2,w3}, attention_norm, ffn_norm, norm, output), so released LlamaGen
c2i weights load as they are. Ids share one space like ARPG's: [0, V) image tokens, V + c class c,
V + num_classes the null class (LlamaGen's extra class-table row).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from arpg.models.layers import (BackboneConfig, FeedForward, KVCache, PreNormBlock, add_output_head,
                                apply_rope, block_causal_mask, cache_placement, merge_heads, rope_lookup,
                                self_attend, split_heads)


@dataclass
class RasterConfig(BackboneConfig):
    n_layers: int = 24


class Attention(nn.Module):
    """Causal self-attention with LlamaGen's fused wqkv (same maths as ARPG's to_q/to_k/to_v)."""

    def __init__(self, cfg: RasterConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dim = cfg.dim
        self.attn_dropout = cfg.attn_dropout
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.resid_dropout)

    def forward(self, x_BTC, cos, sin, cache=None):
        """cache: None (causal over x) or (k_cache, v_cache, start, mask_or_None)."""
        q_BTC, k_BTC, v_BTC = self.wqkv(x_BTC).split(self.dim, dim=-1)
        q = apply_rope(split_heads(q_BTC, self.n_heads), cos, sin).transpose(1, 2)  # [B, H, T, D]
        k = apply_rope(split_heads(k_BTC, self.n_heads), cos, sin).transpose(1, 2)  # [B, H, T, D]
        v = split_heads(v_BTC, self.n_heads).transpose(1, 2)  # [B, H, T, D]
        y_BHTD = self_attend(q, k, v, cache, self.attn_dropout if self.training else 0.0)
        return self.resid_dropout(self.wo(merge_heads(y_BHTD)))


class TransformerBlock(PreNormBlock):
    def __init__(self, cfg: RasterConfig):  # forward(x_BTC, cos, sin, cache=None)
        super().__init__(Attention(cfg), FeedForward(cfg.dim, cfg.ffn_multiple_of, cfg.ffn_dropout),
                         cfg.dim, cfg.norm_eps, names=("attention", "feed_forward", "attention_norm", "ffn_norm"))


class LabelEmbedder(nn.Module):
    """LlamaGen's class table: num_classes rows + one null row (classifier-free guidance)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class RasterCache(KVCache):
    """KVCache of the raster model's layers (k, v: [n_layers, B, H, S, D])."""


class RasterGPT(nn.Module):
    def __init__(self, config: RasterConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = cfg = config
        self.null_class_id = cfg.codebook_size + cfg.num_classes
        self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.codebook_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        add_output_head(self, cfg, "output", generator)  # norm, output (LlamaGen's names)

    def linear_groups(self) -> dict[str, list[nn.Linear]]:
        """The linear layers a decoding step runs: all of them, on the one token fed per sample."""
        return {"feed": [m for m in self.modules() if isinstance(m, nn.Linear)]}

    @staticmethod
    def step_tokens(counts: list[int]) -> list[dict[str, int]]:
        """One token per step (the class, then each decoded token): counts are all 1."""
        if any(k != 1 for k in counts):
            raise ValueError(f"raster decoding takes one token per step, not {sorted(set(counts))}")
        return [{"feed": 1} for _ in counts]

    @staticmethod
    def token_space(sd: dict) -> tuple[int | None, int | None]:
        """codebook_size, num_classes from a state dict's shapes (None where the keys are absent)."""
        head, cls = sd.get("output.weight"), sd.get("cls_embedding.embedding_table.weight")
        if head is None or cls is None:
            return None, None
        return head.shape[0], cls.shape[0] - 1  # rows = classes + null

    def class_ids(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Id of each label's class token; label -1 (dropped) -> the null class."""
        return torch.where(labels_B < 0, self.null_class_id, labels_B + self.config.codebook_size)

    def embed(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Look ids up in the token or class table (ids >= codebook_size are classes)."""
        V = self.config.codebook_size
        is_cls_BT1 = (ids_BT >= V).unsqueeze(-1)
        tok_BTC = self.tok_embeddings(ids_BT.clamp(max=V - 1))
        cls_BTC = self.cls_embedding.embedding_table((ids_BT - V).clamp(min=0))
        return torch.where(is_cls_BT1, cls_BTC, tok_BTC)  # [B, T, C]

    def forward(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """logits[:, i] predicts tokens[:, i] from class + tokens[:, :i] (raster order)."""
        B, N = tokens_BN.shape
        cfg = self.config
        if N != cfg.seq_len:
            raise ValueError(f"RasterGPT built for a {cfg.grid_size}x{cfg.grid_size} grid ({cfg.seq_len} tokens), "
                             f"got {N}")
        cls_BC = self.cls_embedding.embedding_table(self.class_ids(labels_B) - cfg.codebook_size)
        tok_BTC = self.tok_embeddings(tokens_BN[:, :-1])  # [B, N-1, C]
        x_BNC = self.tok_dropout(torch.cat([cls_BC[:, None], tok_BTC], dim=1))  # [B, N, C]
        cos, sin = self.rope_tables(self.config.grid_size, tokens_BN.device)
        cos_N, sin_N = cos[:N], sin[:N]  # slot 0 class, then token t at its own position t
        for block in self.layers:
            x_BNC = block(x_BNC, cos_N, sin_N)
        return self.output(self.norm(x_BNC)).float()  # [B, N, V]

    def loss(self, tokens_BN, labels_B) -> torch.Tensor:
        logits_BNV = self(tokens_BN, labels_B)
        return F.cross_entropy(logits_BNV.flatten(0, 1), tokens_BN.flatten())

    def new_cache(self, batch_size: int, max_context: int, device=None, dtype=None) -> RasterCache:
        cfg = self.config
        device, dtype = cache_placement(self.output.weight, device, dtype)
        shape = (cfg.n_layers, batch_size, cfg.n_heads, max_context, cfg.head_dim)
        cos, sin = self.rope_tables(self.config.grid_size, device)
        return RasterCache(
            k=torch.empty(shape, device=device, dtype=dtype),
            v=torch.empty(shape, device=device, dtype=dtype),
            cos=cos,
            sin=sin,
        )

    def extend(self, cache: RasterCache, ids_BT: torch.Tensor, pos_BT: torch.Tensor) -> torch.Tensor:
        """Feed T tokens (causal among themselves); logits at each predict the next raster token."""
        start, T = cache.length, ids_BT.shape[1]
        if start + T > cache.capacity:
            raise ValueError(f"raster cache full: {start} + {T} tokens > max_context {cache.capacity}")
        cos, sin = rope_lookup(cache.cos, cache.sin, pos_BT)  # [B, T, hd/2]
        mask = None if T == 1 else block_causal_mask(start, T, ids_BT.device)  # one token sees all
        x_BTC = self.tok_dropout(self.embed(ids_BT))
        for i, block in enumerate(self.layers):
            x_BTC = block(x_BTC, cos, sin, cache=(cache.k[i], cache.v[i], start, mask))
        cache.length = start + T
        return self.output(self.norm(x_BTC)).float()  # [B, T, V]

    def kv_cache_bytes(self, batch_size: int, dtype=torch.float32, max_context: int | None = None) -> int:
        """Bytes new_cache allocates; default context = class + the N-1 tokens fed for one image."""
        cfg = self.config
        S = cfg.seq_len if max_context is None else max_context
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * batch_size * cfg.n_heads * S * cfg.head_dim * itemsize
