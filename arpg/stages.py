"""How a stage is declared: `Rule` and `Job`, and the pieces several stages' declarations share.

A *rule* is one kind of stage (`sample`); a *job* is one unit of work of a rule (`sample` for
model arpg, 8 steps, cfg 2.0, random order). Each stage is declared in its own command module,
`arpg/commands/<stage>.py`, as `RULE`, beside the code that runs it: its builder says the job's
`arpg` command, the artifacts it reads (`inputs`: produced by other jobs), the user-given files it
reads (`external`: data folders, released weights), what it writes (`outputs`, all spelled by
`arpg.paths.Layout`), which params keys feed it and its resources. arpg/pipeline.py collects the
stages into the study's job list, fingerprints and checks; Snakemake and dvc.yaml take everything
from it.

Imported by Snakemake on every invocation: no torch here.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from arpg.decoders import DECODERS
from arpg.errors import ConfigError
from arpg.paths import Layout, SweepPoint, format_cfg, run_seed, seed_run
from arpg.sweeps import sweep_points

POINT_WILDCARDS = ("model", "steps", "cfg", "order", "run")


@dataclass(frozen=True)
class Job:
    rule: str                       # Snakemake rule name / DVC stage family
    wildcards: dict[str, str]       # {} for one-job rules
    args: tuple[str, ...]           # after `arpg`, without --params
    inputs: tuple[str, ...]         # artifacts written by other jobs
    outputs: tuple[str, ...]        # files; `output_dir` for a directory output
    param_keys: tuple[str, ...]     # dotted params keys the job reads
    external: tuple[str, ...] = ()  # user-given files / folders (weights, datasets)
    output_dir: str | None = None   # directory output (the report)
    launcher: tuple[str, ...] = ()  # torchrun prefix for multi-process jobs
    threads: int = 1
    gpus: int = 0
    local: bool = False             # cheap: runs on the submit host under a cluster executor
    alone: bool = False             # measures the machine: Snakemake runs nothing beside it (all cores)
    log: str = ""

    @property
    def key(self) -> str:
        """Unique name of the job within its rule ('' for one-job rules)."""
        w = self.wildcards
        if set(w) == set(POINT_WILDCARDS):
            return f"{w['model']}-steps{w['steps']}_cfg{w['cfg']}_{w['order']}{w['run']}"
        return "-".join(w[k] for k in sorted(w) if k != "run") + w.get("run", "")

    @property
    def name(self) -> str:
        return f"{self.rule}@{self.key}" if self.wildcards else self.rule

    @property
    def benchmark(self) -> str:
        """Snakemake's `benchmark:` file of the job (its time and memory): beside its log, as .tsv."""
        return str(Path(self.log).with_suffix(".tsv"))

    @property
    def usage(self) -> str:
        """Where a job forked by the warm server writes its CPU time and memory (arpg/warm.py)."""
        return f"{self.log}.usage"

    @property
    def all_outputs(self) -> tuple[str, ...]:
        return self.outputs + ((self.output_dir,) if self.output_dir else ())

    def command(self, params_file: str | None) -> str:
        """The shell command: DVC's `cmd` (with --params), Snakemake's `shell:` line (params_file None:
        Snakemake jobs find the params file through $ARPG_PARAMS, so its path is in no fingerprint)."""
        params_args = ["--params", params_file] if params_file else []
        argv = [*self.launcher, "arpg", self.args[0], *params_args, *self.args[1:]]
        return " ".join(shlex.quote(a) if "${" not in a else a for a in argv)


@dataclass(frozen=True)
class Ctx:
    """What a rule's builder gets: the params, their layout and the study's log folder."""

    params: Mapping[str, Any]
    layout: Layout
    log_dir: str


@dataclass(frozen=True)
class Rule:
    name: str
    wildcards: tuple[str, ...]
    build: Callable[[Ctx, dict[str, str]], Job] = field(repr=False)
    # wildcard values of the rule's jobs in this study ([] when the rule is not in the DAG)
    instances: Callable[[Mapping], list[dict[str, str]]] = field(repr=False)
    desc: str = ""  # what one job does, one plain sentence (DVC's stage `desc`)
    priority: int = 0  # Snakemake starts a ready job of a higher priority first

    def __post_init__(self) -> None:
        if not self.desc or "\n" in self.desc or not self.desc.endswith("."):
            raise ConfigError(f"rule {self.name}: give it a desc, one sentence on one line ending in '.'")


# --------------------------------------------------------------------------- helpers

def point_wildcards(point: SweepPoint) -> dict[str, str]:
    return {"model": point.model, "steps": str(point.steps), "cfg": format_cfg(point.cfg), "order": point.order,
            "run": point.run}


def point_args(w: Mapping[str, str]) -> tuple[str, ...]:
    """A point command's arguments: --model --steps --cfg --order, and --seed for another training seed's
    model (a placeholder run, in a pattern, stays as it is)."""
    return ("--model", w["model"], "--steps", w["steps"], "--cfg", w["cfg"], "--order", w["order"], *seed_args(w["run"]))


def seed_args(run: str) -> tuple[str, ...]:
    """--seed S for the model of training seed S (none for seed 0); a placeholder run (a pattern's) stays."""
    return () if not run else ("--seed", str(run_seed(run)) if run.startswith("_seed") else run)


def add_point_arguments(parser, models) -> None:
    parser.add_argument("--model", required=True, choices=tuple(models), help="which trained generator")
    parser.add_argument("--steps", type=int, required=True,
                        help="decoding steps (a sequential decoder: must equal the token count)")
    parser.add_argument("--cfg", type=float, required=True, help="classifier-free guidance scale (1: off)")
    parser.add_argument("--order", required=True,
                        help="generation order: random, raster, spiral-in, spiral-out, z-curve, alternate "
                             "(a sequential decoder: its native order)")
    parser.add_argument("--seed", type=int, default=0, help="the training seed of the model (one of train.seeds)")


def point_command(point: SweepPoint) -> str:
    """A point's arguments as a user types them (messages naming the command that remakes a file)."""
    return " ".join(point_args(point_wildcards(point)))


def point_from_args(args) -> SweepPoint:
    return SweepPoint(args.model, args.steps, args.cfg, args.order, seed_run(args.seed))


def check_train_seed(params: Mapping, seed: int) -> None:
    from arpg.config import unrecorded

    seeds = unrecorded(params)["train"]["seeds"]  # which models exist, not what this job does
    if seed not in seeds:
        raise ConfigError(f"--seed {seed} is not in train.seeds {seeds}; add it there or pick one of them")


def point_of(w: Mapping[str, str]) -> SweepPoint:
    return SweepPoint(w["model"], int(w["steps"]), float(w["cfg"]), w["order"], w["run"])


# Sentinel point used to turn Layout's point paths into patterns ({model}, {steps}, ...),
# so the path of a sweep point is still spelled only in arpg/paths.py.
_SENTINEL = SweepPoint("MODELWILDCARD", 987654321, 7.25, "ORDERWILDCARD", "RUNWILDCARD")
SENTINEL_WILDCARDS = {"model": "MODELWILDCARD", "steps": "987654321", "cfg": format_cfg(7.25), "order": "ORDERWILDCARD",
                      "run": "RUNWILDCARD"}


def point_path(path_fn: Callable[[SweepPoint], Path], w: Mapping[str, str]) -> str:
    text = str(path_fn(_SENTINEL))
    for name, sentinel in SENTINEL_WILDCARDS.items():
        if text.count(sentinel) != 1:  # pragma: no cover - only if output_dir contains a sentinel
            raise ConfigError(f"output_dir {text!r} confuses the sweep-point path pattern; rename it")
        text = text.replace(sentinel, w[name])
    return text


def section_keys(params: Mapping, section: str, *, drop: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Params keys of one section: the whole section, or its leaves minus `drop`."""
    if not drop:
        return (section,)
    return tuple(f"{section}.{k}" for k in params[section] if k not in drop)


# Params keys shared by several stages (tests/test_reproducible.py checks every job's keys against
# what its command really reads).
VQ_KEYS = ("data.channels", *(f"tokenizer.{k}" for k in (
    "base_channels", "channel_mult", "num_res_blocks", "z_channels", "codebook_size", "codebook_dim",
    "l2_norm_codes", "norm_groups", "dropout")))  # the tokenizer's architecture
TOKEN_SPACE_KEYS = ("data.resolution", "data.num_classes", "tokenizer.channel_mult", "tokenizer.codebook_size")
DECODING_KEYS = tuple(f"sample.{k}" for k in ("schedule", "cfg_schedule", "temperature", "top_k", "top_p"))
# what a stage decoding with the study models reads besides: the strategies' noise, and the precision
# models.checkpoint.load_study_models sets them up at
STUDY_DECODING_KEYS = (*DECODING_KEYS, "sample.confidence_noise", "sample.precision")
COMPUTE_KEYS = ("device", "threads")  # every computing stage: where and with how many threads
POINT_COMPUTE_KEYS = ("device", "point_threads")  # the same for the commands of config.POINT_COMMANDS


def key_list(*groups) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for g in groups for k in ((g,) if isinstance(g, str) else g)))


def gpu_count(params: Mapping, nproc: int = 1) -> int:
    return nproc if str(params["device"]).startswith("cuda") else 0


def torchrun(nproc: int) -> tuple[str, ...]:
    if nproc <= 1:
        return ()
    return ("torchrun", "--standalone", f"--nproc_per_node={nproc}", "--no-python")


def log_path(ctx: Ctx, rule: str, w: Mapping[str, str], wildcards: tuple[str, ...]) -> str:
    if not wildcards:
        return f"{ctx.log_dir}/{rule}.log"
    if wildcards == POINT_WILDCARDS:
        return f"{ctx.log_dir}/{rule}/{w['model']}/steps{w['steps']}_cfg{w['cfg']}_{w['order']}{w['run']}.log"
    return f"{ctx.log_dir}/{rule}/" + "_".join(w[k] for k in wildcards if k != "run") + w.get("run", "") + ".log"


def pretrained_weights(params: Mapping, model: str) -> str | None:
    return params["train"][DECODERS[model].pretrained_key]


def needs_tokens(params: Mapping) -> bool:
    return any(pretrained_weights(params, m) is None for m in DECODERS)


def extractors_of(params: Mapping) -> list[str]:
    return list(params["evaluate"]["extractors"])


def point_eval_inputs(ctx: Ctx, w: Mapping[str, str]) -> list[str]:
    """What evaluating one point reads besides its samples."""
    params, lay = ctx.params, ctx.layout
    split = params["evaluate"]["reference_split"]
    inputs = [str(lay.reference_stats(x, split)) for x in extractors_of(params)]
    if "classifier" in extractors_of(params):
        inputs.append(str(lay.classifier_checkpoint))  # class accuracy of the samples
    return inputs


EVAL_METRIC_KEYS = tuple(f"evaluate.{k}" for k in ("batch_size", "kid_subset_size", "precision_recall"))


def evaluate_keys(params: Mapping) -> tuple[str, ...]:
    keys = key_list(POINT_COMPUTE_KEYS, "seed", "sample.seed",
                    section_keys(params, "evaluate", drop=("inception_weights",)))
    return keys + (("evaluate.inception_weights",) if "inception" in extractors_of(params) else ())


def inception_external(params: Mapping, extractors) -> tuple[str, ...]:
    weights = params["evaluate"]["inception_weights"]
    return (weights,) if "inception" in extractors and weights else ()


def point_instances(params: Mapping) -> list[dict[str, str]]:
    return [point_wildcards(p) for p in sweep_points(params)]
