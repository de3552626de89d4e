"""The training state, which is the checkpoint: one list of fields, written and read back by the same two methods.

``state_dict`` gives what ``medgcsam.checkpoint.save_pair`` writes (tensors and primitives only, loadable with
``weights_only=True``); ``load_state_dict`` puts a checkpoint back. The objects (model, optimizer, schedule,
GradScaler) are saved through their own ``state_dict``; the loop's progress fields under their own names; the
``metadata`` a caller attaches (config, model card, manifest hash) is written as it is and read by that caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from medgcsam.checkpoint import capture_rng
from medgcsam.engine.metrics import TrainMeter
from medgcsam.optim import WrappedOptimizer

OBJECTS = ("model", "optimizer", "scheduler", "scaler")


@dataclass
class TrainState:
    """The model and its optimizer, schedule and scaler, and where the loop stands (epoch and step 0-based)."""

    model: nn.Module  # the bare module, not a DistributedDataParallel wrapper
    optimizer: WrappedOptimizer
    scheduler: Any = None  # an LR scheduler on optimizer.base (anything with state_dict/load_state_dict)
    scaler: torch.amp.GradScaler | None = None
    epoch: int = 0
    step: int = 0  # optimizer micro-steps done in ``epoch``
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    epoch_times: list[float] = field(default_factory=list)
    grad_trace: list[list[float]] = field(default_factory=list)  # [global step, ||g||, ||GC(g)||]
    mlflow_run_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def progress_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in (*OBJECTS, "metadata")]

    def state_dict(self, meter: TrainMeter | None = None) -> dict[str, Any]:
        """The checkpoint: weights and optimizer state at the clean point (MSAM), RNG states, progress, the
        epoch's meter when taken mid-epoch, and the metadata."""
        with self.optimizer.unperturbed():
            model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            optimizer_state = self.optimizer.state_dict()
        return {
            "model": model_state, "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "rng": capture_rng(),
            **{name: getattr(self, name) for name in self.progress_fields()},
            "meter": meter.state_dict() if meter is not None else {}, **self.metadata,
        }

    def load_state_dict(self, payload: dict[str, Any]) -> None:
        """Put a checkpoint back into the objects and the progress fields (RNG and meter: see ``pending``)."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload["scheduler"]:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload["scaler"]:
            self.scaler.load_state_dict(payload["scaler"])
        for name in self.progress_fields():
            setattr(self, name, payload[name])


def pending(payload: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The RNG states and meter of a checkpoint taken mid-epoch, which the loop restores once it has replayed
    that epoch's loader up to the saved step; (None, None) at an epoch boundary."""
    if payload is None or payload["step"] == 0:
        return None, None
    return payload["rng"], payload["meter"]
