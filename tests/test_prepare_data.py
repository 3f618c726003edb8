import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arpg.cli import main
from arpg.config import load_params
from arpg.data.prepare import Geometry, fit_image, prepare, read_idx
from arpg.errors import DataError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(directory: Path, n_train=40, n_test=20, seed=0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


@pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(params_file):
    params = load_params(params_file())
    manifest = prepare(params)
    layout = params.layout
    train = np.load(layout.images("train"), mmap_mode="r")
    test = np.load(layout.images("test"), mmap_mode="r")
    assert train.shape == (60000, 32, 32, 1) and train.dtype == np.uint8
    assert test.shape == (10000, 32, 32, 1)
    assert np.bincount(np.load(layout.labels("train"))).tolist() == [6000] * 10
    assert np.bincount(np.load(layout.labels("test"))).tolist() == [1000] * 10
    # Padding adds a black border; the original 28x28 pixels keep the published mean.
    centre_mean = np.asarray(train[:, 2:30, 2:30, 0], dtype=np.float64).mean() / 255.0
    assert abs(centre_mean - 0.2860) < 0.001
    assert abs(manifest["splits"]["train"]["pixel_mean_source"] - 0.2860) < 0.001
    assert train[:, :2].max() == 0 and train[:, :, 30:].max() == 0
    saved = json.loads(layout.data_manifest.read_text())
    assert saved["splits"]["train"]["per_class"]["3"] == 6000
    assert len(saved["splits"]["train"]["images_sha256"]) == 64


def test_idx_round_trip_and_channels(tmp_path, params_file):
    _fake_fashion(tmp_path / "fm")
    raw = read_idx(tmp_path / "fm" / "train-images-idx3-ubyte.gz")
    assert raw.shape == (40, 28, 28)
    params = load_params(params_file(**{"data.path": str(tmp_path / "fm"), "data.channels": 3}))
    prepare(params)
    images = np.load(params.layout.images("train"))
    assert images.shape == (40, 32, 32, 3)
    assert (images[..., 0] == images[..., 2]).all()  # grey replicated
    assert (images[:, 2:30, 2:30, 0] == raw).all()


def test_max_per_class_caps_each_class(tmp_path, params_file):
    _fake_fashion(tmp_path / "fm", n_train=100)
    params = load_params(params_file(**{"data.path": str(tmp_path / "fm"), "data.max_per_class": 3}))
    manifest = prepare(params)
    assert manifest["splits"]["train"]["per_class"] == {str(c): 3 for c in range(10)}


def test_missing_source_says_how_to_install(tmp_path, params_file):
    params = load_params(params_file(**{"data.path": str(tmp_path / "absent")}))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        prepare(params)


def test_truncated_idx_is_named(tmp_path, params_file):
    _fake_fashion(tmp_path / "fm")
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    params = load_params(params_file(**{"data.path": str(tmp_path / "fm")}))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz is truncated"):
        prepare(params)


def _image_folder(root: Path, truncated: bool = True) -> Path:
    rng = np.random.default_rng(1)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(4):
            size = (40 + 8 * i, 30 + 4 * c)
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(root / name / f"{i}.jpg", quality=90)
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(root / name / "grey.png")
    if truncated:
        good = (root / "dog" / "0.jpg").read_bytes()
        (root / "dog" / "broken.jpg").write_bytes(good[: len(good) // 2])
    return root


def test_image_folder_skips_and_reports_truncated_jpeg(tmp_path, params_file):
    root = _image_folder(tmp_path / "train")
    _image_folder(tmp_path / "test", truncated=False)
    params = load_params(params_file(**{
        "data.source": "imagefolder", "data.path": str(root), "data.test_path": str(tmp_path / "test"),
        "data.num_classes": 2, "data.channels": 3, "data.resize": "center-crop"}))
    manifest = prepare(params)
    assert [Path(s["file"]).name for s in manifest["skipped"]] == ["broken.jpg"]
    assert "truncated" in manifest["skipped"][0]["reason"]
    images = np.load(params.layout.images("train"))
    assert images.shape == (10, 32, 32, 3)
    assert manifest["class_names"] == ["cat", "dog"]
    assert manifest["splits"]["train"]["per_class"] == {"0": 5, "1": 5}


def test_image_folder_corrupt_is_fatal_when_configured(tmp_path, params_file, capsys):
    root = _image_folder(tmp_path / "train")
    path = params_file(**{"data.source": "imagefolder", "data.path": str(root), "data.num_classes": 2,
                          "data.on_corrupt": "fail", "tracking.enabled": False})
    assert main(["prepare-data", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "Traceback" not in err and "on_corrupt" in err


def test_image_folder_holdout_and_class_count_check(tmp_path, params_file):
    root = _image_folder(tmp_path / "train", truncated=False)
    params = load_params(params_file(**{"data.source": "imagefolder", "data.path": str(root),
                                        "data.num_classes": 2, "data.test_fraction": 0.25}))
    manifest = prepare(params)
    assert manifest["splits"]["test"]["count"] + manifest["splits"]["train"]["count"] == 10
    assert set(manifest["splits"]["test"]["per_class"].values()) == {1}
    wrong = load_params(params_file(**{"data.source": "imagefolder", "data.path": str(root), "data.num_classes": 5}))
    with pytest.raises(Exception, match="data.num_classes is 5 but .* has 2 classes"):
        prepare(wrong)


@pytest.mark.parametrize("policy", ["pad", "center-crop", "resize"])
def test_fit_image_policies(policy):
    image = Image.fromarray(np.full((20, 40), 200, dtype=np.uint8), mode="L")
    out = np.asarray(fit_image(image, Geometry(16, policy, 1)))
    assert out.shape == (16, 16)
    if policy == "pad":  # 40x20 -> 16x8 centred: black bands above and below
        assert out[:4].max() == 0 and out[12:].max() == 0 and out[4:12].min() == 200
    else:
        assert out.min() == 200


# ---------------------------------------------------------------- bad input (issue 16)

def _one_image_folder(root: Path, images: dict[str, list[Image.Image]]) -> Path:
    for name, items in images.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(items):
            image.save(root / name / f"{i}.png")
    return root


def _folder_params(params_file, root: Path, **overrides):
    return load_params(params_file(**{"data.source": "imagefolder", "data.path": str(root), "data.num_classes": 2,
                                      "data.test_path": str(root), "data.resize": "resize", **overrides}))


def test_a_16_bit_png_is_scaled_not_clipped(tmp_path, params_file):
    ramp_16 = (np.arange(16 * 16, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)  # 0 .. 65535
    ramp_8 = np.round(ramp_16 / 257).astype(np.uint8)  # the same picture in 8 bits
    root = _one_image_folder(tmp_path / "imgs", {"a": [Image.fromarray(ramp_16)], "b": [Image.fromarray(ramp_8)]})
    with Image.open(root / "a" / "0.png") as png:
        assert png.mode.startswith("I")  # Pillow opens it as 16-bit grey
    params = _folder_params(params_file, root)
    prepare(params)
    images = np.load(params.layout.images("train"))
    assert images.shape == (2, 32, 32, 1)
    assert np.array_equal(images[0], images[1])  # not 70% white: scaled by 255/65535
    assert (images[0] == 255).mean() < 0.01


def test_a_float_image_is_refused_by_name(tmp_path, params_file):
    root = _one_image_folder(tmp_path / "imgs", {"a": [], "b": [Image.fromarray(np.zeros((16, 16), np.uint8))]})
    Image.fromarray(np.full((16, 16), 0.5, np.float32), mode="F").save(root / "a" / "0.tif")  # float pixels
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / "a" / "1.png")
    manifest = prepare(_folder_params(params_file, root))
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert "0.tif" in skipped and "mode F" in skipped["0.tif"]


def test_an_empty_class_folder_is_warned_about_or_refused(tmp_path, params_file, capsys):
    root = _one_image_folder(tmp_path / "imgs", {"a": [Image.fromarray(np.zeros((16, 16), np.uint8))], "b": []})
    manifest = prepare(_folder_params(params_file, root))
    assert manifest["empty_classes"] == ["b"]
    assert "warning" in capsys.readouterr().out
    strict = _folder_params(params_file, root, **{"data.on_corrupt": "fail"})
    with pytest.raises(DataError, match="hold no images"):
        prepare(strict)


def test_a_failed_decode_leaves_no_partial_file(tmp_path, params_file):
    root = _image_folder(tmp_path / "train")  # dog/broken.jpg is truncated
    params = _folder_params(params_file, root, **{"data.on_corrupt": "fail", "data.test_path": None})
    with pytest.raises(DataError, match="broken.jpg"):
        prepare(params)
    left = [p.name for p in params.layout.data_dir.iterdir()]
    assert not [name for name in left if "partial" in name] and "manifest.json" not in left


def test_a_wrong_class_count_is_refused_before_any_array_is_written(tmp_path, params_file):
    root = _image_folder(tmp_path / "train", truncated=False)
    params = _folder_params(params_file, root, **{"data.num_classes": 3})
    with pytest.raises(Exception, match="data.num_classes is 3 but .* has 2 classes"):
        prepare(params)
    assert not any(params.layout.data_dir.iterdir())
    _fake_fashion(tmp_path / "fm")
    fashion = load_params(params_file(**{"data.path": str(tmp_path / "fm"), "data.num_classes": 5}))
    with pytest.raises(Exception, match="data.num_classes is 5"):
        prepare(fashion)
    assert not any(fashion.layout.data_dir.iterdir())


def test_too_little_disk_is_refused_before_decoding(tmp_path, params_file, monkeypatch):
    import shutil
    from collections import namedtuple

    root = _image_folder(tmp_path / "train", truncated=False)
    params = _folder_params(params_file, root)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DataError, match="MiB free; the prepared arrays need"):
        prepare(params)
