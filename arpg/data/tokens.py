"""The generators' training data: token grids (written by `arpg tokenize`) as raster sequences."""

from __future__ import annotations

import numpy as np
import torch

from arpg.errors import DataError


class TokenData:
    """Token grids (memory-mapped or in memory) flattened to raster sequences, plus labels."""

    def __init__(self, grids: list[np.ndarray], labels: list[np.ndarray], *, grid_size: int,
                 codebook_size: int, num_classes: int, names: list[str] | None = None):
        names = names or [f"part {i}" for i in range(len(grids))]
        for grid, lab, name in zip(grids, labels, names):
            if grid.ndim != 3 or grid.shape[1:] != (grid_size, grid_size):
                raise DataError(f"{name} token grids have shape {tuple(grid.shape)}, expected [N, {grid_size}, "
                                f"{grid_size}] (data.resolution / tokenizer downsampling); re-run `arpg tokenize`")
            if len(lab) != len(grid):
                raise DataError(f"{name}: {len(grid)} token grids but {len(lab)} labels; re-run `arpg tokenize`")
            if len(grid) and (int(grid.min()) < 0 or int(grid.max()) >= codebook_size):
                raise DataError(f"{name} tokens span [{int(grid.min())}, {int(grid.max())}], outside the codebook "
                                f"[0, {codebook_size}); the tokens were made by a different tokenizer: re-run "
                                "`arpg tokenize` or fix tokenizer.codebook_size")
            if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= num_classes):
                raise DataError(f"{name} labels span [{int(lab.min())}, {int(lab.max())}], outside "
                                f"[0, {num_classes}); fix data.num_classes")
        self.grids = grids
        self.labels = [np.asarray(lab, dtype=np.int64) for lab in labels]
        self.offsets = np.cumsum([0] + [len(g) for g in grids])
        self.seq_len = grid_size * grid_size

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, idx_B: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens_BN (int64, raster order), labels_B (int64) of the given global indices."""
        tokens_BN = np.empty((len(idx_B), self.seq_len), dtype=np.int64)
        labels_B = np.empty(len(idx_B), dtype=np.int64)
        part_B = np.searchsorted(self.offsets, idx_B, side="right") - 1
        for part, (grid, lab) in enumerate(zip(self.grids, self.labels)):
            sel = np.nonzero(part_B == part)[0]
            if len(sel):
                local = idx_B[sel] - self.offsets[part]
                tokens_BN[sel] = np.asarray(grid[local]).reshape(len(sel), -1)
                labels_B[sel] = lab[local]
        return torch.from_numpy(tokens_BN), torch.from_numpy(labels_B)
