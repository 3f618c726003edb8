"""The child process of `arpg profile`: build, warm up and time one configuration.

`python -m arpg.engine.profile --one SPEC --out RESULT` runs `main` here (arpg/engine/profile/
__main__.py), so the peak RSS on CPU belongs to that configuration alone and no allocator state
leaks from one configuration into the next. Fixed thread count, model built (random weights for
registry sizes, the study checkpoints for `default`), peak-memory mark reset after loading, warm-up
calls, then `repeats` timed calls of the sampler. With `time_decode` (one configuration per
tokenizer and batch: decoding a batch of token grids costs the same whatever produced them), VQ
decoding of the last call's tokens is then warmed up and timed `repeats` times; the sweep adds that
time to every configuration of the group for the end-to-end figures (results.attach_end_to_end).
On CUDA, timing uses CUDA events and memory is the peak allocated by torch; on CPU, perf_counter
and the RSS high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from arpg.commands.profile import RANDOM_VQ16, RunSpec
from arpg.decoders import DECODERS
from arpg.errors import ArpgError, CheckpointError
from arpg.machine import cpu_name
from arpg.engine.profile.quiet import Contention
from arpg.utils import atomic_write_text


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
    if device.type != "cpu" and spec.precision == "bf16":
        model = model.to(torch.bfloat16)
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


def choose_cpu_kernel(model, spec: RunSpec) -> dict:
    """Time every linear kernel of spec.precision at the row counts this configuration decodes with
    and switch the model to the fastest (cpu_kernels.choose_kernel, cached in spec.kernel_cache);
    both decoders get the same rule."""
    from arpg.engine.sampler import step_counts
    from arpg.models.cpu_kernels import choose_kernel, kernels_for, row_plan

    plan = row_plan(model, step_counts(spec.tokens, spec.steps, spec.schedule), spec.cfg_batch)
    return choose_kernel(model, plan, kernels_for(spec.precision),
                         Path(spec.kernel_cache) if spec.kernel_cache else None)


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
    if device.type != "cpu" and spec.precision == "bf16":
        vq = vq.to(torch.bfloat16)

    def decode(tokens_BN):
        return vq.decode(tokens_BN.view(-1, spec.grid, spec.grid))  # [B, C, H, W]
    return decode


def _sampler(spec: RunSpec) -> Callable:
    from arpg.engine.sampler import generate_arpg, generate_raster

    common = dict(cfg=spec.cfg, cfg_schedule=spec.cfg_schedule, temperature=spec.temperature,
                  top_k=spec.top_k, top_p=spec.top_p)
    decoder = DECODERS[spec.kind]
    if decoder.parallel:
        return lambda model, labels_B, gen: generate_arpg(model, labels_B, steps=spec.steps,
                                                          schedule=spec.schedule, order=spec.order,
                                                          confidence_noise=spec.confidence_noise,
                                                          generator=gen, **common)
    return lambda model, labels_B, gen: generate_raster(model, labels_B, generator=gen, **common)


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated timings."""
    return statistics.median(values), min(values), max(values)


def base_row(spec: RunSpec) -> dict:
    import torch

    return {"model": spec.model, "net": spec.net, "kind": spec.kind, "grid": spec.grid, "tokens": spec.tokens,
            "steps": spec.steps, "order": spec.order, "batch": spec.batch, "cfg": spec.cfg, "repeats": spec.repeats,
            "warmup": spec.warmup, "threads": spec.threads, "precision": spec.precision,
            "compile": spec.compile, "torch": torch.__version__, "cpu": cpu_name(),
            # Shared machines: busy cores (and OpenMP spin-waiting under contention) slow small kernels a lot.
            "load_avg_1m": os.getloadavg()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}


def measure(spec: RunSpec, marker_dir: Path | None = None) -> dict:
    """Build, warm up and time one configuration in this process; returns its row."""
    import torch

    from arpg.utils import make_generator, resolve_device

    torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    if device.type != "cuda" and spec.compile:
        raise ArpgError("profile.compile runs on CUDA only; set profile.compile: false for CPU profiling")
    row = base_row(spec)
    row["device"] = str(device)
    row["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

    with torch.inference_mode():
        model = _build_generator(spec, device)
        if device.type == "cpu":
            choice = choose_cpu_kernel(model, spec)
            row["kernel"], row["kernel_cached"] = choice["kernel"], choice["cached"]
            row["kernel_seconds"] = " ".join(f"{k}:{v:.4g}" for k, v in choice["seconds"].items())
        else:
            row["kernel"] = f"{spec.precision} ({device.type})"
        decode = _build_decoder(spec, device) if spec.time_decode else None
        dtype = next(model.parameters()).dtype
        row["params"] = sum(p.numel() for p in model.parameters())
        row["backbone"] = backbone(model)
        row["kv_cache_bytes"] = int(model.kv_cache_bytes(spec.cfg_batch, dtype))
        labels_B = (torch.arange(spec.batch) % spec.num_classes).to(device)  # [B]
        gen = make_generator(spec.seed, device)
        sample = _sampler(spec)
        timer = _timer(device)
        meter = MemoryMeter(device)
        contention = Contention(spec.threads)

        def call() -> tuple[float, torch.Tensor]:
            stop, waited = timer(), contention.window()
            tokens_BN = sample(model, labels_B, gen)  # [B, N]
            seconds = stop()
            waited()
            return seconds, tokens_BN

        row["loaded_mem_bytes"] = meter.start()
        row["mem_kind"] = meter.kind
        _mark(marker_dir, "loaded")
        first_s, tokens_BN = call()
        row["peak_mem_bytes"] = meter.peak()  # generation's own peak
        row["gen_mem_bytes"] = row["peak_mem_bytes"] - row["loaded_mem_bytes"]
        _mark(marker_dir, "first")
        row["first_call_s"] = first_s
        if first_s > spec.max_seconds:
            row.update(status="skipped", skip_reason=f"first call took {first_s:.1f} s > profile.max_seconds "
                                                     f"{spec.max_seconds:g}")
            return row
        gen_s = [first_s] if spec.warmup == 0 else []
        for _ in range(spec.warmup - 1):
            call()
        while len(gen_s) < spec.repeats:
            seconds, tokens_BN = call()
            gen_s.append(seconds)
        if decode is not None:
            decode(tokens_BN)  # warm-up: [B, C, H, W]
            decode_s = []
            for _ in range(spec.repeats):
                stop = timer()
                decode(tokens_BN)
                decode_s.append(stop())
            row["decode_s_median"], row["decode_s_min"], row["decode_s_max"] = spread(decode_s)

    row.update(status="ok", skip_reason="", load_avg_1m_after=os.getloadavg()[0], **contention.record())
    row["gen_s_median"], row["gen_s_min"], row["gen_s_max"] = spread(gen_s)
    row["gen_img_s_median"], row["gen_img_s_min"], row["gen_img_s_max"] = spread([spec.batch / s for s in gen_s])
    row["gen_s_all"] = gen_s
    return row


def measure_rounds(specs: list[RunSpec], rounds: int, marker_dir: Path | None = None) -> dict:
    """Time `specs` (one model, batch and precision: each decoder's configurations) interleaved in
    this process: after one untimed call each, `rounds` rounds that call each configuration once, so
    whatever slows the machine meanwhile slows both sides of a round alike. Returns {"seconds":
    [per spec: one time per round], "load_avg_1m", "load_avg_1m_after", "wait_share", "cpu_share"}."""
    import torch

    from arpg.models.cpu_kernels import use_kernel
    from arpg.utils import make_generator, resolve_device

    torch.set_num_threads(specs[0].threads)
    device = resolve_device(specs[0].device)
    load_before = os.getloadavg()[0]
    timer, contention = _timer(device), Contention(specs[0].threads)
    with torch.inference_mode():
        models: dict[tuple, object] = {}
        calls = []
        for spec in specs:
            model = models.get((spec.net, spec.checkpoint))
            if model is None:
                model = models[(spec.net, spec.checkpoint)] = _build_generator(spec, device)
            kernel = choose_cpu_kernel(model, spec)["kernel"] if device.type == "cpu" else None
            labels_B = (torch.arange(spec.batch) % spec.num_classes).to(device)  # [B]
            calls.append((model, kernel, _sampler(spec), labels_B, make_generator(spec.seed, device)))

        def call(model, kernel, sample, labels_B, gen) -> float:
            if kernel is not None:
                use_kernel(model, kernel)  # untimed: the kernel each configuration was measured fastest with
            stop, waited = timer(), contention.window()
            sample(model, labels_B, gen)  # [B, N] tokens
            seconds = stop()
            waited()
            return seconds

        for c in calls:  # warm-up (each configuration's first call ran within max_seconds already)
            call(*c)
        _mark(marker_dir, "loaded")
        _mark(marker_dir, "first")
        seconds = [[] for _ in calls]
        for _ in range(rounds):
            for i, c in enumerate(calls):
                seconds[i].append(call(*c))
    return {"seconds": seconds, "load_avg_1m": load_before, "load_avg_1m_after": os.getloadavg()[0],
            **contention.record()}


def _mark(marker_dir: Path | None, name: str) -> None:
    """A progress marker for the parent (atomic: it reads the time as soon as the file exists)."""
    if marker_dir is not None:
        atomic_write_text(Path(marker_dir) / name, f"{time.time()}\n")


def main(argv: list[str] | None = None) -> int:
    """The child's command line: measure the RunSpec in --one, write its row to --out."""
    parser = argparse.ArgumentParser(description="measure one profiling configuration (used by `arpg profile`)")
    parser.add_argument("--one", required=True, help="RunSpec JSON file")
    parser.add_argument("--out", required=True, help="where to write the result row (JSON)")
    parser.add_argument("--markers", default=None, help="directory for progress markers")
    parser.add_argument("--rounds", type=int, default=0,
                        help="--one holds a list of specs: time them interleaved for this many rounds")
    args = parser.parse_args(argv)
    payload = json.loads(Path(args.one).read_text())
    markers = Path(args.markers) if args.markers else None
    try:
        if args.rounds:
            row = measure_rounds([RunSpec(**s) for s in payload], args.rounds, markers)
        else:
            row = measure(RunSpec(**payload), markers)
    except ArpgError as exc:
        print(f"ArpgError: {exc}", file=sys.stderr)
        return 2
    atomic_write_text(args.out, json.dumps(row))
    return 0
