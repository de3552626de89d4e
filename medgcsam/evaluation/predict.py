"""Model outputs for a whole split, in dataset order, kept as float64 logits on the host."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from medgcsam.progress import progress


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y, ...)`` tuples or ``{"image": x, "label": y}`` dicts -> ``(x, y)``."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise ValueError(f"batch dict needs keys 'image' and 'label'; got {sorted(batch)}")
        return batch["image"], torch.as_tensor(batch["label"])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise ValueError(f"cannot read a batch of type {type(batch).__name__}; expected (image, label, ...) or a dict")


@torch.no_grad()
def predict_split(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                  desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, K) and integer labels (N,) in loader order; the model's mode is restored afterwards.
    With ``desc``, progress goes to stderr (a whole split on a CPU takes minutes)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in progress(loader, desc=desc, unit="batch") if desc else loader:
            x, y = split_batch(batch)
            logits.append(model(x.to(device)).float())
            labels.append(y.reshape(-1))
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("the split is empty: no batches to predict")
    return torch.cat(logits).cpu().double().numpy(), torch.cat(labels).cpu().long().numpy()
