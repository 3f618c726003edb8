"""Shared test helpers: params files in temporary directories."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from arpg.paths import REPO_ROOT


def write_params(tmp_path: Path, base: str = "params.yaml", **overrides) -> Path:
    """Copy a params file into tmp_path with dotted-key overrides, outputs and MLflow in tmp_path.

    write_params(tmp_path, **{"sample.steps": [8]}) -> path of the new file.
    """
    values = yaml.safe_load((REPO_ROOT / base).read_text())
    values = copy.deepcopy(values)
    values["output_dir"] = str(tmp_path / "outputs")
    values["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    values["report"]["dir"] = str(tmp_path / "report")
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path



def tiny_model(name: str, *, codebook_size: int, num_classes: int, grid_size: int, seed: int = 0,
               head_std: float = 1.0, **overrides):
    """A registry model in eval mode with a seeded init and a random output head: the released
    zero-init head gives uniform logits, which would hide decoding and numerics errors."""
    import torch

    from arpg.models.registry import build_model
    from arpg.utils import make_generator

    gen = make_generator(seed)
    model = build_model(name, codebook_size=codebook_size, num_classes=num_classes, grid_size=grid_size,
                        generator=gen, **overrides)
    head = model.head if hasattr(model, "head") else model.output
    torch.nn.init.normal_(head.weight, std=head_std, generator=gen)
    return model.eval()

@pytest.fixture
def params_file(tmp_path):
    """Factory: params_file(**overrides) -> Path to a params file living in tmp_path."""
    return lambda base="params.yaml", **overrides: write_params(tmp_path, base, **overrides)


@pytest.fixture(scope="session")
def study(tmp_path_factory) -> Path:
    """The smoke study, run once per session (tests/test_reproducible.py, then tests/test_slurm.py,
    whose last test retrains one model in it)."""
    from test_reproducible import run_smoke_study

    return run_smoke_study(tmp_path_factory.mktemp("study-a"))


def _blas_threads() -> int:
    import numpy  # noqa: F401 - loads the BLAS whose pool is read
    from threadpoolctl import threadpool_info

    return max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=1)


_BLAS_THREADS_AT_START = _blas_threads()  # numpy's BLAS as the test process started (its environment)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny test tensors: two intra-op threads only contend with each other (and with
    other jobs on a 2-core machine), so every test starts single-threaded, whatever the
    test before it set; numpy's BLAS as the process started (a command run in-process sets both)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=_BLAS_THREADS_AT_START, user_api="blas")


@pytest.fixture(autouse=True)
def _isolated_mlflow(monkeypatch, tmp_path):
    """No test writes to the repository's mlflow.db; no test run starts MLflow's system-metrics thread
    (tests/test_tracking.py turns it on where it is under test; the smoke study runs it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow-env.db'}")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
