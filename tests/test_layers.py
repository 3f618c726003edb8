"""Building blocks against hand-written formulas (independent of arpg.models.layers internals)."""

import math

import pytest
import torch

from arpg.models.layers import (
    BackboneConfig,
    FeedForward,
    RMSNorm,
    apply_rope,
    block_causal_mask,
    cache_write_attend,
    ffn_hidden_size,
    rope_2d,
)
from conftest import tiny_model


def test_rmsnorm_matches_formula_and_computes_in_fp32():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
    x = torch.randn(3, 5, 16, generator=g) * 7
    x64 = x.double()
    want = x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert torch.allclose(norm(x).double(), want, atol=1e-5)
    # bf16 input: the statistic is taken in fp32, so it matches fp32 normalisation rounded once
    xb = x.bfloat16()
    xb32 = xb.float()
    want_b = (xb32 * torch.rsqrt(xb32.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() * norm.weight
    out_b = norm(xb)
    assert torch.allclose(out_b.float(), want_b.float(), atol=0, rtol=0)


@pytest.mark.parametrize("dim,hidden", [(1024, 2816), (1280, 3584), (1536, 4096)])
def test_ffn_hidden_size_matches_spec_table(dim, hidden):
    assert ffn_hidden_size(dim, 256) == hidden
    ffn = FeedForward(dim, 256, 0.0)
    assert ffn.w1.weight.shape == (hidden, dim) and ffn.w2.weight.shape == (dim, hidden)


def test_ffn_is_swiglu():
    torch.manual_seed(0)
    ffn = FeedForward(24, 32, 0.0)
    assert ffn.w1.weight.shape == (64, 24)  # int(8*24/3) = 64
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    ffn = ffn.double()
    w1, w2, w3 = ffn.w1.weight, ffn.w2.weight, ffn.w3.weight
    a = x @ w1.T
    want = (a / (1 + torch.exp(-a)) * (x @ w3.T)) @ w2.T
    assert torch.allclose(ffn(x), want, atol=1e-12)


def test_rope_2d_table_values():
    G, hd, base = 5, 16, 10000.0
    cos, sin = rope_2d(G, G, hd, base)
    assert cos.shape == sin.shape == (1 + G * G, hd // 2)
    assert torch.count_nonzero(cos[0]) == 0 and torch.count_nonzero(sin[0]) == 0  # class slot
    n_freq = hd // 4
    for p in [0, 3, 7, 24]:
        r, c = divmod(p, G)
        for j in range(hd // 2):
            idx, k = (r, j) if j < n_freq else (c, j - n_freq)
            angle = idx * base ** (-2 * k / (hd // 2))
            assert math.isclose(cos[p + 1, j].item(), math.cos(angle), abs_tol=1e-6)
            assert math.isclose(sin[p + 1, j].item(), math.sin(angle), abs_tol=1e-6)


def test_rope_anchor_class_slot_is_cell_minus_one():
    """class_rope="anchor": the class slot holds the angles of grid cell (-1, -1); the grid rows
    are those of the released table."""
    G, hd, base = 5, 16, 10000.0
    cos, sin = rope_2d(G, G, hd, base, class_rope="anchor")
    cos0, sin0 = rope_2d(G, G, hd, base)
    assert torch.equal(cos[1:], cos0[1:]) and torch.equal(sin[1:], sin0[1:])
    for j in range(hd // 2):
        angle = -1 * base ** (-2 * (j % (hd // 4)) / (hd // 2))
        assert math.isclose(cos[0, j].item(), math.cos(angle), abs_tol=1e-6)
        assert math.isclose(sin[0, j].item(), math.sin(angle), abs_tol=1e-6)


def test_anchor_gives_queries_their_absolute_position():
    """Zero slot: a query's score against the class key is 0 wherever the query is. Anchor: it
    changes with the query's position (it equals the score against a key one cell up-left of the
    grid origin on a grid shifted by one)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 1, 16, generator=g)
    k = torch.randn(1, 1, 1, 16, generator=g)
    scores = {}
    for mode in ("zero", "anchor"):
        cos, sin = rope_2d(6, 6, 16, class_rope=mode)
        kc = apply_rope(k, cos[0:1], sin[0:1])
        scores[mode] = [float((apply_rope(q, cos[p + 1:p + 2], sin[p + 1:p + 2]) * kc).sum()) for p in range(36)]
    assert all(s == 0.0 for s in scores["zero"])
    assert len({round(s, 5) for s in scores["anchor"]}) > 30
    cos7, sin7 = rope_2d(7, 7, 16)  # (r, c) -> (r + 1, c + 1); the anchor -> (0, 0)
    kc = apply_rope(k, cos7[1:2], sin7[1:2])
    for p in (0, 9, 35):
        r, c = divmod(p, 6)
        slot = 1 + (r + 1) * 7 + (c + 1)
        want = float((apply_rope(q, cos7[slot:slot + 1], sin7[slot:slot + 1]) * kc).sum())
        assert math.isclose(scores["anchor"][p], want, rel_tol=1e-4, abs_tol=1e-5)


def test_backbone_rejects_unknown_class_rope():
    with pytest.raises(ValueError, match="class_rope"):
        BackboneConfig(class_rope="centre")


def test_rope_table_extends_to_larger_grid():
    """Resolution expansion: a (row, col) keeps its angles on a larger grid."""
    cos8, sin8 = rope_2d(8, 8, 16)
    cos12, sin12 = rope_2d(12, 12, 16)
    for r, c in [(0, 0), (3, 5), (7, 7)]:
        assert torch.equal(cos8[1 + r * 8 + c], cos12[1 + r * 12 + c])
        assert torch.equal(sin8[1 + r * 8 + c], sin12[1 + r * 12 + c])


def test_rope_rejects_head_dim_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(4, 4, 18)


def test_apply_rope_is_complex_rotation_of_adjacent_pairs():
    g = torch.Generator().manual_seed(1)
    B, T, H, D = 2, 6, 3, 8
    x = torch.randn(B, T, H, D, generator=g)
    ang = torch.rand(B, T, D // 2, generator=g) * 6
    cos, sin = torch.cos(ang), torch.sin(ang)
    xc = torch.view_as_complex(x.double().reshape(B, T, H, D // 2, 2).contiguous())
    rot = torch.polar(torch.ones_like(ang.double()), ang.double())[:, :, None]  # [B, T, 1, hd/2]
    want = torch.view_as_real(xc * rot).reshape(B, T, H, D)
    assert torch.allclose(apply_rope(x, cos, sin).double(), want, atol=1e-6)
    # [T, hd/2] tables broadcast over the batch
    expanded = apply_rope(x, cos[0].expand(B, -1, -1), sin[0].expand(B, -1, -1))
    assert torch.allclose(apply_rope(x, cos[0], sin[0]), expanded)


def test_rope_scores_depend_on_relative_offset_only():
    cos, sin = rope_2d(10, 10, 16)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64)

    def score(pq, pk):
        rq = apply_rope(q, cos[pq + 1][None, None].double(), sin[pq + 1][None, None].double())
        rk = apply_rope(k, cos[pk + 1][None, None].double(), sin[pk + 1][None, None].double())
        return (rq * rk).sum().item()

    # (1,2)->(3,5) and (4,1)->(6,4): same (2, 3) offset
    assert math.isclose(score(1 * 10 + 2, 3 * 10 + 5), score(4 * 10 + 1, 6 * 10 + 4), abs_tol=1e-5)  # fp32 table
    assert not math.isclose(score(1 * 10 + 2, 3 * 10 + 5), score(1 * 10 + 2, 5 * 10 + 3), abs_tol=1e-3)


def test_block_causal_mask():
    m = block_causal_mask(2, 3)
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, want)


def test_cache_write_attend_writes_in_place_and_attends_prefix():
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4)
    ptr = kc.data_ptr()
    k1, v1 = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 3, 4, generator=g)
    q1 = torch.randn(1, 2, 3, 4, generator=g)
    cache_write_attend(q1, k1, v1, kc, vc, 0)
    k2, v2 = torch.randn(1, 2, 2, 4, generator=g), torch.randn(1, 2, 2, 4, generator=g)
    q2 = torch.randn(1, 2, 2, 4, generator=g)
    y = cache_write_attend(q2, k2, v2, kc, vc, 3)
    assert kc.data_ptr() == ptr
    K, V = torch.cat([k1, k2], 2), torch.cat([v1, v2], 2)
    att = torch.softmax(q2 @ K.transpose(-1, -2) / 2.0, -1)
    assert torch.allclose(y, att @ V, atol=1e-6)
    assert torch.count_nonzero(kc[:, :, 5]) == 0  # nothing written past the filled prefix
