"""`arpg report`: tables carry exactly the stage outputs' numbers, plots and copies exist, gaps are errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arpg import figures, pipeline
from arpg.config import load_params
from arpg.decoders import DECODERS
from arpg.engine import report
from arpg.errors import ArpgError


BOOTSTRAP = {"replicates": 20, "level": 0.95, "method": "normal interval (test record)", "kid_subsets": 10}


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fid(model, steps, cfg, order, seed=0):
    """A distinct, recomputable value per point (the test's independent reference); training seed 1's model
    scores 2 higher."""
    return round(100.0 / steps + cfg + (0.5 if order != "random" else 0.0) + (3.0 if model == "raster" else 0.0)
                 + 2.0 * seed, 6)


PROFILE_ROWS = [  # study models at the sampled step counts (batch 4), plus a raster row at 64 tokens
    {"model": "default", "kind": "arpg", "net": "ARPG-T", "steps": 2, "order": "random", "batch": 4,
     "gen_img_s_median": 40.0},
    {"model": "default", "kind": "arpg", "net": "ARPG-T", "steps": 4, "order": "random", "batch": 4,
     "gen_img_s_median": 25.0},
    {"model": "default", "kind": "arpg", "net": "ARPG-T", "steps": 2, "order": "locality", "batch": 4,
     "gen_img_s_median": 36.0},  # a decoding strategy's cost, beside its quality
    {"model": "default", "kind": "raster", "net": "LlamaGen-T", "steps": 64, "order": "raster", "batch": 4,
     "gen_img_s_median": 2.5},
]


@pytest.fixture
def study(params_file):
    """Smoke params in tmp_path with every stage output the report reads, holding known numbers (two
    training seeds, as configs/smoke.yaml has)."""
    return _study(params_file)


@pytest.fixture
def one_seed_study(params_file):
    """The same with one training seed: every interval is the sampling one."""
    return _study(params_file, **{"train.seeds": [0]})


def _study(params_file, **overrides):
    params = load_params(params_file("configs/smoke.yaml", **overrides))
    lay = params.layout
    _json(lay.data_manifest, {"splits": {"train": {"count": 2000, "shape": [2000, 32, 32, 1]},
                                         "test": {"count": 2000, "shape": [2000, 32, 32, 1]}}})
    for job in pipeline.jobs(params):
        if job.rule == "evaluate":
            p = report.point_of(job)
            _json(lay.metrics(p), {"model": p.model, "steps": p.steps, "cfg": p.cfg, "order": p.order,
                                   "fid_classifier": _fid(p.model, p.steps, p.cfg, p.order, p.seed),
                                   "is_classifier": 2.0 * p.steps, "accuracy_classifier": 0.25,
                                   "num_samples": 100, "reference_split": "test", "extractors": ["classifier"],
                                   "bootstrap": {**BOOTSTRAP, "replicates": 0}, "intervals": {}})
        if job.rule == "sample":
            _png(lay.sample_grid(report.point_of(job)), 1)
        if job.rule == "select":  # the selection set favours strong guidance, the evaluation set weak guidance
            p = report.point_of(job)
            _json(lay.selection_metrics(p), {"model": p.model, "steps": p.steps, "cfg": p.cfg, "order": p.order,
                                             "fid_classifier": _fid(p.model, p.steps, p.cfg, p.order, p.seed)
                                             - 3 * p.cfg, "intervals": {}})
    _json(lay.tokenizer_metrics, {"steps": 60, "stopped_by": "max_steps", "pretrained": None})
    _json(lay.tokenize_metrics, {"psnr": 21.5, "ssim": 0.75, "codebook_usage": 0.9})
    _png(lay.reconstructions, 2)
    _json(lay.classifier_metrics, {"test_accuracy": 0.81})
    for job in pipeline.jobs(params):
        if job.rule == "train":
            model = job.wildcards["model"]
            _json(lay.model_metrics(model, job.wildcards["run"]),
                  {"model": model.upper(), "final_loss": 3.25 if model == "arpg" else 3.5})
    rows = [{**r, "status": "ok", "gen_img_s_min": r["gen_img_s_median"] * 0.9,  # the spread the profile draws
             "gen_img_s_max": r["gen_img_s_median"] * 1.1,
             "e2e_img_s_median": r["gen_img_s_median"] / 2, "peak_mem_bytes": 2**20 * 10,
             "gen_mem_bytes": 2**20, "kv_cache_bytes": 2**19, "mem_kind": "rss", "device": "cpu",
             "device_name": "cpu", "threads": 1, "precision": "fp32", "cpu": "Test CPU 9000", "torch": "2.x"}
            for r in PROFILE_ROWS]
    _json(lay.profile_json, {"meta": {"cpu": "Test CPU 9000", "cpu_count": 2, "torch": "2.x", "load_avg_1m": 1.5,
                                      "profile": {"max_wait_share": 0.05, "max_ratio_spread": 1.5}},
                             "rows": rows, "speedups": [{"model": "default", "decoder": "arpg", "baseline": "raster",
                                                         "precision": "fp32", "batch": 4, "steps": 4, "tokens": 64,
                                                         "speedup_rounds": 6, "step_ratio": 16.0, "speedup_gen": 10.0,
                                                         "speedup_gen_low": 9.0, "speedup_gen_high": 11.0,
                                                         "speedup_level": 0.969, "gen_mem_ratio": 0.5,
                                                         "kv_ratio": 0.625, "wait_share": 0.004}]})
    lay.profile_csv.write_text("model\n")
    for task in params["gallery"]["tasks"]:
        _png(lay.gallery_image(task), 3)
    _json(lay.gallery_json, {"tasks": {"inpainting": {"unknown_cells": 12}}})
    write_zero_shot(params)
    return params


def _zs_value(cell) -> dict[str, float]:
    """Known metrics per zero-shot cell: FID 5 for ARPG (30 for the raster baseline), accuracy 0.5."""
    fid = 30.0 if cell.model == "raster" else 5.0 + cell.fraction
    values = {"fid_classifier": fid, "accuracy_classifier": 0.5, "psnr": 20.0 + cell.fraction}
    if cell.task != "resolution-expansion":
        values["psnr_tokenizer"] = 25.0
    return values


def write_zero_shot(params, bootstrap=BOOTSTRAP) -> None:
    """What the `zero_shot` jobs write, one per task (the report writes its zeroshot.csv anew)."""
    for task in params["zeroshot"]["tasks"]:
        _json(params.layout.zeroshot_json(task), zero_shot_doc(params, task, bootstrap=bootstrap))
        params.layout.zeroshot_csv(task).write_text("key\n")


def zero_shot_doc(params, task: str, se: float = 0.5, bootstrap=BOOTSTRAP):
    """What `arpg zero-shot --task` writes, for the smoke params' cells of `task`, with known values and
    intervals (PSNR's: a mean's, always there; the others bootstrap ones, there when it has replicates)."""
    from arpg.commands.zero_shot import cells

    z = 1.959963984540054
    out = []
    for cell in cells(params, task):
        metrics = _zs_value(cell)
        spread = {k: se if k.startswith("fid") else 0.01 for k in metrics
                  if bootstrap["replicates"] or k.startswith("psnr")}
        out.append({"key": cell.key, "task": cell.task, "mask": cell.mask, "fraction": cell.fraction,
                    "model": cell.model, "steps": cell.steps or 32, "parallel": cell.steps is not None,
                    "known_tokens": 32, "generated_tokens": 32, "known_tokens_kept": True, "psnr_against": "hidden",
                    "metrics": metrics, "intervals": {k: {"se": v, "lo": metrics[k] - z * v, "hi": metrics[k] + z * v}
                                                      for k, v in spread.items()}})
    return {"task": task, "num_images": 20, "cfg": 2.0, "bootstrap": bootstrap, "cells": out,
            "psnr": {"hidden": "PSNR of the generated region", "bicubic": "PSNR against bicubic"}}


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))



def _fid_se(model, order):
    """FID se per point: 0.5, but 20 for the raster baseline (its differences then drown in noise)."""
    return 20.0 if model == "raster" else 0.5


def _with_intervals(params, bootstrap=BOOTSTRAP):
    """Rewrite the study's metrics files with a bootstrap record and intervals of known se (z = 1.96)."""
    z = 1.959963984540054
    for job in pipeline.jobs(params):
        if job.rule != "evaluate":
            continue
        path = params.layout.metrics(report.point_of(job))
        doc = json.loads(path.read_text())
        intervals = {}
        if bootstrap["replicates"]:
            for name, se in (("fid_classifier", _fid_se(doc["model"], doc["order"])), ("accuracy_classifier", 0.01)):
                intervals[name] = {"se": se, "lo": doc[name] - z * se, "hi": doc[name] + z * se, "replicates": 20}
            if doc["order"] == "raster" and doc["model"] == "arpg":  # a non-finite se is written as null
                intervals["accuracy_classifier"] = {"se": None, "lo": None, "hi": None, "replicates": 0}
        path.write_text(json.dumps({**doc, "bootstrap": bootstrap, "intervals": intervals}))
    write_zero_shot(params, bootstrap=bootstrap)
    return params


def test_tables_hold_the_stage_numbers(study):
    result = report.build(study)
    out = result["dir"]
    quality = _csv(out / "quality.csv")
    points = [report.point_of(j) for j in pipeline.jobs(study) if j.rule == "evaluate"]
    # 7 points of the first training seed; the step and guidance sweeps' 3 again from seed 1's models
    assert len(quality) == len(points) == 10
    assert sorted(int(r["train_seed"]) for r in quality) == [0] * 7 + [1] * 3
    for row in quality:
        expected = _fid(row["model"], int(row["steps"]), float(row["cfg"]), row["order"], int(row["train_seed"]))
        assert float(row["fid_classifier"]) == pytest.approx(expected)
        assert float(row["is_classifier"]) == 2.0 * int(row["steps"])
    sweep = _csv(out / "fid_vs_steps.csv")  # ARPG random order at cfg_default, and raster
    assert [(r["model"], int(r["steps"]), r["order"]) for r in sweep] == [
        ("arpg", 2, "random"), ("arpg", 4, "random"), ("raster", 64, "raster")]
    assert [r["order"] for r in _csv(out / "orders.csv")] == ["random", "raster"]
    speed = _csv(out / "speed.csv")
    assert [(float(r["img_s"]), r["order"]) for r in speed] == [(40.0, "random"), (25.0, "random"),
                                                                 (36.0, "locality"), (2.5, "raster")]
    assert float(speed[0]["peak_mem_mib"]) == 10.0
    assert float(_csv(out / "speedups.csv")[0]["speedup_gen"]) == 10.0
    assert float(_csv(out / "tokenizer.csv")[0]["psnr"]) == 21.5
    assert float(_csv(out / "classifier.csv")[0]["test_accuracy"]) == 0.81
    assert [(r["model"], int(r["train_seed"]), float(r["final_loss"])) for r in _csv(out / "training.csv")] == [
        ("arpg", 0, 3.25), ("arpg", 1, 3.25), ("raster", 0, 3.5), ("raster", 1, 3.5)]
    pareto = _csv(out / "pareto.csv")  # FID joined with the study models' img/s at the same steps
    assert {(r["model"], int(r["steps"]), r["order"], float(r["img_s"])) for r in pareto} == {
        ("arpg", 2, "random", 40.0), ("arpg", 4, "random", 25.0), ("arpg", 2, "locality", 36.0),
        ("raster", 64, "raster", 2.5)}
    extractors = {r["metric"]: r["extractor"] for r in _csv(out / "metric_extractors.csv")}
    assert extractors == {"fid_classifier": "classifier", "is_classifier": "classifier",
                          "accuracy_classifier": "classifier"}
    assert result["metrics"]["fid_classifier.arpg.s2"] == pytest.approx(_fid("arpg", 2, 2.0, "random"))
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(result["metrics"])  # dvc exp show's


def test_dvc_plots_have_one_series_file_per_decoder_and_the_report_writes_each(study):
    out = report.build(study)["dir"]
    specs = dict(report.plot_specs(study))
    for name, x in (("fid_vs_steps", "steps"), ("fid_vs_images_per_s", "img_s")):
        files = specs[name]["y"]
        assert len(files) == len(DECODERS) and specs[name]["x"] == x
        for path, cols in files.items():
            rows = _csv(Path(path))
            assert rows and all(r[x] and r[cols[0]] for r in rows), path
    steps = {Path(p).stem: [int(r["steps"]) for r in _csv(Path(p))] for p in specs["fid_vs_steps"]["y"]}
    assert steps == {"fid_vs_steps-arpg": [2, 4], "fid_vs_steps-raster": [64]}
    speed = {Path(p).stem: [float(r["img_s"]) for r in _csv(Path(p))] for p in specs["fid_vs_images_per_s"]["y"]}
    assert speed == {"fid_vs_img_s-arpg": [25.0, 40.0], "fid_vs_img_s-raster": [2.5]}
    assert str(out) in next(iter(specs["fid_vs_steps"]["y"]))


def test_markdown_states_extractors_hardware_and_images(study):
    stale = Path(study["report"]["dir"]) / "grids" / "arpg" / "steps3_cfg9.0_random.png"  # an old sweep point
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"old")
    out = report.build(study)["dir"]
    assert not stale.exists()
    text = (out / "README.md").read_text()
    assert report.EXTRACTOR_TEXT["classifier"] in text
    assert "Test CPU 9000" in text and "1 threads" in text
    # how the speed-ups were timed, and the contention measured against the limits that were checked
    assert "interleaved" in text and "stops when a wait share exceeds 5%" in text
    assert "largest wait share here was 0.4%" in text and "not checked" not in text
    for name in ("fid_vs_steps.png", "throughput_vs_steps.png", "memory.png", "fid_vs_throughput.png",
                 "tokenizer_reconstructions.png", "gallery/inpainting.png", "grids/arpg/steps2_cfg2.0_random.png"):
        assert (out / name).is_file(), name
        assert Image.open(out / name).size[0] > 0
        assert f"({name})" in text, f"{name} not shown in README.md"
    assert "**inpainting** (unknown_cells: 12)" in text


def test_missing_stage_output_is_named(study):
    victim = study.layout.metrics(report.point_of(next(j for j in pipeline.jobs(study) if j.rule == "evaluate")))
    victim.unlink()
    with pytest.raises(ArpgError, match=str(victim)):
        report.build(study)


def test_a_damaged_stage_output_is_named_with_the_command_that_remakes_it(study, capsys):
    from arpg.cli import main

    job = next(j for j in pipeline.jobs(study) if j.rule == "evaluate")
    victim = study.layout.metrics(report.point_of(job))
    victim.write_text(victim.read_text()[:40])  # a JSON cut short
    assert main(["report", "--params", str(study.path)]) == 2
    err = capsys.readouterr().err
    assert f"stage output {victim} is unreadable (JSONDecodeError: " in err and "Traceback" not in err
    assert err.rstrip().endswith(f"delete it and rerun `arpg {' '.join(job.args)}`")
    victim.write_text(json.dumps({"fid_classifier": 1.0, "intervals": {}}))  # whole, but not this code's layout
    assert main(["report", "--params", str(study.path)]) == 2
    err = capsys.readouterr().err
    assert f"{victim} lacks bootstrap: it was not written by this `arpg evaluate`; delete it and rerun " in err


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    pairs = [{"img_s": float(s), "fid": float(f)} for s, f in zip(rng.integers(1, 20, 40), rng.integers(1, 20, 40))]
    front = report.pareto_front(pairs, "fid")

    def dominated(p):
        return any(q["img_s"] >= p["img_s"] and q["fid"] <= p["fid"] and
                   (q["img_s"] > p["img_s"] or q["fid"] < p["fid"]) for q in pairs)

    expected = {(p["img_s"], p["fid"]) for p in pairs if not dominated(p)}
    assert {(p["img_s"], p["fid"]) for p in front} == expected


def test_extractor_of_prefers_the_longest_name():
    names = ["classifier", "inception-fid", "inception"]
    assert report.extractor_of("fid_inception_fid", names) == "inception-fid"
    assert report.extractor_of("fid_inception", names) == "inception"
    assert report.extractor_of("precision_classifier", names) == "classifier"
    assert report.extractor_of("num_samples", names) is None


def _line(text, start):
    return next(line for line in text.splitlines() if line.startswith(start))


def test_intervals_in_tables_plots_and_the_noise_section(one_seed_study, monkeypatch):
    """FID 52 / 27 / 27.5 / 7.0625 (ARPG 2 and 4 steps, ARPG 4 steps raster order, raster baseline) with
    se 0.5, 0.5, 0.5, 20: 4 vs 2 steps (-25 +- 1.39) and 2 steps vs raster (+44.9 +- 39.2) exceed the noise,
    4 steps vs raster (+19.9) and raster vs random order (+0.5 +- 1.39) do not."""
    params = _with_intervals(one_seed_study)
    bars = {}

    from matplotlib.container import ErrorbarContainer

    from arpg.utils import save_figure

    def keep_error_bars(fig, path):  # per axis, per errorbar call: the bars' (y_lo, y_hi), read before closing
        bars[Path(path).name] = [[[(round(seg[0][1], 2), round(seg[1][1], 2)) for seg in c.lines[2][0].get_segments()]
                                  for c in ax.containers if isinstance(c, ErrorbarContainer)] for ax in fig.axes]
        return save_figure(fig, path)

    monkeypatch.setattr(figures, "save_figure", keep_error_bars)
    out = report.build(params)["dir"]
    text = (out / "README.md").read_text()

    # What this study finds: first, at most 8 claims, each with its interval, the paper's figure, a verdict.
    # ARPG 4 steps (27 +- 0.98) vs raster (7.0625 +- 39.2): +19.94 +- 39.21 within the noise, at one guidance and at
    # each one's best (smoke sweeps no other guidance); 64 of 64 ARPG steps were not sampled: no few-steps line
    head = text[text.index("## What this study finds"):text.index("## Data")]
    assert text.index("## What this study finds") < text.index("## Data") < text.index("## Quality")
    bullets = [line for line in head.splitlines() if line.startswith("- ")]
    assert 1 <= len(bullets) <= 8 and "Few steps" not in head
    assert "vs raster, one guidance (cfg 2.0)" in bullets[0] and "(+19.9, 95% [-19.3, 59.1])" in bullets[0]
    assert "Paper: ARPG-L FID 2.44" in bullets[0] and "**Cannot tell at this scale (within the noise).**" in bullets[0]
    assert "each at its own guidance" in bullets[1] and "Cannot tell at this scale" in bullets[1]
    assert "10.00x [9.00, 11.00] (97%)" in bullets[2] and "26.1x" in bullets[2] and "Agrees in direction" in bullets[2]
    assert "Generation memory 0.50x" in bullets[3] and "0.25x" in bullets[3]
    assert "Training noise: cannot tell" in bullets[4]
    assert "One training seed per decoder" in text and not (out / "seeds.csv").exists()

    rows = {(r["model"], r["steps"], r["order"]): r for r in _csv(out / "quality.csv")}
    arpg2 = rows["arpg", "2", "random"]
    assert float(arpg2["fid_classifier_se"]) == 0.5
    assert float(arpg2["fid_classifier_lo"]) == pytest.approx(52 - 0.98, abs=1e-3)
    assert float(arpg2["fid_classifier_hi"]) == pytest.approx(52 + 0.98, abs=1e-3)
    assert rows["arpg", "4", "raster"]["accuracy_classifier_se"] == ""  # null in the metrics file
    assert "is_classifier_se" not in arpg2  # no interval stored for it
    assert "| arpg | 2 | 2.0 | random | 52 ± 0.98 | 4 | 0.25 ± 0.02 |" in text
    assert "| raster | 64 | 2.0 | raster | 7.062 ± 39 | 128 | 0.25 ± 0.02 |" in text
    assert "| arpg | 4 | 2.0 | raster | 27.5 ± 0.98 | 8 | 0.25 |" in text  # null interval: bare value
    assert "from 20 bootstrap replicates per point (normal interval (test record))" in text

    assert "## Which differences exceed the noise" in text
    assert "|b - a| > 1.96 * sqrt(se_a^2 + se_b^2)" in text and "conservative" in text
    assert ("| ARPG 4 steps vs ARPG 2 steps | fid_classifier | 52 ± 0.98 | 27 ± 0.98 | -25 | [-26.39, -23.61] "
            "| yes |") in text
    real, noise = _line(text, "- **Steps**, `fid_classifier`").split("Within the noise:")
    assert "ARPG 2 steps vs raster (+44.94, 95% [5.726, 84.15])" in real and "ARPG 4 steps vs ARPG 2 steps (-25" in real
    assert "ARPG 4 steps vs raster (+19.94" in noise
    real, noise = _line(text, "- **Orders**, `fid_classifier`").split("Within the noise:")
    assert "none" in real and "raster order vs random order (+0.5" in noise
    assert "No interval: raster order vs random order" in _line(text, "- **Orders**, `accuracy_classifier`")

    verdicts = {(r["comparison"], r["metric"]): r for r in _csv(out / "differences.csv")}
    strategy_rows = {f"{o} 2 steps vs random 2 steps" for o in ("locality", "confidence", "region-2x2")}
    assert {k[0] for k in verdicts} == {"ARPG 2 steps vs raster", "ARPG 4 steps vs raster",
                                        "ARPG 4 steps vs ARPG 2 steps", "raster order vs random order",
                                        *strategy_rows}
    assert all(verdicts[c, "fid_classifier"]["significant"] == "False" for c in strategy_rows)  # +0.5 +- 1.39
    assert "locality 2 steps vs random 2 steps (+0.5" in _line(text, "- **Strategies**, `fid_classifier`")
    assert [verdicts[c, "fid_classifier"]["significant"] for c in ("ARPG 2 steps vs raster", "ARPG 4 steps vs raster",
                                                                    "ARPG 4 steps vs ARPG 2 steps",
                                                                    "raster order vs random order")] == \
        ["True", "False", "True", "False"]
    row = verdicts["ARPG 4 steps vs ARPG 2 steps", "fid_classifier"]
    assert float(row["diff"]) == -25.0 and float(row["diff_se"]) == pytest.approx(0.5 * 2 ** 0.5)
    assert verdicts["raster order vs random order", "accuracy_classifier"]["significant"] == ""

    arpg_bars, raster_bars = [(51.02, 52.98), (26.02, 27.98)], [(-32.14, 46.26)]  # FID -+ 1.96 se
    assert bars["fid_vs_steps.png"] == [[arpg_bars, raster_bars]]  # one FID column: one axis
    assert bars["fid_vs_throughput.png"] == [[arpg_bars, [(51.52, 53.48)], raster_bars]]  # + locality, 2 steps
    # strategies at 2 steps (FID 52.5 +- 0.98) beside the random order (52 +- 0.98), one line each
    strategy = [(51.52, 53.48)]
    assert [strategy, strategy, [(51.02, 52.98)], strategy] in bars["quality_vs_steps_strategies.png"]
    assert "## Decoding strategies (ARPG, cfg 2.0)" in text
    assert ("- `fid_classifier`: at 2 steps the best strategy, confidence, gives 52.5 ± 0.98 against 27 ± 0.98 "
            "for the random order at 4 steps: +25.5 (95% interval of the difference [24.11, 26.89]), worse, "
            "beyond the noise.") in text
    assert {r["order"] for r in _csv(out / "strategies.csv")} == {"random", "locality", "confidence", "region-2x2"}


def test_bootstrap_off_shows_bare_numbers(study):
    params = _with_intervals(study, {**BOOTSTRAP, "replicates": 0})
    out = report.build(params)["dir"]
    text = (out / "README.md").read_text()
    start, end = text.index("## Zero-shot editing, measured"), text.index("## Zero-shot galleries")
    zero_shot = text[start:end]
    assert "±" not in text[:start] + text[end:]
    assert "| inpainting | centre | 50% | ARPG | 4 | yes | 5.5 | 0.5 | 20.5 ± 0.02 | 25 ± 0.02 |" in zero_shot
    assert "compared without an interval" in zero_shot  # only PSNR has an interval without the bootstrap
    assert text.count("Intervals are off (`evaluate.bootstrap: 0`") == 2  # quality tables, noise section
    assert "no difference between sweep points can be told from sampling noise" in text
    assert not (out / "differences.csv").exists()
    assert not any(c.endswith(("_se", "_lo", "_hi")) for c in _csv(out / "quality.csv")[0])
    assert "| arpg | 2 | 2.0 | random | 52 | 4 | 0.25 |" in text


def test_zero_shot_section_holds_the_cells_and_judges_them(study):
    """Every cell in zeroshot.csv with its numbers; the findings: the context against the unconditional
    step-sweep point (FID 27 -> 5.5, beyond the noise), expansion accuracy against 0.8 x unconditional,
    ARPG against the raster baseline from the top rows."""
    from arpg.commands.zero_shot import all_cells

    _with_intervals(study)
    out = report.build(study)["dir"]
    rows = _csv(out / "zeroshot.csv")
    assert [r["key"] for r in rows] == [c.key for c in all_cells(study)]
    for row, cell in zip(rows, all_cells(study)):
        assert float(row["fid_classifier"]) == _zs_value(cell)["fid_classifier"]
        assert float(row["fid_classifier_hi"]) - float(row["fid_classifier"]) == pytest.approx(1.959964 * 0.5)
    text = (out / "README.md").read_text()
    section = text[text.index("## Zero-shot editing, measured"):text.index("## Zero-shot galleries")]
    uncond = _fid("arpg", 4, 2.0, "random")  # the step sweep's point at steps_default 4
    assert f"5.5 ± 0.98 against unconditional ARPG sampling at 4 steps (the step sweep) {uncond:g} ± 0.98" in section
    line = next(ln for ln in section.splitlines() if ln.startswith("- The context must help"))
    assert f"{5.5 - uncond:+.4g}" in line and "better, beyond the noise" in line
    line = next(ln for ln in section.splitlines() if ln.startswith("- Expansion keeps the class"))
    assert "0.8 x the unconditional 4-step accuracy 0.25 ± 0.02 = 0.2: +0.3" in line and "above the target" in line
    raster = [ln for ln in section.splitlines() if ln.startswith("- Random order vs raster")]
    assert len(raster) == 3 and "`fid_classifier`" in raster[0] and "+-24.5" not in raster[0]
    assert "-24.5" in raster[0] and "better, beyond the noise" in raster[0]  # 5.5 vs 30 (se 0.5 each)
    assert "every cell returned every known token unchanged" in section and "`zero-shot-<task>` child runs" in section
    assert "| inpainting | centre | 50% | ARPG | 4 | yes | 5.5 ± 0.98 |" in section


def test_every_file_the_report_writes_has_a_caption_and_a_report_pattern(study):
    from arpg.report_catalog import describe

    result = report.build(study)
    names = [p.relative_to(result["dir"]).as_posix() for p in result["paths"]]
    assert len(names) > 20 and "gallery/inpainting.png" in names
    shown = {name: describe(name) for name in names}  # KeyError names an uncaptioned file
    assert all(s.caption and s.category for s in shown.values())
    assert {Path(n).suffix for n in names} <= {".png", ".csv", ".md", ".json"}  # workflow/rules/common.smk REPORT_PATTERNS
    with pytest.raises(KeyError, match="report_catalog"):
        describe("new_table.csv")


BENCHMARK_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def test_stage_times_come_from_the_benchmark_files(study, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # benchmark paths are relative to the working directory, as under Snakemake
    out = report.build(study)["dir"]
    assert "No benchmark files were found" in (out / "README.md").read_text()
    jobs = {j.name: j for j in pipeline.jobs(study)}
    train = [j for j in jobs.values() if j.rule == "train"]
    sample = next(j for j in jobs.values() if j.rule == "sample")
    for job, (wall, rss, cpu) in zip([*train[:2], sample], [(100.0, 500.5, 190.0), (250.0, 700.0, 480.0),
                                                       (12.5, 300.0, "NA")]):
        path = tmp_path / job.benchmark
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(BENCHMARK_HEADER + f"{wall}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")
    # a job forked by the warm server: Snakemake measured its client; the fork's own usage replaces that
    (tmp_path / train[1].usage).write_text(json.dumps({"cpu_time": 480.0, "max_rss": 700.0}))
    (tmp_path / train[1].benchmark).write_text(BENCHMARK_HEADER + "250.0\t0:00:00\t16\t1\t1\t1\t0\t0\t50\t0.05\n")
    # the profile: its usage record holds the CPU of its configurations' processes, the memory stays the
    # benchmark's; a configuration skipped (no bf16 hardware) is no unit of its work
    profile = jobs["profile"]
    doc = json.loads(study.layout.profile_json.read_text())
    doc["rows"].append({**doc["rows"][0], "status": "skipped", "precision": "bf16",
                        "skip_reason": "bf16: this CPU has no AVX512-BF16 or AMX-BF16"})
    study.layout.profile_json.write_text(json.dumps(doc))
    (tmp_path / profile.benchmark).write_text(BENCHMARK_HEADER + "60.0\t0:00:00\t900\t1\t1\t1\t0\t0\t50\t9.5\n")
    (tmp_path / profile.usage).write_text(json.dumps({"cpu_time": 90.0}))
    out = report.build(study)["dir"]
    rows = {r["rule"]: r for r in _csv(out / "stage_times.csv")}
    assert (float(rows["profile"]["cpu_s"]), float(rows["profile"]["max_rss_mib"])) == (90.0, 900.0)
    assert int(rows["profile"]["units"]) == len(PROFILE_ROWS)
    assert (int(rows["train"]["jobs"]), int(rows["train"]["timed"])) == (4, 2)  # two decoders, two seeds
    assert float(rows["train"]["wall_s"]) == 350.0 and float(rows["train"]["cpu_s"]) == 670.0
    assert (float(rows["train"]["longest_s"]), rows["train"]["longest_job"]) == (250.0, train[1].key)
    assert float(rows["train"]["max_rss_mib"]) == 700.0
    steps = study["train"]["max_steps"]
    assert rows["train"]["unit"] == "steps" and int(rows["train"]["units"]) == 2 * steps
    assert float(rows["train"]["cpu_ms_per_unit"]) == round(670.0 * 1000 / (2 * steps), 1)
    assert rows["sample"]["unit"] == "images" and rows["sample"]["cpu_ms_per_unit"] == ""  # its CPU time is NA
    assert int(rows["sample"]["timed"]) == 1 and float(rows["sample"]["wall_s"]) == 12.5
    assert int(rows["evaluate"]["timed"]) == 0 and rows["evaluate"]["wall_s"] == ""
    assert "report" not in rows
    text = (out / "README.md").read_text()
    assert "## Stage times" in text and "Sum of all jobs' wall times: 7.0 min." in text


def test_a_finding_agrees_disagrees_or_cannot_tell_from_its_interval():
    from arpg.engine.report.findings import _compare
    from arpg.engine.report.noise import Bootstrap
    from arpg.paper import VERSUS_RASTER
    from arpg.paths import SweepPoint

    boot = Bootstrap([20], 0.95, ["test"], [])

    def point(fid, se):
        return report.Point(SweepPoint("arpg", 8, 4.0, "random"), {"fid_classifier": fid},
                            {"fid_classifier": {"se": se, "lo": fid - 1.96 * se, "hi": fid + 1.96 * se}})

    def verdict(a, b, **kw):
        return _compare("x", a, b, "fid_classifier", boot, None, VERSUS_RASTER, **kw).rsplit("**", 2)[1]

    # b - a = -3 with se sqrt(0.5): half-width 1.39
    assert verdict(point(13, 0.5), point(10, 0.5)) == "Agrees (beyond the noise)."
    assert verdict(point(10, 0.5), point(13, 0.5)) == "Disagrees (beyond the noise)."
    assert verdict(point(10, 0.5), point(11, 0.5)) == "Cannot tell at this scale (within the noise)."
    # a claim that b is no worse: within the noise agrees
    assert verdict(point(10, 0.5), point(11, 0.5), worse_only=True) == "Agrees (within the noise)."
    assert verdict(point(10, 0.5), point(13, 0.5), worse_only=True) == "Disagrees (beyond the noise)."


def test_over_training_seeds_the_headline_and_comparisons_use_the_seed_means(study):
    """Two training seeds, seed 1's FIDs 2 higher: each mean's se is 1 (the two values' sd / sqrt 2), its
    half-width t(1) 12.71; a difference of two means: se sqrt 2, Welch df 2, t 4.303, half-width 6.09."""
    out = report.build(_with_intervals(study))["dir"]
    text = (out / "README.md").read_text()
    # What this study finds (over seeds): first, at most 8 claims, each with its interval, the paper's figure, a verdict.
    # ARPG 4 steps vs raster over the two training seeds (27 and 29 vs 7.0625 and 9.0625, each se 0.5 / 20):
    # means 28 vs 8.0625, each mean's se 1 (the seeds' sd / sqrt 2), Welch df 2, t 4.303: +19.94 +- 6.09,
    # beyond the noise, at one guidance and at each one's best (smoke sweeps no other guidance); 64 of 64 ARPG
    # steps were not sampled: no few-steps line
    head = text[text.index("## What this study finds"):text.index("## Data")]
    assert text.index("## What this study finds") < text.index("## Data") < text.index("## Quality")
    bullets = [line for line in head.splitlines() if line.startswith("- ")]
    assert 1 <= len(bullets) <= 8 and "Few steps" not in head
    assert "vs raster, one guidance (cfg 2.0)" in bullets[0] and "(+19.9, 95% [13.9, 26])" in bullets[0]
    assert "28 ± 13 (mean of 2 training seeds) vs 8.062 ± 13" in bullets[0]  # t(1) 12.7 x se 1
    assert "Paper: ARPG-L FID 2.44" in bullets[0] and "**Disagrees (beyond the noise).**" in bullets[0]
    assert "each at its own guidance" in bullets[1] and "Disagrees (beyond the noise)" in bullets[1]
    assert "10.00x [9.00, 11.00] (97%)" in bullets[2] and "26.1x" in bullets[2] and "Agrees in direction" in bullets[2]
    assert "Generation memory 0.50x" in bullets[3] and "0.25x" in bullets[3]
    # seeds 1.41 apart in sd against a sampling se of 0.5: between-training sd sqrt(2 - 0.25) = 1.32
    assert "Training noise, measured" in bullets[4] and "sd of `fid_classifier` 1.32 against a sampling se of 0.5" \
        in bullets[4] and "(2.6x;" in bullets[4]

    rows = {(r["model"], r["steps"], r["cfg"], r["metric"]): r for r in _csv(out / "seeds.csv")}
    arpg4 = rows["arpg", "4", "2.0", "fid_classifier"]
    assert (arpg4["per_seed"], float(arpg4["mean"]), float(arpg4["se"])) == ("27 / 29", 28.0, pytest.approx(1.0))
    assert float(arpg4["hi"]) == pytest.approx(28 + 12.7062, abs=1e-3) and float(arpg4["df"]) == 1.0
    assert float(arpg4["between_sd"]) == pytest.approx((2 - 0.25) ** 0.5) and float(arpg4["within_sd"]) == 0.5
    verdicts = {(r["comparison"], r["metric"]): r for r in _csv(out / "differences.csv")}
    steps = verdicts["ARPG 4 steps vs ARPG 2 steps", "fid_classifier"]
    assert (float(steps["a"]), float(steps["b"]), steps["noise"]) == (53.0, 28.0, "training seeds and sampling")
    assert (float(steps["diff_lo"]), float(steps["diff_hi"])) == pytest.approx((-25 - 6.0849, -25 + 6.0849), abs=1e-3)
    # the orders sweep samples the first seed only: its comparison keeps the sampling interval
    assert verdicts["raster order vs random order", "fid_classifier"]["noise"] == "sampling"
    assert "| ARPG 4 steps vs ARPG 2 steps | fid_classifier | 53 ± 13 (2 seeds) | 28 ± 13 (2 seeds) | -25 |" in text


def test_each_decoders_guidance_is_chosen_on_its_selection_set(params_file):
    """Guidance 1, 2 (the default) and 4: the evaluation FID grows with cfg (best at 1), the selection FID
    falls with it (best at 4). The choice follows the selection set, and the comparison at each decoder's
    own guidance reports the chosen points' evaluation figures."""
    params = _with_intervals(_study(params_file, **{"train.seeds": [0], "sample.cfg": [1.0, 4.0]}))
    out = report.build(params)["dir"]
    rows = _csv(out / "guidance_choice.csv")
    assert [(r["model"], r["cfg"], r["chosen"]) for r in rows] == [
        ("arpg", c, str(c == "4.0")) for c in ("1.0", "2.0", "4.0")] + [
        ("raster", c, str(c == "4.0")) for c in ("1.0", "2.0", "4.0")]
    assert float(rows[0]["selection_fid"]) == _fid("arpg", 4, 1.0, "random") - 3.0
    text = (out / "README.md").read_text()
    line = next(x for x in text.splitlines() if "each at its own guidance**" in x)
    assert "(ARPG cfg 4.0, raster cfg 4.0, chosen on a selection set drawn with another sampling seed)" in line
    arpg4, raster4 = _fid("arpg", 4, 4.0, "random"), _fid("raster", 64, 4.0, "raster")
    assert f"({arpg4 - raster4:+.3g}, 95% [" in line  # b - a: ARPG at its chosen cfg minus raster at its own
    assert "**Chosen guidance** (ARPG cfg 4.0; raster cfg 4.0)" in text
