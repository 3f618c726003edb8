"""Where every artifact lives: the one place that names output paths.

All stages and the Snakemake / DVC wiring ask `Layout` for paths, so a path is
spelled once. Paths are relative to the working directory (the repository root
when run through Snakemake or DVC) unless `output_dir` is absolute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "params.schema.json"
DEFAULT_PARAMS = "params.yaml"


def format_cfg(cfg: float) -> str:
    """Guidance scale as it appears in paths and wildcards: 2.0 -> '2.0', 1.5 -> '1.5'."""
    return f"{float(cfg):g}" if float(cfg) != int(cfg) else f"{float(cfg):.1f}"


@dataclass(frozen=True)
class SweepPoint:
    """One sampling configuration: the unit of sampling and evaluation."""

    model: str  # a decoder's name (arpg/decoders.py)
    steps: int
    cfg: float
    order: str

    @property
    def tag(self) -> str:
        return f"steps{self.steps}_cfg{format_cfg(self.cfg)}_{self.order}"


@dataclass(frozen=True)
class Layout:
    out: Path

    @classmethod
    def from_params(cls, params) -> "Layout":
        values = params.values if isinstance(getattr(params, "values", None), dict) else params  # unrecorded
        return cls(Path(values["output_dir"]))

    # --- data -------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def images(self, split: str) -> Path:
        return self.data_dir / f"{split}_images.npy"

    def labels(self, split: str) -> Path:
        return self.data_dir / f"{split}_labels.npy"

    @property
    def data_manifest(self) -> Path:
        return self.data_dir / "manifest.json"

    # --- tokenizer ----------------------------------------------------------
    @property
    def tokenizer_dir(self) -> Path:
        return self.out / "tokenizer"

    @property
    def tokenizer_checkpoint(self) -> Path:
        return self.tokenizer_dir / "tokenizer.pt"

    @property
    def tokenizer_state(self) -> Path:
        """Resumable training state (model, optimizer, step, RNG)."""
        return self.tokenizer_dir / "train_state.pt"

    @property
    def tokenizer_metrics(self) -> Path:
        return self.tokenizer_dir / "train_metrics.json"

    @property
    def tokens_dir(self) -> Path:
        return self.out / "tokens"

    def tokens(self, split: str) -> Path:
        """Token grids [N, h, w] (int16/int32) of a split; 'train_flip' is the flipped copy."""
        return self.tokens_dir / f"{split}_tokens.npy"

    def token_labels(self, split: str) -> Path:
        return self.tokens_dir / f"{split}_labels.npy"

    @property
    def tokenize_metrics(self) -> Path:
        return self.tokens_dir / "metrics.json"

    @property
    def reconstructions(self) -> Path:
        return self.tokens_dir / "reconstructions.png"

    # --- classifier ---------------------------------------------------------
    @property
    def classifier_dir(self) -> Path:
        return self.out / "classifier"

    @property
    def classifier_checkpoint(self) -> Path:
        return self.classifier_dir / "classifier.pt"

    @property
    def classifier_metrics(self) -> Path:
        return self.classifier_dir / "metrics.json"

    # --- generators -----------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        return self.out / "models" / model

    def model_checkpoint(self, model: str) -> Path:
        return self.model_dir(model) / "model.pt"

    def model_state(self, model: str) -> Path:
        return self.model_dir(model) / "train_state.pt"

    def model_metrics(self, model: str) -> Path:
        return self.model_dir(model) / "train_metrics.json"

    # --- sampling / evaluation ------------------------------------------------
    def sample_dir(self, point: SweepPoint) -> Path:
        return self.out / "samples" / point.model / point.tag

    def samples(self, point: SweepPoint) -> Path:
        return self.sample_dir(point) / "samples.npz"

    def sample_grid(self, point: SweepPoint) -> Path:
        return self.sample_dir(point) / "grid.png"

    def reference_stats(self, extractor: str, split: str) -> Path:
        return self.out / "reference" / f"{extractor}_{split}.npz"

    def metrics(self, point: SweepPoint) -> Path:
        return self.out / "metrics" / point.model / f"{point.tag}.json"

    # --- profiling / galleries --------------------------------------------------
    @property
    def profile_dir(self) -> Path:
        return self.out / "profile"

    @property
    def profile_csv(self) -> Path:
        return self.profile_dir / "profile.csv"

    @property
    def profile_json(self) -> Path:
        return self.profile_dir / "profile.json"

    @property
    def gallery_dir(self) -> Path:
        return self.out / "gallery"

    def gallery_image(self, task: str) -> Path:
        return self.gallery_dir / f"{task}.png"

    @property
    def gallery_json(self) -> Path:
        return self.gallery_dir / "gallery.json"

    # --- report -------------------------------------------------------------------
    @property
    def report_index(self) -> Path:
        """What `arpg report` wrote into report.dir. The pipeline's report target: report.dir
        itself is committed for the default study, so its existence proves nothing."""
        return self.out / "report_index.json"
