"""The paper's claims this study can test, with its figures (ARPG, arXiv 2503.10568; ImageNet 256x256:
../shared/ARPG_SPEC.md section 4). The report's findings (arpg/engine/report/findings.py) set each
beside what this study measured.

No torch here: the report imports it.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "ARPG paper, ImageNet 256x256 (docs: ARPG_SPEC.md section 4)"


@dataclass(frozen=True)
class Claim:
    text: str        # what the paper shows, with its figures, as the finding's "paper:" clause
    ratio: float | None = None  # its headline ratio where it is one (speed-up, memory)


# ARPG-L: FID 2.44 at 32 and 2.41 at 256 steps (256 tokens): an eighth of the steps costs nothing.
FEW_STEPS = Claim("ARPG-L FID 2.44 at 32 of 256 steps, 2.41 at 256")
# ARPG-L (32 steps) against LlamaGen-L (raster), each at its own tuned guidance.
VERSUS_RASTER = Claim("ARPG-L FID 2.44 (32 steps) vs LlamaGen-L 3.07 (raster), each at its own guidance")
# Table 2, batch 64, bf16 (GPU): images/s and memory of the same pair.
SPEEDUP = Claim("ARPG-L 113.01 img/s at 32 steps vs LlamaGen-L 4.33: 26.1x (batch 64, bf16, GPU)", 113.01 / 4.33)
MEMORY = Claim("ARPG-L 2.54 GB vs LlamaGen-L 10.23 GB: 0.25x", 2.54 / 10.23)
# Section 6: retraining moves FID ~3.2x more than resampling a fixed model.
TRAINING_NOISE = Claim("retraining moves FID about 3.2x more than resampling (\"The FID Lottery\")", 3.2)
