"""What a quiet machine is, for the profile: how much a measuring process was kept from the CPU
(`Contention`, read in the child), and when the parent calls the machine busy and stops (`Quiet`,
`check_quiet`, `check_spread`); the speed-ups' distribution-free interval (`median_interval`)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from arpg.errors import ArpgError


class Contention:
    """How much of a timed window this process was kept from the CPU: its threads' run-queue wait
    (/proc/self/task/*/schedstat: CPU ns, wait ns) against their CPU time, and its CPU share of the
    window's wall time over the threads it uses. A quiet machine waits ~0; every process beside it
    that wants a core shows up at once (the 1-minute load average lags by a minute)."""

    def __init__(self, threads: int):
        self.threads, self.cpu_ns, self.wait_ns, self.wall_s = threads, 0, 0, 0.0
        self.available = Path("/proc/self/task").is_dir()

    @staticmethod
    def _sched() -> tuple[int, int]:
        cpu = wait = 0
        for task in Path("/proc/self/task").iterdir():
            try:
                fields = (task / "schedstat").read_text().split()
            except OSError:  # a thread that ended meanwhile
                continue
            cpu, wait = cpu + int(fields[0]), wait + int(fields[1])
        return cpu, wait

    def window(self) -> Callable[[], None]:
        """start(); the returned stop() adds the window to the totals."""
        if not self.available:
            return lambda: None
        begin_s, (cpu0, wait0) = time.perf_counter(), self._sched()

        def stop() -> None:
            cpu1, wait1 = self._sched()
            self.cpu_ns += cpu1 - cpu0
            self.wait_ns += wait1 - wait0
            self.wall_s += time.perf_counter() - begin_s
        return stop

    def record(self) -> dict:
        """wait_share: run-queue wait / (wait + CPU); cpu_share: CPU / (wall * threads); None: unknown."""
        if not self.available or self.cpu_ns + self.wait_ns == 0:
            return {"wait_share": None, "cpu_share": None}
        return {"wait_share": self.wait_ns / (self.wait_ns + self.cpu_ns),
                "cpu_share": self.cpu_ns / 1e9 / (self.wall_s * self.threads)}


@dataclass(frozen=True)
class Quiet:
    """What a measurement may show before the profile calls the machine busy and stops (None: not
    checked; the report then says its timings are unchecked)."""

    max_wait_share: float | None    # run-queue wait / (wait + CPU) of the measuring process
    max_ratio_spread: float | None  # max / min of a speed-up's per-round ratios

    @classmethod
    def from_params(cls, params) -> "Quiet":
        prof = params["profile"]
        return cls(prof["max_wait_share"], prof["max_ratio_spread"])

    @property
    def checked(self) -> bool:
        return self.max_wait_share is not None or self.max_ratio_spread is not None


def busy(what: str, detail: str, load: float | None) -> ArpgError:
    load_text = f"; 1-minute load average {load:.2f} on {os.cpu_count()} cores" if load is not None else ""
    return ArpgError(f"profile: the machine was busy while timing {what}: {detail}{load_text}. Other processes "
                     "shared its cores, so these timings are not results. Stop them (`uptime`, `top`) and rerun "
                     "`arpg profile` (or the study, which reruns only the profile).")


def check_quiet(row: dict, quiet: Quiet, what: str) -> None:
    """Stop when a measurement (a configuration's row or a group's rounds) shows contention."""
    share = row.get("wait_share")
    if quiet.max_wait_share is not None and share is not None and share > quiet.max_wait_share:
        raise busy(what, f"its threads waited for a CPU {share:.0%} of the time they were ready to run "
                         f"(profile.max_wait_share {quiet.max_wait_share:.0%})", row.get("load_avg_1m"))


def check_spread(gains: list[dict], quiet: Quiet) -> None:
    for g in gains:
        spread_ = g["speedup_spread"]
        if quiet.max_ratio_spread is not None and spread_ > quiet.max_ratio_spread:
            raise busy(f"{g['model']} batch {g['batch']} {g['steps']} steps",
                       f"its per-round speed-ups range over a factor {spread_:.2f} (profile.max_ratio_spread "
                       f"{quiet.max_ratio_spread:g})", g.get("load_avg_1m"))


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(lo, hi, coverage): the distribution-free interval of a median from order statistics, the
    narrowest [x(k), x(n+1-k)] whose coverage 1 - 2 P(Binomial(n, 1/2) < k) reaches `level`
    (n = 6: [min, max], 96.9%); below that n, [min, max] and its smaller coverage."""
    x = sorted(values)
    n = len(x)

    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, j) for j in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def share_text(value: float | None) -> str:
    return "?" if value is None else f"{value:.1%}"
