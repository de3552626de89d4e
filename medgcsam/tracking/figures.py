"""Training curves and the gradient-norm trace as matplotlib figures (logged with ``mlflow.log_figure``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def curves_figure(history: Sequence[dict[str, float]], val_prefix: str = "val") -> Figure:
    """Loss and accuracy per epoch, train vs validation (keys ``train/...`` and ``<val_prefix>/...``)."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, label in (("train", "train"), (val_prefix, "val")):
            key = f"{prefix}/{metric}"
            if any(key in h for h in history):
                ax.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.legend()
    fig.tight_layout()
    return fig


def grad_norm_figure(steps: Sequence[int], norm: Sequence[float], norm_gc: Sequence[float]) -> Figure:
    """Per-step gradient norm before and after gradient centralization (the paper's norm figures)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, norm, label="||g|| (raw)", linewidth=0.8)
    ax.plot(steps, norm_gc, label="||GC(g)|| (centralized)", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient L2 norm")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)


def save_png(fig: Figure, path: Path) -> Path:
    """Lay out, write and close a figure (closing matters: pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
