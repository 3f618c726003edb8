"""What each file of report.dir shows: its category and caption (Snakemake's `--report` page).

The Snakemake report rule marks report.dir with `report()`; each file found there is filed under
`describe(name).category` with its caption as a label. tests/test_report.py checks that every file
`arpg report` writes is described here, so a new table or figure cannot reach the page uncaptioned.

Imported by Snakemake on every invocation: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from arpg.sweeps import SWEEPS


@dataclass(frozen=True)
class Shown:
    category: str
    caption: str


QUALITY, SPEED, SAMPLES, ZERO_SHOT, MODELS, PIPELINE, TEXT = (
    "1 Quality", "2 Speed", "3 Samples", "4 Zero-shot editing", "5 Tokenizer, classifier, training",
    "6 Pipeline", "0 Report text")

# The files of report.dir, each spelled here only (the report writes them by these names).
README_MD = "README.md"
QUALITY_CSV = "quality.csv"
FID_PNG = "fid_vs_steps.png"
STRATEGIES_PNG = "quality_vs_steps_strategies.png"
GUIDANCE_PNG = "guidance_frontier.png"
GUIDANCE_CHOICE_CSV = "guidance_choice.csv"
DIFFERENCES_CSV = "differences.csv"
SEEDS_CSV = "seeds.csv"
EXTRACTORS_CSV = "metric_extractors.csv"
SPEED_CSV = "speed.csv"
SPEEDUPS_CSV = "speedups.csv"
PRECISION_SPEEDUPS_CSV = "precision_speedups.csv"
PARETO_CSV = "pareto.csv"
FID_VS_THROUGHPUT_PNG = "fid_vs_throughput.png"
THROUGHPUT_PNG = "throughput_vs_steps.png"
MEMORY_PNG = "memory.png"
TOKENIZER_CSV = "tokenizer.csv"
RECONSTRUCTIONS_PNG = "tokenizer_reconstructions.png"
CLASSIFIER_CSV = "classifier.csv"
TRAINING_CSV = "training.csv"
ZERO_SHOT_CSV = "zeroshot.csv"
METRICS_JSON = "metrics.json"
STAGE_TIMES_CSV = "stage_times.csv"

FILES: dict[str, Shown] = {
    README_MD: Shown(TEXT, "The whole report as markdown: every table below with the text that reads it, including "
                           "which differences exceed the noise."),
    QUALITY_CSV: Shown(QUALITY, "Every sweep point: FID, KID, IS, precision/recall and class accuracy, each with "
                                "its bootstrap standard error and 95% interval."),
    FID_PNG: Shown(QUALITY, "FID against decoding steps, each decoder a line, 95% bootstrap intervals as bars."),
    STRATEGIES_PNG: Shown(QUALITY, "Quality against steps per decoding strategy, with 95% intervals."),
    GUIDANCE_PNG: Shown(QUALITY, "Each decoder's guidance frontier: FID against class accuracy over the guidance "
                                 "sweep, with 95% intervals."),
    DIFFERENCES_CSV: Shown(QUALITY, "The sweeps' differences with their 95% intervals and whether each exceeds the "
                                    "noise."),
    GUIDANCE_CHOICE_CSV: Shown(QUALITY, "Each decoder's guidance values measured on their selection sets (another "
                                        "sampling seed) and the one chosen."),
    SEEDS_CSV: Shown(QUALITY, "The step and guidance sweeps over training seeds: each seed's value, their mean with an "
                              "interval holding training and sampling noise, the between-training sd."),
    EXTRACTORS_CSV: Shown(QUALITY, "Which feature extractor each metric column was computed with."),
    SPEED_CSV: Shown(SPEED, "Measured decoding speed per model, steps, batch size and precision: images/s, latency "
                            "spread, peak memory and KV-cache size (CPU model in the report text)."),
    SPEEDUPS_CSV: Shown(SPEED, "ARPG over raster speed-ups at matched batch sizes, per precision and best."),
    PRECISION_SPEEDUPS_CSV: Shown(SPEED, "bf16 over fp32 speed-ups per decoder and configuration."),
    PARETO_CSV: Shown(SPEED, "Quality-speed pairs (FID with interval, images/s) and the Pareto front."),
    FID_VS_THROUGHPUT_PNG: Shown(SPEED, "FID against images/s, each sweep point a marker, the Pareto front drawn."),
    THROUGHPUT_PNG: Shown(SPEED, "Images/s against decoding steps, one line per model and batch size."),
    MEMORY_PNG: Shown(SPEED, "Peak decoding memory and KV-cache size against batch size."),
    TOKENIZER_CSV: Shown(MODELS, "The VQ tokenizer: reconstruction PSNR/SSIM and codebook usage."),
    RECONSTRUCTIONS_PNG: Shown(MODELS, "Test images (top) and their tokenizer reconstructions (bottom)."),
    CLASSIFIER_CSV: Shown(MODELS, "The evaluation classifier's test accuracy and the real-data sanity row."),
    TRAINING_CSV: Shown(MODELS, "Each generator's training: steps, tokens, final loss and its setup."),
    ZERO_SHOT_CSV: Shown(ZERO_SHOT, "Inpainting, outpainting, continuation and resolution expansion, measured: "
                                    "accuracy, FID, KID and PSNR per cell with intervals."),
    METRICS_JSON: Shown(TEXT, "The report's headline metrics (DVC's `metrics`, so `dvc exp show` compares "
                              "experiments by them)."),
    STAGE_TIMES_CSV: Shown(PIPELINE, "Wall time, CPU time and peak memory of every stage, from Snakemake's "
                                     "benchmark files."),
}


def describe(name: str) -> Shown:
    """Category and caption of a file of report.dir, by its path relative to report.dir."""
    if name in FILES:
        return FILES[name]
    sweep = next((s for s in SWEEPS.values() if s.csv == name), None)
    if sweep is not None:  # each sweep's table
        return Shown(QUALITY, sweep.caption)
    path = PurePosixPath(name)
    if path.parts[0] == "grids" and len(path.parts) == 3 and path.suffix == ".png":
        return Shown(SAMPLES, f"Class-balanced sample grid of {path.parts[1]} at {path.stem} "
                              "(steps, guidance, order), one row per class.")
    if path.parts[0] == "plots" and len(path.parts) == 2 and path.suffix == ".csv":
        model = path.stem.rsplit("-", 1)[-1]
        x = "images/s" if path.stem.startswith("fid_vs_img_s") else "decoding steps"
        return Shown(QUALITY if x == "decoding steps" else SPEED,
                     f"The series DVC's plots draw for {model}: FID against {x} (one file per decoder).")
    if path.parts[0] == "gallery" and len(path.parts) == 2 and path.suffix == ".png":
        return Shown(ZERO_SHOT, f"Zero-shot {path.stem}: the given image, the mask and the model's "
                                "completions, one row per class.")
    raise KeyError(f"{name}: no caption in arpg/report_catalog.py; add the file there")
