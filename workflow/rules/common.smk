# Load and validate the params file before the DAG is built; helpers for the rules (stages.smk makes
# one rule per stage declared in arpg/commands/<stage>.py, report.smk the report's).
import os
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # the arpg package of this checkout

from arpg import pipeline as PIPE
from arpg.config import PARAMS_ENV, load_params, stage_threads
from arpg.errors import ArpgError
from arpg.progress import PROGRESS_FD_ENV
from arpg.report_catalog import describe

# Jobs run this checkout's arpg even when the environment's arpg is installed from another checkout.
os.environ.update(PYTHONPATH=PIPE.python_path_with(workflow.basedir))

# The shell lines call `arpg` / `torchrun`: use the ones next to this Python
# (e.g. .venv/bin) even when the environment is not activated.
os.environ.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
CONDA_ENV = "../envs/arpg.yaml"  # relative to workflow/rules/

# --config params=FILE, else $ARPG_PARAMS, else this checkout's params.yaml (absolute: jobs may run elsewhere).
PARAMS_FILE = str(Path(config.get("params") or os.environ.get(PARAMS_ENV)
                       or Path(workflow.basedir) / "params.yaml").resolve())
# Jobs read the params file through $ARPG_PARAMS, so its path is in no rule's params: an identical
# copy elsewhere (or a moved checkout) reruns nothing; each job's `fingerprint` holds the values it reads.
os.environ[PARAMS_ENV] = PARAMS_FILE
try:
    PARAMS = load_params(PARAMS_FILE)
    PIPE.jobs(PARAMS)  # cross-key checks (e.g. flipped tokens) before the DAG is built
except ArpgError as _exc:
    raise WorkflowError(str(_exc)) from None

# User-given datasets and weights are not DAG inputs (a dry run shows the whole DAG without
# them); a real run checks them before its first job and stops naming every missing path.
for _name, _path in PIPE.missing_external(PARAMS):
    print(f"note: {_path} does not exist yet (needed by {_name})", file=sys.stderr)


# Jobs start by fork from one warm process that has imported torch and MLflow (arpg/warm.py): a
# sweep point's job no longer spends most of its time importing. Local runs only (a cluster job runs
# elsewhere); ARPG_WARM=0 starts none, and every job then runs in its own process, with the same result.
_WARM = {}


def _start_warm():
    import tempfile

    from arpg import warm

    if workflow.local_exec and os.environ.get(warm.DISABLE_ENV) != "0":
        # it serves the sweep-point jobs (their thread count); the others run in their own process
        threads = min(stage_threads(PARAMS, "sample"), workflow.cores)
        _WARM["proc"], _ = warm.start(tempfile.mkdtemp(prefix="arpg-warm-"), threads)


def _stop_warm():
    from arpg import warm

    if "proc" in _WARM:
        warm.stop(_WARM.pop("proc"))


onstart:
    try:
        PIPE.check_external(PARAMS)
    except ArpgError as exc:
        raise WorkflowError(str(exc)) from None
    _start_warm()


def _close_study(error):
    """The study's MLflow parent run ends with the workflow's outcome (the report job closes it too;
    this covers partial targets and failed DAGs). A tracking problem is reported, never fatal."""
    from arpg.tracking import close_study

    try:
        status = close_study(PARAMS, error=error)
    except Exception as exc:  # noqa: BLE001 - the workflow's own outcome stands
        print(f"note: could not close the MLflow study run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return
    if status:
        print(f"MLflow study run: {status}", file=sys.stderr)


onsuccess:
    _stop_warm()
    _close_study(error=False)

onerror:
    _stop_warm()
    _close_study(error=True)

wildcard_constraints:
    **PIPE.wildcard_constraints(),

# Cheap rules run on the submit host under a cluster executor: `all` and the stages declared local.
workflow.localrules("all", *PIPE.local_rules(PARAMS))


def inputs(rule):
    """Input function: the inputs of the rule's job for the wildcards Snakemake matched."""
    return lambda wildcards: list(PIPE.job(PARAMS, rule, dict(wildcards)).inputs)


def fingerprint(rule):
    """params: value; changes exactly when a params key (or user file) the job reads changes."""
    return lambda wildcards: PIPE.fingerprint(PARAMS, PIPE.job(PARAMS, rule, dict(wildcards)))


def command(rule):
    """params: the job's whole command line (torchrun prefix included), as its declaration (RULE in
    arpg/commands/<stage>.py) spells it: no shell line restates a stage's arguments."""
    return lambda wildcards: PIPE.job(PARAMS, rule, dict(wildcards)).command(None)


def out(rule):
    return list(PIPE.pattern(PARAMS, rule).outputs)


def log(rule):
    return PIPE.pattern(PARAMS, rule).log


def benchmark(rule):
    """Snakemake's per-job wall time, CPU time and peak memory (the report's stage-time table)."""
    return PIPE.pattern(PARAMS, rule).benchmark


# A job's output goes to its log; its progress lines (arpg/progress.py) also go to fd 3, opened on
# Snakemake's own stderr, so the console shows which long job runs and how far it is.
os.environ[PROGRESS_FD_ENV] = "3"
# A job forked by the warm server reports its CPU time and memory beside the log (arpg/warm.py):
# Snakemake's benchmark measures only the client process. Its path follows the log's (stages.Job.usage):
# a Snakemake param would put the log's place (the study's name) in every job's rerun triggers.
SHELL = "ARPG_JOB_USAGE={log:q}.usage {params.command} 3>&2 > {log:q} 2>&1"


# --------------------------------------------------------------------------- snakemake --report

REPORT_DIR = PIPE.pattern(PARAMS, "report").output_dir
# one wildcard name per extension, so a matched file's name is known whole (fid_vs_steps.png / .csv)
REPORT_PATTERNS = ["{png}.png", "{csv}.csv", "{md}.md", "{json}.json"]


def _report_file(wildcards) -> str:
    return next(f"{wildcards[ext]}.{ext}" for ext in ("png", "csv", "md", "json") if ext in wildcards.keys())


def report_category(wildcards):
    return describe(_report_file(wildcards)).category


def report_subcategory(wildcards):
    """Sample grids by model; everything else in one list per category."""
    parts = _report_file(wildcards).split("/")
    return parts[1] if parts[0] == "grids" and len(parts) == 3 else None


def report_labels(wildcards):
    name = _report_file(wildcards)
    return {"file": name, "caption": describe(name).caption}


def threads(rule):
    """Per job: one rule's jobs may differ (a decoder importing released weights runs no torchrun). A job
    declared `alone` (the profile: it times the machine) holds every core, so nothing runs beside it."""

    def of(wildcards):
        job = PIPE.job(PARAMS, rule, dict(wildcards))
        if job.alone and workflow.local_exec:
            try:
                return max(job.threads, workflow.cores)
            except WorkflowError:  # no --cores (a dry run): nothing runs beside it anyway
                pass
        return job.threads
    return of


def gpus(rule):
    return lambda wildcards: PIPE.job(PARAMS, rule, dict(wildcards)).gpus
