"""Operating points: a threshold on p(positive class) chosen on validation, then frozen.

Registry of rules keyed by name, like the rest of medgcsam. The threshold is always one of the
observed validation scores, so "p >= t" reproduces exactly the validation sensitivity it was
chosen for.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from medgcsam.models.spec import Threshold


def _roc_points(probs_pos: np.ndarray, y_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct candidate thresholds (descending) with the TPR and FPR of ``p >= t``."""
    order = np.argsort(-probs_pos, kind="mergesort")
    s, yb = probs_pos[order], y_pos[order].astype(bool)
    last = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(yb)[last]
    fp = np.cumsum(~yb)[last]
    return s[last], tp / max(int(yb.sum()), 1), fp / max(int((~yb).sum()), 1)


def _youden(probs_pos: np.ndarray, y_pos: np.ndarray, target_sensitivity: float | None) -> tuple[float, str]:
    thr, tpr, fpr = _roc_points(probs_pos, y_pos)
    best = int(np.argmax(tpr - fpr))  # first maximum = highest threshold among ties
    return float(thr[best]), "youden"


def _sensitivity(probs_pos: np.ndarray, y_pos: np.ndarray, target_sensitivity: float | None) -> tuple[float, str]:
    if target_sensitivity is None:
        raise ValueError("operating point rule 'sensitivity' needs target_sensitivity (e.g. 0.95)")
    thr, tpr, _ = _roc_points(probs_pos, y_pos)
    # the highest threshold reaching the target keeps specificity as high as possible
    ok = np.flatnonzero(tpr >= target_sensitivity - 1e-12)
    return float(thr[ok[0]]), f"sensitivity>={target_sensitivity:g}"


RULES: dict[str, Callable[[np.ndarray, np.ndarray, float | None], tuple[float, str]]] = {
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
    value, name = RULES[rule](probs_pos, y_pos, target_sensitivity)
    return Threshold(positive_class=positive_class, value=float(np.clip(value, 0.0, 1.0)), rule=name)
