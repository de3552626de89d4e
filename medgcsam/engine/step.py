"""One optimizer step on one micro-batch: every pass of the optimizer, no host synchronization.

Shared by the training loop and ``benchmarks/train_step.py`` so the benchmark times the real step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from medgcsam.engine.metrics import TrainMeter
from medgcsam.optim import WrappedOptimizer


def autocast_factory(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16/fp16 autocast on CUDA (``cache_enabled=False`` keeps it graph-capturable); plain fp32 elsewhere."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.type == "cuda" else None
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def train_step(model: nn.Module, opt: WrappedOptimizer, criterion: nn.Module, images: torch.Tensor,
               labels: torch.Tensor, *, autocast: Callable[[], contextlib.AbstractContextManager],
               scaler: torch.amp.GradScaler | None = None, no_sync: frozenset[int] = frozenset(),
               meter: TrainMeter | None = None) -> None:
    """Run ``opt.passes_per_step`` forward/backward passes; DDP passes in ``no_sync`` skip the all-reduce.

    The loss and accuracy of the first pass (at the unperturbed weights) go into ``meter`` on the device.
    """
    for p in range(opt.passes_per_step):
        sync = model.no_sync() if p in no_sync else contextlib.nullcontext()
        with sync:
            with autocast():
                logits = model(images)
            loss = criterion(logits.float(), labels)
            if p == 0 and meter is not None:
                meter.update(loss, logits, labels)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            opt.after_backward(p)
