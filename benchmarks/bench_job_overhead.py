"""Per-job fixed cost of the small stages: a fresh process against a fork of the warm server.

    .venv/bin/python benchmarks/bench_job_overhead.py                  # the smoke study's outputs
    .venv/bin/python benchmarks/bench_job_overhead.py --params params.yaml --repeats 5

A job's fixed cost is what it spends besides its work: starting the process, importing what its
command imports (every import in arpg/commands/<stage>.py), loading the params, loading the study's
generator and tokenizer (stages that decode) and opening and closing its MLflow run. This runs
exactly that, with no work, for each stage, either in a fresh process (as `arpg` runs without a
server, e.g. under `dvc repro`) or in a fork of the server Snakemake starts (arpg/warm.py), and
prints the wall time from launching the command to its exit (median of --repeats) with the CPU
model and load. The study of --params must have run (its checkpoints are loaded); MLflow runs go
to a scratch store. Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("sample", "evaluate", "zero-shot", "gallery")
DECODING = ("sample", "zero-shot", "gallery")  # stages that load a generator and the tokenizer


def stage_imports(stage: str) -> list[str]:
    """The modules arpg/commands/<stage>.py imports, at the top and inside its functions."""
    import arpg

    source = Path(arpg.__file__).parent / "commands" / f"{stage.replace('-', '_')}.py"
    names = [f"arpg.commands.{stage.replace('-', '_')}"]
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return list(dict.fromkeys(names))


def child(argv: list[str]) -> int:
    """One job's fixed cost, no work: imports, params, models, an MLflow run opened and closed."""
    stage, params_file, store = argv
    for name in stage_imports(stage):
        importlib.import_module(name)
    import torch

    from arpg.config import load_params, stage_threads
    from arpg.decoders import DECODERS
    from arpg.models.checkpoint import load_study_models
    from arpg.tracking import stage_run
    from arpg.utils import set_threads

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    params = load_params(params_file)
    set_threads(stage_threads(params, stage))
    if stage in DECODING:
        load_study_models(params, next(iter(DECODERS)), torch.device("cpu"))
    with stage_run(params, stage, f"bench-{stage}", {"bench": 1}):
        pass
    return 0


def time_job(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="configs/smoke.yaml", help="a params file whose study has run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from arpg import warm
    from arpg.config import load_params, stage_threads
    from arpg.machine import cpu_name

    params_file = str(Path(args.params).resolve())
    threads = stage_threads(load_params(params_file), "sample")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               **{var: str(threads) for var in warm.THREAD_VARS})
    print(f"CPU {cpu_name()}, {os.cpu_count()} logical cores, 1-min load {os.getloadavg()[0]:.2f} at start, "
          f"{threads} thread(s) per job, median of {args.repeats}")
    print(f"{'stage':<10} {'fresh process s':>16} {'warm fork s':>12}")
    with tempfile.TemporaryDirectory() as tmp, warm.serving(env, warm.CLI_PRELOAD) as server:
        store = str(Path(tmp) / "mlflow.db")
        entry = "bench_job_overhead:child"
        time_job([sys.executable, "-m", "arpg.warm", "run", server, entry, "sample", params_file, store], env)
        for stage in STAGES:
            job = [stage, params_file, store]
            cold = [time_job([sys.executable, str(Path(__file__).resolve()), "--child", *job], env)
                    for _ in range(args.repeats)]
            hot = [time_job([sys.executable, "-m", "arpg.warm", "run", server, entry, *job], env)
                   for _ in range(args.repeats)]
            print(f"{stage:<10} {statistics.median(cold):>16.2f} {statistics.median(hot):>12.2f}")
    print(f"1-min load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        raise SystemExit(child(sys.argv[2:]))
    main()
