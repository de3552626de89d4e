"""Two-process gloo DDP through the same ``train()`` that ``torchrun -m medgcsam train`` calls: GCSAM's
first pass runs under ``no_sync``, the second is all-reduced, so the replicas must stay identical
(also across the switch from a warm-start epoch of the base optimizer)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import mlflow
import torch
import torch.multiprocessing as mp

from medgcsam.config import PipelineConfig
from medgcsam.engine import load_checkpoint, train
from tests.test_engine import tiny_config, write_image_folder


def _worker(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    # exactly the environment torchrun provides
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    result = train(PipelineConfig.model_validate(raw))
    torch.save({"params": {k: v.detach().cpu() for k, v in result.model.named_parameters()},
                "run_id": result.run_id}, Path(out) / f"rank{rank}.pt")


def test_two_process_gloo_run_keeps_replicas_identical(tmp_path):
    images = write_image_folder(tmp_path / "images")
    # epoch 1: Adam warm start (its single pass must be all-reduced); epoch 2: GCSAM, pass 1 under no_sync
    raw = tiny_config(images, tmp_path / "out", "ddp", "gcsam", epochs=2, warm_start_epochs=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, raw, str(tmp_path)), nprocs=2, join=True)

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["run_id"] == r1["run_id"] and r0["run_id"]  # rank 0's run id reaches every rank
    for name, value in r0["params"].items():
        assert torch.equal(value, r1["params"][name]), f"replicas diverged at {name}"

    ckpt_dir = tmp_path / "out" / "ddp" / "checkpoints"
    last = load_checkpoint(ckpt_dir / "last.pt")
    assert last["global_step"] == 2 * 2  # 16 images / (2 ranks x batch 4) = 2 steps per epoch
    best = load_checkpoint(ckpt_dir / "best.pt")
    for name, value in r0["params"].items():
        assert torch.equal(value, best["model"][name])
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt"]  # no temp files left
    params = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(r0["run_id"]).data.params
    assert params["ddp.world_size"] == "2"  # the effective batch (4 x 2) is recoverable from the run
