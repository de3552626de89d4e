"""The loss Hessian as a linear operator on flat parameter vectors.

H is the Hessian of the *sample-mean* loss over a fixed list of batches with respect to every
trainable parameter: H v = sum_b (n_b / N) H_b v. The solvers (Lanczos, power iteration,
Hutchinson, SLQ) only see ``matvec(v)``, so they can be tested on explicit matrices.

Two HVP methods, both exact:
- ``"rev"``  reverse-over-reverse (double backward). The first-order graph of each batch is built once
  and kept, so every further HVP costs one extra backward (PyHessian's trick, minus its ``.grad``
  reference cycle): about 1.45x faster per product than rebuilding it (resnet18, 96 px, batch 64, CPU).
  With several batches that holds only while all their graphs fit in ``graph_memory`` bytes (default:
  half of the memory free on the device), measured on the first graph built; otherwise each graph is
  rebuilt per product, as PyHessian's multi-batch mode always does.
- ``"fwd"``  forward-over-reverse, ``jvp(grad(loss))`` via ``torch.func`` (less memory, no retained
  graph; needs forward-AD formulas for every op).
Fused attention kernels support neither, so every HVP runs under the math SDPA backend, and TF32
is switched off for the duration (it adds ~1e-3 relative noise to each product).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    statistics, no dropout), which is what makes the operator deterministic. ``hvp_count`` counts
    products, one per call whatever the number of batches.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Batch], criterion: Criterion = F.cross_entropy, *,
                 method: str = "rev", device: torch.device | str | None = None,
                 graph_memory: int | None = None) -> None:
        if method not in ("rev", "fwd"):
            raise ValueError(f"unknown HVP method {method!r}; use 'rev' (double backward) or 'fwd' (jvp of grad)")
        if not batches:
            raise ValueError("HessianOperator needs at least one (x, y) batch")
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

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the parameters (parameters_to_vector order)."""
        return [t.view(s) for t, s in zip(torch.split(flat, self.numels), self.shapes, strict=True)]

    def flatten(self) -> torch.Tensor:
        """The current parameter values as one flat vector."""
        return _flat(self.params)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """``H v`` for a flat vector ``v`` of length ``dim``."""
        parts = self.split(v.to(self.dtype))
        out: torch.Tensor | None = None
        with exact_numerics():
            for i, (x, y) in enumerate(self.batches):
                hv = self._hvp_rev(i, parts) if self.method == "rev" else self._hvp_fwd(x, y, parts)
                flat = _flat(hv)
                weight = len(y) / self.total
                out = (flat if weight == 1 else flat.mul_(weight)) if out is None else out.add_(flat, alpha=weight)
        self.hvp_count += 1
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
                    grads = [g.detach() for g in self._graph(i)]
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
        grads = self._graphs[i]
        if grads is None:
            grads = self._first_order(*self.batches[i])
            if self.graphs_kept is None:
                others = graph_bytes(grads) * (len(self.batches) - 1)
                budget = free_memory(self.device) // 2 if self.graph_memory is None else self.graph_memory
                self.graphs_kept = others <= budget
            if self.graphs_kept:
                self._graphs[i] = grads
        return grads

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


def graph_bytes(outputs: Sequence[torch.Tensor]) -> int:
    """Bytes an autograd graph keeps alive: the outputs plus every distinct storage its nodes saved.

    Read from the nodes' ``_saved_*`` attributes, not from saved-tensor hooks: an identity pack hook
    puts a node's own output in a reference cycle, which leaked a graph per call until ``gc`` ran."""
    storages: dict[int, int] = {}
    seen: set[object] = set()
    stack = [t.grad_fn for t in outputs]
    for t in outputs:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # a saved tensor already freed
                continue
            for t in value if isinstance(value, tuple | list) else (value,):
                if isinstance(t, torch.Tensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(n for n, _ in node.next_functions)
    return sum(storages.values())


CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device``: CUDA's own count; for the CPU, Linux's MemAvailable capped by the container's
    cgroup limit (v2 or v1; MemAvailable alone shows the host's memory inside a container); else 0."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    found = []
    meminfo = _read("/proc/meminfo")
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            found.append(int(line.split()[1]) * 1024)
    for limit, usage in CGROUP_MEMORY_FILES:
        cap, used = _read(limit), _read(usage)
        if cap and used and cap.strip().isdigit() and used.strip().isdigit():
            found.append(int(cap) - int(used))
    return max(0, min(found)) if found else 0


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return None
