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


def seed_run(seed: int) -> str:
    """How a training seed names its models and points: '' for seed 0 (the study's own), '_seed3'."""
    return f"_seed{int(seed)}" if int(seed) else ""


def run_seed(run: str) -> int:
    """The training seed a `seed_run` names."""
    return int(run[len("_seed"):]) if run else 0


@dataclass(frozen=True)
class SweepPoint:
    """One sampling configuration: the unit of sampling and evaluation."""

    model: str  # a decoder's name (arpg/decoders.py)
    steps: int
    cfg: float
    order: str
    run: str = ""  # the training seed of its model: seed_run(seed)

    @property
    def seed(self) -> int:
        return run_seed(self.run)

    @property
    def tag(self) -> str:
        return f"steps{self.steps}_cfg{format_cfg(self.cfg)}_{self.order}{self.run}"


class _Under:
    """A fixed path below a Layout's output_dir, read as a property: `_OUT / "data" / "x.json"`;
    `.each(pattern)` makes a family of them keyed by the pattern's fields."""

    def __init__(self, parts: tuple[str, ...] = (), doc: str | None = None):
        self.parts, self.__doc__ = parts, doc

    def __truediv__(self, name: str) -> "_Under":
        return _Under(self.parts + (name,))

    def doc(self, text: str) -> "_Under":
        return _Under(self.parts, text)

    def each(self, pattern: str) -> "_Each":
        return _Each(self.parts, pattern)

    def __get__(self, layout, owner=None):
        return self if layout is None else layout.out.joinpath(*self.parts)


class _Each:
    """A family of paths below output_dir, read as a method: `layout.images("train")`."""

    def __init__(self, parts: tuple[str, ...], pattern: str):
        self.parts, self.pattern = parts, pattern

    def __get__(self, layout, owner=None):
        if layout is None:
            return self
        base = layout.out.joinpath(*self.parts)
        return lambda *keys: base / self.pattern.format(*keys)


_OUT = _Under()


@dataclass(frozen=True)
class Layout:
    out: Path

    @classmethod
    def from_params(cls, params) -> "Layout":
        values = params.values if isinstance(getattr(params, "values", None), dict) else params  # unrecorded
        return cls(Path(values["output_dir"]))

    # Fixed paths read as properties (layout.data_dir); a path under another is spelled from it.
    # --- data -------------------------------------------------------------
    data_dir = _OUT / "data"
    data_manifest = data_dir / "manifest.json"

    images = data_dir.each("{}_images.npy")  # layout.images(split)
    labels = data_dir.each("{}_labels.npy")

    # --- tokenizer ----------------------------------------------------------
    tokenizer_dir = _OUT / "tokenizer"
    tokenizer_checkpoint = tokenizer_dir / "tokenizer.pt"
    tokenizer_state = (tokenizer_dir / "train_state.pt").doc("Resumable training state (model, optimizer, step, RNG).")
    tokenizer_metrics = tokenizer_dir / "train_metrics.json"
    tokens_dir = _OUT / "tokens"
    tokenize_metrics = tokens_dir / "metrics.json"
    reconstructions = tokens_dir / "reconstructions.png"
    tokens = tokens_dir.each("{}_tokens.npy")  # token grids [N, h, w] (int16/int32); 'train_flip': flipped copy
    token_labels = tokens_dir.each("{}_labels.npy")

    # --- classifier ---------------------------------------------------------
    classifier_dir = _OUT / "classifier"
    classifier_checkpoint = classifier_dir / "classifier.pt"
    classifier_metrics = classifier_dir / "metrics.json"

    # --- generators -----------------------------------------------------------
    models_dir = _OUT / "models"

    def model_dir(self, decoder: str, run: str = "") -> Path:
        """One decoder's model trained from one seed (`run`: paths.seed_run)."""
        return self.models_dir / f"{decoder}{run}"

    def model_checkpoint(self, decoder: str, run: str = "") -> Path:
        return self.model_dir(decoder, run) / "model.pt"

    def model_state(self, decoder: str, run: str = "") -> Path:
        return self.model_dir(decoder, run) / "train_state.pt"

    def model_metrics(self, decoder: str, run: str = "") -> Path:
        return self.model_dir(decoder, run) / "train_metrics.json"

    reference_stats = _OUT.each("reference/{}_{}.npz")  # layout.reference_stats(extractor, split)

    # --- sampling / evaluation ------------------------------------------------
    def sample_dir(self, point: SweepPoint) -> Path:
        return self.out / "samples" / point.model / point.tag

    def samples(self, point: SweepPoint) -> Path:
        return self.sample_dir(point) / "samples.npz"

    def sample_grid(self, point: SweepPoint) -> Path:
        return self.sample_dir(point) / "grid.png"

    def metrics(self, point: SweepPoint) -> Path:
        return self.out / "metrics" / point.model / f"{point.tag}.json"

    def selection_metrics(self, point: SweepPoint) -> Path:
        """The point measured on its selection set (`arpg select`), on which guidance is chosen."""
        return self.out / "metrics" / point.model / f"{point.tag}.selection.json"

    # --- profiling / galleries / report ------------------------------------------
    profile_dir = _OUT / "profile"
    profile_csv = profile_dir / "profile.csv"
    profile_json = profile_dir / "profile.json"
    kernel_choices = profile_dir / "kernel_choices.json"  # the profile's cache of measured CPU kernel choices
    gallery_dir = _OUT / "gallery"
    gallery_json = gallery_dir / "gallery.json"
    zeroshot_dir = _OUT / "zeroshot"
    report_index = (_OUT / "report_index.json").doc(
        "What `arpg report` wrote into report.dir. The pipeline's report target: report.dir itself is "
        "committed for the default study, so its existence proves nothing.")

    gallery_image = gallery_dir.each("{}.png")  # layout.gallery_image(task)
    zeroshot_json = zeroshot_dir.each("{}.json")  # layout.zeroshot_json(task): one record per edit measured
    zeroshot_csv = zeroshot_dir.each("{}.csv")  # layout.zeroshot_csv(task)
