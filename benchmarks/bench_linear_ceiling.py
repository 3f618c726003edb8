"""What speed-up over raster decoding do this machine's linear layers allow ARPG? (CPU, fp32)

    .venv/bin/python benchmarks/bench_linear_ceiling.py --model ARPG-L --steps 32 64

Both decoders do the same matrix work for an image (every token passes every layer
once, CFG doubles the rows); ARPG does it in S steps of many rows, the raster twin in
N steps of one row per sample. The speed-up therefore depends on how much faster a
many-row linear layer is per row than a one-row one. This times exactly the linear
layers each decoder runs per step (prepacked oneDNN weights, as `arpg sample` and
`arpg profile` use), at the row counts of the step schedule, and prints:

- the linear-layers-only time of one image for each decoder and their ratio;
- the rate ARPG's linear layers reach, against this machine's peak fp32 GEMM rate;
- the rate they would need for a goal speed-up (`--goal`), taking the raster twin's
  linear time as it is (the measured end-to-end ratio is `arpg profile`'s job).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from arpg.engine.profile import PUBLISHED_CLASSES, PUBLISHED_CODEBOOK, RASTER_TWIN
from arpg.engine.sampler import step_counts
from arpg.models.layers import prepack_linears_for_cpu
from arpg.models.registry import build_model
from arpg.utils import make_generator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="ARPG-L", choices=sorted(RASTER_TWIN), help="ARPG size (vs its raster twin)")
parser.add_argument("--steps", type=int, nargs="+", default=[32, 64], help="ARPG step counts")
parser.add_argument("--goal", type=float, nargs="+", default=[7.0, 3.5], help="goal speed-up per step count")
parser.add_argument("--batch", type=int, default=1)
parser.add_argument("--cfg", type=float, default=4.0, help="guidance on (!= 1) doubles the rows")
parser.add_argument("--schedule", default="cosine", help="ARPG step schedule (arpg.engine.sampler)")
parser.add_argument("--grid", type=int, default=16)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
if len(args.goal) != len(args.steps):
    parser.error("give one --goal per --steps value")

torch.set_num_threads(args.threads)


def median_time(fn, repeats: int = args.repeats) -> float:
    fn()  # warm-up: first-touch of the packed weights, oneDNN primitive creation
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def build(name: str):
    model = build_model(name, codebook_size=PUBLISHED_CODEBOOK, num_classes=PUBLISHED_CLASSES,
                        grid_size=args.grid, generator=make_generator(args.seed)).eval().requires_grad_(False)
    if prepack_linears_for_cpu(model) == 0:
        raise SystemExit("no oneDNN in this torch build: the decoders' linear layers are not prepacked here")
    return model


def linears(*modules) -> list[torch.nn.Linear]:
    return [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Linear)]


class Group:
    """Linear layers that run one after another on the same rows; time per row count, memoised."""

    def __init__(self, layers: list[torch.nn.Linear]):
        self.layers, self.times = layers, {}
        self.weights = sum(m.weight.numel() for m in layers)

    def seconds(self, rows: int) -> float:
        if rows not in self.times:
            inputs = {m.in_features: torch.randn(rows, m.in_features) for m in self.layers}  # [rows, K]
            self.times[rows] = median_time(lambda: [m(inputs[m.in_features]) for m in self.layers])
        return self.times[rows]


with torch.inference_mode():
    a = torch.randn(2048, 2048)
    peak = 2 * 2048 ** 3 / median_time(lambda: a @ a) / 1e9  # GFLOP/s
    arpg, raster = build(args.model), build(RASTER_TWIN[args.model])
    # ARPG: pass 1 (+ the shared K/V) runs on the tokens fed in a step, pass 2 (+ head) on its queries
    feed = Group(linears(arpg.layers.self_dec, arpg.layers.to_k, arpg.layers.to_v))
    query = Group(linears(arpg.layers.cross_dec, arpg.head))
    twin = Group(linears(raster))
    copies = 2 if args.cfg != 1.0 else 1
    rows = copies * args.batch
    n = args.grid * args.grid

    print(f"{args.model} vs {RASTER_TWIN[args.model]}, {args.grid}x{args.grid} tokens, batch {args.batch}, "
          f"cfg {args.cfg:g} ({rows} rows per token), fp32, {torch.get_num_threads()} threads; "
          f"peak fp32 GEMM (2048^3) {peak:.0f} GFLOP/s")
    raster_s = n * twin.seconds(rows)  # class + N-1 tokens fed, one per step
    raster_flops = 2 * n * rows * twin.weights
    print(f"raster twin: {n} steps x {twin.seconds(rows) * 1e3:.1f} ms = {raster_s:.2f} s of linear layers "
          f"per call ({raster_flops / raster_s / 1e9:.0f} GFLOP/s)")
    for steps, goal in zip(args.steps, args.goal):
        counts = step_counts(n, steps, args.schedule)
        fed = [1] + counts[:-1]  # step 0 feeds the class; the last step's tokens are never fed
        arpg_s = sum(feed.seconds(rows * f) + query.seconds(rows * k) for f, k in zip(fed, counts))
        arpg_flops = 2 * rows * (sum(fed) * feed.weights + n * query.weights)
        need = arpg_flops / (raster_s / goal) / 1e9
        print(f"ARPG {steps} steps ({rows * max(counts)} rows at most): {arpg_s:.2f} s of linear layers "
              f"({arpg_flops / arpg_s / 1e9:.0f} GFLOP/s, {100 * arpg_flops / arpg_s / 1e9 / peak:.0f}% of peak) "
              f"-> linear-only speed-up {raster_s / arpg_s:.2f}x (step ratio {n / steps:g}x); "
              f"{goal:g}x would need {need:.0f} GFLOP/s ({100 * need / peak:.0f}% of peak)")
