"""Quality parity of bf16 and fp32 decoding on a finished study (issue 21).

    python scripts/compare_precision.py [--params params.yaml] [--model arpg] [--steps 8]

Samples the study's class-balanced set (sample.num_per_class per class, sample.seed, the sample
section's decoding settings, guidance sample.cfg_default) with the trained model twice, with the
quality stages' fixed fp32 kernel and with bf16 (arpg/models/cpu_kernels.py), and prints for each
the FID / KID / accuracy of every evaluate.extractors entry with its bootstrap interval, the
difference bf16 - fp32 with its interval and whether it exceeds the noise, and the share of
tokens that come out identical (same seeds: only rounding separates the two). Needs a CPU with
bf16 hardware (`arpg info`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arpg.config import load_params  # noqa: E402
from arpg.engine.bootstrap import BOOTSTRAP_LEVEL, BootstrapConfig, bootstrap_intervals, normal_quantile  # noqa: E402
from arpg.engine.evaluate import extract_features, extractor_weights, file_digest, load_reference  # noqa: E402
from arpg.engine.metrics import EvalConfig, metrics_from_features  # noqa: E402
from arpg.engine.sample_set import generate_class_balanced, make_draw, merge_batches  # noqa: E402
from arpg.engine.sampler import SamplerConfig  # noqa: E402
from arpg.machine import cpu_name  # noqa: E402
from arpg.models.checkpoint import load_study_models  # noqa: E402
from arpg.models.cpu_kernels import prepare_for_decoding  # noqa: E402


def sample_and_score(params, model, tokenizer, args, precision: str) -> tuple[dict, dict, np.ndarray]:
    """(metrics, intervals, tokens) of the study's sample set decoded at `precision`."""
    smp, layout = params["sample"], params.layout
    kernel = prepare_for_decoding(model, precision, "--precision")
    opts = SamplerConfig.from_params(smp, steps=args.steps, cfg=smp["cfg_default"])
    draw = make_draw(args.model, model, tokenizer, opts, "random" if args.model == "arpg" else "raster")
    part = generate_class_balanced(draw, num_classes=params["data"]["num_classes"], num_per_class=smp["num_per_class"],
                                   batch_size=smp["batch_size"], seed=smp["seed"], device=torch.device("cpu"))
    labels_N, outputs = merge_batches([part])
    tokens = torch.cat([t for t, _ in outputs]).numpy()
    images = torch.cat([img for _, img in outputs]).numpy()
    labels = labels_N.numpy().astype(np.int64)
    config, bootstrap = EvalConfig.from_params(params), BootstrapConfig.from_params(params)
    metrics, intervals = {}, {}
    for extractor in params["evaluate"]["extractors"]:
        weights = extractor_weights(params, extractor)
        split = params["evaluate"]["reference_split"]
        reference = load_reference(layout.reference_stats(extractor, split), extractor, file_digest(weights))
        feats = extract_features(images, extractor, weights, config.batch_size, torch.device("cpu"))
        values = metrics_from_features(feats, labels, reference, extractor, config)
        intervals.update(bootstrap_intervals(feats, labels, reference, extractor, config, bootstrap, values))
        metrics.update(values)
    print(f"{precision} ({kernel}): sampled and scored {len(labels)} images")
    return metrics, intervals, tokens


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="arpg", help="decoder (arpg/decoders.py)")
    parser.add_argument("--steps", type=int, default=8, help="ARPG decoding steps")
    args = parser.parse_args()
    params = load_params(args.params)
    torch.set_num_threads(params["threads"])
    model, tokenizer = load_study_models(params, args.model, torch.device("cpu"))
    print(f"study {params.layout.out}, {args.model} at {args.steps} steps, cfg {params['sample']['cfg_default']}, "
          f"CPU {cpu_name()}")
    results = {p: sample_and_score(params, model, tokenizer, args, p) for p in ("fp32", "bf16")}
    (m32, i32, t32), (m16, i16, t16) = results["fp32"], results["bf16"]
    z = normal_quantile(BOOTSTRAP_LEVEL)
    for name in sorted(k for k in m32 if k.startswith(("fid_", "kid_", "accuracy_"))
                       and not k.startswith(("kid_std", "kid_subset"))):
        a, b = i32.get(name), i16.get(name)
        line = f"{name}: fp32 {m32[name]:.4g}"
        if a and b and a["se"] is not None and b["se"] is not None:
            se = math.hypot(a["se"], b["se"])
            diff = m16[name] - m32[name]
            line += (f" ± {z * a['se']:.2g}, bf16 {m16[name]:.4g} ± {z * b['se']:.2g}; bf16 - fp32 {diff:+.4g} "
                     f"[{diff - z * se:.4g}, {diff + z * se:.4g}] -> "
                     f"{'beyond the noise' if abs(diff) > z * se else 'within the noise'}")
        else:
            line += f", bf16 {m16[name]:.4g} (no intervals: evaluate.bootstrap is 0)"
        print(line)
    print(f"identical tokens: {(t32 == t16).mean():.4f} of {t32.size}; identical images: "
          f"{(t32 == t16).reshape(len(t32), -1).all(1).mean():.4f}")


if __name__ == "__main__":
    main()
