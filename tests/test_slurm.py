"""The study on a real SLURM cluster: one node on 127.0.0.1 with accounting (tests/slurm_cluster.py).

* docs/pipeline.md's SLURM command (read from there, so the docs are what ran) submits every job but
  the local rules as a SLURM job of its own; each completed, as `sacct` records, with the CPUs its
  params give it; the results equal a local `--cores` run of the same params byte for byte.
* train.nproc: 2 (gloo on CPU) is one SLURM job holding both torchrun ranks (threads x nproc CPUs),
  and trains (from scratch: see the test) to the same bytes as the same params run locally. That two ranks equal one process
  with the doubled batch is shown by tests/test_train.py's gloo test: the study's models have
  dropout, whose masks differ between batch splits, so their weights cannot show it.

Skipped where the cluster cannot run (not root, a package missing); `pytest -m slurm` runs it.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from arpg import pipeline
from arpg.config import load_params
from arpg.paths import REPO_ROOT
from slurm_cluster import PARTITION, missing_requirements, one_node_cluster
from test_reproducible import BIN, ENV, SMOKE, _result_files, snakemake

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(3600)]

DOCS = REPO_ROOT / "docs" / "pipeline.md"
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def documented_command() -> list[str]:
    """The SLURM section's smoke-study command line, as a user types it in the checkout."""
    section = DOCS.read_text().split("\n## SLURM", 1)[1].split("\n## ", 1)[0]
    lines = [x.split("#", 1)[0].strip() for x in section.splitlines()]
    command = next((x for x in lines if x.startswith("snakemake ") and "configs/smoke.yaml" in x), None)
    assert command, f"{DOCS}: the SLURM section shows no `snakemake ... configs/smoke.yaml` command"
    return shlex.split(command)


def submit(cluster, root: Path, params_file: Path, *targets: str) -> str:
    """The documented command, run for a study folder of its own (params file and checkout paths absolute)."""
    args = [str(BIN / "snakemake")]
    for arg in documented_command()[1:]:
        if arg.startswith("params="):
            arg = f"params={params_file}"
        elif (REPO_ROOT / arg).exists():
            arg = str(REPO_ROOT / arg)
        args.append(arg)
    # the plugin's first status query of a new job waits 40 s (then 10 s more each time): fine on a
    # cluster, minutes of idle here, where every job takes seconds
    args += ["--snakefile", str(REPO_ROOT / "Snakefile"), "--directory", str(root),
             "--slurm-init-seconds-before-status-checks", "5", *targets]
    env = {**ENV, "SLURM_CONF": cluster.env["SLURM_CONF"]}
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=3000, env=env)
    out = proc.stdout + proc.stderr
    (root / "slurm-run.log").open("a").write(out)
    assert proc.returncode == 0, out[-8000:]
    return out


def submissions(out: str) -> dict[str, tuple[str, Path]]:
    """SLURM job id -> (Snakemake job id, the plugin's log of that SLURM job)."""
    return {m.group(2): (m.group(1), Path(m.group(3))) for m in SUBMITTED.finditer(out)}


def accounting(cluster, ids) -> dict[str, dict]:
    """`sacct` per SLURM job (allocation lines only): state, CPUs, exit code."""
    out = cluster.run("sacct", "-X", "--noheader", "--parsable2", "-j", ",".join(ids),
                      "--format=JobIDRaw,State,AllocCPUS,ExitCode,Partition")
    rows = [line.split("|") for line in out.splitlines() if line]
    return {r[0]: {"state": r[1], "cpus": int(r[2]), "exit": r[3], "partition": r[4]} for r in rows}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = missing_requirements()
    if reason:
        pytest.skip(f"no SLURM test cluster on this machine: {reason}")
    with one_node_cluster(tmp_path_factory.mktemp("cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def studies(cluster, study, tmp_path_factory):
    """The smoke study submitted to the cluster, and the session's local run of it (`--cores`)."""
    roots = {"slurm": tmp_path_factory.mktemp("study-slurm"), "local": study}
    shutil.copy(SMOKE, roots["slurm"] / "params.yaml")  # relative output_dir, report.dir and MLflow store
    out = submit(cluster, roots["slurm"], roots["slurm"] / "params.yaml")
    return roots, out


def test_every_job_ran_as_a_completed_slurm_job_with_its_cpus(cluster, studies):
    roots, out = studies
    params = load_params(roots["slurm"] / "params.yaml")
    remote = [j for j in pipeline.jobs(params) if j.rule != "report"]  # report: a local rule
    jobs = submissions(out)
    assert len(jobs) == len(remote), f"{len(jobs)} SLURM submissions for {len(remote)} jobs:\n{out[-5000:]}"
    acct = accounting(cluster, jobs)
    assert set(acct) == set(jobs), f"sacct knows {sorted(acct)} of the submitted {sorted(jobs)}"
    failed = {i: a for i, a in acct.items() if (a["state"], a["exit"]) != ("COMPLETED", "0:0")}
    assert not failed, f"jobs that did not complete: {failed}"
    # the plugin's log names the rule (rule_<rule>/...): its SLURM job got the CPUs the params give it
    threads = {}
    for job in remote:
        threads.setdefault(job.rule, set()).add(job.threads)
    for slurm_id, (_, log) in jobs.items():
        assert log.is_file(), f"the plugin's job log {log} is missing"
        rule = next(p for p in log.parts if p.startswith("rule_"))[len("rule_"):]
        assert acct[slurm_id]["cpus"] in threads[rule], (rule, acct[slurm_id], threads[rule])
    assert {a["partition"] for a in acct.values()} == {PARTITION}  # the cluster's default partition
    assert (roots["slurm"] / params["report"]["dir"] / "README.md").is_file()


def test_results_equal_a_local_run_byte_for_byte(studies):
    roots, _ = studies
    params = load_params(roots["slurm"] / "params.yaml")
    on_slurm, local = _result_files(roots["slurm"], params), _result_files(roots["local"], params)
    assert len(on_slurm) >= 30
    differ = [str(a.relative_to(roots["slurm"])) for a, b in zip(on_slurm, local) if a.read_bytes() != b.read_bytes()]
    assert not differ, f"SLURM and local runs of the same params wrote different bytes: {differ}"


def test_two_rank_training_is_one_slurm_job_with_the_same_bytes_as_locally(cluster, studies):
    """Last: it retrains train@raster in both study folders."""
    roots, _ = studies
    values = yaml.safe_load(SMOKE.read_text())
    values["train"]["nproc"] = 2
    runs = {}
    for kind, root in roots.items():
        (root / "nproc2.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
        params = load_params(root / "nproc2.yaml")
        job = pipeline.job(params, "train", {"model": "raster", "run": ""})
        assert job.launcher[0] == "torchrun" and job.threads == 2 * values["train"]["threads"]
        # The rerun would resume the finished one-process state (a resume checks the training
        # trajectory, which has no world size) and train nothing: start from scratch.
        (root / params.layout.model_state("raster")).unlink()
        runs[kind] = (root, job, (root / params.layout.model_checkpoint("raster")).read_bytes())
    root, job, one_process = runs["slurm"]
    out = submit(cluster, root, root / "nproc2.yaml", *job.outputs)
    jobs = submissions(out)
    assert len(jobs) == 1, f"train@raster with train.nproc 2 should be one SLURM job: {jobs}"
    (slurm_id,) = jobs
    acct = accounting(cluster, jobs)[slurm_id]
    assert (acct["state"], acct["cpus"]) == ("COMPLETED", job.threads), acct
    assert "torchrun --standalone --nproc_per_node=2" in out
    metrics = json.loads((root / params.layout.model_metrics("raster")).read_text())
    assert (metrics["world_size"], metrics["steps"]) == (2, values["train"]["max_steps"])
    two_ranks = (root / params.layout.model_checkpoint("raster")).read_bytes()
    # trained anew: the model's dropout masks differ with the batch split, so the bytes do too
    assert two_ranks != one_process
    local_root, local_job, _ = runs["local"]
    snakemake(local_root, local_root / "nproc2.yaml", *local_job.outputs)
    assert two_ranks == (local_root / params.layout.model_checkpoint("raster")).read_bytes(), \
        "two ranks in one SLURM job and two ranks run locally trained different weights"
