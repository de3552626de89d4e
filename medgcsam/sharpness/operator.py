"""The loss Hessian as a linear operator on flat parameter vectors.

H is the Hessian of the *sample-mean* loss over a fixed list of batches with respect to every
trainable parameter: H v = sum_b (n_b / N) H_b v. The solvers (Lanczos, power iteration,
Hutchinson, SLQ) only see ``matvec(v)``, so they can be tested on explicit matrices.

Two HVP methods, both exact:
- ``"rev"``  reverse-over-reverse (double backward). The first-order graph of each batch is built once
  and kept, so every further HVP costs one extra backward (PyHessian's trick, minus its ``.grad``
  reference cycle): about 1.45x faster per product than rebuilding it (resnet18, 96 px, batch 64, CPU).
  With several batches that holds only while all their graphs fit in ``graph_memory`` bytes (default:
  half of the memory free on the device), judged on the first graph built (``medgcsam.sharpness.memory``);
  otherwise each graph is rebuilt per product, as PyHessian's multi-batch mode always does. Kept graphs
  are dropped when a parameter changes (in place or by ``.data`` assignment).
- ``"fwd"``  forward-over-reverse, ``jvp(grad(loss))`` via ``torch.func`` (less memory, no retained
  graph; needs forward-AD formulas for every op).
Fused attention kernels support neither, so every HVP runs under the math SDPA backend, and TF32
is switched off for the duration (it adds ~1e-3 relative noise to each product).

On CUDA (``cuda_graph="auto"``, method ``"rev"`` with the first-order graphs kept) a product is one backward
through graphs that never change while the weights do not, so it is captured once in a CUDA graph and replayed:
the solvers' products are launch-bound at the batch sizes used (a few ms each). The first-order graphs are built
on the capture stream (autograd runs backward ops on their forward's stream), one eager product on a probe
vector is compared with the first replay, and anything that fails falls back to the eager product with a logged
reason. CPU numerics are untouched.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from medgcsam.cuda_capture import capture_into
from medgcsam.sharpness.memory import free_memory, graph_bytes

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def exact_numerics() -> Iterator[None]:
    """TF32 off and the math attention kernel (differentiable twice and forward-mode) on."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside; train/eval flags of every submodule, parameters and buffers restored after.

    Restoring by ``copy_`` from clones makes the model bitwise identical afterwards, even when the
    body raised halfway through a perturbation.
    """
    modes = {m: m.training for m in model.modules()}
    saved = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]]
    model.eval()
    try:
        yield model
    finally:
        with torch.no_grad():
            for t, copy in saved:
                t.copy_(copy)
        for m, mode in modes.items():
            m.training = mode


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One detached flat vector in parameters_to_vector order."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class HessianOperator:
    """``H v`` for the mean ``criterion(model(x), y)`` over ``batches`` (staged on ``device`` once).

    The model's mode is used as is; :func:`compute_sharpness` puts it in eval mode (BN running
    statistics, no dropout), which is what makes the operator deterministic (in train mode a kept graph
    would also keep one dropout mask). ``hvp_count`` counts products, one per call whatever the number
    of batches.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], criterion: Criterion = F.cross_entropy, *,
                 method: str = "rev", device: torch.device | str | None = None,
                 graph_memory: int | None = None, cuda_graph: str = "auto") -> None:
        if method not in ("rev", "fwd"):
            raise ValueError(f"unknown HVP method {method!r}; use 'rev' (double backward) or 'fwd' (jvp of grad)")
        if not batches:
            raise ValueError("HessianOperator needs at least one (x, y) batch")
        if cuda_graph not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graph must be 'auto', 'on' or 'off', got {cuda_graph!r}")
        self.model, self.criterion, self.method = model, criterion, method
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
        device = torch.device(device) if device is not None else self.params[0].device
        self.batches = [(x.to(device), y.to(device)) for x, y in batches]
        self.total = sum(len(y) for _, y in self.batches)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = sum(self.numels)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.hvp_count = 0
        self.graph_memory = graph_memory
        self.graphs_kept: bool | None = None  # "rev": decided when the first graph is built
        self._graphs: list[list[torch.Tensor] | None] = [None] * len(self.batches)
        self._graphs_at: list[tuple[int, int]] = []  # (data_ptr, version) of each parameter when they were built
        self.cuda_graph, self.graph_fallback, self.replays = cuda_graph, None, 0  # fallback: why products are eager
        self._captured: tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, list] | None = None

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the parameters (parameters_to_vector order)."""
        return [t.view(s) for t, s in zip(torch.split(flat, self.numels), self.shapes, strict=True)]

    def flatten(self) -> torch.Tensor:
        """The current parameter values as one flat vector."""
        return _flat(self.params)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of length ``dim``."""
        self.hvp_count += 1
        captured = self._replayable()
        if captured is None:
            return self._product(v)
        graph, static_v, static_out, _ = captured
        static_v.copy_(v)
        graph.replay()
        self.replays += 1
        return static_out.clone()

    def _weights(self) -> list[tuple[int, int]]:
        return [(p.data_ptr(), p._version) for p in self.params]

    def _replayable(self) -> tuple | None:
        """The captured product for the current weights (captured now if needed), or None: run it eagerly."""
        if (self.cuda_graph == "off" or self.graph_fallback is not None or self.device.type != "cuda"
                or self.method != "rev"):
            return None
        if self._captured is not None and self._captured[3] == self._weights():
            return self._captured
        self._captured = None  # it read the old weights' activations
        try:
            self._captured = self._capture()
        except Exception as exc:  # noqa: BLE001 - any failure: the eager product is always right
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if self.cuda_graph == "on":
                raise RuntimeError(f"cuda_graph=on: capturing the Hessian-vector product failed ({reason}); "
                                   "use cuda_graph=auto (falls back to eager) or off") from exc
            self.graph_fallback = reason
            log.warning("CUDA graph capture of the Hessian-vector product failed (%s); products run eagerly", reason)
        return self._captured

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, list]:
        """Build the first-order graphs on a side stream, run one eager product there, capture it, check it."""
        side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
        probe = torch.randn(self.dim, dtype=self.dtype, device=self.device,
                            generator=torch.Generator(self.device).manual_seed(0))
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._graphs, self._graphs_at = [None] * len(self.batches), []  # rebuilt on the capture stream
            expected = self._product(probe)
        if not self.graphs_kept:
            raise RuntimeError("the first-order graphs of all batches do not fit in memory together "
                               "(each product rebuilds them; nothing fixed to capture)")
        static_v, graph = probe.clone(), torch.cuda.CUDAGraph()
        with capture_into(graph, self.device, stream=side):
            static_out = self._product(static_v)
        main.wait_stream(side)
        graph.replay()
        error = float((static_out - expected).norm() / expected.norm().clamp_min(1e-30))
        if not error <= 1e-4:  # kernels outside the capture would show here
            raise RuntimeError(f"the replayed product differs from the eager one by {error:.2e} (relative)")
        return graph, static_v, static_out, self._weights()

    def _product(self, v: torch.Tensor) -> torch.Tensor:
        parts = self.split(v.to(self.dtype))
        out: torch.Tensor | None = None
        with exact_numerics():
            for i, (x, y) in enumerate(self.batches):
                hv = self._hvp_rev(i, parts) if self.method == "rev" else self._hvp_fwd(x, y, parts)
                flat = _flat(hv)
                weight = len(y) / self.total
                out = (flat if weight == 1 else flat.mul_(weight)) if out is None else out.add_(flat, alpha=weight)
        return out

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the same sample-mean loss.

        Lanczos starts from it: gradients lie mostly in the top eigenspace of the Hessian (Gur-Ari et al.
        2018), so the top eigenvalue is found in a few products. With ``"rev"`` it is read off the
        first-order graphs the products need anyway, so when they are kept it costs nothing extra."""
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with exact_numerics():
            for i, (x, y) in enumerate(self.batches):
                if self.method == "rev":
                    grads = self._graph(i)  # _flat detaches
                else:
                    loss = self.criterion(self.model(x), y)
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True, materialize_grads=True)
                out.add_(_flat(grads), alpha=len(y) / self.total)
        return out

    def loss(self) -> torch.Tensor:
        """Sample-mean loss over all batches (no graph)."""
        with torch.no_grad(), exact_numerics():
            return sum(self.criterion(self.model(x), y) * (len(y) / self.total) for x, y in self.batches)

    def _first_order(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        loss = self.criterion(self.model(x), y)
        return list(torch.autograd.grad(loss, self.params, create_graph=True, materialize_grads=True))

    def _graph(self, i: int) -> list[torch.Tensor]:
        """Batch ``i``'s first-order graph: the kept one, or a new one (kept if all of them fit)."""
        weights = self._weights()
        if weights != self._graphs_at:  # kept graphs hold the old weights' activations
            self._graphs, self._graphs_at = [None] * len(self.batches), weights
        grads = self._graphs[i]
        if grads is not None:
            return grads
        before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        grads = self._first_order(*self.batches[i])
        if self.graphs_kept is None:
            self.graphs_kept = self._all_fit(i, grads, before)
        if self.graphs_kept:
            self._graphs[i] = grads
        return grads

    def _all_fit(self, i: int, grads: list[torch.Tensor], allocated_before: int) -> bool:
        """Would the other batches' graphs fit beside this one? Scaled by sample count from batch ``i``."""
        if len(self.batches) == 1:
            return True  # keeping the only graph costs no more than rebuilding it
        if self.graph_memory == 0:
            return False
        x, y = self.batches[i]
        if self.device.type == "cuda":  # exact, and reads no saved tensor (checkpointing would recompute)
            size = torch.cuda.memory_allocated(self.device) - allocated_before
        else:
            size = graph_bytes(grads, exclude=[*self.params, x, y])
        others = size * (self.total - len(y)) / len(y)
        budget = free_memory(self.device) // 2 if self.graph_memory is None else self.graph_memory
        return others <= budget

    def _hvp_rev(self, i: int, parts: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        grads = self._graph(i)  # decides graphs_kept on the first call
        # parameters that enter the loss only linearly have no second-order path: zeros, not errors
        return torch.autograd.grad(grads, self.params, grad_outputs=parts, retain_graph=self.graphs_kept,
                                   allow_unused=True, materialize_grads=True)

    def _hvp_fwd(self, x: torch.Tensor, y: torch.Tensor, parts: list[torch.Tensor]) -> Sequence[torch.Tensor]:
        def loss_of(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            out = functional_call(self.model, dict(zip(self.names, values, strict=True)), (x,))
            return self.criterion(out, y)

        primals = tuple(p.detach() for p in self.params)
        return jvp(grad(loss_of), (primals,), (tuple(parts),))[1]
