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
* The parent run's status is the study's outcome, kept without runner hooks (DVC has none): a
  stage starting marks it RUNNING, a stage failing marks it FAILED, and the report (the last job)
  closes it from its children (`close_study`: FAILED if the latest attempt of any job failed,
  else FINISHED, ending when the last child ended). Snakemake's onsuccess / onerror close it too
  (partial targets, a failed DAG). A child whose process died without closing its run (SIGKILL,
  OOM) is found by its pid and host and marked FAILED when the study closes.
* Each run gets its log (the file its stdout is redirected to, as Snakemake and SLURM do; where
  stdout is a terminal or a pipe, as under `dvc repro`, a copy of what the stage printed) and,
  psutil permitting, MLflow's system metrics; the parent gets the params file and the
  experiment a description (`mlflow.note.content`). Nothing here writes into an output file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from arpg.config import unrecorded
from arpg.paths import REPO_ROOT

DEFAULT_DB = "mlflow.db"  # relative to the working directory (the checkout's root under Snakemake / DVC)
_RETRY_SECONDS = 120.0
_MAX_PARAM_LEN = 6000
# Where a child's status says the study cannot be FINISHED.
_BAD = ("FAILED", "KILLED")
# $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns the per-run CPU / memory / disk sampler off.
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


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


NOTE_TAG = "mlflow.note.content"  # what the MLflow UI shows as an experiment's / run's description


def experiment_note(name: str) -> str:
    """The experiment's description: what its runs are and how to compare sweep points."""
    return f"""\
ARPG experiment **{name}**: one parent run per params file (`study-{name}-<params hash>`, the params file
attached as an artifact; tag `arpg.params_file` says where it was), one child run per stage job
(tag `arpg.stage`, the job's log under `logs/`). The parent's status is the study's outcome.

**Quality against speed.** Each sweep point's `evaluate-<model>-steps<S>_cfg<C>_<order>` run has
params `model`, `steps`, `cfg`, `order` and metrics `fid_<extractor>`, `accuracy_classifier`, ... and
`img_s`: images per second of the point's own `arpg sample` job (decoding and pixel decoding, one
run, whatever else the machine ran: tags `arpg.img_s.*` give CPU, threads, batch size, load average).
Where the profile timed the point's steps and order, also `img_s_profile`: the profile stage's
measurement (warm-up, repeats, median), the speed the report's quality-vs-speed table and
`fid_vs_throughput.png` use. To plot FID against images/s: search `tags.`arpg.stage` = 'evaluate'`
(the runs then show un-nested), select the runs, *Compare*, scatter plot x `img_s_profile` (or
`img_s`), y `fid_classifier`.
"""


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if NOTE_TAG not in experiment.tags:  # an experiment made before descriptions were written
            client.set_experiment_tag(experiment.experiment_id, NOTE_TAG, experiment_note(name))
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, whichever database it is
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location, tags={NOTE_TAG: experiment_note(name)})


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
        NOTE_TAG: f"The study of `{params.path}` (params hash {digest}); its stages are the child runs.",
    })
    handle = StageRun(client, run.info.run_id)
    handle.log_params(params.flat())
    handle.log_artifact(params.path)  # the file itself: every run's params are its flat keys
    return run.info.run_id


# --------------------------------------------------------------------------- the study's outcome

def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is no match."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_tags() -> dict[str, str]:
    return {"arpg.host": socket.gethostname(), "arpg.pid": str(os.getpid()),
            "arpg.proc_start": _proc_start(os.getpid()) or ""}


def _process_gone(tags: Mapping[str, str]) -> bool:
    """True when the run's process is known to be dead: it ran on this host and its pid is gone (or
    is another process now). A run of another host (a SLURM node) is never declared dead here."""
    if tags.get("arpg.host") != socket.gethostname() or not tags.get("arpg.pid"):
        return False
    pid = int(tags["arpg.pid"])
    if tags.get("arpg.proc_start"):
        return _proc_start(pid) != tags["arpg.proc_start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _children(client, parent_id: str) -> list:
    run = client.get_run(parent_id)
    out, token = [], None
    while True:
        page = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def _close(client, parent_id: str, *, snakemake_ended: bool = False) -> str:
    """Set the parent run's status from its children's: the latest attempt of each job (stage and
    run name) counts. A child still RUNNING whose process is gone, or any child still RUNNING when
    Snakemake has ended, is marked FAILED first. Returns the status set."""
    latest: dict[tuple[str, str], Any] = {}
    for child in _children(client, parent_id):
        if child.info.status == "RUNNING" and (snakemake_ended or _process_gone(child.data.tags)):
            reason = ("Snakemake ended while this run was open" if snakemake_ended
                      else f"process {child.data.tags.get('arpg.pid')} ended without closing its run (killed?)")
            client.set_tag(child.info.run_id, "arpg.error", reason)
            client.set_terminated(child.info.run_id, "FAILED")
            child = client.get_run(child.info.run_id)
        job = (child.data.tags.get("arpg.stage", ""), child.info.run_name)
        if job not in latest or child.info.start_time >= latest[job].info.start_time:
            latest[job] = child
    runs = list(latest.values())
    if any(r.info.status == "RUNNING" for r in runs):
        status, end = "RUNNING", None
    else:
        status = "FAILED" if any(r.info.status in _BAD for r in runs) else "FINISHED"
        end = max((r.info.end_time or 0 for r in runs), default=0) or int(time.time() * 1000)
    failed = sorted(f"{stage} {name}" for (stage, name), r in latest.items() if r.info.status in _BAD)
    client.set_tag(parent_id, "arpg.failed_jobs", ", ".join(failed) or "none")
    if end is None:
        client.update_run(parent_id, status=status)
    else:
        client.set_terminated(parent_id, status, end_time=end)  # duration: first stage's start to last's end
    return status


def close_study(params, *, error: bool = False) -> str | None:
    """Close the parent run of `params` (Snakemake's onsuccess / onerror; the report stage does it
    by itself). `error`: Snakemake failed, so runs still open belong to jobs that died. Returns the
    status set, None when tracking is off or the study has no run yet."""
    if not unrecorded(params)["tracking"]["enabled"]:
        return None
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(params)
    with _store_lock(uri):
        client = with_retry(MlflowClient, tracking_uri=uri)
        experiment = with_retry(client.get_experiment_by_name, experiment_name(params))
        if experiment is None:
            return None
        runs = with_retry(client.search_runs, [experiment.experiment_id], filter_string=(
            f"tags.`arpg.role` = 'study' and tags.`arpg.params_hash` = '{params.digest}'"), max_results=1)
        if not runs:
            return None
        return with_retry(_close, client, runs[0].info.run_id, snakemake_ended=error)


# --------------------------------------------------------------------------- per-run extras

def _stdout_file() -> Path | None:
    """The regular file this process's stdout goes to (Snakemake's `> {log} 2>&1`, SLURM's output
    file), else None (a terminal, a pipe: DVC)."""
    try:
        if not stat.S_ISREG(os.fstat(1).st_mode):
            return None
        path = Path(os.readlink("/proc/self/fd/1"))
    except (OSError, ValueError):
        return None
    return path if path.is_file() else None


class _LineCopy:
    """`stream` as it was, plus each finished line in `copy`; of a line that a progress bar redrew
    with carriage returns, only its last state (so the copy reads like a log file)."""

    def __init__(self, stream, copy):
        self.stream, self.copy, self._line = stream, copy, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        *done, self._line = (self._line + text).split("\n")
        for line in done:
            self.copy.write(next((part for part in reversed(line.split("\r")) if part.strip()), "") + "\n")
        return written

    def flush(self) -> None:
        self.stream.flush()
        self.copy.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding...: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def _stage_log(name: str) -> Iterator[tuple[Path, bool]]:
    """(the log to attach, whether it is a copy): the file stdout is redirected to, or where stdout
    is no file (a terminal; DVC's pipe) a copy of what the stage prints through sys.stdout /
    sys.stderr meanwhile, in a temporary `<name>.log`."""
    log = _stdout_file()
    if log is not None:
        yield log, False
        return
    with tempfile.TemporaryDirectory(prefix="arpg-log-") as folder:
        path = Path(folder) / f"{name}.log"
        with open(path, "w") as copy:
            saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _LineCopy(saved[0], copy), _LineCopy(saved[1], copy)
            try:
                yield path, True
            finally:
                sys.stdout, sys.stderr = saved


def _attach_log(handle: StageRun, log: Path, copied: bool) -> None:
    """The stage's log file, or the copy of its output, as the run's `logs/` artifact."""
    rest = "the rest went to the terminal only" if copied else f"the rest is in {log}"
    # the attached copy ends here; what the command prints after its run closed is not in it
    print(f"[arpg] log attached to MLflow run {handle.run_id} up to this line; {rest}", flush=True)
    sys.stderr.flush()
    if not copied:
        handle.set_tags({"arpg.log": str(log)})
    handle.log_artifact(log, "logs")


def _system_metrics(run_id: str, uri: str):
    """MLflow's CPU / memory / disk sampler for the run (a thread, every 10 s), or None: off by
    $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false, or psutil missing. Its writes do not retry: under
    a locked SQLite store it warns and stops sampling; the run is unaffected."""
    if os.environ.get(SYSTEM_METRICS_ENV, "true").strip().lower() in ("false", "0", "no", "off"):
        return None
    try:
        import psutil  # noqa: F401 - the sampler's dependency
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - system metrics are a nicety; the stage runs without them
        print(f"[arpg] no system metrics for run {run_id}: {exc}", file=sys.stderr)
        return None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


SAMPLES_TAG = "arpg.samples_sha256"  # links a point's evaluate run to the sample run that drew its images
SPEED_METRICS = ("img_s", "decode_seconds")


def copy_point_speed(run: StageRun, samples: str | os.PathLike) -> bool:
    """Log onto `run` the decoding speed of the sample run that wrote `samples` (found by the file's
    hash, so any params file, DVC or Snakemake, finds it), with its `arpg.img_s.*` tags. False when
    no such run is in the store (tracking was off when sampling, or another store)."""
    if isinstance(run, NullRun):
        return False
    digest = file_sha256(samples)
    experiment_id = with_retry(run.client.get_run, run.run_id).info.experiment_id
    found = with_retry(run.client.search_runs, [experiment_id], filter_string=(
        f"tags.`{SAMPLES_TAG}` = '{digest}' and tags.`arpg.stage` = 'sample' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    if not found or "img_s" not in found[0].data.metrics:
        print(f"[arpg] no finished sample run with {SAMPLES_TAG} {digest[:12]} in the store: "
              f"no img_s on this run (rerun `arpg sample` with tracking on to get it)")
        return False
    source = found[0]
    run.log_metrics({k: source.data.metrics[k] for k in SPEED_METRICS if k in source.data.metrics})
    run.set_tags({**{k: v for k, v in source.data.tags.items() if k.startswith("arpg.img_s.")},
                  "arpg.img_s.sample_run": source.info.run_id, SAMPLES_TAG: digest})
    return True


METRICS_TAG = "arpg.metrics_sha256"  # links a point's evaluate run to the metrics file the report read


def log_profile_speed(run: StageRun, pairs_csv: str | os.PathLike, layout, labels: Mapping[str, Any]) -> int:
    """Log the report's quality-vs-speed pairs (`pairs_csv`, its pareto.csv) onto the points' evaluate
    runs as `img_s_profile`: the profile stage's measured images/s at the point's steps and order,
    the number the report plots FID against. Each run is found by the hash of the metrics file the
    report read (`layout.metrics(point)`). Returns how many runs got it."""
    if isinstance(run, NullRun):
        return 0
    import csv

    from mlflow.entities import Metric, RunTag

    from arpg.paths import SweepPoint

    with open(pairs_csv, newline="") as fh:
        pairs = list(csv.DictReader(fh))
    experiment_id = with_retry(run.client.get_run, run.run_id).info.experiment_id
    done = 0
    for pair in pairs:
        point = SweepPoint(pair["model"], int(pair["steps"]), float(pair["cfg"]), pair["order"])
        digest = file_sha256(layout.metrics(point))
        found = with_retry(run.client.search_runs, [experiment_id], filter_string=(
            f"tags.`{METRICS_TAG}` = '{digest}' and tags.`arpg.stage` = 'evaluate'"),
            order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            continue
        tags = {"arpg.img_s_profile.batch": pair["batch"], "arpg.img_s_profile.report_run": run.run_id, **labels}
        with_retry(run.client.log_batch, found[0].info.run_id,
                   metrics=[Metric("img_s_profile", float(pair["img_s"]), int(time.time() * 1000), 0)],
                   tags=[RunTag(k, _stringify(v)) for k, v in tags.items()])
        done += 1
    return done


@contextlib.contextmanager
def stage_run(params, stage: str, run_name: str | None = None,
              run_params: Mapping[str, Any] | None = None, *, closes_study: bool = False) -> Iterator[StageRun]:
    """Open a child run for one stage; marks it (and the study) FAILED if the stage raises.

    `run_params` are the stage's own parameters, named consistently across
    stages (model, steps, cfg, order, seed) so MLflow's compare view can plot
    one metric against another directly. `closes_study`: the last job (the
    report) sets the parent's final status when it ends.
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
        **_process_tags(),
    })
    with_retry(client.update_run, parent_id, status="RUNNING")  # the study runs again (a rerun, a new job)
    handle = StageRun(client, run.info.run_id)
    if run_params:
        handle.log_params(run_params)
    monitor = _system_metrics(run.info.run_id, uri)
    status = "FAILED"
    output, log = contextlib.ExitStack(), None
    try:
        log = output.enter_context(_stage_log(run_name or stage))
        yield handle
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        handle.set_tags({"arpg.error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        with output:  # the copy of the output lives until it is attached
            for extra in ((monitor.finish,) if monitor is not None else ()) + (lambda: log and _attach_log(handle, *log),):
                try:
                    extra()
                except Exception as exc:  # noqa: BLE001 - the run's status below matters more than its extras
                    print(f"[arpg] MLflow run {handle.run_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        with_retry(client.set_terminated, run.info.run_id, status)
        if status != "FINISHED":
            with_retry(client.set_terminated, parent_id, "FAILED")
        elif closes_study:
            with _store_lock(uri):
                with_retry(_close, client, parent_id)
