"""What does `evaluate.bootstrap` cost per sweep point? (CPU)

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bootstrap.py                      # default study
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bootstrap.py --samples 4000 --dim 2048 \
        --classes 1000 --reference 4000 --kid-subset-size 1000 --logits 1008 --replicates 2     # paper-like

Times `arpg.engine.bootstrap.bootstrap_intervals` (everything the intervals add after feature
extraction: the one-time pass of the replicates' precision / recall, then every replicate's FID, KID,
IS, precision / recall and accuracy) on random features of the study's shapes, next to the
headline metrics of the same features (`metrics_from_features`). Feature values do not change the
cost; the shapes do. The defaults are the default study's: 1000 class-balanced samples of 10
classes, the classifier's 128-d features, a 10000-row reference, KID subsets of 500.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from arpg.engine.bootstrap import BootstrapConfig, bootstrap_intervals
from arpg.engine.evaluate import reference_from_features
from arpg.engine.metrics import EvalConfig, metrics_from_features
from arpg.utils import make_generator

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--samples", type=int, default=1000, help="generated rows (class-balanced)")
parser.add_argument("--classes", type=int, default=10)
parser.add_argument("--dim", type=int, default=128, help="feature width (classifier 128, Inception 2048)")
parser.add_argument("--logits", type=int, default=10, help="IS logits width (classifier: classes; Inception 1008)")
parser.add_argument("--reference", type=int, default=10000, help="reference rows")
parser.add_argument("--kid-subset-size", type=int, default=500)
parser.add_argument("--replicates", type=int, default=20)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)

gen = make_generator(0)
feats = {"features": torch.randn(args.samples, args.dim, generator=gen).relu(),
         "logits": 3 * torch.randn(args.samples, args.logits, generator=gen)}
labels_N = np.arange(args.samples) % args.classes
reference = reference_from_features(1.05 * torch.randn(args.reference, args.dim, generator=gen).relu())
config = EvalConfig(kid_subset_size=args.kid_subset_size, seed=0)

start = time.perf_counter()
point = metrics_from_features(feats, labels_N, reference, "classifier", config)
headline_s = time.perf_counter() - start
start = time.perf_counter()
bootstrap_intervals(feats, labels_N, reference, "classifier", config, BootstrapConfig(args.replicates, 0), point)
bootstrap_s = time.perf_counter() - start
print(f"{args.threads} thread(s); {args.samples} samples x {args.dim}-d, reference {args.reference}: headline "
      f"metrics {headline_s:.2f} s, bootstrap of {args.replicates} replicates {bootstrap_s:.2f} s "
      f"({1000 * bootstrap_s / args.replicates:.0f} ms a replicate, one-time pass included)")
