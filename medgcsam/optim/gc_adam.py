"""GC on a one-pass optimizer (Yong et al., ECCV 2020), "GC-Adam" whatever the base.

``gc_placement="grad"``: centralize the gradient before the base step (Adam_GC, moments from GC(g)).
``gc_placement="update"`` (default, the GC authors' recommendation for adaptive methods): the base computes
its update from the raw gradient, then the update is centralized: w <- w_old - GC(w_old - w_new), which
keeps each weight slice's mean unchanged. Weight decay is the base's (inside the update for "update").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .core import WrappedOptimizer, sq_norm
from .gc import GC_TARGETS, gc_mask, slice_dims
from .registry import register


class GCAdam(WrappedOptimizer):
    """Gradient centralization on the gradient or on the base optimizer's update."""

    name = "gc_adam"
    hyperparameters = {"gc_placement": "update", "gc_targets": "ndim>1"}

    def __init__(self, base: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        self.gc = gc_mask(self.params, self.hp["gc_targets"], self.model)
        self.stats["grad_norm_gc"] = self._scalar(0.0)
        self._updated: list[int] = []

    @classmethod
    def validate(cls, hp: dict[str, Any]) -> None:
        if hp["gc_placement"] not in ("grad", "update"):
            raise ValueError(f"gc_adam: gc_placement must be 'grad' or 'update', got {hp['gc_placement']!r}")
        if hp["gc_targets"] not in GC_TARGETS:
            raise ValueError(f"gc_adam: gc_targets must be one of {list(GC_TARGETS)}, got {hp['gc_targets']!r}")

    def _before_base_step(self, grads: list[Tensor]) -> None:
        if self._base_only:
            return
        idx = [i for i, p in enumerate(self.params) if self.gc[i] and p.grad is not None]
        rest = [p.grad for i, p in enumerate(self.params) if not self.gc[i] and p.grad is not None]
        grads = [self.params[i].grad for i in idx]
        # ||GC(g)|| is measured on centred tensors: ||g||^2 - n ||m||^2 cancels catastrophically in float32
        if self.hp["gc_placement"] == "grad":
            for g in grads:
                g.sub_(g.mean(dim=slice_dims(g), keepdim=True))
            sq = sq_norm([*grads, *rest], self.acc_dtype, self.device)
        else:  # the base steps with the raw gradient: each centred copy lives only while it is measured
            sq = sq_norm(rest, self.acc_dtype, self.device)
            for g in grads:
                sq = sq + sq_norm([g - g.mean(dim=slice_dims(g), keepdim=True)], self.acc_dtype, self.device)
        self.stats["grad_norm_gc"].copy_(sq.sqrt())
        if self.hp["gc_placement"] == "update" and idx:
            torch._foreach_copy_(self.buffers("before", idx), self.tensors(idx))
        self._updated = idx if self.hp["gc_placement"] == "update" else []

    def _after_base_step(self) -> None:
        if not self._updated:
            return
        before = self.buffers("before", self._updated)
        torch._foreach_sub_(before, self.tensors(self._updated))  # now the update u = w_old - w_new
        for i, u in zip(self._updated, before, strict=True):
            self.params[i].add_(u.mean(dim=slice_dims(u), keepdim=True))  # w_new + mean(u) = w_old - GC(u)
        self._updated = []


register("gc_adam", GCAdam, memory="N for `update` GC-targeted tensors, 0 for `grad`",
         description="gradient centralization on a one-pass base; defaults: the GC authors' `algorithm-GC` Adam "
         "(`gc_loc=False`)")
