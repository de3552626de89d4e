"""How much memory an autograd graph holds and how much the device has free.

These are the two inputs of :class:`~medgcsam.sharpness.operator.HessianOperator`'s choice to keep every
batch's first-order graph between Hessian-vector products. Both err on the safe side: a graph is
over-counted rather than under-counted, and free memory is the smallest of every limit that applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

PROC_SELF = Path("/proc/self")
MEMINFO = Path("/proc/meminfo")
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63
# per cgroup version: limit file, usage file, and the memory.stat key of page cache the kernel can reclaim
CGROUP_FILES = {"v2": ("memory.max", "memory.current", "inactive_file"),
                "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def graph_bytes(outputs: Sequence[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes an autograd graph keeps alive: the outputs plus every distinct storage its nodes saved, less the
    storages of ``exclude`` (parameters and inputs, which exist whether or not the graph is kept).

    Read from the nodes' ``_saved_*`` attributes, not from saved-tensor hooks: an identity pack hook puts a
    node's own output in a reference cycle, which leaked a graph per call until ``gc`` ran. Under
    non-reentrant activation checkpointing, reading a saved tensor recomputes its segment, so the operator
    measures CUDA allocations instead where it can.
    """
    skip = {_storage(t)[0] for t in exclude}
    storages: dict[int, int] = dict(_storage(t) for t in outputs)
    seen: set[object] = set()
    stack = [t.grad_fn for t in outputs]
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
                    storages.update(_sparse_parts(t) if t.layout == torch.sparse_coo else [_storage(t)])
        stack.extend(n for n, _ in node.next_functions)
    return sum(size for key, size in storages.items() if key not in skip)


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(key, bytes) of the storage behind ``t``; layouts without one count as dense, keyed by the tensor."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (NotImplementedError, RuntimeError):
        return id(t), t.numel() * t.element_size()


def _sparse_parts(t: torch.Tensor) -> list[tuple[int, int]]:
    return [_storage(t._indices()), _storage(t._values())]


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``.

    CUDA: free device memory plus what PyTorch's allocator has reserved but not handed out. CPU: the
    smallest of Linux's MemAvailable and, for the process's memory cgroup and each ancestor, its limit
    less its non-reclaimable usage (MemAvailable alone shows the whole host inside a container or a
    Slurm job). Anything else, or nothing readable: 0, so nothing is kept.
    """
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return 0
    found = [_meminfo_available()] + [_headroom(d, v) for d, v in memory_cgroup_dirs()]
    known = [b for b in found if b is not None]
    return max(0, min(known)) if known else 0


def memory_cgroup_dirs() -> list[tuple[Path, str]]:
    """(folder, "v1"/"v2") of the process's memory cgroup and of each ancestor up to the mount point."""
    paths: dict[str, str] = {}
    for line in (_read(PROC_SELF / "cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            paths["v2"] = path
        elif "memory" in controllers.split(","):
            paths["v1"] = path
    mounts: dict[str, tuple[str, str]] = {}
    for line in (_read(PROC_SELF / "mountinfo") or "").splitlines():
        left, _, right = line.partition(" - ")
        fields, fs = left.split(), right.split()
        if len(fields) < 5 or len(fs) < 3:
            continue
        if fs[0] == "cgroup2" or (fs[0] == "cgroup" and "memory" in fs[2].split(",")):
            mounts["v2" if fs[0] == "cgroup2" else "v1"] = (fields[3], fields[4])
    dirs = []
    for version, path in paths.items():
        if version not in mounts:
            continue
        root, point = mounts[version]
        relative = path[len(root):] if root != "/" and path.startswith(root) else path
        top = Path(point)
        folder = top / relative.lstrip("/")
        while True:
            dirs.append((folder, version))
            if folder == top or folder.parent == folder:
                break
            folder = folder.parent
    return dirs


def _headroom(folder: Path, version: str) -> int | None:
    limit_file, usage_file, inactive_key = CGROUP_FILES[version]
    limit, usage = _int(_read(folder / limit_file)), _int(_read(folder / usage_file))
    if limit is None or usage is None or limit >= UNLIMITED:
        return None
    inactive = 0
    for line in (_read(folder / "memory.stat") or "").splitlines():
        key, _, value = line.partition(" ")
        if key == inactive_key:
            inactive = _int(value) or 0
    return limit - max(0, usage - inactive)


def _meminfo_available() -> int | None:
    for line in (_read(MEMINFO) or "").splitlines():
        if line.startswith("MemAvailable:"):
            kib = _int(line.removeprefix("MemAvailable:").split()[0] if line.split()[1:] else None)
            return None if kib is None else kib * 1024
    return None


def _int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
