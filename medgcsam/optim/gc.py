"""Gradient centralization (Yong et al., ECCV 2020): make every output slice of a weight gradient zero-mean.

GC acts per tensor: for ``ndim > 1`` it subtracts the mean over all dims but dim 0; 1-D tensors are left alone.
Per tensor it is an orthogonal projection, so it is idempotent and never increases the norm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

GC_TARGETS: tuple[str, ...] = ("ndim>1", "conv_linear", "conv")


def slice_dims(t: Tensor) -> tuple[int, ...]:
    """Dims averaged by GC: all but the output dim 0."""
    return tuple(range(1, t.ndim))


def centralized(g: Tensor) -> Tensor:
    """GC(g) as a new tensor (reference form; the optimizers work in place)."""
    if g.ndim <= 1:
        return g.clone()
    return g - g.mean(dim=slice_dims(g), keepdim=True)


def centralize_(g: Tensor, center: Tensor | None = None) -> Tensor:
    """Subtract ``center`` (default: the slice means) from ``g`` in place."""
    if g.ndim > 1:
        g.sub_(g.mean(dim=slice_dims(g), keepdim=True) if center is None else center)
    return g


def gc_mask(params: list[Tensor], targets: str, model: nn.Module | None) -> list[bool]:
    """Which tensors GC applies to.

    ``"ndim>1"``: every tensor with ndim > 1 (the GCSAM script; includes ViT position embeddings and tokens).
    ``"conv"``: ndim > 3 (the GC authors' ``gc_conv_only``). ``"conv_linear"``: weights of Conv/Linear
    modules, which needs ``model`` to know the module types.
    """
    if targets not in GC_TARGETS:
        raise ValueError(f"gc_targets must be one of {list(GC_TARGETS)}, got {targets!r}")
    if targets == "ndim>1":
        return [p.ndim > 1 for p in params]
    if targets == "conv":
        return [p.ndim > 3 for p in params]
    if model is None:
        raise ValueError("gc_targets='conv_linear' needs model= (module types decide what is centralized)")
    chosen = {id(m.weight) for m in model.modules()
              if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and isinstance(m.weight, Tensor)}
    return [id(p) in chosen and p.ndim > 1 for p in params]


class SliceMeanEMA:
    """GC-EMA: m_t = beta * m_{t-1} + (1 - beta) * mean(g_t) per weight slice, m_0 = 0 (checkpointed).

    Kept in unscaled gradient units, so a GradScaler's changing scale does not leak into it, and a slice
    whose mean is not finite (an overflowing fp16 step, which the scaler skips) keeps its previous value:
    one overflow would otherwise make the EMA NaN and every later step be skipped.
    """

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.means: dict[int, Tensor] = {}

    def update(self, index: int, mean: Tensor, inv_scale: Tensor | None = None) -> Tensor:
        """Fold in ``mean`` (of gradients scaled by 1 / ``inv_scale``); return the centre in those same units."""
        m = self.means.get(index)
        if m is None:
            m = self.means[index] = torch.zeros_like(mean)
        unscaled = mean if inv_scale is None else mean * inv_scale.to(mean.dtype)
        new = m * self.beta + unscaled * (1.0 - self.beta)
        m.copy_(torch.where(torch.isfinite(new), new, m))
        return m if inv_scale is None else m / inv_scale.to(mean.dtype)

    def state_dict(self) -> dict[int, Tensor]:
        return dict(self.means)

    def load_state_dict(self, state: dict[int, Tensor]) -> None:
        self.means = {int(k): v.detach().clone() for k, v in state.items()}
