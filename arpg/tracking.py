"""MLflow tracking for every stage: `stage_run` opens one child run of the study's parent run.

Each params file (by its hash) gets one parent "study" run (arpg/study_status.py keeps its status:
the study's outcome); every stage invocation is a child run tagged with the git commit and params
hash, its log and system metrics (arpg/captured_log.py), in the store of arpg/mlflow_store.py
(one URI, retries under parallel writers). Nothing here writes into an output file, and no stage
reads another's run: what joins stages (quality against speed) the report does from their files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator, Mapping

from arpg.captured_log import SYSTEM_METRICS_ENV, attach_log, stage_log, system_metrics  # noqa: F401 - SYSTEM_METRICS_ENV: public
from arpg.config import unrecorded
from arpg.mlflow_store import (NOTE_TAG, NullRun, StageRun, ensure_experiment, experiment_name, git_commit,  # noqa: F401
                               store_lock, stringify, tracking_uri, with_retry)
from arpg.study_status import close, close_study, ensure_study_run, process_tags  # noqa: F401 - close_study: public


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
