"""What speed-up over raster decoding do this machine's linear layers allow ARPG, per kernel? (CPU)

    .venv/bin/python benchmarks/bench_linear_ceiling.py --model ARPG-L --steps 32 64

Both decoders do the same matrix work for an image (every token passes every layer once, CFG
doubles the rows); ARPG does it in S steps of many rows, the raster twin in N steps of one row per
sample. The speed-up therefore depends on how much faster a many-row linear layer is per row than
a one-row one, and on the kernel (arpg/models/cpu_kernels.py: plain or oneDNN-prepacked, fp32 or,
where the CPU has bf16 hardware, bf16). This times exactly the linear layers each decoder runs per
step, at the row counts of its step schedule (`cpu_kernels.row_plan` / `time_kernel`, what
`arpg profile` chooses kernels with), for every kernel this machine offers, and prints per kernel
the linear-layers-only time of one call of each decoder, the rate reached against this machine's
peak fp32 GEMM rate, and the linear-only speed-up, each decoder at its own best kernel last.
The measured end-to-end figures are `arpg profile`'s job.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from arpg.engine.profile import PUBLISHED_CLASSES, PUBLISHED_CODEBOOK, RASTER_TWIN
from arpg.engine.sampler import step_counts
from arpg.machine import cpu_name
from arpg.models import cpu_kernels
from arpg.models.registry import build_model
from arpg.utils import make_generator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="ARPG-L", choices=sorted(RASTER_TWIN), help="ARPG size (vs its raster twin)")
parser.add_argument("--steps", type=int, nargs="+", default=[32, 64], help="ARPG step counts")
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--cfg", type=float, default=4.0, help="guidance on (!= 1) doubles the rows")
parser.add_argument("--schedule", default="cosine", help="ARPG step schedule (arpg.engine.sampler)")
parser.add_argument("--grid", type=int, default=16)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=3, help="timed passes per (group, rows); the median counts")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.set_num_threads(args.threads)


def build(name: str):
    return build_model(name, codebook_size=PUBLISHED_CODEBOOK, num_classes=PUBLISHED_CLASSES, grid_size=args.grid,
                       generator=make_generator(args.seed)).eval().requires_grad_(False)


def flops(model, plan) -> float:
    groups = model.linear_groups()
    return sum(2 * rows * count * sum(m.weight.numel() for m in groups[g]) for (g, rows), count in plan.items())


with torch.inference_mode():
    a = torch.randn(2048, 2048, generator=make_generator(args.seed))
    a @ a
    begin = time.perf_counter()
    a @ a
    peak = 2 * 2048 ** 3 / (time.perf_counter() - begin) / 1e9  # GFLOP/s
    arpg, raster = build(args.model), build(RASTER_TWIN[args.model])
    rows = (2 if args.cfg != 1.0 else 1) * args.batch
    n = args.grid * args.grid
    kernels = cpu_kernels.kernels_for("fp32") + (cpu_kernels.kernels_for("bf16") if cpu_kernels.bf16_hardware() else [])
    print(f"{args.model} vs {RASTER_TWIN[args.model]}, {args.grid}x{args.grid} tokens, batch {args.batch}, cfg "
          f"{args.cfg:g} ({rows} rows per token), {torch.get_num_threads()} threads, CPU {cpu_name()} (bf16 "
          f"hardware: {cpu_kernels.bf16_hardware() or 'none'}), 1-min load {os.getloadavg()[0]:.2f}; peak fp32 "
          f"GEMM (2048^3) {peak:.0f} GFLOP/s")
    plans = {"raster": cpu_kernels.row_plan(raster, [1] * n, rows)}
    plans.update({s: cpu_kernels.row_plan(arpg, step_counts(n, s, args.schedule), rows) for s in args.steps})
    seconds = {}
    for kernel in kernels:
        for key, plan in plans.items():
            model = raster if key == "raster" else arpg
            seconds[kernel, key] = cpu_kernels.time_kernel(model, kernel, plan, repeats=args.repeats, seed=args.seed)
        parts = [f"raster {seconds[kernel, 'raster']:.2f} s"]
        for s in args.steps:
            rate = flops(arpg, plans[s]) / seconds[kernel, s] / 1e9
            parts.append(f"ARPG {s} steps {seconds[kernel, s]:.3f} s ({rate:.0f} GFLOP/s, {100 * rate / peak:.0f}% "
                         f"of peak) -> {seconds[kernel, 'raster'] / seconds[kernel, s]:.2f}x")
        print(f"{kernel:<12} " + "; ".join(parts))
    best_raster = min(kernels, key=lambda k: seconds[k, "raster"])
    for s in args.steps:
        best = min(kernels, key=lambda k: seconds[k, s])
        print(f"each at its best kernel, {s} steps: ARPG {best} {seconds[best, s]:.3f} s vs raster {best_raster} "
              f"{seconds[best_raster, 'raster']:.2f} s -> linear-only speed-up "
              f"{seconds[best_raster, 'raster'] / seconds[best, s]:.2f}x (step ratio {n / s:g}x); vs today's "
              f"fp32-packed ARPG: {seconds['fp32-packed', s] / seconds[best, s]:.2f}x faster"
              if "fp32-packed" in kernels else "")
