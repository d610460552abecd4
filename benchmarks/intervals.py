"""95% intervals for the studies' paired differences (method A - method B, same seed, same test questions).

Two intervals are reported side by side, because they answer different questions and disagree at 10 seeds:

- `paired_interval`: a percentile bootstrap that resamples seeds and test questions. It counts the spread of the
  training runs and of the test set, but with few seeds a percentile bootstrap is too narrow (it does not widen by
  Student's t factor, 2.26 at 10 seeds).
- `t_interval`: Student's t over the per-seed mean differences. It widens for few seeds, but takes the test set as
  fixed: it says how far another set of seeds could move the mean on these questions.

No scipy here (the project does not depend on it): the t quantile comes from integrating Student's density.
"""

from __future__ import annotations

import math
import statistics


def paired_interval(diff, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """The mean of a seeds x questions matrix of paired differences, and a 95% percentile interval from a bootstrap
    that resamples seeds and questions (both with replacement, the same questions for every seed): the spread of
    the training runs and of the test set both count."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n_seeds, n_questions = diff.shape
    means = np.empty(resamples)
    for i in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds)
        questions = rng.integers(0, n_questions, n_questions)
        means[i] = diff[np.ix_(seeds, questions)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def _t_density(x: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for x >= 0: 1/2 plus Simpson's rule on [0, x] (the density is smooth; 4,000 intervals give ~1e-10
    at the quantiles used here)."""
    h = x / intervals
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, intervals))
    return 0.5 + total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom, for 0.5 <= p < 1 (bisection on the CDF)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_interval(per_seed: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """`(mean, low, high)`: the mean of the per-seed differences and its Student t interval (n - 1 degrees of
    freedom). With one seed there is no spread to go on: the interval is infinite."""
    n = len(per_seed)
    mean = statistics.fmean(per_seed)
    if n < 2:
        return mean, -math.inf, math.inf
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(per_seed) / math.sqrt(n)
    return mean, mean - half, mean + half
