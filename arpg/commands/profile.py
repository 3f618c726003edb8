"""`arpg profile`: images/s and peak memory of every decoder of arpg/decoders.py (CSV, JSON, plots, MLflow).

Every configuration (size, decoder, steps, batch, precision) is measured in its own child process,
so its peak memory is its own. This module declares the stage and plans the configurations
(`plan`: which ones `profile.*` asks for; `dominated_by`: which a skip rules out; the published
anchors reported beside them), without torch; arpg/engine/profile/sweep.py runs each in its
process and writes the speed-ups and files, arpg/engine/profile/child.py times one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from arpg.decoders import DECODERS
from arpg.errors import ArpgError
from arpg.sizes import RASTER_TWIN
from arpg.sweeps import first_run
from arpg.stages import DECODING_KEYS, TOKEN_SPACE_KEYS, Ctx, Job, Rule, gpu_count, key_list, log_path

# --------------------------------------------------------------------------- the stage

def _job(ctx: Ctx, w) -> Job:
    params, lay = ctx.params, ctx.layout
    prof = params["profile"]
    inputs = ()
    keys = key_list("device", "profile", DECODING_KEYS, "sample.confidence_noise", "seed")
    if "default" in prof["models"]:  # the study's own models (+ tokenizer, end-to-end, strategies) are timed too
        inputs = (*(str(lay.model_checkpoint(m, first_run(params))) for m in DECODERS), str(lay.tokenizer_checkpoint))
        keys += key_list(TOKEN_SPACE_KEYS, *(f"train.{d.model_key}" for d in DECODERS.values()),
                         "sample.strategies", "sample.strategy_steps")
    # alone: every other job's processes would share the cores it times on
    return Job("profile", {}, ("profile",), inputs, (str(lay.profile_csv), str(lay.profile_json)), keys,
               threads=prof["threads"], gpus=gpu_count(params), log=log_path(ctx, "profile", w, ()), alone=True)


RULE = Rule("profile", (), _job, lambda p: [{}],
            desc="Time decoding and measure its memory, per model, step count, batch and precision.")


def configure(parser) -> None:
    parser.add_argument("--model", action="append", default=None, metavar="NAME",
                        help="profile only this entry of profile.models (repeatable); rows of the other "
                             "models already in profile.json are kept")
    parser.epilog = ("Sizes, steps, batch sizes, repeats, threads and precision come from the `profile:` "
                     "section of the params file; sampler options from `sample:`.")


def run(args, params) -> None:
    from arpg.checkpoint_io import read_json
    from arpg.config import unrecorded
    from arpg.engine import profile as prof
    from arpg.figures import profile_figures
    from arpg.progress import Progress
    from arpg.tracking import stage_run
    from arpg.warm import record_own_usage

    layout = params.layout
    settings = {f"profile.{k}": v for k, v in unrecorded(params)["profile"].items()}  # MLflow labels
    with stage_run(params, "profile", run_params=settings) as run:  # open before any work: a failure ends it FAILED
        specs = plan(params, args.model)
        print(f"profiling {len(specs)} configurations (one child process each; "
              f"threads={params['profile']['threads']}, repeats={params['profile']['repeats']})")
        bar = Progress(len(specs), "profile", unit="configuration")

        def log(line: str) -> None:  # once per configuration, measured or skipped
            print(line, flush=True)
            bar.update(1)
            bar.report(last=line.strip())

        machine = prof.environment()  # its load and time: when profiling starts
        rows = prof.run_profile(specs, log=log, rounds=params["profile"]["rounds"],
                                quiet=prof.Quiet.from_params(params))  # every child process has ended here
        record_own_usage()  # the stage times' CPU of this job includes its configurations'
        bar.close()
        if args.model and layout.profile_json.is_file():
            earlier = read_json(layout.profile_json, "the profile", written_by="arpg profile")
            kept = [r for r in earlier["rows"] if r["model"] not in args.model]
            rows = kept + rows
        meta = {**machine, "params_file": str(params.path), "params_hash": params.digest,
                "profile": params["profile"]}
        doc = prof.write_outputs(rows, layout.profile_csv, layout.profile_json, meta)
        plots = profile_figures(doc, layout.profile_dir)
        print(prof.summary(doc))
        run.log_metrics(prof.metrics(doc))
        for path in [layout.profile_csv, layout.profile_json, *plots]:
            run.log_artifact(path)
        print(f"wrote {layout.profile_csv}, {layout.profile_json} and {len(plots)} plots in {layout.profile_dir}")


# --------------------------------------------------------------------------- the plan

# Registry sizes are profiled at the published (ImageNet) vocabulary.
PUBLISHED_CODEBOOK = 16384
PUBLISHED_CLASSES = 1000
# `RunSpec.tokenizer` value for registry sizes: end-to-end timing with a random-weight VQ-16 decoder.
RANDOM_VQ16 = "random-vq16"


@dataclass(frozen=True)
class RunSpec:
    """One measured configuration; travels to the child process as JSON."""

    model: str              # size label: "default" or a registry ARPG name ("ARPG-L")
    kind: str               # decoder name (arpg/decoders.py)
    net: str                # network built: registry name ("LlamaGen-L") or the checkpoint's name
    checkpoint: str | None  # study checkpoint (model "default"); None: random init from the registry
    tokenizer: str | None   # VQ checkpoint, RANDOM_VQ16, or None (generation only)
    codebook_size: int
    num_classes: int
    grid: int
    steps: int              # decoding steps; a sequential decoder: grid * grid (one token per step)
    order: str              # the order or decoding strategy (a sequential decoder: its native order)
    batch: int
    cfg: float
    schedule: str
    cfg_schedule: str
    temperature: float
    top_k: int
    top_p: float
    confidence_noise: float
    repeats: int
    warmup: int
    threads: int
    omp_wait_policy: str    # "passive" | "active" (OMP_WAIT_POLICY of the child process)
    device: str
    precision: str
    compile: bool
    max_seconds: float
    seed: int
    kernel_cache: str | None = None  # CPU: the measured kernel choices (per machine, model size, row plan)
    time_decode: bool = False        # also time VQ decoding (once per decode_group; the sweep sets it)

    def decode_group(self) -> tuple:
        """Configurations whose VQ decoding costs the same: one tokenizer, one batch of token grids."""
        return self.model, self.tokenizer, self.grid, self.batch, self.precision, self.device

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def cfg_batch(self) -> int:
        """Rows per token the model sees: CFG doubles the batch ([cond; uncond])."""
        return self.batch * (2 if self.cfg != 1.0 else 1)

    def label(self) -> str:
        order = "" if self.order == DECODERS[self.kind].native_order else f" order={self.order}"
        return f"{self.model}/{self.kind} steps={self.steps}{order} batch={self.batch} {self.precision}"


def twin_of(name: str) -> str:
    if name not in RASTER_TWIN:
        raise ArpgError(f"profile.models: {name!r} has no raster twin; use 'default' or one of "
                        f"{', '.join(RASTER_TWIN)} (pairs are defined in arpg/sizes.py "
                        "RASTER_TWIN)")
    return RASTER_TWIN[name]


def plan(params, models: Iterable[str] | None = None) -> list[RunSpec]:
    """Every configuration `profile.*` asks for, cheapest first within a model. The study's own models
    ("default") also decode with each of sample.strategies at sample.strategy_steps (their native
    order at those steps too) at the largest batch, so every strategy's cost sits beside its quality."""
    from arpg.config import token_grid, unrecorded

    prof, sample = params["profile"], params["sample"]
    models = list(models) if models is not None else list(prof["models"])
    unknown = [m for m in models if m not in prof["models"]]
    if unknown:
        raise ArpgError(f"--model {', '.join(unknown)} is not in profile.models {prof['models']}; "
                        "add it to profile.models in the params file")
    stray = [o["model"] for o in prof["overrides"] if o["model"] not in prof["models"]]
    if stray:
        raise ArpgError(f"profile.overrides name {stray}, which are not in profile.models {prof['models']}; "
                        "fix the model names")
    layout = params.layout
    specs: list[RunSpec] = []
    for model in models:
        limits = next((o for o in prof["overrides"] if o["model"] == model), {})
        steps_list = sorted(set(limits.get("steps", prof["steps"])))
        batches = sorted(set(limits.get("batch_sizes", prof["batch_sizes"])))
        if model == "default":
            grid = token_grid(params)
            run = first_run(unrecorded(params))  # the first seed's models: the job's input paths name them
            nets = {d.name: (params["train"][d.model_key], str(layout.model_checkpoint(d.name, run)))
                    for d in DECODERS.values()}
            vocab = (params["tokenizer"]["codebook_size"], params["data"]["num_classes"])
            tokenizer = str(layout.tokenizer_checkpoint)
        else:
            grid = prof["grid"]
            # a published parallel size and its sequential twin on the same backbone
            nets = {d.name: (model if d.parallel else twin_of(model), None) for d in DECODERS.values()}
            vocab = (PUBLISHED_CODEBOOK, PUBLISHED_CLASSES)
            tokenizer = RANDOM_VQ16
        too_many = [s for s in steps_list if s > grid * grid]
        if too_many:
            raise ArpgError(f"profile.steps {too_many} exceed the {grid * grid} tokens of {model}'s "
                            f"{grid}x{grid} grid; lower them (or raise profile.grid)")
        common = dict(model=model, tokenizer=tokenizer, codebook_size=vocab[0], num_classes=vocab[1],
                      grid=grid, cfg=float(prof["cfg"]), schedule=sample["schedule"],
                      cfg_schedule=sample["cfg_schedule"], temperature=float(sample["temperature"]),
                      top_k=int(sample["top_k"]), top_p=float(sample["top_p"]),
                      confidence_noise=float(sample["confidence_noise"]),
                      repeats=int(limits.get("repeats", prof["repeats"])),
                      warmup=int(limits.get("warmup", prof["warmup"])), threads=int(prof["threads"]),
                      omp_wait_policy=prof["omp_wait_policy"],
                      device=params["device"], compile=bool(prof["compile"]),
                      max_seconds=float(prof["max_seconds"]), seed=int(params["seed"]),
                      kernel_cache=str(layout.kernel_choices))
        strategies = list(sample["strategies"]) if model == "default" else []
        strategy_steps = sorted(set(sample["strategy_steps"])) if strategies else []
        for precision in prof["precisions"]:
            for batch in batches:
                # the strategies (and the native order at their steps) only at the largest batch: the
                # report pairs their quality with that batch's speed, and its speed-ups are native
                paired = batch == batches[-1]
                for d in DECODERS.values():
                    net, ckpt = nets[d.name]
                    runs = ([(s, d.native_order) for s in sorted(set(steps_list) | set(strategy_steps * paired))]
                            + [(s, o) for o in strategies * paired for s in strategy_steps]) if d.parallel \
                        else [(grid * grid, d.native_order)]
                    for steps, order in runs:
                        specs.append(RunSpec(kind=d.name, net=net, checkpoint=ckpt, steps=steps, order=order,
                                             batch=batch, precision=precision, **common))
    return specs


def dominated_by(spec: RunSpec, skipped: Iterable[RunSpec]) -> RunSpec | None:
    """A skipped configuration at most as costly as `spec` (same model, kind, order and precision, steps
    and batch <=)."""
    for other in skipped:
        if (other.model, other.kind, other.order, other.device, other.precision) \
                == (spec.model, spec.kind, spec.order, spec.device, spec.precision) \
                and other.steps <= spec.steps and other.batch <= spec.batch:
            return other
    return None


# --------------------------------------------------------------------------- the published anchors

# Issue 7's anchors: the public releases' own generate() on a 2-core CPU, fp32,
# CFG 4, 16x16 tokens, random weights, median of 3 after a warm-up. They are
# reference figures measured elsewhere, reported beside ours, never mixed in.
REFERENCE_ANCHORS: list[dict] = [
    {"name": "ARPG release generate()", "model": "ARPG-L", "kind": "arpg", "steps": 32, "batch": 1,
     "s_per_call": 8.35, "img_s": 1 / 8.35, "target_ratio": 1.2},
    {"name": "ARPG release generate()", "model": "ARPG-L", "kind": "arpg", "steps": 64, "batch": 1,
     "s_per_call": 13.3, "img_s": 1 / 13.3, "target_ratio": 1.2},
    {"name": "LlamaGen GPT-L generate()", "model": "ARPG-L", "kind": "raster", "steps": 256, "batch": 1,
     "s_per_call": 83.9, "img_s": 1 / 83.9, "target_ratio": 1.0},
    {"name": "ARPG release generate()", "model": "ARPG-L", "kind": "arpg", "steps": 32, "batch": 8,
     "s_per_call": 8 / 0.281, "img_s": 0.281, "target_ratio": 1.2},
    {"name": "LlamaGen GPT-L generate()", "model": "ARPG-L", "kind": "raster", "steps": 256, "batch": 8,
     "s_per_call": 8 / 0.0854, "img_s": 0.0854, "target_ratio": 1.0},
]
ANCHOR_CONDITIONS = {"device": "cpu", "threads": 2, "precision": "fp32", "cfg": 4.0, "grid": 16}
NOTE = "anchors: issue 7, public releases' own generate() measured on a 2-core CPU; not measured by this run"


def reference_comparison(rows: list[dict]) -> list[dict]:
    """Our rows next to issue 7's anchors, where the conditions match."""
    out = []
    for anchor in REFERENCE_ANCHORS:
        match = [r for r in rows if r["status"] == "ok" and r["model"] == anchor["model"]
                 and r["kind"] == anchor["kind"] and r["steps"] == anchor["steps"] and r["batch"] == anchor["batch"]
                 and r["device"] == ANCHOR_CONDITIONS["device"] and r["threads"] == ANCHOR_CONDITIONS["threads"]
                 and r["precision"] == ANCHOR_CONDITIONS["precision"] and r["cfg"] == ANCHOR_CONDITIONS["cfg"]
                 and r["grid"] == ANCHOR_CONDITIONS["grid"]]
        if not match:
            continue
        ours = match[0]["gen_img_s_median"]
        out.append({**anchor, "ours_img_s": ours, "ours_s_per_call": match[0]["gen_s_median"],
                    "ratio": ours / anchor["img_s"], "met": ours / anchor["img_s"] >= anchor["target_ratio"]})
    return out


def reference_record(rows: list[dict]) -> dict:
    """The anchors, their conditions and our matching rows: profile.json's "reference"."""
    return {"conditions": ANCHOR_CONDITIONS, "anchors": REFERENCE_ANCHORS,
            "comparison": reference_comparison(rows), "note": NOTE}
