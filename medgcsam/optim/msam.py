"""MSAM (Becker et al., 2024): one pass, perturbation along the base optimizer's own momentum.

Between steps the weights sit at w~ = w - f * m (m: SGD momentum buffer or Adam first moment,
f = rho / ||m||), so the single forward/backward of the next step is taken there. The clean weights are kept
in a buffer, so undoing the perturbation (before the base step, for evaluation, for checkpoints) is an exact
copy, and f is stored, so re-applying it is bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .core import WrappedOptimizer, axpy_, sq_norm
from .registry import register


class MSAM(WrappedOptimizer):
    """Momentum-SAM on any base with a momentum (SGD momentum > 0, Adam/AdamW).

    Defaults follow the official classes: rho 0.3 with SGD, 1.0 with Adam-type bases (``rho=None``).
    Weight decay is the base's, applied at the clean weights. BatchNorm statistics are collected at the
    perturbed weights (inherent to one pass). Load a checkpoint into the model before the optimizer.
    """

    name = "msam"
    hyperparameters = {"rho": None, "eps": 1e-12}
    group_hyperparameters = frozenset({"rho"})

    def __init__(self, base: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        is_sgd = isinstance(base, torch.optim.SGD)
        self.direction_key = "momentum_buffer" if is_sgd else "exp_avg"
        for group in self.param_groups:
            if is_sgd and group.get("momentum", 0.0) <= 0.0:
                raise ValueError("msam with an SGD base needs momentum > 0 (the perturbation follows it)")
            if group["rho"] is None:
                group["rho"] = 0.3 if is_sgd else 1.0
        self.factors: dict[int, Tensor] = {}
        self.perturbed: list[int] = []
        self._clean_view = False

    # ------------------------------------------------------------------ perturbation
    def _directions(self, idx: tuple[int, ...] | list[int]) -> tuple[list[int], list[Tensor]]:
        state = self.base.state
        have = [i for i in idx if self.direction_key in state.get(self.params[i], {})]
        return have, [state[self.params[i]][self.direction_key] for i in have]

    @torch.no_grad()
    def _perturb(self, recompute: bool) -> None:
        """w <- w - f m for every tensor with a momentum; f from the current m unless re-applying."""
        per_bucket = [(b, *self._directions(b.indices)) for b in self.buckets]
        if recompute:
            sq = self._scalar(0.0)
            for _, _, m in per_bucket:
                sq = sq + sq_norm(m, self.acc_dtype, self.device)
            norm = sq.sqrt()
            inv = torch.where(torch.isfinite(norm), (norm + self.hp["eps"]).reciprocal(), 0.0)
            self.factors = {b.group: -inv * self.param_groups[b.group]["rho"] for b in self.buckets}
        self.perturbed = []
        for b, idx, m in per_bucket:
            if not idx:
                continue
            w = self.tensors(idx)
            torch._foreach_copy_(self.buffers("clean", idx), w)
            axpy_(w, m, self.factors[b.group])
            self.perturbed += idx

    @torch.no_grad()
    def _undo(self) -> None:
        if self.perturbed:
            torch._foreach_copy_(self.tensors(self.perturbed), self.buffers("clean", self.perturbed))

    def _before_base_step(self, grads: list[Tensor]) -> None:
        self._undo()
        self.perturbed = []

    def _after_base_step(self) -> None:
        if not self._base_only:
            self._perturb(recompute=True)

    def _set_base_only(self, value: bool) -> None:
        if value and self.perturbed:
            self._undo()
            self.perturbed = []
        super()._set_base_only(value)

    @contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Clean weights inside (evaluate and checkpoint here); the perturbation is re-applied on exit."""
        if not self.perturbed or self._clean_view:
            yield
            return
        self._undo()
        self._clean_view = True
        try:
            yield
        finally:
            self._clean_view = False
            self._perturb(recompute=False)

    # ------------------------------------------------------------------ checkpoint
    def _extra_state(self) -> dict[str, Any]:
        if self.perturbed and not self._clean_view:
            raise RuntimeError("msam: call state_dict() inside `with opt.unperturbed():` so the model weights "
                               "saved alongside are the clean ones")
        return {"perturbed": bool(self.perturbed), "factors": dict(self.factors)}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        """The model already holds the clean weights of the checkpoint: re-apply the saved perturbation."""
        self.perturbed = []
        self.factors = {int(g): f.to(self.device) for g, f in extra["factors"].items()}
        if extra["perturbed"]:
            self._perturb(recompute=False)


register("msam", MSAM, memory="N (clean weights)",
         description="momentum-SAM; `rho=None` is 0.3 with SGD, 1.0 with Adam/AdamW (the official MSAM / "
         "AdamW_MSAM classes)")
