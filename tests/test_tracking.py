"""MLflow tracking against a real ``mlflow server`` on 127.0.0.1: a run, its metrics and the registered
model read back through MlflowClient; a dead URI fails fast; a server outage mid-run loses nothing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from medgcsam.config import PipelineConfig
from medgcsam.data.manifest import manifest_sha256
from medgcsam.engine import train
from medgcsam.inference.package import load_classifier
from medgcsam.tracking import ResilientMetricLogger, TrackingError, ensure_reachable, resolve_tracking_uri
from tests.test_engine import tiny_config, write_image_folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``mlflow server`` with a sqlite backend and a local artifact root, in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        with open(self.root / "server.log", "ab") as log:  # the child keeps its own handle
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
            assert self.proc.poll() is None, (self.root / "server.log").read_text()
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def test_run_metrics_and_registered_model_on_a_real_server(server, images, tmp_path):
    raw = tiny_config(images, tmp_path, "served", "gcsam")
    raw["tracking"] = {"experiment": "served", "register_as": "tiny-classifier", "alias": "champion",
                       "log_model": True}
    raw["evaluation"] = {"enabled": True, "positive_class": "malignant", "bootstrap": 20}
    cfg = PipelineConfig.model_validate(raw)
    result = train(cfg, tracking_uri=server.uri)

    client = mlflow.MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.name"] == "gcsam"
    assert run.data.params["data.manifest_sha256"] == manifest_sha256(images)
    assert len(run.data.params["git_commit"]) >= 7 and run.data.params["version.torch"] == torch.__version__
    epochs = sorted(m.step for m in client.get_metric_history(result.run_id, "val_epoch/loss"))
    assert epochs == [1, 2]  # per-epoch validation curve
    # val/ holds only the evaluation of the kept model, so MLflow's latest val/ figure is that model's
    assert len(client.get_metric_history(result.run_id, "val/accuracy")) == 1
    assert "val/sensitivity/malignant" in run.data.metrics and "test/auroc_macro" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "training")}
    assert {"training/curves.png", "training/grad_norm.png", "training/grad_norm_trace.csv"} <= artifacts

    version = client.get_model_version_by_alias("tiny-classifier", "champion")
    assert version.version == result.registered_version and version.run_id == result.run_id
    mlflow.set_tracking_uri(server.uri)
    mlflow.set_registry_uri(server.uri)
    model, spec = load_classifier("models:/tiny-classifier@champion")
    assert spec.class_names == ["benign", "malignant"] and spec.threshold is not None
    for key, value in result.model.state_dict().items():
        assert torch.equal(value.cpu(), model.state_dict()[key])


def test_dead_tracking_uri_fails_fast_with_the_message(images, tmp_path):
    port = _free_port()  # nothing listens there
    cfg = PipelineConfig.model_validate(tiny_config(images, tmp_path, "dead", "adam"))
    start = time.monotonic()
    with pytest.raises(TrackingError, match=rf"127\.0\.0\.1:{port} is unreachable.*mlflow server"):
        train(cfg, tracking_uri=f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 10
    assert not (tmp_path / "dead").exists()  # failed before data or model work


def test_unroutable_server_times_out_within_the_limit():
    start = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable"):
        ensure_reachable("http://10.255.255.1:5000", timeout_s=2)
    assert time.monotonic() - start < 4


def test_default_store_is_sqlite_under_output_dir(images, tmp_path):
    cfg = PipelineConfig.model_validate(tiny_config(images, tmp_path / "out", "x"))
    assert resolve_tracking_uri(cfg) == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    assert resolve_tracking_uri(cfg, "http://h:5000") == "http://h:5000"


def test_outage_mid_run_keeps_metrics_until_the_server_is_back(server):
    """Last in the module: it stops and restarts the shared server on the same port and store."""
    client = mlflow.MlflowClient(tracking_uri=server.uri)
    run_id = client.create_run(client.create_experiment("outage")).info.run_id
    logger = ResilientMetricLogger(client, run_id, spill_path=server.root / "unsent.json", timeout_s=2)
    logger.log({"train/loss": 1.0}, step=1)
    assert logger.flush()

    server.stop()
    start = time.monotonic()
    logger.log({"train/loss": 0.5}, step=2)
    assert not logger.flush() and logger.pending == 1  # kept, no exception, no long stall
    assert time.monotonic() - start < 5

    server.start()
    logger.log({"train/loss": 0.25}, step=3)
    assert logger.close(retry_for_s=10)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 0.25)]
    assert not (server.root / "unsent.json").exists()


def test_metrics_spill_to_json_when_the_server_never_returns(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{_free_port()}")
    logger = ResilientMetricLogger(client, "0" * 32, spill_path=tmp_path / "unsent.json", timeout_s=1)
    logger.log({"val/loss": 0.7}, step=4)
    assert not logger.close(retry_for_s=0)
    assert '"val/loss"' in (tmp_path / "unsent.json").read_text()


def _open_store(uri: str, barrier, results) -> None:
    """One process of the concurrent-start test: wait for the others, then open the store as `train` does."""
    from medgcsam.tracking import ensure_experiment

    cfg = PipelineConfig.model_validate({"data": {"manifest": "m.csv"}, "tracking": {"experiment": "shared"}})
    barrier.wait()
    try:
        results.put(ensure_experiment(cfg, uri))
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def test_runs_starting_together_on_a_new_sqlite_store_all_get_it(tmp_path):
    """MLflow creates the schema on first use; three runs doing that at once must not leave it half-migrated."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ensure_reachable(uri)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_open_store, args=(uri, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    answers = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert len(set(answers)) == 1 and answers[0].isdigit(), answers
    assert mlflow.MlflowClient(uri).get_experiment_by_name("shared").experiment_id == answers[0]


def test_a_read_only_store_folder_fails_at_once(tmp_path):
    """A sqlite store in a folder it cannot write: MLflow retries opening it for about two minutes; the probe says
    so at once. Root ignores permission bits, so for root the folder is a read-only bind mount in a private mount
    namespace, or /proc (which nobody can create files in) where namespaces are not allowed."""
    folder, source = tmp_path / "ro", tmp_path / "src"
    folder.mkdir()
    source.mkdir()
    probe = "from medgcsam.tracking import ensure_reachable; import sys; ensure_reachable(sys.argv[1])"
    if os.geteuid() != 0:
        folder.chmod(0o555)
        command = [sys.executable, "-c", probe, f"sqlite:///{folder}/mlflow.db"]
    elif shutil.which("unshare") and subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0:
        command = ["unshare", "-m", "sh", "-c", f'mount --bind {source} {folder} && mount -o remount,bind,ro {folder} '
                   f'&& exec {sys.executable} -c "{probe}" sqlite:///{folder}/mlflow.db']
    else:
        folder = Path("/proc")
        command = [sys.executable, "-c", probe, "sqlite:////proc/mlflow.db"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "TrackingError" in done.stderr, done.stderr
    assert f"cannot write in folder {folder}" in done.stderr, done.stderr


def test_an_unwritable_output_dir_fails_before_work_and_a_failed_setup_ends_the_run_failed(images, tmp_path):
    """output_dir inside a file (with the store elsewhere) is refused before data or model work; and when the run's
    own setup fails (artifacts of an existing experiment that can no longer be written), the run is ended FAILED
    rather than left RUNNING for MLflow's exit hook to mark FINISHED."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "afile").write_text("not a folder")
    cfg = PipelineConfig.model_validate(tiny_config(images, tmp_path / "afile" / "out", "nowhere", "adam"))
    with pytest.raises(TrackingError, match=r"output_dir: cannot write in folder .*afile/out"):
        train(cfg, tracking_uri=uri)

    ensure_reachable(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("stale", artifact_location=(tmp_path / "afile" / "artifacts").as_uri())
    raw = tiny_config(images, tmp_path / "out", "stale", "adam")
    raw["tracking"]["experiment"] = "stale"
    try:
        with pytest.raises(OSError):
            train(PipelineConfig.model_validate(raw), tracking_uri=uri)
        assert mlflow.active_run() is None
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
    [run] = client.search_runs([exp])
    assert run.info.status == "FAILED"


def test_in_memory_sqlite_store_is_refused():
    """`sqlite://` is SQLAlchemy's in-memory database: a run would "finish" and leave nothing behind."""
    for uri in ("sqlite://", "sqlite:///:memory:"):
        with pytest.raises(TrackingError, match="in-memory store"):
            ensure_reachable(uri)


def test_resume_against_a_store_without_the_run_names_the_run_and_the_fix(images, tmp_path):
    cfg = PipelineConfig.model_validate(tiny_config(images, tmp_path, "moved", "adam", epochs=1))
    first = train(cfg)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(TrackingError, match=rf"continues MLflow run {first.run_id}, which {other} cannot reopen"):
        train(cfg, resume=True, tracking_uri=other)
    assert mlflow.active_run() is None
