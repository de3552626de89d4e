"""Cells on Ray with real processes: a worker SIGKILLed mid-cell, two runners started at once, the resources a
cell asks for, the lease table on a real MLflow store, and a two-node Ray cluster on one machine.

The runners here are `medgcsam experiment` processes (each starting its own local Ray, or joining the cluster
given by ``--address``), except where the resources are read back from this module's shared local instance.
The cells are the tiny generated-PNG cells of test_experiments_run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medgcsam.config import ConfigError
from medgcsam.experiments import Experiment, ExperimentError
from medgcsam.experiments.lease import HEARTBEAT_PREFIX, LEASE_PREFIX, LeaseTable
from medgcsam.experiments.runner import TAG_CELL, TAG_SUPERSEDED
from medgcsam.experiments.scheduler import TAG_NODE, TAG_RESOURCES
from medgcsam.files import PAUSE_ENV, PAUSE_MARKER_ENV
from tests.test_experiments_run import REPO, children, write_experiment

TWO_EPOCHS = {"epochs": 2, "max_steps_per_epoch": 2, "amp": "none", "warmup_epochs": 0, "device": "cpu"}
RAY = Path(sys.executable).with_name("ray")


def runner_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def start_runner(path: Path, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`medgcsam experiment PATH ARGS` with its output in ``log`` (a pipe could fill up and stall it)."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "medgcsam", "experiment", str(path), *args], cwd=REPO,
                                env=env or runner_env(), stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def paused_pid(marker: Path, runner: subprocess.Popen, timeout: float = 300) -> int:
    """The pid of the worker that paused at the hook (it writes the marker), once it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and runner.poll() is None:
        if marker.is_file() and marker.read_text().strip():
            return int(marker.read_text())
        time.sleep(0.2)
    raise AssertionError(f"no worker paused (runner exit {runner.poll()})")


def runs_by_cell(ex: Experiment) -> dict[str, list]:
    """Cell name -> every child run of the parent with that name (killed attempts included)."""
    out: dict[str, list] = {}
    for run in children(ex):
        out.setdefault(run.info.run_name, []).append(run)
    return out


def test_a_worker_killed_mid_cell_is_retried_and_each_cell_finishes_once(tmp_path, data_dir):
    """Two cells, one at a time. The first cell's worker is SIGKILLed in its second epoch: Ray retries the
    task, which resumes the cell's own checkpoint (one run). The second cell's worker is killed after its
    checkpoints were deleted, as on a node whose cells folder is not shared: the retry trains it again from
    scratch and the dead attempt's run is marked superseded. The runner itself survives both and reports."""
    path = write_experiment(tmp_path, data_dir, {"name": "kill", "methods": ["adam", "gcsam"], "seeds": [0]},
                            train=TWO_EPOCHS)
    marker, log = tmp_path / "paused", tmp_path / "runner.log"
    runner = start_runner(path, log, env=runner_env(**{PAUSE_ENV: "replace last.pt#2",
                                                        PAUSE_MARKER_ENV: str(marker)}))
    try:
        first = paused_pid(marker, runner)
        assert first != runner.pid
        os.kill(first, signal.SIGKILL)
        marker.unlink()  # armed again for the next cell (the retry, resumed, visits the point only once)
        second = paused_pid(marker, runner)
        assert second != first
        shutil.rmtree(tmp_path / "out" / "experiments" / "kill" / "cells")
        os.kill(second, signal.SIGKILL)  # the marker stays: nothing pauses any more
    finally:
        text = finish(runner, log)
    assert "2 cells trained" in text

    ex = Experiment(path)
    plan, finished = ex.plan(), ex.finished_runs()
    assert sorted(finished) == sorted(c.id for c in plan)
    runs = runs_by_cell(ex)
    attempts = {}
    for cell in plan:
        mine = runs[cell.name]
        done = [r for r in mine if r.info.status == "FINISHED"]
        assert [r.data.tags[TAG_CELL] for r in done] == [cell.id]  # exactly one FINISHED run per cell
        for dead in (r for r in mine if r is not done[0]):
            assert dead.info.status == "KILLED" and dead.data.tags[TAG_SUPERSEDED] == done[0].info.run_id
        attempts[cell.id] = len(mine)
    assert attempts[plan[0].id] == 1  # killed, then resumed from its checkpoint: the same run finished it
    assert attempts[plan[1].id] == 2  # its checkpoints gone, it trained again: the dead attempt is superseded
    assert "cells finished: 2 of 2" in (ex.output_dir / "report" / "report.md").read_text()


def test_two_runners_started_at_once_train_each_cell_once(tmp_path, data_dir):
    """Two `medgcsam experiment` processes on one experiment, each with its own local Ray instance: the lease
    table in the tracking store keeps them off each other's cells; both end with the full report."""
    path = write_experiment(tmp_path, data_dir, {"name": "twice", "methods": ["adam", "gcsam"], "seeds": [0, 1]})
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runners = [start_runner(path, log) for log in logs]
    texts = [finish(r, log) for r, log in zip(runners, logs, strict=True)]
    trained = [int(re.search(r"(\d+) cells trained", t).group(1)) for t in texts]
    assert sum(trained) == 4, trained  # every cell trained by exactly one of them

    ex = Experiment(path)
    runs = children(ex)
    assert sorted(r.data.tags.get(TAG_CELL, "") for r in runs) == sorted(c.id for c in ex.plan())
    assert all(r.info.status == "FINISHED" for r in runs)  # no second attempt, not even a killed one
    tags = ex.client.get_run(ex.parent_run_id()).data.tags
    assert not [k for k in tags if k.startswith((LEASE_PREFIX, HEARTBEAT_PREFIX))]  # both released everything
    assert "cells finished: 4 of 4" in (ex.output_dir / "report" / "report.md").read_text()


def test_the_lease_table_on_a_real_store(tmp_path):
    """Announce-then-check on the parent run's tags: a claimed cell is refused to another owner; two claims at once
    both withdraw; a dead owner (stale heartbeat) loses its claims, and then learns it on its next beat."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("leases")).info.run_id
    a, b = LeaseTable(client, run_id, ttl_s=60), LeaseTable(client, run_id, ttl_s=60)
    assert a.beat() == set() and b.beat() == set()
    assert a.acquire("c1") and not b.acquire("c1")
    assert b.holders() == {"c1": {a.owner}}
    a.release("c1")
    assert b.acquire("c1") and b.holders() == {} and a.holders() == {"c1": {b.owner}}

    client.set_tag(run_id, f"{LEASE_PREFIX}c2/{a.owner}", "{}")  # a's claim written, its check not yet made
    assert not b.acquire("c2")  # b sees it and withdraws; a, checking now, sees only its own
    assert a.acquire("c2") and a.beat() == set()

    impatient = LeaseTable(client, run_id, ttl_s=0.5)
    time.sleep(1.0)  # a's heartbeat is now older than this owner's ttl
    impatient.beat()
    assert impatient.acquire("c2")  # a's claim is ignored and swept
    assert a.beat() == {"c2"}  # a finds its claim gone: it must stop that cell's task
    for table in (a, b, impatient):
        table.close()
    assert not [k for k in client.get_run(run_id).data.tags if k.startswith((LEASE_PREFIX, HEARTBEAT_PREFIX))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(args: list[str], temp: Path, env: dict[str, str]) -> subprocess.Popen:
    """`ray start ... --block` in its own process group (killed as a whole at the end), ready when it says so."""
    log = temp.with_suffix(".log")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(RAY), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                                 "--object-store-memory", str(100 * 2**20), "--temp-dir", str(temp),
                                 "--disable-usage-stats", "--block"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.5)
    return proc


@pytest.fixture
def two_nodes() -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray head and a second node joined to it by `ray start --address`, one CPU each, on 127.0.0.1, in their
    own temp dirs (short paths: Ray's unix sockets live there); token auth off for this loopback-only cluster."""
    root = Path(tempfile.mkdtemp(prefix="ray2n", dir="/tmp"))
    env = runner_env(RAY_AUTH_MODE="disabled")
    address = f"127.0.0.1:{_free_port()}"
    nodes = []
    try:
        nodes.append(_ray_node(["--head", "--port", address.rsplit(":", 1)[1], "--include-dashboard=false"],
                               root / "head", env))
        nodes.append(_ray_node(["--address", address], root / "second", env))
        yield address, env
    finally:
        for proc in reversed(nodes):
            with contextlib.suppress(ProcessLookupError):  # the group is already gone
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(root, ignore_errors=True)


def test_cells_land_on_both_nodes_of_a_cluster(tmp_path, data_dir, two_nodes):
    """`--address` submits to the cluster; with one CPU per node and one per cell, the two cells run at once, one on
    each node, which the node tags of their runs show."""
    address, env = two_nodes
    path = write_experiment(tmp_path, data_dir, {"name": "nodes", "methods": ["adam", "gcsam"], "seeds": [0]},
                            train={**TWO_EPOCHS, "epochs": 1})
    log = tmp_path / "runner.log"
    text = finish(start_runner(path, log, "--address", address, env=env), log)
    assert "2 cells trained" in text and "Connected to Ray cluster" in text
    ex = Experiment(path)
    nodes = {r.data.tags[TAG_NODE] for r in children(ex)}
    assert len(nodes) == 2, nodes
    print(f"two-node cluster: cells on nodes {sorted(n[:12] for n in nodes)}")


def test_resource_requests_reach_the_tasks(tmp_path, data_dir, local_ray):
    """The scheduling section becomes each task's Ray resources (a GPU fraction on a Ray node that declares one
    GPU: Ray's accounting does not need the device); a request no node can meet fails before any training."""
    sched = {"num_cpus": 1, "num_gpus": 0.5, "memory_gb": 0.25, "max_retries": 1}
    path = write_experiment(tmp_path, data_dir, {"name": "res", "methods": ["adam", "gcsam"], "seeds": [0],
                                                 "scheduling": sched}, train={**TWO_EPOCHS, "epochs": 1})
    ex = Experiment(path)
    summary = ex.run()
    assert len(summary.ran) == 2
    node = local_ray.get_runtime_context().get_node_id()
    for run in children(ex):
        assert json.loads(run.data.tags[TAG_RESOURCES]) == {"CPU": 1.0, "GPU": 0.5, "memory": 0.25 * 2**30}
        assert run.data.tags[TAG_NODE] == node

    too_big = Experiment(path, ["name=res_big", "scheduling.num_gpus=2"])
    with pytest.raises(ExperimentError, match=r"'GPU': 2\.0.*has \{'GPU': 1\.0\}"):
        too_big.run()
    assert children(too_big) == []
    with pytest.raises(ConfigError, match="whole number"):
        Experiment(path, ["scheduling.num_gpus=1.5"])
