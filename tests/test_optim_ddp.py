"""Two CPU processes (gloo): replicas end every step with identical weights, per-replica or synced perturbation."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from medgcsam.optim import create_optimizer

METHODS = ("sam", "gcsam", "gsam", "wsam", "crsam")
MODES = ("local", "synced")
STEPS = 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for method in METHODS:
            for mode in MODES:
                net = _net()
                model = DDP(net)
                opt = create_optimizer(method, model.parameters(), model=model, lr=1e-2, weight_decay=1e-3)
                gen = torch.Generator().manual_seed(100 + rank)  # every replica sees different data
                first_e = None
                for _ in range(STEPS):
                    x, y = torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
                    local = opt.no_sync_passes(mode)
                    for i in range(opt.passes_per_step):
                        ctx = model.no_sync() if i in local else contextlib.nullcontext()
                        with ctx:
                            nn.functional.cross_entropy(model(x), y).backward()
                        before = [p.detach().clone() for p in net.parameters()] if i == 0 else None
                        opt.after_backward(i)
                        if i == 0 and first_e is None:
                            first_e = torch.cat([(p.detach() - b).flatten() for p, b in
                                                 zip(net.parameters(), before, strict=True)])
                flat = torch.cat([p.detach().flatten().double() for p in net.parameters()])  # BN buffers: per replica
                results[f"{method}-{mode}"] = (flat, first_e)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_replicas_identical_in_both_modes(tmp_path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(r0) == {f"{m}-{mode}" for m in METHODS for mode in MODES}
    for key in r0:
        w0, e0 = r0[key]
        w1, e1 = r1[key]
        assert torch.equal(w0, w1), f"{key}: replicas diverged"
        # local mode perturbs with each replica's own gradient; synced mode with the averaged one
        assert torch.equal(e0, e1) == key.endswith("synced"), key
    assert not torch.equal(r0["gcsam-local"][0], r0["sam-local"][0])
