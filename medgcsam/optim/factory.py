"""The one optimizer factory: a registered name (``registry.OPTIMIZERS``), the parameters, a base, hyperparameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .core import BASE_OPTIMIZERS, WrappedOptimizer, base_keywords, build_base, resolve_base_class
from .registry import optimizer_record

DEFAULT_LR = 1e-4  # the GCSAM script's Adam learning rate; also the pipeline default


def _method(name: str) -> type[WrappedOptimizer]:
    return optimizer_record(name).cls


def _split(name: str, base: Any, hyperparameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate method hyperparameters from base-optimizer keywords; anything else is an error."""
    cls = _method(name)
    base_keys = frozenset() if isinstance(base, torch.optim.Optimizer) else base_keywords(resolve_base_class(base))
    method_hp = {k: v for k, v in hyperparameters.items() if k in cls.hyperparameters}
    base_kw = {k: v for k, v in hyperparameters.items() if k in base_keys and k not in cls.hyperparameters}
    unknown = sorted(set(hyperparameters) - set(method_hp) - set(base_kw))
    if unknown:
        base_name = type(base).__name__ if isinstance(base, torch.optim.Optimizer) else base
        raise ValueError(f"optimizer {name!r} (base {base_name!r}): unknown hyperparameter(s) {unknown}; "
                         f"method keys: {sorted(cls.hyperparameters)}; base keys: {sorted(base_keys)}")
    cls.check(method_hp)
    return method_hp, base_kw


def _effective_base(name: str, base: Any) -> Any:
    """Plain adam/adamw/sgd are their own base; every other method wraps ``base``."""
    return name.lower() if name.lower() in BASE_OPTIMIZERS else base


def check_hyperparameters(name: str, base: str, hyperparameters: dict[str, Any]) -> None:
    """Validate a configuration before any work; raises ValueError naming the bad key and the valid ones."""
    _split(name, _effective_base(name, base), dict(hyperparameters))


def create_optimizer(
    name: str,
    params: Any = None,
    *,
    base: str | type[torch.optim.Optimizer] | torch.optim.Optimizer = "adam",
    model: nn.Module | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
    accumulation_steps: int = 1,
    lr: float | None = None,
    weight_decay: float | None = None,
    **hyperparameters: Any,
) -> WrappedOptimizer:
    """Build ``name`` (see OPTIMIZERS) over ``params`` with a base optimizer given by name, class or instance.

    ``lr``/``weight_decay`` and base keywords (betas, momentum, fused, ...) go to the base (lr defaults to
    1e-4, weight decay to 0, when the base is built here); method keywords (rho, alpha, gamma, ...) to the
    method. Per-group values (e.g. ``{"params": ..., "rho": 0.1}``) override the method's default rho.
    """
    base = _effective_base(name, base)
    method_hp, base_kw = _split(name, base, hyperparameters)
    if not isinstance(base, torch.optim.Optimizer):
        base_kw["lr"] = DEFAULT_LR if lr is None else lr
        base_kw["weight_decay"] = 0.0 if weight_decay is None else weight_decay
    elif lr is not None or weight_decay is not None:
        raise ValueError("base is an optimizer instance: set lr/weight_decay when building it, not here")
    optimizer = _method(name)(build_base(base, params, base_kw), model=model, grad_scaler=grad_scaler,
                              max_grad_norm=max_grad_norm, accumulation_steps=accumulation_steps, **method_hp)
    if optimizer.name == "plain":
        optimizer.name = name.lower()
    return optimizer
