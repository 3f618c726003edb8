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
                      "PYTHON", "CUDA_", "NCCL_", "TORCH_", "PYTORCH_")
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")
_STREAMS = (0, 1, 2, 3)  # stdin, stdout, stderr and the progress fd (arpg.progress)
_HEADER = struct.Struct("!I")
_RESULT = struct.Struct("!idd")  # exit status, CPU seconds, peak RSS in MB


def load_time_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(LOAD_TIME_PREFIXES)}


def _send(sock: socket.socket, doc: dict, fds: list[int] = ()) -> None:
    body = json.dumps(doc).encode()
    socket.send_fds(sock, [_HEADER.pack(len(body)) + body], list(fds))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
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
    fds = [fd for fd in _STREAMS if _is_open(fd)]
    with sock:
        try:
            _send(sock, {"argv": argv, "entry": entry, "env": dict(os.environ), "cwd": os.getcwd(), "fds": fds}, fds)
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
            code, cpu_time, max_rss = _RESULT.unpack(_recv_exact(sock, _RESULT.size))
        except (OSError, ConnectionError):
            print("arpg: the warm server went away while running the command; rerun it", file=sys.stderr)
            return 1
        _write_usage({"cpu_time": cpu_time, "max_rss": max_rss})
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


def clear_usage() -> None:
    """A job run in its own process: Snakemake's benchmark file has it all."""
    _write_usage(None)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- server

# What a server of the workflow imports: every arpg module, and the libraries they import lazily.
CLI_PRELOAD = ("torch", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "arpg")


def preload(modules: tuple[str, ...] = CLI_PRELOAD) -> None:
    """Import `modules` ("arpg": every arpg module). Never run a torch op here: the children inherit
    this process, and OpenMP's workers do not survive a fork."""
    import importlib
    import pkgutil

    for name in modules:
        module = importlib.import_module(name)
        if name == "arpg":
            for info in pkgutil.walk_packages(module.__path__, "arpg."):
                if not info.name.endswith("__main__"):  # a __main__ runs its command when imported
                    importlib.import_module(info.name)


def _child(doc: dict, fds: list[int], inherited: list) -> None:
    """In the forked child: become the client's process, then run the command. Never returns."""
    code = 1
    try:
        for obj in inherited:  # the server's sockets and selector
            obj.close()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in zip(doc["fds"], fds):
            os.dup2(fd, target)
            os.close(fd)
        for fd in set(_STREAMS) - set(doc["fds"]):
            try:
                os.close(fd)
            except OSError:
                pass
        os.chdir(doc["cwd"])
        os.environ.clear()
        os.environ.update(doc["env"])
        sys.argv = ["arpg", *doc["argv"]]
        sys.stdin = open(0, closefd=False) if 0 in doc["fds"] else None
        sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        import random

        random.seed()  # the retry jitter of concurrent jobs must not be one sequence

        import importlib

        module, function = doc["entry"].split(":")
        code = getattr(importlib.import_module(module), function)(doc["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a traceback, as the process itself would print
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str, parent: int | None = None, modules: tuple[str, ...] = CLI_PRELOAD) -> None:
    """Accept jobs on `path` until SIGTERM or until `parent` (the workflow) is gone."""
    import selectors

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)  # clients queue here while the imports run
    preload(modules)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # pid -> connection to its client
    by_conn: dict[socket.socket, int] = {}
    try:
        while not stopping and (parent is None or os.getppid() == parent):
            for key, _ in sel.select(timeout=0.05):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    pid = _start(conn, [listener, sel, conn, *by_conn])
                    if pid is not None:
                        children[pid], by_conn[conn] = conn, pid
                        sel.register(conn, selectors.EVENT_READ)
                else:  # a signal forwarded by a client, or a client gone: pass it to its child
                    conn = key.fileobj
                    try:
                        data = conn.recv(16)
                    except OSError:
                        data = b""
                    sig = signal.SIGINT if data.endswith(b"I") else signal.SIGTERM
                    try:
                        os.kill(by_conn[conn], sig)
                    except ProcessLookupError:
                        pass
                    if not data:
                        sel.unregister(conn)
            while children:  # reap finished children, answer their clients
                pid, status, usage = os.wait4(-1, os.WNOHANG)
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is None:
                    continue
                by_conn.pop(conn, None)
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
                try:
                    conn.sendall(_RESULT.pack(code, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024))
                except OSError:
                    pass
                conn.close()
    except ChildProcessError:
        pass
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def _start(conn: socket.socket, inherited: list) -> int | None:
    """Read a job from a new connection and fork its child; None if declined or unreadable."""
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 8)
        (size,) = _HEADER.unpack(msg[:4])
        body = msg[4:]
        if len(body) < size:
            body += _recv_exact(conn, size - len(body))
        doc = json.loads(body)
    except (OSError, ConnectionError, ValueError, struct.error):
        conn.close()
        return None
    if (load_time_env(doc["env"]) != load_time_env(dict(os.environ))
            or len(fds) != len(doc["fds"])):
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(b"-")
        except OSError:
            pass
        conn.close()
        return None
    conn.sendall(b"+")
    pid = os.fork()
    if pid == 0:
        _child(doc, fds, inherited)
    for fd in fds:
        os.close(fd)
    return pid


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
