"""Seed statistics, paired tests and the selection rule."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from medgcsam.experiments import (
    CandidateResult,
    mcnemar_exact,
    paired_comparison,
    pooled_sd,
    select,
    sign_flip_pvalue,
    simplicity_key,
    summarize,
)


def test_summary_matches_scipy_t_interval():
    x = [0.81, 0.78, 0.85, 0.80]
    s = summarize(x, 0.95)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
    assert s.n == 4 and s.mean == pytest.approx(np.mean(x)) and s.sd == pytest.approx(np.std(x, ddof=1))
    assert (s.low, s.high) == pytest.approx((low, high))
    assert summarize([0.5, math.nan, 0.7]).n == 2
    one = summarize([0.5])
    assert one.n == 1 and math.isnan(one.sd) and math.isnan(one.low)


def test_sign_flip_exact_values():
    assert sign_flip_pvalue([0.01, 0.02, 0.03]) == pytest.approx(2 / 8)  # all same sign: the floor with 3 seeds
    d = np.array([0.3, -0.1, 0.2, 0.05, -0.02])
    brute = np.mean([abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12
                     for s in itertools.product((1, -1), repeat=d.size)])
    assert sign_flip_pvalue(d) == pytest.approx(brute)
    assert sign_flip_pvalue([0.0, 0.0]) == 1.0


def test_paired_comparison_uses_matched_differences():
    method, base = [0.80, 0.82, 0.79], [0.75, 0.80, 0.78]
    p = paired_comparison(method, base)
    d = np.subtract(method, base)
    assert p.n == 3 and p.mean_diff == pytest.approx(d.mean())
    assert (p.low, p.high) == pytest.approx(stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d)))
    assert (p.wins, p.losses) == (3, 0) and p.p_sign_flip == pytest.approx(0.25)
    assert paired_comparison([0.8, math.nan, 0.7], [0.7, 0.6, math.nan]).n == 1
    with pytest.raises(ValueError, match="matched seeds"):
        paired_comparison([0.8, 0.7], [0.7])


def test_mcnemar_matches_binomial_test():
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.8
    b = rng.random(200) < 0.7
    nb, nc, p = mcnemar_exact(a, b)
    assert nb == int((a & ~b).sum()) and nc == int((~a & b).sum())
    assert p == pytest.approx(stats.binomtest(nb, nb + nc, 0.5).pvalue)
    assert mcnemar_exact(a, a)[2] == 1.0


def test_pooled_sd():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0]
    expected = math.sqrt((2 * np.var(a, ddof=1) + 1 * np.var(b, ddof=1)) / 3)
    assert pooled_sd(a, b) == pytest.approx(expected)


PRESET = {"optimizer.name": "gcsam", "optimizer.rho": 0.05}


def cand(i: int, rho: float, scores: list[float], **extra) -> CandidateResult:
    settings = {**PRESET, "optimizer.rho": rho, **extra}
    return CandidateResult(i, settings, scores, simplicity_key(settings, PRESET, i))


def test_simplicity_order():
    preset = simplicity_key(PRESET, PRESET, 3)
    near = simplicity_key({**PRESET, "optimizer.rho": 0.1}, PRESET, 0)
    far = simplicity_key({**PRESET, "optimizer.rho": 0.01}, PRESET, 1)
    two = simplicity_key({**PRESET, "optimizer.rho": 0.1, "train.warm_start_epochs": 10}, PRESET, 2)
    assert preset < near < far < two  # defaults first, then fewer changes, then log-distance
    sam_like = simplicity_key({"optimizer.name": "gcsam"}, PRESET, 0)
    one_pass = simplicity_key({"optimizer.name": "adam"}, {"optimizer.name": "adam"}, 5)
    assert one_pass < sam_like  # fewer passes per step beats everything


def test_rule_takes_the_simpler_within_one_pooled_sd():
    rows = [cand(0, 0.05, [0.80, 0.78, 0.82, 0.79]), cand(1, 0.5, [0.81, 0.79, 0.83, 0.80])]
    chosen = select(rows)
    assert chosen.index == 0 and rows[1].mean > rows[0].mean  # best by mean, but not by more than 1 SD
    assert rows[0].within_one_sd and rows[0].gap_to_best < rows[0].pooled_sd_with_best


def test_rule_takes_the_best_when_clearly_better():
    rows = [cand(0, 0.05, [0.70, 0.71, 0.69, 0.70]), cand(1, 0.5, [0.80, 0.81, 0.79, 0.80])]
    assert select(rows).index == 1
    assert not rows[0].within_one_sd


def test_rule_prefers_simplest_among_several_close_ones():
    rows = [cand(0, 0.01, [0.84, 0.86, 0.85]), cand(1, 0.1, [0.84, 0.86, 0.85]),
            cand(2, 0.5, [0.845, 0.865, 0.855]), cand(3, 0.05, [0.60, 0.61, 0.59])]
    # preset (cand 3) is far worse; rho 0.1 and 0.01 are within 1 SD of the best; 0.1 is closer to the preset
    assert select(rows).index == 1
    low = [cand(0, 0.05, [0.30, 0.31, 0.29]), cand(1, 0.5, [0.20, 0.21, 0.19])]
    assert select(low, mode="min").index == 1  # loss-like metric
    with pytest.raises(ValueError, match="missing CV scores"):
        select([cand(0, 0.05, [0.8, math.nan])])
