import multiprocessing as mp
import sqlite3

import pytest

from arpg import study_status, tracking
from arpg.config import load_params
from arpg.paths import REPO_ROOT


def _log_from_process(params_path: str, index: int, uri: str) -> None:
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    params = load_params(params_path)
    with tracking.stage_run(params, "sample", run_name=f"worker-{index}",
                            run_params={"model": "arpg", "steps": index, "seed": 0}) as run:
        for step in range(20):
            run.log_metrics({"loss": 1.0 / (step + 1), "index": index}, step=step)


@pytest.mark.slow
def test_four_parallel_processes_all_land(tmp_path, params_file):
    uri = f"sqlite:///{tmp_path / 'parallel.db'}"
    path = str(params_file())
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_log_from_process, args=(path, i, uri)) for i in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        assert proc.exitcode == 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("arpg-fashion-mnist")
    runs = client.search_runs([experiment.experiment_id])
    stages = [r for r in runs if r.data.tags.get("arpg.role") == "stage"]
    studies = [r for r in runs if r.data.tags.get("arpg.role") == "study"]
    assert sorted(r.info.run_name for r in stages) == [f"worker-{i}" for i in range(4)]
    assert len(studies) == 1  # one parent per params file, even when created concurrently
    for run in stages:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == studies[0].info.run_id
        assert run.data.params["model"] == "arpg"
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 20
        assert run.data.tags["arpg.params_hash"] == load_params(path).digest


def test_failed_stage_is_marked_failed(tmp_path, params_file):
    params = load_params(params_file())
    with pytest.raises(RuntimeError):
        with tracking.stage_run(params, "train") as run:
            run_id = run.run_id
            raise RuntimeError("boom")
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking.tracking_uri(params)).get_run(run_id).info.status == "FAILED"


def test_retry_on_database_locked(monkeypatch):
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    monkeypatch.setattr("arpg.mlflow_store.time.sleep", lambda s: None)
    assert tracking.with_retry(flaky) == "ok" and calls["n"] == 3
    with pytest.raises(ValueError):
        tracking.with_retry(lambda: (_ for _ in ()).throw(ValueError("other")))


def test_uri_resolution(monkeypatch, params_file):
    params = load_params(params_file(**{"tracking.uri": None}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(params) == f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    assert tracking.tracking_uri(params).startswith("sqlite:////")  # absolute path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(params) == "http://127.0.0.1:5000"
    assert tracking.experiment_name(params) == "arpg-fashion-mnist"


def test_disabled_tracking_logs_nothing(tmp_path, params_file, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    params = load_params(params_file(**{"tracking.enabled": False}))
    with tracking.stage_run(params, "x") as run:
        run.log_metrics({"a": 1.0})
    assert not (tmp_path / "never.db").exists()


# --------------------------------------------------------------------------- the study's outcome

def _client(params):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.tracking_uri(params))


def _parent(client, run_id):
    return client.get_run(client.get_run(run_id).data.tags["mlflow.parentRunId"])


def test_the_study_run_is_running_while_a_stage_runs_and_the_report_closes_it(params_file):
    params = load_params(params_file())
    client = _client(params)
    with tracking.stage_run(params, "train", "train-arpg") as first:
        assert _parent(client, first.run_id).info.status == "RUNNING"
    assert _parent(client, first.run_id).info.status == "RUNNING"  # not the last job: more may follow
    with tracking.stage_run(params, "report", closes_study=True) as report:
        pass
    study = _parent(client, report.run_id)
    assert study.info.status == "FINISHED"
    # its duration: from the first stage's start to the last stage's end
    assert study.info.start_time <= client.get_run(first.run_id).info.start_time
    assert study.info.end_time == client.get_run(report.run_id).info.end_time
    assert study.data.tags["arpg.failed_jobs"] == "none"
    with tracking.stage_run(params, "sample", "sample-x"):  # a later job reopens it
        assert client.get_run(study.info.run_id).info.status == "RUNNING"


def test_a_failed_stage_fails_the_study_until_its_job_succeeds_again(params_file):
    params = load_params(params_file())
    client = _client(params)
    with pytest.raises(RuntimeError):
        with tracking.stage_run(params, "train", "train-arpg") as failed:
            raise RuntimeError("boom")
    assert client.get_run(failed.run_id).data.tags["arpg.error"] == "RuntimeError: boom"
    assert _parent(client, failed.run_id).info.status == "FAILED"
    with tracking.stage_run(params, "report", closes_study=True) as report:
        pass
    study = _parent(client, report.run_id)
    assert study.info.status == "FAILED" and study.data.tags["arpg.failed_jobs"] == "train train-arpg"
    with tracking.stage_run(params, "train", "train-arpg"):  # the rerun of the failed job
        pass
    assert tracking.close_study(params) == "FINISHED"  # its latest attempt counts
    assert client.get_run(study.info.run_id).data.tags["arpg.failed_jobs"] == "none"


def test_a_run_whose_process_died_is_failed_when_the_study_closes(params_file):
    import socket
    import subprocess
    import sys

    params = load_params(params_file())
    client = _client(params)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    with tracking.stage_run(params, "train", "train-arpg") as killed:
        pass
    with tracking.stage_run(params, "sample", "sample-on-a-node") as elsewhere:
        pass
    # as a SIGKILLed job leaves them: still RUNNING, with the process tags of a dead pid / another host
    client.update_run(killed.run_id, status="RUNNING")
    client.set_tag(killed.run_id, "arpg.pid", dead.stdout.strip())
    client.update_run(elsewhere.run_id, status="RUNNING")
    client.set_tag(elsewhere.run_id, "arpg.host", socket.gethostname() + "-node7")
    assert tracking.close_study(params) == "RUNNING"  # another host's job may still be running
    assert client.get_run(killed.run_id).info.status == "FAILED"
    assert "ended without closing its run" in client.get_run(killed.run_id).data.tags["arpg.error"]
    assert client.get_run(elsewhere.run_id).info.status == "RUNNING"
    assert tracking.close_study(params, error=True) == "FAILED"  # Snakemake ended: nothing is running
    assert client.get_run(elsewhere.run_id).info.status == "FAILED"


def test_a_live_process_is_not_declared_dead():
    import os
    import socket

    me = {"arpg.host": socket.gethostname(), "arpg.pid": str(os.getpid()),
          "arpg.proc_start": study_status.proc_start(os.getpid()) or ""}
    assert not study_status.process_gone(me)
    assert study_status.process_gone({**me, "arpg.proc_start": "1"})  # the pid now belongs to another process


def test_close_study_without_runs_or_tracking_does_nothing(params_file):
    assert tracking.close_study(load_params(params_file())) is None
    assert tracking.close_study(load_params(params_file(**{"tracking.enabled": False}))) is None


# --------------------------------------------------------------------------- what runs carry

def test_the_experiment_has_a_description_and_the_study_run_its_params_file(params_file):
    params = load_params(params_file())
    client = _client(params)
    with tracking.stage_run(params, "train", "train-arpg") as run:
        pass
    study = _parent(client, run.run_id)
    note = client.get_experiment(study.info.experiment_id).tags[tracking.NOTE_TAG]
    assert "img_s" in note and "fid_<extractor>" in note and "pareto.csv" in note and "arpg.stage" in note
    assert [a.path for a in client.list_artifacts(study.info.run_id)] == [params.path.name]
    local = client.download_artifacts(study.info.run_id, params.path.name)
    assert open(local).read() == params.path.read_text()


_LOGGED_SCRIPT = r"""
import sys
from arpg import tracking
from arpg.config import load_params

with tracking.stage_run(load_params(sys.argv[1]), "train", "train-arpg") as run:
    print("line before the end")
    print("RUN", run.run_id, file=sys.stderr)
print("line after the end")
"""


def test_a_stage_attaches_the_log_its_output_is_redirected_to(tmp_path, params_file):
    import os
    import subprocess
    import sys

    path = params_file()
    log = tmp_path / "logs" / "train.log"
    log.parent.mkdir()
    with open(log, "w") as fh:  # as Snakemake's `> {log} 2>&1` does
        subprocess.run([sys.executable, "-c", _LOGGED_SCRIPT, str(path)], stdout=fh, stderr=subprocess.STDOUT,
                       check=True, timeout=300, env=os.environ)
    text = log.read_text()
    run_id = text.split("RUN ", 1)[1].split()[0]
    client = _client(load_params(path))
    assert client.get_run(run_id).data.tags["arpg.log"] == str(log)
    attached = open(client.download_artifacts(run_id, "logs/train.log")).read()
    assert "line before the end" in attached and "line after the end" not in attached
    assert attached.rstrip().endswith(f"the rest is in {log}")  # says that it is a partial copy
    assert "line after the end" in text


_PIPED_SCRIPT = r"""
import sys
from arpg import tracking
from arpg.config import load_params

with tracking.stage_run(load_params(sys.argv[1]), "train", "train-arpg") as run:
    print("RUN", run.run_id)
    for step in range(1, 4):  # a progress bar redrawn in place
        print(f"\rbar {step}/3", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print("line before the end", file=sys.stderr)
print("line after the end; streams restored:", sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__)
"""


def test_a_stage_without_a_log_file_attaches_a_copy_of_its_output(tmp_path, params_file):
    """Under `dvc repro` stdout is a pipe or a terminal: the run gets a copy of what the stage printed,
    a redrawn bar as its last state, and the stage's output still reaches the pipe whole."""
    import os
    import subprocess
    import sys

    path = params_file()
    proc = subprocess.run([sys.executable, "-c", _PIPED_SCRIPT, str(path)], capture_output=True, check=True,
                          timeout=300, env=os.environ)  # bytes: text mode would turn each \r into \n
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    run_id = stdout.split("RUN ", 1)[1].split()[0]
    assert "\rbar 1/3\rbar 2/3\rbar 3/3\n" in stderr  # the pipe gets the output untouched
    assert "line after the end; streams restored: True" in stdout
    client = _client(load_params(path))
    assert "arpg.log" not in client.get_run(run_id).data.tags  # no file to name
    attached = open(client.download_artifacts(run_id, "logs/train-arpg.log")).read().splitlines()
    assert attached[:3] == [f"RUN {run_id}", "bar 3/3", "line before the end"]
    assert attached[3].endswith("the rest went to the terminal only") and len(attached) == 4


def test_system_metrics_are_sampled_unless_turned_off(params_file, monkeypatch):
    import time

    pytest.importorskip("psutil")
    params = load_params(params_file())
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv(tracking.SYSTEM_METRICS_ENV, "true")
    with tracking.stage_run(params, "train", "train-arpg") as run:
        time.sleep(1.5)
    monkeypatch.setenv(tracking.SYSTEM_METRICS_ENV, "false")
    with tracking.stage_run(params, "train", "train-arpg") as off:
        time.sleep(0.6)
    client = _client(params)
    assert any(k.startswith("system/cpu") for k in client.get_run(run.run_id).data.metrics)
    assert not any(k.startswith("system/") for k in client.get_run(off.run_id).data.metrics)


def test_a_decode_that_raises_ends_the_sample_run_failed(params_file, monkeypatch):
    """`arpg sample` opens its stage run before loading and decoding, so a failure there ends it FAILED."""
    from arpg.cli import main
    from arpg.engine import sample_set
    from arpg.models import checkpoint

    def broken_decode(*args, **kwargs):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(checkpoint, "load_study_models", lambda params, model, device, run=None: (None, None))
    monkeypatch.setattr(sample_set, "make_draw", lambda *args: None)
    monkeypatch.setattr(sample_set, "generate_class_balanced", broken_decode)
    params = load_params(params_file())
    with pytest.raises(RuntimeError, match="decode failed"):
        main(["sample", "--params", str(params.path), "--model", "arpg", "--steps", "4", "--cfg", "2.0",
              "--order", "random"])
    assert _statuses(params, "sample-arpg-steps4_cfg2.0_random") == ["FAILED"]


def _statuses(params, run_name: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri(params))
    experiment = client.get_experiment_by_name(tracking.experiment_name(params))
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.runName = '{run_name}'")
    return [r.info.status for r in runs]


@pytest.mark.parametrize("argv, run_name", [(["zero-shot", "--task", "inpainting"], "zero-shot-inpainting"),
                                            (["gallery"], "gallery")])
def test_a_stage_that_fails_while_loading_ends_its_run_failed(params_file, monkeypatch, argv, run_name):
    from arpg.cli import main
    from arpg.models import checkpoint

    def broken_load(*args, **kwargs):
        raise RuntimeError("load failed")

    monkeypatch.setattr(checkpoint, "load_study_models", broken_load)
    params = load_params(params_file())
    with pytest.raises(RuntimeError, match="load failed"):
        main([argv[0], "--params", str(params.path), *argv[1:]])
    assert _statuses(params, run_name) == ["FAILED"]


@pytest.mark.parametrize("argv, run_name", [
    (["train-tokenizer"], "train-tokenizer"), (["tokenize"], "tokenize"), (["train-classifier"], "train-classifier"),
    (["train", "--model", "arpg"], "train-arpg"),
    (["sample", "--model", "arpg", "--steps", "4", "--cfg", "2.0", "--order", "random"],
     "sample-arpg-steps4_cfg2.0_random"),
    (["reference-stats", "--extractor", "classifier"], "reference-stats-classifier-test"),
    (["evaluate", "--model", "arpg", "--steps", "4", "--cfg", "2.0", "--order", "random"],
     "evaluate-arpg-steps4_cfg2.0_random"),
    (["select", "--model", "arpg", "--steps", "4", "--cfg", "2.0", "--order", "random"],
     "select-arpg-steps4_cfg2.0_random"),
    (["zero-shot", "--task", "inpainting"], "zero-shot-inpainting"), (["gallery"], "gallery"), (["report"], "report"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_every_stage_opens_its_run_before_reading_its_inputs(params_file, argv, run_name):
    """Nothing has run: each stage's first read fails (a message, exit 2) inside its run, which ends FAILED."""
    from arpg.cli import main

    params = load_params(params_file())
    assert main([argv[0], "--params", str(params.path), *argv[1:]]) == 2
    assert _statuses(params, run_name) == ["FAILED"]
