"""The warm server of arpg/warm.py: it imports torch, MLflow and every arpg module once, then forks
one child per client, which runs the client's command with the client's argv, environment, working
directory and standard streams, and reports its exit status, CPU time and peak memory back.

Started by `python -m arpg.warm serve PATH PARENT_PID MODULES` (arpg.warm.spawn).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from arpg.warm import CLI_PRELOAD, HEADER, RESULT, STREAMS, is_open, load_time_env, recv_exact

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

    sys.stdin = text(0, "r", sys.__stdin__ or sys.__stdout__, "strict") if is_open(0) else None
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
        for fd in set(STREAMS) - set(doc["fds"]):
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
                    conn.sendall(RESULT.pack(code, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024))
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
        (size,) = HEADER.unpack(msg[:4])
        body = msg[4:]
        if len(body) < size:
            body += recv_exact(conn, size - len(body))
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
