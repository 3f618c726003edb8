"""CPU linear kernels (arpg/models/cpu_kernels.py): every kernel gives plain fp32's logits within its
precision's tolerance, the head stays fp32, the choice is made by measurement (and cached), the
row plans are each decoder's, and bf16 decoding of a trained model keeps its greedy tokens."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from arpg.errors import ArpgError
from arpg.machine import cpu_flags
from arpg.models import cpu_kernels as K
from conftest import tiny_model

NEEDS_ONEDNN = pytest.mark.skipif(not K.packing_available(), reason="this torch build has no oneDNN")
# bf16-packed where oneDNN can prepack bf16 here, else bf16-plain (the same numbers: test_bf16_kernels_keep_the_head_in_fp32)
BF16_KERNELS = ["bf16-plain", *(["bf16-packed"] if K.packing_available("bf16") else [])]


def _args(name: str, gen: torch.Generator):
    tokens = torch.randint(0, 32, (3, 16), generator=gen)
    labels = torch.tensor([0, 2, 1])
    if name.startswith("ARPG"):
        return tokens, labels, torch.stack([torch.randperm(16, generator=gen) for _ in range(3)])
    return tokens, labels


@NEEDS_ONEDNN
@pytest.mark.parametrize("kernel", list(K.KERNELS))
@pytest.mark.parametrize("name", ["ARPG-T", "LlamaGen-T"])
def test_every_kernel_gives_plain_fp32_logits(name, kernel):
    model = tiny_model(name, codebook_size=32, num_classes=3, grid_size=4, head_std=0.5)
    spec = K.KERNELS[kernel]
    if spec.packed and not K.packing_available(spec.precision):  # bf16 prepacking, CPU without AVX512BW/VL/DQ
        flags = cpu_flags()
        assert not ({"avx512bw", "avx512vl", "avx512dq"} <= flags or "avx_ne_convert" in flags)
        if K.bf16_hardware():  # bf16 in hardware yet no prepacking: only bf16-plain is offered
            assert K.kernels_for(spec.precision) == ["bf16-plain"]
        with pytest.raises(ArpgError, match=f"{kernel} needs oneDNN prepacking.*use {spec.precision}-plain"):
            K.use_kernel(model, kernel)
        assert all("forward" not in vars(m) for m in model.modules())  # nothing half-applied
        return
    args = _args(name, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(*args)  # [B, N, V] fp32-plain
        n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
        changed = K.use_kernel(model, kernel)
        got = model(*args)
    # fp32-plain changes nothing, bf16-plain all but the head (it stays fp32-plain)
    assert changed == {"fp32-plain": 0, "bf16-plain": n_linear - 1}.get(kernel, n_linear)
    assert got.dtype == torch.float32  # logits stay fp32
    if K.KERNELS[kernel].precision == "fp32":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # bf16 inputs and weights (8 mantissa bits) through 4 + 4 layers: a few % of the logits' scale
        scale = want.abs().max()
        assert (got - want).abs().max() < 0.05 * scale
        assert (got - want).abs().mean() < 0.01 * scale
        assert (got - want).abs().max() > 0  # really computed in bf16
    K.use_kernel(model, "fp32-plain")  # and back: nn.Linear's own forward everywhere
    assert all("forward" not in vars(m) for m in model.modules())


@NEEDS_ONEDNN
def test_bf16_kernels_keep_the_head_in_fp32():
    model = tiny_model("ARPG-T", codebook_size=32, num_classes=3, grid_size=4, head_std=0.5)
    x = torch.randn(5, model.config.dim, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = torch.nn.functional.linear(x, model.head.weight)
        for kernel in BF16_KERNELS:
            K.use_kernel(model, kernel)
            torch.testing.assert_close(model.head(x), want, rtol=1e-5, atol=1e-5)
            to_k = model.layers.to_k
            bf16 = torch.nn.functional.linear(x.bfloat16(), to_k.weight.bfloat16()).float()
            torch.testing.assert_close(to_k(x), bf16, rtol=0, atol=0)  # the body: exactly bf16 maths


def test_row_plans_are_each_decoders():
    arpg = tiny_model("ARPG-T", codebook_size=32, num_classes=3, grid_size=4)
    raster = tiny_model("LlamaGen-T", codebook_size=32, num_classes=3, grid_size=4)
    # ARPG decoding 2, 3, 3 tokens with CFG at batch 1 (2 rows per token): step 0 feeds the class,
    # later steps the previous step's tokens; the queries are each step's own
    assert K.row_plan(arpg, [2, 3, 3], 2) == Counter({("feed", 2): 1, ("feed", 4): 1, ("feed", 6): 1,
                                                      ("query", 4): 1, ("query", 6): 2})
    assert K.row_plan(raster, [1] * 16, 2) == Counter({("feed", 2): 16})
    with pytest.raises(ValueError, match="one token per step"):
        K.row_plan(raster, [2, 14], 2)
    groups = arpg.linear_groups()
    every = {id(m) for m in arpg.modules() if isinstance(m, torch.nn.Linear)}
    assert {id(m) for g in groups.values() for m in g} == every  # each linear layer in exactly one group
    assert sum(len(g) for g in groups.values()) == len(every)
    assert arpg.head in groups["query"] and arpg.layers.to_k in groups["feed"]


def test_the_choice_is_the_fastest_measured_and_cached(tmp_path, monkeypatch):
    model = tiny_model("LlamaGen-T", codebook_size=32, num_classes=3, grid_size=4)
    plan = K.row_plan(model, [1] * 16, 2)
    candidates = ["fp32-plain", "bf16-plain"]
    measured = {"fp32-plain": 3.0, "bf16-plain": 1.0}
    calls = []

    def fake_time(m, kernel, p, **_):
        calls.append(kernel)
        assert m is model and p == plan
        return measured[kernel]

    monkeypatch.setattr(K, "time_kernel", fake_time)
    cache = tmp_path / "choices.json"
    choice = K.choose_kernel(model, plan, candidates, cache)
    assert choice == {"kernel": "bf16-plain", "seconds": measured, "cached": False}
    assert sorted(calls) == sorted(candidates)
    body = next(m for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert "forward" in vars(body)  # bf16-plain applied

    calls.clear()  # the same machine, model size and plan: read back, nothing timed
    assert K.choose_kernel(model, plan, candidates, cache) == dict(choice, cached=True)
    assert calls == []

    measured.update({"fp32-plain": 0.5})  # another plan (batch 4): measured afresh, and here fp32 wins
    other = K.row_plan(model, [1] * 16, 8)
    monkeypatch.setattr(K, "time_kernel", lambda m, kernel, p, **_: measured[kernel])
    assert K.choose_kernel(model, other, candidates, cache)["kernel"] == "fp32-plain"
    assert all("forward" not in vars(m) for m in model.modules())  # fp32-plain really applied


def test_time_kernel_times_the_plan():
    model = tiny_model("ARPG-T", codebook_size=32, num_classes=3, grid_size=4)
    plan = K.row_plan(model, [4, 6, 6], 2)
    once = K.time_kernel(model, "fp32-plain", plan)
    assert once > 0
    # ten times the calls: about ten times the time (generous bounds: a shared machine)
    tenfold = K.time_kernel(model, "fp32-plain", Counter({k: 10 * v for k, v in plan.items()}))
    assert 2 * once < tenfold < 100 * once


def test_bf16_is_refused_where_the_cpu_would_emulate_it(monkeypatch):
    monkeypatch.setattr(K, "bf16_hardware", lambda flags=None: None)
    with pytest.raises(ArpgError, match="emulated.*use precision fp32"):
        K.kernels_for("bf16")
    model = tiny_model("ARPG-T", codebook_size=32, num_classes=3, grid_size=4)
    with pytest.raises(ArpgError, match="sample.precision: bf16 decoding"):
        K.prepare_for_decoding(model, "bf16", "sample.precision")
    assert K.kernels_for("fp32")[0] == "fp32-plain"


def test_bf16_hardware_reads_the_flags(monkeypatch):
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this torch build has no oneDNN bf16")
    assert K.bf16_hardware({"avx2", "amx_bf16", "avx512_bf16"}) == "AMX-BF16"
    assert K.bf16_hardware({"avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert K.bf16_hardware({"avx2", "fma"}) is None


def _pattern(labels_B: torch.Tensor) -> torch.Tensor:
    """The tokens [B, 16]: a fixed pattern over the positions, shifted by the class for half of them
    (so decoding must read both the position's RoPE angle and the context)."""
    shift_BN = labels_B[:, None] * (torch.arange(16)[None] % 2)  # odd positions shift with the class
    return (5 * torch.arange(16)[None] + 3 + shift_BN) % 32


def _trained_arpg(steps: int = 250):
    """A tiny ARPG trained on a class-determined token pattern until its predictions are confident."""
    from arpg.utils import make_generator

    model = tiny_model("ARPG-T", codebook_size=32, num_classes=3, grid_size=4, head_std=0.02,
                       token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0).train()
    gen = make_generator(0)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        labels_B = torch.randint(0, 3, (32,), generator=gen)
        tokens_BN = _pattern(labels_B)  # [32, 16]
        orders_BN = torch.stack([torch.randperm(16, generator=gen) for _ in range(32)])
        logits_BNV = model(tokens_BN, labels_B, orders_BN)  # in the order of orders_BN
        loss = torch.nn.functional.cross_entropy(logits_BNV.reshape(-1, 32),
                                                 tokens_BN.gather(1, orders_BN).reshape(-1))
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model.eval().requires_grad_(False), loss.item()


@NEEDS_ONEDNN
def test_bf16_keeps_a_trained_models_greedy_tokens():
    """On the data it learnt, a trained model's greedy (argmax) token at every position and order is the
    same at bf16 as at fp32: confident predictions have margins far above bf16's rounding. (A random
    model, whose predictions are near ties, flips some; whole decodes are not compared, because one
    flip changes all later context.)"""
    model, loss = _trained_arpg()
    assert loss < 0.5  # it learnt the pattern
    gen = torch.Generator().manual_seed(5)
    labels_B = torch.arange(48) % 3
    orders_BN = torch.stack([torch.randperm(16, generator=gen) for _ in range(48)])
    greedy = {}
    with torch.inference_mode():
        for kernel in ("fp32-plain", BF16_KERNELS[-1]):
            K.use_kernel(model, kernel)
            greedy[kernel] = model(_pattern(labels_B), labels_B, orders_BN).argmax(-1)  # [48, 16]
    assert (greedy["fp32-plain"] == _pattern(labels_B).gather(1, orders_BN)).float().mean() > 0.8  # it is right
    assert torch.equal(greedy[BF16_KERNELS[-1]], greedy["fp32-plain"])
