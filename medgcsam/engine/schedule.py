"""Learning-rate schedules, per optimizer step: linear warmup then cosine decay (or constant)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from medgcsam.config import TrainConfig


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """A callable object, not a closure, so ``LambdaLR.state_dict`` stores its plain fields."""

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.total = cfg.epochs * steps_per_epoch
        self.warmup = round(cfg.warmup_epochs * steps_per_epoch)
        self.kind, self.min_ratio = cfg.scheduler, cfg.min_lr_ratio

    def __call__(self, step: int) -> float:
        return lr_factor(step, total_steps=self.total, warmup_steps=self.warmup, kind=self.kind,
                         min_ratio=self.min_ratio)


class ScheduledLR(LambdaLR):
    """``LambdaLR`` that also drives a graph-safe optimizer (``medgcsam.optim.make_graph_safe_``).

    There the group LR is a 0-dim device tensor that a captured step reads on the device; torch's scheduler
    ``fill_``s such a tensor in place (no host sync, the same storage the graph recorded) instead of replacing
    it. ``get_last_lr`` stays a list of floats for logging either way (one sync, between steps)."""

    def get_last_lr(self) -> list[float]:
        return [float(v) for v in super().get_last_lr()]


def build_scheduler(optimizer: Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Attach to the *base* optimizer: the SAM wrappers never call ``step()`` themselves."""
    return ScheduledLR(optimizer, WarmupCosine(cfg, steps_per_epoch))
