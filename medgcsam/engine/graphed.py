"""The training step (and evaluation forward) captured once in a CUDA graph and replayed.

At the paper's batch sizes (8-64) a step is host-bound: Python and kernel launches set the pace, not the GPU
(``../shared/reference/gpu.md``: graphed GCSAM 1.9x eager Adam's images/s at ResNet-50 batch 16). One
``torch.cuda.CUDAGraph`` per step shape holds every pass of the optimizer (both SAM passes, GC, perturbation,
BatchNorm-buffer restore, clipping, the fused capturable base step) and the on-device meters.

How a step shape is run (``GraphedStep``): the first ``warmup_steps`` optimizer steps run eagerly on a side
stream (they create the optimizer state and persistent buffers that a capture must not allocate), then the
micro-batch at each accumulation position is captured once into static input buffers and replayed from then on.
A shape is (warm-start ``base_only``, passes, accumulation position, input shape/dtype): the trainer's loaders
drop the last partial batch (``drop_last``), so an epoch has one shape. Between replays the optimizer's Python
bookkeeping (accumulation position, perturbed tensors) is set to what the capture left, exactly what an eager
step at that position leaves, so evaluation (``unperturbed``), checkpoints and the next eager code see the
same optimizer as in an eager run.

``train.cuda_graph``: ``off`` always eager; ``on`` captures or raises naming the reason; ``auto`` (default)
captures on CUDA when nothing blocks it (fp16 + GradScaler and DDP do) and otherwise, or when a capture fails,
logs why and continues eagerly with the same (graph-safe) optimizer, so the numbers do not change silently.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from medgcsam.cuda_capture import capture_into
from medgcsam.engine.metrics import StepRecord, TrainMeter
from medgcsam.engine.step import train_step
from medgcsam.optim import OPTIMIZERS, WrappedOptimizer, forbid_host_sync, graph_safe_blocker, make_graph_safe_

log = logging.getLogger(__name__)

GraphMode = Literal["auto", "on", "off"]
GRAPH_MODES: tuple[str, ...] = ("auto", "on", "off")
Autocast = Callable[[], contextlib.AbstractContextManager]
HostState = tuple[dict[str, Any], list[Tensor | None] | None]  # an optimizer's host bookkeeping, gradient refs


class GraphCaptureError(RuntimeError):
    """``cuda_graph=on`` and the step cannot be captured; the message says why and what to set instead."""


class EagerStep:
    """``step(images, labels)``: one micro-batch through ``train_step``; ``meter`` may be swapped per epoch."""

    def __init__(self, model: nn.Module, opt: WrappedOptimizer, criterion: nn.Module, *, autocast: Autocast,
                 scaler: torch.amp.GradScaler | None = None, no_sync: frozenset[int] = frozenset(),
                 meter: TrainMeter | None = None) -> None:
        self.model, self.opt, self.criterion = model, opt, criterion
        self.autocast, self.scaler, self.no_sync, self.meter = autocast, scaler, no_sync, meter
        self.graphed = False

    def __call__(self, images: Tensor, labels: Tensor) -> None:
        train_step(self.model, self.opt, self.criterion, images, labels, autocast=self.autocast,
                   scaler=self.scaler, no_sync=self.no_sync, meter=self.meter)


def graph_blockers(model: nn.Module, opt: WrappedOptimizer, *, device: torch.device,
                   scaler: torch.amp.GradScaler | None = None, no_sync: frozenset[int] = frozenset()) -> list[str]:
    """Every reason this step cannot be captured (empty: it can)."""
    reasons = []
    if device.type != "cuda":
        reasons.append(f"the device is {device.type}, CUDA graphs need a CUDA device")
    elif not torch.cuda.is_available():
        reasons.append("CUDA is not available in this process")
    if scaler is not None and scaler.is_enabled():
        reasons.append("amp=fp16 uses a GradScaler, whose skip-on-overflow is decided on the host; use amp=bf16")
    if isinstance(model, DistributedDataParallel) or no_sync:
        reasons.append("DDP all-reduces from autograd hooks and its no_sync passes are host-side")
    record = OPTIMIZERS.get(opt.name)
    if record is not None and not record.capturable:
        reasons.append(f"{opt.name} is registered as not capturable in a CUDA graph")
    blocker = graph_safe_blocker(opt)
    if blocker is not None and "GradScaler" not in blocker:
        reasons.append(blocker)
    return reasons


def make_step(model: nn.Module, optimizer: WrappedOptimizer, criterion: nn.Module, *, autocast: Autocast,
              scaler: torch.amp.GradScaler | None = None, no_sync: frozenset[int] = frozenset(),
              meter: TrainMeter | None = None, mode: GraphMode = "auto", device: torch.device | str | None = None,
              warmup_steps: int = 2) -> EagerStep:
    """The step the loop calls per micro-batch: graphed when ``mode`` and the setup allow, else eager.

    Graphing makes ``optimizer`` graph-safe in place (``make_graph_safe_``): call this after a checkpoint was
    loaded into it, and keep the returned object for the whole run (set ``step.meter`` per epoch)."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"train.cuda_graph must be one of {list(GRAPH_MODES)}, got {mode!r}")
    device = torch.device(device) if device is not None else optimizer.device
    eager = EagerStep(model, optimizer, criterion, autocast=autocast, scaler=scaler, no_sync=no_sync, meter=meter)
    if mode == "off":
        return eager
    reasons = graph_blockers(model, optimizer, device=device, scaler=scaler, no_sync=no_sync)
    if reasons:
        if mode == "on":
            raise GraphCaptureError(f"train.cuda_graph=on, but the {optimizer.name} step cannot be captured: "
                                    f"{'; '.join(reasons)}. Set train.cuda_graph=auto (falls back to eager) or off")
        log.info("CUDA graphs off (train.cuda_graph=auto): %s; the step runs eagerly", "; ".join(reasons))
        return eager
    make_graph_safe_(optimizer)
    return GraphedStep(eager, mode=mode, warmup_steps=warmup_steps)


def python_state(opt: WrappedOptimizer) -> HostState:
    """The optimizer's host-side bookkeeping and gradient references (containers copied, tensors shared)."""
    state = {k: copy.copy(v) if isinstance(v, list | dict | set) else v for k, v in vars(opt).items()}
    return state, [p.grad for p in opt.params]


def set_python_state(opt: WrappedOptimizer, saved: HostState) -> None:
    """Put back what ``python_state`` saved (copies again, so ``saved`` can be applied many times);
    ``None`` gradients: leave them."""
    state, grads = saved
    vars(opt).update({k: copy.copy(v) if isinstance(v, list | dict | set) else v for k, v in state.items()})
    if grads is not None:
        for p, g in zip(opt.params, grads, strict=True):
            p.grad = g


def _same(a: Any, b: Any) -> bool:
    """Identity, element-wise for containers: what a step's bookkeeping changed."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(a[k] is b[k] for k in a)
    return a is b


def state_change(before: HostState, after: HostState) -> HostState:
    """Only what a step changed, so that setting it after each replay costs microseconds."""
    changed = {k: v for k, v in after[0].items() if k not in before[0] or not _same(before[0][k], v)}
    return changed, None if _same(before[1], after[1]) else after[1]


class GraphedStep(EagerStep):
    """Warm up eagerly on a side stream, capture each step shape once, replay (see the module docstring)."""

    def __init__(self, eager: EagerStep, *, mode: GraphMode, warmup_steps: int = 2) -> None:
        super().__init__(eager.model, eager.opt, eager.criterion, autocast=eager.autocast, meter=eager.meter)
        self.mode, self.warmup_steps = mode, max(1, warmup_steps)
        self.device = self.opt.device
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.after: dict[tuple, HostState] = {}
        self.static: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.pools: dict[tuple, Any] = {}
        self.warm: Counter[tuple] = Counter()
        self.record = StepRecord(self.device)
        self.stream = torch.cuda.Stream(self.device)
        self.fallback_reason: str | None = None
        self.host_syncs: dict[tuple, list[str]] = {}  # what the last warm-up of a shape found that capture rejects
        self.graphed = True
        self.replays = 0
        # the eager warm-up steps of a capturable optimizer are intended: torch's "capturable=True but step()
        # running without capture" warning would only be noise here
        self.opt.base._warned_capturable_if_run_uncaptured = True

    def __call__(self, images: Tensor, labels: Tensor) -> None:
        if self.fallback_reason is not None:
            super().__call__(images, labels)
            return
        opt = self.opt
        shape = (tuple(images.shape), images.dtype, images.stride(), tuple(labels.shape), labels.dtype)
        cycle = (opt.base_only, opt.passes_per_step, shape)
        key = (*cycle, opt._micro)
        graph = self.graphs.get(key)
        if graph is None and self.warm[cycle] < self.warmup_steps:
            self._warm_up(images, labels, check=cycle if self.warm[cycle] == self.warmup_steps - 1 else None)
            if opt._micro == 0:
                self.warm[cycle] += 1
            return
        if graph is None:
            graph = self._capture(key, cycle, images, labels)
            if graph is None:  # auto: fell back, and this micro-batch already ran eagerly
                return
        x, y = self.static[shape]
        x.copy_(images)
        y.copy_(labels)
        graph.replay()
        set_python_state(opt, self.after[key])
        self.replays += 1
        if self.meter is not None:
            self.meter.add(self.record)

    def _warm_up(self, images: Tensor, labels: Tensor, check: tuple | None = None) -> None:
        """An eager step on the side stream; ``check``: the shape's last warm-up, run under the host-sync
        detector (recording, not raising: the step completes exactly as without it)."""
        side, main = self.stream, torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        detector = forbid_host_sync(device="cuda", record=True) if check is not None else contextlib.nullcontext()
        with torch.cuda.stream(side), detector:
            super().__call__(images, labels)
        main.wait_stream(side)
        if check is not None and detector.found:
            found = self.host_syncs.setdefault(check, [])
            found += [reason for reason in detector.found if reason not in found]

    def _capture(self, key: tuple, cycle: tuple, images: Tensor, labels: Tensor) -> torch.cuda.CUDAGraph | None:
        opt, shape = self.opt, cycle[2]
        if self.host_syncs.get(cycle):  # the common cause of a failed capture: do not even begin one
            self._fall_back(f"HostSyncError: {'; '.join(self.host_syncs[cycle])} (found in the last warm-up step; "
                            "capture not attempted)", images, labels)
            return None
        before = python_state(opt)
        if shape not in self.static:
            self.static[shape] = (torch.empty_like(images), torch.empty_like(labels))
        x, y = self.static[shape]
        x.copy_(images)
        y.copy_(labels)
        graph = torch.cuda.CUDAGraph()
        try:
            with capture_into(graph, self.device, self.pools.get(cycle)) as pool:
                train_step(self.model, opt, self.criterion, x, y, autocast=self.autocast, meter=self.record)
        except Exception as exc:  # a capture that fails ran nothing: only host-side bookkeeping to undo
            set_python_state(opt, before)
            self._fall_back(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", images, labels,
                            exc)
            return None
        self.pools.setdefault(cycle, pool)
        self.graphs[key] = graph
        self.after[key] = state_change(before, python_state(opt))
        return graph

    def _fall_back(self, reason: str, images: Tensor, labels: Tensor, exc: Exception | None = None) -> None:
        """``on``: raise naming the reason; ``auto``: log it and run this and every later micro-batch eagerly."""
        opt = self.opt
        if self.mode == "on":
            raise GraphCaptureError(f"train.cuda_graph=on: capturing the {opt.name} step failed ({reason}); set "
                                    f"train.cuda_graph=auto to fall back to the eager step, or off") from exc
        log.warning("CUDA graph capture of the %s step failed (%s); train.cuda_graph=auto continues with the "
                    "eager step (same optimizer, same results, slower)", opt.name, reason)
        self.fallback_reason = reason
        for group in opt.base.param_groups:  # fused kernels ignore the flag: same arithmetic, no capture checks
            if "capturable" in group:
                group["capturable"] = False
        EagerStep.__call__(self, images, labels)


class GraphedForward:
    """``model(x)`` without gradients under ``autocast``, one CUDA graph per input shape (eval mode only).

    Evaluation batches have at most two shapes (full and last), so each is captured once and replayed; the
    weights are read where they live, so training between evaluations needs no recapture. Off CUDA, in train
    mode (dropout, BN updates) or after a failed capture it runs eagerly. The output is a fresh tensor."""

    def __init__(self, model: nn.Module, *, autocast: Autocast, mode: GraphMode = "auto", max_shapes: int = 4) -> None:
        if mode not in GRAPH_MODES:
            raise ValueError(f"cuda_graph must be one of {list(GRAPH_MODES)}, got {mode!r}")
        self.model, self.autocast, self.mode, self.max_shapes = model, autocast, mode, max_shapes
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self.failed: str | None = None

    def eager(self, x: Tensor) -> Tensor:
        with torch.no_grad(), self.autocast():
            return self.model(x)

    def __call__(self, x: Tensor) -> Tensor:
        usable = (self.mode != "off" and self.failed is None and x.is_cuda and not self.model.training)
        if not usable:
            return self.eager(x)
        key = (tuple(x.shape), x.dtype, x.stride())
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_shapes:
                return self.eager(x)
            entry = self._capture(key, x)
            if entry is None:
                return self.eager(x)
        graph, static_x, static_out = entry
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, key: tuple, x: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor] | None:
        static_x = x.clone()
        side, main = torch.cuda.Stream(x.device), torch.cuda.current_stream(x.device)
        try:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self.eager(static_x)  # warm-up: kernels chosen, workspaces allocated outside the capture
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with capture_into(graph, x.device):
                static_out = self.eager(static_x)
        except Exception as exc:
            if self.mode == "on":
                raise GraphCaptureError(f"capturing the evaluation forward failed ({type(exc).__name__}: {exc})") \
                    from exc
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture of the evaluation forward failed (%s); it runs eagerly", self.failed)
            return None
        self.graphs[key] = (graph, static_x, static_out)
        return self.graphs[key]
