"""Quick decode benchmark in nanoGPT's bench.py style: one size, random weights, a few timed calls.

    .venv/bin/python benchmarks/bench_decode.py --model ARPG-S --steps 32 --batch 1
    .venv/bin/python benchmarks/bench_decode.py --model LlamaGen-S --batch 8 --torch-profile

ARPG sizes run randomized parallel decoding with `--steps` steps; LlamaGen sizes run the
raster baseline (one token per step). `--torch-profile` prints torch.profiler's top ops
for one call (where the time goes). For the full sweep with isolated memory
measurements, use `arpg profile`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from arpg.engine.sampler import generate_arpg, generate_raster
from arpg.models.registry import build_model, network_of_size
from arpg.utils import make_generator, resolve_device

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="ARPG-S", help="registry name (ARPG-* or LlamaGen-*)")
parser.add_argument("--steps", type=int, default=32, help="ARPG decoding steps")
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--grid", type=int, default=16)
parser.add_argument("--cfg", type=float, default=4.0)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--warmup", type=int, default=1)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--device", default="auto")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--torch-profile", action="store_true", help="print torch.profiler's top ops of one call")
args = parser.parse_args()

torch.set_num_threads(args.threads)
device = resolve_device(args.device)
model = build_model(args.model, codebook_size=16384, num_classes=1000, grid_size=args.grid,
                    generator=make_generator(args.seed)).to(device).eval().requires_grad_(False)
kind = network_of_size(args.model)
labels_B = torch.arange(args.batch, device=device) % 1000  # [B]
gen = make_generator(args.seed, device)
print(f"{args.model} ({kind}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) on {device}, "
      f"{args.grid}x{args.grid} tokens, batch {args.batch}, cfg {args.cfg}, threads {torch.get_num_threads()}")


def call() -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    if kind == "arpg":
        generate_arpg(model, labels_B, steps=args.steps, cfg=args.cfg, generator=gen)
    else:
        generate_raster(model, labels_B, cfg=args.cfg, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - begin


for _ in range(args.warmup):
    call()
if args.torch_profile:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
times = [call() for _ in range(args.repeats)]
median = statistics.median(times)
print(f"{'steps ' + str(args.steps) if kind == 'arpg' else 'raster'}: {median:.3f} s/call "
      f"(min {min(times):.3f}, max {max(times):.3f}), {args.batch / median:.4g} img/s")
