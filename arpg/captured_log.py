"""What a stage's MLflow run gets besides its metrics: its log and the machine's system metrics.

The log is the file the stage's stdout is redirected to (as Snakemake and SLURM do), or where stdout
is a terminal or a pipe (`dvc repro`) a copy of what the stage printed.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from arpg.mlflow_store import StageRun

# $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false turns the per-run CPU / memory / disk sampler off.
SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"


def _stdout_file() -> Path | None:
    """The regular file this process's stdout goes to (Snakemake's `> {log} 2>&1`, SLURM's output
    file), else None (a terminal, a pipe: DVC)."""
    try:
        if not stat.S_ISREG(os.fstat(1).st_mode):
            return None
        path = Path(os.readlink("/proc/self/fd/1"))
    except (OSError, ValueError):
        return None
    return path if path.is_file() else None


class _LineCopy:
    """`stream` as it was, plus each finished line in `copy`; of a line that a progress bar redrew
    with carriage returns, only its last state (so the copy reads like a log file)."""

    def __init__(self, stream, copy):
        self.stream, self.copy, self._line = stream, copy, ""

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        *done, self._line = (self._line + text).split("\n")
        for line in done:
            self.copy.write(next((part for part in reversed(line.split("\r")) if part.strip()), "") + "\n")
        return written

    def flush(self) -> None:
        self.stream.flush()
        self.copy.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding...: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def stage_log(name: str) -> Iterator[tuple[Path, bool]]:
    """(the log to attach, whether it is a copy): the file stdout is redirected to, or where stdout
    is no file (a terminal; DVC's pipe) a copy of what the stage prints through sys.stdout /
    sys.stderr meanwhile, in a temporary `<name>.log`."""
    log = _stdout_file()
    if log is not None:
        yield log, False
        return
    with tempfile.TemporaryDirectory(prefix="arpg-log-") as folder:
        path = Path(folder) / f"{name}.log"
        with open(path, "w") as copy:
            saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _LineCopy(saved[0], copy), _LineCopy(saved[1], copy)
            try:
                yield path, True
            finally:
                sys.stdout, sys.stderr = saved


def attach_log(handle: StageRun, log: Path, copied: bool) -> None:
    """The stage's log file, or the copy of its output, as the run's `logs/` artifact."""
    rest = "the rest went to the terminal only" if copied else f"the rest is in {log}"
    # the attached copy ends here; what the command prints after its run closed is not in it
    print(f"[arpg] log attached to MLflow run {handle.run_id} up to this line; {rest}", flush=True)
    sys.stderr.flush()
    if not copied:
        handle.set_tags({"arpg.log": str(log)})
    handle.log_artifact(log, "logs")


def system_metrics(run_id: str, uri: str):
    """MLflow's CPU / memory / disk sampler for the run (a thread, every 10 s), or None: off by
    $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false, or psutil missing. Its writes do not retry: under
    a locked SQLite store it warns and stops sampling; the run is unaffected."""
    if os.environ.get(SYSTEM_METRICS_ENV, "true").strip().lower() in ("false", "0", "no", "off"):
        return None
    try:
        import psutil  # noqa: F401 - the sampler's dependency
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - system metrics are a nicety; the stage runs without them
        print(f"[arpg] no system metrics for run {run_id}: {exc}", file=sys.stderr)
        return None
