"""Fingerprint what a tiny study writes, to show that a refactor left every number unchanged.

    python scripts/fingerprint_outputs.py OUT.json            # run the stages, write the fingerprints
    python scripts/fingerprint_outputs.py --compare A.json B.json

Runs the smoke config shrunk to seconds through the CLI (prepare-data, train-tokenizer, tokenize,
train both models with grad_accum 2 and EMA, train-classifier, sample both models, gallery), plus
an adversarial tokenizer and an interrupted-then-resumed training of each kind through the API.
Records the sha256 of every output file (checkpoints are byte-reproducible), the params keys each
command read, and the global torch RNG state after each API run (with the global RNG seeded by this
script first, so a stage that draws from it shows up as a changed state).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

TINY = {
    "tracking.enabled": False, "device": "cpu", "data.max_per_class": 20,
    "tokenizer.batch_size": 16, "tokenizer.max_steps": 12, "tokenizer.checkpoint_every": 5,
    "tokenizer.log_every": 4, "tokenizer.dead_code_every": 3, "tokenizer.eval_images": 20,
    "train.batch_size": 16, "train.grad_accum": 2, "train.max_steps": 9, "train.warmup_steps": 3,
    "train.checkpoint_every": 4, "train.log_every": 3, "train.ema": 0.9,
    "classifier.batch_size": 48, "classifier.epochs": 2,
    "sample.num_per_class": 3, "sample.batch_size": 7, "gallery.num_images": 2,
}
COMMANDS = [["prepare-data"], ["train-tokenizer", "--no-progress"], ["tokenize"], ["train", "--model", "arpg"],
            ["train", "--model", "raster"], ["train-classifier"],
            ["sample", "--model", "arpg", "--steps", "4", "--cfg", "2.0", "--order", "random"],
            ["sample", "--model", "raster", "--steps", "64", "--cfg", "2.0", "--order", "raster"], ["gallery"]]


def sha(path: Path, root: Path | None = None) -> str:
    data = path.read_bytes()
    if root is not None and path.suffix == ".json":  # paths inside JSON name the (random) temporary folder
        data = data.replace(str(root).encode(), b"<root>")
    return hashlib.sha256(data).hexdigest()[:16]


def tree(root: Path) -> dict:
    return {str(p.relative_to(root)): sha(p, root) for p in sorted(root.rglob("*")) if p.is_file()}


class StopAt:
    """A tracker whose log call at `step` raises: the run stops after its last checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def log_metrics(self, metrics, step=None):
        if step == self.step:
            raise KeyboardInterrupt


def api_runs(root: Path, study: Path) -> dict:
    """Adversarial tokenizer, resumed trainings: fingerprints of their outputs and the global RNG."""
    import torch

    from arpg.config import load_params
    from arpg.commands.train_tokenizer import train_from_params as train_tokenizer
    from arpg.engine.train import TrainConfig, train
    from arpg.commands.train import build_study_model, load_study_data
    from conftest import write_params

    out = {}
    adv_dir = root / "adversarial"
    adv_dir.mkdir()
    params = load_params(write_params(adv_dir, "configs/smoke.yaml", **TINY, **{
        "tokenizer.adversarial_weight": 0.5, "tokenizer.adversarial_start": 4}))
    (params.layout.data_dir).mkdir(parents=True)
    for name in os.listdir(study / "outputs" / "data"):
        os.symlink(study / "outputs" / "data" / name, params.layout.data_dir / name)
    torch.manual_seed(1234)
    try:
        train_tokenizer(params, run=StopAt(8), progress=False)
    except KeyboardInterrupt:
        pass
    train_tokenizer(params, progress=False)
    out["adversarial_tokenizer"] = {k: v for k, v in tree(adv_dir / "outputs").items() if not k.startswith("data")}
    out["global_rng_after_adversarial_tokenizer"] = hashlib.sha256(torch.get_rng_state().numpy()).hexdigest()[:16]

    params = load_params(study / "params.yaml")
    for kind in ("arpg", "raster"):
        torch.manual_seed(1234)
        cfg = TrainConfig.from_params(params)
        state = root / f"resumed-{kind}.pt"
        try:
            train(build_study_model(params, kind), kind, load_study_data(params), cfg, state_path=state,
                  device=torch.device("cpu"), tracker=StopAt(6), progress=False)
        except KeyboardInterrupt:
            pass
        result = train(build_study_model(params, kind), kind, load_study_data(params), cfg, state_path=state,
                       device=torch.device("cpu"), progress=False)
        out[f"resumed_{kind}_state"] = sha(state)
        out[f"resumed_{kind}_loss"] = result.final_loss
        out[f"global_rng_after_train_{kind}"] = hashlib.sha256(torch.get_rng_state().numpy()).hexdigest()[:16]
    return out


def fingerprint(out_json: Path) -> None:
    from conftest import write_params

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study = root / "study"
        study.mkdir()
        params_path = write_params(study, "configs/smoke.yaml", **TINY)
        reads = root / "reads"
        env = {**os.environ, "PYTHONPATH": str(REPO), "ARPG_RECORD_READS": str(reads)}
        for command in COMMANDS:
            subprocess.run([sys.executable, "-m", "arpg", *command, "--params", str(params_path)], cwd=study,
                           env=env, check=True, stdout=subprocess.DEVNULL)
        doc = {"files": tree(study / "outputs"), "reads": {}}
        for record in reads.glob("*.json"):
            entry = json.loads(record.read_text())
            doc["reads"][" ".join(a for a in entry["argv"] if not a.startswith("/"))] = entry["reads"]
        doc |= api_runs(root, study)
    out_json.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out_json}: {len(doc['files'])} files")


def compare(a: Path, b: Path) -> int:
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    diffs = [key for key in sorted(set(left) | set(right)) if left.get(key) != right.get(key)]
    for key in diffs:
        if isinstance(left.get(key), dict) and isinstance(right.get(key), dict):
            for sub in sorted(set(left[key]) | set(right[key])):
                if left[key].get(sub) != right[key].get(sub):
                    print(f"DIFFERS {key}/{sub}: {left[key].get(sub)} vs {right[key].get(sub)}")
        else:
            print(f"DIFFERS {key}: {left.get(key)} vs {right.get(key)}")
    print("identical" if not diffs else f"{len(diffs)} entries differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    if sys.argv[1] == "--compare":
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    fingerprint(Path(sys.argv[1]))
