"""The paper's selection rule over cross-validated candidates.

"When two candidates differ by less than one pooled standard deviation, take the simpler":
candidates are put in a fixed simplicity order, the best mean score is found, and the chosen
candidate is the *first in simplicity order* whose mean is within one pooled SD (of its own and
the best candidate's fold x seed scores) of the best. The best always qualifies, so the rule
never picks something worse than "simpler than the best and statistically indistinguishable".

Simplicity order (most simple first), compared lexicographically:
1. fewer forward+backward passes per step (PASSES: Adam/GC-Adam/MSAM 1, SAM family 2, CR-SAM 3);
2. fewer settings that differ from the method's preset (the authors' defaults);
3. smaller total distance from the preset over the differing numeric settings
   (|log10(v / default)| when both are positive, otherwise |v - default|; a non-numeric change counts 1);
4. the order in which the candidates are listed in the experiment file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .presets import PASSES
from .stats import pooled_sd


def simplicity_key(settings: dict[str, Any], preset: dict[str, Any], order: int) -> tuple[int, int, float, int]:
    method = str(settings.get("optimizer.name"))
    if method not in PASSES:  # its cost is unknown, so "simpler" cannot be decided
        raise ValueError(f"optimizer.name {method!r} is not a registered optimizer ({sorted(PASSES)})")
    passes = PASSES[method]
    changed = [k for k in settings if k not in preset or settings[k] != preset[k]]
    distance = 0.0
    for k in changed:
        v, d = settings[k], preset.get(k)
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (v, d))
        if numeric and v > 0 and d > 0:
            distance += abs(math.log10(v / d))
        elif numeric:
            distance += abs(v - d)
        else:
            distance += 1.0
    return passes, len(changed), round(distance, 12), order


@dataclass
class CandidateResult:
    """CV scores of one candidate (one value per fold x seed) and where it ranks."""

    index: int
    settings: dict[str, Any]
    scores: list[float]
    key: tuple[int, int, float, int]
    mean: float = math.nan
    sd: float = math.nan
    gap_to_best: float = math.nan
    pooled_sd_with_best: float = math.nan
    within_one_sd: bool = False
    chosen: bool = False


def select(results: list[CandidateResult], mode: str = "max") -> CandidateResult:
    """Apply the rule in place (fills mean, gaps and flags of every candidate) and return the chosen one."""
    if not results:
        raise ValueError("no candidates to select from")
    for r in results:
        x = np.asarray(r.scores, dtype=float)
        if x.size == 0 or np.isnan(x).any():
            raise ValueError(f"candidate {r.index} ({r.settings}) has missing CV scores; finish its cells first")
        r.mean = float(x.mean())
        r.sd = float(x.std(ddof=1)) if x.size > 1 else math.nan
    sign = 1.0 if mode == "max" else -1.0
    best = max(results, key=lambda r: (sign * r.mean, [-k for k in r.key[:3]], -r.key[3]))
    for r in results:
        r.gap_to_best = sign * (best.mean - r.mean)
        r.pooled_sd_with_best = pooled_sd(r.scores, best.scores)
        r.within_one_sd = r is best or (r.gap_to_best < r.pooled_sd_with_best)
    chosen = min((r for r in results if r.within_one_sd), key=lambda r: r.key)
    chosen.chosen = True
    return chosen
