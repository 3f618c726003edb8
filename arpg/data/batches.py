"""Index batches over shuffled epochs: the one batch sampler of every training loop.

Each epoch is a permutation of the n items, cut into consecutive `batch_size` slices; with
`drop_last` its ragged tail is skipped (every batch full), else the last batch is shorter.
Where the permutations come from is the caller's: the generator trainings derive one seeded
generator per epoch (so any step's batch is known without replaying the run: `seek`), the
tokenizer and the classifier draw each epoch from their one running generator.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from arpg.errors import DataError


class EpochBatches:
    """`next()` gives the indices [B] of the next batch; `permutation(epoch)` gives epoch's order [n],
    asked for when the epoch's first batch is taken (so draws stay in step order)."""

    def __init__(self, n: int, batch_size: int, permutation: Callable[[int], torch.Tensor], *,
                 drop_last: bool, key: str, items: str):
        if drop_last and n < batch_size:
            raise DataError(f"{n} {items} cannot fill one batch of {key}={batch_size}; "
                            f"lower {key} or use more data")
        self.n, self.batch_size, self.permutation, self.drop_last = n, batch_size, permutation, drop_last
        self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self.epoch, self.perm, self.cursor = -1, None, 0  # nothing drawn yet

    def next(self) -> torch.Tensor:
        left = self.n - self.cursor
        if self.perm is None or left < (self.batch_size if self.drop_last else 1):
            self.epoch += 1
            self.perm, self.cursor = self.permutation(self.epoch), 0
        idx_B = self.perm[self.cursor:self.cursor + self.batch_size]
        self.cursor += len(idx_B)
        return idx_B

    def seek(self, step: int) -> None:
        """Make `next()` return step `step`'s batch (for permutations that are a function of the epoch)."""
        self.epoch, k = divmod(step, self.steps_per_epoch)
        self.perm, self.cursor = self.permutation(self.epoch), k * self.batch_size

    def state_dict(self) -> dict:
        return {"perm": self.perm, "cursor": self.cursor}

    def load_state_dict(self, state: Mapping) -> None:
        self.perm, self.cursor = state["perm"], int(state["cursor"])
