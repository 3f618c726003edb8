"""Throughput and memory of ARPG vs raster decoding (issue 7).

Every configuration (model, kind, steps, batch) is measured in its own child process
(`python -m arpg.engine.profile`, see `child`), so the peak RSS on CPU belongs to that
configuration alone. The parent plans the sweep (`planning`), runs and skips configurations
(`sweep`), computes ARPG-over-raster speed-ups and writes profile.csv / profile.json (`results`),
beside issue 7's reference anchors (`anchors`). The figures: `arpg.figures.profile_figures`.
"""

from arpg.engine.profile.anchors import ANCHOR_CONDITIONS, REFERENCE_ANCHORS, reference_comparison
from arpg.engine.profile.child import MemoryMeter, backbone, measure, random_vq
from arpg.engine.profile.planning import (PUBLISHED_CLASSES, PUBLISHED_CODEBOOK, RANDOM_VQ16, RASTER_TWIN, RunSpec,
                                          dominated_by, plan, twin_of)
from arpg.engine.profile.results import (CSV_COLUMNS, GOAL_FRACTION_OF_STEP_RATIO, SPEEDUP_COLUMNS, environment,
                                         metrics, speedups, summary, write_outputs)
from arpg.engine.profile.sweep import CHILD_PRELOAD, LOAD_TIMEOUT_S, child_env, run_isolated, run_profile

__all__ = ["ANCHOR_CONDITIONS", "CHILD_PRELOAD", "CSV_COLUMNS", "GOAL_FRACTION_OF_STEP_RATIO", "LOAD_TIMEOUT_S", "MemoryMeter",
           "PUBLISHED_CLASSES", "PUBLISHED_CODEBOOK", "RANDOM_VQ16", "RASTER_TWIN", "REFERENCE_ANCHORS",
           "RunSpec", "SPEEDUP_COLUMNS", "backbone", "child_env", "dominated_by", "environment", "measure", "metrics", "plan",
           "random_vq", "reference_comparison", "run_isolated", "run_profile", "speedups", "summary", "twin_of",
           "write_outputs"]
