"""Evaluation figures: confusion matrix, ROC, PR and reliability diagram (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from medgcsam.metrics import auroc, average_precision, reliability_bins, row_normalise  # noqa: E402


def confusion_figure(cm: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """Counts and row-normalised matrix side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, mat, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], row_normalise(cm), ".2f", "row-normalised")):
        shade = np.nan_to_num(mat / max(mat.max(), 1) if fmt == "d" else mat)
        ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center", fontsize=9,
                        color="white" if shade[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(class_names)), class_names, rotation=30)
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title} ({name})")
    fig.tight_layout()
    return fig


def roc_figure(probs: np.ndarray, y: np.ndarray, class_names: Sequence[str], title: str,
               operating_point: tuple[int, float, float] | None = None) -> Figure:
    """One-vs-rest ROC per class; ``operating_point`` = (class, sensitivity, specificity) is marked."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(class_names):
        if 0 < np.sum(y == k) < len(y):
            fpr, tpr, _ = roc_curve(y == k, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc(y == k, probs[:, k]):.3f})")
    if operating_point is not None:
        k, sens, spec = operating_point
        ax.plot(1 - spec, sens, "ko", label=f"operating point ({class_names[k]})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def pr_figure(probs: np.ndarray, y: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(class_names):
        if np.any(y == k):
            precision, recall, _ = precision_recall_curve(y == k, probs[:, k])
            ax.step(recall, precision, where="post",
                    label=f"{name} (AP {average_precision(y == k, probs[:, k]):.3f}, prev {np.mean(y == k):.2f})")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def reliability_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], n_bins: int, title: str) -> Figure:
    """Top-label reliability diagram for each named probability set (e.g. raw vs temperature-scaled)."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    for name, (probs, y) in curves.items():
        b = reliability_bins(probs, y, n_bins)
        ok = np.asarray(b["count"]) > 0
        ax.plot(np.asarray(b["confidence"])[ok], np.asarray(b["accuracy"])[ok], "o-", label=name)
        hist.hist(probs.max(axis=1), bins=b["edges"], alpha=0.5, label=name)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    hist.set_xlabel("confidence (max probability)")
    hist.set_ylabel("images")
    fig.tight_layout()
    return fig
