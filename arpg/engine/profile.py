"""Throughput and memory of ARPG vs raster decoding (issue 7).

Every configuration (model, kind, steps, batch) is measured in its own child
process (`python -m arpg.engine.profile --one SPEC --out RESULT`), so the peak
RSS on CPU belongs to that configuration alone and no allocator state leaks
from one configuration into the next. In the child: fixed thread count, model
built (random weights for registry sizes, the study checkpoints for `default`),
peak-memory mark reset after loading, warm-up calls, then `repeats` timed calls
of the sampler; each call is timed for generation alone and for generation
plus VQ decoding (end to end). On CUDA, timing uses CUDA events and memory is
the peak allocated by torch; on CPU, perf_counter and the RSS high-water mark.

The parent plans the sweep, skips configurations that cannot finish within
`profile.max_seconds` (a cheaper one already did not, or the first call ran
over and was stopped), and computes ARPG-over-raster speed-ups.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from arpg.errors import ArpgError, CheckpointError
from arpg.utils import save_figure

# The one place that pairs an ARPG size with its same-backbone raster twin
# (same width, heads and total depth; checked when the pair is built).
RASTER_TWIN: dict[str, str] = {
    "ARPG-T": "LlamaGen-T",
    "ARPG-S": "LlamaGen-S",
    "ARPG-L": "LlamaGen-L",
    "ARPG-XL": "LlamaGen-XL",
}
# Registry sizes are profiled at the published (ImageNet) vocabulary.
PUBLISHED_CODEBOOK = 16384
PUBLISHED_CLASSES = 1000
# Issue 7's goal: speed-up >= 7x at 32 and >= 3.5x at 64 of 256 tokens, i.e. 7/8 of the step ratio.
GOAL_FRACTION_OF_STEP_RATIO = 0.875
# `RunSpec.tokenizer` value for registry sizes: end-to-end timing with a random-weight VQ-16 decoder.
RANDOM_VQ16 = "random-vq16"
# Time allowed for a child to import torch and build its model before its first call.
LOAD_TIMEOUT_S = 900.0

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

CSV_COLUMNS = [
    "model", "net", "kind", "backbone", "params", "grid", "tokens", "steps", "batch", "cfg", "status", "skip_reason",
    "gen_s_median", "gen_s_min", "gen_s_max", "gen_img_s_median", "gen_img_s_min", "gen_img_s_max",
    "e2e_s_median", "e2e_s_min", "e2e_s_max", "e2e_img_s_median", "e2e_img_s_min", "e2e_img_s_max",
    "first_call_s", "peak_mem_bytes", "loaded_mem_bytes", "gen_mem_bytes", "mem_kind", "kv_cache_bytes",
    "repeats", "warmup", "device", "device_name", "threads", "precision", "compile", "torch", "cpu",
    "load_avg_1m", "load_avg_1m_after", "omp_wait_policy",
]
SPEEDUP_COLUMNS = [
    "model", "batch", "steps", "tokens", "step_ratio", "goal", "speedup_gen", "speedup_gen_low",
    "speedup_gen_high", "speedup_e2e", "kv_ratio", "gen_mem_ratio",
]


@dataclass(frozen=True)
class RunSpec:
    """One measured configuration; travels to the child process as JSON."""

    model: str              # size label: "default" or a registry ARPG name ("ARPG-L")
    kind: str               # "arpg" | "raster"
    net: str                # network built: registry name ("LlamaGen-L") or the checkpoint's name
    checkpoint: str | None  # study checkpoint (model "default"); None: random init from the registry
    tokenizer: str | None   # VQ checkpoint, RANDOM_VQ16, or None (generation only)
    codebook_size: int
    num_classes: int
    grid: int
    steps: int              # ARPG decoding steps; raster: grid * grid (one token per step)
    batch: int
    cfg: float
    schedule: str
    cfg_schedule: str
    temperature: float
    top_k: int
    top_p: float
    repeats: int
    warmup: int
    threads: int
    omp_wait_policy: str    # "passive" | "active" (OMP_WAIT_POLICY of the child process)
    device: str
    precision: str
    compile: bool
    max_seconds: float
    seed: int

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    def label(self) -> str:
        return f"{self.model}/{self.kind} steps={self.steps} batch={self.batch}"


# --------------------------------------------------------------------------- planning

def twin_of(name: str) -> str:
    if name not in RASTER_TWIN:
        raise ArpgError(f"profile.models: {name!r} has no raster twin; use 'default' or one of "
                        f"{', '.join(RASTER_TWIN)} (pairs are defined in arpg/engine/profile.py RASTER_TWIN)")
    return RASTER_TWIN[name]


def plan(params, models: Iterable[str] | None = None) -> list[RunSpec]:
    """Every configuration `profile.*` asks for, cheapest first within a model."""
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
            nets = {"arpg": (params["train"]["arpg_model"], str(layout.model_checkpoint("arpg"))),
                    "raster": (params["train"]["raster_model"], str(layout.model_checkpoint("raster")))}
            vocab = (params["tokenizer"]["codebook_size"], params["data"]["num_classes"])
            tokenizer = str(layout.tokenizer_checkpoint)
        else:
            grid = prof["grid"]
            nets = {"arpg": (model, None), "raster": (twin_of(model), None)}
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
                      repeats=int(limits.get("repeats", prof["repeats"])),
                      warmup=int(limits.get("warmup", prof["warmup"])), threads=int(prof["threads"]),
                      omp_wait_policy=prof["omp_wait_policy"],
                      device=params["device"], precision=prof["precision"], compile=bool(prof["compile"]),
                      max_seconds=float(prof["max_seconds"]), seed=int(params["seed"]))
        for batch in batches:
            for steps in steps_list:
                net, ckpt = nets["arpg"]
                specs.append(RunSpec(kind="arpg", net=net, checkpoint=ckpt, steps=steps, batch=batch, **common))
            net, ckpt = nets["raster"]
            specs.append(RunSpec(kind="raster", net=net, checkpoint=ckpt, steps=grid * grid, batch=batch,
                                 **common))
    return specs


def dominated_by(spec: RunSpec, skipped: Iterable[RunSpec]) -> RunSpec | None:
    """A skipped configuration at most as costly as `spec` (same model and kind, steps and batch <=)."""
    for other in skipped:
        if (other.model, other.kind, other.device) == (spec.model, spec.kind, spec.device) \
                and other.steps <= spec.steps and other.batch <= spec.batch:
            return other
    return None


# --------------------------------------------------------------------------- child: one configuration

def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryMeter:
    """Peak memory above the loaded model: start() after loading, peak() after generating.

    CUDA: torch's peak allocated bytes. CPU: the kernel's RSS high-water mark,
    reset at start() so loading the weights is not part of the peak.
    """

    def __init__(self, device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"

    def start(self) -> int:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if not _reset_rss_peak():
            # Without the reset the peak also covers loading; say so in the row.
            self.kind = "rss_process"
        return _rss_bytes()

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return _rss_peak_bytes()


def _timer(device) -> Callable[[], Callable[[], float]]:
    """start() -> stop(), where stop() returns seconds since start, device work included."""
    import torch

    if device.type == "cuda":
        def start():
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()

            def stop() -> float:
                end.record()
                end.synchronize()
                return begin.elapsed_time(end) / 1000.0
            return stop
        return start

    def start_cpu():
        begin = time.perf_counter()
        return lambda: time.perf_counter() - begin
    return start_cpu


def _build_generator(spec: RunSpec, device):
    import torch

    from arpg.models.checkpoint import load_generator
    from arpg.models.layers import prepack_linears_for_cpu
    from arpg.models.registry import build_model
    from arpg.utils import make_generator

    if spec.checkpoint is not None:
        if not Path(spec.checkpoint).is_file():
            raise CheckpointError(f"{spec.kind} model checkpoint not found at {spec.checkpoint}; "
                                  f"run `arpg train --model {spec.kind}` first (or drop 'default' "
                                  "from profile.models)")
        model = load_generator(spec.checkpoint, device=device)
    else:
        model = build_model(spec.net, codebook_size=spec.codebook_size, num_classes=spec.num_classes,
                            grid_size=spec.grid, generator=make_generator(spec.seed)).to(device)
    model.eval().requires_grad_(False)
    if spec.precision == "bf16":
        model = model.to(torch.bfloat16)
    # fp32 on CPU: both decoders run their linears through oneDNN with prepacked weights, as
    # `arpg sample` does (a no-op on CUDA and in bf16)
    prepack_linears_for_cpu(model)
    if spec.compile:
        # Compile the transformer blocks; the decoding loops have data-dependent step sizes and stay eager.
        for module in model.modules():
            if isinstance(module, torch.nn.ModuleList):
                for block in module:
                    block.compile(dynamic=True)
    return model


def backbone(model) -> str:
    """Width, heads and total depth: what an ARPG size shares with its raster twin."""
    cfg = model.config
    depth = cfg.n_self_layers + cfg.n_cross_layers if hasattr(cfg, "n_self_layers") else cfg.n_layers
    return f"d{cfg.dim}-h{cfg.n_heads}-L{depth}"


def random_vq(cfg, seed: int, device="cpu"):
    """A VQ autoencoder with random weights from a dedicated generator (decoding cost needs no training)."""
    import torch

    from arpg.models.vq import VQModel
    from arpg.utils import make_generator

    gen = make_generator(seed)
    with torch.device("meta"):  # skip the default init (it would draw from the global RNG)
        vq = VQModel(cfg)
    vq = vq.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in [*vq.named_parameters(), *vq.named_buffers()]:
            if tensor.dim() >= 2:
                tensor.normal_(0.0, 0.02, generator=gen)
            else:  # norm scales 1, biases and buffers 0
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)
    return vq.to(device)


def _build_decoder(spec: RunSpec, device):
    """tokens_BN -> images [B, C, H, W] with the study tokenizer or a random VQ-16; None: no decoding."""
    if spec.tokenizer is None:
        return None
    import torch

    from arpg.models.vq import load_tokenizer

    if spec.tokenizer == RANDOM_VQ16:
        from arpg.models.vq import VQConfig

        # LlamaGen's VQ-16 (spec section 1): VQConfig's defaults.
        vq = random_vq(VQConfig(codebook_size=spec.codebook_size), spec.seed, device)
    else:
        if not Path(spec.tokenizer).is_file():
            raise CheckpointError(f"tokenizer checkpoint not found at {spec.tokenizer}; run "
                                  "`arpg train-tokenizer` first (or drop 'default' from profile.models)")
        vq = load_tokenizer(spec.tokenizer).to(device)
    vq.eval().requires_grad_(False)
    if spec.precision == "bf16":
        vq = vq.to(torch.bfloat16)

    def decode(tokens_BN):
        return vq.decode(tokens_BN.view(-1, spec.grid, spec.grid))  # [B, C, H, W]
    return decode


def _sampler(spec: RunSpec) -> Callable:
    from arpg.engine.sampler import generate_arpg, generate_raster

    common = dict(cfg=spec.cfg, cfg_schedule=spec.cfg_schedule, temperature=spec.temperature,
                  top_k=spec.top_k, top_p=spec.top_p)
    if spec.kind == "arpg":
        return lambda model, labels_B, gen: generate_arpg(model, labels_B, steps=spec.steps,
                                                          schedule=spec.schedule, order="random",
                                                          generator=gen, **common)
    return lambda model, labels_B, gen: generate_raster(model, labels_B, generator=gen, **common)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _base_row(spec: RunSpec) -> dict:
    import torch

    return {"model": spec.model, "net": spec.net, "kind": spec.kind, "grid": spec.grid, "tokens": spec.tokens,
            "steps": spec.steps, "batch": spec.batch, "cfg": spec.cfg, "repeats": spec.repeats,
            "warmup": spec.warmup, "threads": spec.threads, "precision": spec.precision,
            "compile": spec.compile, "torch": torch.__version__, "cpu": _cpu_name(),
            # Shared machines: busy cores (and OpenMP spin-waiting under contention) slow small kernels a lot.
            "load_avg_1m": os.getloadavg()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def measure(spec: RunSpec, marker_dir: Path | None = None) -> dict:
    """Build, warm up and time one configuration in this process; returns its row."""
    import torch

    from arpg.utils import make_generator, resolve_device

    torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    if device.type != "cuda" and (spec.precision != "fp32" or spec.compile):
        raise ArpgError("profile.precision bf16 and profile.compile run on CUDA only; set "
                        "profile.precision: fp32 and profile.compile: false for CPU profiling")
    row = _base_row(spec)
    row["device"] = str(device)
    row["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()

    with torch.inference_mode():
        model = _build_generator(spec, device)
        decode = _build_decoder(spec, device)
        dtype = next(model.parameters()).dtype
        cfg_batch = spec.batch * (2 if spec.cfg != 1.0 else 1)  # CFG doubles the batch: [cond; uncond]
        row["params"] = sum(p.numel() for p in model.parameters())
        row["backbone"] = backbone(model)
        row["kv_cache_bytes"] = int(model.kv_cache_bytes(cfg_batch, dtype))
        labels_B = (torch.arange(spec.batch) % spec.num_classes).to(device)  # [B]
        gen = make_generator(spec.seed, device)
        sample = _sampler(spec)
        timer = _timer(device)
        meter = MemoryMeter(device)

        def call(first: bool = False) -> tuple[float, float | None]:
            stop = timer()
            tokens_BN = sample(model, labels_B, gen)  # [B, N]
            gen_s = stop()
            if first:
                # Generation's own peak, read before any VQ decoding touches memory.
                row["peak_mem_bytes"] = meter.peak()
                row["gen_mem_bytes"] = row["peak_mem_bytes"] - row["loaded_mem_bytes"]
            if decode is None:
                return gen_s, None
            decode(tokens_BN)  # [B, C, H, W]
            return gen_s, stop()

        row["loaded_mem_bytes"] = meter.start()
        row["mem_kind"] = meter.kind
        _mark(marker_dir, "loaded")
        first = call(first=True)
        _mark(marker_dir, "first")
        row["first_call_s"] = first[0]
        if first[0] > spec.max_seconds:
            row.update(status="skipped", skip_reason=f"first call took {first[0]:.1f} s > profile.max_seconds "
                                                     f"{spec.max_seconds:g}")
            return row
        timed = [first] if spec.warmup == 0 else []
        for _ in range(spec.warmup - 1):
            call()
        while len(timed) < spec.repeats:
            timed.append(call())

    row.update(status="ok", skip_reason="", load_avg_1m_after=os.getloadavg()[0])
    gen_s = [g for g, _ in timed]
    row["gen_s_median"], row["gen_s_min"], row["gen_s_max"] = _spread(gen_s)
    row["gen_img_s_median"], row["gen_img_s_min"], row["gen_img_s_max"] = _spread([spec.batch / s for s in gen_s])
    if decode is not None:
        e2e_s = [e for _, e in timed]
        row["e2e_s_median"], row["e2e_s_min"], row["e2e_s_max"] = _spread(e2e_s)
        row["e2e_img_s_median"], row["e2e_img_s_min"], row["e2e_img_s_max"] = _spread(
            [spec.batch / s for s in e2e_s])
    row["gen_s_all"] = gen_s
    return row


def _mark(marker_dir: Path | None, name: str) -> None:
    if marker_dir is not None:
        (Path(marker_dir) / name).write_text(f"{time.time()}\n")


# --------------------------------------------------------------------------- parent: isolation and the sweep

def run_isolated(spec: RunSpec, poll_s: float = 0.2) -> dict:
    """Measure `spec` in a fresh child process; stop it if its first call runs past max_seconds."""
    with tempfile.TemporaryDirectory(prefix="arpg-profile-") as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
        # Spinning OpenMP workers stall whenever another process holds a core (40x slower small matmuls
        # measured on a busy 2-core machine); passive waiting keeps shared-machine timings meaningful.
        # The child runs in this working directory (relative checkpoint paths) with this arpg package.
        from arpg.pipeline import python_path_with

        env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
                   OMP_WAIT_POLICY=spec.omp_wait_policy.upper(),
                   PYTHONPATH=python_path_with(str(Path(__file__).resolve().parents[2])))
        cmd = [sys.executable, "-m", "arpg.engine.profile", "--one", str(tmp / "spec.json"),
               "--out", str(tmp / "row.json"), "--markers", str(tmp)]
        with open(tmp / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            started = time.monotonic()
            reason = None
            try:
                while proc.poll() is None and reason is None:
                    time.sleep(poll_s)
                    loaded = tmp / "loaded"
                    if not loaded.exists():
                        if time.monotonic() - started > LOAD_TIMEOUT_S:
                            reason = f"model not built within {LOAD_TIMEOUT_S:g} s"
                    elif not (tmp / "first").exists() and time.time() - float(loaded.read_text()) > spec.max_seconds:
                        reason = (f"first call still running after profile.max_seconds {spec.max_seconds:g} s "
                                  "(stopped)")
            finally:  # also on Ctrl-C: never leave the child running
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if reason:
            row = _base_row(spec)
            row.update(status="skipped", skip_reason=reason, device=spec.device)
            return row
        if proc.returncode != 0 or not (tmp / "row.json").exists():
            tail = (tmp / "stderr.txt").read_text()[-3000:]
            marker = "ArpgError:"
            message = tail.rsplit(marker, 1)[-1].strip() if marker in tail else tail
            raise ArpgError(f"profiling {spec.label()} failed in its child process "
                            f"(exit {proc.returncode}):\n{message}")
        return json.loads((tmp / "row.json").read_text())


def run_profile(specs: list[RunSpec], *, isolate: bool = True,
                log: Callable[[str], None] = print) -> list[dict]:
    """Measure every spec (skipping those a skipped cheaper one rules out); rows in spec order."""
    rows: list[dict] = []
    skipped: list[RunSpec] = []
    for spec in specs:
        cheaper = dominated_by(spec, skipped)
        if cheaper is not None:
            row = _base_row(spec)
            row.update(status="skipped", device=spec.device,
                       skip_reason=f"cheaper configuration ({cheaper.label()}) exceeded profile.max_seconds")
        else:
            row = run_isolated(spec) if isolate else measure(spec)
        if row["status"] == "skipped":
            skipped.append(spec)
            log(f"  {spec.label()}: skipped ({row['skip_reason']})")
        else:
            log(f"  {spec.label()}: {row['gen_img_s_median']:.4g} img/s "
                f"({row['gen_s_median']:.3g} s/call, min {row['gen_s_min']:.3g}, max {row['gen_s_max']:.3g}), "
                f"gen mem {row['gen_mem_bytes'] / 2**20:.1f} MiB, kv {row['kv_cache_bytes'] / 2**20:.1f} MiB")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- results

def speedups(rows: list[dict]) -> list[dict]:
    """ARPG at S steps over raster at the same model and batch, with the step ratio n/S beside it."""
    ok = [r for r in rows if r["status"] == "ok"]
    raster = {(r["model"], r["batch"]): r for r in ok if r["kind"] == "raster"}
    out = []
    for r in ok:
        base = raster.get((r["model"], r["batch"]))
        if r["kind"] != "arpg" or base is None:
            continue
        if r["backbone"] != base["backbone"]:
            raise ArpgError(f"{r['model']}: ARPG backbone {r['backbone']} differs from its raster twin's "
                            f"{base['backbone']} ({base['net']}); fix RASTER_TWIN in arpg/engine/profile.py")
        ratio = r["tokens"] / r["steps"]
        item = {
            "model": r["model"], "batch": r["batch"], "steps": r["steps"], "tokens": r["tokens"],
            "step_ratio": ratio, "goal": GOAL_FRACTION_OF_STEP_RATIO * ratio,
            "speedup_gen": r["gen_img_s_median"] / base["gen_img_s_median"],
            # worst and best pairing of the two spreads
            "speedup_gen_low": r["gen_img_s_min"] / base["gen_img_s_max"],
            "speedup_gen_high": r["gen_img_s_max"] / base["gen_img_s_min"],
            "speedup_e2e": (r["e2e_img_s_median"] / base["e2e_img_s_median"]
                            if r.get("e2e_img_s_median") and base.get("e2e_img_s_median") else None),
            "kv_ratio": r["kv_cache_bytes"] / base["kv_cache_bytes"],
            "gen_mem_ratio": (r["gen_mem_bytes"] / base["gen_mem_bytes"] if base["gen_mem_bytes"] > 0 else None),
        }
        out.append(item)
    return out


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


def environment() -> dict:
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_outputs(rows: list[dict], csv_path: Path, json_path: Path, meta: dict) -> dict:
    from arpg.utils import write_json

    gains = speedups(rows)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})
    os.replace(tmp, csv_path)
    doc = {"meta": meta, "rows": rows, "speedups": gains,
           "reference": {"conditions": ANCHOR_CONDITIONS, "anchors": REFERENCE_ANCHORS,
                         "comparison": reference_comparison(rows),
                         "note": "anchors: issue 7, public releases' own generate() measured on a 2-core CPU; "
                                 "not measured by this run"}}
    write_json(json_path, doc)
    return doc


def summary(doc: dict) -> str:
    """The speed-up table (issue 7's 'done when' figures) and the reference comparison as text."""
    lines = ["ARPG speed-up over raster decoding (generation only, median; [worst, best] from the spreads)",
             f"{'model':<10}{'batch':>6}{'steps':>7}{'speed-up':>10}{'[low, high]':>16}{'n/S':>7}{'goal':>7}"
             f"{'e2e':>8}{'kv':>7}{'mem':>7}"]
    for g in doc["speedups"]:
        e2e = f"{g['speedup_e2e']:.2f}x" if g["speedup_e2e"] else "-"
        mem = f"{g['gen_mem_ratio']:.2f}" if g["gen_mem_ratio"] else "-"
        lines.append(f"{g['model']:<10}{g['batch']:>6}{g['steps']:>7}{g['speedup_gen']:>9.2f}x"
                     f"{'[%.2f, %.2f]' % (g['speedup_gen_low'], g['speedup_gen_high']):>16}"
                     f"{g['step_ratio']:>6.0f}x{g['goal']:>6.1f}x{e2e:>8}{g['kv_ratio']:>7.2f}{mem:>7}")
    skipped = [r for r in doc["rows"] if r["status"] == "skipped"]
    for r in skipped:
        lines.append(f"skipped: {r['model']}/{r['kind']} steps={r['steps']} batch={r['batch']}: {r['skip_reason']}")
    comparison = doc["reference"]["comparison"]
    if comparison:
        lines.append("vs the public releases (issue 7 anchors, same machine class; ours / theirs in img/s)")
        for c in comparison:
            lines.append(f"  {c['name']:<26} {c['kind']:<7} steps={c['steps']:<4} batch={c['batch']}: ours "
                         f"{c['ours_img_s']:.4g} vs {c['img_s']:.4g} = {c['ratio']:.2f}x "
                         f"(target >= {c['target_ratio']}x: {'met' if c['met'] else 'NOT met'})")
    lines.append("(kv: ARPG / raster analytic KV-cache bytes; mem: ARPG / raster measured generation memory)")
    busy = [r for r in doc["rows"] if max(r.get("load_avg_1m", 0), r.get("load_avg_1m_after", 0)) > r["threads"]
            and r["device"] == "cpu"]
    if busy:
        peak = max(max(r.get("load_avg_1m", 0), r.get("load_avg_1m_after", 0)) for r in busy)
        lines.append(f"WARNING: {len(busy)} CPU configurations ran with a 1-minute load average above their "
                     f"thread count (up to {peak:.1f}): other processes shared the cores, timings are pessimistic")
    return "\n".join(lines)


def plot(doc: dict, out_dir: Path) -> list[Path]:
    """images/s vs steps per model, memory bars, speed-up vs steps: PNGs in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    models = list(dict.fromkeys(r["model"] for r in doc["rows"]))
    paths = []

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, batch in enumerate(sorted({r["batch"] for r in ok if r["model"] == model})):
            color = f"C{i}"
            arpg = sorted((r for r in ok if (r["model"], r["kind"], r["batch"]) == (model, "arpg", batch)),
                          key=lambda r: r["steps"])
            if arpg:
                steps = [r["steps"] for r in arpg]
                ax.errorbar(steps, [r["gen_img_s_median"] for r in arpg],
                            yerr=[[r["gen_img_s_median"] - r["gen_img_s_min"] for r in arpg],
                                  [r["gen_img_s_max"] - r["gen_img_s_median"] for r in arpg]],
                            color=color, marker="o", label=f"ARPG b={batch}")
                if arpg[0].get("e2e_img_s_median"):
                    ax.plot(steps, [r["e2e_img_s_median"] for r in arpg], color=color, ls="--", marker=".",
                            label=f"ARPG b={batch} (+VQ decode)")
            for r in ok:
                if (r["model"], r["kind"], r["batch"]) == (model, "raster", batch):
                    ax.axhline(r["gen_img_s_median"], color=color, ls=":",
                               label=f"raster b={batch} ({r['steps']} steps)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ARPG steps")
        ax.set_ylabel("images / s")
        ax.set_title(model)
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out_dir / "throughput_vs_steps.png"))

    groups = sorted({(r["model"], r["batch"]) for r in ok}, key=lambda g: (models.index(g[0]), g[1]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.2
    for j, (kind, what, key) in enumerate([("arpg", "ARPG gen. memory", "gen_mem_bytes"),
                                           ("raster", "raster gen. memory", "gen_mem_bytes"),
                                           ("arpg", "ARPG KV cache", "kv_cache_bytes"),
                                           ("raster", "raster KV cache", "kv_cache_bytes")]):
        heights = []
        for model, batch in groups:
            vals = [r[key] for r in ok if (r["model"], r["batch"], r["kind"]) == (model, batch, kind)]
            heights.append(max(vals) / 2**20 if vals else 0.0)
        ax.bar([i + (j - 1.5) * width for i in range(len(groups))], heights, width, label=what,
               color=f"C{j % 2}", hatch="//" if j >= 2 else None, alpha=1.0 if j < 2 else 0.5)
    ax.set_xticks(range(len(groups)), [f"{m}\nb={b}" for m, b in groups])
    ax.set_ylabel("MiB (generation peak above the loaded model; max over steps)")
    ax.legend(fontsize=7)
    paths.append(save_figure(fig, out_dir / "memory.png"))

    gains = doc["speedups"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [g for g in gains if g["model"] == model]
        for i, batch in enumerate(sorted({g["batch"] for g in mine})):
            pts = sorted((g for g in mine if g["batch"] == batch), key=lambda g: g["steps"])
            ax.plot([g["steps"] for g in pts], [g["speedup_gen"] for g in pts], marker="o", color=f"C{i}",
                    label=f"speed-up b={batch}")
        if mine:
            pts = sorted({(g["steps"], g["step_ratio"]) for g in mine})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", label="step ratio n/S")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ARPG steps")
        ax.set_ylabel("ARPG / raster images/s")
        ax.set_title(model)
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out_dir / "speedup_vs_steps.png"))
    return paths


def metrics(doc: dict) -> dict[str, float]:
    """Flat MLflow metrics: img/s and memory per configuration, speed-ups."""
    out: dict[str, float] = {}
    for r in doc["rows"]:
        if r["status"] != "ok":
            continue
        key = f"{r['model']}.{r['kind']}.b{r['batch']}.s{r['steps']}"
        out[f"img_s.{key}"] = r["gen_img_s_median"]
        if r.get("e2e_img_s_median"):
            out[f"img_s_e2e.{key}"] = r["e2e_img_s_median"]
        out[f"gen_mem_mib.{key}"] = r["gen_mem_bytes"] / 2**20
        out[f"kv_mib.{key}"] = r["kv_cache_bytes"] / 2**20
    for g in doc["speedups"]:
        out[f"speedup.{g['model']}.b{g['batch']}.s{g['steps']}"] = g["speedup_gen"]
    return out


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="measure one profiling configuration (used by `arpg profile`)")
    parser.add_argument("--one", required=True, help="RunSpec JSON file")
    parser.add_argument("--out", required=True, help="where to write the result row (JSON)")
    parser.add_argument("--markers", default=None, help="directory for progress markers")
    args = parser.parse_args(argv)
    spec = RunSpec(**json.loads(Path(args.one).read_text()))
    try:
        row = measure(spec, Path(args.markers) if args.markers else None)
    except ArpgError as exc:
        print(f"ArpgError: {exc}", file=sys.stderr)
        return 2
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
