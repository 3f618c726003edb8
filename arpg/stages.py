"""Each stage declared once: the jobs of every rule (command, inputs, outputs, params keys, resources).

A *rule* is one kind of stage (`sample`); a *job* is one unit of work of a rule (`sample` for
model arpg, 8 steps, cfg 2.0, random order). Each rule's builder says the job's `arpg` command,
the artifacts it reads (`inputs`: produced by other jobs), the user-given files it reads
(`external`: data folders, released weights), what it writes (`outputs`, all spelled by
`arpg.paths.Layout`), which params keys feed it and its resources. arpg/pipeline.py turns these
into the study's job list, fingerprints and checks; Snakemake and dvc.yaml take everything from it.

Imported by Snakemake on every invocation: no torch here.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from arpg.config import NOT_RESULT_KEYS, unrecorded
from arpg.decoders import DECODERS, zero_shot_decoder
from arpg.errors import ConfigError
from arpg.paths import Layout, SweepPoint, format_cfg
from arpg.sweeps import sweep_keys, sweep_points

POINT_WILDCARDS = ("model", "steps", "cfg", "order")


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
    log: str = ""

    @property
    def key(self) -> str:
        """Unique name of the job within its rule ('' for one-job rules)."""
        w = self.wildcards
        if set(w) == set(POINT_WILDCARDS):
            return f"{w['model']}-steps{w['steps']}_cfg{w['cfg']}_{w['order']}"
        return "-".join(w[k] for k in sorted(w))

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
class _Ctx:
    params: Mapping[str, Any]
    layout: Layout
    log_dir: str


@dataclass(frozen=True)
class Rule:
    name: str
    wildcards: tuple[str, ...]
    build: Callable[[_Ctx, dict[str, str]], Job] = field(repr=False)
    # wildcard values of the rule's jobs in this study ([] when the rule is not in the DAG)
    instances: Callable[[Mapping], list[dict[str, str]]] = field(repr=False)
    desc: str = ""  # what one job does, one plain sentence (DVC's stage `desc`)

    def __post_init__(self) -> None:
        if not self.desc or "\n" in self.desc or not self.desc.endswith("."):
            raise ConfigError(f"rule {self.name}: give it a desc, one sentence on one line ending in '.'")


# --------------------------------------------------------------------------- helpers

def _s(path) -> str:
    return str(path)


def point_wildcards(point: SweepPoint) -> dict[str, str]:
    return {"model": point.model, "steps": str(point.steps), "cfg": format_cfg(point.cfg), "order": point.order}


# Sentinel point used to turn Layout's point paths into patterns ({model}, {steps}, ...),
# so the path of a sweep point is still spelled only in arpg/paths.py.
_SENTINEL = SweepPoint("MODELWILDCARD", 987654321, 7.25, "ORDERWILDCARD")
_SENTINEL_TEXT = {"model": "MODELWILDCARD", "steps": "987654321", "cfg": format_cfg(7.25), "order": "ORDERWILDCARD"}


def _point_path(path_fn: Callable[[SweepPoint], Path], w: Mapping[str, str]) -> str:
    text = str(path_fn(_SENTINEL))
    for name, sentinel in _SENTINEL_TEXT.items():
        if text.count(sentinel) != 1:  # pragma: no cover - only if output_dir contains a sentinel
            raise ConfigError(f"output_dir {text!r} confuses the sweep-point path pattern; rename it")
        text = text.replace(sentinel, w[name])
    return text


def _section(params: Mapping, section: str, *, drop: tuple[str, ...] = ()) -> tuple[str, ...]:
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


def _keys(*groups) -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for g in groups for k in ((g,) if isinstance(g, str) else g)))


def _gpus(params: Mapping, nproc: int = 1) -> int:
    return nproc if str(params["device"]).startswith("cuda") else 0


def _torchrun(nproc: int) -> tuple[str, ...]:
    if nproc <= 1:
        return ()
    return ("torchrun", "--standalone", f"--nproc_per_node={nproc}", "--no-python")


def _log(ctx: _Ctx, rule: str, w: Mapping[str, str], wildcards: tuple[str, ...]) -> str:
    if not wildcards:
        return f"{ctx.log_dir}/{rule}.log"
    if wildcards == POINT_WILDCARDS:
        return f"{ctx.log_dir}/{rule}/{w['model']}/steps{w['steps']}_cfg{w['cfg']}_{w['order']}.log"
    return f"{ctx.log_dir}/{rule}/" + "_".join(w[k] for k in wildcards) + ".log"


def _pretrained(params: Mapping, model: str) -> str | None:
    return params["train"][DECODERS[model].pretrained_key]


def _needs_tokens(params: Mapping) -> bool:
    return any(_pretrained(params, m) is None for m in DECODERS)


def _extractors(params: Mapping) -> list[str]:
    return list(params["evaluate"]["extractors"])


def _point_inputs_eval(ctx: _Ctx, w: Mapping[str, str]) -> list[str]:
    """What evaluating one point reads besides its samples."""
    params, lay = ctx.params, ctx.layout
    split = params["evaluate"]["reference_split"]
    inputs = [_s(lay.reference_stats(x, split)) for x in _extractors(params)]
    if "classifier" in _extractors(params):
        inputs.append(_s(lay.classifier_checkpoint))  # class accuracy of the samples
    return inputs


EVAL_METRIC_KEYS = tuple(f"evaluate.{k}" for k in ("batch_size", "kid_subset_size", "precision_recall"))


def _evaluate_keys(params: Mapping) -> tuple[str, ...]:
    keys = _keys(POINT_COMPUTE_KEYS, "seed", "sample.seed",
                 _section(params, "evaluate", drop=("inception_weights",)))
    return keys + (("evaluate.inception_weights",) if "inception" in _extractors(params) else ())


def _inception_external(params: Mapping, extractors) -> tuple[str, ...]:
    weights = params["evaluate"]["inception_weights"]
    return (weights,) if "inception" in extractors and weights else ()


# --------------------------------------------------------------------------- rules

def _prepare_data(ctx: _Ctx, w) -> Job:
    lay, data = ctx.layout, ctx.params["data"]
    outputs = [_s(p) for split in ("train", "test") for p in (lay.images(split), lay.labels(split))]
    external = tuple(p for p in (data["path"], data["test_path"]) if p)
    keys = _keys("threads", _section(ctx.params, "data", drop=("on_corrupt", "test_path", "test_fraction")))
    if data["source"] == "imagefolder":  # a folder of files: decoding errors and a held-out split
        keys += ("data.on_corrupt", "data.test_path") + (() if data["test_path"] else ("data.test_fraction", "seed"))
    return Job("prepare_data", {}, ("prepare-data",), (), (*outputs, _s(lay.data_manifest)), keys,
               external=external, threads=ctx.params["threads"], log=_log(ctx, "prepare_data", w, ()))


def _train_tokenizer(ctx: _Ctx, w) -> Job:
    lay, tok = ctx.layout, ctx.params["tokenizer"]
    pretrained = tok["pretrained"]
    inputs = () if pretrained else (_s(lay.images("train")),)
    keys = _keys(COMPUTE_KEYS, VQ_KEYS, "tokenizer.pretrained")
    if not pretrained:
        keys += _keys(_section(ctx.params, "tokenizer", drop=("eval_images", "tokenize_flip",
                                                              *NOT_RESULT_KEYS["tokenizer"])), "seed")
    return Job("train_tokenizer", {}, ("train-tokenizer",), inputs,
               (_s(lay.tokenizer_checkpoint), _s(lay.tokenizer_metrics)), _keys(keys),
               external=(pretrained,) if pretrained else (), threads=ctx.params["threads"],
               gpus=0 if pretrained else _gpus(ctx.params), log=_log(ctx, "train_tokenizer", w, ()))


def _tokenize(ctx: _Ctx, w) -> Job:
    lay, tok = ctx.layout, ctx.params["tokenizer"]
    inputs = [_s(lay.tokenizer_checkpoint)]
    inputs += [_s(p) for split in ("train", "test") for p in (lay.images(split), lay.labels(split))]
    outputs = [_s(p) for split in ("train", "test") for p in (lay.tokens(split), lay.token_labels(split))]
    if tok["tokenize_flip"]:
        outputs += [_s(lay.tokens("train_flip")), _s(lay.token_labels("train_flip"))]
    outputs += [_s(lay.tokenize_metrics), _s(lay.reconstructions)]
    return Job("tokenize", {}, ("tokenize",), tuple(inputs), tuple(outputs),
               _keys(COMPUTE_KEYS, VQ_KEYS, "tokenizer.tokenize_flip", "tokenizer.eval_images"),
               threads=ctx.params["threads"], gpus=_gpus(ctx.params), log=_log(ctx, "tokenize", w, ()))


def _train_classifier(ctx: _Ctx, w) -> Job:
    lay = ctx.layout
    inputs = tuple(_s(p) for split in ("train", "test") for p in (lay.images(split), lay.labels(split)))
    return Job("train_classifier", {}, ("train-classifier",), inputs,
               (_s(lay.classifier_checkpoint), _s(lay.classifier_metrics)),
               _keys(COMPUTE_KEYS, "classifier", "seed", "data.channels", "data.num_classes", "data.resolution",
                     EVAL_METRIC_KEYS),  # + the sanity row: real test halves through the evaluate path
               threads=ctx.params["threads"], gpus=_gpus(ctx.params), log=_log(ctx, "train_classifier", w, ()))


def _train(ctx: _Ctx, w) -> Job:
    """One decoder's generator, trained on the tokens or imported from its released weights."""
    params, lay = ctx.params, ctx.layout
    train, tok, model = params["train"], params["tokenizer"], w["model"]
    # a name of no decoder is a placeholder: Snakemake's pattern ("{model}": outputs and log only) or
    # DVC's foreach template ("${item.model}"), which then matches no decoder's job (their own keys)
    pretrained = _pretrained(params, model) if model in DECODERS else None
    outputs = (_s(lay.model_checkpoint(model)), _s(lay.model_metrics(model)))
    others = tuple(k for d in DECODERS.values() if d.name != model for k in (d.model_key, d.pretrained_key))
    keys = _keys("device", "seed", TOKEN_SPACE_KEYS, _section(params, "train", drop=others + NOT_RESULT_KEYS["train"]))
    args, log = ("train", "--model", model), _log(ctx, "train", w, ("model",))
    if pretrained:
        # Released weights: the command loads them strictly and re-saves model.pt; no training.
        return Job("train", dict(w), args, (), outputs, keys, external=(pretrained,), log=log)
    if train["use_flipped"] and not tok["tokenize_flip"]:
        raise ConfigError(f"{params.get('name')}: train.use_flipped is true but tokenizer.tokenize_flip "
                          "is false, so no flipped tokens exist; enable one and disable the other")
    inputs = [_s(lay.tokens("train")), _s(lay.token_labels("train"))]
    if train["use_flipped"]:
        inputs.append(_s(lay.tokens("train_flip")))
    nproc = train["nproc"]
    return Job("train", dict(w), args, tuple(inputs), outputs, keys, launcher=_torchrun(nproc),
               threads=train["threads"] * nproc, gpus=_gpus(params, nproc), log=log)


def _sample(ctx: _Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    nproc = params["sample"]["nproc"]
    return Job("sample", dict(w),
               ("sample", "--model", w["model"], "--steps", w["steps"], "--cfg", w["cfg"], "--order", w["order"]),
               (_s(lay.model_checkpoint(w["model"])), _s(lay.tokenizer_checkpoint)),
               (_point_path(lay.samples, w), _point_path(lay.sample_grid, w)),
               # sample.nproc only shards the work: every batch has its own seed, so it is not a result key
               _keys(POINT_COMPUTE_KEYS, VQ_KEYS, TOKEN_SPACE_KEYS,
                     _section(params, "sample", drop=(*_sample_sweep_keys(), "nproc"))),
               launcher=_torchrun(nproc), threads=params["point_threads"] * nproc, gpus=_gpus(params, nproc),
               log=_log(ctx, "sample", w, POINT_WILDCARDS))


def _sample_sweep_keys() -> tuple[str, ...]:
    """The keys of sample.* that choose *which* points exist (arpg.sweeps), not what one point does."""
    return tuple(k.split(".", 1)[1] for k in sweep_keys() if k.startswith("sample."))


def _reference_stats(ctx: _Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    extractor, split = w["extractor"], params["evaluate"]["reference_split"]
    inputs = [_s(lay.images(split)), _s(lay.labels(split))]
    if extractor == "classifier":
        inputs.append(_s(lay.classifier_checkpoint))
    keys = _keys(COMPUTE_KEYS, "evaluate.reference_split", "evaluate.batch_size")
    if extractor == "inception":
        keys += ("evaluate.inception_weights",)
    return Job("reference_stats", dict(w), ("reference-stats", "--extractor", extractor), tuple(inputs),
               (_s(lay.reference_stats(extractor, split)),), keys,
               external=_inception_external(params, [extractor]), threads=params["threads"], gpus=_gpus(params),
               log=_log(ctx, "reference_stats", w, ("extractor",)))


def _evaluate(ctx: _Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    return Job("evaluate", dict(w),
               ("evaluate", "--model", w["model"], "--steps", w["steps"], "--cfg", w["cfg"], "--order", w["order"]),
               (_point_path(lay.samples, w), *_point_inputs_eval(ctx, w)),
               (_point_path(lay.metrics, w),), _evaluate_keys(params),
               external=_inception_external(params, _extractors(params)), threads=params["point_threads"],
               gpus=_gpus(params),
               log=_log(ctx, "evaluate", w, POINT_WILDCARDS))


def _profile(ctx: _Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    prof = params["profile"]
    inputs = ()
    keys = _keys("device", "profile", DECODING_KEYS, "sample.confidence_noise", "seed")
    if "default" in prof["models"]:  # the study's own models (+ tokenizer, end-to-end, strategies) are timed too
        inputs = (*(_s(lay.model_checkpoint(m)) for m in DECODERS), _s(lay.tokenizer_checkpoint))
        keys += _keys(TOKEN_SPACE_KEYS, *(f"train.{d.model_key}" for d in DECODERS.values()),
                      "sample.strategies", "sample.strategy_steps")
    return Job("profile", {}, ("profile",), inputs, (_s(lay.profile_csv), _s(lay.profile_json)), keys,
               threads=prof["threads"], gpus=_gpus(params), log=_log(ctx, "profile", w, ()))


def _gallery(ctx: _Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    inputs = (_s(lay.model_checkpoint(zero_shot_decoder().name)), _s(lay.tokenizer_checkpoint),
              _s(lay.images("test")), _s(lay.labels("test")), _s(lay.data_manifest))  # + class names
    outputs = tuple(_s(lay.gallery_image(t)) for t in params["gallery"]["tasks"]) + (_s(lay.gallery_json),)
    return Job("gallery", {}, ("gallery",), inputs, outputs,
               _keys(POINT_COMPUTE_KEYS, "gallery", STUDY_DECODING_KEYS, "seed", VQ_KEYS, TOKEN_SPACE_KEYS),
               threads=params["point_threads"], gpus=_gpus(params), log=_log(ctx, "gallery", w, ()))


def _zero_shot(ctx: _Ctx, w) -> Job:
    """One task's cells (a job per task: the tasks run side by side)."""
    from arpg.zeroshot_plan import EXPANSION, TASKS, cell_models

    params, lay, task = ctx.params, ctx.layout, w["task"]
    # a name of no task is a placeholder (Snakemake's "{task}" pattern: outputs and log only)
    models = cell_models(params, task) if task in TASKS else []
    inputs = (*(_s(lay.model_checkpoint(m)) for m in models), _s(lay.tokenizer_checkpoint),
              _s(lay.images("test")), _s(lay.labels("test")), *_point_inputs_eval(ctx, w))
    keys = _keys(POINT_COMPUTE_KEYS, "zeroshot.num_images", "zeroshot.batch_size", "zeroshot.steps",
                 "sample.cfg_default", STUDY_DECODING_KEYS, VQ_KEYS, TOKEN_SPACE_KEYS,
                 [k for k in _evaluate_keys(params) if k != "sample.seed"])
    keys += ("gallery.expand_to", "gallery.expansion") if task == EXPANSION else ("zeroshot.fractions",
                                                                                  "zeroshot.masks")
    return Job("zero_shot", dict(w), ("zero-shot", "--task", task), inputs,
               (_s(lay.zeroshot_json(task)), _s(lay.zeroshot_csv(task))), keys,
               external=_inception_external(params, _extractors(params)), threads=params["point_threads"],
               gpus=_gpus(params), log=_log(ctx, "zero_shot", w, ("task",)))


def _report(ctx: _Ctx, w) -> Job:
    inputs = report_inputs(ctx.params, ctx.layout, ctx.log_dir)
    # what the text and tables show besides the stage outputs: titles, sweep defaults, the grid
    keys = _keys("threads", "report", "name", "data.source", "data.num_classes", "data.resolution",
                 "tokenizer.channel_mult", "evaluate.extractors", "gallery.tasks", "zeroshot.tasks", sweep_keys(),
                 "sample.precision")  # sample.precision: the profile rows the quality-vs-speed pairs use
    return Job("report", {}, ("report",), tuple(inputs), (_s(ctx.layout.report_index),), keys,
               output_dir=str(ctx.params["report"]["dir"]), local=True, log=_log(ctx, "report", w, ()))


def report_inputs(params: Mapping, layout: Layout, log_dir: str = "logs") -> list[str]:
    """Every stage output the report reads (outputs of the other jobs of this study)."""
    params = unrecorded(params)  # placing work is no read of the stage's inputs
    ctx = _Ctx(params, layout, log_dir)
    inputs: list[str] = [_s(layout.data_manifest)]
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
    ctx = _Ctx(unrecorded(params), Layout.from_params(unrecorded(params)), "logs")
    sentinel = dict(_SENTINEL_TEXT)
    folders: dict[str, None] = {}
    for rule in RULES.values():
        if rule.wildcards == POINT_WILDCARDS:
            for out in rule.build(ctx, sentinel).outputs:
                parts = Path(out).parts
                first = next(i for i, part in enumerate(parts) if any(s in part for s in sentinel.values()))
                folders[str(Path(*parts[:first]))] = None
    return list(folders)


def _point_instances(params: Mapping) -> list[dict[str, str]]:
    return [point_wildcards(p) for p in sweep_points(params)]


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("prepare_data", (), _prepare_data, lambda p: [{}],
         desc="Decode the dataset into fixed-size image and label arrays, train and test splits."),
    Rule("train_tokenizer", (), _train_tokenizer, lambda p: [{}],
         desc="Train the VQ tokenizer on the training images, or import released weights."),
    Rule("tokenize", (), _tokenize, lambda p: [{}] if _needs_tokens(p) else [],
         desc="Encode the images into token grids and measure the tokenizer's reconstructions."),
    Rule("train_classifier", (), _train_classifier,
         lambda p: [{}] if "classifier" in _extractors(p) else [],
         desc="Train the small CNN whose features and softmax the classifier metrics use."),
    Rule("train", ("model",), _train, lambda p: [{"model": m} for m in DECODERS],
         desc="Train one decoder on the token grids, or import its released weights."),
    Rule("sample", POINT_WILDCARDS, _sample, _point_instances,
         desc="Generate the class-balanced sample set of one sweep point."),
    Rule("reference_stats", ("extractor",), _reference_stats,
         lambda p: [{"extractor": x} for x in _extractors(p)],
         desc="Compute one extractor's feature statistics of the real reference split."),
    Rule("evaluate", POINT_WILDCARDS, _evaluate, _point_instances,
         desc="Measure FID, IS, KID, precision/recall and accuracy of one sweep point's samples."),
    Rule("profile", (), _profile, lambda p: [{}],
         desc="Time decoding and measure its memory, per model, step count, batch and precision."),
    Rule("gallery", (), _gallery, lambda p: [{}] if zero_shot_decoder() else [],
         desc="Draw the zero-shot editing galleries (inpainting, outpainting, continuation, expansion)."),
    Rule("zero_shot", ("task",), _zero_shot,
         lambda p: [{"task": t} for t in p["zeroshot"]["tasks"]] if zero_shot_decoder() else [],
         desc="Measure one zero-shot task's edits' quality over its known fractions, masks and step counts."),
    Rule("report", (), _report, lambda p: [{}],
         desc="Write the study report (markdown, CSV tables, figures, plot series) from every stage output."),
)}
