"""Filter-normalized loss landscapes (Li et al., NeurIPS 2018).

A random Gaussian direction is rescaled filter by filter (slices along dim 0 of every weight with
ndim > 1: conv output channels, linear output rows) to the norm of the matching weight slice, and
1-D tensors (biases, norm scales/shifts) are zeroed. This makes the picture invariant to the
rescalings ReLU networks allow, so flatness can be compared between models. The loss is the
sample-mean criterion over fixed batches in eval mode; weights are restored bitwise afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medgcsam.progress import progress
from medgcsam.sharpness.operator import Batch, Criterion, exact_numerics, preserved_state


def _filter(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if w.ndim <= 1:
        return torch.zeros_like(d)
    dn = d.reshape(len(d), -1).norm(dim=1)
    wn = w.reshape(len(w), -1).norm(dim=1)
    return d * (wn / (dn + 1e-10)).view(-1, *([1] * (d.ndim - 1)))


def _none(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return d


NORMALIZATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"filter": _filter, "none": _none}


def random_direction(model: nn.Module, seed: int, normalization: str = "filter") -> list[torch.Tensor]:
    """One direction tensor per parameter, drawn on CPU from ``seed`` (device-independent)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {sorted(NORMALIZATIONS)}")
    g = torch.Generator().manual_seed(seed)
    norm = NORMALIZATIONS[normalization]
    out = []
    for p in model.parameters():
        d = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=p.device, dtype=p.dtype)
        out.append(norm(d, p.detach()))
    return out


@dataclass
class Landscape:
    """Loss and accuracy on a grid; ``loss`` has shape (len(alphas),) or (len(alphas), len(betas))."""

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    seed: int
    normalization: str

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"alphas": self.alphas, "loss": self.loss, "accuracy": self.accuracy}
        if self.betas is not None:
            out["betas"] = self.betas
        return out


def _evaluate(model: nn.Module, batches: Sequence[Batch], criterion: Criterion) -> tuple[float, float]:
    total, loss, correct = 0, torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for x, y in batches:
        out = model(x)
        loss = loss + criterion(out, y).double() * len(y)
        correct = correct + (out.argmax(dim=1) == y).sum()
        total += len(y)
    return float(loss / total), float(correct / total)


def _sweep(model: nn.Module, batches: Sequence[Batch], criterion: Criterion, directions: list[list[torch.Tensor]],
           coords: list[tuple[float, ...]]) -> tuple[np.ndarray, np.ndarray]:
    device = next(model.parameters()).device
    staged = [(x.to(device), y.to(device)) for x, y in batches]
    losses, accs = [], []
    with preserved_state(model), torch.no_grad(), exact_numerics():
        params = list(model.parameters())
        origin = [p.detach().clone() for p in params]
        for c in progress(coords, desc=f"landscape {len(directions)}-D", unit="point"):
            for i, p in enumerate(params):
                p.copy_(origin[i])
                for coef, d in zip(c, directions, strict=True):
                    p.add_(d[i], alpha=coef)
            loss, acc = _evaluate(model, staged, criterion)
            losses.append(loss)
            accs.append(acc)
    return np.asarray(losses), np.asarray(accs)


def loss_landscape_1d(model: nn.Module, batches: Sequence[Batch], criterion: Criterion = F.cross_entropy, *,
                      alphas: np.ndarray | None = None, seed: int = 0, normalization: str = "filter") -> Landscape:
    """Loss along theta + alpha d for one random direction (default 21 points on [-1, 1])."""
    alphas = np.linspace(-1, 1, 21) if alphas is None else np.asarray(alphas, float)
    d = random_direction(model, seed, normalization)
    loss, acc = _sweep(model, batches, criterion, [d], [(float(a),) for a in alphas])
    return Landscape(alphas, None, loss, acc, seed, normalization)


def loss_landscape_2d(model: nn.Module, batches: Sequence[Batch], criterion: Criterion = F.cross_entropy, *,
                      alphas: np.ndarray | None = None, betas: np.ndarray | None = None, seed: int = 0,
                      normalization: str = "filter") -> Landscape:
    """Loss on theta + alpha d1 + beta d2 for two independent directions (seeds ``seed``, ``seed + 1``)."""
    alphas = np.linspace(-1, 1, 11) if alphas is None else np.asarray(alphas, float)
    betas = alphas if betas is None else np.asarray(betas, float)
    d1 = random_direction(model, seed, normalization)
    d2 = random_direction(model, seed + 1, normalization)
    coords = [(float(a), float(b)) for a in alphas for b in betas]
    loss, acc = _sweep(model, batches, criterion, [d1, d2], coords)
    shape = (len(alphas), len(betas))
    return Landscape(alphas, betas, loss.reshape(shape), acc.reshape(shape), seed, normalization)
