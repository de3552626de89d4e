"""Metrics kept on the device during an epoch (no host sync per step), and validation metrics.

The training meter is a handful of 0-dim tensors and a preallocated gradient-norm trace; they are
read once per epoch (or when the progress bar refreshes), never inside a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medgcsam.metrics import monitor

# Per-epoch validation curves live under ``val_epoch/``; ``val/`` and ``test/`` belong to the evaluation of
# the kept model, so MLflow's latest ``val/...`` value is that model's, not the last epoch's.
EPOCH_PREFIX = "val_epoch"
MONITOR_KEYS = {"val_loss": f"{EPOCH_PREFIX}/loss", "val_accuracy": f"{EPOCH_PREFIX}/accuracy",
                "val_balanced_accuracy": f"{EPOCH_PREFIX}/balanced_accuracy", "val_auroc": f"{EPOCH_PREFIX}/auroc"}


class StepRecord:
    """One step's loss sum and correct count in fixed device tensors.

    A captured step writes here (its buffers are baked into the graph), and ``TrainMeter.add`` folds it into
    the epoch's meter after each replay: the loop makes a new meter per epoch, the graph is captured once."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.count = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.count = labels.shape[0]
        self.loss_sum.copy_(loss.detach().double() * self.count)
        self.correct.copy_((logits.detach().argmax(1) == labels).sum())


class TrainMeter:
    """Running loss sum, correct count, sample count and the per-step (||g||, ||GC(g)||) trace of an epoch."""

    def __init__(self, device: torch.device, max_steps: int) -> None:
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.count = torch.zeros((), device=device, dtype=torch.int64)
        self.trace = torch.full((max_steps, 2), float("nan"), device=device)
        self.trace_steps: list[int] = []
        self.images_per_s = float("nan")

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = labels.shape[0]
        self.loss_sum += loss.detach().double() * n
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.count += n

    def add(self, record: StepRecord) -> None:
        """Fold in one step a CUDA graph wrote (same arithmetic as ``update``, so the sums match eager)."""
        self.loss_sum += record.loss_sum
        self.correct += record.correct
        self.count += record.count

    def record_grad_norms(self, global_step: int, stats: dict[str, torch.Tensor], *, centralized: bool) -> None:
        """Copy the optimizer's 0-dim norm tensors into the trace (device to device, no sync).

        ``centralized``: the step applied gradient centralization, so ``grad_norm_gc`` is this step's value
        (otherwise the column stays NaN: plain optimizers and warm-start epochs have no GC norm).
        """
        row = len(self.trace_steps)
        if "grad_norm" not in stats or row >= self.trace.shape[0]:
            return
        self.trace[row, 0].copy_(stats["grad_norm"])
        if centralized and "grad_norm_gc" in stats:
            self.trace[row, 1].copy_(stats["grad_norm_gc"])
        self.trace_steps.append(global_step)

    def summary(self) -> dict[str, float]:
        """Host values (one sync); NaN when nothing was seen."""
        count = int(self.count)
        if count == 0:
            return {"loss": float("nan"), "accuracy": float("nan")}
        return {"loss": float(self.loss_sum) / count, "accuracy": int(self.correct) / count}

    def grad_norm_rows(self) -> list[tuple[int, float, float]]:
        values = self.trace[: len(self.trace_steps)].cpu().tolist()
        return [(s, a, b) for s, (a, b) in zip(self.trace_steps, values, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "count": self.count.cpu(),
                "trace": self.trace.cpu(), "trace_steps": list(self.trace_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("loss_sum", "correct", "count", "trace"):
            getattr(self, name).copy_(state[name])
        self.trace_steps = list(state["trace_steps"])


def classification_metrics(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                           prefix: str = EPOCH_PREFIX) -> dict[str, float]:
    """Cross-entropy loss and ``medgcsam.metrics.monitor``'s figures under ``prefix``."""
    logits_t = torch.from_numpy(logits).double()
    labels_t = torch.from_numpy(labels).long()
    probs = torch.softmax(logits_t, 1).numpy()
    out = {f"{prefix}/loss": float(torch.nn.functional.cross_entropy(logits_t, labels_t))}
    out.update({f"{prefix}/{k}": v for k, v in monitor(probs, labels.astype(np.int64), class_names).items()})
    return out


def is_improvement(value: float, best: float | None, monitor: str) -> bool:
    if np.isnan(value):
        return False
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best
