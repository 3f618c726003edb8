"""The MLflow store: one tracking URI, the experiment, and calls that survive parallel writers.

* One tracking URI for the whole project: $MLFLOW_TRACKING_URI if set, else `tracking.uri` from
  params, else `sqlite:///<working dir>/mlflow.db`.
* Experiment `tracking.experiment` or `arpg-<name>`, with a description (`mlflow.note.content`).
* SQLite allows one writer at a time. Parallel jobs therefore retry every call that fails with
  "database is locked" (exponential back-off with jitter), and creation of the store / experiment
  / parent run is serialised by a file lock, so no job loses its run.
"""

from __future__ import annotations

import contextlib
import fcntl
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


def is_lock_error(exc: BaseException) -> bool:
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
            if not is_lock_error(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
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


def stringify(value: Any) -> str:
    text = str(value)
    return text if len(text) <= _MAX_PARAM_LEN else text[: _MAX_PARAM_LEN - 3] + "..."


class StageRun:
    """A child MLflow run of one stage invocation."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, values: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, stringify(v)) for k, v in values.items()]
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

        with_retry(self.client.log_batch, self.run_id, tags=[RunTag(k, stringify(v)) for k, v in values.items()])

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


NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as an experiment's / run's description


def experiment_note(name: str) -> str:
    """The experiment's description: what its runs are and how to compare sweep points."""
    return f"""\
ARPG experiment **{name}**: one parent run per params file (`study-{name}-<params hash>`, the params file
attached as an artifact; tag `arpg.params_file` says where it was), one child run per stage job
(tag `arpg.stage`, the job's log under `logs/`). The parent's status is the study's outcome.

**Quality against speed.** Each sweep point's `evaluate-<model>-steps<S>_cfg<C>_<order>` run has
params `model`, `steps`, `cfg`, `order` and metrics `fid_<extractor>`, `accuracy_classifier`, ...;
its `sample-...` run has `img_s`: images per second of that one job (decoding and pixel decoding,
whatever else the machine ran: tags `arpg.img_s.*` give CPU, threads, batch size, load average).
The report joins quality and speed from the stage files: its run's artifacts `report/pareto.csv`
and `report/fid_vs_throughput.png` pair each point's FID with the profile's measured images/s.
"""


def ensure_experiment(client, name: str, uri: str) -> str:
    """The experiment's id, made (with its description) or restored when needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if experiment.tags.get(NOTE_TAG) != experiment_note(name):  # the description says what this code logs
            client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, experiment_note(name))
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, whichever database it is
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location, tags={NOTE_TAG: experiment_note(name)})
