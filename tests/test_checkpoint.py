"""Saving and strict loading of generators: ours and released layouts are interchangeable."""

import argparse

import pytest
import torch

from arpg.errors import CheckpointError
from arpg.models.checkpoint import load_generator, save_generator
from arpg.models.registry import build_model

V, C, G = 48, 6, 4


def randomized(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, G * G), generator=g)
    labels = torch.tensor([1, -1])
    orders = torch.stack([torch.randperm(G * G, generator=g) for _ in range(B)])
    return tokens, labels, orders


@pytest.mark.parametrize("name", ["ARPG-T", "LlamaGen-T"])
def test_save_load_roundtrip_gives_identical_logits(tmp_path, name):
    model = randomized(build_model(name, codebook_size=V, num_classes=C, grid_size=G), 0)
    path = tmp_path / "model.pt"
    payload = save_generator(model, path, name)
    assert set(payload) == {"state_dict", "config", "kind", "name"}
    assert payload["kind"] == ("arpg" if name.startswith("ARPG") else "raster") and payload["name"] == name
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == set(model.state_dict())
    loaded = load_generator(path)
    assert not loaded.training and loaded.config == model.config
    tokens, labels, orders = inputs()
    args = (tokens, labels, orders) if name.startswith("ARPG") else (tokens, labels)
    assert torch.equal(loaded(*args), model(*args))
    assert load_generator(path, name, codebook_size=V, num_classes=C, grid_size=G).config == model.config


def test_released_arpg_layout_loads_by_name(tmp_path):
    model = randomized(build_model("ARPG-T", codebook_size=V, num_classes=C, grid_size=G), 1)
    path = tmp_path / "arpg_release.pt"
    # a release training file also pickles its argparse Namespace
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CheckpointError, match="registry name"):
        load_generator(path)
    with pytest.raises(CheckpointError, match="grid_size"):
        load_generator(path, "ARPG-T")
    loaded = load_generator(path, "ARPG-T", grid_size=G)  # codebook / classes from the shapes
    assert (loaded.config.codebook_size, loaded.config.num_classes) == (V, C)
    tokens, labels, orders = inputs(1)
    assert torch.equal(loaded(tokens, labels, orders), model(tokens, labels, orders))


def test_llamagen_layout_with_ddp_prefix_loads(tmp_path):
    model = randomized(build_model("LlamaGen-T", codebook_size=V, num_classes=C, grid_size=G), 2)
    path = tmp_path / "gpt.pt"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}, "steps": 10}, path)
    loaded = load_generator(path, "LlamaGen-T", grid_size=G)
    tokens, labels, _ = inputs(2)
    assert torch.equal(loaded(tokens, labels), model(tokens, labels))


def test_mismatch_lists_missing_unexpected_and_misshaped(tmp_path):
    model = build_model("ARPG-T", codebook_size=V, num_classes=C, grid_size=G)
    sd = dict(model.state_dict())
    del sd["layers.to_v.weight"]
    sd["layers.extra.weight"] = torch.zeros(3)
    sd["layers.self_dec.0.attn.to_q.weight"] = torch.zeros(64, 32)
    path = tmp_path / "bad.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError) as err:
        load_generator(path, "ARPG-T", grid_size=G)
    msg = str(err.value)
    assert "missing keys (1): layers.to_v.weight" in msg
    assert "unexpected keys (1): layers.extra.weight" in msg
    assert "mis-shaped keys (1): layers.self_dec.0.attn.to_q.weight (checkpoint (64, 32), model (64, 64))" in msg


def test_wrong_size_name_is_rejected(tmp_path):
    model = build_model("ARPG-T", codebook_size=V, num_classes=C, grid_size=G)
    path = tmp_path / "r.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        load_generator(path, "ARPG-S", grid_size=G)


def test_our_checkpoint_rejects_other_token_space(tmp_path):
    model = build_model("ARPG-T", codebook_size=V, num_classes=C, grid_size=G)
    path = tmp_path / "m.pt"
    save_generator(model, path, "ARPG-T")
    with pytest.raises(CheckpointError, match="codebook_size=48"):
        load_generator(path, codebook_size=512)
    with pytest.raises(CheckpointError, match="holds 'ARPG-T'"):
        load_generator(path, "ARPG-S")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_generator(tmp_path / "nope.pt", "ARPG-T", grid_size=G)
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is unreadable: not a PyTorch checkpoint") as err:
        load_generator(bad, "ARPG-T", grid_size=G)
    assert "delete" not in str(err.value)  # a user-given file: never advise deleting it
    junk = tmp_path / "junk.pt"
    torch.save({"optimizer": {"lr": 1}}, junk)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_generator(junk, "ARPG-T", grid_size=G)


@pytest.mark.parametrize("model, other_size", [("arpg", "LlamaGen-T"), ("raster", "ARPG-T")])
def test_sample_refuses_another_decoders_model_file_naming_it_and_the_fix(params_file, capsys, model, other_size):
    """The raster model.pt where ARPG's belongs (or the reverse): a message, exit 2, no traceback."""
    from arpg.cli import main
    from arpg.config import load_params
    from arpg.models.checkpoint import save_generator
    from arpg.models.registry import build_model
    from arpg.models.vq import VQConfig, VQModel, tokenizer_payload
    from arpg.utils import atomic_torch_save

    params = load_params(params_file("configs/smoke.yaml", **{"tracking.enabled": False, "device": "cpu"}))
    layout = params.layout
    layout.tokenizer_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(tokenizer_payload(VQModel(VQConfig.from_params(params))), layout.tokenizer_checkpoint)
    layout.model_checkpoint(model).parent.mkdir(parents=True, exist_ok=True)
    wrong = build_model(other_size, codebook_size=params["tokenizer"]["codebook_size"],
                        num_classes=params["data"]["num_classes"], grid_size=8)
    save_generator(wrong, layout.model_checkpoint(model), other_size)
    steps, order = ("4", "random") if model == "arpg" else ("64", "raster")
    argv = ["sample", "--params", str(params.path), "--model", model, "--steps", steps, "--cfg", "1.0",
            "--order", order]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(layout.model_checkpoint(model)) in err and f"arpg train --model {model}" in err
    assert "Traceback" not in err and not list(layout.out.glob("samples/**/*.npz"))
