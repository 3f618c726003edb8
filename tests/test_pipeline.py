"""The study as a pipeline: Snakemake DAG == dvc.yaml == arpg.pipeline.jobs(), reruns, profiles."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from arpg import pipeline
from arpg.commands import export_dvc
from arpg.config import load_params
from arpg.decoders import DECODERS
from arpg.paths import REPO_ROOT, Layout

BIN = Path(sys.executable).parent
SNAKEMAKE = [str(BIN / "snakemake"), "--snakefile", str(REPO_ROOT / "Snakefile")]
ENV_PATH = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"

# Prints every job of the DAG (forced, so existing outputs do not hide jobs) as JSON. Decoders given
# as JSON (Decoder fields) are registered first: the Snakefile imports the same arpg modules.
_DAG_SCRIPT = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.enums import Quietness
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings
from arpg.decoders import DECODERS, Decoder

snakefile, workdir, params, extra = sys.argv[1:5]
DECODERS.update((d["name"], Decoder(**d)) for d in json.loads(extra))
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    wf_api = api.workflow(resource_settings=ResourceSettings(cores=256),
                          config_settings=ConfigSettings(config={"params": params}),
                          snakefile=Path(snakefile), workdir=Path(workdir))
    wf_api.dag(dag_settings=DAGSettings(forceall=True))
    wf = wf_api._workflow
    wf._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
    wf._build_dag()
    jobs = [{"rule": j.rule.name, "inputs": list(j.input), "outputs": list(j.output), "log": list(j.log),
             "benchmark": str(j.benchmark or ""),
             "shell": j.shellcmd, "threads": j.threads, "gpu": dict(j.resources).get("gpu", 0)}
            for j in wf.dag.jobs if j.rule.name != "all"]
print("DAG-JSON " + json.dumps(jobs))
"""


def _run(cmd, cwd, **kw):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=kw.pop("timeout", 300),
                          env={**os.environ, "PATH": ENV_PATH}, **kw)


def snakemake_jobs(params_path: Path, workdir: Path, extra_decoders=()) -> list[dict]:
    extra = json.dumps([dataclasses.asdict(d) for d in extra_decoders])
    proc = _run([sys.executable, "-c", _DAG_SCRIPT, str(REPO_ROOT / "Snakefile"), str(workdir), str(params_path),
                 extra], REPO_ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("DAG-JSON ")), None)
    assert line, proc.stdout + proc.stderr
    return json.loads(line[len("DAG-JSON "):])


def _abs(path: str, root: Path) -> str:
    return str(path if Path(path).is_absolute() else root / path)


def _cmd(text: str, params_path: str) -> str:
    text = re.sub(r"\s*3>&2\s+>\s*\S+\s+2>&1\s*$", "", text.strip())  # progress fd, then the log
    text = re.sub(r"^ARPG_JOB_USAGE=\S+\s+", "", text)  # where a forked job reports its usage (arpg/warm.py)
    return text.replace(params_path, "PARAMS")


def dvc_jobs(params, root: Path) -> list[dict]:
    """dvc.yaml rendered into `root` (params file root/params.yaml: its sweep stages interpolate its
    lists), as DVC itself resolves it."""
    import shutil

    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    if Path(params.path).resolve() != (root / "params.yaml").resolve():
        shutil.copy(params.path, root / "params.yaml")
    (root / "dvc.yaml").write_text(export_dvc.dump(export_dvc.render(params, "params.yaml", root=root)))
    if not (root / ".dvc").is_dir():
        Repo.init(str(root), no_scm=True)
    import networkx as nx

    out = []
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges: stage -> the stages it depends on
        for stage in repo.index.stages:
            deps = [d for d in stage.deps if not isinstance(d, ParamsDependency)]
            keys = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in d.params]
            upstream = {_abs(o.def_path, root) for s in nx.descendants(graph, stage) for o in s.outs}
            out.append({"name": stage.addressing, "cmd": stage.cmd, "deps": [_abs(d.def_path, root) for d in deps],
                        "outs": [_abs(o.def_path, root) for o in stage.outs], "params": keys,
                        "upstream_outs": upstream, "desc": stage.desc})
    return out


def jobs_named(jobs, name):
    return next(j for j in jobs if j.name == name)


def _by_outputs(items, key):
    table = {}
    for item in items:
        outs = frozenset(item[key])
        assert outs not in table, f"two jobs write {sorted(outs)}"
        table[outs] = item
    return table


def check_three_way(params_path: Path, root: Path, extra_decoders=()) -> list[pipeline.Job]:
    """Snakemake's DAG and DVC's stages both equal pipeline.jobs(): commands, inputs, outputs, params.
    `extra_decoders`: registered in this process already; Snakemake's gets them too."""
    params = load_params(params_path)
    jobs = pipeline.jobs(params)
    # Both declare the report directory besides its index file (DVC uncached; Snakemake marks it for --report)
    expected = _by_outputs([{"job": j, "outs": [_abs(o, root) for o in j.all_outputs]} for j in jobs], "outs")
    smk = _by_outputs([{**j, "outs": [_abs(o, root) for o in j["outputs"]]}
                       for j in snakemake_jobs(params_path, root, extra_decoders)], "outs")
    dvc = _by_outputs(dvc_jobs(params, root), "outs")
    folders = pipeline.point_folders(params)
    assert set(smk) == set(expected) == set(dvc)
    for outs, item in expected.items():
        job = item["job"]
        cmd = job.command("PARAMS")
        s, d = smk[outs], dvc[outs]
        assert s["rule"] == job.rule
        assert _cmd(s["shell"], str(params_path)) == job.command(None), job.name
        assert _cmd(d["cmd"], "params.yaml") == cmd, job.name
        inputs = {_abs(p, root) for p in job.inputs}
        assert {_abs(p, root) for p in s["inputs"]} == inputs, job.name
        # a reader of every sweep point (the report) depends on the point folders, so a point a params
        # edit adds is read without a re-export; DVC links a folder dep to the stages writing into it
        dvc_inputs = inputs if set(job.wildcards) == set(pipeline.POINT_WILDCARDS) else {
            next((_abs(f, root) for f in folders if Path(_abs(p, root)).is_relative_to(_abs(f, root))), p)
            for p in inputs}
        assert set(d["deps"]) == dvc_inputs | {_abs(p, root) for p in job.external}, job.name
        assert inputs <= d["upstream_outs"], (job.name, sorted(inputs - d["upstream_outs"]))
        assert d["desc"].startswith(pipeline.RULES[job.rule].desc[:-1]), job.name
        assert d["params"] == list(job.param_keys), job.name
        # a job that times the machine holds every core (256 in snakemake_jobs): nothing runs beside it
        assert s["gpu"] == job.gpus and s["threads"] == (256 if job.alone else job.threads), job.name
        assert s["log"] == [job.log] and s["benchmark"] == job.benchmark, job.name
    assert [j.rule for j in jobs if j.alone] == ["profile"]
    return jobs


# --------------------------------------------------------------------------- DAG equivalence

def test_smoke_dag_equals_dvc_and_pipeline(params_file, tmp_path):
    jobs = check_three_way(params_file("configs/smoke.yaml"), tmp_path)
    rules = {j.rule for j in jobs}
    assert rules == set(pipeline.RULES)  # every stage is in the smoke study
    # one per decoder and training seed (smoke: 0 and 1); the seed's run names its model and the sweep points
    # sampled from it, the guidance points also draw selection sets
    assert [j.name for j in jobs if j.rule == "train"] == [f"train@{m}{r}" for m in DECODERS for r in ("", "_seed1")]
    assert jobs_named(jobs, "train@arpg_seed1").args == ("train", "--model", "arpg", "--seed", "1")
    assert {j.key for j in jobs if j.rule == "select"} == {
        f"{m}-steps{s}_cfg2.0_{o}{r}" for m, s, o in (("arpg", 4, "random"), ("raster", 64, "raster"))
        for r in ("", "_seed1")}
    # 2 steps, 2 orders, 3 strategies, 1 raster; seed 1's model: the step sweep's 2 steps and raster
    assert len([j for j in jobs if j.rule == "sample"]) == 7 + 3


def test_paper_dag_equals_dvc_and_pipeline(params_file, tmp_path):
    jobs = check_three_way(params_file("configs/paper.yaml"), tmp_path)
    by_name = {j.name: j for j in jobs}
    # released weights: no tokenize, no classifier; the train jobs only import
    assert "tokenize" not in by_name and "train_classifier" not in by_name
    assert by_name["train@arpg"].external == ("weights/arpg_300m.pt",) and by_name["train@arpg"].inputs == ()
    sample = next(j for j in jobs if j.rule == "sample")
    assert sample.gpus == 8 and sample.launcher[:1] == ("torchrun",)


def test_jobs_use_layout_paths():
    params = load_params(REPO_ROOT / "params.yaml")
    lay = Layout.from_params(params)
    jobs = pipeline.jobs(params)
    from arpg.sweeps import sweep_points

    points = sweep_points(params)
    sample_outs = {j.outputs for j in jobs if j.rule == "sample"}
    assert sample_outs == {(str(lay.samples(p)), str(lay.sample_grid(p))) for p in points}
    assert {j.outputs[0] for j in jobs if j.rule == "evaluate"} == {str(lay.metrics(p)) for p in points}
    report = next(j for j in jobs if j.rule == "report")
    assert set(report.inputs) >= {str(lay.metrics(p)) for p in points} | {str(lay.profile_json)}
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))


def test_committed_dvc_yaml_is_current():
    params = load_params(REPO_ROOT / "params.yaml")
    text = export_dvc.dump(export_dvc.render(params, "params.yaml"))
    assert (REPO_ROOT / "dvc.yaml").read_text() == text, "run `arpg export-dvc` and commit dvc.yaml"
    assert "&id" not in text and "*id" not in text  # repeated values written out, no YAML anchors
    assert yaml.safe_load(text)["plots"][0]["fid_vs_steps"]["y"] == {
        f"reports/plots/fid_vs_steps-{name}.csv": ["fid_classifier"] for name in DECODERS}  # a series per decoder


def test_export_dvc_never_writes_the_params_file(tmp_path, params_file, capsys):
    from arpg.cli import main

    path = params_file("configs/smoke.yaml")
    before = path.read_bytes()
    assert main(["export-dvc", "--params", str(path), "--output", str(tmp_path / "dvc.yaml")]) == 0
    assert main(["export-dvc", "--params", str(path), "--output", str(path)]) == 2
    assert "never the params" in capsys.readouterr().err and path.read_bytes() == before


def test_another_params_file_gets_literal_sweep_lists(params_file):
    """${...} resolves against params.yaml only: for another file the matrix holds its lists."""
    params = load_params(params_file("configs/smoke.yaml", **{"sample.steps": [2, 4, 8]}))
    stages = export_dvc.render(params, "configs/other.yaml")["stages"]
    assert stages["sample-arpg-steps"]["matrix"] == {"steps": [2, 4, 8]}
    assert "${sample" not in json.dumps(stages)
    interpolated = export_dvc.render(params, "params.yaml")["stages"]
    assert interpolated["sample-arpg-steps"]["matrix"] == {"steps": "${sample.steps}"}


def test_export_dvc_check_flags_a_stale_file(tmp_path, params_file, capsys):
    from arpg.cli import main

    path = params_file("configs/smoke.yaml")
    out = tmp_path / "dvc.yaml"
    assert main(["export-dvc", "--params", str(path), "--output", str(out)]) == 0
    assert main(["export-dvc", "--params", str(path), "--output", str(out), "--check"]) == 0
    out.write_text(out.read_text().replace("arpg sample", "arpg sampel"))
    assert main(["export-dvc", "--params", str(path), "--output", str(out), "--check"]) == 2
    assert "out of date" in capsys.readouterr().err


# --------------------------------------------------------------------------- fingerprints

def _prints(params_path):
    params = load_params(params_path)
    return {j.name: pipeline.fingerprint(params, j) for j in pipeline.jobs(params)}


def test_sweep_change_touches_only_the_jobs_it_feeds(params_file):
    base = _prints(params_file("configs/smoke.yaml"))
    more = _prints(params_file("configs/smoke.yaml", **{"sample.steps": [2, 4, 8]}))
    added = set(more) - set(base)
    assert added == {f"{rule}@arpg-steps8_cfg2.0_random{r}" for rule in ("sample", "evaluate") for r in ("", "_seed1")}
    # nothing existing reruns but the report, which reads every point (and the sweep lists: arpg.sweeps)
    assert {name for name, fp in base.items() if more[name] != fp} == {"report"}
    hotter = _prints(params_file("configs/smoke.yaml", **{"sample.temperature": 0.9}))
    changed = {n for n in base if hotter[n] != base[n]}
    assert changed == {n for n in base if n.startswith(("sample@", "select@", "zero_shot@"))} | {"gallery", "profile"}
    assert sum(n.startswith("zero_shot@") for n in changed) == 4  # one job per task
    raster = _prints(params_file("configs/smoke.yaml", **{"train.raster_model": "LlamaGen-S"}))
    # each seed's raster training; the profile labels its rows
    assert {n for n in base if raster[n] != base[n]} == {"train@raster", "train@raster_seed1", "profile"}


def test_keys_no_result_depends_on_change_no_fingerprint(params_file):
    from arpg.config import NOT_RESULT_KEYS

    base = _prints(params_file("configs/smoke.yaml"))
    changed = {"tokenizer.log_every": 7, "tokenizer.checkpoint_every": 9, "train.log_every": 7,
               "train.checkpoint_every": 9, "train.compile": True}
    assert set(changed) == {f"{s}.{k}" for s, keys in NOT_RESULT_KEYS.items() for k in keys}
    assert _prints(params_file("configs/smoke.yaml", **changed)) == base
    lr = _prints(params_file("configs/smoke.yaml", **{"train.lr": 0.002}))
    assert {n for n in base if lr[n] != base[n]} == {f"train@{m}{r}" for m in ("arpg", "raster") for r in ("", "_seed1")}


def test_weights_file_identity_enters_the_fingerprint(params_file, tmp_path):
    weights = tmp_path / "arpg_300m.pt"
    weights.write_bytes(b"1234")
    path = params_file("configs/smoke.yaml", **{"train.arpg_pretrained": str(weights), "train.seeds": [0]})
    first = _prints(path)["train@arpg"]
    weights.write_bytes(b"123456")
    assert _prints(path)["train@arpg"] != first


# --------------------------------------------------------------------------- snakemake CLI

def test_lint_reports_nothing(tmp_path):
    proc = _run([*SNAKEMAKE, "--lint", "--directory", str(tmp_path)], REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def _job_counts(text: str) -> dict[str, int]:
    table = text[text.index("Job stats:"):]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_paper_dry_run_lists_jobs_and_resources(tmp_path):
    proc = _run([*SNAKEMAKE, "-n", "-p", "--directory", str(tmp_path), "--config",
                 f"params={REPO_ROOT / 'configs/paper.yaml'}"], REPO_ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert _job_counts(out) == {"prepare_data": 1, "train_tokenizer": 1, "train": len(DECODERS), "sample": 24, "reference_stats": 1, "evaluate": 24, "select": 4, "profile": 1, "gallery": 1,
                                "zero_shot": 4, "report": 1, "all": 1, "total": 65}
    assert "note: weights/arpg_300m.pt does not exist yet (needed by train@arpg)" in out
    assert re.search(r"torchrun --standalone --nproc_per_node=8 --no-python arpg sample .*--steps 256", out)
    sample_blocks = re.findall(r"rule sample:\n(?:    .*\n)+", out)
    assert len(sample_blocks) == 24 and all("gpu=8" in b for b in sample_blocks)


def test_slurm_profile_dry_run(tmp_path):
    config = yaml.safe_load((REPO_ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    assert config["executor"] == "slurm"
    rules = _run([*SNAKEMAKE, "--list-rules", "--directory", str(tmp_path)], REPO_ROOT).stdout.split()
    assert set(config["set-resources"]) <= set(rules)
    # The plugin is optional (pip install '.[slurm]'); without it only the executor line and the
    # plugin's own slurm-* settings are unknown to Snakemake, so dry-run the same profile minus those.
    profile = tmp_path / "slurm"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump(
        {k: v for k, v in config.items() if k != "executor" and not k.startswith("slurm-")}))
    proc = _run([*SNAKEMAKE, "-n", "--profile", str(profile), "--directory", str(tmp_path), "--config",
                 f"params={REPO_ROOT / 'configs/paper.yaml'}"], REPO_ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    blocks = {m.group(1): m.group(0) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)+", out)}
    assert "runtime=240" in blocks["sample"] and "gpu=8" in blocks["sample"]
    assert "mem_mb_per_cpu=4000" in blocks["sample"]
    # CPUs are the rule's threads and the partition the cluster's default: the profile names neither
    assert "cpus_per_task" not in out and "slurm_partition" not in out
    assert "runtime=10080" in blocks["train"]
    assert "gpu=1" in blocks["evaluate"]


_LOCAL_RULES = """
import sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings(quiet=True)) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=Path("Snakefile"),
                            config_settings=ConfigSettings(config={"params": sys.argv[1]}), workdir=Path(sys.argv[2]))
    print("LOCAL", *sorted(workflow._workflow._localrules))
    print("PRIORITY", *sorted(f"{r.name}={r.priority}" for r in workflow._workflow.rules if r.name != "all"))
"""


def test_snakemakes_rules_are_the_declared_stages_with_their_local_flag_and_priority(tmp_path):
    """One rule per declared stage (arpg/commands/<stage>.py); under a cluster executor the submit host
    runs `all` and the jobs declared local (stages.Job.local); the declared priorities reach Snakemake."""
    paper = REPO_ROOT / "configs/paper.yaml"
    assert pipeline.local_rules(load_params(paper)) == ["report"]
    proc = _run([sys.executable, "-c", _LOCAL_RULES, str(paper), str(tmp_path)], REPO_ROOT)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LOCAL"))
    assert line.split()[1:] == ["all", "report"]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PRIORITY"))
    assert line.split()[1:] == sorted(f"{r.name}={r.priority}" for r in pipeline.RULES.values())
    assert "zero_shot=10" in line


def test_the_default_workflow_profile_overrides_nothing_the_slurm_profile_sets():
    """Snakemake applies profiles/default (the "workflow specific profile") after `--profile
    workflow/profiles/slurm`, replacing each key both set: a differing key would silently undo the
    SLURM setting (it did: latency-wait 5 over the shared file system's 60)."""
    default, slurm = (yaml.safe_load((REPO_ROOT / "workflow/profiles" / name / "config.yaml").read_text())
                      for name in ("default", "slurm"))
    assert (REPO_ROOT / "profiles" / "default").resolve() == (REPO_ROOT / "workflow/profiles/default").resolve()
    clashes = {k: (default[k], slurm[k]) for k in default.keys() & slurm.keys() if default[k] != slurm[k]}
    assert not clashes, f"profiles/default overrides the SLURM profile's {clashes}: drop them from the default"


def test_missing_weights_stop_before_any_job(tmp_path):
    values = yaml.safe_load((REPO_ROOT / "configs/paper.yaml").read_text())
    values["output_dir"] = str(tmp_path / "outputs")
    values["report"]["dir"] = str(tmp_path / "report")
    data = tmp_path / "imagenet"
    (data / "train" / "n01440764").mkdir(parents=True)
    values["data"]["path"], values["data"]["test_path"] = str(data / "train"), str(data / "train")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(values))
    start = time.monotonic()
    proc = _run([*SNAKEMAKE, "--cores", "1", "--directory", str(tmp_path), "--config", f"params={path}"],
                REPO_ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "weights/arpg_300m.pt  (needed by train@arpg)" in out
    assert "weights/vq_ds16_c2i.pt  (needed by train_tokenizer)" in out
    assert str(data) not in out.split("these files do not exist")[-1]  # present data is not listed
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "logs").exists()  # no job started
    assert time.monotonic() - start < 60


def test_released_weights_skip_training_jobs(params_file, tmp_path):
    paths = {"tokenizer.pretrained": tmp_path / "vq_ds16_c2i.pt", "train.arpg_pretrained": tmp_path / "arpg.pt",
             "train.raster_pretrained": tmp_path / "gpt.pt"}
    params = load_params(params_file("configs/smoke.yaml", **{k: str(v) for k, v in paths.items()}, **{"train.seeds": [0]}))
    jobs = {j.name: j for j in pipeline.jobs(params)}
    assert "tokenize" not in jobs
    lay = params.layout
    for name, key in (("train_tokenizer", "tokenizer.pretrained"), ("train@arpg", "train.arpg_pretrained"),
                      ("train@raster", "train.raster_pretrained")):
        assert jobs[name].inputs == () and jobs[name].external == (str(paths[key]),)
    assert str(lay.tokens("train")) not in {i for j in jobs.values() for i in j.inputs}


def test_configs_are_valid():
    for name in ("smoke", "paper"):  # the schema requires every key params.yaml has
        load_params(REPO_ROOT / "configs" / f"{name}.yaml")
    smoke = load_params(REPO_ROOT / "configs/smoke.yaml")
    assert smoke["output_dir"] == "outputs/smoke" and smoke["report"]["dir"] == "outputs/smoke/report"


# --------------------------------------------------------------------------- end to end

def _executed(out: str) -> dict[str, int]:
    return _job_counts(out) if "Job stats:" in out else {}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_released_layout_weights_drive_the_sweep(tmp_path):
    """Released-layout checkpoints (random weights, tiny sizes) -> sample + evaluate every sweep point,
    with no tokenizer or generator training."""
    import torch

    from arpg.config import token_grid
    from arpg.models.registry import build_model
    from arpg.models.vq import VQConfig, VQModel
    from arpg.utils import make_generator

    values = yaml.safe_load((REPO_ROOT / "configs/smoke.yaml").read_text())
    values["output_dir"] = str(tmp_path / "outputs")
    values["report"]["dir"] = str(tmp_path / "report")
    values["tracking"]["enabled"] = False
    values["train"]["seeds"] = [0]  # released weights are one model
    path = tmp_path / "released.yaml"
    path.write_text(yaml.safe_dump(values))
    params = load_params(path)
    space = dict(codebook_size=values["tokenizer"]["codebook_size"], num_classes=values["data"]["num_classes"],
                 grid_size=token_grid(values), generator=make_generator(0))
    files = {"tokenizer.pretrained": tmp_path / "vq_ds16_c2i.pt", "train.arpg_pretrained": tmp_path / "arpg_300m.pt",
             "train.raster_pretrained": tmp_path / "c2i_T.pt"}
    torch.save({"model": VQModel(VQConfig.from_params(params)).state_dict()}, files["tokenizer.pretrained"])
    torch.save({"state_dict": build_model(values["train"]["arpg_model"], **space).state_dict()},
               files["train.arpg_pretrained"])
    torch.save({"model": build_model(values["train"]["raster_model"], **space).state_dict()},
               files["train.raster_pretrained"])
    for dotted, file in files.items():
        section, key = dotted.split(".")
        values[section][key] = str(file)
    path.write_text(yaml.safe_dump(values))
    params = load_params(path)
    targets = [o for j in pipeline.jobs(params) if j.rule == "evaluate" for o in j.outputs]
    proc = _run([*SNAKEMAKE, *targets, "--cores", "2", "--directory", str(tmp_path), "--config", f"params={path}"],
                REPO_ROOT, timeout=1100)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    ran = _executed(out)
    assert "tokenize" not in ran and ran["sample"] == ran["evaluate"] == len(targets)
    for model in DECODERS:
        log = (tmp_path / pipeline.job(params, "train", {"model": model, "run": ""}).log).read_text()
        assert "training skipped" in log
    for target in targets:
        metrics = json.loads(Path(target).read_text())
        assert metrics["fid_classifier"] > 0
