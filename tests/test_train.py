"""The training engine: schedule, decay groups, data order, resume after SIGKILL, DDP equivalence,
and that training actually learns."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from arpg.config import load_params
from arpg.data.tokens import TokenData
from arpg.engine.ema import EMA
from arpg.engine.train import TrainConfig, draw_conditioning, param_groups, token_batches, train
from arpg.commands.train import run_train
from arpg.errors import ArpgError, CheckpointError, ConfigError, DataError, TrainingDiverged
from arpg.models.checkpoint import load_generator
from arpg.models.registry import build_model
from arpg.paths import REPO_ROOT
from arpg.utils import make_generator

CPU = torch.device("cpu")
V, C, G = 64, 10, 8  # configs/smoke.yaml: codebook 64, 10 classes, 32 px / 4 -> 8x8 tokens


def train_config(**overrides) -> TrainConfig:
    """configs/smoke.yaml's train section (TrainConfig has no defaults of its own) with test sizes."""
    return dataclasses.replace(TrainConfig.from_params(load_params(REPO_ROOT / "configs" / "smoke.yaml")),
                               **overrides)


def structured_tokens(n: int, seed: int = 0, grid: int = G, vocab: int = V, classes: int = C):
    """Token grids fully determined by (class, position): learnable, far from uniform."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int64)
    pos = np.arange(grid * grid)
    grids = ((labels[:, None] * 7 + pos[None] * 3) % vocab).reshape(n, grid, grid).astype(np.int16)
    return grids, labels


def write_tokens(params, n: int = 64) -> None:
    layout = params.layout
    layout.tokens_dir.mkdir(parents=True, exist_ok=True)
    grids, labels = structured_tokens(n)
    for split, g in (("train", grids), ("train_flip", grids[:, :, ::-1])):
        np.save(layout.tokens(split), np.ascontiguousarray(g))
        np.save(layout.token_labels(split), labels)


def smoke_params(params_file, **overrides):
    base = {"tracking.enabled": False, "device": "cpu", "train.batch_size": 8, "train.max_steps": 10,
            "train.warmup_steps": 2, "train.checkpoint_every": 3, "train.log_every": 2}
    params = load_params(params_file("configs/smoke.yaml", **{**base, **overrides}))
    write_tokens(params)
    return params


def tiny_data(n: int = 64) -> TokenData:
    grids, labels = structured_tokens(n)
    return TokenData([grids], [labels], grid_size=G, codebook_size=V, num_classes=C)


def tiny_model(name="ARPG-T", seed=0, **overrides):
    return build_model(name, codebook_size=V, num_classes=C, grid_size=G, generator=make_generator(seed), **overrides)


# --------------------------------------------------------------------------- pieces


def test_lr_schedule_values():
    cfg = train_config(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    # warm-up: linear, reaching lr at the last warm-up step
    assert [cfg.lr_at(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # half-cosine over steps 4..13: 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 4) / 9))
    assert cfg.lr_at(4) == pytest.approx(1.0)
    assert cfg.lr_at(7) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 3)))  # 0.775
    assert cfg.lr_at(7) == pytest.approx(0.775)
    assert cfg.lr_at(13) == pytest.approx(0.1)
    decay = [cfg.lr_at(s) for s in range(4, 14)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    # no warm-up: the first step already runs at lr
    assert train_config(lr=2.0, min_lr=0.0, warmup_steps=0, max_steps=3).lr_at(0) == pytest.approx(2.0)


def test_weight_decay_groups_and_their_effect():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert "embeddings.weight" in decayed and "head.weight" in decayed and "layers.to_k.weight" in decayed
    assert "layers.self_dec.0.ffn.w1.weight" in decayed
    assert plain == {n for n in names.values() if n.endswith("norm.weight")}
    assert decayed | plain == set(names.values()) and not decayed & plain

    # AdamW with zero gradients: decayed weights shrink by (1 - lr * wd), norms stay put
    opt = torch.optim.AdamW(param_groups(model, 0.5), lr=0.1, betas=(0.9, 0.95))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 0.95 if n in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, rtol=0, atol=1e-7)


def test_batch_order_is_a_function_of_the_step():
    cfg = train_config(batch_size=3, seed=5)
    order = token_batches(10, cfg)
    assert order.steps_per_epoch == 3
    steps = [order.next() for _ in range(6)]
    epoch0 = torch.cat(steps[:3])
    assert len(set(epoch0.tolist())) == 9  # no repeats inside an epoch; the remainder is dropped
    assert not torch.equal(epoch0, torch.cat(steps[3:]))
    fresh = token_batches(10, cfg)  # a resumed run jumps straight to step 4
    fresh.seek(4)
    assert torch.equal(fresh.next(), steps[4]) and torch.equal(fresh.next(), steps[5])
    assert not torch.equal(token_batches(10, train_config(batch_size=3, seed=6)).next(), steps[0])
    with pytest.raises(DataError, match="train.batch_size"):
        token_batches(2, cfg)


def test_conditioning_draws():
    labels = torch.arange(4000) % 10
    dropped, orders = draw_conditioning(labels, 16, "arpg", 0.1, make_generator(0))
    assert abs((dropped == -1).float().mean().item() - 0.1) < 0.015
    kept = dropped != -1
    assert torch.equal(dropped[kept], labels[kept])
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(4000, 16))  # permutations
    assert len({tuple(o) for o in orders[:100].tolist()}) == 100  # per sample
    again, orders2 = draw_conditioning(labels, 16, "arpg", 0.1, make_generator(0))
    assert torch.equal(again, dropped) and torch.equal(orders2, orders)
    _, none = draw_conditioning(labels, 16, "raster", 0.1, make_generator(0))
    assert none is None


def test_ema_update_matches_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.state_dict()["weight"], 0.9 * start + 0.1 * (start + 1.0))


def test_token_data_checks_and_gathers():
    grids, labels = structured_tokens(6)
    flip = np.ascontiguousarray(grids[:, :, ::-1])
    data = TokenData([grids, flip], [labels, labels], grid_size=G, codebook_size=V, num_classes=C)
    assert len(data) == 12
    tokens_BN, labels_B = data.batch(np.array([7, 0, 11]))
    assert torch.equal(tokens_BN[0], torch.from_numpy(flip[1].reshape(-1).astype(np.int64)))
    assert torch.equal(tokens_BN[1], torch.from_numpy(grids[0].reshape(-1).astype(np.int64)))
    assert labels_B.tolist() == [labels[1], labels[0], labels[5]]
    with pytest.raises(DataError, match="outside the codebook"):
        TokenData([grids], [labels], grid_size=G, codebook_size=8, num_classes=C)
    with pytest.raises(DataError, match="expected"):
        TokenData([grids], [labels], grid_size=4, codebook_size=V, num_classes=C)
    with pytest.raises(DataError, match="data.num_classes"):
        TokenData([grids], [labels], grid_size=G, codebook_size=V, num_classes=2)


def test_batch_must_split_over_accumulation(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        train(tiny_model(), "arpg", tiny_data(), train_config(batch_size=6, grad_accum=4, max_steps=1),
              state_path=tmp_path / "s.pt", device=CPU, progress=False)


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("kind,name", [("arpg", "ARPG-T"), ("raster", "LlamaGen-T")])
def test_loss_falls_well_below_uniform_guess(tmp_path, kind, name):
    vocab, classes, grid = 16, 4, 4  # small enough to learn in seconds
    grids, labels = structured_tokens(256, grid=grid, vocab=vocab, classes=classes)
    data = TokenData([grids], [labels], grid_size=grid, codebook_size=vocab, num_classes=classes)
    model = build_model(name, codebook_size=vocab, num_classes=classes, grid_size=grid, generator=make_generator(0))
    cfg = train_config(batch_size=32, lr=5e-3, warmup_steps=5, max_steps=80, log_every=20, checkpoint_every=1000)
    result = train(model, kind, data, cfg, state_path=tmp_path / "s.pt", device=CPU, progress=False)
    uniform = math.log(vocab)
    print(f"{kind}: final loss {result.final_loss:.4f} vs uniform ln({vocab}) = {uniform:.4f}")
    assert result.steps == 80
    assert result.final_loss < 0.5 * uniform


def test_training_leaves_the_global_rng_alone(params_file):
    params = smoke_params(params_file, **{"train.max_steps": 3, "train.grad_accum": 2, "train.ema": 0.5})
    torch.manual_seed(123)  # the test's own state: dropout is seeded per micro-step inside a fork
    before = torch.get_rng_state()
    run_train(params, "arpg")
    assert torch.equal(torch.get_rng_state(), before)


def test_a_diverged_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()
    calls = {"n": 0}
    clean_loss = model.loss

    def loss_turning_nan_at_step_6(*args):
        calls["n"] += 1
        loss = clean_loss(*args)
        return loss * float("nan") if calls["n"] >= 6 else loss

    model.loss = loss_turning_nan_at_step_6
    cfg = train_config(batch_size=8, max_steps=10, log_every=5, checkpoint_every=4)
    with pytest.raises(TrainingDiverged, match=r"nan at step 6.*lower train\.lr.*s\.pt"):
        train(model, "arpg", tiny_data(), cfg, state_path=tmp_path / "s.pt", device=CPU, progress=False)
    state = torch.load(tmp_path / "s.pt", weights_only=False)
    assert state["step"] == 4  # the last periodic checkpoint, before the divergence
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_refuses_a_different_run(tmp_path):
    cfg = train_config(batch_size=8, max_steps=2, checkpoint_every=1)
    train(tiny_model(), "arpg", tiny_data(), cfg, state_path=tmp_path / "s.pt", device=CPU, progress=False)
    changed = train_config(batch_size=8, max_steps=2, checkpoint_every=1, lr=0.5)
    with pytest.raises(CheckpointError, match="lr"):
        train(tiny_model(), "arpg", tiny_data(), changed, state_path=tmp_path / "s.pt", device=CPU, progress=False)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="delete it"):
        train(tiny_model(), "arpg", tiny_data(), cfg, state_path=tmp_path / "bad.pt", device=CPU, progress=False)


# --------------------------------------------------------------------------- the command


@pytest.mark.slow  # MLflow store creation dominates
def test_command_trains_and_writes_outputs(params_file, capsys):
    params = smoke_params(params_file, **{"tracking.enabled": True, "train.ema": 0.9, "train.max_steps": 4})
    metrics = run_train(params, "arpg")
    out = capsys.readouterr().out
    assert f"uniform-guess ln({V})" in out
    layout = params.layout
    on_disk = json.loads(layout.model_metrics("arpg").read_text())
    assert on_disk["steps"] == 4 and on_disk["weights"] == "ema" and on_disk["uniform_loss"] == pytest.approx(math.log(V))
    assert metrics["final_loss"] == pytest.approx(on_disk["final_loss"])
    model = load_generator(layout.model_checkpoint("arpg"), "ARPG-T", grid_size=G)
    state = torch.load(layout.model_state("arpg"), weights_only=False)
    for key, value in model.state_dict().items():  # the sampling checkpoint holds the EMA weights
        torch.testing.assert_close(value, state["ema"][key], rtol=0, atol=0)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("arpg-smoke").experiment_id],
                              filter_string="tags.`arpg.stage` = 'train'")
    assert [h.step for h in client.get_metric_history(runs[0].info.run_id, "loss")] == [2, 4]


def test_pretrained_weights_skip_training(params_file, tmp_path):
    released = tmp_path / "released.pt"
    source = tiny_model(seed=3)
    torch.save({"state_dict": source.state_dict()}, released)  # released layout: no config
    params = smoke_params(params_file, **{"train.arpg_pretrained": str(released)})
    metrics = run_train(params, "arpg")
    assert metrics["steps"] == 0 and not params.layout.model_state("arpg").exists()
    loaded = load_generator(params.layout.model_checkpoint("arpg"))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    missing = smoke_params(params_file, **{"train.arpg_pretrained": str(tmp_path / "nope.pt")})
    with pytest.raises(ArpgError, match="train.arpg_pretrained"):
        run_train(missing, "arpg")


# --------------------------------------------------------------------------- kill / resume

_KILLING_LAUNCHER = textwrap.dedent("""
    import os, signal, sys
    import torch
    kill_at = int(os.environ["KILL_AT_STEP"])
    calls = 0
    original = torch.optim.AdamW.step
    def step(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == kill_at:  # mid-run: after this step's backward, before its update
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)
    torch.optim.AdamW.step = step
    from arpg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _run_cli(params_path: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AT_STEP": str(kill_at),
           "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", _KILLING_LAUNCHER, "train", "--params", str(params_path),
                           "--model", "arpg"], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    from conftest import write_params

    overrides = {"tracking.enabled": False, "device": "cpu", "train.batch_size": 8, "train.grad_accum": 2,
                 "train.max_steps": 10, "train.warmup_steps": 2, "train.checkpoint_every": 3,
                 "train.log_every": 2, "train.ema": 0.8}
    paths = {}
    for run in ("straight", "killed"):
        (tmp_path / run).mkdir()
        paths[run] = write_params(tmp_path / run, "configs/smoke.yaml", **overrides)
        write_tokens(load_params(paths[run]))

    straight = _run_cli(paths["straight"])
    assert straight.returncode == 0, straight.stderr
    killed = _run_cli(paths["killed"], kill_at=8)  # step index 7; the last checkpoint is at step 6
    assert killed.returncode == -signal.SIGKILL
    layout = load_params(paths["killed"]).layout
    assert torch.load(layout.model_state("arpg"), weights_only=False)["step"] == 6
    assert not layout.model_checkpoint("arpg").exists()
    resumed = _run_cli(paths["killed"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout

    ref = torch.load(load_params(paths["straight"]).layout.model_state("arpg"), weights_only=False)
    got = torch.load(layout.model_state("arpg"), weights_only=False)
    assert got["step"] == ref["step"] == 10
    for part in ("model", "ema"):
        for key, value in ref[part].items():
            assert torch.equal(got[part][key], value), f"{part}.{key} differs after resume"
    assert torch.equal(got["generator"], ref["generator"])
    for a, b in zip(got["optimizer"]["state"].values(), ref["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


# --------------------------------------------------------------------------- DDP

_DDP_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    import torch
    sys.path.insert(0, sys.argv[3])
    from test_train import tiny_data, tiny_model, train_config
    from arpg import dist
    from arpg.engine.train import train
    torch.set_num_threads(1)
    out, accum = Path(sys.argv[1]), int(sys.argv[2])
    # dropout off: its masks cannot match across different batch splits; everything else is on
    model = tiny_model(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    # a non-zero head, so the very first step updates every weight (the release zero-initialises it)
    torch.nn.init.normal_(model.head.weight, std=0.02, generator=torch.Generator().manual_seed(1))
    cfg = train_config(batch_size=8, grad_accum=accum, lr=1e-2, warmup_steps=1, max_steps=3, log_every=1,
                       checkpoint_every=100, class_dropout=0.5, ema=0.5)
    grads = []  # the (all-reduced, clipped) gradient each optimizer step consumes
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: grads.append({n: p.grad.clone() for n, p in model.named_parameters()}))
    with dist.session("cpu") as (info, device):
        result = train(model, "arpg", tiny_data(), cfg, state_path=out / "state.pt", device=device,
                       dist_info=info, progress=False)
    if info.is_main:
        torch.save({"model": model.state_dict(), "grads": grads, "loss": result.final_loss}, out / "weights.pt")
    assert not torch.distributed.is_initialized()
""")


def _ddp_run(tmp_path: Path, tag: str, nproc: int, accum: int) -> dict:
    out = tmp_path / tag
    out.mkdir()
    script = tmp_path / "ddp_script.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(script), str(out), str(accum), str(Path(__file__).parent)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "weights.pt", weights_only=False)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_doubled_batch(tmp_path):
    one = _ddp_run(tmp_path, "one", nproc=1, accum=1)
    two = _ddp_run(tmp_path, "two", nproc=2, accum=1)       # 2 x 4 per step
    accum = _ddp_run(tmp_path, "accum", nproc=1, accum=2)   # 1 x (2 micro-steps of 4)
    start = tiny_model().state_dict()
    moved = [k for k in start if not torch.equal(start[k], one["model"][k])]
    assert len(moved) == len(start)  # a real update of every weight happened
    movement = max((one["model"][k] - start[k]).abs().max().item() for k in start)
    assert movement > 1e-2  # updates are ~lr = 1e-2 per step: the tolerance below is 1000x finer
    assert len(one["grads"]) == 3
    for other in (two, accum):
        assert other["loss"] == pytest.approx(one["loss"], rel=1e-5)
        # the first update starts from identical weights: its gradients agree up to fp32 reduction order
        for key, value in one["grads"][0].items():
            assert value.abs().max() > 0, key  # every weight takes part in the first update
            torch.testing.assert_close(other["grads"][0][key], value, rtol=1e-5, atol=1e-8,
                                       msg=lambda m: f"{key}: {m}")
        # Adam divides by sqrt(v): on near-zero gradients it magnifies that rounding, so the weights
        # after all steps get a looser bound (1% of one step's lr)
        for key, value in one["model"].items():
            torch.testing.assert_close(other["model"][key], value, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_command_relaunches_under_torchrun(params_file):
    params = smoke_params(params_file, **{"train.nproc": 2, "train.max_steps": 2})
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "arpg", "train", "--params", str(params.path), "--model", "raster"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(params.layout.model_metrics("raster").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    assert load_generator(params.layout.model_checkpoint("raster")).config.grid_size == G


@pytest.mark.parametrize("kind, wrong", [("arpg", "LlamaGen-T"), ("raster", "ARPG-T"), ("arpg", "ARPG-Q")])
def test_an_unknown_size_or_one_of_the_other_kind_is_refused_when_params_load(params_file, kind, wrong):
    """Refused before any job runs (the dry run too), naming the key and the sizes that fit."""
    from arpg.errors import ConfigError
    from arpg.models.registry import SIZES

    with pytest.raises(ConfigError, match=f"train.{kind}_model") as err:
        load_params(params_file("configs/smoke.yaml", **{f"train.{kind}_model": wrong}))
    allowed = str(err.value).split("expected one of", 1)[1].splitlines()[0]
    assert f'got "{wrong}"' in str(err.value)
    assert sorted(allowed.replace('"', "").replace(",", " ").split()) == sorted(
        n for n, (k, _) in SIZES.items() if k == kind)
