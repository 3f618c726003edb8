"""Decode a dataset source into the prepared arrays + manifest.

Sources:
  fashion-mnist  the four idx files (gzip or raw) from Debian's dataset-fashion-mnist or a user dir;
  imagefolder    one sub-folder per class (ImageNet train layout), decoded with Pillow.

Output (see arpg.paths.Layout): `{split}_images.npy` uint8 [N, H, W, C] and
`{split}_labels.npy` int64 [N] (memory-mappable), and `manifest.json` recording the
source, geometry and channel policy, split sizes, per-class counts, checksums and
every skipped file with its reason.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from arpg.errors import ConfigError, DataError
from arpg.paths import Layout
from arpg.utils import atomic_save_npy, write_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass(frozen=True)
class Geometry:
    resolution: int
    resize: str  # pad | center-crop | resize
    channels: int  # 1 | 3


# --- idx (MNIST-family) files ---------------------------------------------------

def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); reinstall the dataset or point data.path elsewhere") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic); check data.path")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} values; re-download it")
    return data.reshape(shape)


def fashion_mnist_split(directory: Path, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """uint8 [N, 28, 28] images, int64 [N] labels and a source record."""
    img_stem, lbl_stem = FASHION_FILES[split]
    img_path, lbl_path = _find_idx(directory, img_stem), _find_idx(directory, lbl_stem)
    if img_path is None or lbl_path is None:
        raise DataError(
            f"Fashion-MNIST idx files not found in {directory} (expected {img_stem}.gz and "
            f"{lbl_stem}.gz); install them with `apt-get install dataset-fashion-mnist` "
            f"(Debian, files land in /usr/share/datasets/fashion-mnist) or set data.path in params "
            f"to a directory holding the four idx files")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{img_path} / {lbl_path}: shapes {images.shape} / {labels.shape} do not pair up")
    source = {"images": str(img_path), "labels": str(lbl_path),
              "images_sha256": _sha256_file(img_path), "labels_sha256": _sha256_file(lbl_path)}
    return images, labels.astype(np.int64), source


# --- geometry -------------------------------------------------------------------

def fit_array(images_NHW: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Bring grey uint8 [N, h, w] arrays to [N, R, R, C] with the configured policy."""
    n, h, w = images_NHW.shape
    res = geometry.resolution
    if geometry.resize == "pad" and h <= res and w <= res:
        out = np.zeros((n, res, res), dtype=np.uint8)
        top, left = (res - h) // 2, (res - w) // 2
        out[:, top:top + h, left:left + w] = images_NHW
    else:
        from PIL import Image

        out = np.stack([np.asarray(fit_image(Image.fromarray(im), geometry)) for im in images_NHW])
    out = out[..., None]  # [N, R, R, 1]
    return np.repeat(out, 3, axis=-1) if geometry.channels == 3 else out


def to_8bit(image):
    """A PIL image with 8-bit channels. 16-bit grey (modes I;16*, or I as Pillow opens 16-bit PNGs)
    is scaled by 255/65535, not clipped; 32-bit data (values over 65535, float mode F) has no known
    range and is refused (ValueError, which the caller reports as an unusable file)."""
    from PIL import Image

    if image.mode == "F":
        raise ValueError("32-bit float image (mode F): its pixel range is unknown; save it as 8- or 16-bit")
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"32-bit integer image with values in [{values.min()}, {values.max()}]: its range is "
                             "unknown; save it as 8- or 16-bit")
        return Image.fromarray(np.round(values.astype(np.float64) * (255 / 65535)).astype(np.uint8), mode="L")
    return image


def fit_image(image, geometry: Geometry):
    """Resize / centre-crop / pad a PIL image to resolution x resolution in the channel policy."""
    from PIL import Image

    image = to_8bit(image).convert("RGB" if geometry.channels == 3 else "L")  # grey -> 3 channels, RGB -> luma
    res = geometry.resolution
    w, h = image.size
    if geometry.resize == "resize":
        return image.resize((res, res), Image.BICUBIC)
    if geometry.resize == "center-crop":
        scale = res / min(w, h)  # shorter side -> res, then crop the centre (ADM protocol)
        image = image.resize((max(res, round(w * scale)), max(res, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - res) // 2, (h - res) // 2
        return image.crop((left, top, left + res, top + res))
    scale = res / max(w, h)  # pad: longer side -> res, centre on black
    if scale != 1:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    canvas = Image.new(image.mode, (res, res))
    canvas.paste(image, ((res - image.size[0]) // 2, (res - image.size[1]) // 2))
    return canvas


# --- image folders ----------------------------------------------------------------

def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; set data.path to a directory with one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders; expected {root}/<class>/<image files>")
    files = [(path, label) for label, name in enumerate(classes)
             for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    return classes, files


def _decode(job: tuple[str, Geometry]) -> tuple[np.ndarray | None, str | None]:
    from PIL import Image, UnidentifiedImageError

    path, geometry = job
    try:
        with Image.open(path) as image:
            image.load()  # forces a full decode: truncated files fail here
            array = np.asarray(fit_image(image, geometry), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return (array[..., None] if array.ndim == 2 else array), None


def decode_files(files: list[tuple[Path, int]], geometry: Geometry, on_corrupt: str, out_images: Path,
                 workers: int) -> tuple[np.ndarray, list[dict]]:
    """Decode into a memory-mapped array at out_images; returns labels and skipped records."""
    res, ch = geometry.resolution, geometry.channels
    tmp = out_images.with_name(f".{out_images.name}.partial.npy")
    labels, skipped, kept = [], [], 0
    jobs = [(str(path), geometry) for path, _ in files]
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), res, res, ch))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for (path, label), (image, error) in zip(files, pool.map(_decode, jobs, chunksize=64)):
                if error is not None:
                    if on_corrupt == "fail":
                        raise DataError(f"corrupt image {path}: {error}; remove or replace it, or set "
                                        f"data.on_corrupt: skip to list it in the manifest and continue")
                    skipped.append({"file": str(path), "reason": error})
                    continue
                array[kept] = image
                labels.append(label)
                kept += 1
        array.flush()
        del array
        final = np.load(tmp, mmap_mode="r")[:kept]
        atomic_save_npy(out_images, final)  # a compact copy without the skipped rows
    finally:  # a failed decode leaves no dataset-sized scratch file behind
        tmp.unlink(missing_ok=True)
    return np.asarray(labels, dtype=np.int64), skipped


def _split_holdout(files: list[tuple[Path, int]], fraction: float, seed: int):
    """Deterministic per-class hold-out: the test split of an image folder without test_path."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    by_class: dict[int, list] = {}
    for item in files:
        by_class.setdefault(item[1], []).append(item)
    for label in sorted(by_class):
        items = by_class[label]
        take = set(rng.permutation(len(items))[: max(1, round(fraction * len(items)))].tolist())
        for i, item in enumerate(items):
            (test if i in take else train).append(item)
    return train, test


def _cap_per_class(items: Iterable, cap: int | None, label_of) -> list:
    if cap is None:
        return list(items)
    seen: Counter = Counter()
    out = []
    for item in items:
        label = label_of(item)
        if seen[label] < cap:
            seen[label] += 1
            out.append(item)
    return out


# --- entry point ---------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_class_count(classes: list[str], data) -> None:
    if len(classes) != data["num_classes"]:
        raise ConfigError(f"data.num_classes is {data['num_classes']} but {data['path']} has {len(classes)} classes; "
                          f"set data.num_classes: {len(classes)}")


def _empty_classes(classes: list[str], files: list[tuple[Path, int]], root: Path, on_corrupt: str) -> list[str]:
    """Class folders without a single image file: refused under on_corrupt: fail, else warned about."""
    counts = Counter(label for _, label in files)
    empty = [name for label, name in enumerate(classes) if counts[label] == 0]
    if empty:
        where = ", ".join(str(root / name) for name in empty)
        if on_corrupt == "fail":
            raise DataError(f"class folder(s) {where} hold no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "add images or remove the folder (and lower data.num_classes), or set "
                            "data.on_corrupt: skip to keep the class without images")
        print(f"warning: class folder(s) {where} hold no images: the class is kept (label ids stay by folder "
              "name) but no model sees an example of it; add images or remove the folder")
    return empty


def _check_free_space(directory: Path, needed_bytes: int) -> None:
    import shutil

    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise DataError(f"{directory} has {free / 2**20:.0f} MiB free; the prepared arrays need about "
                        f"{needed_bytes / 2**20:.0f} MiB; free disk space or set output_dir on a larger disk")


def prepare(params) -> dict:
    """Write the prepared arrays and manifest; returns the manifest."""
    data = params["data"]
    layout: Layout = params.layout
    layout.data_dir.mkdir(parents=True, exist_ok=True)
    geometry = Geometry(data["resolution"], data["resize"], data["channels"])
    manifest: dict = {"source": data["source"], "path": str(data["path"]), "resolution": geometry.resolution,
                      "resize": geometry.resize, "channels": geometry.channels,
                      "channel_policy": "grey replicated to RGB" if geometry.channels == 3 else "RGB converted to luma (L)",
                      "splits": {}, "skipped": []}

    if data["source"] == "fashion-mnist":
        manifest["class_names"] = FASHION_CLASSES
        _check_class_count(FASHION_CLASSES, data)
        manifest["sources"] = {}
        for split in ("train", "test"):
            raw, labels, source = fashion_mnist_split(Path(data["path"]), split)
            keep = _cap_per_class(range(len(labels)), data["max_per_class"], lambda i: int(labels[i]))
            raw, labels = raw[keep], labels[keep]
            images = fit_array(raw, geometry)
            atomic_save_npy(layout.images(split), images)
            atomic_save_npy(layout.labels(split), labels)
            manifest["sources"][split] = source
            manifest["splits"][split] = {"pixel_mean_source": float(raw.mean() / 255.0)}
    else:
        root = Path(data["path"])
        classes, files = scan_image_folder(root)
        manifest["class_names"] = classes
        _check_class_count(classes, data)  # before any array is written
        manifest["empty_classes"] = _empty_classes(classes, files, root, data["on_corrupt"])
        if data["test_path"]:
            test_classes, test_files = scan_image_folder(Path(data["test_path"]))
            if test_classes != classes:
                raise DataError(f"class folders of data.test_path {data['test_path']} differ from data.path {root}")
            splits = {"train": files, "test": test_files}
        else:
            train, test = _split_holdout(files, data["test_fraction"], params["seed"])
            splits = {"train": train, "test": test}
        workers = max(1, min(os.cpu_count() or 1, 16))
        splits = {split: _cap_per_class(items, data["max_per_class"], lambda item: item[1])
                  for split, items in splits.items()}
        # each split is decoded into a scratch array, then copied compactly: twice its size at the peak
        _check_free_space(layout.data_dir, max(2 * len(items) for items in splits.values())
                          * geometry.resolution ** 2 * geometry.channels)
        for split, items in splits.items():
            labels, skipped = decode_files(items, geometry, data["on_corrupt"], layout.images(split), workers)
            atomic_save_npy(layout.labels(split), labels)
            manifest["skipped"] += [dict(s, split=split) for s in skipped]
            manifest["splits"][split] = {}

    from arpg.checkpoint_io import read_npy

    n_found = len(manifest["class_names"])
    for split in ("train", "test"):
        images = read_npy(layout.images(split), f"prepared {split} images", written_by="arpg prepare-data")
        labels = np.asarray(read_npy(layout.labels(split), f"prepared {split} labels",
                                     written_by="arpg prepare-data"))
        counts = np.bincount(labels, minlength=n_found)
        if images.shape[0] == 0:
            raise DataError(f"no usable {split} images in {data['path']} (see skipped files in {layout.data_manifest})")
        manifest["splits"][split].update({
            "count": int(images.shape[0]),
            "shape": list(images.shape),
            "per_class": {str(c): int(k) for c, k in enumerate(counts)},
            "pixel_mean": float(np.asarray(images, dtype=np.float64).mean() / 255.0),
            "images_sha256": _sha256_file(layout.images(split)),
            "labels_sha256": _sha256_file(layout.labels(split)),
        })
    write_json(layout.data_manifest, manifest)
    return manifest
