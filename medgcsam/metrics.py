"""The one definition of every classification metric: the training loop's monitor (``val_epoch/``), the clinical
evaluation and report, external validation and the experiment reports all compute and name them here.

Everything here is a pure NumPy function of (labels, probabilities) so it can be checked against
scikit-learn and reused inside the bootstrap without re-running the model. Undefined ratios
(0/0) are NaN, never 0: a class with no positives has no sensitivity, and saying 0 would lie. Model selection
uses the same convention: an epoch whose monitored figure is NaN selects nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

# The names of the figures, in report order.
RATIOS = ("sensitivity", "specificity", "ppv", "npv", "f1")  # per class (one-vs-rest) and at the operating point
RANKING = ("auroc", "pr_auc")  # per class, threshold-free
SUMMARY = ("accuracy", "balanced_accuracy", "auroc_macro", "pr_auc_macro", "ece", "brier", "nll")  # per split
BY_SOURCE = ("accuracy", "balanced_accuracy", "auroc_macro")  # per data source within a split
MONITOR = ("loss", "accuracy", "balanced_accuracy", "auroc")  # per epoch on validation (``monitor``, + the loss)
MONITOR_PER_CLASS = ("precision", "sensitivity", "f1", "support")
LABELS = {"ppv": "PPV", "npv": "NPV", "f1": "F1", "auroc": "AUROC", "pr_auc": "PR-AUC", "auroc_macro": "AUROC macro",
          "balanced_accuracy": "balanced accuracy"}  # how a report heads a column; others as named


def label(name: str) -> str:
    return LABELS.get(name, name)


def defined(key: str) -> bool:
    """Whether an MLflow metric key names a figure defined here: ``val_epoch/<monitor>[/<class>]`` per epoch,
    ``<split>/<summary>``, ``<split>/<ratio or ranking>/<class>``, ``<split>/op/<ratio>`` from the evaluation.
    Other keys (``hessian_top_eig``, ``train/...``) are not classification metrics and are not judged."""
    split, _, rest = key.partition("/")
    name, _, tail = rest.partition("/")
    if split == "val_epoch":
        return (name in MONITOR and not tail) or (name in MONITOR_PER_CLASS and bool(tail))
    if split not in ("val", "test", "external"):
        return True
    if name == "op":
        return tail in RATIOS
    return (name in SUMMARY and not tail) or (name in RATIOS + RANKING and bool(tail)) or rest == "ece_calibrated"


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def confusion(y: np.ndarray, yhat: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts, rows = truth, columns = prediction."""
    return np.bincount(y * num_classes + yhat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def row_normalise(cm: np.ndarray) -> np.ndarray:
    """Rows sum to 1 (per-class recall on the diagonal); empty rows stay NaN."""
    rows = cm.sum(axis=1, keepdims=True).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, cm / np.where(rows > 0, rows, 1), np.nan)


def binary_counts(pred_pos: np.ndarray, true_pos: np.ndarray) -> dict[str, float]:
    """TP/FN/FP/TN and the four clinical ratios plus F1 for one yes/no decision."""
    pred_pos, true_pos = np.asarray(pred_pos, bool), np.asarray(true_pos, bool)
    tp = int(np.sum(pred_pos & true_pos))
    fn = int(np.sum(~pred_pos & true_pos))
    fp = int(np.sum(pred_pos & ~true_pos))
    tn = int(np.sum(~pred_pos & ~true_pos))
    return _ratios_from_counts(tp, fn, fp, tn)


def _ratios_from_counts(tp: int, fn: int, fp: int, tn: int) -> dict[str, float]:
    return {
        "tp": tp, "fn": fn, "fp": fp, "tn": tn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }  # the keys of RATIOS


def per_class(cm: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """One-vs-rest counts and ratios for every class from the confusion matrix."""
    total = int(cm.sum())
    out = {}
    for k, name in enumerate(class_names):
        tp = int(cm[k, k])
        fn = int(cm[k].sum()) - tp
        fp = int(cm[:, k].sum()) - tp
        out[name] = _ratios_from_counts(tp, fn, fp, total - tp - fn - fp)
    return out


def auroc(y_bin: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney statistic (ties count one half); NaN with one class."""
    y_bin = np.asarray(y_bin, bool)
    n_pos, n_neg = int(y_bin.sum()), int((~y_bin).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y_bin].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_bin: np.ndarray, score: np.ndarray) -> float:
    """PR-AUC as step-wise average precision (scikit-learn's definition); NaN with one class, like AUROC
    (without negatives every precision is 1, which says nothing about discrimination)."""
    y_bin = np.asarray(y_bin, bool)
    n_pos = int(y_bin.sum())
    if n_pos == 0 or n_pos == len(y_bin):
        return float("nan")
    order = np.argsort(-np.asarray(score), kind="mergesort")
    s, yb = np.asarray(score)[order], y_bin[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(yb)[last_of_tie]
    seen = np.flatnonzero(last_of_tie) + 1
    precision, recall = tp / seen, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins (Guo et al. 2017): sum_b |acc_b - conf_b| n_b/N."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    # bins (lo, hi]; confidence 0 cannot occur for a softmax, so the first bin is closed in practice
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    gap = np.abs(np.bincount(idx, weights=correct, minlength=n_bins) - np.bincount(idx, weights=conf, minlength=n_bins))
    return float(gap.sum() / len(y))


def reliability_bins(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count for the reliability diagram."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    n = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(idx, weights=correct, minlength=n_bins) / n
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / n
    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "confidence": mean_conf.tolist(),
            "accuracy": acc.tolist(), "count": n.tolist()}


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multiclass Brier score: mean over images of sum_k (p_k - [y = k])^2 (range 0..2)."""
    onehot = np.eye(probs.shape[1])[y]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class.

    Clipped only at float64's smallest normal number, so a confident error counts in full (a clip at 1e-12
    capped each image at 27.6 nats); float64 softmax probabilities reach that floor only for logit gaps
    beyond about 708."""
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], np.finfo(np.float64).tiny, None))))


def headline(probs: np.ndarray, y: np.ndarray, class_names: Sequence[str], n_bins: int = 15,
             threshold: tuple[int, float] | None = None, macro_classes: np.ndarray | None = None) -> dict[str, float]:
    """Flat dict of every scalar figure of one split (the bootstrap's statistic).

    ``threshold`` = (positive class index, value) adds the frozen operating point's ratios. The macro figures
    (balanced accuracy, AUROC, PR-AUC) average over ``macro_classes``, by default the classes present in ``y``.
    A bootstrap passes the whole split's set, so a resample that lacks one of those classes gets NaN (skipped,
    and counted by ``n_valid``) instead of an average over fewer classes mixed into the interval.
    """
    k = len(class_names)
    check_predictions(probs, y, class_names)
    present = np.unique(y) if macro_classes is None else np.asarray(macro_classes, int)
    cm = confusion(y, probs.argmax(axis=1), k)
    out: dict[str, float] = {"accuracy": _ratio(np.trace(cm), cm.sum())}
    pc = per_class(cm, class_names)
    out["balanced_accuracy"] = _macro([pc[c]["sensitivity"] for c in class_names], present)
    for c in class_names:
        for key in RATIOS:
            out[f"{key}/{c}"] = pc[c][key]
    aurocs = [auroc(y == i, probs[:, i]) for i in range(k)]
    aps = [average_precision(y == i, probs[:, i]) for i in range(k)]
    for i, c in enumerate(class_names):
        out[f"auroc/{c}"] = aurocs[i]
        out[f"pr_auc/{c}"] = aps[i]
    # binary tasks: both one-vs-rest AUROCs are the same number, macro = that number
    out["auroc_macro"] = _macro(aurocs, present)
    out["pr_auc_macro"] = _macro(aps, present)
    out["ece"] = expected_calibration_error(probs, y, n_bins)
    out["brier"] = brier(probs, y)
    out["nll"] = nll(probs, y)
    if threshold is not None:
        pos, value = threshold
        op = binary_counts(probs[:, pos] >= value, y == pos)
        for key in RATIOS:
            out[f"op/{key}"] = op[key]
    return out


def monitor(probs: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """The figures the training loop logs per epoch on validation and selects the kept epoch by: accuracy,
    balanced accuracy (over the classes present, as ``headline``), macro AUROC over every class (NaN when one is
    missing from the split or the probabilities are not finite: that epoch selects nothing) and per class
    precision (PPV), sensitivity, F1 (NaN for 0/0) and support."""
    k = len(class_names)
    check_predictions(probs, y, class_names)
    cm = confusion(y, probs.argmax(axis=1), k)
    pc = per_class(cm, class_names)
    finite = bool(np.isfinite(probs).all())
    aurocs = [auroc(y == i, probs[:, i]) if finite else float("nan") for i in range(k)]
    out = {"accuracy": _ratio(np.trace(cm), cm.sum()),
           "balanced_accuracy": _macro([pc[c]["sensitivity"] for c in class_names], np.unique(y)),
           "auroc": _macro(aurocs, np.arange(k))}
    for i, c in enumerate(class_names):
        out[f"precision/{c}"] = pc[c]["ppv"]
        out[f"sensitivity/{c}"] = pc[c]["sensitivity"]
        out[f"f1/{c}"] = pc[c]["f1"]
        out[f"support/{c}"] = float(cm[i].sum())
    return out


def _macro(values: list[float], classes: np.ndarray) -> float:
    """Mean over ``classes``; NaN when any of them is undefined (absent, or the only class present)."""
    return float(np.mean(np.asarray(values, float)[classes])) if len(classes) else float("nan")


def check_predictions(probs: np.ndarray, y: np.ndarray, class_names: Sequence[str]) -> None:
    """Refuse scores and labels that do not fit the model's classes, before they become a reshape error."""
    k = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != k or len(probs) != len(y):
        raise ValueError(f"scores of shape {probs.shape} for {len(y)} labels do not fit the model's {k} classes "
                         f"{list(class_names)}; the model's head and its class list disagree")
    bad = np.flatnonzero((y < 0) | (y >= k))
    if len(bad):
        raise ValueError(f"{len(bad)} label(s) outside 0..{k - 1} (first at position {bad[0]}: {y[bad[0]]}); "
                         f"the labels were not encoded with this model's classes {list(class_names)}")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    n_valid: int


def bootstrap_ci(
    statistic: Callable[[np.ndarray], dict[str, float]],
    n: int,
    *,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile bootstrap intervals for every key of ``statistic(indices)``.

    With ``groups`` (patient ids) whole groups are drawn with replacement (cluster bootstrap), so
    images of one patient never count as independent evidence. Resamples where a figure is
    undefined (NaN, e.g. AUROC without positives) are skipped for that figure; ``n_valid`` says how
    many were used.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(n)]
    else:
        _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in pick]) if groups is not None else pick
        for key, value in statistic(idx).items():
            draws.setdefault(key, []).append(value)
    alpha = (1.0 - confidence) / 2
    out = {}
    for key, values in draws.items():
        arr = np.asarray(values, float)
        arr = arr[np.isfinite(arr)]
        if len(arr) == 0:
            out[key] = Interval(float("nan"), float("nan"), 0)
        else:
            lo, hi = np.quantile(arr, [alpha, 1 - alpha])
            out[key] = Interval(float(lo), float(hi), len(arr))
    return out
