"""The ARPG two-pass transformer (spec section 2), in the released checkpoint key layout.

Pass 1 ("self decoder"): causal Llama blocks over [class, content tokens]. Its output goes through
one RMSNorm and one global to_k / to_v pair: the shared K/V read by every pass-2 block. Pass 2
("cross decoder"): [MASK] queries carrying RoPE at their *target* positions cross-attend to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from arpg.models.layers import (BackboneConfig, FeedForward, KVCache, PreNormBlock, RMSNorm, add_output_head,
                                apply_rope, attend, cache_placement, merge_heads, rope_lookup, self_attend,
                                split_heads)


@dataclass
class ARPGConfig(BackboneConfig):
    n_self_layers: int = 12
    n_cross_layers: int = 12


class _Attention(nn.Module):
    """Heads, dropouts and the named bias-free projections, registered in the order given (it fixes
    the state-dict keys and which init draws each weight gets)."""

    def __init__(self, cfg: ARPGConfig, projections: tuple[str, ...]):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.attn_dropout = cfg.attn_dropout
        for name in projections:
            self.add_module(name, nn.Linear(cfg.dim, cfg.dim, bias=False))
        self.proj_drop = nn.Dropout(cfg.resid_dropout)

    @property
    def dropout_p(self) -> float:
        return self.attn_dropout if self.training else 0.0


class SelfAttention(_Attention):
    def __init__(self, cfg: ARPGConfig):
        super().__init__(cfg, ("to_q", "to_k", "to_v", "proj"))

    def qkv(self, x_BTC, cos, sin):
        q_BTHD = apply_rope(split_heads(self.to_q(x_BTC), self.n_heads), cos, sin)
        k_BTHD = apply_rope(split_heads(self.to_k(x_BTC), self.n_heads), cos, sin)
        v_BTHD = split_heads(self.to_v(x_BTC), self.n_heads)
        return q_BTHD.transpose(1, 2), k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2)  # [B, H, T, D] each

    def forward(self, x_BTC, cos, sin, cache=None):
        """cache: None (causal over x) or (k_cache, v_cache, start) for incremental decoding."""
        q, k, v = self.qkv(x_BTC, cos, sin)
        y_BHTD = self_attend(q, k, v, cache, self.dropout_p)  # with a cache: no mask, new tokens see each other
        return self.proj_drop(self.proj(merge_heads(y_BHTD)))


class CrossAttention(_Attention):
    """Only to_q and proj: keys/values are the shared pass-1 K/V."""

    def __init__(self, cfg: ARPGConfig):
        super().__init__(cfg, ("to_q", "proj"))

    def forward(self, x_BQC, k_BHTD, v_BHTD, cos, sin, causal: bool):
        q_BHQD = apply_rope(split_heads(self.to_q(x_BQC), self.n_heads), cos, sin).transpose(1, 2)
        y_BHQD = attend(q_BHQD, k_BHTD, v_BHTD, is_causal=causal, dropout_p=self.dropout_p)
        return self.proj_drop(self.proj(merge_heads(y_BHQD)))


class SelfDecoder(PreNormBlock):
    def __init__(self, cfg: ARPGConfig):  # forward(x_BTC, cos, sin, cache=None)
        super().__init__(SelfAttention(cfg), FeedForward(cfg.dim, cfg.ffn_multiple_of, cfg.ffn_dropout),
                         cfg.dim, cfg.norm_eps)


class CrossDecoder(PreNormBlock):
    def __init__(self, cfg: ARPGConfig):  # forward(q_BQC, k_BHTD, v_BHTD, cos, sin, causal)
        super().__init__(CrossAttention(cfg), FeedForward(cfg.dim, cfg.ffn_multiple_of, cfg.ffn_dropout),
                         cfg.dim, cfg.norm_eps)


class TwoPass(nn.Module):
    """Container named like the release's `layers` (self_dec, cross_dec, norm, to_k, to_v)."""

    def __init__(self, cfg: ARPGConfig):
        super().__init__()
        self.self_dec = nn.ModuleList([SelfDecoder(cfg) for _ in range(cfg.n_self_layers)])
        self.cross_dec = nn.ModuleList([CrossDecoder(cfg) for _ in range(cfg.n_cross_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.to_k = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.to_v = nn.Linear(cfg.dim, cfg.dim, bias=False)


@dataclass(kw_only=True)
class ARPGCache(KVCache):
    """KVCache of the pass-1 layers (k, v: [n_self_layers, B, H, S, D]) plus the shared pass-2 K/V
    (shared_k, shared_v: [B, H, S, D]); cos, sin are for grid_size (may exceed the training grid)."""

    shared_k: torch.Tensor
    shared_v: torch.Tensor
    grid_size: int


class ARPG(nn.Module):
    def __init__(self, config: ARPGConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = cfg = config
        self.mask_id = cfg.codebook_size
        self.null_class_id = cfg.codebook_size + 1 + cfg.num_classes
        # rows: codebook, [MASK], classes, null class, one unused row (kept: released weights have it)
        self.embeddings = nn.Embedding(cfg.codebook_size + 1 + cfg.num_classes + 2, cfg.dim)
        self.embed_drop = nn.Dropout(cfg.token_dropout)
        self.layers = TwoPass(cfg)
        add_output_head(self, cfg, "head", generator)  # norm, head

    def linear_groups(self) -> dict[str, list[nn.Linear]]:
        """The linear layers a decoding step runs, by whose rows they see: the tokens fed in (pass 1
        and the shared K/V) and the queries decoded (pass 2 and the head)."""
        def linears(*modules):
            return [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]
        return {"feed": linears(self.layers.self_dec, self.layers.to_k, self.layers.to_v),
                "query": linears(self.layers.cross_dec, getattr(self, self.output_head_name))}

    @staticmethod
    def step_tokens(counts: list[int]) -> list[dict[str, int]]:
        """Tokens per linear group at each step that decodes counts[s]: step 0 feeds the class, step s
        the tokens of step s - 1 (the last step's are never fed)."""
        return [{"feed": fed, "query": k} for fed, k in zip([1] + counts[:-1], counts)]

    @staticmethod
    def token_space(sd: dict) -> tuple[int | None, int | None]:
        """codebook_size, num_classes from a state dict's shapes (None where the keys are absent)."""
        head, emb = sd.get("head.weight"), sd.get("embeddings.weight")
        if head is None or emb is None:
            return None, None
        return head.shape[0], emb.shape[0] - head.shape[0] - 3  # rows = V + [MASK] + classes + null + unused

    # ---- ids -------------------------------------------------------------------------------
    def class_ids(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Embedding row of each label; label -1 (dropped) -> the null class."""
        return torch.where(labels_B < 0, self.null_class_id, labels_B + self.config.codebook_size + 1)

    # ---- shared pieces -----------------------------------------------------------------------
    def _shared_kv(self, x_BTC, cos, sin):
        xn_BTC = self.layers.norm(x_BTC)
        H = self.config.n_heads
        k_BTHD = apply_rope(split_heads(self.layers.to_k(xn_BTC), H), cos, sin)  # RoPE at own position
        v_BTHD = split_heads(self.layers.to_v(xn_BTC), H)  # V gets none
        return k_BTHD.transpose(1, 2), v_BTHD.transpose(1, 2)  # [B, H, T, D]

    def _mask_queries(self, B: int, Q: int) -> torch.Tensor:
        # a broadcast view of the [MASK] row: no gather; no dropout on queries (as released)
        return self.embeddings.weight[self.mask_id].expand(B, Q, -1)  # [B, Q, C]

    def _head(self, q_BQC) -> torch.Tensor:
        return self.head(self.norm(q_BQC)).float()  # [B, Q, V] fp32

    # ---- training (teacher forcing) ----------------------------------------------------------
    def forward(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor, orders_BN: torch.Tensor) -> torch.Tensor:
        """logits[:, i] predicts tokens_BN.gather(1, orders_BN)[:, i] from class + tokens at orders[:, :i]."""
        B, N = tokens_BN.shape
        cfg = self.config
        if N != cfg.seq_len:
            raise ValueError(f"ARPG built for a {cfg.grid_size}x{cfg.grid_size} grid ({cfg.seq_len} tokens), got {N}")
        shuffled_BN = tokens_BN.gather(1, orders_BN)  # targets in generation order
        ids_BN = torch.cat([self.class_ids(labels_B)[:, None], shuffled_BN[:, :-1]], dim=1)  # [B, N]
        cls_pos_B1 = torch.full((B, 1), -1, dtype=orders_BN.dtype, device=orders_BN.device)
        pos_in_BN = torch.cat([cls_pos_B1, orders_BN[:, :-1]], dim=1)  # [B, N] content positions
        cos, sin = self.rope_tables(cfg.grid_size, tokens_BN.device)
        cos_in, sin_in = rope_lookup(cos, sin, pos_in_BN)  # [B, N, hd/2]
        cos_q, sin_q = rope_lookup(cos, sin, orders_BN)  # [B, N, hd/2] at the targets

        x_BNC = self.embed_drop(self.embeddings(ids_BN))
        for block in self.layers.self_dec:
            x_BNC = block(x_BNC, cos_in, sin_in)
        k_BHND, v_BHND = self._shared_kv(x_BNC, cos_in, sin_in)
        q_BNC = self._mask_queries(B, N)
        for block in self.layers.cross_dec:
            # query i sees class + tokens pi_0 .. pi_{i-1}: causal over N queries x N keys
            q_BNC = block(q_BNC, k_BHND, v_BHND, cos_q, sin_q, causal=True)
        return self._head(q_BNC)  # [B, N, V]

    def loss(self, tokens_BN, labels_B, orders_BN) -> torch.Tensor:
        logits_BNV = self(tokens_BN, labels_B, orders_BN)
        targets_BN = tokens_BN.gather(1, orders_BN)
        return F.cross_entropy(logits_BNV.flatten(0, 1), targets_BN.flatten())

    # ---- incremental decoding -----------------------------------------------------------------
    def new_cache(self, batch_size: int, max_context: int, grid_size: int | None = None, device=None, dtype=None,
                  rope_scale: float = 1.0):
        """Allocate the whole cache once. grid_size: RoPE grid (default: the training grid);
        rope_scale: its positions' scale (layers.rope_2d; 1 / k interpolates a k-times larger grid)."""
        cfg = self.config
        device, dtype = cache_placement(self.head.weight, device, dtype)
        grid = cfg.grid_size if grid_size is None else int(grid_size)
        cos, sin = self.rope_tables(grid, device, rope_scale)
        shape = (batch_size, cfg.n_heads, max_context, cfg.head_dim)
        return ARPGCache(
            k=torch.empty((cfg.n_self_layers, *shape), device=device, dtype=dtype),
            v=torch.empty((cfg.n_self_layers, *shape), device=device, dtype=dtype),
            shared_k=torch.empty(shape, device=device, dtype=dtype),
            shared_v=torch.empty(shape, device=device, dtype=dtype),
            cos=cos,
            sin=sin,
            grid_size=grid,
        )

    def extend_context(self, cache: ARPGCache, ids_BT: torch.Tensor, pos_BT: torch.Tensor) -> None:
        """Pass 1 over T new content tokens; appends their per-layer K/V and the shared K/V."""
        start, T = cache.length, ids_BT.shape[1]
        if start + T > cache.capacity:
            raise ValueError(f"ARPG cache full: {start} + {T} tokens > max_context {cache.capacity}")
        cos, sin = rope_lookup(cache.cos, cache.sin, pos_BT)  # [B, T, hd/2]
        x_BTC = self.embed_drop(self.embeddings(ids_BT))
        for i, block in enumerate(self.layers.self_dec):
            x_BTC = block(x_BTC, cos, sin, cache=(cache.k[i], cache.v[i], start))
        k_BHTD, v_BHTD = self._shared_kv(x_BTC, cos, sin)
        cache.shared_k[:, :, start : start + T] = k_BHTD
        cache.shared_v[:, :, start : start + T] = v_BHTD
        cache.length = start + T

    def query(self, cache: ARPGCache, pos_BQ: torch.Tensor) -> torch.Tensor:
        """Pass 2: [MASK] queries at target positions over every cached token -> logits [B, Q, V] fp32."""
        B, Q = pos_BQ.shape
        L = cache.length
        cos, sin = rope_lookup(cache.cos, cache.sin, pos_BQ)  # [B, Q, hd/2]
        k_BHLD, v_BHLD = cache.shared_k[:, :, :L], cache.shared_v[:, :, :L]
        q_BQC = self._mask_queries(B, Q)
        for block in self.layers.cross_dec:
            q_BQC = block(q_BQC, k_BHLD, v_BHLD, cos, sin, causal=False)  # queries never see each other
        return self._head(q_BQC)

    def kv_cache_bytes(self, batch_size: int, dtype=torch.float32, max_context: int | None = None) -> int:
        """Bytes new_cache allocates; default context = class + the N-1 tokens ever fed for one image."""
        cfg = self.config
        S = cfg.seq_len if max_context is None else max_context
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * (cfg.n_self_layers + 1) * batch_size * cfg.n_heads * S * cfg.head_dim * itemsize
