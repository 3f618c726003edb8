"""The combined interval over training seeds against the two-level model it assumes: synthetic seeds
with a known between-training sd and a known sampling sd, the analytic variance of their mean
((sb^2 + sw^2) / k) and Monte Carlo coverage as the independent references."""

import math

import numpy as np
import pytest

from arpg.engine.replicates import combine, difference, quantile

SB, SW, MU = 3.0, 1.0, 20.0  # between-training sd 3x the sampling sd (the FID-lottery ratio)


def _seeds(rng, k, sb=SB, sw=SW, mu=MU):
    """k seeds' figures and their sampling se (known exactly here)."""
    return mu + rng.normal(0, sb, k) + rng.normal(0, sw, k), [sw] * k


def test_se_and_decomposition_match_the_two_level_model():
    rng = np.random.default_rng(0)
    values, ses = _seeds(rng, 4000)
    c = combine(list(values), ses)
    assert c.se == pytest.approx(math.sqrt((SB ** 2 + SW ** 2) / 4000), rel=0.05)
    assert c.between_sd == pytest.approx(SB, rel=0.05)
    assert c.within_sd == pytest.approx(SW)
    assert c.mean == pytest.approx(MU, abs=4 * c.se)


@pytest.mark.parametrize("k", [3, 5])
def test_the_interval_covers_the_true_mean_at_its_level(k):
    rng = np.random.default_rng(k)
    trials = 4000
    hits = naive = 0
    for _ in range(trials):
        values, ses = _seeds(rng, k)
        c = combine(list(values), ses)
        hits += c.lo <= MU <= c.hi
        half_sampling = 1.96 * SW / math.sqrt(k)  # what a sampling-only interval of the mean would claim
        naive += abs(c.mean - MU) <= half_sampling
    assert abs(hits / trials - 0.95) < 0.015  # binomial sd at 4000 trials: 0.0034
    assert naive / trials < 0.5  # ignoring the training draw covers far less: the test can tell


def test_difference_of_two_decoders_covers_their_true_gap():
    rng = np.random.default_rng(7)
    hits, trials = 0, 3000
    for _ in range(trials):
        a = combine(*map(list, _seeds(rng, 3, mu=20.0)))
        b = combine(*map(list, _seeds(rng, 4, sb=1.0, mu=15.0)))
        _, se, lo, hi = difference(a, b)
        hits += lo <= -5.0 <= hi
    assert abs(hits / trials - 0.95) < 0.02  # Welch-Satterthwaite: close to nominal


def test_one_seed_falls_back_to_the_sampling_interval():
    c = combine([10.0], [0.5])
    assert c.seeds == 1 and c.between_sd is None and math.isinf(c.df)
    assert (c.lo, c.hi) == pytest.approx((10.0 - 1.959964 * 0.5, 10.0 + 1.959964 * 0.5), rel=1e-6)


def test_t_quantiles():
    assert quantile(0.95, 2) == pytest.approx(4.302653, rel=1e-6)
    assert quantile(0.95, math.inf) == pytest.approx(1.959964, rel=1e-6)
    with pytest.raises(ValueError):
        combine([1.0, 2.0], [0.1])
