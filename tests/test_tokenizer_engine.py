"""Tokenizer loops: metrics against references, resume, tokenization artifacts, pretrained import."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from arpg.cli import main
from arpg.config import load_params
from arpg.commands.tokenize import tokenize_dataset
from arpg.commands.train_tokenizer import train_from_params
from arpg.engine import tokenizer as engine
from arpg.engine.image_metrics import psnr, ssim
from arpg.errors import CheckpointError, TrainingDiverged
from arpg.data.pixels import from_uint8
from arpg.models.vq import VQConfig, VQModel, load_tokenizer
from arpg.utils import make_generator



TINY = {
    "data.resolution": 16,
    "tokenizer.base_channels": 8,
    "tokenizer.channel_mult": [1, 2],
    "tokenizer.num_res_blocks": 1,
    "tokenizer.z_channels": 8,
    "tokenizer.codebook_size": 32,
    "tokenizer.codebook_dim": 4,
    "tokenizer.norm_groups": 4,
    "tokenizer.batch_size": 8,
    "tokenizer.max_steps": 4,
    "tokenizer.checkpoint_every": 2,
    "tokenizer.log_every": 1,
    "tokenizer.dead_code_every": 2,
    "tokenizer.eval_images": 12,
    "tracking.enabled": False,
}


def blobs(n: int, seed: int, size: int = 16) -> np.ndarray:
    """uint8 [n, size, size, 1]: bright ellipses on black (structured, like padded Fashion-MNIST)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.zeros((n, size, size, 1), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(4, size - 4, 2)
        ry, rx = rng.uniform(2, 5, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        out[i, ..., 0] = np.where(inside, rng.integers(120, 255), 0)
    return out


@pytest.fixture
def tiny_params(params_file):
    def make(**overrides):
        params = load_params(params_file(**(TINY | overrides)))
        layout = params.layout
        layout.data_dir.mkdir(parents=True, exist_ok=True)
        for split, n, seed in (("train", 40, 0), ("test", 12, 1)):
            np.save(layout.images(split), blobs(n, seed))
            np.save(layout.labels(split), np.arange(n, dtype=np.int64) % 10)
        return params
    return make


# --- metrics ----------------------------------------------------------------------------

def test_psnr_matches_formula():
    gen = make_generator(0)
    a = torch.randint(0, 256, (3, 1, 16, 16), generator=gen, dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 1, 16, 16), generator=gen, dtype=torch.uint8)
    mse = ((a.numpy().astype(np.float64) - b.numpy()) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(psnr(a, b).numpy(), 20 * np.log10(255) - 10 * np.log10(mse), rtol=1e-12)
    assert torch.isinf(psnr(a, a)).all()


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two 2-D images with scipy's Gaussian filter (sigma 1.5, truncate 3.5 -> 11 taps), interior only."""
    a, b = a.astype(np.float64), b.astype(np.float64)

    def f(x):
        return gaussian_filter(x, 1.5, truncate=3.5)[5:-5, 5:-5]

    mu_a, mu_b = f(a), f(b)
    va, vb, cov = f(a * a) - mu_a ** 2, f(b * b) - mu_b ** 2, f(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return float(s.mean())


def test_ssim_matches_scipy_reference():
    gen = make_generator(1)
    a = torch.randint(0, 256, (2, 1, 24, 20), generator=gen, dtype=torch.uint8)
    noise = torch.randint(-30, 31, a.shape, generator=gen)
    b = (a.int() + noise).clamp(0, 255).to(torch.uint8)
    got = ssim(a, b)
    for i in range(2):
        assert got[i].item() == pytest.approx(ssim_reference(a[i, 0].numpy(), b[i, 0].numpy()), abs=1e-10)
    assert ssim(a, a).sub(1).abs().max().item() < 1e-12
    assert 0.2 < got.mean().item() < 0.99


def test_codebook_stats_on_known_histogram():
    tokens = np.array([[0, 1], [2, 3]] * 5)  # 4 of 8 codes, equally often
    stats = engine.codebook_stats(tokens, 8)
    assert stats["usage"] == 0.5 and stats["codes_used"] == 4
    assert stats["perplexity"] == pytest.approx(4.0)
    skewed = engine.codebook_stats(np.array([0, 0, 0, 1]), 4)
    p = np.array([0.75, 0.25])
    assert skewed["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_lr_schedule_warms_up_then_anneals():
    from arpg.lr_schedule import lr_by_progress

    def lr_at(progress):
        return lr_by_progress(progress, peak=1.0, warmup_share=engine.WARMUP_SHARE, floor_share=engine.MIN_LR_SHARE)

    warm = [lr_at(engine.WARMUP_SHARE * f) for f in (0.0, 0.25, 0.5, 1.0)]
    assert warm[0] < 0.05 and warm == sorted(warm)
    assert lr_at(engine.WARMUP_SHARE) == pytest.approx(1.0)
    assert lr_at(1.0) == pytest.approx(engine.MIN_LR_SHARE)
    mid = (1 + engine.WARMUP_SHARE) / 2
    assert lr_at(mid) == pytest.approx((1 + engine.MIN_LR_SHARE) / 2)


def test_dead_codes_move_onto_batch_latents():
    cfg = VQConfig(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=8,
                   codebook_size=8, codebook_dim=4, norm_groups=4)
    model = VQModel(cfg)
    before = model.quantize.embedding.weight.detach().clone()
    z = torch.randn(2, 4, 3, 3, generator=make_generator(0))
    dead = torch.tensor([True, False, False, True, False, False, False, False])
    assert engine.restart_dead_codes(model, dead, z, make_generator(1)) == 2
    after = model.quantize.embedding.weight.detach()
    assert torch.equal(after[~dead], before[~dead])
    latents = torch.nn.functional.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    for row in after[dead]:
        assert (latents - row).abs().sum(1).min() < 1e-6


# --- training, resume, tokenization -------------------------------------------------------

def test_training_reduces_loss_and_writes_artifacts(tiny_params):
    params = tiny_params(**{"tokenizer.max_steps": 30, "tokenizer.log_every": 10, "tokenizer.lr": 0.003})
    summary = train_from_params(params, progress=False)
    layout = params.layout
    assert summary["steps"] == 30
    state = torch.load(layout.tokenizer_state, weights_only=False)
    first, last = state["history"][0], state["history"][-1]
    assert last["loss"] < 0.7 * first["loss"]
    assert json.loads(layout.tokenizer_metrics.read_text())["steps"] == 30
    model = load_tokenizer(layout.tokenizer_checkpoint)
    assert model.config.in_channels == 1 and model.config.codebook_size == 32


def test_training_leaves_the_global_rng_alone(tiny_params):
    params = tiny_params()
    torch.manual_seed(123)  # the test's own state; the tokenizer's init is seeded inside a fork
    before = torch.get_rng_state()
    train_from_params(params, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_diverged_loss_stops_and_keeps_the_last_good_checkpoint(tiny_params, monkeypatch):
    params = tiny_params(**{"tokenizer.max_steps": 6})
    calls = {"n": 0}
    clean_forward = VQModel.forward

    def forward_turning_nan_at_step_4(self, x):
        calls["n"] += 1
        out = clean_forward(self, x)
        return out._replace(recon_BCHW=out.recon_BCHW * float("nan")) if calls["n"] >= 4 else out

    monkeypatch.setattr(VQModel, "forward", forward_turning_nan_at_step_4)
    with pytest.raises(TrainingDiverged, match=r"tokenizer loss is nan at step 4.*lower tokenizer\.lr"):
        train_from_params(params, progress=False)
    state = torch.load(params.layout.tokenizer_state, weights_only=False)
    assert state["step"] == 2  # checkpoint_every 2: the last good state, not the diverged step
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not params.layout.tokenizer_checkpoint.exists() and not params.layout.tokenizer_metrics.exists()


def test_interrupted_training_resumes_to_the_same_weights(tiny_params, monkeypatch):
    straight = tiny_params()
    train_from_params(straight, progress=False)
    expected = torch.load(straight.layout.tokenizer_checkpoint)["model"]
    for path in (straight.layout.tokenizer_state, straight.layout.tokenizer_checkpoint):
        path.unlink()

    calls = {"n": 0}
    forward = VQModel.forward

    def dying_forward(self, x):
        calls["n"] += 1
        if calls["n"] == 4:  # during step 4: the checkpoint of step 2 is on disk
            raise KeyboardInterrupt
        return forward(self, x)

    monkeypatch.setattr(VQModel, "forward", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        train_from_params(straight, progress=False)
    assert torch.load(straight.layout.tokenizer_state, weights_only=False)["step"] == 2
    monkeypatch.setattr(VQModel, "forward", forward)
    summary = train_from_params(straight, progress=False)
    assert summary["steps"] == 4
    resumed = torch.load(straight.layout.tokenizer_checkpoint)["model"]
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)


def test_resume_with_other_sizes_is_refused(tiny_params, params_file):
    params = tiny_params(**{"tokenizer.max_steps": 2})
    train_from_params(params, progress=False)
    other = load_params(params_file(**(TINY | {"tokenizer.codebook_size": 64, "tokenizer.max_steps": 2})))
    with pytest.raises(CheckpointError, match="delete it"):
        train_from_params(other, progress=False)


def test_resume_checks_the_training_settings_but_not_the_logging_cadence(tiny_params, params_file):
    params = tiny_params(**{"tokenizer.max_steps": 2})
    train_from_params(params, progress=False)
    faster = load_params(params_file(**(TINY | {"tokenizer.lr": 2e-3, "tokenizer.max_steps": 2})))
    with pytest.raises(CheckpointError, match="other tokenizer settings; delete it"):
        train_from_params(faster, progress=False)
    relogged = load_params(params_file(**(TINY | {"tokenizer.log_every": 2, "tokenizer.checkpoint_every": 1,
                                                  "tokenizer.max_steps": 2})))
    assert train_from_params(relogged, progress=False)["steps"] == 2


def test_adversarial_loss_trains_the_discriminator(tiny_params):
    params = tiny_params(**{"tokenizer.adversarial_weight": 0.1, "tokenizer.adversarial_start": 1})
    train_from_params(params, progress=False)
    state = torch.load(params.layout.tokenizer_state, weights_only=False)
    logged = [h for h in state["history"] if "d_loss" in h]
    assert [h["step"] for h in logged] == [2, 3, 4]  # off at step 1, on from adversarial_start
    assert state["discriminator"] is not None


def test_tokenize_writes_grids_labels_metrics_and_grid(tiny_params):
    params = tiny_params(**{"tokenizer.tokenize_flip": True})
    train_from_params(params, progress=False)
    metrics = tokenize_dataset(params, batch_size=5, grid_images=6)
    layout = params.layout
    model = load_tokenizer(layout.tokenizer_checkpoint)
    train = np.load(layout.images("train"))
    pixels = torch.from_numpy(train).permute(0, 3, 1, 2)
    for split, flip in (("train", False), ("train_flip", True)):
        tokens = np.load(layout.tokens(split), mmap_mode="r")
        assert tokens.dtype == np.int16 and tokens.shape == (40, 8, 8)
        source = pixels.flip(-1) if flip else pixels
        with torch.no_grad():  # same chunking as the stage: conv numerics depend on the batch shape
            expected = torch.cat([model.encode(from_uint8(source[i:i + 5])) for i in range(0, 40, 5)])
        assert np.array_equal(np.asarray(tokens), expected.numpy())
        assert np.array_equal(np.load(layout.token_labels(split)), np.arange(40) % 10)
    assert np.load(layout.tokens("test")).shape == (12, 8, 8)
    saved = json.loads(layout.tokenize_metrics.read_text())
    assert saved["psnr"] == pytest.approx(metrics["psnr"]) and saved["eval_images"] == 12
    assert 0 < saved["codebook_usage"] <= 1 and 1 <= saved["codebook_perplexity"] <= 32
    with torch.no_grad():
        test = torch.from_numpy(np.load(layout.images("test"))).permute(0, 3, 1, 2)
        recon = engine.reconstruct_pixels(model, test, 5, "cpu")
    assert saved["psnr"] == pytest.approx(psnr(recon, test).mean().item())
    psnr_N = psnr(recon, test).numpy()  # the mean's normal interval, from the per-image values
    se = psnr_N.std(ddof=1) / np.sqrt(12)
    band = saved["intervals"]["psnr"]
    assert band["se"] == pytest.approx(se) and band["n"] == 12
    assert band["lo"] == pytest.approx(saved["psnr"] - 1.959964 * se) and band["hi"] == pytest.approx(
        saved["psnr"] + 1.959964 * se)
    from PIL import Image
    with Image.open(layout.reconstructions) as png:  # 1 column-block of 6 pairs: 2 rows of 16 px + gaps
        assert png.size == (2 * (6 * 18 + 2), 2 * (2 * 18 + 2))


def test_cli_train_and_tokenize(tiny_params, capsys):
    params = tiny_params(**{"tokenizer.tokenize_flip": False})
    assert main(["train-tokenizer", "--params", str(params.path), "--no-progress"]) == 0
    assert main(["tokenize", "--params", str(params.path)]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "codes used" in out
    assert not params.layout.tokens("train_flip").exists()


def test_pretrained_checkpoint_is_imported_strictly(tiny_params, tmp_path, capsys):
    params = tiny_params()
    cfg = VQConfig.from_params(params)
    source = VQModel(cfg)
    good = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": source.state_dict(), "args": argparse.Namespace(codebook_size=32)}, good)
    imported = tiny_params(**{"tokenizer.pretrained": str(good)})
    assert main(["train-tokenizer", "--params", str(imported.path)]) == 0
    model = load_tokenizer(imported.layout.tokenizer_checkpoint)
    x = torch.rand(2, 1, 16, 16, generator=make_generator(0)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.encode(x), source.eval().encode(x))

    broken = tmp_path / "broken.pt"
    sd = source.state_dict()
    sd.pop("quantize.embedding.weight")
    torch.save({"model": sd}, broken)
    bad = tiny_params(**{"tokenizer.pretrained": str(broken)})
    assert main(["train-tokenizer", "--params", str(bad.path)]) == 2
    err = capsys.readouterr().err
    assert "missing keys (1): quantize.embedding.weight" in err


def test_an_unreadable_pretrained_tokenizer_is_not_called_deletable(tiny_params, tmp_path, capsys):
    truncated = tmp_path / "vq_ds16_c2i.pt"  # the user's own download, cut short
    truncated.write_bytes(b"PK\x03\x04 not the whole file")
    bad = tiny_params(**{"tokenizer.pretrained": str(truncated)})
    assert main(["train-tokenizer", "--params", str(bad.path)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.pretrained" in err and str(truncated) in err and "copied completely" in err
    assert "delete" not in err and "Traceback" not in err
    assert truncated.is_file()



def test_tokenizer_training_runs_under_deterministic_algorithms(tiny_params, monkeypatch):
    """Like generator training: the rule's 2 threads once gave two fresh runs that differed (4e-7
    after 5 steps). That drift does not show on every CPU (none on this AMD EPYC, even with the
    flag off), so what is checked is that every training step runs with the flag on."""
    import arpg.engine.tokenizer as loop

    seen = []
    real_forward = VQModel.forward

    def forward(self, x):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return real_forward(self, x)

    monkeypatch.setattr(loop.VQModel, "forward", forward)
    before = torch.are_deterministic_algorithms_enabled()
    train_from_params(tiny_params(), progress=False)
    assert len(seen) == TINY["tokenizer.max_steps"] and all(seen)
    assert torch.are_deterministic_algorithms_enabled() == before  # restored afterwards
