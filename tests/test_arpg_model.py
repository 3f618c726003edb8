"""ARPG against an independent functional reference of the released forward pass.

The reference below reads a state dict with the release's key names and uses complex-number RoPE,
einsum attention with explicit masks and fp64 arithmetic; it shares no code with arpg.models.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from arpg.errors import ArpgError
from arpg.models.arpg import ARPG, ARPGConfig
from arpg.models.registry import build_model

V, C, G = 40, 5, 4  # codebook, classes, grid side
N = G * G


# ---------------------------------------------------------------- independent reference (fp64)
def ref_freqs(grid, head_dim, base=10000.0):
    """Complex RoPE table [1 + grid^2, head_dim/2]; slot 0 (class) is 0 + 0j like the release."""
    half = head_dim // 2
    inv = base ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # [hd/4]
    rows = []
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        rows.append(torch.cat([r * inv, c * inv]))
    ang = torch.stack(rows)  # [grid^2, hd/2]
    table = torch.polar(torch.ones_like(ang), ang)
    return torch.cat([torch.zeros(1, half, dtype=torch.complex128), table])


def ref_rope(x, f):
    """x [B, T, H, D] real, f [B, T, D/2] complex: multiply adjacent pairs as complex numbers."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * f[:, :, None, :]).flatten(-2)


def ref_norm(x, w, eps=1e-5):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def ref_attn(q, k, v, mask):
    """q [B, Q, H, D], k/v [B, T, H, D], mask bool [Q, T] or [B, Q, T] (True = visible)."""
    s = torch.einsum("bqhd,bthd->bhqt", q, k) / math.sqrt(q.shape[-1])
    m = mask if mask.dim() == 3 else mask[None]
    s = s.masked_fill(~m[:, None], float("-inf"))
    return torch.einsum("bhqt,bthd->bqhd", torch.softmax(s, -1), v)


def ref_ffn(x, sd, pre):
    a = x @ sd[pre + "w1.weight"].T
    return (a * torch.sigmoid(a) * (x @ sd[pre + "w3.weight"].T)) @ sd[pre + "w2.weight"].T


def heads(x, H):
    return x.reshape(*x.shape[:2], H, -1)


def ref_pass1(sd, H, n_self, ids, f_in, mask):
    """Returns shared K (RoPE'd) and V [B, T, H, D] for content ids with complex freqs f_in."""
    x = sd["embeddings.weight"][ids]
    for i in range(n_self):
        p = f"layers.self_dec.{i}."
        h = ref_norm(x, sd[p + "attn_norm.weight"])
        q = ref_rope(heads(h @ sd[p + "attn.to_q.weight"].T, H), f_in)
        k = ref_rope(heads(h @ sd[p + "attn.to_k.weight"].T, H), f_in)
        v = heads(h @ sd[p + "attn.to_v.weight"].T, H)
        x = x + ref_attn(q, k, v, mask).flatten(-2) @ sd[p + "attn.proj.weight"].T
        x = x + ref_ffn(ref_norm(x, sd[p + "ffn_norm.weight"]), sd, p + "ffn.")
    xn = ref_norm(x, sd["layers.norm.weight"])
    k = ref_rope(heads(xn @ sd["layers.to_k.weight"].T, H), f_in)
    v = heads(xn @ sd["layers.to_v.weight"].T, H)
    return k, v


def ref_pass2(sd, H, n_cross, mask_id, k, v, f_q, mask):
    B, Q = f_q.shape[:2]
    q = sd["embeddings.weight"][mask_id].expand(B, Q, -1)
    for i in range(n_cross):
        p = f"layers.cross_dec.{i}."
        h = ref_norm(q, sd[p + "attn_norm.weight"])
        qq = ref_rope(heads(h @ sd[p + "attn.to_q.weight"].T, H), f_q)
        q = q + ref_attn(qq, k, v, mask).flatten(-2) @ sd[p + "attn.proj.weight"].T
        q = q + ref_ffn(ref_norm(q, sd[p + "ffn_norm.weight"]), sd, p + "ffn.")
    return ref_norm(q, sd["norm.weight"]) @ sd["head.weight"].T


def ref_train_logits(sd, H, n_self, n_cross, tokens, labels, orders, grid):
    """Release training forward: shuffle, class prefix, causal masks, target-position queries."""
    B, n = tokens.shape
    cls = labels + V + 1
    shuffled = tokens.gather(1, orders)
    ids = torch.cat([cls[:, None], shuffled[:, :-1]], 1)
    freqs = ref_freqs(grid, sd["layers.to_k.weight"].shape[0] // H)
    f_all = torch.cat([freqs[0].expand(B, 1, -1), freqs[orders + 1]], 1)  # [B, n+1, hd/2]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    k, v = ref_pass1(sd, H, n_self, ids, f_all[:, :n], causal)
    return ref_pass2(sd, H, n_cross, V, k, v, f_all[:, 1:], causal)


# ---------------------------------------------------------------- fixtures
def small_config(**kw):
    base = dict(codebook_size=V, num_classes=C, grid_size=G, dim=32, n_heads=4, n_self_layers=2,
                n_cross_layers=2, ffn_multiple_of=16)
    return ARPGConfig(**{**base, **kw})


def randomized(model, seed=0):
    """Every parameter (head and norms included) random, so nothing trivially cancels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def sd64(model):
    return {k: v.double() for k, v in model.state_dict().items()}


def batch(seed=0, B=3):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, N), generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    orders = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    return tokens, labels, orders


# ---------------------------------------------------------------- tests
def test_arpg_l_parameter_count_and_key_layout():
    with torch.device("meta"):
        model = build_model("ARPG-L", codebook_size=16384, num_classes=1000, grid_size=16)
    assert sum(p.numel() for p in model.parameters()) == 319_845_376
    sd = model.state_dict()
    assert sd["embeddings.weight"].shape == (17387, 1024)
    assert sd["head.weight"].shape == (16384, 1024)
    assert sd["layers.self_dec.11.ffn.w1.weight"].shape == (2816, 1024)
    assert sd["layers.cross_dec.0.attn.to_q.weight"].shape == (1024, 1024)
    assert "layers.cross_dec.0.attn.to_k.weight" not in sd
    assert {"layers.norm.weight", "layers.to_k.weight", "layers.to_v.weight", "norm.weight"} <= set(sd)
    assert model.mask_id == 16384 and model.null_class_id == 17385


def test_init_is_seeded_zero_head_and_normal():
    m1 = ARPG(small_config(), generator=torch.Generator().manual_seed(5))
    m2 = ARPG(small_config(), generator=torch.Generator().manual_seed(5))
    m3 = ARPG(small_config(), generator=torch.Generator().manual_seed(6))
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(m1.embeddings.weight, m3.embeddings.weight)
    assert torch.count_nonzero(m1.head.weight) == 0
    assert torch.equal(m1.norm.weight, torch.ones(32))
    w = m1.layers.self_dec[0].ffn.w1.weight
    assert 0.015 < w.std().item() < 0.025


def test_training_logits_and_loss_match_reference():
    model = randomized(ARPG(small_config()))
    tokens, labels, orders = batch()
    logits = model(tokens, labels, orders)
    assert logits.dtype == torch.float32 and logits.shape == (3, N, V)
    want = ref_train_logits(sd64(model), 4, 2, 2, tokens, labels, orders, G)
    assert (logits.double() - want).abs().max().item() <= 1e-5
    assert want.abs().max() > 1.0  # non-trivial logits
    want_loss = F.cross_entropy(want.flatten(0, 1), tokens.gather(1, orders).flatten())
    assert abs(model.loss(tokens, labels, orders).item() - want_loss.item()) <= 1e-5


def test_null_class_and_uneven_split():
    model = randomized(ARPG(small_config(n_self_layers=3, n_cross_layers=1)), seed=1)
    tokens, labels, orders = batch(seed=1)
    labels[1] = -1
    assert model.class_ids(labels)[1].item() == V + 1 + C
    logits = model(tokens, labels, orders)
    sd = sd64(model)
    # the reference takes label + V + 1: label C is the null row
    want = ref_train_logits(sd, 4, 3, 1, tokens, torch.where(labels < 0, C, labels), orders, G)
    assert (logits.double() - want).abs().max().item() <= 1e-5


def test_prediction_only_depends_on_earlier_tokens_in_order():
    """Query i must not see tokens at orders[i:]; changing them leaves logits[:, :i+1] unchanged."""
    model = randomized(ARPG(small_config()), seed=2)
    tokens, labels, orders = batch(seed=2, B=1)
    i = 7
    changed = tokens.clone()
    changed[0, orders[0, i:]] = (changed[0, orders[0, i:]] + 1) % V
    a, b = model(tokens, labels, orders), model(changed, labels, orders)
    assert torch.equal(a[:, : i + 1], b[:, : i + 1])
    assert not torch.allclose(a[:, i + 1 :], b[:, i + 1 :])


def test_dropout_active_in_train_mode_only():
    model = randomized(ARPG(small_config()), seed=3)
    tokens, labels, orders = batch(seed=3)
    ref = model(tokens, labels, orders)
    model.train()
    torch.manual_seed(0)  # nn.Dropout draws from the global stream; seeded here so the test is fixed
    assert not torch.allclose(model(tokens, labels, orders), ref)
    model.eval()
    assert torch.equal(model(tokens, labels, orders), ref)


def test_cache_one_token_per_step_equals_forward():
    model = randomized(ARPG(small_config()), seed=4)
    tokens, labels, _ = batch(seed=4)
    B = tokens.shape[0]
    raster = torch.arange(N).expand(B, N)
    full = model(tokens, labels, raster)
    cache = model.new_cache(B, N)
    with torch.no_grad():
        model.extend_context(cache, model.class_ids(labels)[:, None], torch.full((B, 1), -1))
        for p in range(N):
            step = model.query(cache, torch.full((B, 1), p))
            assert (step[:, 0] - full[:, p]).abs().max().item() <= 1e-5, p
            if p < N - 1:
                model.extend_context(cache, tokens[:, p : p + 1], torch.full((B, 1), p))
    assert cache.length == N


def ref_decode(sd, blocks_ids, blocks_pos, query_pos, grid, H=4, n_self=2, n_cross=2):
    """Uncached: recompute pass 1 over every content token with a block-causal mask, then query."""
    ids = torch.cat(blocks_ids, 1)
    pos = torch.cat(blocks_pos, 1)
    block_of = torch.cat([torch.full((b.shape[1],), j) for j, b in enumerate(blocks_ids)])
    mask = block_of[None, :] <= block_of[:, None]  # token sees its own block and earlier ones
    freqs = ref_freqs(grid, sd["layers.to_k.weight"].shape[0] // H)
    k, v = ref_pass1(sd, H, n_self, ids, freqs[pos + 1], mask)
    full = torch.ones(query_pos.shape[1], ids.shape[1], dtype=torch.bool)  # queries see all content
    return ref_pass2(sd, H, n_cross, V, k, v, freqs[query_pos + 1], full)


@pytest.mark.parametrize("grid", [G, 6])
def test_cache_parallel_random_order_equals_block_causal_reference(grid):
    """Several tokens per step, a different random order per sample; grid 6 > training grid 4
    exercises the resolution-expansion RoPE table."""
    model = randomized(ARPG(small_config()), seed=5)
    B, n = 2, grid * grid
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (B, n), generator=g)
    labels = torch.tensor([1, -1])
    orders = torch.stack([torch.randperm(n, generator=g) for _ in range(B)])
    sizes = [3, 1, 5, n - 9]  # tokens predicted per step
    sd = sd64(model)
    cache = model.new_cache(B, n, grid_size=grid)
    blocks_ids = [model.class_ids(labels)[:, None]]
    blocks_pos = [torch.full((B, 1), -1)]
    done = 0
    with torch.no_grad():
        model.extend_context(cache, blocks_ids[0], blocks_pos[0])
        for size in sizes:
            target = orders[:, done : done + size]
            got = model.query(cache, target)
            want = ref_decode(sd, blocks_ids, blocks_pos, target, grid)
            assert (got.double() - want).abs().max().item() <= 1e-5
            feed = tokens.gather(1, target)
            blocks_ids.append(feed)
            blocks_pos.append(target)
            if done + size < n:
                model.extend_context(cache, feed, target)
            done += size
    assert cache.length == 1 + n - sizes[-1]


def test_cache_is_preallocated_and_written_in_place():
    model = randomized(ARPG(small_config()), seed=6)
    cache = model.new_cache(2, 8)
    ptrs = (cache.k.data_ptr(), cache.shared_k.data_ptr())
    with torch.no_grad():
        model.extend_context(cache, torch.tensor([[V + 1], [V + 2]]), torch.full((2, 1), -1))
        model.extend_context(cache, torch.tensor([[3, 4], [5, 6]]), torch.tensor([[0, 5], [2, 1]]))
    assert (cache.k.data_ptr(), cache.shared_k.data_ptr()) == ptrs and cache.length == 3
    with pytest.raises(ValueError, match="cache full"):
        model.extend_context(cache, torch.zeros(2, 6, dtype=torch.long), torch.zeros(2, 6, dtype=torch.long))


def test_bf16_cache_with_fp32_model_stays_close():
    model = randomized(ARPG(small_config()), seed=7)
    B = 2
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        cache = model.new_cache(B, N, dtype=dtype)
        with torch.no_grad():
            model.extend_context(cache, torch.tensor([[V + 1], [V + 3]]), torch.full((B, 1), -1))
            model.extend_context(cache, torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0, 9], [4, 2]]))
            outs.append(model.query(cache, torch.tensor([[1, 3], [5, 6]])))
    assert cache.k.dtype == torch.bfloat16
    assert outs[1].dtype == torch.float32
    assert (outs[0] - outs[1]).abs().max() < 0.1 * outs[0].abs().max()


def test_kv_cache_bytes_matches_allocation():
    model = ARPG(small_config())
    cache = model.new_cache(3, N)
    allocated = sum(t.numel() * t.element_size() for t in (cache.k, cache.v, cache.shared_k, cache.shared_v))
    assert model.kv_cache_bytes(3, torch.float32) == allocated
    assert model.kv_cache_bytes(3, torch.bfloat16) == allocated // 2


def test_config_and_registry_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        ARPGConfig(dim=36, n_heads=6)
    with pytest.raises(ArpgError, match="known sizes: ARPG-L"):
        build_model("ARPG-Q", codebook_size=V, num_classes=C, grid_size=G)
    with pytest.raises(ArpgError, match="unknown config field"):
        build_model("ARPG-T", codebook_size=V, num_classes=C, grid_size=G, n_layers=3)
    model = build_model("ARPG-T", codebook_size=V, num_classes=C, grid_size=G, token_dropout=0.0)
    assert model.config.token_dropout == 0.0 and model.config.dim == 64
    with pytest.raises(ValueError, match="grid"):
        model(torch.zeros(1, N + 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), torch.arange(N + 1)[None])


def test_every_parameter_gets_a_gradient():
    """DDP needs no unused parameters; after one step the zero head no longer blocks the flow."""
    model = randomized(ARPG(small_config()), seed=8).train()
    tokens, labels, orders = batch(seed=8)
    model.loss(tokens, labels, orders).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_bf16_autocast_forward_is_fp32_and_close():
    model = randomized(ARPG(small_config()), seed=9)
    tokens, labels, orders = batch(seed=9)
    ref = model(tokens, labels, orders)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, labels, orders)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
