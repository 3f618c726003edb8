import subprocess
import sys

from arpg.cli import COMMANDS, main
from arpg.paths import REPO_ROOT


def test_every_command_module_exists_and_has_its_hooks():
    import importlib

    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.configure) and callable(module.run), name
        assert help_text, name
    helps = [h for _, h in COMMANDS.values()]
    assert len(set(helps)) == len(helps)  # no copy-pasted help text
    assert not any(h.startswith("`arpg") for h in helps)  # the "`arpg NAME ...`: " prefix is cut
    modules = {p.stem for p in (REPO_ROOT / "arpg" / "commands").glob("*.py")} - {"__init__"}
    assert modules == {m.rsplit(".", 1)[1] for m, _ in COMMANDS.values()}  # no command module left out


def test_info_prints_locations(params_file, capsys):
    assert main(["info", "--params", str(params_file())]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out and "MLflow: sqlite:///" in out and "resolved params:" in out
    assert "token grid: 8x8" in out


def test_bad_params_fail_before_work_without_traceback(params_file):
    path = params_file(**{"sample.steps": [8, "x"]})
    proc = subprocess.run([sys.executable, "-m", "arpg", "prepare-data", "--params", str(path)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert "sample.steps" in proc.stderr and "Traceback" not in proc.stderr


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "prepare-data" in capsys.readouterr().out


def test_an_unwritable_output_dir_is_named_before_any_work(tmp_path, params_file, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # as root, chmod cannot make a folder read-only: a file can
    for command in (["prepare-data"], ["sample", "--model", "arpg", "--steps", "4", "--cfg", "2.0",
                                        "--order", "random"], ["train", "--model", "arpg"], ["gallery"]):
        path = params_file(**{"output_dir": str(blocker / "outputs"), "tracking.enabled": False})
        assert main([command[0], "--params", str(path), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert f"output_dir {blocker / 'outputs'} is not writable" in err and "Traceback" not in err


def test_a_filesystem_error_mid_run_becomes_a_message(params_file, capsys, monkeypatch):
    import errno

    from arpg.commands import prepare_data

    def full_disk(args, params):
        raise OSError(errno.ENOSPC, "No space left on device", "outputs/data/train_images.npy")

    monkeypatch.setattr(prepare_data, "run", full_disk)
    assert main(["prepare-data", "--params", str(params_file(**{"tracking.enabled": False}))]) == 2
    err = capsys.readouterr().err
    assert "outputs/data/train_images.npy" in err and "No space left" in err and "free disk space" in err


def test_sigterm_marks_the_stage_run_killed(params_file):
    """Snakemake and SLURM stop a job with SIGTERM: the stage's MLflow run must not stay RUNNING."""
    path = params_file()
    script = (
        "import os, signal, sys\n"
        "from arpg import cli, tracking\n"
        "from arpg.config import load_params\n"
        "cli._stop_on_sigterm()\n"
        f"params = load_params({str(path)!r})\n"
        "try:\n"
        "    with tracking.stage_run(params, 'train') as run:\n"
        "        print(run.run_id, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        signal.pause()\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 130, proc.stderr
    from mlflow.tracking import MlflowClient

    from arpg import tracking
    from arpg.config import load_params

    run_id = proc.stdout.split()[0]
    assert MlflowClient(tracking.tracking_uri(load_params(path))).get_run(run_id).info.status == "KILLED"


def test_a_truncated_samples_archive_is_named_with_the_command_that_remakes_it(params_file, capsys):
    import numpy as np

    from arpg.config import load_params
    from arpg.paths import SweepPoint

    path = params_file(**{"tracking.enabled": False})
    samples = load_params(path).layout.samples(SweepPoint("arpg", 4, 2.0, "random"))
    samples.parent.mkdir(parents=True, exist_ok=True)
    np.savez(samples, arr_0=np.zeros((8, 4, 4, 1), np.uint8), labels=np.arange(8))
    samples.write_bytes(samples.read_bytes()[:300])  # a copy cut short
    argv = ["evaluate", "--params", str(path), "--model", "arpg", "--steps", "4", "--cfg", "2.0", "--order", "random"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"samples of arpg steps4_cfg2.0_random {samples} is unreadable" in err and "Traceback" not in err
    assert err.rstrip().endswith("delete it and rerun `arpg sample --model arpg --steps 4 --cfg 2.0 --order random`")
    np.savez(samples, arr_0=np.zeros((8, 4, 4, 1), np.uint8))  # complete, but without its labels
    assert main(argv) == 2
    assert "lacks labels (has arr_0); delete it and rerun `arpg sample" in capsys.readouterr().err
