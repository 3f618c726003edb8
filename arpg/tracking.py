"""MLflow tracking for every stage: one URI, nested runs, safe under parallel jobs.

* One tracking URI for the whole project: $MLFLOW_TRACKING_URI if set, else
  `tracking.uri` from params, else `sqlite:///<repo>/mlflow.db` (absolute, so
  every stage and `mlflow ui` see the same store whatever their working dir).
* Experiment `tracking.experiment` or `arpg-<name>`. Each params file (by its
  hash) gets one parent "study" run; every stage invocation is a child run
  tagged with the git commit and params hash.
* SQLite allows one writer at a time. Parallel Snakemake jobs therefore retry
  every call that fails with "database is locked" (exponential back-off with
  jitter), and creation of the store / experiment / parent run is serialised by
  a file lock, so no job loses its run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from arpg.config import unrecorded
from arpg.paths import REPO_ROOT

DEFAULT_DB = "mlflow.db"  # relative to the working directory (the checkout's root under Snakemake / DVC)
_RETRY_SECONDS = 120.0
_MAX_PARAM_LEN = 6000


def tracking_uri(params: Mapping) -> str:
    params = unrecorded(params)  # where runs are logged is no input of a stage's results
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    uri = params["tracking"]["uri"]
    if uri:
        if "://" in uri or uri.startswith("databricks"):
            return uri
        return f"sqlite:///{Path(uri).resolve()}"  # relative: to the working directory, not the install
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def experiment_name(params: Mapping) -> str:
    params = unrecorded(params)
    return params["tracking"]["experiment"] or f"arpg-{params['name']}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _is_lock_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def with_retry(fn, *args, **kwargs):
    """Call fn, retrying while SQLite reports a lock (other jobs are writing)."""
    deadline = time.monotonic() + _RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a lock error
            if not _is_lock_error(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation and get-or-create steps across processes (SQLite only)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_suffix(db.suffix + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stringify(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


class StageRun:
    """A child MLflow run of one stage invocation."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _stringify(v)) for k, v in values.items()]
        for start in range(0, len(items), 100):
            with_retry(self.client.log_batch, self.run_id, params=items[start:start + 100])

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step or 0)) for k, v in values.items() if v is not None]
        for start in range(0, len(items), 1000):
            with_retry(self.client.log_batch, self.run_id, metrics=items[start:start + 1000])

    def set_tags(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        with_retry(self.client.log_batch, self.run_id, tags=[RunTag(k, _stringify(v)) for k, v in values.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            with_retry(self.client.log_artifacts, self.run_id, str(path), artifact_path)
        elif path.is_file():
            with_retry(self.client.log_artifact, self.run_id, str(path), artifact_path)


class NullRun(StageRun):
    """Used when tracking.enabled is false: the stage runs, nothing is logged."""

    def __init__(self):
        super().__init__(None, "")

    def log_params(self, values):  # noqa: D401 - no-op by design (tracking disabled)
        pass

    def log_metrics(self, values, step=None):
        pass

    def set_tags(self, values):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, whichever database it is
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def _study_run_id(client, experiment_id: str, params) -> str:
    digest = params.digest
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`arpg.role` = 'study' and tags.`arpg.params_hash` = '{digest}'",
        max_results=1,
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"study-{unrecorded(params)['name']}-{digest}", tags={
        "arpg.role": "study", "arpg.params_hash": digest, "arpg.params_file": str(params.path),
    })
    StageRun(client, run.info.run_id).log_params(params.flat())
    return run.info.run_id


@contextlib.contextmanager
def stage_run(params, stage: str, run_name: str | None = None,
              run_params: Mapping[str, Any] | None = None) -> Iterator[StageRun]:
    """Open a child run for one stage; marks it FAILED if the stage raises.

    `run_params` are the stage's own parameters, named consistently across
    stages (model, steps, cfg, order, seed) so MLflow's compare view can plot
    one metric against another directly.
    """
    if not unrecorded(params)["tracking"]["enabled"]:
        yield NullRun()
        return
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # store creation / migration chatter
        logging.getLogger(name).setLevel(logging.WARNING)

    uri = tracking_uri(params)
    with _store_lock(uri):
        client = with_retry(MlflowClient, tracking_uri=uri)
        experiment_id = with_retry(_experiment_id, client, experiment_name(params), uri)
        parent_id = with_retry(_study_run_id, client, experiment_id, params)
    run = with_retry(client.create_run, experiment_id, run_name=run_name or stage, tags={
        "mlflow.parentRunId": parent_id,
        "arpg.role": "stage",
        "arpg.stage": stage,
        "arpg.params_hash": params.digest,
        "mlflow.source.git.commit": git_commit(),
        "arpg.params_file": str(params.path),
    })
    handle = StageRun(client, run.info.run_id)
    if run_params:
        handle.log_params(run_params)
    status = "FAILED"
    try:
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with_retry(client.set_terminated, run.info.run_id, status)
