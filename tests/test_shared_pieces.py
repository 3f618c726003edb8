"""The pieces every stage shares: LR schedules, seed derivation, batch sampler, pixel conversion,
distributed set-up. Each must give exactly the numbers of the per-stage code it replaced."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arpg import dist
from arpg.data.batches import EpochBatches
from arpg.data.pixels import from_uint8, to_tensor_NCHW, to_uint8
from arpg.errors import DataError
from arpg.lr_schedule import lr_by_progress, lr_by_step, set_lr
from arpg.utils import derive_seed, make_generator, seeded_global_rng

# ---- learning-rate schedules: against an independent spelling of the half-cosine --------------------


def half_cosine(peak, floor, t):
    """peak at t = 0, floor at t = 1: 0.5 (1 + cos(pi t)) written as cos^2(pi t / 2)."""
    return floor + (peak - floor) * math.cos(math.pi * t / 2) ** 2


@pytest.mark.parametrize("lr,min_lr,warmup,total", [(0.006, 1e-5, 50, 1300), (1e-3, 1e-5, 10, 60),
                                                    (2.0, 0.0, 0, 3), (0.3, 0.01, 7, 7)])
def test_generator_schedule_warms_up_linearly_then_follows_the_half_cosine(lr, min_lr, warmup, total):
    rates = [lr_by_step(s, peak=lr, floor=min_lr, warmup_steps=warmup, max_steps=total) for s in range(total + 2)]
    for s in range(warmup):  # a straight line through the origin, at the peak on the warm-up's last step
        assert rates[s] == pytest.approx(rates[0] * (s + 1), rel=1e-12)
    if warmup:
        assert rates[warmup - 1] == lr
    span = max(1, total - 1 - warmup)
    for s in range(warmup, total + 2):  # then from the peak to the floor at the last step, and held there
        assert rates[s] == pytest.approx(half_cosine(lr, min_lr, min(1.0, (s - warmup) / span)), rel=1e-12, abs=1e-15)
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))


@pytest.mark.parametrize("base,total,warmup,floor", [(0.003, 1000, 0.05, 0.1), (1e-3, 60, 0.05, 0.1),
                                                     (0.7, 13, 0.05, 0.1), (0.002, 1175, 0.05, 0.0),
                                                     (1.0, 101, 0.1, 0.0)])
def test_progress_schedule_warms_up_linearly_then_follows_the_half_cosine(base, total, warmup, floor):
    """The tokenizer's (floor 10% of the peak) and the classifier's (floor 0) schedules."""
    for step in range(total + 1):
        p = step / total
        rate = lr_by_progress(p, peak=base, warmup_share=warmup, floor_share=floor)
        if p < warmup:  # proportional to the progress, from 0.1% of the warm-up so the first step moves
            assert rate == pytest.approx(base * max(p, 1e-3) / warmup, rel=1e-12)
        else:
            assert rate == pytest.approx(half_cosine(base, floor * base, (p - warmup) / (1 - warmup)),
                                         rel=1e-12, abs=1e-15)


def test_schedule_shapes_and_set_lr():
    assert lr_by_step(99, peak=1.0, floor=0.1, warmup_steps=100, max_steps=200) == 1.0  # warm-up ends at peak
    assert lr_by_step(199, peak=1.0, floor=0.1, warmup_steps=100, max_steps=200) == pytest.approx(0.1)
    assert lr_by_progress(1.0, peak=2.0, warmup_share=0.05, floor_share=0.1) == pytest.approx(0.2)
    assert lr_by_progress(0.0, peak=1.0, warmup_share=0.05, floor_share=0.1) == pytest.approx(0.02)  # not 0
    groups = [{"lr": 0.0}, {"lr": 5.0}]
    assert set_lr(groups, 0.25) == 0.25 and [g["lr"] for g in groups] == [0.25, 0.25]


# ---- seeds --------------------------------------------------------------------------------------


def test_derive_seed_gives_the_seeds_of_both_old_call_styles():
    # values of the old derive_seed(seed, STREAM_..., ...) (STREAM_INIT 0, DATA 1, SAMPLES 2, DROPOUT 3)
    assert derive_seed(0, 0) == 7896617691693857887
    assert derive_seed(0, 1, 0) == 2918264622725855778
    assert derive_seed(0, 1, 7) == 2440468269607536873
    assert derive_seed(3, 2) == 5737856171534892084
    assert derive_seed(0, 3, 5, 1, 0) == 4463338576491229807
    # values of the old sampler batch_seed(seed, batch)
    assert [derive_seed(0, 0), derive_seed(0, 1), derive_seed(9, 3), derive_seed(0, 4)] == \
        [7896617691693857887, 2918264622725855778, 6001044651676530104, 2494635221133837528]
    assert all(0 <= derive_seed(s, k) < 2 ** 63 for s in range(3) for k in range(3))


def test_seeded_global_rng_is_seeded_inside_and_restores_outside():
    before = torch.get_rng_state()
    with seeded_global_rng(5):
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(inside, torch.rand(4, generator=make_generator(5)))
    with seeded_global_rng(None):
        torch.rand(3)  # draws, discarded
    assert torch.equal(torch.get_rng_state(), before)


# ---- batch sampler ------------------------------------------------------------------------------


def test_epoch_batches_drop_or_keep_the_ragged_tail():
    gen = make_generator(0)
    keep = EpochBatches(10, 4, lambda e: torch.randperm(10, generator=gen), drop_last=False, key="k", items="x")
    assert keep.steps_per_epoch == 3
    sizes = [len(keep.next()) for _ in range(6)]
    assert sizes == [4, 4, 2, 4, 4, 2]
    gen = make_generator(0)
    drop = EpochBatches(10, 4, lambda e: torch.randperm(10, generator=gen), drop_last=True, key="k", items="x")
    first = torch.cat([drop.next() for _ in range(2)])
    assert drop.steps_per_epoch == 2 and len(set(first.tolist())) == 8
    assert torch.equal(first, torch.randperm(10, generator=make_generator(0))[:8])  # epoch 0 is the first draw
    with pytest.raises(DataError, match="12 images cannot fill one batch of some.batch_size=16; lower some.batch_size"):
        EpochBatches(12, 16, lambda e: torch.arange(12), drop_last=True, key="some.batch_size", items="images")


def test_epoch_batches_resume_from_state_and_seek():
    def stream():
        gen = make_generator(3)
        return gen, EpochBatches(10, 4, lambda e: torch.randperm(10, generator=gen), drop_last=True,
                                 key="k", items="x")

    gen_a, a = stream()
    for _ in range(3):
        a.next()
    state, rng = a.state_dict(), gen_a.get_state()
    gen_b, b = stream()
    b.load_state_dict(state)
    gen_b.set_state(rng)
    for _ in range(5):  # crosses epoch boundaries
        assert torch.equal(a.next(), b.next())

    by_epoch = EpochBatches(9, 2, lambda e: torch.randperm(9, generator=make_generator(e)), drop_last=True,
                            key="k", items="x")
    steps = [by_epoch.next() for _ in range(10)]
    by_epoch.seek(6)  # epoch 1, second batch
    assert torch.equal(by_epoch.next(), steps[6]) and torch.equal(by_epoch.next(), steps[7])


# ---- pixels -------------------------------------------------------------------------------------


def test_pixel_conversions():
    images_NHWC = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    x = to_tensor_NCHW(images_NHWC)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.uint8 and x.is_contiguous()
    assert x[1, 2, 3, 1] == (1 * 48 + 3 * 12 + 1 * 3 + 2)
    with pytest.raises(DataError, match="uint8"):
        to_tensor_NCHW(images_NHWC.astype(np.float32))
    pixels = torch.arange(256, dtype=torch.uint8)
    unit = from_uint8(pixels)
    assert unit.dtype == torch.float32 and unit[0] == -1.0 and unit[-1] == 1.0
    assert torch.equal(unit, pixels.float() / 127.5 - 1.0)
    assert torch.equal(to_uint8(unit), pixels)  # round trip (LlamaGen's +128 rounds to nearest)


# ---- distributed --------------------------------------------------------------------------------


def test_one_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with dist.session("cpu") as (info, device):
        assert info == dist.DistInfo() and info.is_main and not info.enabled and device.type == "cpu"
        t = torch.tensor([2.0])
        assert dist.all_reduce_sum(t, info) is t and t.item() == 2.0
        assert dist.gather_to_main({"a": 1}, info) == [{"a": 1}]
        dist.barrier(info)
    assert not torch.distributed.is_initialized()


def test_session_destroys_the_group_also_on_error(monkeypatch, tmp_path):
    import torch.distributed as tdist

    # a real one-member gloo group, joined by session() as torchrun's environment describes it
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="boom"):
        with dist.session("cpu") as (info, _):
            assert info.enabled and info.is_main
            total = dist.all_reduce_sum(torch.tensor([3.0]), info)  # one member: the sum is itself
            assert total.item() == 3.0
            raise RuntimeError("boom")
    assert not tdist.is_initialized()


@pytest.mark.parametrize("env_threads, params_threads", [(2, 1), (1, 2)])
def test_set_threads_sets_numpys_blas_from_params_not_the_environment(env_threads, params_threads):
    """A BLAS sums in another order at another thread count, so the params value must win over
    whatever OPENBLAS_NUM_THREADS / OMP_NUM_THREADS the process started with."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, numpy, torch; from threadpoolctl import threadpool_info; "
            "from arpg.utils import set_threads; "
            f"set_threads({params_threads}); "
            "print(json.dumps([torch.get_num_threads()] + "
            "[i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']))")
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(env_threads), OMP_NUM_THREADS=str(env_threads),
               MKL_NUM_THREADS=str(env_threads))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout)
    assert len(counts) >= 2  # torch, and numpy's BLAS at least
    assert counts == [params_threads] * len(counts)
