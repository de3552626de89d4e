"""Cells as Ray tasks: where and how many at once, retried on worker or node loss, one trainer per cell.

A runner (`medgcsam experiment FILE`) is a Ray driver. By default it starts a private local Ray instance sized
to ``--workers`` cells (``address="local"``: never a cluster that some `ray start` left running on the machine);
with ``--address`` (or ``RAY_ADDRESS``) it submits to an existing cluster; a caller that already connected
(a notebook, the tests) keeps its connection. Each cell is one task declaring the experiment's
``scheduling`` resources (CPUs, a GPU fraction, memory) and ``max_retries``.

The task trains the cell in the Ray worker process itself, not in a subprocess of it: the worker *is* the
training, so when Ray loses it (SIGKILL, the OOM killer, a lost node) the training is gone too and Ray's retry
is the only attempt left, whereas a subprocess would outlive its worker and train beside the retry. CPU cells
reuse workers (importing torch, MONAI and MLflow takes 10-20 s), as the former sequential runner reused its one
process; a GPU cell gets a fresh worker (``max_calls=1``) so its CUDA memory goes back to the GPU's other cells.
A retry resumes from the cell's checkpoints where its cells folder is shared (the runner's resume rule), and
otherwise starts the cell again; the run of the attempt that died is then marked superseded.

The runner holds a lease on each cell it submits (:mod:`.lease`), from submission until the task's result is
in, across Ray's retries, so two runners never train one cell at once, and checks the MLflow record after
taking the lease, so a cell another runner finished is never trained again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import ray
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from ray.exceptions import RayError, RayTaskError

from .config import ExperimentConfig
from .grid import Cell
from .lease import LeaseTable
from .records import ExperimentError, RunSummary


class Experiment(Protocol):
    """What the scheduler uses of ``runner.Experiment`` (which imports this module, not the other way round)."""

    path: Path
    overrides: list[str]
    tracking_uri: str
    output_dir: Path
    config: ExperimentConfig
    client: MlflowClient

    def __init__(self, path: str | Path, overrides: list[str] | None = None, *,
                 tracking_uri: str | None = None) -> None: ...

    def parent_run_id(self, create: bool = True) -> str | None: ...

    def run_cell(self, cell: Cell) -> str: ...

    def finished_runs(self, only: str | None = None) -> dict[str, Run]: ...


log = logging.getLogger(__name__)

TAG_NODE = "medgcsam.ray_node"  # the Ray node id the cell trained on
TAG_RESOURCES = "medgcsam.ray_resources"  # JSON: the resources Ray assigned to the cell's task
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20  # cells pass ids and small dicts, never arrays, through Ray's store


def finished_run(exp: Experiment, cell: Cell) -> Run | None:
    """The FINISHED child run recording ``cell`` on the current base pipeline, or None (the runner's rule)."""
    return exp.finished_runs(only=cell.id).get(cell.id)


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """The worker's stdout and stderr (training logs, warnings) into the cell's log file for the task's length."""
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = [os.dup(1), os.dup(2)]
    with path.open("ab") as fh:
        for fd in (1, 2):
            os.dup2(fh.fileno(), fd)
        try:
            yield
        finally:
            for fd, old in zip((1, 2), saved, strict=True):
                os.dup2(old, fd)
                os.close(old)


def train_cell(kind: type[Experiment], path: str, overrides: list[str], tracking_uri: str,
               cell: Cell) -> dict[str, Any]:
    """One cell, in a Ray worker: skipped if already recorded (a retry after the record was written), else
    trained; its run is tagged with the node and the resources Ray gave the task."""
    exp = kind(path, overrides, tracking_uri=tracking_uri)
    done = finished_run(exp, cell)
    if done is not None:
        return {"run_id": done.info.run_id, "trained": False}
    ctx = ray.get_runtime_context()
    with _output_to(exp.output_dir / "logs" / f"{cell.id}.log"):
        run_id = exp.run_cell(cell)
    exp.client.set_tag(run_id, TAG_NODE, ctx.get_node_id())
    exp.client.set_tag(run_id, TAG_RESOURCES, json.dumps(ctx.get_assigned_resources(), sort_keys=True))
    return {"run_id": run_id, "trained": True}


_REUSED_WORKER = ray.remote(train_cell)  # CPU cells: a worker trains one cell after another
_FRESH_WORKER = ray.remote(max_calls=1)(train_cell)  # GPU cells: the worker exits after its cell


class Scheduler:
    """One runner's Ray session and cell leases; Ray is started or joined only when a cell has to train."""

    def __init__(self, exp: Experiment, *, workers: int | None = None, address: str | None = None):
        self.exp = exp
        self.cfg = exp.config.scheduling
        self.workers = workers
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus = self.cfg.num_cpus or 1.0  # unset: 1 on a cluster; the local instance shares the cores
        if self.cfg.num_cpus is None and not self.address and not ray.is_initialized():
            self.num_cpus = float(max(1, (os.cpu_count() or 1) // (workers or 1)))
        self.leases: LeaseTable | None = None
        self._own_ray = False
        self._beat_every = self.cfg.lease_ttl_s / 4
        self._next_beat = 0.0

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.leases is not None:
            self.leases.close()
        if self._own_ray:
            ray.shutdown()

    # ---- Ray ---------------------------------------------------------------------------------
    def demand(self) -> dict[str, float]:
        """Ray resources of one cell's task."""
        need = {"CPU": self.num_cpus, "GPU": self.cfg.num_gpus}
        if self.cfg.memory_gb:
            need["memory"] = self.cfg.memory_gb * 2**30
        return {k: v for k, v in need.items() if v > 0}

    def _connect(self) -> None:
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address)
            else:
                cpus = math.ceil((self.workers or 1) * self.num_cpus)
                ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            self._own_ray = True
        totals = ray.cluster_resources()
        short = {k: v for k, v in self.demand().items() if totals.get(k, 0.0) < v}
        if short:
            where = self.address or "the local Ray instance"
            raise ExperimentError(f"each cell asks for {short} (scheduling: in {self.exp.path}) but {where} has "
                                  f"{ {k: totals.get(k, 0.0) for k in short} } in all; lower the request or add "
                                  f"nodes that have it")
        self.leases = LeaseTable(self.exp.client, self.exp.parent_run_id(), self.cfg.lease_ttl_s)
        self._beat({})

    def window(self) -> int:
        """Cells submitted at once: what the cluster fits now (it may grow), at most ``workers``."""
        totals = ray.cluster_resources()
        fits = min(int(totals.get(k, 0.0) / v + 1e-9) for k, v in self.demand().items())
        return max(1, min(fits, self.workers) if self.workers else fits)

    def _submit(self, cell: Cell) -> ray.ObjectRef:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.cfg.num_gpus,
                                "max_retries": self.cfg.max_retries, "name": f"medgcsam cell {cell.name}"}
        if self.cfg.memory_gb:
            opts["memory"] = int(self.cfg.memory_gb * 2**30)
        task = _FRESH_WORKER if self.cfg.num_gpus else _REUSED_WORKER
        return task.options(**opts).remote(type(self.exp), str(self.exp.path), self.exp.overrides,
                                           self.exp.tracking_uri, cell)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self, cells: list[Cell], summary: RunSummary) -> None:
        """Train ``cells`` (none finished at the caller's last look), collecting each as it ends."""
        if not cells:
            return
        if self.leases is None:
            self._connect()
        queue, running = list(cells), {}
        later: dict[str, float] = {}  # cell id -> when to claim it again (two runners claimed it at once)
        started, trained, held, ended = time.monotonic(), 0, 0, False

        def report() -> None:
            log.info("%s", progress(len(cells), len(queue), len(running), held, summary, trained,
                                    time.monotonic() - started))

        while queue or running:
            if len(running) < self.window():
                held = self._fill(queue, running, later, summary)
            if ended:  # after the refill, so that "running" counts the cells that took the ended ones' places
                report()
                ended = False
            if not running:  # every queued cell is held by another runner or backing off: look again soon
                time.sleep(random.uniform(1.0, 3.0))
                self._beat(running)
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=min(self._beat_every, 5.0))
            for ref in ready:
                trained += self._collect(ref, running.pop(ref), summary)
            self._beat(running)
            ended = bool(ready)
        if ended:
            report()

    def _fill(self, queue: list[Cell], running: dict[ray.ObjectRef, Cell], later: dict[str, float],
              summary: RunSummary) -> int:
        """Submit free cells up to the window; returns how many queued cells other runners hold."""
        now, window = time.monotonic(), self.window()
        others = self.leases.holders()
        for cell in list(queue):
            if len(running) >= window:
                break
            if cell.id in others or later.get(cell.id, 0.0) > now:
                continue
            if not self.leases.acquire(cell.id):  # claimed at the same moment by another runner: both withdrew
                later[cell.id] = now + random.uniform(1.0, 5.0)
                continue
            queue.remove(cell)
            if finished_run(self.exp, cell) is not None:  # another runner finished it while we waited
                self.leases.release(cell.id)
                summary.skipped.append(cell.id)
                continue
            log.info("cell %s (%s): submitted", cell.id, cell.name)
            running[self._submit(cell)] = cell
        return sum(1 for c in queue if c.id in others)

    def _collect(self, ref: ray.ObjectRef, cell: Cell, summary: RunSummary) -> int:
        """Record one ended task; returns 1 if this runner trained the cell."""
        logs = self.exp.output_dir / "logs" / f"{cell.id}.log"
        try:
            out = ray.get(ref)
        except RayTaskError as exc:  # the cell raised: not retried, the same error would come back
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            log.error("cell %s (%s) failed: %s: %s (log: %s)", cell.id, cell.name, type(cause).__name__, cause, logs)
            summary.failed[cell.id] = f"{cell.name}: {type(cause).__name__}: {cause}"
            return 0
        except RayError as exc:  # its worker or node was lost more than max_retries times, or it lost its lease
            log.error("cell %s (%s) lost: %s", cell.id, cell.name, exc)
            summary.failed[cell.id] = (f"{cell.name}: {type(exc).__name__} (max_retries "
                                       f"{self.cfg.max_retries}); see {logs} on the node that ran it")
            return 0
        finally:
            self.leases.release(cell.id)
        (summary.ran if out["trained"] else summary.skipped).append(cell.id)
        return int(out["trained"])

    def _beat(self, running: dict[ray.ObjectRef, Cell]) -> None:
        """Renew the leases when due; stop the tasks of cells whose lease is no longer safely ours."""
        if time.monotonic() < self._next_beat:
            return
        self._next_beat = time.monotonic() + self._beat_every
        lost = self.leases.beat()
        for ref, cell in running.items():
            if cell.id in lost:
                log.error("cell %s (%s): lease lost, stopping its task", cell.id, cell.name)
                ray.cancel(ref, force=True)


def progress(total: int, queued: int, running: int, held: int, summary: RunSummary, trained: int,
             elapsed: float) -> str:
    """One progress line: done / running / failed / held elsewhere, and the time left at this runner's pace."""
    failed = len(summary.failed)
    done = total - queued - running - failed
    left = queued + running
    line = f"cells: {done}/{total} done, {running} running, {failed} failed"
    if held:
        line += f", {held} held by other runners"
    if trained and left:
        line += f"; about {_duration(elapsed / trained * left)} left"
    return line


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 2:
        return f"{seconds:.0f} s"
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
