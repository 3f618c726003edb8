"""Small shared helpers: devices, seeded generators and seed derivation, atomic writes, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from arpg.errors import ArpgError, TrainingDiverged


def resolve_device(name: str = "auto"):
    """'auto' -> cuda when available, else cpu. Never hard-codes .cuda()."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArpgError(f"device {name!r} requested but CUDA is not available; set device: auto or cpu in params")
    return device


def require_finite(value: float, what: str, step: int, fix: str, state_path: str | os.PathLike | None = None) -> None:
    """Stop a training stage at its first non-finite loss, before the step is applied or saved,
    so nothing diverged is ever written as an output and the last good checkpoint is kept."""
    import math

    if not math.isfinite(value):
        kept = (f" The last good checkpoint is kept in {state_path} (a rerun resumes from it; delete it to "
                "start over with new settings)." if state_path else "")
        raise TrainingDiverged(f"{what} is {value} at step {step}: training diverged and stopped without "
                               f"writing its outputs; {fix}.{kept}")


@contextlib.contextmanager
def deterministic_algorithms(device) -> Iterator[None]:
    """Training on CPU: deterministic kernels only (a non-deterministic one fails loudly instead of
    making two runs of the same params differ). On CUDA the caller's setting is kept."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(before or torch.device(device).type == "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def make_generator(seed: int, device="cpu"):
    """A dedicated RNG stream: no stage touches the global torch RNG."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


_UMASK = os.umask(0o022)  # read once (it can only be read by setting it) and put back at once
os.umask(_UMASK)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. (base seed, stream constant, step): SeedSequence mixes
    them, so nearby keys give unrelated streams. The one seed derivation of every stage."""
    import numpy as np

    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


def require_writable_dir(path, key: str) -> None:
    """Create `path` if needed and prove a file can be written in it, or raise an ArpgError naming
    the params key, the path and the fix."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".arpg-write-check-"):
            pass
    except OSError as exc:
        raise ArpgError(f"{key} {path} is not writable ({exc.strerror or exc}); make it writable, free disk "
                        f"space, or set {key} to a directory you can write") from None


@contextlib.contextmanager
def seeded_global_rng(seed: int | None, device="cpu") -> Iterator[None]:
    """Run a block whose draws can only come from torch's global RNG (nn.Module default init,
    nn.Dropout) with that RNG seeded to `seed` (None: left as is), inside a fork: the global state
    outside the block is untouched. `device`: where the draws happen (a CUDA device's state is forked too)."""
    import torch

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        if seed is not None:
            torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary file beside `path`, renamed over it when the block succeeds and removed
    when it fails: a kill never leaves half a file. `suffix` keeps writers that infer the format
    from the name (np.save, PIL) happy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's file is private (0600); the result gets open()'s usual mode
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_save_png(image, path: str | os.PathLike) -> None:
    """A PIL image as PNG, atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename. Through a file object: given a path, torch.save
    names the archive's records after the (random) temporary file, so identical runs differed."""
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def atomic_save_npy(path: str | os.PathLike, array) -> None:
    """np.save atomically; the result memory-maps (np.load(path, mmap_mode="r"))."""
    import numpy as np

    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array)


def atomic_save_npz(path: str | os.PathLike, **arrays) -> None:
    """np.savez, atomically and byte-for-byte reproducible: np.savez stamps every zip entry with the
    current time, so two identical runs would write different bytes; here the stamp is fixed."""
    import zipfile

    import numpy as np

    with atomic_path(path, ".npz") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(value), allow_pickle=False)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    return Path(path)


def write_csv(path: str | os.PathLike, rows: list[Mapping[str, Any]], cols: list[str] | None = None) -> Path:
    """A CSV table of `rows` with the columns `cols` (default: the first row's keys; missing and None
    cells empty), atomically."""
    import csv
    import io

    cols = cols or (list(rows[0]) if rows else [])
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: "" if row.get(c) is None else row.get(c) for c in cols})
    return atomic_write_text(path, text.getvalue())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(obj: Any):
    from collections.abc import Mapping

    if isinstance(obj, Mapping):  # a params section (arpg.config.ParamsView)
        return dict(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def require_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """Return `path` if it is a file, else raise naming what it is and how to make it."""
    path = Path(path)
    if not path.is_file():
        raise ArpgError(f"{what} not found at {path}; {fix}")
    return path


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Lay out, write (120 dpi, atomically) and close a matplotlib figure; returns the path.
    Agg PNGs carry no timestamp, so the same figure gives the same bytes (for one matplotlib)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    with atomic_path(path, path.suffix) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png")  # the format of `path`, not of `tmp`
    plt.close(fig)
    return path


def set_threads(n: int) -> None:
    """torch intra-op threads and numpy's BLAS threads (params' value for the stage: see
    arpg.config.stage_threads). Both are part of the result: a BLAS sums in another order at another
    thread count (e.g. KID's kernel matrices), so neither may come from the environment."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(int(n))
    threadpool_limits(limits=int(n), user_api="blas")
