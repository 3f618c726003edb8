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
                      "PYTHON", "CUDA_", "NCCL_", "TORCH_", "PYTORCH_", "LANG", "LC_", "MLFLOW_", "DO_NOT_TRACK")
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
            umask = os.umask(0)
            os.umask(umask)
            _send(sock, {"argv": argv, "entry": entry, "env": dict(os.environ), "cwd": os.getcwd(), "fds": fds,
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
            code, cpu_time, max_rss = _RESULT.unpack(_recv_exact(sock, _RESULT.size))
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


def _die_with_parent() -> None:
    """Linux: SIGTERM when the server dies (an orphaned job must not go on writing its outputs)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _streams() -> None:
    """New sys.stdin / stdout / stderr on fds 0-2, made as the interpreter makes them at start."""
    import io

    def text(fd: int, mode: str, like, errors: str):
        if mode == "r":
            return io.TextIOWrapper(io.FileIO(fd, "r", closefd=False), encoding=like.encoding, errors=errors)
        raw = io.FileIO(fd, "w", closefd=False)
        tty, unbuffered = os.isatty(fd), bool(os.environ.get("PYTHONUNBUFFERED"))  # the client's -u
        return io.TextIOWrapper(raw if unbuffered else io.BufferedWriter(raw), encoding=like.encoding,
                                errors=errors, line_buffering=tty or fd == 2, write_through=unbuffered)

    sys.stdin = text(0, "r", sys.__stdin__ or sys.__stdout__, "strict") if _is_open(0) else None
    sys.stdout = text(1, "w", sys.__stdout__, sys.__stdout__.errors)
    sys.stderr = text(2, "w", sys.__stderr__, "backslashreplace")


def _child(doc: dict, fds: list[int], inherited: list) -> int:
    """In the forked child: become the client's process, then run the command; its exit status."""
    code = 1
    try:
        for obj in inherited:  # the server's sockets, selector and wake-up pipe
            obj.close()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        _die_with_parent()
        for target, fd in zip(doc["fds"], fds):
            if fd != target:
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
        os.umask(doc["umask"])
        sys.argv = ["arpg", *doc["argv"]]
        _streams()
        import random
        import tempfile

        random.seed()  # the retry jitter of concurrent jobs must not be one sequence
        tempfile.tempdir = None  # found again from this job's TMPDIR

        import importlib

        module, function = doc["entry"].split(":")
        code = getattr(importlib.import_module(module), function)(doc["argv"])
        code = 0 if code is None else code
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a traceback, as the process itself would print
        import traceback

        traceback.print_exc()
        code = 1
    try:
        import atexit

        atexit._run_exitfuncs()  # what a fresh interpreter runs on its way out
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the job's status stands
        pass
    return int(code) if isinstance(code, int) else 1


def serve(path: str, parent: int | None = None, modules: tuple[str, ...] = CLI_PRELOAD) -> None:
    """Accept jobs on `path` until SIGTERM or until `parent` (the workflow) is gone."""
    import selectors

    me = os.getpid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)  # clients queue here while the imports run
    preload(modules)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    wake_r, wake_w = os.pipe()  # a finished child wakes the loop (SIGCHLD), no polling
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # pid -> connection to its client
    by_conn: dict[socket.socket, int] = {}
    wake = _Fd(wake_r), _Fd(wake_w)
    try:
        while not stopping and (parent is None or os.getppid() == parent):
            for key, _ in sel.select(timeout=1.0):
                if key.fileobj is listener:
                    try:
                        conn, _ = listener.accept()
                    except OSError:
                        continue
                    pid = _start(conn, [listener, sel, *wake, *by_conn])
                    if pid is not None:
                        children[pid], by_conn[conn] = conn, pid
                        sel.register(conn, selectors.EVENT_READ)
                elif key.fileobj == wake_r:
                    try:
                        os.read(wake_r, 512)
                    except OSError:
                        pass
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
        if os.getpid() == me:
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


class _Fd:
    """A bare file descriptor with close(), so the child closes it with the server's sockets."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _start(conn: socket.socket, inherited: list) -> int | None:
    """Read a job from a new connection and fork its child: the child's pid, or None where declined
    or unreadable (the connection then closed). Never raises: one bad client must not stop the rest."""
    fds: list[int] = []
    pid = None
    try:
        conn.settimeout(30)  # a stalled client must not block the server
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 8)
        (size,) = _HEADER.unpack(msg[:4])
        body = msg[4:]
        if len(body) < size:
            body += _recv_exact(conn, size - len(body))
        doc = json.loads(body)
        if load_time_env(doc["env"]) == load_time_env(dict(os.environ)) and len(fds) == len(doc["fds"]):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child(doc, fds, [*inherited, conn])
                finally:
                    os._exit(code)
        conn.settimeout(None)
        conn.sendall(b"-" if pid is None else b"+")
    except Exception:  # noqa: BLE001 - a client gone: its child, if forked, is stopped and reaped as usual
        pass
    finally:
        for fd in fds:
            os.close(fd)
        if pid is None:
            conn.close()
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
