"""The one checkpoint reader: weights only, code-running files refused on every path that loads a user's file."""

from __future__ import annotations

import argparse
import ast
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from arpg.checkpoint_io import check_state_dict, read_checkpoint
from arpg.cli import main
from arpg.config import load_params
from arpg.errors import CheckpointError
from arpg.paths import REPO_ROOT


class RunsCode:
    """Unpickling this calls os.system (touching `marker`): what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted(path: Path, marker: Path, layout_key: str = "state_dict", **save_kwargs) -> Path:
    """A checkpoint in a loader's layout whose unpickling would touch `marker`."""
    torch.save({layout_key: {"w": torch.zeros(2)}, "args": RunsCode(marker)}, path, **save_kwargs)
    return path


def assert_refused(err: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    msg = str(err.value)
    assert str(path) in msg and "system" in msg  # names the file and the offending global
    assert "nothing in it was run" in msg and "torch.save(" in msg  # ... and the fix
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_code_running_file_is_refused_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / "evil.pt", marker, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="was refused") as err:
        read_checkpoint(path, "train.arpg_pretrained")
    assert_refused(err, path, marker)
    assert "train.arpg_pretrained" in str(err.value)
    torch.load(path, weights_only=False)  # control: the file really does run code when fully unpickled
    assert marker.exists()


def test_namespace_bearing_release_file_loads(tmp_path):
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": {"w": torch.arange(3.0)}, "optimizer": {"state": {}}, "steps": 7,
                "args": argparse.Namespace(vq_model="VQ-16", lr=1e-4)}, path)
    blob = read_checkpoint(path, "tokenizer.pretrained")
    assert torch.equal(blob["model"]["w"], torch.arange(3.0))
    assert blob["args"] == argparse.Namespace(vq_model="VQ-16", lr=1e-4) and blob["steps"] == 7


def test_unreadable_user_file_is_not_to_be_deleted_but_a_pipeline_file_is(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:200])  # truncated copy
    with pytest.raises(CheckpointError, match="is unreadable: not a PyTorch checkpoint, or truncated") as err:
        read_checkpoint(path, "tokenizer.pretrained")
    assert "tokenizer.pretrained" in str(err.value) and "delete" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"delete it and rerun `arpg train`$"):
        read_checkpoint(path, "train state", written_by="arpg train")
    with pytest.raises(CheckpointError, match="tokenizer.pretrained not found at .*; fix the path"):
        read_checkpoint(tmp_path / "absent.pt", "tokenizer.pretrained")


def test_key_check_lists_missing_unexpected_and_misshaped_keys_at_once():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    state = dict(model.state_dict())
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(2, 4)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(model, state, "m.pt", "retrain it")
    assert str(err.value).splitlines() == [
        "m.pt does not fit the Sequential:",
        "  missing keys (1): 1.bias",
        "  unexpected keys (1): 2.weight",
        "  mis-shaped keys (1): 0.weight (checkpoint (2, 4), model (2, 3))",
        "  fix: retrain it",
    ]
    check_state_dict(model, model.state_dict(), "m.pt", "retrain it")  # a fitting state passes


def test_arpg_has_exactly_one_torch_load_call():
    calls = [f"{path.relative_to(REPO_ROOT)}"
             for path in sorted((REPO_ROOT / "arpg").rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"]
    assert calls == ["arpg/checkpoint_io.py"]


# --- every path that loads a user-given (or user-replaceable) file -----------------------------------


@pytest.mark.parametrize("decoder", ["arpg", "raster"])
def test_train_pretrained_generator_is_refused(params_file, tmp_path, decoder):
    from arpg.commands.train import run_train

    marker = tmp_path / "marker"
    path = crafted(tmp_path / f"{decoder}.pt", marker)
    params = load_params(params_file("configs/smoke.yaml", **{"tracking.enabled": False, "device": "cpu",
                                                              f"train.{decoder}_pretrained": str(path)}))
    with pytest.raises(CheckpointError, match=f"train.{decoder}_pretrained .* was refused") as err:
        run_train(params, decoder)
    assert_refused(err, path, marker)
    assert not params.layout.model_checkpoint(decoder).exists()


def test_sample_refuses_a_replaced_model_checkpoint(params_file, tmp_path, capsys):
    from arpg.models.vq import VQConfig, VQModel, tokenizer_payload
    from arpg.utils import atomic_torch_save

    params = load_params(params_file(**{"tracking.enabled": False, "device": "cpu"}))
    layout = params.layout
    atomic_torch_save(tokenizer_payload(VQModel(VQConfig.from_params(params))), layout.tokenizer_checkpoint)
    marker = tmp_path / "marker"
    layout.model_checkpoint("arpg").parent.mkdir(parents=True)
    crafted(layout.model_checkpoint("arpg"), marker)
    argv = ["sample", "--params", str(params.path), "--model", "arpg", "--steps", "4", "--cfg", "1.0",
            "--order", "random"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"generator checkpoint {layout.model_checkpoint('arpg')} was refused" in err and "system" in err
    assert not marker.exists()


def test_tokenizer_pretrained_is_refused(params_file, tmp_path, capsys):
    marker = tmp_path / "marker"
    path = crafted(tmp_path / "vq_ds16_c2i.pt", marker, layout_key="model")
    params = load_params(params_file(**{"tracking.enabled": False, "tokenizer.pretrained": str(path)}))
    assert main(["train-tokenizer", "--params", str(params.path)]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer.pretrained {path} was refused" in err and "system" in err and "delete" not in err
    assert not marker.exists() and not params.layout.tokenizer_checkpoint.exists()


def test_inception_weights_are_read_weights_only(tmp_path):
    from arpg.engine.evaluate import InceptionExtractor, compute_reference

    marker = tmp_path / "marker"
    evil = crafted(tmp_path / "inception.pth", marker)
    with pytest.raises(CheckpointError, match="evaluate.inception_weights .* was refused") as err:
        compute_reference(np.zeros((2, 8, 8, 1), np.uint8), "inception", evil, 2, torch.device("cpu"))
    assert_refused(err, evil, marker)


def test_inception_weights_load_bit_exactly_and_misshaped_keys_are_named(tmp_path, monkeypatch):
    """torch-fidelity's layout (a bare state dict) goes through the in-memory copy unchanged; random
    weights of the right shapes stand in for the released file."""
    from arpg.engine.evaluate import InceptionExtractor

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    with monkeypatch.context() as patch, torch.random.fork_rng(devices=[]):
        patch.setattr(InceptionExtractor, "load_state_dict", lambda self, state_dict, **kw: None)
        weights = InceptionExtractor("arpg-inception", ["2048"], feature_extractor_weights_path=empty).state_dict()
    good = tmp_path / "weights-inception.pth"
    torch.save(weights, good)
    loaded = InceptionExtractor("arpg-inception", ["2048"], feature_extractor_weights_path=good).state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], v) for k, v in weights.items())
    weights["fc.weight"] = weights["fc.weight"][:10]
    torch.save(weights, good)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys \(1\): fc.weight \(checkpoint \(10, 2048\), "
                                              r"model \(1008, 2048\)\)"):
        InceptionExtractor("arpg-inception", ["2048"], feature_extractor_weights_path=good)


def test_npz_reader_names_a_missing_truncated_or_pickled_archive(tmp_path):
    import numpy as np

    from arpg.checkpoint_io import read_npz
    from arpg.errors import DataError

    path = tmp_path / "stats.npz"
    with pytest.raises(DataError, match=r"stats not found at .*stats.npz; run `arpg make-it` first"):
        read_npz(path, "stats", written_by="arpg make-it")
    np.savez(path, mu=np.arange(3.0), names=np.array(["a", "b"]))
    blob = read_npz(path, "stats", written_by="arpg make-it", keys=("mu",))
    assert np.array_equal(blob["mu"], np.arange(3.0)) and list(blob["names"]) == ["a", "b"]
    np.savez(path, mu=np.array([{"runs": "code"}], dtype=object))  # an object array is a pickle: refused
    with pytest.raises(DataError, match=r"stats .*stats.npz is unreadable \(ValueError: .*pickle"):
        read_npz(path, "stats", written_by="arpg make-it")
    np.savez(path, mu=np.arange(1000.0))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=r"is unreadable \(\w+: .*\); delete it and rerun `arpg make-it`$"):
        read_npz(path, "stats", written_by="arpg make-it")


# --------------------------------------------------------------------------- every artifact kind, damaged

def _npy(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:120])  # a copy cut short (the header of each kind survives, or not)


def _valid_tokenizer(params) -> None:
    from arpg.models.vq import VQConfig, VQModel, tokenizer_payload
    from arpg.utils import atomic_torch_save, seeded_global_rng

    with seeded_global_rng(0):
        model = VQModel(VQConfig.from_params(params))
    atomic_torch_save(tokenizer_payload(model), params.layout.tokenizer_checkpoint)


def _images(params, split: str) -> None:
    lay, n = params.layout, params["data"]["num_classes"] * 2
    _npy(lay.images(split), np.zeros((n, 32, 32, 1), np.uint8))
    _npy(lay.labels(split), np.arange(n, dtype=np.int64) % params["data"]["num_classes"])


def _case_images(params):
    _images(params, "train")
    _cut(params.layout.images("train"))
    return ["train-tokenizer"], params.layout.images("train"), "prepared train images", "arpg prepare-data"


def _case_tokens(params):
    lay = params.layout
    _npy(lay.tokens("train"), np.zeros((20, 8, 8), np.int16))
    _npy(lay.token_labels("train"), np.zeros(20, np.int64))
    _cut(lay.tokens("train"))
    return ["train", "--model", "arpg"], lay.tokens("train"), "train token grids", "arpg tokenize"


def _case_tokenizer(params):
    _valid_tokenizer(params)
    _cut(params.layout.tokenizer_checkpoint)
    return ["tokenize"], params.layout.tokenizer_checkpoint, "tokenizer checkpoint", "arpg train-tokenizer"


def _case_generator(params):
    _valid_tokenizer(params)
    path = params.layout.model_checkpoint("arpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 cut short")
    return (["sample", "--model", "arpg", "--steps", "4", "--cfg", "2.0", "--order", "random"], path,
            "generator checkpoint", "arpg train --model arpg")


def _case_classifier(params):
    _images(params, "test")
    path = params.layout.classifier_checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x03\x04 cut short")
    return ["reference-stats", "--extractor", "classifier"], path, "classifier checkpoint", "arpg train-classifier"


def _samples(params):
    from arpg.paths import SweepPoint

    path = params.layout.samples(SweepPoint("arpg", 4, 2.0, "random"))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, arr_0=np.zeros((20, 32, 32, 1), np.uint8), labels=np.arange(20) % 10,
             tokens=np.zeros((20, 8, 8), np.int16))
    return path


_EVALUATE = ["evaluate", "--model", "arpg", "--steps", "4", "--cfg", "2.0", "--order", "random"]


def _case_samples(params):
    path = _samples(params)
    _cut(path)
    return _EVALUATE, path, "samples of arpg steps4_cfg2.0_random", "arpg sample --model arpg --steps 4"


def _case_reference(params):
    _samples(params)
    lay = params.layout
    lay.classifier_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    lay.classifier_checkpoint.write_bytes(b"weights")  # only hashed before the reference is read
    path = lay.reference_stats("classifier", "test")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=np.zeros((20, 4)))
    _cut(path)
    return _EVALUATE, path, "reference statistics for classifier", "arpg reference-stats --extractor classifier"


@pytest.mark.parametrize("case", [_case_images, _case_tokens, _case_tokenizer, _case_generator, _case_classifier,
                                  _case_samples, _case_reference], ids=lambda f: f.__name__[6:])
def test_each_artifact_kind_damaged_is_named_with_the_command_that_remakes_it(case, params_file, capsys):
    """Arrays (.npy), checkpoints (.pt) and archives (.npz), cut short, given to the command that reads
    them: exit 2, the file named, the command that remakes it, no traceback. (JSON outputs: the
    report's, tests/test_report.py.)"""
    params = load_params(params_file("configs/smoke.yaml", **{"tracking.enabled": False}))
    argv, path, what, remake = case(params)
    assert main([argv[0], "--params", str(params.path), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{what} {path} is unreadable (" in err, err
    assert f"delete it and rerun `{remake}" in err, err
