"""Randomized parallel decoding: schedules, orders, logits filters, cached vs uncached decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arpg.engine import sampler as S
from arpg.errors import ArpgError
from arpg.models.layers import CLASS_ROPE, apply_rope, merge_heads, rope_lookup, split_heads
from arpg.utils import derive_seed, make_generator
from conftest import tiny_model

GRID, CODES, CLASSES = 4, 32, 3
N = GRID * GRID




def _tiny(name: str, seed: int = 0, **overrides):
    return tiny_model(name, codebook_size=CODES, num_classes=CLASSES, grid_size=GRID, seed=seed, **overrides)


@pytest.fixture(scope="module", params=CLASS_ROPE)
def arpg(request):
    return _tiny("ARPG-T", class_rope=request.param)


@pytest.fixture(scope="module", params=CLASS_ROPE)
def raster(request):
    return _tiny("LlamaGen-T", class_rope=request.param)


class Recorder:
    """Wraps a model, recording every extend_context / query call (positions and logits)."""

    def __init__(self, model):
        self.model, self.fed, self.queried, self.logits, self.cache_batch = model, [], [], [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def new_cache(self, batch_size, *args, **kwargs):
        self.cache_batch.append(batch_size)
        return self.model.new_cache(batch_size, *args, **kwargs)

    def extend_context(self, cache, ids_BT, pos_BT):
        self.fed.append((ids_BT.clone(), pos_BT.clone()))
        return self.model.extend_context(cache, ids_BT, pos_BT)

    def query(self, cache, pos_BQ):
        logits = self.model.query(cache, pos_BQ)
        self.queried.append(pos_BQ.clone())
        self.logits.append(logits.clone())
        return logits


# ---- schedules -------------------------------------------------------------------------------

def _spec_counts(n, steps, r):
    """Spec section 3 verbatim: mask_len = clamp(floor(n r(s)), 1, n - decoded - 1); last step takes the rest."""
    counts, decoded = [], 0
    for s in range(steps):
        if s == steps - 1:
            k = n - decoded
        else:
            mask_len = min(max(math.floor(n * r(s)), 1), n - decoded - 1)
            k = n - decoded - mask_len
        counts.append(k)
        decoded += k
    return counts


# (64, 39), (256, 39 / 51 / 63): n * cos is an integer at t = 2/3, where pi/2 * t and pi/2 * (s+1) / N round apart
@pytest.mark.parametrize("n,steps", [(64, 8), (256, 64), (256, 32), (64, 16), (64, 2), (64, 39), (256, 39), (256, 51),
                                     (256, 63)])
def test_schedules_follow_spec_formulas(n, steps):
    rs = {"arccos": lambda s: math.acos((s + 1) / steps) / (math.pi / 2),
          "cosine": lambda s: math.cos(math.pi / 2 * (s + 1) / steps),
          "linear": lambda s: 1 - (s + 1) / steps}
    for name, r in rs.items():
        assert S.step_counts(n, steps, name) == _spec_counts(n, steps, r), name
    # paper's cosine: cumulative target min(floor((1 - cos(pi/2 (s+1)/N)) n + 1), n), >= 1 token per step
    want, decoded = [], 0
    for s in range(steps):
        target = min(math.floor((1 - math.cos(math.pi / 2 * (s + 1) / steps)) * n + 1), n)
        k = n - decoded if s == steps - 1 else max(target - decoded, 1)
        want.append(k)
        decoded += k
    assert S.step_counts(n, steps, "cosine-original") == want


def test_cosine_counts_as_the_release_over_a_sweep_of_token_and_step_counts():
    """The release's expression, left to right, at every step count of 16, 64, 256 and 1024 tokens;
    the t-first form (t = (s + 1) / N, then pi / 2 * t) differs from it at some of them."""
    release = lambda steps: lambda s: math.cos(math.pi / 2 * (s + 1) / steps)  # noqa: E731
    t_first = lambda steps: lambda s: math.cos(math.pi / 2 * ((s + 1) / steps))  # noqa: E731
    differ = []
    for n in (16, 64, 256, 1024):
        for steps in range(1, min(n, 128) + 1):
            assert S.step_counts(n, steps, "cosine") == _spec_counts(n, steps, release(steps)), (n, steps)
            if _spec_counts(n, steps, t_first(steps)) != _spec_counts(n, steps, release(steps)):
                differ.append((n, steps))
    assert {(64, 39), (256, 39), (256, 51), (256, 63)} <= set(differ)  # the sweep can tell the two apart


def test_schedule_hand_values():
    # arccos, n=64, N=8: mask lens floor(64 * acos(k/8) / (pi/2)) = 58, 53, 48, 42, 36, 29, 20 -> counts
    assert S.step_counts(64, 8, "arccos") == [6, 5, 5, 6, 6, 7, 9, 20]
    assert S.step_counts(64, 8, "linear") == [8] * 8
    assert S.step_counts(10, 1, "cosine") == [10]


@pytest.mark.parametrize("schedule", S.SCHEDULES)
@pytest.mark.parametrize("n", [1, 5, 16, 64])
def test_schedule_counts_sum_and_positive(schedule, n):
    for steps in range(1, n + 1):
        counts = S.step_counts(n, steps, schedule)
        assert len(counts) == steps and sum(counts) == n and min(counts) >= 1


def test_schedule_rejects_bad_steps():
    with pytest.raises(ArpgError, match="steps"):
        S.step_counts(16, 17, "arccos")
    with pytest.raises(ArpgError, match="unknown schedule"):
        S.step_counts(16, 4, "exp")


def test_cfg_weight():
    assert S.cfg_weight(4.0, "constant", 3, 16) == 4.0
    assert S.cfg_weight(4.0, "linear", 4, 16) == pytest.approx(1.0 + 3.0 * 4 / 16)
    assert S.cfg_weight(4.0, "linear", 16, 16) == pytest.approx(4.0)


# ---- orders ----------------------------------------------------------------------------------

def test_fixed_orders_by_hand():
    assert S.fixed_order("raster", 3, 3).tolist() == list(range(9))
    assert S.fixed_order("spiral-in", 3, 3).tolist() == [0, 1, 2, 5, 8, 7, 6, 3, 4]
    assert S.fixed_order("spiral-out", 3, 3).tolist() == [4, 3, 6, 7, 8, 5, 2, 1, 0]
    assert S.fixed_order("z-curve", 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert S.fixed_order("alternate", 3, 3).tolist() == [0, 2, 4, 6, 8, 1, 3, 5, 7]


@pytest.mark.parametrize("name", [o for o in S.ORDERS if o not in ("locality", "confidence")])  # chosen while
@pytest.mark.parametrize("h,w", [(4, 4), (5, 3), (1, 6)])  # decoding: tests/test_strategies.py
def test_orders_are_permutations(name, h, w):
    blocks = int(name[-1]) if name.startswith("region-") else 1
    if h % blocks or w % blocks:
        with pytest.raises(ArpgError, match="divisible"):
            S.make_orders(name, 3, h, w, make_generator(0))
        return
    orders = S.make_orders(name, 3, h, w, make_generator(0))
    assert orders.shape == (3, h * w)
    assert torch.equal(orders.sort(dim=1).values, torch.arange(h * w).expand(3, -1))


def test_random_orders_per_sample_and_seeded():
    a = S.make_orders("random", 4, 4, 4, make_generator(1))
    assert torch.equal(a, S.make_orders("random", 4, 4, 4, make_generator(1)))
    assert not torch.equal(a, S.make_orders("random", 4, 4, 4, make_generator(2)))
    assert len({tuple(row) for row in a.tolist()}) == 4  # one order per sample


def test_explicit_order_checked():
    order = torch.arange(N).flip(0)
    assert torch.equal(S.make_orders(order, 2, GRID, GRID, make_generator(0)), order.expand(2, -1))
    with pytest.raises(ArpgError, match="permutation"):
        S.make_orders(torch.zeros(N, dtype=torch.long), 2, GRID, GRID, make_generator(0))
    with pytest.raises(ArpgError, match="unknown order"):
        S.make_orders("hilbert", 2, GRID, GRID, make_generator(0))


# ---- logits processing -------------------------------------------------------------------------

def test_top_k_top_p_hand_computed():
    probs = torch.tensor([[[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]],
                          [[0.1, 0.1, 0.6, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]]])  # [B=2, Q=2, V=5]
    logits = probs.log()
    kept = lambda out: torch.isfinite(out).int().tolist()  # noqa: E731
    # top-p 0.6: keep the smallest prefix reaching 0.6 (ties keep everything at equal mass below p)
    assert kept(S.filter_logits(logits, top_p=0.6)) == [[[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]],
                                                        [[0, 0, 1, 0, 0], [1, 1, 1, 0, 0]]]
    assert kept(S.filter_logits(logits, top_k=2)) == [[[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]],
                                                      [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]]  # ties at the k-th value stay
    both = S.filter_logits(logits, top_k=3, top_p=0.9)
    # top-k 3 of row [0.5,.2,.15,.1,.05] renormalises to [.588,.235,.176]: 0.588+0.235 < 0.9 -> keep 3
    assert kept(both)[0][0] == [1, 1, 1, 0, 0]
    assert torch.equal(S.filter_logits(logits), logits)
    # kept entries are untouched
    out = S.filter_logits(logits, top_p=0.6)
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_sample_tokens_respects_filter_and_seed():
    logits = torch.randn(3, 5, 11, generator=make_generator(0))
    a = S.sample_tokens(logits, temperature=1.0, top_k=2, top_p=1.0, generator=make_generator(3))
    top2 = logits.topk(2, dim=-1).indices
    assert ((a[..., None] == top2).any(-1)).all()
    b = S.sample_tokens(logits, temperature=1.0, top_k=2, top_p=1.0, generator=make_generator(3))
    assert torch.equal(a, b)
    greedy = S.sample_tokens(logits, temperature=1e-4, top_k=0, top_p=1.0, generator=make_generator(3))
    assert torch.equal(greedy, logits.argmax(-1))


def test_guidance_mix():
    c, u = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert torch.allclose(S.mix_guidance(torch.cat([c, u]), 2, 3.0), u + 3.0 * (c - u))
    assert S.mix_guidance(c, 2, 3.0) is c


# ---- ARPG decoding ------------------------------------------------------------------------------

def test_raster_one_token_per_step_matches_full_forward(arpg):
    labels = torch.tensor([0, 2])
    rec = Recorder(arpg)
    tokens = S.generate_arpg(rec, labels, steps=N, cfg=1.0, order="raster", generator=make_generator(0))
    cached_BNV = torch.cat(rec.logits, dim=1)  # [B, N, V]: one query per step
    with torch.no_grad():
        full_BNV = arpg(tokens, labels, torch.arange(N).expand(2, -1))
    torch.testing.assert_close(cached_BNV, full_BNV, rtol=1e-4, atol=1e-4)


def _block_causal_reference(model, ids_BT, pos_BT, block_T, pos_BQ):
    """Uncached pass 1 over the whole context with a block-causal mask, then pass 2 at pos_BQ."""
    cos_t, sin_t = model.rope_tables(GRID, ids_BT.device)
    cos, sin = rope_lookup(cos_t, sin_t, pos_BT)
    visible_TT = block_T[None, :] <= block_T[:, None]  # key block <= query block
    x = model.embeddings(ids_BT)
    for blk in model.layers.self_dec:
        q, k, v = blk.attn.qkv(blk.attn_norm(x), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible_TT)
        h = x + blk.attn.proj(merge_heads(y))
        x = h + blk.ffn(blk.ffn_norm(h))
    xn = model.layers.norm(x)
    H = model.config.n_heads
    k = apply_rope(split_heads(model.layers.to_k(xn), H), cos, sin).transpose(1, 2)
    v = split_heads(model.layers.to_v(xn), H).transpose(1, 2)
    cq, sq = rope_lookup(cos_t, sin_t, pos_BQ)
    q = model.embeddings(torch.full_like(pos_BQ, model.mask_id))
    for blk in model.layers.cross_dec:
        qh = apply_rope(split_heads(blk.attn.to_q(blk.attn_norm(q)), H), cq, sq).transpose(1, 2)
        h = q + blk.attn.proj(merge_heads(F.scaled_dot_product_attention(qh, k, v)))
        q = h + blk.ffn(blk.ffn_norm(h))
    return model.head(model.norm(q)).float()


def _reference_decode(model, labels_B, steps, cfg, seed, schedule="arccos"):
    """Uncached decoder: reruns the full block-causal forward every step; same draws as the sampler."""
    gen = make_generator(seed)
    B = labels_B.shape[0]
    orders = S.make_orders("random", B, GRID, GRID, gen)
    guided = cfg != 1.0
    ids = S._class_ids(model, labels_B, guided)[:, None]
    pos = torch.full_like(ids, -1)
    block = torch.zeros(1, dtype=torch.long)
    tokens = torch.zeros(B, N, dtype=torch.long)
    decoded, all_logits = 0, []
    for s, k in enumerate(S.step_counts(N, steps, schedule)):
        targets = orders[:, decoded:decoded + k]
        logits = _block_causal_reference(model, ids, pos, block, targets.repeat(1 + guided, 1))
        logits = S.mix_guidance(logits, B, S.cfg_weight(cfg, "linear", decoded + k, N))
        all_logits.append(logits)
        new = S.sample_tokens(logits, temperature=1.0, top_k=0, top_p=1.0, generator=gen)
        tokens.scatter_(1, targets, new)
        ids = torch.cat([ids, new.repeat(1 + guided, 1)], dim=1)
        pos = torch.cat([pos, targets.repeat(1 + guided, 1)], dim=1)
        block = torch.cat([block, torch.full((k,), s + 1)])
        decoded += k
    return tokens, all_logits


@pytest.mark.parametrize("steps,cfg", [(5, 1.0), (4, 3.0)])
def test_cached_matches_uncached_random_order(arpg, steps, cfg):
    labels = torch.tensor([0, 1, 2])
    rec = Recorder(arpg)
    tokens = S.generate_arpg(rec, labels, steps=steps, cfg=cfg, order="random", generator=make_generator(7))
    with torch.no_grad():
        ref_tokens, ref_logits = _reference_decode(arpg, labels, steps, cfg, seed=7)
    assert any(q.shape[1] > 1 for q in rec.queried)  # several tokens per step
    for s, (got, want) in enumerate(zip(rec.logits, ref_logits)):
        weight = S.cfg_weight(cfg, "linear", sum(q.shape[1] for q in rec.queried[:s + 1]), N)
        torch.testing.assert_close(S.mix_guidance(got, 3, weight), want, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_every_position_decoded_once_and_fed_once(arpg):
    labels = torch.tensor([0, 1, 2, 0])
    rec = Recorder(arpg)
    tokens, orders = S.generate_arpg(rec, labels, steps=6, cfg=2.0, order="random",
                                     generator=make_generator(3), return_orders=True)
    queried = torch.cat(rec.queried, dim=1)[:4]  # cond half
    assert torch.equal(queried.sort(dim=1).values, torch.arange(N).expand(4, -1))
    assert torch.equal(queried, orders)
    assert [q.shape[1] for q in rec.queried] == S.step_counts(N, 6, "arccos")
    fed_pos = torch.cat([p for _, p in rec.fed], dim=1)  # [2B, 1 + N - last step]
    assert (fed_pos[:, 0] == -1).all() and fed_pos.shape[1] == 1 + N - rec.queried[-1].shape[1]
    assert fed_pos[:, 1:].unique(dim=1).shape[1] == fed_pos.shape[1] - 1  # no position fed twice
    fed_ids = torch.cat([i for i, _ in rec.fed], dim=1)
    assert torch.equal(fed_ids[:4, 1:], tokens.gather(1, fed_pos[:4, 1:]))  # fed what was sampled
    assert torch.equal(fed_ids[:4, 1:], fed_ids[4:, 1:]) and torch.equal(fed_pos[:4], fed_pos[4:])  # halves share
    assert (fed_ids[4:, 0] == arpg.null_class_id).all()


def test_cfg_one_does_not_double_batch(arpg):
    rec = Recorder(arpg)
    S.generate_arpg(rec, torch.tensor([0, 1]), steps=4, cfg=1.0, generator=make_generator(0))
    assert rec.cache_batch == [2]
    S.generate_arpg(rec, torch.tensor([0, 1]), steps=4, cfg=1.5, generator=make_generator(0))
    assert rec.cache_batch == [2, 4]


@pytest.mark.parametrize("order", S.ORDERS)
def test_seeds_reproduce_and_differ(arpg, order):
    labels = torch.tensor([0, 1, 2, 1])
    kw = dict(steps=4, cfg=2.0, order=order, top_k=20, top_p=0.95)
    a = S.generate_arpg(arpg, labels, generator=make_generator(11), **kw)
    b = S.generate_arpg(arpg, labels, generator=make_generator(11), **kw)
    c = S.generate_arpg(arpg, labels, generator=make_generator(12), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < CODES


def test_fixed_order_decodes_in_that_order(arpg):
    rec = Recorder(arpg)
    S.generate_arpg(rec, torch.tensor([1]), steps=4, order="spiral-in", schedule="linear",
                    generator=make_generator(0))
    assert torch.cat(rec.queried, dim=1)[0].tolist() == S.fixed_order("spiral-in", GRID, GRID).tolist()


def test_training_mode_rejected(arpg):
    arpg.train()
    try:
        with pytest.raises(ArpgError, match="eval"):
            S.generate_arpg(arpg, torch.tensor([0]), steps=2, generator=make_generator(0))
    finally:
        arpg.eval()


# ---- raster baseline ------------------------------------------------------------------------------

def test_raster_sampler_matches_full_forward(raster):
    labels = torch.tensor([0, 2])
    logits_seen = []
    real_extend = raster.extend

    def extend(cache, ids, pos):
        out = real_extend(cache, ids, pos)
        logits_seen.append(out.clone())
        return out

    raster.extend = extend
    try:
        tokens = S.generate_raster(raster, labels, cfg=1.0, generator=make_generator(0))
    finally:
        del raster.extend
    with torch.no_grad():
        full = raster(tokens, labels)
    torch.testing.assert_close(torch.cat(logits_seen, dim=1), full, rtol=1e-4, atol=1e-4)


def test_raster_sampler_seeds_and_cfg(raster):
    labels = torch.tensor([0, 1, 2])
    a = S.generate_raster(raster, labels, cfg=3.0, top_k=10, generator=make_generator(5))
    b = S.generate_raster(raster, labels, cfg=3.0, top_k=10, generator=make_generator(5))
    c = S.generate_raster(raster, labels, cfg=3.0, top_k=10, generator=make_generator(6))
    assert a.shape == (3, N) and torch.equal(a, b) and not torch.equal(a, c)


# ---- class-balanced sets ----------------------------------------------------------------------------

def test_class_batches_and_merge():
    from arpg.engine import sample_set as S

    batches = S.class_batches(3, 5, 4)
    assert [len(b) for b in batches] == [4, 4, 4, 3]
    assert torch.cat(batches).tolist() == [0] * 5 + [1] * 5 + [2] * 5
    draw = lambda labels, gen: torch.rand(len(labels), generator=gen)  # noqa: E731
    kw = dict(num_classes=3, num_per_class=5, batch_size=4, seed=9, device=torch.device("cpu"))
    one = S.merge_batches([S.generate_class_balanced(draw, **kw)])
    two = S.merge_batches([S.generate_class_balanced(draw, rank=r, world_size=2, **kw) for r in (1, 0)])
    assert torch.equal(one[0], two[0]) and torch.equal(torch.cat(one[1]), torch.cat(two[1]))
    assert torch.equal(one[1][1], draw(batches[1], make_generator(derive_seed(9, 1))))  # batch b: seed (9, b)
    with pytest.raises(ArpgError, match="missing"):
        S.merge_batches([S.generate_class_balanced(draw, rank=0, world_size=2, **kw)])


# ---- `arpg sample` end to end on a tiny study ----------------------------------------------------

TINY_OVERRIDES = {
    "device": "cpu",
    "data.resolution": 8, "data.num_classes": CLASSES,
    "tokenizer.base_channels": 16, "tokenizer.channel_mult": [1, 2], "tokenizer.num_res_blocks": 1,
    "tokenizer.z_channels": 16, "tokenizer.codebook_size": CODES, "tokenizer.codebook_dim": 4,
    "tokenizer.norm_groups": 8,
    "sample.num_per_class": 3, "sample.batch_size": 4, "sample.steps": [2, 4], "sample.steps_default": 4,
    "gallery.num_images": 2, "gallery.steps": 3, "gallery.samples": 2, "gallery.expand_to": 6,
}


def make_tiny_study(params_file, **extra):
    """Params for a 8x8-pixel / 4x4-token study plus random-weight tokenizer, generators and test data."""
    import numpy as np

    from arpg.config import load_params
    from arpg.models.checkpoint import save_generator
    from arpg.models.vq import VQConfig, VQModel, tokenizer_payload
    from arpg.utils import atomic_torch_save, write_json

    params = load_params(params_file(**{**TINY_OVERRIDES, **extra}))
    layout = params.layout
    atomic_torch_save(tokenizer_payload(VQModel(VQConfig.from_params(params))), layout.tokenizer_checkpoint)
    for kind, name in (("arpg", "ARPG-T"), ("raster", "LlamaGen-T")):
        save_generator(_tiny(name), layout.model_checkpoint(kind), name)
    rng = np.random.default_rng(0)
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    np.save(layout.images("test"), rng.integers(0, 256, (9, 8, 8, 1), dtype=np.uint8))
    np.save(layout.labels("test"), np.arange(9, dtype=np.int64) % CLASSES)
    write_json(layout.data_manifest, {"class_names": [f"class {c}" for c in range(CLASSES)]})  # row labels
    return params


@pytest.mark.parametrize("model,steps,order", [
    pytest.param("arpg", 4, "random", marks=pytest.mark.slow),  # creates an MLflow store: ~20 s here
    ("raster", N, "raster")])
def test_sample_command_writes_npz_and_grid(params_file, model, steps, order):
    import numpy as np
    from PIL import Image

    from arpg.cli import main
    from arpg.paths import SweepPoint

    params = make_tiny_study(params_file, **{"tracking.enabled": model == "arpg"})  # MLflow once (slow store)
    argv = ["sample", "--params", str(params.path), "--model", model, "--steps", str(steps), "--cfg", "2.0",
            "--order", order]
    assert main(argv) == 0
    point = SweepPoint(model, steps, 2.0, order)
    with np.load(params.layout.samples(point)) as npz:
        images, labels, tokens = npz["arr_0"], npz["labels"], npz["tokens"]
    assert images.dtype == np.uint8 and images.shape == (9, 8, 8, 1)
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert tokens.shape == (9, GRID, GRID) and tokens.max() < CODES
    assert Image.open(params.layout.sample_grid(point)).size == (3 * 8, 3 * 8)
    first = images.copy()
    if model == "arpg":
        logged = _assert_logged(params, "sample").data.params
        assert (logged["model"], logged["steps"], logged["cfg"], logged["order"], logged["seed"]) == \
            ("arpg", "4", "2.0", "random", "0")
        return
    assert main(argv) == 0  # same seed -> same samples
    with np.load(params.layout.samples(point)) as npz:
        assert np.array_equal(npz["arr_0"], first)


def _assert_logged(params, stage):
    from mlflow.tracking import MlflowClient

    from arpg.tracking import experiment_name, tracking_uri

    client = MlflowClient(tracking_uri=tracking_uri(params))
    exp = client.get_experiment_by_name(experiment_name(params))
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`arpg.stage` = '{stage}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return runs[0]


def test_sample_command_rejects_raster_with_steps(params_file):
    from arpg.cli import main

    params = make_tiny_study(params_file)
    assert main(["sample", "--params", str(params.path), "--model", "raster", "--steps", "4", "--cfg", "1.0",
                 "--order", "raster"]) == 2


def _sample_worker(rank, world, params_path, port):
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from arpg.cli import main

    try:
        assert main(["sample", "--params", params_path, "--model", "arpg", "--steps", "4", "--cfg", "2.0",
                     "--order", "random"]) == 0
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes plus a reference run: ~20 s here
def test_two_gloo_processes_equal_one(params_file, tmp_path):
    import socket

    import numpy as np
    import torch.multiprocessing as mp

    from arpg.cli import main
    from arpg.paths import SweepPoint

    params = make_tiny_study(params_file, **{"tracking.enabled": False})
    point = SweepPoint("arpg", 4, 2.0, "random")
    argv = ["sample", "--params", str(params.path), "--model", "arpg", "--steps", "4", "--cfg", "2.0",
            "--order", "random"]
    assert main(argv) == 0
    with np.load(params.layout.samples(point)) as npz:
        single = {k: npz[k] for k in npz.files}
    params.layout.samples(point).unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sample_worker, args=(2, str(params.path), port), nprocs=2, join=True)
    with np.load(params.layout.samples(point)) as npz:
        assert set(npz.files) == set(single)
        for key in single:
            assert np.array_equal(npz[key], single[key]), key
