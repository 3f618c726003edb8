"""The `arpg` command: one subcommand per pipeline stage.

Each subcommand lives in its own module under `arpg.commands` and exposes
`configure(parser)` (its arguments) and `run(args, params)` (the work). Only
the chosen command's module is imported, so `arpg --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from arpg.errors import ArpgError

# The subcommands, in pipeline order. Each is the module arpg/commands/<name, "-" as "_">.py: its
# configure(parser) and run(args, params) do the work, and its docstring's first paragraph
# ("`arpg NAME ...`: what it does") is the help, read as text so no module is imported for it.
COMMAND_NAMES = ("info", "prepare-data", "train-tokenizer", "tokenize", "train-classifier", "train", "sample",
                 "reference-stats", "evaluate", "select", "profile", "gallery", "zero-shot", "report",
                 "export-dvc")


def _command(name: str) -> tuple[str, str]:
    module_name = "arpg.commands." + name.replace("-", "_")
    source = (Path(__file__).parent / "commands" / f"{name.replace('-', '_')}.py").read_text(encoding="utf-8")
    summary = " ".join(source.split('"""')[1].split("\n\n")[0].split())
    return module_name, summary.split("`: ", 1)[-1]


# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {name: _command(name) for name in COMMAND_NAMES}


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arpg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--params", default=None,
                         help="params file (default: $ARPG_PARAMS or ./params.yaml)")
        if name == selected:
            importlib.import_module(module_name).configure(cmd)
    return parser


def _version() -> str:
    from arpg import __version__

    return f"arpg {__version__}"


# Commands that write nothing under output_dir (every other one checks it is writable first).
WRITES_NO_OUTPUTS = ("info", "export-dvc")


def _stop_on_sigterm() -> None:
    """SIGTERM (Snakemake, SLURM, `kill`) ends a command like Ctrl-C: its MLflow run is marked KILLED
    and the atomic writers leave no half-written file."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


RECORD_READS_ENV = "ARPG_RECORD_READS"


def _record_reads(argv: list[str], params) -> None:
    """With $ARPG_RECORD_READS set to a folder, write the params keys this command read there
    (tests compare them with the keys arpg/pipeline.py declares for its job)."""
    import json
    import os
    import uuid
    from pathlib import Path

    folder = os.environ.get(RECORD_READS_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        doc = {"argv": argv, "reads": sorted(params.reads)}
        (Path(folder) / f"{uuid.uuid4().hex}.json").write_text(json.dumps(doc))


def main(argv: list[str] | None = None) -> int:
    """The console script: in the workflow's warm server when one answers (arpg/warm.py), else here."""
    from arpg.warm import clear_usage, delegate

    argv = list(sys.argv[1:] if argv is None else argv)
    code = delegate(argv)
    if code is None:
        clear_usage()
        return run_command(argv)
    return code


def run_command(argv: list[str]) -> int:
    selected = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    _stop_on_sigterm()
    try:
        from arpg.config import load_params, stage_threads
        from arpg.utils import require_writable_dir, set_threads

        params = load_params(args.params)
        if args.command not in WRITES_NO_OUTPUTS:  # before any work: not after the images are drawn
            require_writable_dir(params.layout.out, "output_dir")
        set_threads(stage_threads(params, args.command))
        result = module.run(args, params)
        _record_reads(argv, params)
    except ArpgError as exc:
        print(f"arpg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a path that went away mid-run: name it, no traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"arpg {args.command}: error: cannot write or read{where}: {exc.strerror or exc}; free disk space "
              "or make the path writable (or set output_dir elsewhere), then rerun: completed checkpoints "
              "are kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"arpg {args.command}: interrupted; completed checkpoints are kept, "
              "re-run the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
