"""Compare training recipes of the study's ARPG on a finished study's tokens (issue 30: its budget).

    python scripts/compare_train_recipes.py --out DIR 32:850:0.01 32:1300:0.006 [--params params.yaml]

Each recipe is batch:steps:lr (the rest of `train:` as in the params file). For each, in DIR/<recipe>/:
a params file whose output_dir links the finished study's data, tokenizer, tokens, classifier and
reference statistics, then `arpg train --model <zero-shot decoder>`, `arpg sample` and `arpg evaluate` at
the step sweep's default point (sample.steps_default, sample.cfg_default, random order). Two recipes
run side by side (train.threads each). Prints per recipe the sequences trained on (the budget), the
final training loss, and the point's class accuracy and FID with their standard errors. A recipe
already evaluated in DIR is read, not rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arpg.config import load_params  # noqa: E402
from arpg.decoders import zero_shot_decoder  # noqa: E402
from arpg.paths import SweepPoint  # noqa: E402

SHARED = ("data", "tokenizer", "tokens", "classifier", "reference")  # what a recipe reuses of the study


def recipe_params(base: Path, study_out: Path, folder: Path, batch: int, steps: int, lr: float) -> Path:
    values = yaml.safe_load(base.read_text())
    values["output_dir"] = str(folder / "out")
    values["train"].update(batch_size=batch, max_steps=steps, lr=lr)
    values["tracking"]["enabled"] = False
    (folder / "out").mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        link = folder / "out" / name
        if not link.exists():
            link.symlink_to(study_out / name)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def run(path: Path, model: str, point: list[str]) -> None:
    arpg = [sys.executable, "-m", "arpg"]
    for cmd in (["train", "--model", model], ["sample", *point], ["evaluate", *point]):
        log = path.parent / f"{cmd[0]}.log"
        with open(log, "w") as fh:
            if subprocess.run([*arpg, cmd[0], "--params", str(path), *cmd[1:]], stdout=fh, stderr=fh).returncode:
                raise SystemExit(f"{' '.join(cmd)} failed for {path.parent.name}: see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+", help="batch:steps:lr")
    ap.add_argument("--params", default="params.yaml", help="the finished study's params file")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    params = load_params(args.params)
    sample, model = params["sample"], zero_shot_decoder().name
    point = SweepPoint(model, sample["steps_default"], sample["cfg_default"], "random")
    argv = ["--model", model, "--steps", str(point.steps), "--cfg", str(point.cfg), "--order", point.order]
    todo, paths = [], {}
    for recipe in args.recipes:
        batch, steps, lr = recipe.split(":")
        folder = (args.out / f"b{batch}_s{steps}_lr{lr}").resolve()
        paths[recipe] = recipe_params(Path(args.params), params.layout.out.resolve(), folder, int(batch),
                                      int(steps), float(lr))
        if not load_params(paths[recipe]).layout.metrics(point).is_file():
            todo.append(paths[recipe])
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda p: run(p, model, argv), todo))
    print("| batch | steps | lr | sequences | final loss | accuracy (se) | FID (se) |\n|---|---|---|---|---|---|---|")
    for recipe, path in paths.items():
        p = load_params(path)
        doc = json.loads(p.layout.metrics(point).read_text())
        loss = json.loads(p.layout.model_metrics(model).read_text()).get("final_loss")
        acc, fid = (f"{doc[k]:.3f} ({doc['intervals'][k]['se']:.3f})" for k in ("accuracy_classifier", "fid_classifier"))
        batch, steps, lr = recipe.split(":")
        print(f"| {batch} | {steps} | {lr} | {int(batch) * int(steps)} | {loss:.3f} | {acc} | {fid} |")


if __name__ == "__main__":
    main()
