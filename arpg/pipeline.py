"""The study as a list of jobs: the single source of the Snakemake DAG and dvc.yaml.

Each stage is declared once, as `RULE` in its command module arpg/commands/<stage>.py (its
command, inputs, outputs, params keys and resources, beside the code that runs it; arpg/stages.py
says how). STAGES lists them in DAG order; this module turns the declarations into the study's
jobs (`jobs`, `job`, `pattern`), their params fingerprints and the checks of user-given files. The
Snakefile (workflow/rules/stages.smk) asks it for every path, command and fingerprint; `arpg
export-dvc` renders the same jobs as dvc.yaml. tests/test_pipeline.py checks that both agree with
`jobs()`.

Why fingerprints rather than the params file as an input: a params file edit
would then rerun everything. Each job gets a hash of only the params keys it
reads (Snakemake's `params` rerun trigger, DVC's `params:`), so changing one
sweep value reruns only the jobs it feeds.

This module is imported by Snakemake on every invocation: no torch here.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from arpg.config import dotted, unrecorded
from arpg.decoders import DECODERS
from arpg.errors import ConfigError
from arpg.paths import Layout
from arpg.stages import POINT_WILDCARDS, SENTINEL_WILDCARDS, Ctx, Job, Rule, point_wildcards  # noqa: F401 - the public names
from arpg.commands.zero_shot import TASKS

# The study's stages in DAG order, each the module arpg/commands/<stage>.py that declares and runs it.
STAGES = ("prepare_data", "train_tokenizer", "tokenize", "train_classifier", "train", "sample", "reference_stats",
          "evaluate", "select", "profile", "gallery", "zero_shot", "report")
RULES: dict[str, Rule] = {name: importlib.import_module(f"arpg.commands.{name}").RULE for name in STAGES}


# --------------------------------------------------------------------------- public API

def python_path_with(folder: str) -> str:
    """$PYTHONPATH with `folder` first: jobs import that checkout's arpg."""
    return os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)


def log_dir(params: Mapping) -> str:
    """Logs of one study: logs/<name>/... (studies with different params files do not mix)."""
    return f"logs/{params['name']}"


def _ctx(params: Mapping) -> Ctx:
    return Ctx(params, Layout.from_params(params), log_dir(params))


def jobs(params: Mapping) -> list[Job]:
    """Every job of the study, in DAG order of the rules."""
    params = unrecorded(params)  # placing work is no read of the stage's inputs
    ctx = _ctx(params)
    return [rule.build(ctx, w) for rule in RULES.values() for w in rule.instances(params)]


def local_rules(params: Mapping) -> list[str]:
    """The rules whose jobs are declared local (cheap: the submit host runs them under a cluster
    executor; Snakemake's `localrules`)."""
    return [rule for rule in RULES if pattern(params, rule).local]


def job(params: Mapping, rule: str, wildcards: Mapping[str, str] | None = None) -> Job:
    """One job, from its rule and wildcard values (Snakemake's input / params functions)."""
    params = unrecorded(params)  # placing work is no read of the stage's inputs
    spec = RULES[rule]
    w = {k: str(wildcards[k]) for k in spec.wildcards} if wildcards else {}
    return spec.build(_ctx(params), w)


def pattern(params: Mapping, rule: str) -> Job:
    """A rule's job with `{wildcard}` placeholders in its paths (Snakemake output patterns)."""
    params = unrecorded(params)  # placing work is no read of the stage's inputs
    spec = RULES[rule]
    return spec.build(_ctx(params), {k: "{" + k + "}" for k in spec.wildcards})


def wildcard_constraints() -> dict[str, str]:
    """Regexes that keep Snakemake from splitting paths at the wrong place."""
    return {"model": "|".join(DECODERS), "steps": r"[0-9]+", "cfg": r"[0-9]+(\.[0-9]+)?",
            "order": r"[a-z]+(-[a-z0-9]+)?", "extractor": r"[a-z]+(-[a-z]+)?", "task": "|".join(TASKS),
            "run": r"(_seed[0-9]+)?"}  # empty: training seed 0


def param_values(params: Mapping, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: dotted(params, key) for key in keys}


_DIGEST_EDGE = 1 << 20  # bytes hashed at each end of a user-given file


def _identity(path: str) -> list:
    """What a user-given file's content is, cheaply and independent of where it lives or when it was
    copied: its size and a hash of its first and last MiB (a changed weights file reruns its jobs; a
    copy, a move or a touched mtime does not). A folder: its sorted entry names."""
    p = Path(path)
    if p.is_file():
        size = p.stat().st_size
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            h.update(fh.read(_DIGEST_EDGE))
            if size > 2 * _DIGEST_EDGE:
                fh.seek(size - _DIGEST_EDGE)
            h.update(fh.read(_DIGEST_EDGE))
        return [path, size, h.hexdigest()[:16]]
    if p.is_dir():
        return [path, "dir", sorted(os.listdir(p))[:2000]]
    return [path, "missing"]


def fingerprint(params: Mapping, job_: Job) -> str:
    """Hash of the params values (and user-given files) a job reads."""
    params = unrecorded(params)  # placing work is no read of the stage's inputs
    blob = json.dumps({"params": param_values(params, job_.param_keys),
                       "external": [_identity(p) for p in job_.external]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def missing_external(params: Mapping) -> list[tuple[str, str]]:
    """(job name, path) for every user-given file or folder that does not exist."""
    params = unrecorded(params)  # placing work is no read of the stage's inputs
    return [(j.name, p) for j in jobs(params) for p in j.external if not Path(p).exists()]


def check_external(params: Mapping) -> None:
    """Stop before any work when a user-given dataset or weights file is missing."""
    by_path: dict[str, list[str]] = {}
    for name, path in missing_external(params):
        by_path.setdefault(path, []).append(name)
    if by_path:
        lines = "\n".join(f"  {path}  (needed by {names[0]}"
                          + (f" and {len(names) - 1} more job(s))" if len(names) > 1 else ")")
                          for path, names in by_path.items())
        raise ConfigError(f"{getattr(params, 'path', 'params')}: these files do not exist:\n{lines}\n"
                          "put them there or point the params at where they are")


def report_inputs(params: Mapping, layout: Layout, log_dir: str = "logs") -> list[str]:
    """Every stage output the report reads (outputs of the other jobs of this study)."""
    params = unrecorded(params)  # placing work is no read of the stage's inputs
    ctx = Ctx(params, layout, log_dir)
    inputs: list[str] = [str(layout.data_manifest)]
    for rule in RULES.values():
        if rule.name in ("report", "prepare_data"):
            continue
        for w in rule.instances(params):
            job = rule.build(ctx, w)
            inputs += [o for o in job.outputs if _report_reads(o)]
    return inputs


def _report_reads(output: str) -> bool:
    """The report reads metrics, tables and images, not checkpoints, arrays or stats."""
    return not output.endswith((".pt", ".npy", ".npz"))


def point_folders(params: Mapping) -> list[str]:
    """The folders that hold every output of the sweep-point rules (samples/, metrics/): the deepest
    folder of each output pattern above its first wildcard. A job reading every point (the report)
    depends on these in dvc.yaml, so a point added by a params edit is read without a re-export."""
    ctx = Ctx(unrecorded(params), Layout.from_params(unrecorded(params)), "logs")
    sentinel = dict(SENTINEL_WILDCARDS)
    folders: dict[str, None] = {}
    for rule in RULES.values():
        if rule.wildcards == POINT_WILDCARDS:
            for out in rule.build(ctx, sentinel).outputs:
                parts = Path(out).parts
                first = next(i for i, part in enumerate(parts) if any(s in part for s in sentinel.values()))
                folders[str(Path(*parts[:first]))] = None
    return list(folders)


__all__ = ["Job", "RULES", "jobs", "job", "pattern", "fingerprint", "param_values", "check_external",
           "missing_external", "point_folders", "report_inputs", "wildcard_constraints", "log_dir"]
