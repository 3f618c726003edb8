"""The `arpg` command: one subcommand per pipeline stage.

Each subcommand lives in its own module under `arpg.commands` and exposes
`configure(parser)` (its arguments) and `run(args, params)` (the work). Only
the chosen command's module is imported, so `arpg --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from arpg.errors import ArpgError

# name -> (module, one-line help). Add a stage here and in arpg/commands/.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("arpg.commands.info", "print versions, device, resolved params and where data / MLflow live"),
    "prepare-data": ("arpg.commands.prepare_data", "decode the dataset into memory-mappable arrays + manifest"),
    "train-tokenizer": ("arpg.commands.train_tokenizer", "train the VQ tokenizer (or verify the pretrained one)"),
    "tokenize": ("arpg.commands.tokenize", "encode the prepared images into token grids; reconstruction metrics"),
    "train-classifier": ("arpg.commands.train_classifier", "train the small CNN used for IS / FID / accuracy"),
    "train": ("arpg.commands.train", "train one study model, a decoder of arpg/decoders.py (or import it)"),
    "sample": ("arpg.commands.sample", "draw class-balanced samples for one sweep point"),
    "reference-stats": ("arpg.commands.reference_stats", "feature statistics of the real data for one extractor"),
    "evaluate": ("arpg.commands.evaluate", "FID / KID / IS / precision-recall of one sweep point"),
    "profile": ("arpg.commands.profile", "throughput and memory of every decoder (arpg/decoders.py)"),
    "gallery": ("arpg.commands.gallery", "zero-shot inpainting, outpainting and resolution expansion"),
    "report": ("arpg.commands.report", "render reports/ from the stage outputs"),
    "export-dvc": ("arpg.commands.export_dvc", "write dvc.yaml from the pipeline's stage list"),
}


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
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        from arpg.config import load_params, stage_threads
        from arpg.utils import set_threads

        params = load_params(args.params)
        set_threads(stage_threads(params, args.command))
        result = module.run(args, params)
        _record_reads(argv, params)
    except ArpgError as exc:
        print(f"arpg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"arpg {args.command}: interrupted; completed checkpoints are kept, "
              "re-run the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
