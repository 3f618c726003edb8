"""A metric over training seeds: the mean of k trained models, with an interval that holds both the
training noise (another seed trains other weights) and the sampling noise of each model's figure.

Model (one-way random effects): seed i's figure x_i = mu + b_i + e_i, with b_i ~ (0, sb^2) the
training draw and e_i ~ (0, sw_i^2) the sampling draw of its sample set (sw_i estimated by the
bootstrap, `se_i`). Each x_i carries both, so the spread of the k figures estimates sb^2 + sw^2
directly: se(mean) = sd(x) / sqrt(k), and the interval is mean +- t(k-1) * se, Student's t with
k - 1 degrees of freedom because that sd comes from k values (exact for normal b and e of equal
sw; with k = 3 the quantile is 4.30, so three seeds give wide intervals, honestly). The decomposition
reported beside it: within = mean(se_i^2), between = max(0, var(x) - within).

With one seed nothing measures the training noise: the interval is the sampling one (normal, z) and
`seeds` says so. tests/test_replicates.py checks se and coverage against the model's analytic
variance (sb^2 + sw^2) / k on synthetic data with known sb and sw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

from scipy.stats import t as student_t

METHOD = ("mean over training seeds; se = sd of the per-seed figures / sqrt(k) (each figure carries its "
          "model's training draw and its sample set's sampling draw); interval mean +- t(k-1) * se")


@dataclass(frozen=True)
class Combined:
    mean: float
    se: float
    lo: float
    hi: float
    seeds: int              # k; 1: the interval is the sampling one only
    df: float               # degrees of freedom of the quantile (inf: normal)
    between_sd: float | None  # estimated sd of the training draw (None with one seed)
    within_sd: float        # rms of the per-seed sampling se

    @property
    def half(self) -> float:
        return self.hi - self.mean


def quantile(level: float, df: float) -> float:
    """Two-sided quantile at `level`: Student's t with `df` degrees of freedom (normal at df = inf)."""
    return NormalDist().inv_cdf(0.5 + level / 2) if math.isinf(df) else float(student_t.ppf(0.5 + level / 2, df))


def combine(values: Sequence[float], ses: Sequence[float], level: float = 0.95) -> Combined:
    """The combined figure of k seeds' `values` with their sampling `ses` (see the module's model)."""
    k = len(values)
    if k == 0 or len(ses) != k:
        raise ValueError(f"combine: {k} values and {len(ses)} se (one each, at least one)")
    mean = sum(values) / k
    within = sum(s * s for s in ses) / k
    if k == 1:
        se, df, between = math.sqrt(within), math.inf, None
    else:
        var = sum((v - mean) ** 2 for v in values) / (k - 1)
        se, df, between = math.sqrt(var / k), float(k - 1), math.sqrt(max(0.0, var - within))
    half = quantile(level, df) * se
    return Combined(mean, se, mean - half, mean + half, k, df, between, math.sqrt(within))


def difference(a: Combined, b: Combined, level: float = 0.95) -> tuple[float, float, float, float]:
    """(b - a, se, lo, hi) of two independent combined figures; Welch-Satterthwaite degrees of freedom."""
    diff = b.mean - a.mean
    va, vb = a.se ** 2, b.se ** 2
    se = math.sqrt(va + vb)
    if math.isinf(a.df) and math.isinf(b.df):
        df = math.inf
    elif va + vb == 0:
        df = min(a.df, b.df)
    else:
        terms = [v * v / d for v, d in ((va, a.df), (vb, b.df)) if not math.isinf(d)]
        df = (va + vb) ** 2 / sum(terms) if sum(terms) > 0 else math.inf
    half = quantile(level, df) * se
    return diff, se, diff - half, diff + half
