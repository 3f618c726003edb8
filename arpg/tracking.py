"""MLflow tracking for every stage: `stage_run` opens one child run of the study's parent run.

Each params file (by its hash) gets one parent "study" run (arpg/study_status.py keeps its status:
the study's outcome); every stage invocation is a child run tagged with the git commit and params
hash, its log and system metrics (arpg/captured_log.py), in the store of arpg/mlflow_store.py
(one URI, retries under parallel writers). Nothing here writes into an output file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import time
from typing import Any, Iterator, Mapping

from arpg.captured_log import SYSTEM_METRICS_ENV, attach_log, stage_log, system_metrics  # noqa: F401 - SYSTEM_METRICS_ENV: public
from arpg.config import unrecorded
from arpg.mlflow_store import (NOTE_TAG, NullRun, StageRun, ensure_experiment, experiment_name, git_commit,  # noqa: F401
                               store_lock, stringify, tracking_uri, with_retry)
from arpg.study_status import close, close_study, ensure_study_run, process_tags  # noqa: F401 - close_study: public


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
                   tags=[RunTag(k, stringify(v)) for k, v in tags.items()])
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
    with store_lock(uri):
        client = with_retry(MlflowClient, tracking_uri=uri)
        experiment_id = with_retry(ensure_experiment, client, experiment_name(params), uri)
        parent_id = with_retry(ensure_study_run, client, experiment_id, params)
    run = with_retry(client.create_run, experiment_id, run_name=run_name or stage, tags={
        "mlflow.parentRunId": parent_id,
        "arpg.role": "stage",
        "arpg.stage": stage,
        "arpg.params_hash": params.digest,
        "mlflow.source.git.commit": git_commit(),
        "arpg.params_file": str(params.path),
        **process_tags(),
    })
    with_retry(client.update_run, parent_id, status="RUNNING")  # the study runs again (a rerun, a new job)
    handle = StageRun(client, run.info.run_id)
    if run_params:
        handle.log_params(run_params)
    monitor = system_metrics(run.info.run_id, uri)
    status = "FAILED"
    output, log = contextlib.ExitStack(), None
    try:
        log = output.enter_context(stage_log(run_name or stage))
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
            for extra in ((monitor.finish,) if monitor is not None else ()) + (lambda: log and attach_log(handle, *log),):
                try:
                    extra()
                except Exception as exc:  # noqa: BLE001 - the run's status below matters more than its extras
                    print(f"[arpg] MLflow run {handle.run_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        with_retry(client.set_terminated, run.info.run_id, status)
        if status != "FINISHED":
            with_retry(client.set_terminated, parent_id, "FAILED")
        elif closes_study:
            with store_lock(uri):
                with_retry(close, client, parent_id)
