"""The driver every medgcsam optimizer shares, so a training loop can run any method without knowing which.

A method is a thin object around a ``torch.optim`` *base* optimizer (Adam, AdamW, SGD, ...). The base owns
the param groups (LR schedulers attach to it) and its state (moments, momentum); the wrapper adds the passes,
the gradient-accumulation bookkeeping, GradScaler handling, BatchNorm restore and persistent extras.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .registry import register

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}

DDPMode = Literal["local", "synced"]


def resolve_base_class(base: str | type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """Map a base name or class to the class; errors list the accepted names."""
    if isinstance(base, str):
        if base.lower() not in BASE_OPTIMIZERS:
            raise ValueError(f"unknown base optimizer {base!r}; use one of {sorted(BASE_OPTIMIZERS)}, "
                             "a torch.optim.Optimizer class or an instance")
        return BASE_OPTIMIZERS[base.lower()]
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base
    raise TypeError(f"base must be a name, a torch.optim.Optimizer class or instance, not {type(base).__name__}")


def base_keywords(cls: type[torch.optim.Optimizer]) -> frozenset[str]:
    """Constructor keywords the base class accepts (lr, betas, momentum, fused, ...)."""
    return frozenset(n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "params"))


def build_base(base: Any, params: Any, base_kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    """Return the base optimizer: an instance is used as is, a name or class is built on ``params``."""
    if isinstance(base, torch.optim.Optimizer):
        if base_kwargs:
            raise ValueError(f"base is an optimizer instance; set {sorted(base_kwargs)} when building it, not here")
        if params is not None:
            given = {id(p) for p in _flat_params(params)}
            owned = {id(p) for g in base.param_groups for p in g["params"]}
            if given != owned:
                raise ValueError("params differ from the parameters of the base optimizer instance; pass params=None")
        return base
    if params is None:
        raise ValueError("params is required unless base is an optimizer instance")
    return resolve_base_class(base)(params, **base_kwargs)


def _flat_params(params: Any) -> Iterator[Tensor]:
    for item in params:
        if isinstance(item, dict):
            yield from item["params"] if not isinstance(item["params"], Tensor) else [item["params"]]
        elif isinstance(item, tuple):
            yield item[1]
        else:
            yield item


@dataclass(frozen=True)
class Bucket:
    """Trainable tensors of one param group on one device with one dtype: the unit of a foreach call."""

    group: int
    indices: tuple[int, ...]


def sq_norm(tensors: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Squared global L2 norm of a tensor list as a 0-dim tensor (multi-tensor kernels, no host sync)."""
    if not tensors:
        return torch.zeros((), dtype=dtype, device=device)
    if tensors[0].device.type == "cpu":
        # On CPU a BLAS dot per tensor reads memory at full vector width: ~3x faster than _foreach_norm there
        # (and exact to float32 accumulation rather than norm-then-square). GPUs keep the one fused kernel.
        return torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensors]).to(device, dtype).sum()
    return torch.stack(torch._foreach_norm(tensors)).to(device=device, dtype=dtype).square().sum()


def axpy_(ws: list[Tensor], ds: list[Tensor], scale: Tensor) -> None:
    """ws += scale * ds for a 0-dim device ``scale``: one multi-tensor call, no temporaries, no host sync."""
    if ws:
        torch._foreach_addcmul_(ws, ds, [scale.to(ws[0].dtype)] * len(ws))


def distributed_world() -> int:
    """World size when torch.distributed is initialized, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean_(tensors: list[Tensor]) -> None:
    """Average tensors over replicas in place (no-op outside torch.distributed)."""
    world = distributed_world()
    if world == 1 or not tensors:
        return
    for t in tensors:
        dist.all_reduce(t)
    torch._foreach_div_(tensors, float(world))


class BatchNormBuffers:
    """Running statistics of every BatchNorm layer, snapshotted after pass 1 and copied back after the last.

    Copying buffers (rather than toggling momentum) is exact, also handles ``momentum=None`` and
    ``num_batches_tracked``, and leaves module attributes alone (no recompiles, CUDA-graph friendly).
    """

    def __init__(self, model: nn.Module) -> None:
        self.buffers: list[Tensor] = []
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                self.buffers += [b for b in (module.running_mean, module.running_var, module.num_batches_tracked)
                                 if b is not None]
        self._copies: list[Tensor] | None = None

    def snapshot(self) -> None:
        if not self.buffers:
            return
        if self._copies is None:
            self._copies = [torch.empty_like(b) for b in self.buffers]
        torch._foreach_copy_(self._copies, self.buffers)

    def restore(self) -> None:
        if self._copies is not None:
            torch._foreach_copy_(self.buffers, self._copies)


class WrappedOptimizer:
    """One pass per step: the base optimizer behind the common driver (plain adam/adamw/sgd).

    Loop contract, per micro-batch::

        for i in range(opt.passes_per_step):
            loss = criterion(model(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            opt.after_backward(i)

    The optimizer zeroes gradients itself, averages them over ``accumulation_steps`` micro-batches (do not
    divide the loss), and on the last pass of the last micro-batch runs the base step (with a GradScaler:
    ``unscale_`` once, clip, ``step``, ``update``; the step is skipped when any pass overflowed).
    """

    name: ClassVar[str] = "base"
    passes: ClassVar[int] = 1
    pass_names: ClassVar[tuple[str, ...]] = ()
    hyperparameters: ClassVar[dict[str, Any]] = {}
    group_hyperparameters: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        base: torch.optim.Optimizer,
        *,
        model: nn.Module | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        accumulation_steps: int = 1,
        **hyperparameters: Any,
    ) -> None:
        self.check(hyperparameters)
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.hp: dict[str, Any] = {**self.hyperparameters, **hyperparameters}
        self.base = base
        self.model = model
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.max_grad_norm = max_grad_norm
        self.accumulation_steps = accumulation_steps
        for group in base.param_groups:
            for key in self.group_hyperparameters:
                group.setdefault(key, self.hp[key])
        self.params: list[Tensor] = []
        keys: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
        for gi, group in enumerate(base.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    keys.setdefault((gi, p.device, p.dtype), []).append(len(self.params))
                    self.params.append(p)
        if not self.params:
            raise ValueError("the optimizer got no parameter with requires_grad=True")
        self.buckets = [Bucket(gi, tuple(idx)) for (gi, _, _), idx in keys.items()]
        self.device = self.params[0].device
        self.acc_dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        self.stats: dict[str, Tensor] = {"grad_norm": self._scalar(0.0)}
        self.bn = BatchNormBuffers(model) if model is not None else None
        self._buffers: dict[str, list[Tensor | None]] = {}
        self._micro = 0
        self._base_only = False
        self.ddp_mode: DDPMode = "local"
        self._overflow = torch.zeros((), dtype=torch.bool, device=self.device)
        self._accumulated = [False] * len(self.params)

    # ----------------------------------------------------------------- hyperparameters
    @classmethod
    def check(cls, hyperparameters: dict[str, Any]) -> None:
        """Raise ValueError naming an unknown or out-of-range hyperparameter; valid keys are listed."""
        unknown = sorted(set(hyperparameters) - set(cls.hyperparameters))
        if unknown:
            raise ValueError(f"{cls.name}: unknown hyperparameter(s) {unknown}; valid: {sorted(cls.hyperparameters)}")
        cls.validate({**cls.hyperparameters, **hyperparameters})

    @classmethod
    def validate(cls, hp: dict[str, Any]) -> None:
        """Range checks of a complete hyperparameter dict (subclasses extend)."""
        for key in ("rho", "eps"):
            if key in hp and hp[key] is not None and not (isinstance(hp[key], int | float) and hp[key] >= 0):
                raise ValueError(f"{cls.name}: {key} must be a number >= 0, got {hp[key]!r}")

    # ----------------------------------------------------------------- public interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @property
    def base_only(self) -> bool:
        """True: behave exactly like the base optimizer (1 pass), e.g. for a warm start with the same moments."""
        return self._base_only

    @base_only.setter
    def base_only(self, value: bool) -> None:
        if self._micro != 0:
            raise RuntimeError("base_only can only change between optimizer steps, not inside an accumulation")
        self._set_base_only(bool(value))

    def _set_base_only(self, value: bool) -> None:
        self._base_only = value

    @property
    def passes_per_step(self) -> int:
        return 1 if self._base_only else self.passes

    def no_sync_passes(self, mode: DDPMode = "local") -> frozenset[int]:
        """Pass indices a DDP loop runs entirely (forward and backward) inside ``model.no_sync()``.

        ``"local"``: each replica perturbs with its own first-pass gradient (m-sharpness); anything the
        method reuses from that pass is all-reduced here. ``"synced"``: every pass is synchronized.
        """
        if mode not in ("local", "synced"):
            raise ValueError(f"DDP perturbation mode must be 'local' or 'synced', got {mode!r}")
        self.ddp_mode = mode
        return frozenset({0}) if mode == "local" and self.passes_per_step > 1 else frozenset()

    @torch.no_grad()
    def after_backward(self, pass_index: int) -> None:
        """Call after each backward; dispatches to the pass's method and steps after the last pass."""
        if not 0 <= pass_index < self.passes_per_step:
            raise ValueError(f"{self.name}: pass_index {pass_index} out of range 0..{self.passes_per_step - 1}")
        if self.passes_per_step == 1:
            self._end_micro_batch()
        else:
            getattr(self, self.pass_names[pass_index])()

    def step(self, closure: Any = None) -> Any:
        """Run every pass of one micro-batch; the closure does forward + backward and returns the loss."""
        if closure is None:
            if self.passes_per_step > 1:
                raise ValueError(f"{self.name} runs {self.passes_per_step} passes: step() needs a closure that runs "
                                 "forward and backward and returns the loss (or drive it with after_backward)")
            self.after_backward(0)
            return None
        first = None
        for i in range(self.passes_per_step):
            with torch.enable_grad():
                loss = closure()
            first = loss if first is None else first
            self.after_backward(i)
        return first

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    @contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Weights at the clean point inside (only MSAM keeps weights perturbed between steps)."""
        yield

    def state_dict(self) -> dict[str, Any]:
        """Base state (moments, momentum, param groups incl. per-group rho) plus the method's persistent extras."""
        base = self.base.state_dict()
        # graph-safe groups hold lr/rho as device tensors; a checkpoint stores plain numbers so it loads anywhere
        base["param_groups"] = [{k: float(v) if isinstance(v, Tensor) and v.ndim == 0 else v for k, v in g.items()}
                                for g in base["param_groups"]]
        return {"method": self.name, "base": base, "base_only": self._base_only, "extra": self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"optimizer state is for {state.get('method')!r}, this optimizer is {self.name!r}")
        self.base.load_state_dict(state["base"])
        self._base_only = bool(state["base_only"])
        self._load_extra_state(state["extra"])

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hp.items())
        return f"{type(self).__name__}({hp}; base={type(self.base).__name__})"

    # ----------------------------------------------------------------- hooks for subclasses
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def _before_base_step(self, grads: list[Tensor]) -> None:
        """Runs after unscaling, before clipping and the base step."""

    def _after_base_step(self) -> None:
        """Runs right after the base step (before ``scaler.update()``)."""

    # ----------------------------------------------------------------- shared machinery
    def _scalar(self, value: float) -> Tensor:
        return torch.full((), value, dtype=self.acc_dtype, device=self.device)

    def buffers(self, name: str, indices: Iterable[int]) -> list[Tensor]:
        """Persistent per-parameter buffers, allocated once on first use (no per-step allocation)."""
        store = self._buffers.setdefault(name, [None] * len(self.params))
        out = []
        for i in indices:
            if store[i] is None:
                store[i] = torch.empty_like(self.params[i], memory_format=torch.preserve_format)
            out.append(store[i])
        return out

    def active(self) -> list[tuple[Bucket, list[int]]]:
        """Per bucket, the indices of the tensors that have a gradient in this pass."""
        out = []
        for b in self.buckets:
            idx = [i for i in b.indices if self.params[i].grad is not None]
            if idx:
                out.append((b, idx))
        return out

    def grads(self, indices: Iterable[int]) -> list[Tensor]:
        return [self.params[i].grad for i in indices]

    def tensors(self, indices: Iterable[int]) -> list[Tensor]:
        return [self.params[i] for i in indices]

    def inv_grad_scale(self) -> Tensor | None:
        """1 / GradScaler scale as a device tensor (None without a scaler); the scale is constant within a step."""
        if self.grad_scaler is None:
            return None
        return self.grad_scaler._scale.double().reciprocal().to(self.acc_dtype)

    def flag_overflow(self, value: Tensor) -> None:
        """Remember (on device) that a pass produced a non-finite gradient, so the step is skipped."""
        if self.grad_scaler is not None:
            self._overflow |= ~torch.isfinite(value)

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _end_micro_batch(self) -> None:
        """The descent gradient of this micro-batch is in ``.grad``: accumulate, and step after the last one."""
        last = self._micro == self.accumulation_steps - 1
        if self.accumulation_steps > 1 and self.passes_per_step > 1:
            self._accumulate(last)
        self._micro = 0 if last else self._micro + 1
        if last:
            self._base_step()

    def _accumulate(self, last: bool) -> None:
        """Multi-pass methods need a private sum: every pass starts from an empty gradient."""
        if self._micro == 0:
            self._accumulated = [False] * len(self.params)
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        acc = self.buffers("accumulated", idx)
        fresh = [k for k, i in enumerate(idx) if not self._accumulated[i]]
        if fresh:
            torch._foreach_copy_([acc[k] for k in fresh], [self.params[idx[k]].grad for k in fresh])
        seen = [k for k, i in enumerate(idx) if self._accumulated[i]]
        if seen:
            torch._foreach_add_([acc[k] for k in seen], [self.params[idx[k]].grad for k in seen])
        for i in idx:
            self._accumulated[i] = True
        if not last:
            self._drop_grads()
            return
        store = self._buffers["accumulated"]
        for i, p in enumerate(self.params):
            if self._accumulated[i]:
                if p.grad is None:
                    p.grad = store[i].clone()
                else:
                    p.grad.copy_(store[i])

    @torch.no_grad()
    def _base_step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and self.accumulation_steps > 1:
            torch._foreach_mul_(grads, 1.0 / self.accumulation_steps)
        scaler = self.grad_scaler
        if scaler is not None:
            if grads:  # a non-finite earlier pass poisons the final gradient, so the scaler skips the step
                grads[0].add_(torch.where(self._overflow, math.inf, 0.0).to(grads[0].dtype))
            scaler.unscale_(self.base)
        if self.passes_per_step == 1:
            self._single_pass_stats(grads)
        self._before_base_step(grads)
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if scaler is not None:
            scaler.step(self.base)
            self._after_base_step()
            scaler.update()
        else:
            self.base.step()
            self._after_base_step()
        self.base.zero_grad(set_to_none=True)
        self._overflow.zero_()

    def _single_pass_stats(self, grads: list[Tensor]) -> None:
        self.stats["grad_norm"].copy_(sq_norm(grads, self.acc_dtype, self.device).sqrt())


class Plain(WrappedOptimizer):
    """adam / adamw / sgd: the base optimizer alone, in the common interface."""

    name = "plain"


for _base in ("adam", "adamw", "sgd"):
    register(_base, Plain, memory="0",
             description=f"the base optimizer `torch.optim.{BASE_OPTIMIZERS[_base].__name__}` alone "
             "(base keywords: `lr=1e-4`, `weight_decay=0`, `betas`, `momentum`, `fused`, ...)")
