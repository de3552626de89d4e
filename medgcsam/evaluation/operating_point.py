"""Operating points: a threshold on p(positive class) chosen on validation, then frozen.

Registry of rules keyed by name, like the rest of medgcsam. A rule picks an observed validation
score ``s`` (the decision ``p >= s``); the stored threshold is the midpoint between ``s`` and the next
lower observed score. It makes the same decisions on validation, and a validation image scored again
in another precision (float32 or bf16 at inference, float64 here) does not flip at the boundary.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medgcsam.models.spec import Threshold


def _roc_points(probs_pos: np.ndarray, y_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct observed scores (descending) with the true- and false-positive counts of ``p >= score``."""
    order = np.argsort(-probs_pos, kind="mergesort")
    s, yb = probs_pos[order], y_pos[order].astype(bool)
    last = np.r_[np.diff(s) != 0, True]
    return s[last], np.cumsum(yb)[last], np.cumsum(~yb)[last]


def _youden(scores: np.ndarray, tp: np.ndarray, fp: np.ndarray, target_sensitivity: float | None) -> tuple[int, str]:
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    # J * n_pos * n_neg in integers, so ties are exact; the first maximum is the highest score among them
    return int(np.argmax(tp * n_neg - fp * n_pos)), "youden"


def _sensitivity(scores: np.ndarray, tp: np.ndarray, fp: np.ndarray,
                 target_sensitivity: float | None) -> tuple[int, str]:
    if target_sensitivity is None:
        raise ValueError("operating point rule 'sensitivity' needs target_sensitivity (e.g. 0.95)")
    # the highest score reaching the target keeps specificity as high as possible
    ok = np.flatnonzero(tp / tp[-1] >= target_sensitivity - 1e-12)
    return int(ok[0]), f"sensitivity>={target_sensitivity:g}"


RULES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, float | None], tuple[int, str]]] = {
    "youden": _youden,
    "sensitivity": _sensitivity,
}


def choose_threshold(
    probs_pos: np.ndarray,
    y_pos: np.ndarray,
    rule: str = "youden",
    target_sensitivity: float | None = None,
    positive_class: str = "positive",
) -> Threshold:
    """Pick ``t`` so that ``p(positive) >= t`` is the decision; needs both classes present."""
    probs_pos = np.asarray(probs_pos, np.float64)
    y_pos = np.asarray(y_pos).astype(bool)
    if rule not in RULES:
        raise ValueError(f"unknown operating point rule {rule!r}; choose one of {sorted(RULES)}")
    if probs_pos.shape != y_pos.shape or probs_pos.ndim != 1:
        raise ValueError(f"probs_pos {probs_pos.shape} and y_pos {y_pos.shape} must be 1-D of equal length")
    if y_pos.all() or not y_pos.any():
        raise ValueError(f"cannot choose an operating point for {positive_class!r}: the validation split has "
                         f"{int(y_pos.sum())} positives and {int((~y_pos).sum())} negatives; both are needed")
    scores, tp, fp = _roc_points(probs_pos, y_pos)
    best, name = RULES[rule](scores, tp, fp, target_sensitivity)
    below = scores[best + 1] if best + 1 < len(scores) else 0.0
    value = (scores[best] + below) / 2
    return Threshold(positive_class=positive_class, value=float(np.clip(value, 0.0, 1.0)), rule=name)
