"""A decoder is one entry of arpg/decoders.py: a registered toy decoder is in the params schema, the
sweep, the job list, the Snakemake DAG, dvc.yaml, the CLI and the report, with no other change."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml
from conftest import write_params
from test_pipeline import check_three_way
from test_report import study  # noqa: F401 - the fixture: every stage output the report reads

from arpg import pipeline
from arpg.cli import build_parser
from arpg.commands.sample import check_point
from arpg.config import load_params, token_count
from arpg.sweeps import sweep_points
from arpg.decoders import DECODERS, Decoder, decoder, registered, zero_shot_decoder
from arpg.engine import report
from arpg.errors import ArpgError, ConfigError
from arpg.paths import REPO_ROOT, SweepPoint

# Sequential like the raster baseline, on its implementation, under its own name and keys.
TOY = Decoder("toy", "toy decoder", network="raster", parallel=False,
              native_order="raster")
TOY_KEYS = {"train.toy_model": "LlamaGen-T", "train.toy_pretrained": None}


@pytest.fixture
def toy():
    with registered(TOY):
        yield TOY


@pytest.fixture
def params_file(tmp_path, toy):
    """conftest's factory with the toy registered and its keys in every params file (the `study`
    fixture of tests/test_report.py asks for this one too)."""
    return lambda base="params.yaml", **overrides: write_params(tmp_path, base, **{**TOY_KEYS, **overrides})


# --------------------------------------------------------------------------- the registry

def test_the_study_decoders_and_what_their_entries_point_at():
    from arpg.models.registry import SIZES

    assert list(DECODERS) == ["arpg", "raster"]
    assert {d.network for d in DECODERS.values()} == {kind for kind, _ in SIZES.values()}
    assert DECODERS["raster"].param_keys == ("train.raster_model", "train.raster_pretrained")
    assert [d.name for d in DECODERS.values() if d.parallel] == ["arpg"] and zero_shot_decoder().name == "arpg"


def test_registering_is_undone_and_names_are_checked():
    with registered(TOY):
        assert list(DECODERS) == ["arpg", "raster", "toy"] and decoder("toy") is TOY
        with pytest.raises(ArpgError, match="'toy' is registered already"):
            with registered(TOY):
                pass
    assert "toy" not in DECODERS
    with pytest.raises(ArpgError, match=r"unknown decoder 'toy'; registered: arpg, raster"):
        decoder("toy")
    for bad in ("Toy", "toy_2", "toy-2", "2toy"):  # '_' and '-' would blur params keys and job keys
        with pytest.raises(ArpgError, match="lower-case letters and digits"):
            Decoder(bad, "x", network="raster", parallel=False,
                    native_order="raster")


def test_snakemake_imports_no_torch():
    code = "import sys, arpg.pipeline, arpg.commands.export_dvc; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- params

def test_a_decoders_keys_are_required_and_typos_refused(params_file, tmp_path):
    params = load_params(params_file("configs/smoke.yaml"))
    assert params["train"]["toy_model"] == "LlamaGen-T"
    values = {**TOY_KEYS, "train.toy_pretrained": 3}
    with pytest.raises(ConfigError, match=r"train.toy_pretrained: got 3, expected string or null"):
        load_params(params_file("configs/smoke.yaml", **values))
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) toyy_model"):
        load_params(params_file("configs/smoke.yaml", **{"train.toyy_model": "LlamaGen-T"}))
    missing = tmp_path / "missing"  # conftest's factory: the smoke keys only, without the toy's
    missing.mkdir()
    with pytest.raises(ConfigError, match=r"train: 'toy_model' is a required property"):
        load_params(write_params(missing, "configs/smoke.yaml"))


def test_keys_of_no_registered_decoder_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train: unknown key\(s\) toy_model, toy_pretrained"):
        load_params(write_params(tmp_path, "configs/smoke.yaml", **TOY_KEYS))


# --------------------------------------------------------------------------- sweep, jobs, DAG

def test_a_sequential_decoder_is_swept_like_the_raster_baseline(params_file):
    params = load_params(params_file("configs/smoke.yaml"))
    points = sweep_points(params)
    s, n = params["sample"], token_count(params)
    cfgs = sorted({*s["cfg"], s["cfg_default"]})
    runs = ["", "_seed1"]  # smoke's two training seeds: the step and guidance sweeps sample both models
    assert [p for p in points if p.model == "toy"] == [SweepPoint("toy", n, cfg, "raster", r) for r in runs
                                                       for cfg in cfgs]
    assert [(p.steps, p.cfg, p.order, p.run) for p in points if p.model == "raster"] == [
        (n, c, "raster", r) for r in runs for c in cfgs]


def test_the_toy_has_its_jobs_folders_and_keys(params_file):
    params = load_params(params_file("configs/smoke.yaml"))
    lay = params.layout
    jobs = {j.name: j for j in pipeline.jobs(params)}
    train = jobs["train@toy"]
    assert train.args == ("train", "--model", "toy")
    assert train.outputs == (str(lay.model_checkpoint("toy")), str(lay.model_metrics("toy")))
    assert train.inputs[:2] == (str(lay.tokens("train")), str(lay.token_labels("train")))
    assert {"train.toy_model", "train.toy_pretrained"} <= set(train.param_keys)
    assert not {"train.arpg_model", "train.raster_pretrained"} & set(train.param_keys)
    assert not {"train.toy_model", "train.toy_pretrained"} & set(jobs["train@arpg"].param_keys)
    toy_points = [j for j in jobs.values() if j.rule in ("sample", "evaluate") and j.wildcards.get("model") == "toy"]
    assert len(toy_points) == 2 * len([p for p in sweep_points(params) if p.model == "toy"]) > 0
    for job in toy_points:
        assert job.args[:3] == (job.rule, "--model", "toy")
        assert all(f"/{'samples' if job.rule == 'sample' else 'metrics'}/toy/" in o for o in job.outputs)
    assert str(lay.model_checkpoint("toy")) in jobs["profile"].inputs and "train.toy_model" in jobs["profile"].param_keys
    assert str(lay.model_metrics("toy")) in jobs["report"].inputs
    assert pipeline.wildcard_constraints()["model"] == "arpg|raster|toy"


def test_the_toy_is_in_the_snakemake_dag_and_dvc_yaml(params_file, tmp_path):
    """One `train` rule serves every decoder: Snakemake (told of the toy) and dvc.yaml list its jobs."""
    jobs = check_three_way(params_file("configs/smoke.yaml"), tmp_path, [TOY])
    assert [j.name for j in jobs if j.rule == "train"] == [f"train@{m}{r}" for m in ("arpg", "raster", "toy")
                                                           for r in ("", "_seed1")]
    stages = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]
    assert {"train-arpg", "train-raster", "train-toy", "train-toy_seed1"} <= set(stages)
    assert stages["train-toy"]["cmd"] == "arpg train --params params.yaml --model toy"
    assert stages["train-toy_seed1"]["cmd"] == "arpg train --params params.yaml --model toy --seed 1"


# --------------------------------------------------------------------------- CLI

def test_the_cli_takes_registered_names_and_a_sequential_decoders_one_order(toy, capsys):
    args = build_parser("sample").parse_args(["sample", "--model", "toy", "--steps", "64", "--cfg", "2", "--order",
                                              "raster"])
    check_point(SweepPoint(args.model, args.steps, args.cfg, args.order), 64)
    with pytest.raises(ArpgError, match=r"the toy decoder decodes one token per step in raster order: use "
                                        r"--steps 64 --order raster \(got --steps 8 --order random\)"):
        check_point(SweepPoint("toy", 8, 2.0, "random"), 64)
    check_point(SweepPoint("arpg", 8, 2.0, "spiral-in"), 64)  # a parallel decoder: any steps and order
    for command in ("train", "evaluate"):
        assert build_parser(command).parse_args([command, "--model", "toy", *_point_args(command)]).model == "toy"
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--model", "toyy"])
    assert "invalid choice: 'toyy'" in capsys.readouterr().err


def _point_args(command):
    return [] if command == "train" else ["--steps", "64", "--cfg", "2", "--order", "raster"]


# --------------------------------------------------------------------------- report

def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def toy_study(study):  # noqa: F811 - the imported fixture
    """test_report's study (its metrics and grids written for every sweep point, the toy's included)
    plus the toy's training metrics (each training seed's), which that fixture writes for arpg and raster only."""
    for run in ("", "_seed1"):
        path = study.layout.model_metrics("toy", run)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": "LlamaGen-T", "final_loss": 4.5}))
    return study


def test_the_report_shows_the_toys_points_training_and_grids(toy_study):
    out = report.build(toy_study)["dir"]
    toy_rows = [r for r in _csv(out / "quality.csv") if r["model"] == "toy"]
    assert [(int(r["steps"]), r["order"]) for r in toy_rows] == [(64, "raster")] * len(toy_rows) and toy_rows
    training = {r["model"]: float(r["final_loss"]) for r in _csv(out / "training.csv")}
    assert training == {"arpg": 3.25, "raster": 3.5, "toy": 4.5}
    assert (out / "grids" / "toy" / "steps64_cfg2.0_raster.png").is_file()


def test_the_report_sweeps_a_sequential_decoder_like_the_raster_baseline(toy_study):
    out = report.build(toy_study)["dir"]
    for table in ("fid_vs_steps.csv", "guidance.csv"):
        rows = _csv(out / table)
        raster = [(r["steps"], r["cfg"], r["order"]) for r in rows if r["model"] == "raster"]
        assert raster and [(r["steps"], r["cfg"], r["order"]) for r in rows if r["model"] == "toy"] == raster, table


def test_the_report_compares_every_step_count_with_each_sequential_baseline(toy_study):
    from arpg.engine.report.noise import noise_comparisons
    from arpg.engine.report.points import read_points

    points = read_points([j for j in pipeline.jobs(toy_study) if j.rule == "evaluate"], toy_study.layout)
    pairs = [(s.point_label(a.point), s.point_label(b.point)) for s, a, b in noise_comparisons(toy_study, points)
             if s.name == "steps"]
    steps = sorted({p.point.steps for p in points if p.point.model == "arpg" and p.point.order == "random"
                    and p.point.cfg == float(toy_study["sample"]["cfg_default"])})
    for baseline in ("raster", TOY.label):
        assert [b for a, b in pairs if a == baseline] == [f"ARPG {s} steps" for s in steps], (baseline, pairs)
    assert f"the raster baseline and {TOY.label} predicts" in (report.build(toy_study)["dir"] / "README.md").read_text()


def test_the_profile_gives_each_parallel_decoder_a_speed_up_over_each_sequential_one(toy):
    from arpg.engine.profile.sweep import ROUND_RECORD, speedups, summary

    def row(kind, steps, img_s):
        return {"status": "ok", "kind": kind, "order": "random" if kind == "arpg" else "raster", "model": "default",
                "batch": 1, "backbone": "64x4x4", "net": kind, "tokens": 16, "steps": steps, "threads": 1, "device": "cpu", "precision": "fp32",
                "gen_img_s_median": img_s,
                "gen_img_s_min": img_s, "gen_img_s_max": img_s, "kv_cache_bytes": 1.0, "gen_mem_bytes": 0,
                "round_s": [1 / img_s] * 3, "round_group": 0,  # timed together, interleaved
                **{f"round_{k}": 0.0 for k in ROUND_RECORD}}

    rows = [row("arpg", 4, 12.0), row("raster", 16, 3.0), row("toy", 16, 2.0)]
    gains = speedups(rows)
    assert [(g["decoder"], g["baseline"], g["speedup_gen"]) for g in gains] == [
        ("arpg", "raster", 4.0), ("arpg", "toy", 6.0)]
    text = summary({"speedups": gains, "precision_speedups": [], "rows": rows, "reference": {"comparison": []}})
    assert "arpg over raster:" in text and "arpg over toy:" in text
