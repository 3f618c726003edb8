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
