"""The evaluation classifier: model, checkpoint, training loop."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from arpg.engine.classifier import ClassifierTrainConfig, accuracy, predict, train_classifier
from arpg.errors import CheckpointError, ConfigError, TrainingDiverged
from arpg.models.classifier import Classifier, ClassifierConfig, load_classifier, save_classifier

FASHION = Path("/usr/share/datasets/fashion-mnist")
CPU = torch.device("cpu")


def _toy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes a CNN separates easily: a bright left half vs a bright right half, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 16, 16, 1))
    for i, y in enumerate(labels):
        images[i, :, (0 if y == 0 else 8):(8 if y == 0 else 16)] += 150
    return images.astype(np.uint8), labels.astype(np.int64)


def test_forward_shapes_and_normalization():
    model = Classifier(ClassifierConfig(in_channels=3, num_classes=7, resolution=16, width=4, feature_dim=24))
    logits, features = model(torch.zeros(5, 3, 16, 16))
    assert logits.shape == (5, 7) and features.shape == (5, 24)
    assert (features >= 0).all()  # post-ReLU features
    x = Classifier.normalize(torch.tensor([0, 255], dtype=torch.uint8))
    assert torch.allclose(x, torch.tensor([-1.0, 1.0]))


def test_resolution_must_divide_by_8():
    with pytest.raises(ConfigError, match="divisible by 8"):
        ClassifierConfig(resolution=28)


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    model = Classifier(ClassifierConfig(resolution=16, width=4, feature_dim=8))
    path = tmp_path / "c.pt"
    save_classifier(model, path)
    loaded = load_classifier(path)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    model.eval()
    assert torch.equal(model(x)[0], loaded(x)[0])

    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["extra.weight"] = torch.zeros(1)
    del blob["state_dict"]["head.bias"]
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): head.bias\n  unexpected keys \(1\): extra.weight"):
        load_classifier(path)
    with pytest.raises(CheckpointError, match="arpg train-classifier"):
        load_classifier(tmp_path / "absent.pt")


def test_training_learns_and_is_reproducible():
    images, labels = _toy(512, seed=0)
    cfg = ClassifierConfig(num_classes=2, resolution=16, width=4, feature_dim=16)
    # The schedule follows steps, never the clock, so runs are bit-identical.
    train = ClassifierTrainConfig(batch_size=64, lr=3e-3, epochs=2, seed=3)
    model_a, stats = train_classifier(images, labels, cfg, train, CPU)
    model_b, _ = train_classifier(images, labels, cfg, train, CPU)
    assert stats["steps"] == 16
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name
    test_images, test_labels = _toy(256, seed=1)
    logits, features = predict(model_a, test_images, 100, CPU)
    assert logits.shape == (256, 2) and features.shape == (256, 16)
    assert accuracy(logits, test_labels) > 0.95


def test_training_leaves_the_global_rng_alone():
    images, labels = _toy(64, seed=0)
    cfg = ClassifierConfig(num_classes=2, resolution=16, width=4, feature_dim=8)
    train = ClassifierTrainConfig(batch_size=16, lr=3e-3, epochs=1, seed=3)
    torch.manual_seed(123)  # the test's own state; the classifier's init is seeded inside a fork
    before = torch.get_rng_state()
    model_a, _ = train_classifier(images, labels, cfg, train, CPU)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(456)  # another global state: the same weights
    model_b, _ = train_classifier(images, labels, cfg, train, CPU)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_diverged_loss_stops_training_with_a_message(monkeypatch):
    import torch.nn.functional as F

    images, labels = _toy(64, seed=0)
    cfg = ClassifierConfig(num_classes=2, resolution=16, width=4, feature_dim=8)
    clean = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda logits, y: clean(logits, y) * float("inf"))
    with pytest.raises(TrainingDiverged, match=r"classifier loss is inf at step 1.*lower classifier\.lr"):
        train_classifier(images, labels, cfg, ClassifierTrainConfig(batch_size=8, lr=2e-3, epochs=1, seed=0), CPU)


def test_schedule_warms_up_then_anneals_to_zero():
    from arpg.lr_schedule import lr_by_progress

    lrs = [lr_by_progress(p, peak=1.0, warmup_share=0.1, floor_share=0.0) for p in np.linspace(0, 1, 101)]
    assert lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    assert accuracy(logits, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def _fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    from arpg.data.prepare import read_idx

    stem = {"train": "train", "test": "t10k"}[split]
    images = read_idx(FASHION / f"{stem}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / f"{stem}-labels-idx1-ubyte.gz")
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None], labels.astype(np.int64)  # 28 -> 32, centred


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST idx files not installed")
def test_fashion_mnist_accuracy_within_budget():
    """The issue's bar: >= 90% test accuracy with the default params (a step budget: ~30-45 s on
    2 CPU cores, printed, not asserted)."""
    import yaml

    from arpg.engine.classifier import model_config_from_params
    from arpg.paths import REPO_ROOT

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    train_x, train_y = _fashion("train")
    test_x, test_y = _fashion("test")
    start = time.monotonic()
    model, stats = train_classifier(train_x, train_y, model_config_from_params(params),
                                    ClassifierTrainConfig.from_params(params), CPU)
    logits, _ = predict(model, test_x, 1000, CPU)
    acc = accuracy(logits, test_y)
    print(f"fashion-mnist classifier: {acc:.4f} test accuracy, {stats}, {time.monotonic() - start:.1f} s")
    assert acc >= 0.90
