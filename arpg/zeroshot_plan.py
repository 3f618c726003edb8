"""The cells `arpg zero-shot --task T` measures, from params (no torch: arpg/stages.py plans the jobs with
them, one per task of `zeroshot.tasks`, so the tasks run side by side).

Cells: inpainting and outpainting at each known fraction and mask of `zeroshot:`, by the zero-shot
decoder at each of `zeroshot.steps`; the completion of the lower part from the top rows
(`continuation`) by it and by every raster-order decoder (one token per step, from the same known
tokens); resolution expansion (gallery.expand_to, gallery.expansion) at each step count.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from arpg.decoders import DECODERS, zero_shot_decoder
from arpg.errors import ArpgError

CONTINUATION = "continuation"  # the lower part completed from the top rows (the raster order's prefix)
EXPANSION = "resolution-expansion"
TASKS = ("inpainting", "outpainting", CONTINUATION, EXPANSION)  # of the gallery and the measured stage


@dataclass(frozen=True)
class Cell:
    """One measured edit: task, mask, known fraction, decoder and steps (None: one token per step)."""

    task: str
    mask: str
    fraction: float
    model: str
    steps: int | None

    @property
    def key(self) -> str:
        """`inpainting-centre-50-arpg-s8`: the cell's name in the JSON, the CSV and MLflow."""
        steps = f"s{self.steps}" if self.steps is not None else "seq"
        return f"{self.task}-{self.mask}-{round(100 * self.fraction)}-{self.model}-{steps}"

    @property
    def mask_key(self) -> int:
        """Seeds the cell's masks: the same masks for every decoder and step count (paired cells)."""
        return zlib.crc32(f"{self.task}-{self.mask}-{self.fraction}".encode())


def raster_decoders() -> list[str]:
    """Sequential decoders whose order allows completing from the top rows (the raster prefix)."""
    return [d.name for d in DECODERS.values() if not d.parallel and d.native_order == "raster"]


def cells(params, task: str) -> list[Cell]:
    """The cells of one task (one `zero_shot` job; its params reads are the job's keys), in table order."""
    from arpg.config import token_grid

    zs, zero_shot = params["zeroshot"], zero_shot_decoder()
    if zero_shot is None:
        raise ArpgError("no registered decoder edits zero-shot (arpg/decoders.py); drop the zero-shot stage")
    if task not in TASKS:
        raise ArpgError(f"unknown zero-shot task {task!r}; use one of {', '.join(TASKS)} (zeroshot.tasks)")
    steps = list(zs["steps"])
    if task == EXPANSION:  # one known token per training-grid cell (either expansion method)
        share = (token_grid(params) / params["gallery"]["expand_to"]) ** 2
        return [Cell(task, params["gallery"]["expansion"], share, zero_shot.name, s) for s in steps]
    out: list[Cell] = []
    for fraction in zs["fractions"]:
        for mask in zs["masks"]:
            if task == CONTINUATION:
                if mask != "top-rows":
                    continue
                out += [Cell(task, mask, fraction, zero_shot.name, s) for s in steps]
                out += [Cell(task, mask, fraction, name, None) for name in raster_decoders()]
            elif mask != "top-rows":  # top rows known: the continuation task
                out += [Cell(task, mask, fraction, zero_shot.name, s) for s in steps]
    if not out:
        raise ArpgError(f"zeroshot: the masks give task {task} no cell (continuation needs the top-rows mask, "
                        "inpainting / outpainting centre or random-block); widen zeroshot.masks")
    return out


def cell_models(params, task: str) -> list[str]:
    """The decoders whose checkpoints one task's job loads."""
    return list(dict.fromkeys(c.model for c in cells(params, task)))


def all_cells(params) -> list[Cell]:
    """Every task's cells, in `zeroshot.tasks` order (the report's table)."""
    return [c for task in params["zeroshot"]["tasks"] for c in cells(params, task)]
