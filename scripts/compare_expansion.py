"""Compare resolution-expansion methods on a finished study (issue 17): class kept, detail added.

    python scripts/compare_expansion.py [--params params.yaml] [--images 200]

For each method and output grid: expand `--images` class-balanced test images with the study's
ARPG (gallery.steps / gallery.cfg, the sample section's decoding settings), decode, down-scale
to the training resolution (area average) and report
  accuracy   the study classifier's accuracy against the source label, with a 95% Wilson interval;
  psnr_up    PSNR of the expanded image against the plain bicubic up-scale (how far the model
             moves from it); known tokens kept is checked.
Beside it, the classifier's accuracy on the bicubic up-scale down-scaled again (the ceiling of
"keeps its class" for this input) and on the originals.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arpg.config import load_params  # noqa: E402
from arpg.data.arrays import load_images, load_labels  # noqa: E402
from arpg.data.pixels import from_uint8, to_uint8  # noqa: E402
from arpg.engine import zeroshot as Z  # noqa: E402
from arpg.engine.image_metrics import psnr  # noqa: E402
from arpg.engine.sampler import SamplerConfig  # noqa: E402
from arpg.models.checkpoint import load_study_models  # noqa: E402
from arpg.models.classifier import load_classifier  # noqa: E402
from arpg.utils import make_generator  # noqa: E402


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@torch.inference_mode()
def accuracy(classifier, images_BCHW: torch.Tensor, labels_B: torch.Tensor) -> tuple[int, int]:
    logits, _ = classifier(images_BCHW)
    return int((logits.argmax(1) == labels_B).sum()), int(labels_B.numel())


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    params = load_params(args.params)
    torch.set_num_threads(params["threads"])
    layout, gal, smp = params.layout, params["gallery"], params["sample"]
    device = torch.device("cpu")
    model, tokenizer = load_study_models(params, "arpg", device)
    classifier = load_classifier(layout.classifier_checkpoint, device)
    images_N, labels_N = load_images(layout, "test"), load_labels(layout, "test")
    index = Z.pick_images(labels_N, args.images)
    images = from_uint8(torch.from_numpy(np.ascontiguousarray(images_N[index])).permute(0, 3, 1, 2))  # [-1, 1]
    labels = torch.from_numpy(labels_N[index]).long()
    res, side = images.shape[-1], model.config.grid_size
    sampler = SamplerConfig(steps=gal["steps"], cfg=gal["cfg"], cfg_schedule=smp["cfg_schedule"],
                            schedule=smp["schedule"], temperature=smp["temperature"], top_k=smp["top_k"],
                            top_p=smp["top_p"], confidence_noise=smp["confidence_noise"])
    down = lambda x: F.interpolate(x, size=(res, res), mode="area")  # noqa: E731
    base = accuracy(classifier, images, labels)
    print(f"study: {layout.out}, {len(index)} test images, steps {gal['steps']}, cfg {gal['cfg']}")
    print(f"originals: accuracy {base[0] / base[1]:.3f}")
    variants = [("extend", 12), ("extend", 2 * side), ("interpolate", 2 * side), ("interpolate", 3 * side)]
    for method, grid in variants:
        correct = up_correct = 0
        psnrs, kept = [], True
        gen = make_generator(params["seed"])
        for start in range(0, len(index), args.batch):
            x, y = images[start:start + args.batch], labels[start:start + args.batch]
            completion, big = Z.expand_resolution(model, tokenizer, x, y, expand_to=grid, sampler=sampler,
                                                  generator=gen, method=method)
            kept &= completion.known_kept
            out = tokenizer.decode(completion.tokens_Bhw).clamp(-1, 1)  # [B, C, grid*f, grid*f]
            correct += accuracy(classifier, down(out), y)[0]
            up_correct += accuracy(classifier, down(big), y)[0]
            psnrs.append(psnr(to_uint8(out), to_uint8(big)))
        n = len(index)
        lo, hi = wilson(correct, n)
        print(f"{method:<12} {grid:>2}x{grid:<2} ({grid * tokenizer.config.downsample} px): accuracy "
              f"{correct / n:.3f} [{lo:.3f}, {hi:.3f}], bicubic up-scale {up_correct / n:.3f}, PSNR vs "
              f"bicubic {torch.cat(psnrs).clamp(max=100).mean():.2f} dB, known tokens kept: {kept}")


if __name__ == "__main__":
    main()
