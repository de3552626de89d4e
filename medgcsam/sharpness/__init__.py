"""Hessian sharpness (Lanczos, power iteration, Hutchinson, SLQ) and filter-normalized loss landscapes."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medgcsam.sharpness.compute import compute_landscape, compute_sharpness, fixed_batches, log_sharpness
from medgcsam.sharpness.landscape import Landscape, loss_landscape_1d, loss_landscape_2d, random_direction
from medgcsam.sharpness.operator import Batch, Criterion, HessianOperator, exact_numerics, preserved_state
from medgcsam.sharpness.spectrum import (
    Density,
    Eigen,
    Trace,
    certified,
    hutchinson_trace,
    lanczos,
    lanczos_top_eigs,
    measured_residuals,
    power_iteration,
    slq_density,
    start_vector,
)


def hvp(model: nn.Module, batches: Sequence[Batch], v: torch.Tensor, criterion: Criterion | None = None,
        method: str = "rev") -> torch.Tensor:
    """One Hessian-vector product of the mean loss over ``batches`` with a flat vector ``v``."""
    criterion = F.cross_entropy if criterion is None else criterion
    return HessianOperator(model, batches, criterion, method=method, graph_memory=0)(v)  # nothing to reuse


__all__ = [
    "Density",
    "Eigen",
    "HessianOperator",
    "Landscape",
    "Trace",
    "certified",
    "compute_landscape",
    "compute_sharpness",
    "exact_numerics",
    "fixed_batches",
    "hutchinson_trace",
    "hvp",
    "lanczos",
    "lanczos_top_eigs",
    "log_sharpness",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "measured_residuals",
    "power_iteration",
    "preserved_state",
    "random_direction",
    "slq_density",
    "start_vector",
]
