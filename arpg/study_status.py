"""The study's outcome: its parent run, kept without runner hooks (DVC has none).

A stage starting marks the parent RUNNING, a stage failing marks it FAILED, and the report (the last
job) closes it from its children (`close_study`: FAILED if the latest attempt of any job failed, else
FINISHED, ending when the last child ended). Snakemake's onsuccess / onerror close it too (partial
targets, a failed DAG). A child whose process died without closing its run (SIGKILL, OOM) is found
by its pid and host and marked FAILED when the study closes.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Mapping

from arpg.config import unrecorded
from arpg.mlflow_store import NOTE_TAG, StageRun, experiment_name, store_lock, tracking_uri, with_retry

# Where a child's status says the study cannot be FINISHED.
_BAD = ("FAILED", "KILLED")


def ensure_study_run(client, experiment_id: str, params) -> str:
    """The parent run of `params` (found by its hash), made with its params file when needed."""
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


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is no match."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_tags() -> dict[str, str]:
    return {"arpg.host": socket.gethostname(), "arpg.pid": str(os.getpid()),
            "arpg.proc_start": proc_start(os.getpid()) or ""}


def process_gone(tags: Mapping[str, str]) -> bool:
    """True when the run's process is known to be dead: it ran on this host and its pid is gone (or
    is another process now). A run of another host (a SLURM node) is never declared dead here."""
    if tags.get("arpg.host") != socket.gethostname() or not tags.get("arpg.pid"):
        return False
    pid = int(tags["arpg.pid"])
    if tags.get("arpg.proc_start"):
        return proc_start(pid) != tags["arpg.proc_start"]
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


def close(client, parent_id: str, *, snakemake_ended: bool = False) -> str:
    """Set the parent run's status from its children's: the latest attempt of each job (stage and
    run name) counts. A child still RUNNING whose process is gone, or any child still RUNNING when
    Snakemake has ended, is marked FAILED first. Returns the status set."""
    latest: dict[tuple[str, str], Any] = {}
    for child in _children(client, parent_id):
        if child.info.status == "RUNNING" and (snakemake_ended or process_gone(child.data.tags)):
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
    with store_lock(uri):
        client = with_retry(MlflowClient, tracking_uri=uri)
        experiment = with_retry(client.get_experiment_by_name, experiment_name(params))
        if experiment is None:
            return None
        runs = with_retry(client.search_runs, [experiment.experiment_id], filter_string=(
            f"tags.`arpg.role` = 'study' and tags.`arpg.params_hash` = '{params.digest}'"), max_results=1)
        if not runs:
            return None
        return with_retry(close, client, runs[0].info.run_id, snakemake_ended=error)
