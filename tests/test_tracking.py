import multiprocessing as mp
import sqlite3

import pytest

from arpg import tracking
from arpg.config import load_params


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

    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    assert tracking.with_retry(flaky) == "ok" and calls["n"] == 3
    with pytest.raises(ValueError):
        tracking.with_retry(lambda: (_ for _ in ()).throw(ValueError("other")))


def test_uri_resolution(monkeypatch, params_file):
    params = load_params(params_file(**{"tracking.uri": None}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(params) == f"sqlite:///{tracking.REPO_ROOT / 'mlflow.db'}"
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
