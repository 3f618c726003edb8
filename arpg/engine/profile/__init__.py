"""Throughput and memory of ARPG vs raster decoding (issue 7).

Every configuration (size, decoder, steps, batch) is measured in its own child process
(`python -m arpg.engine.profile`, see `child`), so the peak RSS on CPU belongs to that
configuration alone. The stage plans the configurations (arpg/commands/profile.py: `plan`, with
issue 7's reference anchors); `sweep` runs and skips them, computes ARPG-over-raster speed-ups and
writes profile.csv / profile.json. The figures: `arpg.figures.profile_figures`.
"""

from arpg.commands.profile import (ANCHOR_CONDITIONS, PUBLISHED_CLASSES, PUBLISHED_CODEBOOK, RANDOM_VQ16, RASTER_TWIN,
                                   REFERENCE_ANCHORS, RunSpec, dominated_by, plan, reference_comparison, twin_of)
from arpg.engine.profile.child import MemoryMeter, backbone, measure, random_vq
from arpg.engine.profile.sweep import (CHILD_PRELOAD, CSV_COLUMNS, GOAL_FRACTION_OF_STEP_RATIO, LOAD_TIMEOUT_S,
                                       SPEEDUP_COLUMNS, Quiet, child_env, environment, median_interval, metrics,
                                       run_isolated, run_profile, speedups, summary, write_outputs)

__all__ = ["ANCHOR_CONDITIONS", "CHILD_PRELOAD", "CSV_COLUMNS", "GOAL_FRACTION_OF_STEP_RATIO", "LOAD_TIMEOUT_S",
           "MemoryMeter", "PUBLISHED_CLASSES", "Quiet", "median_interval", "PUBLISHED_CODEBOOK", "RANDOM_VQ16", "RASTER_TWIN", "REFERENCE_ANCHORS",
           "RunSpec", "SPEEDUP_COLUMNS", "backbone", "child_env", "dominated_by", "environment", "measure", "metrics",
           "plan", "random_vq", "reference_comparison", "run_isolated", "run_profile", "speedups", "summary", "twin_of",
           "write_outputs"]
