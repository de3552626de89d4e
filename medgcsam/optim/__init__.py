"""Sharpness-aware optimizers: GCSAM and the baselines of the paper, one interface for the training loop."""

from .core import BASE_OPTIMIZERS, BatchNormBuffers, WrappedOptimizer
from .factory import check_hyperparameters, create_optimizer
from .gc import GC_TARGETS, centralize_, centralized, gc_mask
from .gc_adam import GCAdam
from .graph_safe import HostSyncError, forbid_host_sync, graph_safe_blocker, is_graph_safe, make_graph_safe_
from .msam import MSAM
from .registry import OPTIMIZERS, OptimizerRecord, optimizer_record
from .sam import ASAM, CRSAM, GCSAM, GSAM, SAM, WSAM, SharpnessAware

__all__ = [
    "ASAM", "BASE_OPTIMIZERS", "CRSAM", "GCSAM", "GC_TARGETS", "GSAM", "MSAM", "OPTIMIZERS", "SAM", "WSAM",
    "BatchNormBuffers", "GCAdam", "HostSyncError", "OptimizerRecord", "SharpnessAware", "WrappedOptimizer",
    "centralize_", "centralized", "check_hyperparameters", "create_optimizer", "forbid_host_sync", "gc_mask",
    "graph_safe_blocker", "is_graph_safe", "make_graph_safe_", "optimizer_record",
]
