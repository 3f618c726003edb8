"""One params file, one result.

* A command reads exactly the params keys its job declares in arpg/pipeline.py (recorded by
  `arpg.config.Params` while the smoke study runs, not assumed), so job fingerprints cannot drift.
* An identical params copy, or the study folder moved elsewhere, reruns nothing; changing one key
  reruns exactly the jobs that read it and what depends on them (Snakemake's own dry run).
* A second fresh run in another folder writes the same bytes (checkpoints, samples, metrics).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arpg import pipeline, warm
from arpg.cli import RECORD_READS_ENV
from arpg.config import NOT_RESULT_KEYS, load_params, schema, unrecorded
from arpg.decoders import DECODERS
from arpg.errors import ArpgError
from arpg.paths import REPO_ROOT

BIN = Path(sys.executable).parent
SMOKE = REPO_ROOT / "configs" / "smoke.yaml"
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
ENV.pop("MLFLOW_TRACKING_URI", None)  # tracking.uri null: mlflow.db in the study folder (the working directory)

# Prints, for each params file, the jobs Snakemake's dry run would run (one process: ~0.2 s a file).
_NEEDRUN_SCRIPT = r"""
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.enums import Quietness
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

snakefile, workdir, listing = sys.argv[1:4]
out = {}
for params in json.loads(Path(listing).read_text()):
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        wf_api = api.workflow(resource_settings=ResourceSettings(cores=2),
                              config_settings=ConfigSettings(config={"params": params}),
                              snakefile=Path(snakefile), workdir=Path(workdir))
        wf_api.dag(dag_settings=DAGSettings())
        wf = wf_api._workflow
        wf._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True)
        wf._build_dag()
        out[params] = [[j.rule.name, dict(j.wildcards)] for j in wf.dag.needrun_jobs() if j.rule.name != "all"]
print("NEEDRUN-JSON " + json.dumps(out))
"""


def snakemake(root: Path, params_file: Path, *targets: str, timeout: int = 1500, env: dict | None = None) -> str:
    cmd = [str(BIN / "snakemake"), *targets, "--snakefile", str(REPO_ROOT / "Snakefile"), "--cores", "2",
           "--directory", str(root), "--config", f"params={params_file}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, env=env or ENV)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def needrun(root: Path, params_files: list[Path]) -> dict[str, set[str]]:
    """Job names (pipeline.Job.name) that a Snakemake dry run in `root` would run, per params file."""
    listing = root / "needrun.json"
    listing.write_text(json.dumps([str(p) for p in params_files]))
    proc = subprocess.run([sys.executable, "-c", _NEEDRUN_SCRIPT, str(REPO_ROOT / "Snakefile"), str(root),
                           str(listing)], cwd=root, capture_output=True, text=True, timeout=600, env=ENV)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("NEEDRUN-JSON ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {}
    for path, jobs in json.loads(line[len("NEEDRUN-JSON "):]).items():
        params = load_params(path)
        out[path] = {pipeline.job(params, rule, wildcards).name for rule, wildcards in jobs}
    return out


def run_smoke_study(root: Path) -> Path:
    """The smoke study run from scratch in `root`, every command recording its reads. The `study`
    fixture (tests/conftest.py: one run for the whole session, which tests/test_slurm.py compares with
    the same study on SLURM)."""
    shutil.copy(SMOKE, root / "params.yaml")  # relative output_dir, report.dir and MLflow store
    env_before = ENV.get(RECORD_READS_ENV)
    ENV[RECORD_READS_ENV] = str(root / "reads")
    try:
        (root / "first-run.log").write_text(snakemake(root, root / "params.yaml"))
    finally:
        ENV.pop(RECORD_READS_ENV) if env_before is None else ENV.update({RECORD_READS_ENV: env_before})
    return root


def _leaves(values: dict, dotted: str) -> list[str]:
    node = values
    for part in dotted.split("."):
        node = node[part]
    if isinstance(node, dict):
        return [leaf for key in node for leaf in _leaves(values, f"{dotted}.{key}")]
    return [dotted]


def declared_leaves(params, job: pipeline.Job) -> set[str]:
    return {leaf for key in job.param_keys for leaf in _leaves(unrecorded(params), key)}


def _recorded(root: Path) -> dict[tuple[str, ...], set[str]]:
    """argv (without --params) -> params keys that command read."""
    out: dict[tuple[str, ...], set[str]] = {}
    for file in (root / "reads").glob("*.json"):
        doc = json.loads(file.read_text())
        argv = list(doc["argv"])
        if "--params" in argv:
            del argv[argv.index("--params"):argv.index("--params") + 2]
        out.setdefault(tuple(argv), set()).update(doc["reads"])
    return out


# --------------------------------------------------------------------------- declared == read

@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_command_reads_exactly_the_keys_its_job_declares(study):
    params = load_params(study / "params.yaml")
    recorded = _recorded(study)
    problems = []
    for job in pipeline.jobs(params):
        reads = recorded.get(job.args)
        if reads is None:
            problems.append(f"{job.name}: no record of `arpg {' '.join(job.args)}`")
            continue
        declared = declared_leaves(params, job)
        if reads - declared:
            problems.append(f"{job.name} reads undeclared {sorted(reads - declared)}")
        if declared - reads:
            problems.append(f"{job.name} declares unread {sorted(declared - reads)}")
    assert not problems, "\n".join(problems)


def test_the_read_recording_sees_leaves_and_lists_not_sections(params_file):
    params = load_params(params_file())
    params["train"]["lr"], params["sample"]["steps"]  # noqa: B018 - reads under test
    assert "lr" in params["train"] and "data" in params  # membership is no read
    assert params.reads == {"train.lr", "sample.steps"}
    assert json.loads(json.dumps(unrecorded(params)))["train"]["lr"] == params["train"]["lr"]
    assert params.reads == {"train.lr", "sample.steps"}  # the plain values record nothing


# --------------------------------------------------------------------------- what reruns

def _schema_node(dotted: str) -> dict:
    node = schema()  # the registered decoders' train.<name>_* keys spelled out
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def _candidates(dotted: str, value):
    """Other valid-looking values for one params leaf, most ordinary first."""
    node = _schema_node(dotted)
    items = node["items"] if isinstance(node.get("items"), dict) else {}
    enum = node.get("enum") or items.get("enum")
    if dotted in ALTERNATIVES:
        return ALTERNATIVES[dotted]
    if node.get("enum"):
        return [v for v in node["enum"] if v != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2]
    if isinstance(value, float):  # 0.0 scales to itself: the additions change it
        return [v for v in (value * 1.5, value * 0.5, value + 0.1, value + 1.0) if v != value]
    if isinstance(value, str):
        return []
    if isinstance(value, list):
        options = [value[:-1]] if len(value) > 1 else []
        if enum:
            options += [value + [v] for v in enum if v not in value]
        elif value and isinstance(value[0], (int, float)) and not isinstance(value[0], bool):
            options += [[value[0] + 1, *value[1:]], [*value[:-1], value[-1] * 0.5]]
        return options
    return []  # null: a user-given file or folder would have to exist


# Changed values for leaves whose schema gives no enum to pick from.
ALTERNATIVES = {"name": ["smokex"], "device": ["cpu"], "train.arpg_model": ["ARPG-S"],
                "profile.max_wait_share": [0.05], "profile.max_ratio_spread": [1.5],  # smoke: null (unchecked)
                "train.raster_model": ["LlamaGen-S"], "profile.models": [["default", "ARPG-T"]],
                "profile.overrides": [[{"model": "default", "steps": [2], "batch_sizes": [4]}]],
                # the sweep families stay disjoint (arpg.config): a guidance value besides cfg_default
                # (the smoke list is empty), a default step count that sample.steps holds
                "sample.cfg": [[1.0]], "sample.steps_default": [2]}
# Keys that place or label work rather than compute it, or name user files: no mutation is tried.
_NOT_RESULT = {f"{section}.{key}" for section, keys in NOT_RESULT_KEYS.items() for key in keys}
NOT_MUTATED = {"output_dir", "data.path", "report.dir", "tracking.enabled", "tracking.uri",
               "tracking.experiment"}


def _runs(values: dict) -> list[str]:
    from arpg.paths import seed_run

    return [seed_run(s) for s in values["train"]["seeds"]]


def _mutations(values: dict, root: Path):
    """(key, params file) for every leaf with a valid changed value."""
    flat = []

    def walk(prefix, node):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else key
            walk(dotted, value) if isinstance(value, dict) else flat.append((dotted, value))

    walk("", values)
    out, untried = [], []
    for i, (dotted, value) in enumerate(flat):
        if dotted in NOT_MUTATED:
            continue
        for candidate in _candidates(dotted, value):
            changed = copy.deepcopy(values)
            node = changed
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = candidate
            path = root / "mutations" / f"{i:03d}.yaml"
            path.parent.mkdir(exist_ok=True)
            path.write_text(yaml.safe_dump(changed))
            try:
                pipeline.jobs(load_params(path))
            except ArpgError:
                continue
            out.append((dotted, path))
            break
        else:
            untried.append(dotted)
    return out, untried


def expected_reruns(before, after, key: str) -> set[str]:
    """Jobs that read `key` (or are new, or have other inputs), plus everything downstream of them."""
    old = {j.name: j for j in pipeline.jobs(before)}
    jobs = pipeline.jobs(after)
    direct = {j.name for j in jobs if j.name not in old or key in declared_leaves(after, j)
              or set(j.inputs) != set(old[j.name].inputs) or j.outputs != old[j.name].outputs
              or j.launcher != old[j.name].launcher}  # the shell line changed (processes per job)
    producer = {o: j.name for j in jobs for o in j.all_outputs}
    changed = True
    while changed:
        grown = direct | {j.name for j in jobs if any(producer.get(i) in direct for i in j.inputs)}
        changed, direct = grown != direct, grown
    return direct


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_identical_copy_or_a_moved_study_reruns_nothing(study, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "copy.yaml"
    elsewhere.parent.mkdir()
    shutil.copy(study / "params.yaml", elsewhere)
    assert needrun(study, [elsewhere, study / "params.yaml"]) == {str(elsewhere): set(),
                                                                  str(study / "params.yaml"): set()}
    moved = tmp_path / "moved"
    shutil.copytree(study, moved, symlinks=True)  # keeps mtimes, as `mv` does
    assert needrun(moved, [moved / "params.yaml"]) == {str(moved / "params.yaml"): set()}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_each_params_key_reruns_exactly_the_jobs_that_read_it(study, tmp_path):
    values = yaml.safe_load((study / "params.yaml").read_text())
    before = load_params(study / "params.yaml")
    mutations, untried = _mutations(values, tmp_path)
    # every leaf but these is exercised (a new key without a valid mutation fails here): user files that
    # would have to exist, and tokenize_flip, which train.use_flipped: true needs (its own change covers it)
    assert set(untried) <= {"data.test_path", "tokenizer.pretrained", "train.arpg_pretrained",
                            "train.raster_pretrained", "evaluate.inception_weights", "tokenizer.tokenize_flip"}, untried
    assert len(mutations) >= 80
    ran = needrun(study, [path for _, path in mutations])
    wrong = []
    for key, path in mutations:
        want = expected_reruns(before, load_params(path), key)
        got = ran[str(path)]
        if got != want:
            wrong.append(f"{key}: Snakemake reruns {sorted(got - want)} too, and not {sorted(want - got)}")
    assert not wrong, "\n".join(wrong)
    # the keys no result depends on (config.NOT_RESULT_KEYS) rerun nothing at all
    quiet = {key: ran[str(path)] for key, path in mutations if key in _NOT_RESULT}
    assert set(quiet) == _NOT_RESULT and not any(quiet.values()), quiet


def _executed(out: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table: rule -> count ({} when nothing ran)."""
    table = out[out.index("Job stats:"):] if "Job stats:" in out else ""
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_first_run_ran_every_job_and_logged_each_stage_to_mlflow(study):
    from mlflow.tracking import MlflowClient

    params = load_params(study / "params.yaml")
    n_jobs = len(pipeline.jobs(params))
    assert _executed((study / "first-run.log").read_text())["total"] == n_jobs + 1  # + rule all
    assert (study / params["report"]["dir"] / "README.md").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow.db'}")  # tracking.uri null: the working dir
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`arpg.role` = 'stage'", max_results=1000)
    assert len(runs) >= n_jobs and all(r.info.status == "FINISHED" for r in runs)
    for stage in ("sample", "evaluate"):
        for r in (r for r in runs if r.data.tags["arpg.stage"] == stage):
            assert {"model", "steps", "cfg", "order", "seed"} <= set(r.data.params), (stage, r.data.params)
    assert {"prepare-data", "train", "sample", "evaluate", "profile", "gallery", "report"} <= {
        r.data.tags["arpg.stage"] for r in runs}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_job_left_a_benchmark_file_a_short_plain_log_and_progress_on_the_console(study):
    params = load_params(study / "params.yaml")
    jobs = pipeline.jobs(params)
    missing = [j.name for j in jobs if not (study / j.benchmark).is_file()]
    assert not missing, missing
    console = (study / "first-run.log").read_text()
    for job in (j for j in jobs if j.rule in ("train_tokenizer", "train")):
        log = (study / job.log).read_bytes()
        steps = params[{"train_tokenizer": "tokenizer", "train": "train"}[job.rule]]["max_steps"]
        assert b"\r" not in log and len(log) < 20_000 * max(1, steps / 1000), (job.name, len(log))
        lines = [x for x in log.decode().splitlines() if f"step {steps}/{steps} (100%)" in x]
        assert len(lines) == 1, (job.name, log.decode()[-2000:])
        assert lines[0] in console, f"{job.name}: its progress is not on Snakemake's console"
    assert re.search(r"^sample \w+ steps\d+_cfg[\d.]+_[\w-]+: batch \d+/\d+ \(100%\)", console, re.M)


_REPORT_FILE = re.compile(r'"([^"{}]+)": \{"name": "[^"]*", "filename": "[^"]*", "labels": (\{[^{}]*\}).*?'
                          r'"data_uri": "data:[^"]*?base64,([A-Za-z0-9+/=]*)"', re.S)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_snakemake_report_holds_every_table_and_figure_with_its_caption(study, tmp_path):
    """`snakemake --report` is a self-contained results page: every file of report.dir embedded byte for
    byte, filed under its category, its caption beside it."""
    import base64

    from arpg.report_catalog import describe

    params = load_params(study / "params.yaml")
    html_path = tmp_path / "report.html"
    snakemake(study, study / "params.yaml", "--report", str(html_path))
    html = html_path.read_text()
    embedded = {m.group(1): (json.loads(m.group(2)), base64.b64decode(m.group(3))) for m in _REPORT_FILE.finditer(html)}
    report_dir = study / params["report"]["dir"]
    files = sorted(p for p in report_dir.rglob("*") if p.is_file() and p.suffix in (".png", ".csv", ".md", ".json"))
    assert len(files) >= 30 and (report_dir / "stage_times.csv") in files
    for path in files:
        rel = path.relative_to(report_dir).as_posix()
        key = str(path.relative_to(study))
        assert key in embedded, f"{rel} is not in the --report page"
        labels, data = embedded[key]
        assert data == path.read_bytes(), rel
        assert labels == {"file": rel, "caption": describe(rel).caption}
        category = re.search(r'"' + re.escape(describe(rel).category) + r'": \{(.*?)\}', html)
        assert category and f'"{key}"' in category.group(1), rel


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(base: str, endpoint: str, body: dict | None = None) -> dict:
    """One MLflow REST call: POST with a JSON body, or GET."""
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{endpoint}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(study):
    """`mlflow server` on the smoke study's store, on a free port of 127.0.0.1: its base URL."""
    import time
    import urllib.request

    port = _free_port()
    log = open(study / "mlflow-server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{study / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=study, stdout=log, stderr=subprocess.STDOUT, env=ENV)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (study / "mlflow-server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (study / "mlflow-server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_mlflow_server_on_the_study_serves_what_comparing_quality_and_speed_needs(study, mlflow_server):
    params = load_params(study / "params.yaml")
    experiments = _api(mlflow_server, "experiments/search", {"max_results": 100})["experiments"]
    experiment = next(e for e in experiments if e["name"] == "arpg-smoke")
    note = {t["key"]: t["value"] for t in experiment.get("tags", [])}.get("mlflow.note.content", "")
    assert "img_s" in note and "fid_<extractor>" in note and "pareto.csv" in note, note
    runs, token = [], None
    while True:
        page = _api(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                   "max_results": 1000, **({"page_token": token} if token else {})})
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            break

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    assert not [r["info"]["run_name"] for r in runs if r["info"]["status"] != "FINISHED"]  # none left RUNNING
    study_runs = [r for r in runs if tags(r).get("arpg.role") == "study"]
    assert len(study_runs) == 1
    parent = study_runs[0]["info"]
    assert int(parent["end_time"]) > int(parent["start_time"])  # a duration: first stage's start to last's end
    assert tags(study_runs[0])["arpg.failed_jobs"] == "none"
    listed = _api(mlflow_server, f"artifacts/list?run_id={parent['run_id']}")
    assert "params.yaml" in [f["path"] for f in listed.get("files", [])]

    # every sweep point: one evaluate run holding its parameters and its FID, one sample run holding
    # its measured images/s; no stage writes into another's run
    points = [j for j in pipeline.jobs(params) if j.rule == "evaluate"]
    for stage, metric in (("evaluate", "fid_classifier"), ("sample", "img_s")):
        stage_runs = [r for r in runs if tags(r).get("arpg.stage") == stage]
        assert sorted(r["info"]["run_name"] for r in stage_runs) == sorted(f"{stage}-{j.key}" for j in points)
        for run in stage_runs:
            names = {p["key"] for p in run["data"]["params"]}
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert {"model", "steps", "cfg", "order"} <= names, (run["info"]["run_name"], names)
            assert metrics.get(metric, 0) > 0 and "img_s_profile" not in metrics, (run["info"]["run_name"], metrics)
            if stage == "sample":
                assert tags(run)["arpg.img_s.batch_size"] == str(params["sample"]["batch_size"])
    evaluate = [r for r in runs if tags(r).get("arpg.stage") == "evaluate"]

    # each job's log under its run (Snakemake redirects the command's output to Job.log)
    logs = _api(mlflow_server, f"artifacts/list?run_id={evaluate[0]['info']['run_id']}&path=logs")
    assert [f["path"] for f in logs.get("files", [])] == [f"logs/{Path(tags(evaluate[0])['arpg.log']).name}"]


# --------------------------------------------------------------------------- same bytes

def result_targets(params) -> list[str]:
    """Every output of the jobs whose bytes the params fix: all but profile and report (they hold
    timings) and the gallery."""
    return [o for j in pipeline.jobs(params) if j.rule not in ("profile", "report", "gallery") for o in j.outputs]


def _result_files(root: Path, params) -> list[Path]:
    return [root / f for f in result_targets(params)]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_second_fresh_run_elsewhere_writes_the_same_bytes(study, tmp_path):
    params = load_params(study / "params.yaml")
    shutil.copy(study / "params.yaml", tmp_path / "params.yaml")
    # every job in its own process this time (no warm server): forking changes no byte
    out = snakemake(tmp_path, tmp_path / "params.yaml", *result_targets(params), env={**ENV, warm.DISABLE_ENV: "0"})
    seeds = len(yaml.safe_load(SMOKE.read_text())["train"]["seeds"])  # trained again: each decoder, each seed
    assert "train_tokenizer" in out and re.search(rf"^train\s+{len(DECODERS) * seeds}$", out, re.M)
    forked = {j.rule for j in pipeline.jobs(params) if (study / j.usage).exists()}
    assert {"sample", "evaluate", "zero_shot"} <= forked, forked  # the first run forked them
    assert not [j.usage for j in pipeline.jobs(params) if (tmp_path / j.usage).exists()]
    first, second = _result_files(study, params), _result_files(tmp_path, params)
    assert len(first) >= 30
    differ = [str(a.relative_to(study)) for a, b in zip(first, second) if a.read_bytes() != b.read_bytes()]
    assert not differ, differ


# --------------------------------------------------------------------------- DVC

DVC_ENV = {**ENV, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "arpg-test", "GIT_AUTHOR_EMAIL": "test@arpg",
           "GIT_COMMITTER_NAME": "arpg-test", "GIT_COMMITTER_EMAIL": "test@arpg"}


def _run_all(root: Path, *cmds: list[str], env: dict = DVC_ENV) -> None:
    for cmd in cmds:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1500, env=env)
        assert proc.returncode == 0, f"{cmd}: " + proc.stdout[-5000:] + proc.stderr[-5000:]


def _dvc_repo(root: Path) -> None:
    """git + DVC in `root`, dvc.yaml rendered from the job list of root/params.yaml."""
    from arpg.commands import export_dvc

    params = load_params(root / "params.yaml")
    (root / "dvc.yaml").write_text(export_dvc.dump(export_dvc.render(params, "params.yaml", root=root)))
    _run_all(root, ["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"])


@pytest.fixture(scope="module")
def dvc_study(tmp_path_factory) -> Path:
    """The smoke study run by `dvc repro` in a fresh git + DVC repository (dvc.yaml from the job list),
    committed (experiments start from a commit)."""
    root = tmp_path_factory.mktemp("dvc-study")
    shutil.copy(SMOKE, root / "params.yaml")
    _dvc_repo(root)
    # its jobs start by fork from a warm server, as a researcher's `dvc repro` beside one would (the
    # cold path writes the same bytes: test_a_second_fresh_run_elsewhere_writes_the_same_bytes)
    with warm.serving(DVC_ENV, warm.CLI_PRELOAD) as path:
        _run_all(root, [str(BIN / "dvc"), "repro"], env={**DVC_ENV, warm.SOCKET_ENV: path})
    _run_all(root, ["git", "add", "-A"], ["git", "commit", "-qm", "smoke study"])
    return root


def _dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True, timeout=1500,
                          env=DVC_ENV)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def dvc_job_names(root: Path) -> dict[str, str]:
    """DVC stage name (`sample-arpg-steps@2`) -> pipeline.Job.name, matched by the outputs they write."""
    from dvc.repo import Repo

    params = load_params(root / "params.yaml")
    by_outs = {frozenset(j.all_outputs): j.name for j in pipeline.jobs(params)}
    with Repo(str(root)) as repo:
        # s.name, not s.addressing: addressing is relative to the working directory (`../x/dvc.yaml:report`)
        return {s.name: by_outs.get(frozenset(o.def_path for o in s.outs), f"(no job: {s.name})")
                for s in repo.index.stages}


def dvc_job_names_for(values: dict, root: Path, scratch: Path) -> dict[str, str]:
    """dvc_job_names of root's dvc.yaml resolved against `values` (in a scratch DVC root)."""
    from dvc.repo import Repo

    scratch.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "dvc.yaml", scratch / "dvc.yaml")
    (scratch / "params.yaml").write_text(yaml.safe_dump(values))
    Repo.init(str(scratch), no_scm=True)
    return dvc_job_names(scratch)


def _ran_stages(out: str) -> set[str]:
    return set(re.findall(r"^Running stage '([^']+)'", out, re.M))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dvc_repro_runs_every_job_and_then_has_nothing_to_do(dvc_study):
    params = load_params(dvc_study / "params.yaml")
    jobs = pipeline.jobs(params)
    missing = [o for j in jobs for o in j.outputs if not (dvc_study / o).exists()]
    assert not missing, missing
    lock = yaml.safe_load((dvc_study / "dvc.lock").read_text())["stages"]
    assert len(lock) == len(jobs), sorted(lock)  # foreach stages lock as "<stage>@<item>"
    assert "Data and pipelines are up to date" in _dvc(dvc_study, "status")
    assert (dvc_study / params["report"]["dir"] / "README.md").is_file()
    # DVC writes no log files: each stage's run holds a copy of the output the stage printed
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{dvc_study / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`arpg.role` = 'stage'", max_results=1000)
    assert len(runs) >= len(jobs) and all(r.info.status == "FINISHED" for r in runs)
    study_runs = client.search_runs(experiments, filter_string="tags.`arpg.role` = 'study'")
    assert [r.info.status for r in study_runs] == ["FINISHED"]  # closed by the report: DVC has no hooks
    unlogged = [r.info.run_name for r in runs
                if [a.path for a in client.list_artifacts(r.info.run_id, "logs")] != [f"logs/{r.info.run_name}.log"]]
    assert not unlogged


_DVC_STATUS_SCRIPT = r"""
import json, sys
from pathlib import Path
from dvc.repo import Repo

root, listing = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
params_file, original = root / "params.yaml", (root / "params.yaml").read_bytes()
out = {}
try:
    for path in listing:
        params_file.write_bytes(Path(path).read_bytes())
        with Repo(str(root)) as repo:
            out[path] = sorted(repo.status())
finally:
    params_file.write_bytes(original)
print("STATUS-JSON " + json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dvc_status_names_exactly_the_stages_that_read_a_changed_key(dvc_study, tmp_path):
    """`dvc status` after one params key changed lists the stages whose command reads it (DVC then
    reruns their dependents through the deps in dvc.yaml). Keys that change the job list itself
    need `arpg export-dvc` first and are left to the Snakemake test above."""
    values = yaml.safe_load((dvc_study / "params.yaml").read_text())
    before = load_params(dvc_study / "params.yaml")
    old = {j.name: j for j in pipeline.jobs(before)}
    same_shape = []
    for key, path in _mutations(values, tmp_path)[0]:
        after = load_params(path)
        jobs = pipeline.jobs(after)
        if {j.name for j in jobs} == set(old) and all(
                (j.inputs, j.outputs, j.launcher) == (old[j.name].inputs, old[j.name].outputs, old[j.name].launcher)
                for j in jobs):
            same_shape.append((key, path, {j.name for j in jobs if key in declared_leaves(after, j)}))
    assert len(same_shape) >= 60
    # half of the params files each in the study and in a copy of it: two `dvc status` loops side by side
    roots = [dvc_study, tmp_path / "copy"]
    shutil.copytree(dvc_study, roots[1], symlinks=True)
    procs = []
    for i, root in enumerate(roots):
        listing = tmp_path / f"listing{i}.json"
        listing.write_text(json.dumps([str(p) for _, p, _ in same_shape[i::len(roots)]]))
        procs.append(subprocess.Popen([sys.executable, "-c", _DVC_STATUS_SCRIPT, str(root), str(listing)], cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**ENV, "DVC_NO_ANALYTICS": "1"}))
    status = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1500)
        line = next((x for x in stdout.splitlines() if x.startswith("STATUS-JSON ")), None)
        assert line, stdout[-3000:] + stderr[-3000:]
        status.update(json.loads(line[len("STATUS-JSON "):]))

    job_name = dvc_job_names(dvc_study).__getitem__

    wrong = [f"{key}: dvc status names {sorted(set(map(job_name, status[str(path)])) ^ want)} wrongly"
             for key, path, want in same_shape if set(map(job_name, status[str(path)])) != want]
    assert not wrong, "\n".join(wrong)
    quiet = {key: status[str(path)] for key, path, _ in same_shape if key in _NOT_RESULT}
    assert set(quiet) == _NOT_RESULT and not any(quiet.values()), quiet  # keys no result depends on: nothing


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dvc_exp_run_with_one_more_step_count_runs_only_its_point_and_the_report(dvc_study, tmp_path):
    """Last of the DVC tests: it adds an experiment to the DVC study. The sweeps of
    dvc.yaml run over the params lists, so `-S` adds exactly the new stages, and dvc.yaml stays current."""
    values = yaml.safe_load((dvc_study / "params.yaml").read_text())
    steps = [*values["sample"]["steps"], 3]
    out = _dvc(dvc_study, "exp", "run", "-S", f"sample.steps={json.dumps(steps)}")
    grown = copy.deepcopy(values)
    grown["sample"]["steps"] = steps
    names = dvc_job_names_for(grown, dvc_study, tmp_path)  # the stages DVC resolves for the experiment's params
    new = [f"arpg-steps3_cfg{values['sample']['cfg_default']}_random{r}" for r in _runs(values)]  # each seed's model
    assert {names[s] for s in _ran_stages(out)} == {f"{rule}@{n}" for rule in ("sample", "evaluate") for n in new} | {
        "report"}, out[-3000:]
    # DVC rewrote the params file in the workspace (its nulls left empty): the same values, so the same fingerprints
    assert yaml.safe_load((dvc_study / "params.yaml").read_text()) == grown
    proc = subprocess.run([str(BIN / "arpg"), "export-dvc", "--check"], cwd=dvc_study, capture_output=True, text=True,
                          env=DVC_ENV, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = json.loads(_dvc(dvc_study, "exp", "show", "--json"))
    exps = [e for commit in shown for e in [commit, *(x for ex in commit.get("experiments") or [] for x in ex["revs"])]]
    records = [e["data"] for e in exps if e.get("data")]
    step_lists = [r["params"]["params.yaml"]["data"]["sample"]["steps"] for r in records]
    assert values["sample"]["steps"] in step_lists and steps in step_lists
    report_metrics = str(Path(values["report"]["dir"]) / "metrics.json")
    fid = [r["metrics"][report_metrics]["data"].get("fid_classifier.arpg.s3") for r in records
           if report_metrics in (r.get("metrics") or {})]
    assert any(isinstance(v, float) for v in fid), records[-1].get("metrics")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dvc_adopts_a_snakemake_run_with_dvc_commit(study, tmp_path):
    """The documented hand-over (docs/pipeline.md): after Snakemake built the study, `dvc commit -f`
    records its outputs in dvc.lock without running anything; `dvc status` is then clean and
    `dvc repro` has nothing to do."""
    root = tmp_path / "adopted"
    shutil.copytree(study, root, symlinks=True, ignore=shutil.ignore_patterns("mutations", "grown.yaml"))
    _dvc_repo(root)
    _dvc(root, "commit", "-f")
    assert "Data and pipelines are up to date" in _dvc(root, "status")
    assert not _ran_stages(_dvc(root, "repro", "--dry"))
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert len(lock) == len(pipeline.jobs(load_params(root / "params.yaml")))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_new_sweep_value_runs_only_its_point_and_the_report(study):
    """Last of the study's tests: it adds outputs to the study folder."""
    values = yaml.safe_load((study / "params.yaml").read_text())
    values["sample"]["steps"] = [*values["sample"]["steps"], 3]
    grown = study / "grown.yaml"
    grown.write_text(yaml.safe_dump(values))
    k = len(_runs(values))  # the step sweep samples every training seed's model
    assert _executed(snakemake(study, grown)) == {"sample": k, "evaluate": k, "report": 1, "all": 1, "total": 2 * k + 2}
    assert "Nothing to be done" in snakemake(study, grown)
