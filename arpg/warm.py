"""A warm `arpg`: a job starts by fork from a process that has already imported torch and MLflow.

Importing torch, MLflow and the stages' modules costs every `arpg` command about 5 CPU-seconds on
a 2-core EPYC, most of a sweep point's job. Snakemake therefore starts one server per workflow
(`python -m arpg.warm SOCKET`, see `start` / `stop`) that imports them once and never runs a torch
op (a process that has run OpenMP work cannot fork safely). `arpg` (the console script) hands
the server its arguments, environment, working directory and standard streams (fds 0-3, passed
over the Unix socket); the server forks a child that runs `arpg.cli.main` exactly as the process
itself would, and the client exits with the child's status. A signal to the client reaches the
child (SIGTERM, SIGINT), and a client that disappears takes its child with it.

Where no server answers (`dvc repro`, a cluster node, a direct call), under torchrun, or where
the environment differs in a variable read when a library loads (OMP_*, MKL_*, ...), `arpg` runs
in its own process: the same code on the same inputs, so the same bytes.

This module is the client, the wire format and the server's lifecycle; the server is
arpg/warm_server.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "ARPG_WARM_SOCKET"
# Where the client writes its forked child's CPU time and peak memory (Snakemake measures the
# client's own process tree, which the child is not in): {"cpu_time": s, "max_rss": MB}.
USAGE_ENV = "ARPG_JOB_USAGE"
DISABLE_ENV = "ARPG_WARM"  # "0": the workflow starts no server
# Variables a library reads once, when it loads (OpenMP, BLAS, the allocator, Python itself), and
# torchrun's: a job whose values differ from the server's runs in its own process.
LOAD_TIME_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "DNNL_", "ONEDNN_", "LD_", "MALLOC_",
                      "PYTHON", "CUDA_", "NCCL_", "TORCH_", "PYTORCH_", "LANG", "LC_", "MLFLOW_", "DO_NOT_TRACK")
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")
STREAMS = (0, 1, 2, 3)  # stdin, stdout, stderr and the progress fd (arpg.progress)
HEADER = struct.Struct("!I")
RESULT = struct.Struct("!idd")  # exit status, CPU seconds, peak RSS in MB


def load_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(LOAD_TIME_PREFIXES)}


def send(sock: socket.socket, doc: dict, fds: list[int] = ()) -> None:
    body = json.dumps(doc).encode()
    socket.send_fds(sock, [HEADER.pack(len(body)) + body], list(fds))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


# --------------------------------------------------------------------------------------------- client

CLI_ENTRY = "arpg.cli:run_command"


def delegate(argv: list[str], path: str | None = None, entry: str = CLI_ENTRY) -> int | None:
    """Run `entry(argv)` (default: the `arpg` command) in a fork of the server at `path` (default:
    $ARPG_WARM_SOCKET); None when there is no usable server (run it here)."""
    path = path or os.environ.get(SOCKET_ENV)
    if not path or any(v in os.environ for v in TORCHRUN_VARS):
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    fds = [fd for fd in STREAMS if is_open(fd)]
    with sock:
        try:
            umask = os.umask(0)
            os.umask(umask)
            send(sock, {"argv": argv, "entry": entry, "env": dict(os.environ), "cwd": os.getcwd(), "fds": fds,
                         "umask": umask}, fds)
            answer = sock.recv(1)
        except OSError:
            return None
        if answer != b"+":  # the server declined (other load-time environment): run here
            return None

        def forward(signum, frame):
            try:
                sock.sendall(b"T" if signum == signal.SIGTERM else b"I")
            except OSError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, forward)
        try:
            code, cpu_time, max_rss = RESULT.unpack(recv_exact(sock, RESULT.size))
        except (OSError, ConnectionError):
            print("arpg: the warm server went away while running the command; rerun it", file=sys.stderr)
            return 1
        try:
            _write_usage({"cpu_time": cpu_time, "max_rss": max_rss})
        except OSError as exc:  # the job's own status matters more than its stage-time record
            print(f"arpg: could not write the job's usage to ${USAGE_ENV}: {exc}", file=sys.stderr)
        return code


def _write_usage(usage: dict | None) -> None:
    """The job's usage for the report's stage times; None removes an earlier job's."""
    path = os.environ.get(USAGE_ENV)
    if not path:
        return
    if usage is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(usage, fh)
    os.replace(tmp, path)


def record_own_usage() -> None:
    """For a job that runs processes of its own (the profile's configurations, each a few seconds):
    its CPU time with all of theirs, from the kernel's accounting of the waited-for descendants.
    Snakemake's benchmark samples the process tree now and then and misses such short-lived
    processes' CPU; its memory figure (the tree's resident sum when sampled) stays, since the
    kernel keeps no peak of processes that ran side by side. Call it after every such process
    has ended and been waited for."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    _write_usage({"cpu_time": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime})


def clear_usage() -> None:
    """A job run in its own process: Snakemake's benchmark file has it all."""
    _write_usage(None)


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# What a server of the workflow imports: every arpg module, and the libraries they import lazily.
CLI_PRELOAD = ("torch", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "arpg")


# --------------------------------------------------------------------------------------------- lifecycle

# What Snakemake sets in a job's environment for its thread count (snakemake/shell.py).
THREAD_VARS = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def start(folder: str, threads: int) -> tuple[object, str]:
    """Start a server for this workflow process; returns (process, socket path). Its jobs find it
    through $ARPG_WARM_SOCKET, which this sets. It serves the jobs declaring `threads` (their
    environment then matches its own: the BLAS and OpenMP libraries size themselves when they load)."""
    path = os.path.join(folder, "arpg-warm.sock")
    proc = spawn(path, dict(os.environ, **{var: str(threads) for var in THREAD_VARS}))
    os.environ[SOCKET_ENV] = path
    return proc, path


def spawn(path: str, env: dict, modules: tuple[str, ...] = CLI_PRELOAD):
    """Start a server on `path` with environment `env`, ending with this process at the latest."""
    import subprocess

    return subprocess.Popen([sys.executable, "-m", "arpg.warm", "serve", path, str(os.getpid()), ",".join(modules)],
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env)


def stop(proc) -> None:
    import shutil

    path = os.environ.pop(SOCKET_ENV, None)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            proc.kill()
    if path:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


@contextlib.contextmanager
def serving(env: dict, modules: tuple[str, ...]):
    """A server with environment `env` for the duration of the block; yields its socket path."""
    import tempfile
    import time

    with tempfile.TemporaryDirectory(prefix="arpg-warm-") as folder:
        path = os.path.join(folder, "s.sock")
        proc = spawn(path, env, modules)
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # bound before it imports: clients wait in its backlog from then on
        try:
            yield path
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait()


def _main(argv: list[str]) -> int:
    """`serve PATH PARENT_PID MODULES` (a server; PARENT_PID 0: no parent to outlive), or `run PATH ENTRY ARGS...` (a client: ENTRY's
    module must be among the server's; with no server at PATH, ENTRY runs in this process)."""
    if argv[:1] == ["serve"]:
        from arpg.warm_server import serve

        serve(argv[1], int(argv[2]) or None, tuple(argv[3].split(",")))
        return 0
    if argv[:1] == ["run"]:
        path, entry, args = argv[1], argv[2], argv[3:]
        code = delegate(args, path, entry)
        if code is None:
            import importlib

            module, function = entry.split(":")
            code = getattr(importlib.import_module(module), function)(args)
        return int(code or 0)
    print("usage: python -m arpg.warm serve PATH PARENT_PID MODULES | run PATH ENTRY ARGS...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
