"""Make an optimizer's whole step capturable in a CUDA graph: what changes between replays lives in device tensors.

A captured graph replays the kernels and the scalar arguments recorded at capture. So every value that changes
during training (the scheduled LR, rho, GSAM's rho that follows the LR) must be a 0-dim device tensor that the
step reads on the device and the scheduler rewrites in place (``LRScheduler`` ``fill_``s a tensor LR), and the
base optimizer must keep its step count on the device: Adam/AdamW/SGD run ``fused`` (which reads a tensor LR
without ``.item()``), with ``capturable=True`` on CUDA. Graph-safety changes the arithmetic only in rounding
(fused kernels, float32 LR), so a graphed run is compared against an eager run of the same graph-safe optimizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import BASE_OPTIMIZERS, WrappedOptimizer

SCHEDULED_KEYS = ("lr", "rho")  # group values a step reads that change during training


def graph_safe_blocker(opt: WrappedOptimizer) -> str | None:
    """Why this optimizer's step cannot be captured, or None (a GradScaler or a foreign base class)."""
    if opt.grad_scaler is not None:
        return "fp16 with a GradScaler (its unscale/skip decisions are host-side); use amp=bf16 to capture"
    if type(opt.base) not in BASE_OPTIMIZERS.values():
        return f"base optimizer {type(opt.base).__name__} is not one of {sorted(BASE_OPTIMIZERS)}"
    return None


def make_graph_safe_(opt: WrappedOptimizer) -> WrappedOptimizer:
    """Switch ``opt`` in place to its graph-safe form (idempotent; call after loading a checkpoint, which
    stores plain numbers). Raises ValueError with the reason when ``graph_safe_blocker`` finds one."""
    reason = graph_safe_blocker(opt)
    if reason is not None:
        raise ValueError(f"{opt.name} cannot be made graph-safe: {reason}")
    cuda = opt.device.type == "cuda"
    for group in opt.base.param_groups:
        group["foreach"] = False
        group["fused"] = True
        if "capturable" in group:
            group["capturable"] = cuda  # CPU has no capturable kernels; fused CPU steps are already sync-free
        for key in SCHEDULED_KEYS:
            value = group.get(key)
            if value is None:
                continue
            if isinstance(value, Tensor):
                group[key] = value.to(opt.device, opt.acc_dtype)
            else:
                group[key] = torch.tensor(float(value), dtype=opt.acc_dtype, device=opt.device)
    for param, state in opt.base.state.items():  # a resumed state holds the step count on the host
        step = state.get("step")
        if isinstance(step, Tensor) and step.device != param.device:
            state["step"] = step.to(param.device, torch.float32)
    return opt


def is_graph_safe(opt: WrappedOptimizer) -> bool:
    """True when every scheduled group value is a device tensor and the base runs fused."""
    return all(group.get("fused") and all(isinstance(group.get(k), Tensor) for k in SCHEDULED_KEYS if k in group)
               for group in opt.base.param_groups)


class HostSyncError(RuntimeError):
    """An op that a CUDA graph cannot capture ran inside ``forbid_host_sync``."""


# What breaks a capture: reading a device value on the host (.item(), float(t), `if t:`), an output whose size
# depends on values (nonzero), and a tensor built from host data (torch.tensor(list): a pageable copy).
_FORBIDDEN = {
    "aten::_local_scalar_dense": "reads a tensor value on the host (.item(), float(t), bool(t), `if t:`)",
    "aten::nonzero": "has a value-dependent output shape (nonzero / boolean-mask indexing)",
    "aten::masked_select": "has a value-dependent output shape (boolean-mask indexing)",
    "aten::lift_fresh": "builds a tensor from host data (torch.tensor / as_tensor of Python values)",
    "aten::index": "indexes with a boolean mask (value-dependent output shape)",
}


def _breaks_capture(name: str, args: tuple) -> bool:
    """``aten::index`` only with a boolean mask (integer indices are capturable); the rest always."""
    if name != "aten::index":
        return True
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])


class forbid_host_sync(torch.utils._python_dispatch.TorchDispatchMode):  # noqa: N801 - used as a context manager
    """Raise ``HostSyncError`` on any op a CUDA graph cannot capture, on any device (CPU tests emulate capture).

    ``allow`` names ops tolerated anyway (e.g. for a base optimizer that is known capturable only on CUDA).
    ``device`` (e.g. ``"cuda"``): flag only ops on a tensor of that device type (an ``.item()`` of a CPU tensor
    does not break a CUDA capture). ``record=True``: let the op run and collect the reasons in ``found`` instead
    of raising, so a real step can be checked without being cut off half-way."""

    def __init__(self, allow: frozenset[str] = frozenset(), *, device: str | None = None, record: bool = False) -> None:
        super().__init__()
        self.allow, self.device, self.record = allow, device, record
        self.found: list[str] = []

    def _on_device(self, args: tuple, kwargs: dict) -> bool:
        if self.device is None:
            return True
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        return any(isinstance(a, Tensor) and a.device.type == self.device for a in flat)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        name = func._schema.name
        kwargs = kwargs or {}
        if (name in _FORBIDDEN and name not in self.allow and _breaks_capture(name, args)
                and self._on_device(args, kwargs)):
            reason = f"{name} {_FORBIDDEN[name]}: not capturable in a CUDA graph"
            if not self.record:
                raise HostSyncError(reason)
            if reason not in self.found:
                self.found.append(reason)
        return func(*args, **kwargs)
