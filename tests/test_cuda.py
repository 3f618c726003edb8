"""The CUDA paths: the same numbers as on CPU, bf16 and torch.compile where the params allow them.

Run on a GPU node with `pytest -m cuda`; without CUDA every test here is skipped (CI has no GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from arpg.engine import profile as P
from arpg.engine.sampler import Context, generate_arpg, generate_raster
from arpg.data.tokens import TokenData
from arpg.engine.train import train
from arpg.models.vq import VQConfig
from arpg.utils import make_generator
from conftest import tiny_model
from test_profile import _reference_kv_bytes, tiny
from test_train import structured_tokens, train_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GRID, CODES, CLASSES = 4, 32, 3
N = GRID * GRID
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 would round fp32 matmuls / convolutions to 10-bit mantissas; the comparisons want fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _tiny(name: str):
    return tiny_model(name, codebook_size=CODES, num_classes=CLASSES, grid_size=GRID, seed=3)


def _pair(name: str):
    """The same seeded tiny model on CPU and on CUDA."""
    return _tiny(name), _tiny(name).to(CUDA)


@pytest.mark.parametrize("name", ["ARPG-T", "LlamaGen-T"])
def test_teacher_forced_logits_match_cpu(name):
    cpu, gpu = _pair(name)
    gen = make_generator(0)
    tokens_BN = torch.randint(0, CODES, (3, N), generator=gen)
    labels_B = torch.tensor([0, 2, -1])  # -1: the null class
    orders_BN = torch.rand(3, N, generator=gen).argsort(dim=1)
    with torch.no_grad():
        if name.startswith("ARPG"):
            want = cpu(tokens_BN, labels_B, orders_BN)
            got = gpu(tokens_BN.to(CUDA), labels_B.to(CUDA), orders_BN.to(CUDA))
        else:
            want = cpu(tokens_BN, labels_B)
            got = gpu(tokens_BN.to(CUDA), labels_B.to(CUDA))
    assert got.device.type == "cuda" and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=1e-4)


def test_greedy_cached_decoding_gives_the_cpu_tokens():
    """top_k=1 and a fixed order take the RNG out: CUDA must decode exactly the CPU tokens."""
    labels_B = torch.tensor([0, 1, 2, 1])
    order_N = torch.rand(N, generator=make_generator(5)).argsort()
    for name in ("ARPG-T", "LlamaGen-T"):
        cpu, gpu = _pair(name)
        outs = []
        for model, device in ((cpu, torch.device("cpu")), (gpu, CUDA)):
            gen = make_generator(0, device)
            if name.startswith("ARPG"):
                out = generate_arpg(model, labels_B.to(device), steps=5, cfg=3.0, top_k=1, order=order_N,
                                    generator=gen)
            else:
                out = generate_raster(model, labels_B.to(device), cfg=3.0, top_k=1, generator=gen)
            outs.append(out.cpu())
        assert torch.equal(outs[0], outs[1]), name


def test_bf16_decoding_runs_and_mostly_agrees_with_fp32():
    labels_B = torch.arange(8, device=CUDA) % CLASSES
    order_N = torch.rand(N, generator=make_generator(5)).argsort()
    _, fp32 = _pair("ARPG-T")
    bf16 = _tiny("ARPG-T").to(CUDA, torch.bfloat16)
    outs = [generate_arpg(m, labels_B, steps=4, cfg=2.0, top_k=1, order=order_N, generator=make_generator(0, CUDA))
            for m in (fp32, bf16)]
    assert outs[1].shape == (8, N) and int(outs[1].min()) >= 0 and int(outs[1].max()) < CODES
    agreement = (outs[0] == outs[1]).float().mean().item()
    print(f"bf16 vs fp32 greedy tokens agree on {agreement:.3f}")
    assert agreement > 0.8


def test_zero_shot_context_is_kept_on_cuda():
    _, gpu = _pair("ARPG-T")
    context_BN = torch.randint(0, CODES, (2, N), generator=make_generator(1)).to(CUDA)
    known_BN = torch.zeros(2, N, dtype=torch.bool, device=CUDA)
    known_BN[:, : N // 2] = True
    out = generate_arpg(gpu, torch.tensor([0, 1], device=CUDA), steps=3, cfg=2.0, order="random",
                        generator=make_generator(0, CUDA), context=Context(context_BN, known_BN))
    assert torch.equal(out[known_BN], context_BN[known_BN])


@pytest.mark.parametrize("kind,name", [("arpg", "ARPG-T"), ("raster", "LlamaGen-T")])
def test_bf16_compiled_training_learns(tmp_path, kind, name):
    vocab, classes, grid = 16, 4, 4
    grids, labels = structured_tokens(256, grid=grid, vocab=vocab, classes=classes)
    data = TokenData([grids], [labels], grid_size=grid, codebook_size=vocab, num_classes=classes)
    model = tiny_model(name, codebook_size=vocab, num_classes=classes, grid_size=grid, head_std=0.02)
    cfg = train_config(batch_size=32, lr=5e-3, warmup_steps=5, max_steps=80, log_every=20, checkpoint_every=1000,
                       precision="bf16", compile=True)
    result = train(model, kind, data, cfg, state_path=tmp_path / "s.pt", device=CUDA, progress=False)
    print(f"{kind}: final loss {result.final_loss:.4f} vs ln({vocab}) = {math.log(vocab):.4f}")
    assert result.steps == 80 and result.final_loss < 0.5 * math.log(vocab)
    assert next(model.parameters()).dtype == torch.float32  # autocast: the weights stay fp32


def test_vq_codes_and_decoding_match_cpu():
    cfg = VQConfig(in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=32,
                   codebook_size=64, codebook_dim=8)
    cpu = P.random_vq(cfg, seed=2).eval()
    gpu = P.random_vq(cfg, seed=2, device=CUDA).eval()
    images = torch.rand(4, 1, 16, 16, generator=make_generator(0)) * 2 - 1
    with torch.no_grad():
        codes_cpu, codes_gpu = cpu.encode(images), gpu.encode(images.to(CUDA)).cpu()
        assert (codes_cpu == codes_gpu).float().mean() > 0.99  # near-ties may flip a code or two
        torch.testing.assert_close(gpu.decode(codes_cpu.to(CUDA)).cpu(), cpu.decode(codes_cpu),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("precision,compile", [("fp32", False), ("bf16", True)])
def test_profile_row_on_cuda(precision, compile):
    """A CUDA row: events timing, allocator peaks, and a KV count at the generation dtype."""
    cuda = dict(tokenizer=P.RANDOM_VQ16, batch=2, device="cuda", precision=precision, compile=compile,
                max_seconds=300.0)  # the first call compiles
    specs = [tiny(**cuda), tiny(kind="raster", net="LlamaGen-T", steps=N, **cuda)]
    rows = P.run_profile(specs, log=print)  # isolated children, as `arpg profile` runs them
    itemsize = 2 if precision == "bf16" else 4
    for row in rows:
        assert row["status"] == "ok" and row["device"].startswith("cuda") and row["mem_kind"] == "cuda_allocated"
        assert row["gen_mem_bytes"] > 0 and row["e2e_s_median"] >= row["gen_s_median"] > 0
        assert row["precision"] == precision and row["compile"] == compile
    for row in rows:  # batch 2, doubled by CFG
        assert row["kv_cache_bytes"] == _reference_kv_bytes(row["net"], 4, N, itemsize)
