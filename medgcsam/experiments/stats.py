"""Statistics over seeds: summaries with t-intervals and paired comparisons with exact tests.

With three seeds, intervals are wide and the smallest attainable two-sided sign-flip p-value is
0.25; the report states both instead of hiding them, which is the point of the protocol.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st


@dataclass(frozen=True)
class Summary:
    """Mean, sample SD (ddof=1) and a two-sided t-interval of the mean."""

    n: int
    mean: float
    sd: float
    low: float
    high: float


def summarize(values: list[float] | np.ndarray, confidence: float = 0.95) -> Summary:
    """NaNs are dropped (a cell without the metric); n<2 gives NaN spread and interval."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def pooled_sd(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    """Pooled standard deviation of two samples (weights n-1), the yardstick of the selection rule."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    dof = a.size + b.size - 2
    if dof <= 0:
        return math.nan
    ss = (a.size - 1) * (a.var(ddof=1) if a.size > 1 else 0.0) + (b.size - 1) * (b.var(ddof=1) if b.size > 1 else 0.0)
    return math.sqrt(ss / dof)


def sign_flip_pvalue(diffs: list[float] | np.ndarray, n_resamples: int = 100_000, seed: int = 0) -> float:
    """Two-sided paired permutation test of mean difference 0: exact over all 2^n sign flips for n <= 16.

    Counts flips whose |mean| reaches the observed |mean| (with a relative tolerance so ties count),
    including the identity, so the p-value is never 0.
    """
    d = np.asarray(diffs, dtype=float)
    d = d[~np.isnan(d)]
    n = d.size
    if n == 0:
        return math.nan
    observed = abs(d.mean())
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    else:
        rng = np.random.default_rng(seed)
        signs = np.vstack([np.ones(n), rng.choice((1.0, -1.0), size=(n_resamples - 1, n))])
    means = np.abs(signs @ d / n)
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


@dataclass(frozen=True)
class Paired:
    """Method minus baseline over matched seeds."""

    n: int
    mean_diff: float
    low: float
    high: float
    p_sign_flip: float
    wins: int
    losses: int


def paired_comparison(method: list[float], baseline: list[float], confidence: float = 0.95) -> Paired:
    """Differences per matched seed; pairs where either value is missing are dropped."""
    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs matched seeds: {a.size} vs {b.size} values")
    d = a - b
    d = d[~np.isnan(d)]
    s = summarize(d, confidence)
    return Paired(s.n, s.mean, s.low, s.high, sign_flip_pvalue(d), int((d > 0).sum()), int((d < 0).sum()))


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """Exact (binomial) McNemar test on per-image correctness of two models on the same test images.

    Returns (b, c, p): b = images only A gets right, c = images only B gets right.
    """
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"McNemar needs the same test images: {a.size} vs {b_.size} predictions")
    b = int((a & ~b_).sum())
    c = int((~a & b_).sum())
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(min(1.0, 2.0 * _st.binom.cdf(min(b, c), b + c, 0.5)))
