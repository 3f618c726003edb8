"""arpg/progress.py: plain lines off a terminal (one per report), the same lines on $ARPG_PROGRESS_FD."""

from __future__ import annotations

import io
import os

import pytest

from arpg import progress
from arpg.progress import PROGRESS_FD_ENV, Progress, batch_progress, duration


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    monkeypatch.delenv(PROGRESS_FD_ENV, raising=False)
    return c


def test_off_a_terminal_each_report_is_one_line_with_rate_and_eta(clock):
    out = io.StringIO()
    bar = Progress(1000, "train arpg", initial=200, out=out)  # resumed at step 200
    for _ in range(300):
        bar.update(1)
    clock.t += 60.0  # 300 steps in 60 s: 5 step/s, 500 steps left: 100 s
    bar.report(loss=2.91, lr=1e-3, tok_s=1234)
    bar.update(500)
    clock.t += 100.0
    bar.report(loss=2.5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "train arpg: step 500/1000 (50%) | loss 2.91 lr 1.00e-03 tok_s 1234 | 5 step/s, 1m00s elapsed, ETA 1m40s",
        "train arpg: step 1000/1000 (100%) | loss 2.5 | 5 step/s, 2m40s elapsed",
    ]
    assert "\r" not in out.getvalue()


def test_updates_alone_print_nothing_and_disabled_prints_nothing(clock):
    out = io.StringIO()
    bar = Progress(10, "x", out=out)
    for _ in range(10):
        bar.update(1)
    assert out.getvalue() == ""
    quiet = Progress(10, "x", out=out, enabled=False)
    quiet.update(10)
    quiet.report(loss=1.0)
    assert out.getvalue() == ""


def test_the_progress_fd_gets_the_same_lines(clock, monkeypatch):
    read_fd, write_fd = os.pipe()
    monkeypatch.setenv(PROGRESS_FD_ENV, str(write_fd))
    out = io.StringIO()
    bar = Progress(4, "sample arpg steps8", unit="batch", out=out)
    bar.update(2)
    clock.t += 2.0
    bar.report()
    bar.close()
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        assert pipe.read() == out.getvalue() == "sample arpg steps8: batch 2/4 (50%) | 1 batch/s, 2s elapsed, ETA 2s\n"


def test_an_unopened_progress_fd_is_ignored(clock, monkeypatch):
    monkeypatch.setenv(PROGRESS_FD_ENV, "987")  # not open in this process (a shell that did not set it up)
    out = io.StringIO()
    bar = Progress(2, "x", out=out)
    bar.update(2)
    bar.report()
    assert out.getvalue().startswith("x: step 2/2 (100%)")


def test_a_torchrun_rank_ignores_the_progress_fd(clock, monkeypatch):
    """torchrun closes inherited descriptors: in a rank the number is another file (it broke training)."""
    read_fd, write_fd = os.pipe()
    monkeypatch.setenv(PROGRESS_FD_ENV, str(write_fd))
    monkeypatch.setenv("LOCAL_RANK", "0")
    bar = Progress(2, "x", out=io.StringIO())
    bar.update(2)
    bar.report()
    bar.close()
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        assert pipe.read() == ""


def test_batch_progress_times_from_the_start_of_the_loop(clock):
    out = io.StringIO()
    callback = batch_progress("sample", out=out)
    clock.t += 10.0  # the first batch took 10 s before the callback learnt the length
    callback(1, 2)
    assert out.getvalue() == "sample: batch 1/2 (50%) | 0.1 batch/s, 10s elapsed, ETA 10s\n"


def test_duration():
    assert [duration(s) for s in (0.4, 42, 275, 3725)] == ["0s", "42s", "4m35s", "1h02m"]
