"""Hessian sharpness (Lanczos, power iteration, Hutchinson, SLQ) and filter-normalized loss landscapes."""

from medgcsam.sharpness.compute import compute_landscape, compute_sharpness, fixed_batches, log_sharpness
from medgcsam.sharpness.landscape import Landscape, loss_landscape_1d, loss_landscape_2d, random_direction
from medgcsam.sharpness.operator import HessianOperator, exact_numerics, preserved_state
from medgcsam.sharpness.spectrum import (
    Density,
    Eigen,
    Trace,
    hutchinson_trace,
    lanczos,
    lanczos_top_eigs,
    power_iteration,
    slq_density,
    start_vector,
)


def hvp(model, batches, v, criterion=None, method: str = "rev"):
    """One Hessian-vector product of the mean loss over ``batches`` with a flat vector ``v``."""
    op = HessianOperator(model, batches, method=method) if criterion is None else \
        HessianOperator(model, batches, criterion, method=method)
    return op(v)


__all__ = [
    "Density",
    "Eigen",
    "HessianOperator",
    "Landscape",
    "Trace",
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
    "power_iteration",
    "preserved_state",
    "random_direction",
    "slq_density",
    "start_vector",
]
