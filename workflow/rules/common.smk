# Load and validate the params file before the DAG is built; helpers for the rules.
import os
import sys
from pathlib import Path

sys.path.insert(0, workflow.basedir)  # the arpg package of this checkout

from arpg import pipeline as PIPE
from arpg.config import PARAMS_ENV, load_params
from arpg.errors import ArpgError

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


onstart:
    try:
        PIPE.check_external(PARAMS)
    except ArpgError as exc:
        raise WorkflowError(str(exc)) from None


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
    _close_study(error=False)

onerror:
    _close_study(error=True)

wildcard_constraints:
    **PIPE.wildcard_constraints(),

localrules:
    all,
    report,


def inputs(rule):
    """Input function: the inputs of the rule's job for the wildcards Snakemake matched."""
    return lambda wildcards: list(PIPE.job(PARAMS, rule, dict(wildcards)).inputs)


def fingerprint(rule):
    """params: value; changes exactly when a params key (or user file) the job reads changes."""
    return lambda wildcards: PIPE.fingerprint(PARAMS, PIPE.job(PARAMS, rule, dict(wildcards)))


def command(rule):
    """params: the job's whole command line (torchrun prefix included), as its declaration in
    arpg/pipeline.py spells it: no shell line restates a stage's arguments."""
    return lambda wildcards: PIPE.job(PARAMS, rule, dict(wildcards)).command(None)


def out(rule):
    return list(PIPE.pattern(PARAMS, rule).outputs)


def log(rule):
    return PIPE.pattern(PARAMS, rule).log


def threads(rule):
    """Per job: one rule's jobs may differ (a decoder importing released weights runs no torchrun)."""
    return lambda wildcards: PIPE.job(PARAMS, rule, dict(wildcards)).threads


def gpus(rule):
    return lambda wildcards: PIPE.job(PARAMS, rule, dict(wildcards)).gpus
