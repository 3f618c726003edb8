"""The warm server (arpg/warm.py, arpg/warm_server.py): a forked job behaves as the process itself would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arpg import warm
from arpg.paths import REPO_ROOT
from conftest import write_params

ARPG = [sys.executable, "-m", "arpg"]


def _wait_listening(path: str, proc, timeout: float = 300) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the warm server exited"
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                if s.connect_ex(path) == 0:
                    return
        time.sleep(0.1)
    raise AssertionError("the warm server never listened")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server whose run_command is the real one, except `sleep-then-term`: a command that waits
    for SIGTERM as every arpg command does (cli._stop_on_sigterm) and reports its own pid."""
    folder = tmp_path_factory.mktemp("warm")
    path = str(folder / "s.sock")
    code = (
        "import os, signal, sys, time\n"
        "import arpg.cli as cli, arpg.warm_server as warm_server\n"
        "real = cli.run_command\n"
        "def run_command(argv):\n"
        "    if argv[:1] != ['sleep-then-term']:\n"
        "        return real(argv)\n"
        "    print('child', os.getpid(), os.getppid(), flush=True)\n"
        "    def term(*_):\n"
        "        print('terminated', flush=True); os._exit(130)\n"
        "    signal.signal(signal.SIGTERM, term)\n"
        "    time.sleep(120)\n"
        "    return 0\n"
        "cli.run_command = run_command\n"
        f"warm_server.serve({path!r}, os.getpid() and os.getppid())\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT)
    _wait_listening(path, proc)
    yield path, env, proc
    proc.terminate()
    proc.wait(timeout=30)
    assert not os.path.exists(path), "the server leaves no socket behind"


def _arpg(args, env, **kw):
    return subprocess.run([*ARPG, *args], env=env, capture_output=True, text=True, timeout=600, **kw)


def test_a_forked_command_prints_and_exits_as_the_process_itself_does(server, tmp_path):
    path, env, proc = server
    cold = _arpg(["sample", "--model", "nope"], env, cwd=tmp_path)
    hot = _arpg(["sample", "--model", "nope"], dict(env, **{warm.SOCKET_ENV: path}), cwd=tmp_path)
    assert cold.returncode == hot.returncode == 2
    assert hot.stderr == cold.stderr and "invalid choice: 'nope'" in hot.stderr
    # a command that works: same output, in the client's working directory
    write_params(tmp_path, "configs/smoke.yaml")
    cold = _arpg(["info"], env, cwd=tmp_path)
    hot = _arpg(["info"], dict(env, **{warm.SOCKET_ENV: path}), cwd=tmp_path)
    assert cold.returncode == hot.returncode == 0
    assert hot.stdout == cold.stdout and str(tmp_path) in hot.stdout


def test_the_client_runs_the_command_in_the_server_and_sigterm_reaches_it(server, tmp_path):
    path, env, proc = server
    out = tmp_path / "out.txt"
    with open(out, "w") as fh:
        client = subprocess.Popen([*ARPG, "sleep-then-term"], env=dict(env, **{warm.SOCKET_ENV: path}),
                                  stdout=fh, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "child" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        _, child_pid, parent_pid = out.read_text().split()[:3]
        assert int(parent_pid) == proc.pid, "the command ran in a fork of the server"
        client.send_signal(signal.SIGTERM)
        assert client.wait(timeout=30) == 130
    assert out.read_text().splitlines()[-1] == "terminated"
    time.sleep(0.2)
    assert not Path(f"/proc/{child_pid}").exists() or "Z" in Path(f"/proc/{child_pid}/stat").read_text().split()[2]


def test_another_load_time_environment_or_torchrun_runs_in_its_own_process(server, tmp_path):
    path, env, proc = server
    for extra in ({"OMP_NUM_THREADS": "2"}, {"RANK": "0"}):
        out = _arpg(["sleep-then-term"], dict(env, **extra, **{warm.SOCKET_ENV: path}))
        # in its own process the command does not exist: argparse refuses it
        assert out.returncode == 2 and "invalid choice: 'sleep-then-term'" in out.stderr


def test_no_server_or_a_dead_socket_runs_the_command_here(tmp_path):
    env = dict(os.environ, **{warm.SOCKET_ENV: str(tmp_path / "absent.sock")})
    write_params(tmp_path, "configs/smoke.yaml")
    out = _arpg(["info"], env, cwd=tmp_path)
    assert out.returncode == 0 and str(tmp_path) in out.stdout


def test_record_own_usage_counts_the_cpu_of_waited_for_grandchildren(tmp_path):
    """The profile's configurations run as forks of its own warm server (grandchildren of the job):
    their CPU time must be in the job's usage record, which the report's stage times read."""
    import json

    burn = ("import time\nt = time.process_time()\n"
            "while time.process_time() - t < 0.6:\n    pass\n")
    middle = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {burn!r}], check=True)\n"
    job = (f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {middle!r}], check=True)\n"
           "from arpg.warm import record_own_usage\nrecord_own_usage()\n")
    usage = tmp_path / "job.usage"
    subprocess.run([sys.executable, "-c", job], env=dict(os.environ, **{warm.USAGE_ENV: str(usage)}),
                   check=True, timeout=120)
    record = json.loads(usage.read_text())
    assert 0.6 <= record["cpu_time"] < 30
    assert set(record) == {"cpu_time"}  # memory: Snakemake's sample of the whole tree stays
