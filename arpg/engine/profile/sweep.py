"""The parent of `arpg profile`: each configuration in its own child process, skips, the sweep.

A configuration is skipped when it cannot finish within `profile.max_seconds`: a cheaper one
already did not, or its first call ran over and was stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from arpg.engine.profile.child import base_row, measure
from arpg.engine.profile.planning import RunSpec, dominated_by
from arpg.engine.profile.results import attach_end_to_end
from arpg.errors import ArpgError
from arpg.paths import REPO_ROOT

CHILD_ENTRY = "arpg.engine.profile.child:main"
# What the configurations' warm server imports: torch and every arpg module (the models, the sampler).
CHILD_PRELOAD = ("torch", "arpg")
# Time allowed for a child to import torch and build its model before its first call.
LOAD_TIMEOUT_S = 900.0


def child_env(spec: RunSpec) -> dict:
    """The environment of a configuration's process."""
    from arpg.pipeline import python_path_with

    # Spinning OpenMP workers stall whenever another process holds a core (40x slower small matmuls
    # measured on a busy 2-core machine); passive waiting keeps shared-machine timings meaningful.
    # The child runs in this working directory (relative checkpoint paths) with this arpg package.
    from arpg import warm

    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads),
               OMP_WAIT_POLICY=spec.omp_wait_policy.upper(), PYTHONPATH=python_path_with(str(REPO_ROOT)))
    for var in (warm.USAGE_ENV, warm.SOCKET_ENV):  # the stage's own: Snakemake's benchmark measures these
        env.pop(var, None)                         # processes as part of the profile job
    return env


def run_isolated(spec: RunSpec, poll_s: float = 0.05, server: str | None = None) -> dict:
    """Measure `spec` in a process of its own (a fork of the warm `server` when given, which has
    imported torch and arpg already); stop it if its first call runs past max_seconds."""
    with tempfile.TemporaryDirectory(prefix="arpg-profile-") as tmp:
        tmp = Path(tmp)
        (tmp / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
        env = child_env(spec)
        args = ["--one", str(tmp / "spec.json"), "--out", str(tmp / "row.json"), "--markers", str(tmp)]
        cmd = ([sys.executable, "-m", "arpg.warm", "run", server, CHILD_ENTRY, *args] if server
               else [sys.executable, "-m", "arpg.engine.profile", *args])
        with open(tmp / "stderr.txt", "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
            started = time.monotonic()
            reason = None
            try:
                while proc.poll() is None and reason is None:
                    time.sleep(poll_s)
                    loaded = tmp / "loaded"
                    if not loaded.exists():
                        if time.monotonic() - started > LOAD_TIMEOUT_S:
                            reason = f"model not built within {LOAD_TIMEOUT_S:g} s"
                    elif not (tmp / "first").exists() and time.time() - float(loaded.read_text()) > spec.max_seconds:
                        reason = (f"first call still running after profile.max_seconds {spec.max_seconds:g} s "
                                  "(stopped)")
            finally:  # also on Ctrl-C: never leave the child running
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if reason:
            row = base_row(spec)
            row.update(status="skipped", skip_reason=reason, device=spec.device)
            return row
        if proc.returncode != 0 or not (tmp / "row.json").exists():
            tail = (tmp / "stderr.txt").read_text()[-3000:]
            marker = "ArpgError:"
            message = tail.rsplit(marker, 1)[-1].strip() if marker in tail else tail
            raise ArpgError(f"profiling {spec.label()} failed in its child process "
                            f"(exit {proc.returncode}):\n{message}")
        return json.loads((tmp / "row.json").read_text())


def run_profile(specs: list[RunSpec], *, isolate: bool = True,
                log: Callable[[str], None] = print) -> list[dict]:
    """Measure every spec (skipping those a skipped cheaper one rules out); rows in spec order.
    VQ decoding is timed in the first measured configuration of each decode group and added to
    every row of the group (end to end). Isolated, each configuration runs in a fork of a warm
    server (one per child environment), so none pays for importing torch."""
    from arpg import warm

    rows: list[dict] = []
    skipped: list[RunSpec] = []
    servers: dict[tuple, str] = {}
    decoded: set[tuple] = set()  # decode groups whose VQ decoding is timed already
    with contextlib.ExitStack() as stack:
        for spec in specs:
            if spec.tokenizer is not None and spec.decode_group() not in decoded:
                spec = dataclasses.replace(spec, time_decode=True)
            cheaper = dominated_by(spec, skipped)
            lacking = _precision_unavailable(spec)
            if lacking or cheaper is not None:
                row = base_row(spec)
                row.update(status="skipped", device=spec.device,
                           skip_reason=lacking or f"cheaper configuration ({cheaper.label()}) exceeded "
                                                  "profile.max_seconds")
            elif isolate:
                env = child_env(spec)
                key = tuple(sorted(warm.load_time_env(env).items()))
                if key not in servers:
                    servers[key] = stack.enter_context(warm.serving(env, CHILD_PRELOAD))
                row = run_isolated(spec, server=servers[key])
            else:
                row = measure(spec)
            if row["status"] == "skipped":
                skipped.append(spec)
                log(f"  {spec.label()}: skipped ({row['skip_reason']})")
            else:
                log(f"  {spec.label()}: {row['gen_img_s_median']:.4g} img/s "
                    f"({row['gen_s_median']:.3g} s/call, min {row['gen_s_min']:.3g}, max {row['gen_s_max']:.3g}), "
                    f"gen mem {row['gen_mem_bytes'] / 2**20:.1f} MiB, kv {row['kv_cache_bytes'] / 2**20:.1f} MiB")
            rows.append(row)
            if "decode_s_median" in row:
                decoded.add(spec.decode_group())
    attach_end_to_end(rows, [s.decode_group() for s in specs])
    return rows


def _precision_unavailable(spec: RunSpec) -> str:
    """Why spec.precision cannot be measured on this machine ('' if it can): bf16 on a CPU that
    would only emulate it."""
    from arpg.models.cpu_kernels import bf16_hardware
    from arpg.utils import resolve_device

    if spec.precision != "bf16" or resolve_device(spec.device).type != "cpu" or bf16_hardware():
        return ""
    return "bf16: this CPU has no AVX512-BF16 or AMX-BF16 (oneDNN would emulate it, slower than fp32)"
