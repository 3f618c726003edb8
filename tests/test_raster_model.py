"""RasterGPT (LlamaGen-style) against an independent fp64 reference with LlamaGen key names."""

import math

import pytest
import torch
import torch.nn.functional as F

from arpg.models.raster import RasterConfig, RasterGPT
from arpg.models.registry import build_model

V, C, G = 40, 5, 4
N = G * G


def ref_freqs(grid, head_dim, base=10000.0):
    half = head_dim // 2
    inv = base ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)
    ang = torch.stack([torch.cat([(p // grid) * inv, (p % grid) * inv]) for p in range(grid * grid)])
    return torch.cat([torch.zeros(1, half, dtype=torch.complex128), torch.polar(torch.ones_like(ang), ang)])


def ref_rope(x, f):
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * f[None, :, None, :]).flatten(-2)


def ref_norm(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_forward(sd, H, n_layers, tokens, labels):
    """LlamaGen c2i training forward: [class, t0 .. t_{N-2}], causal, logits for every position."""
    B, n = tokens.shape
    cls = sd["cls_embedding.embedding_table.weight"][labels][:, None]
    x = torch.cat([cls, sd["tok_embeddings.weight"][tokens[:, :-1]]], 1)
    dim = x.shape[-1]
    f = ref_freqs(G, dim // H)[:n]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for i in range(n_layers):
        p = f"layers.{i}."
        h = ref_norm(x, sd[p + "attention_norm.weight"])
        q, k, v = (h @ sd[p + "attention.wqkv.weight"].T).split(dim, -1)
        q, k, v = (t.reshape(B, n, H, -1) for t in (q, k, v))
        q, k = ref_rope(q, f), ref_rope(k, f)
        s = torch.einsum("bqhd,bthd->bhqt", q, k) / math.sqrt(dim // H)
        s = s.masked_fill(~causal, float("-inf"))
        y = torch.einsum("bhqt,bthd->bqhd", torch.softmax(s, -1), v).reshape(B, n, dim)
        x = x + y @ sd[p + "attention.wo.weight"].T
        h = ref_norm(x, sd[p + "ffn_norm.weight"])
        a = h @ sd[p + "feed_forward.w1.weight"].T
        x = x + (a * torch.sigmoid(a) * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return ref_norm(x, sd["norm.weight"]) @ sd["output.weight"].T


def small(**kw):
    base = dict(codebook_size=V, num_classes=C, grid_size=G, dim=32, n_heads=4, n_layers=3, ffn_multiple_of=16)
    return RasterConfig(**{**base, **kw})


def randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = (1.0, 0.3) if name.endswith("norm.weight") else (0.0, 0.15)
            p.copy_(scale[0] + scale[1] * torch.randn(p.shape, generator=g))
    return model.eval()


def batch(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, N), generator=g), torch.randint(0, C, (B,), generator=g)


def test_llamagen_l_parameter_count_and_keys():
    with torch.device("meta"):
        model = build_model("LlamaGen-L", codebook_size=16384, num_classes=1000, grid_size=16)
    assert sum(p.numel() for p in model.parameters()) == 342_910_976  # published "343M"
    sd = model.state_dict()
    assert sd["layers.23.attention.wqkv.weight"].shape == (3072, 1024)
    assert sd["cls_embedding.embedding_table.weight"].shape == (1001, 1024)
    assert sd["output.weight"].shape == (16384, 1024)


def test_s_and_t_pairs_share_backbone():
    for a, r in [("ARPG-S", "LlamaGen-S"), ("ARPG-T", "LlamaGen-T"), ("ARPG-L", "LlamaGen-L")]:
        with torch.device("meta"):
            ma = build_model(a, codebook_size=512, num_classes=10, grid_size=8)
            mr = build_model(r, codebook_size=512, num_classes=10, grid_size=8)
        assert (ma.config.dim, ma.config.n_heads) == (mr.config.dim, mr.config.n_heads)
        assert ma.config.n_self_layers + ma.config.n_cross_layers == mr.config.n_layers


def test_forward_and_loss_match_reference():
    model = randomized(RasterGPT(small()))
    tokens, labels = batch()
    logits = model(tokens, labels)
    assert logits.shape == (3, N, V) and logits.dtype == torch.float32
    want = ref_forward({k: v.double() for k, v in model.state_dict().items()}, 4, 3, tokens, labels)
    assert (logits.double() - want).abs().max().item() <= 1e-5
    assert want.abs().max() > 1.0
    assert abs(model.loss(tokens, labels).item() - F.cross_entropy(want.flatten(0, 1), tokens.flatten()).item()) <= 1e-5


def test_null_class_uses_extra_table_row():
    model = randomized(RasterGPT(small()), seed=1)
    tokens, labels = batch(seed=1)
    labels[0] = -1
    assert model.class_ids(labels)[0].item() == model.null_class_id == V + C
    sd = {k: v.double() for k, v in model.state_dict().items()}
    want = ref_forward(sd, 4, 3, tokens, torch.where(labels < 0, C, labels))
    assert (model(tokens, labels).double() - want).abs().max().item() <= 1e-5


def test_causality():
    model = randomized(RasterGPT(small()), seed=2)
    tokens, labels = batch(seed=2, B=1)
    changed = tokens.clone()
    changed[0, 9:] = (changed[0, 9:] + 1) % V
    a, b = model(tokens, labels), model(changed, labels)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_cached_extend_one_token_per_step_equals_forward():
    model = randomized(RasterGPT(small()), seed=3)
    tokens, labels = batch(seed=3)
    B = tokens.shape[0]
    full = model(tokens, labels)
    cache = model.new_cache(B, N)
    ids = torch.cat([model.class_ids(labels)[:, None], tokens[:, :-1]], 1)  # [B, N]
    with torch.no_grad():
        for t in range(N):
            out = model.extend(cache, ids[:, t : t + 1], torch.full((B, 1), t - 1))
            assert (out[:, 0] - full[:, t]).abs().max().item() <= 1e-5, t
    assert cache.length == N


def test_cached_extend_several_tokens_per_call_equals_forward():
    """Prefill (class + 5 tokens at once) then uneven chunks: causal inside each chunk."""
    model = randomized(RasterGPT(small()), seed=4)
    tokens, labels = batch(seed=4, B=2)
    full = model(tokens, labels)
    cache = model.new_cache(2, N)
    ids = torch.cat([model.class_ids(labels)[:, None], tokens[:, :-1]], 1)
    pos = torch.arange(-1, N - 1).expand(2, N)
    outs = []
    with torch.no_grad():
        for a, b in [(0, 6), (6, 7), (7, 11), (11, N)]:
            outs.append(model.extend(cache, ids[:, a:b], pos[:, a:b]))
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="cache full"):
        model.extend(cache, ids[:, :1], pos[:, :1])


def test_kv_cache_bytes_and_embed():
    model = RasterGPT(small())
    cache = model.new_cache(2, N)
    assert model.kv_cache_bytes(2, torch.float32) == (cache.k.numel() + cache.v.numel()) * 4
    ids = torch.tensor([[0, V - 1, V, V + C]])
    e = model.embed(ids)
    table = model.cls_embedding.embedding_table.weight
    assert torch.equal(e[0, 1], model.tok_embeddings.weight[V - 1])
    assert torch.equal(e[0, 2], table[0]) and torch.equal(e[0, 3], table[C])


def test_arpg_cache_smaller_than_raster_at_same_size():
    with torch.device("meta"):
        a = build_model("ARPG-L", codebook_size=16384, num_classes=1000, grid_size=16)
        r = build_model("LlamaGen-L", codebook_size=16384, num_classes=1000, grid_size=16)
    assert a.kv_cache_bytes(1) * 24 == r.kv_cache_bytes(1) * 13  # 12 + 1 shared vs 24 layers


def test_every_parameter_gets_a_gradient():
    model = randomized(RasterGPT(small()), seed=5).train()
    tokens, labels = batch(seed=5)
    model.loss(tokens, labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
