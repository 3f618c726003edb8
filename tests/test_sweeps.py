"""Sweeps are declared once (arpg/sweeps.py): a toy sweep registered there, with no other edit, is in
Snakemake's dry-run DAG, dvc.yaml, the report's tables, its noise comparisons and the report catalog."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from arpg import pipeline, report_catalog
from arpg.config import load_params
from arpg.errors import ConfigError
from arpg.paths import SweepPoint
from arpg.sweeps import NATIVE, SWEEPS, TOKENS, Param, Sweep, Swept, registered, sweep_points
from test_report import _with_intervals, study  # noqa: F401 - the report's fixture, a study of known numbers

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_CFG = 1.5  # in no smoke sweep (sample.cfg is empty, cfg_default 2.0): the toy's points are its own

TOY = Sweep("toy", (Swept("sample.steps"), TOY_CFG, NATIVE), (TOKENS, TOY_CFG, NATIVE),
            baseline={"cfg": Param("sample.cfg_default")}, sort_by=("steps", "cfg"), csv="toy.csv",
            heading="Toy sweep ({par}, cfg 1.5)", caption="The toy sweep's table.",
            compared="each toy point against cfg {cfg}", label="{decoder} toy {steps} steps cfg {cfg}")

# Registers the toy in a fresh interpreter (Snakemake builds its DAG in-process), then dry-runs.
_DRY_RUN = """
import sys
sys.path.insert(0, "tests")
from snakemake.cli import main
from arpg.sweeps import registered
from test_sweeps import TOY
with registered(TOY):
    sys.argv = ["snakemake", "-n", "--cores", "1", "--directory", sys.argv[2], "--config", f"params={sys.argv[1]}"]
    main()
"""


@pytest.fixture
def toy_sweep():
    with registered(TOY):
        yield TOY


def _csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_the_toy_adds_its_points_each_in_one_family(toy_sweep, params_file):
    params = load_params(params_file("configs/smoke.yaml"))
    toy = [p for p in sweep_points(params) if p.cfg == TOY_CFG]
    steps = params["sample"]["steps"]
    assert toy == [SweepPoint("arpg", s, TOY_CFG, "random") for s in steps] + [SweepPoint("raster", 64, TOY_CFG,
                                                                                        "raster")]
    assert "sample.steps" in pipeline.job(params, "report", {}).param_keys  # the report reads its lists
    clash = Sweep("clash", (Swept("sample.steps"), Param("sample.cfg_default"), NATIVE), None,
                  sort_by=("steps",), csv="clash.csv", heading="h", caption="c", compared="c", label="l")
    with registered(clash), pytest.raises(ConfigError, match=r"arpg steps2_cfg2.0_random is in the arpg steps "
                                                               r"sweep and in the arpg clash sweep"):
        sweep_points(params)


def test_the_toy_is_in_snakemakes_dry_run(params_file, tmp_path):
    path = params_file("configs/smoke.yaml")
    proc = subprocess.run([sys.executable, "-c", _DRY_RUN, str(path), str(tmp_path / "work")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    params = load_params(path)
    for p in (SweepPoint("arpg", 2, TOY_CFG, "random"), SweepPoint("raster", 64, TOY_CFG, "raster")):
        assert str(params.layout.samples(p)) in out and str(params.layout.metrics(p)) in out, p
    assert "cfg1.5" not in subprocess.run(  # and without it, not
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--directory", str(tmp_path / "work"),
         "--config", f"params={path}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300).stdout


def test_the_toy_is_a_matrix_stage_of_dvc_yaml(toy_sweep, params_file):
    from arpg.commands.export_dvc import render

    params = load_params(params_file("configs/smoke.yaml"))
    stages = render(params, "params.yaml", REPO_ROOT)["stages"]
    for rule in ("sample", "evaluate"):
        stage = stages[f"{rule}-arpg-toy"]
        assert stage["matrix"] == {"steps": "${sample.steps}"}
        assert "--steps ${item.steps} --cfg 1.5 --order random" in stage["cmd"]
        assert "--cfg 1.5" in stages[f"{rule}-raster-toy"]["cmd"] and "matrix" not in stages[f"{rule}-raster-toy"]


def test_the_toy_has_its_report_table_comparisons_and_caption(toy_sweep, study):  # noqa: F811
    from arpg.engine import report

    params = _with_intervals(study)
    out = report.build(params)["dir"]
    rows = [(r["model"], int(r["steps"]), r["cfg"]) for r in _csv(out / "toy.csv")]
    assert rows == [("arpg", 2, "1.5"), ("arpg", 2, "2.0"), ("arpg", 4, "1.5"), ("arpg", 4, "2.0"),
                    ("raster", 64, "1.5"), ("raster", 64, "2.0")]
    diffs = [r for r in _csv(out / "differences.csv") if r["group"] == "toy" and r["metric"] == "fid_classifier"]
    assert [r["comparison"] for r in diffs] == ["ARPG toy 2 steps cfg 1.5 vs ARPG toy 2 steps cfg 2.0",
                                                 "ARPG toy 4 steps cfg 1.5 vs ARPG toy 4 steps cfg 2.0",
                                                 "raster toy 64 steps cfg 1.5 vs raster toy 64 steps cfg 2.0"]
    # the test's FIDs: cfg enters once (tests/test_report.py's _fid), so each difference is 1.5 - 2.0
    assert [float(r["diff"]) for r in diffs] == pytest.approx([-0.5] * 3)
    text = (out / "README.md").read_text()
    assert "## Toy sweep (ARPG, cfg 1.5)" in text and "each toy point against cfg 2.0" in text
    assert "- **Toy**, `fid_classifier`: exceed the noise:" in text
    assert report_catalog.describe("toy.csv").caption == TOY.caption


def test_without_the_toy_nothing_of_it_remains(params_file):
    assert "toy" not in SWEEPS
    params = load_params(params_file("configs/smoke.yaml"))
    assert all(p.cfg != TOY_CFG for p in sweep_points(params))
