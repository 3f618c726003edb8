"""The profiling sweep: which configurations `profile.*` asks for, and which a skip rules out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from arpg.decoders import DECODERS
from arpg.errors import ArpgError
from arpg.sizes import RASTER_TWIN

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
    from arpg.config import token_grid

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
            nets = {d.name: (params["train"][d.model_key], str(layout.model_checkpoint(d.name)))
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
