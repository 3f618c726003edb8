"""How far a long loop is: a bar on a terminal, plain periodic lines in a log file.

Under Snakemake a job's stdout and stderr go to its log file, where a progress bar would be one
long line of carriage returns. Off a terminal, each `report()` (every log_every steps) prints one
line instead:

    train arpg: step 850/1700 (50%) | loss 2.9100 lr 1.00e-03 | 3.1 step/s, 4m35s elapsed, ETA 4m35s

The same line also goes to the file descriptor named by $ARPG_PROGRESS_FD when that is open: the
Snakemake rules point it at Snakemake's own console, so the console shows which long job is running
and how far it is while its full output stays in the log. Rates and ETAs are wall-clock readings for
the reader; nothing here enters a result.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

PROGRESS_FD_ENV = "ARPG_PROGRESS_FD"


def duration(seconds: float) -> str:
    """'42s', '4m35s', '1h02m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _console() -> IO[str] | None:
    """The console stream from $ARPG_PROGRESS_FD, or None (unset, or not an open descriptor here)."""
    fd = os.environ.get(PROGRESS_FD_ENV, "")
    # torchrun starts its ranks with close_fds: there the number names some other descriptor of the
    # process (a rendezvous pipe), so ranks never write to it
    if not fd.isdigit() or "LOCAL_RANK" in os.environ:
        return None
    try:
        return os.fdopen(os.dup(int(fd)), "w", buffering=1)
    except OSError:
        return None


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e6) else f"{v:.4g}"
    return str(v)


class Progress:
    """Progress of `total` steps, starting at `initial` (a resumed run)."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, unit: str = "step", enabled: bool = True,
                 out: IO[str] | None = None, started: float | None = None):
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.enabled = enabled
        self.out = out if out is not None else sys.stderr
        # `started`: time.monotonic() when the loop began, if that was before this object
        self._start_n, self._start_t = self.n, time.monotonic() if started is None else started
        self._console = _console() if enabled else None
        self._bar = None
        if enabled and self.out.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=True,
                             file=self.out)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)

    def line(self, **stats: Any) -> str:
        """The plain progress line at the current step."""
        elapsed = time.monotonic() - self._start_t
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
        if stats:
            parts.append(" ".join(f"{k} {_value(v)}" for k, v in stats.items()))
        timing = f"{rate:.3g} {self.unit}/s, {duration(elapsed)} elapsed"
        if 0 < self.n < self.total and rate > 0:
            timing += f", ETA {duration((self.total - self.n) / rate)}"
        parts.append(timing)
        return " | ".join(parts)

    def report(self, **stats: Any) -> None:
        """Show `stats` (loss, lr, ...): the bar's postfix on a terminal, else one line."""
        if not self.enabled:
            return
        line = self.line(**stats)
        if self._bar is not None:
            self._bar.set_postfix({k: _value(v) for k, v in stats.items()})
        else:
            print(line, file=self.out, flush=True)
        if self._console is not None:
            print(line, file=self._console, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._console is not None:
            self._console.close()
            self._console = None


def batch_progress(desc: str, *, enabled: bool = True, out: IO[str] | None = None):
    """A `progress(done, todo)` callback for loops that tell their length as they go (sampling batches)."""
    bars: list[Progress] = []
    started = time.monotonic()  # the loop starts now; its length comes with the first batch

    def callback(done: int, todo: int) -> None:
        if not bars:
            bars.append(Progress(todo, desc, unit="batch", enabled=enabled, out=out, started=started))
        bar = bars[0]
        bar.update(done - bar.n)
        bar.report()
        if done >= todo:
            bar.close()

    return callback
