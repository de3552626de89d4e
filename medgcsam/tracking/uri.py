"""Where runs go: an embedded sqlite store by default, or any tracking URI the user gives.

An unreachable server must stop the run before any data is read or any model is built, within
``connect_timeout_s``; MLflow's own client retries for minutes, so the check is a bare HTTP probe.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.tracking import MlflowClient

from medgcsam.config import PipelineConfig

# The URI this process was started with: mlflow.set_tracking_uri() rewrites the variable in os.environ,
# so reading it later would pick up whatever store an earlier run in the same process activated.
_STARTUP_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI and the fix."""


def resolve_tracking_uri(cfg: PipelineConfig, override: str | None = None) -> str:
    """``override`` > ``tracking.uri`` > ``$MLFLOW_TRACKING_URI`` at process start >
    ``sqlite:///<output_dir>/mlflow.db`` (absolute, so cwd never matters)."""
    return choose_tracking_uri(override, cfg.tracking.uri, output_dir=Path(cfg.output_dir))


def choose_tracking_uri(*given: str | None, output_dir: Path) -> str:
    """The one resolution of every command: the first URI ``given`` (command line, then files, most specific
    first), else ``$MLFLOW_TRACKING_URI`` at process start, else ``sqlite:///<output_dir>/mlflow.db`` (absolute)."""
    uri = next((u for u in given if u), None) or _STARTUP_TRACKING_URI
    if uri:
        return uri
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def artifact_location(cfg: PipelineConfig, uri: str) -> str | None:
    """Explicit artifact root for local stores (MLflow would use ``./mlruns`` of the cwd); servers choose their own."""
    if urlparse(uri).scheme in ("sqlite", "postgresql", "mysql", "mssql"):
        return (Path(cfg.output_dir) / "mlartifacts").resolve().as_uri()
    return None


def ensure_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail within ``timeout_s`` with a clear message when ``uri`` cannot take a run."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        _probe_http(uri, timeout_s)
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if uri == "sqlite://" or str(db) == ":memory:":
            raise TrackingError(f"tracking URI {uri!r} is an in-memory store: every run would be lost when the process "
                                f"ends; use sqlite:////absolute/path/mlflow.db")
        # sqlite writes a journal beside the file; MLflow retries a read-only folder for minutes
        ensure_writable(db.parent, f"tracking store {uri}")
    elif scheme in ("", "file"):
        raise TrackingError(f"tracking URI {uri!r} is a file store, which MLflow 3.13+ refuses; use "
                            f"sqlite:///path/mlflow.db or an http(s):// server (`mlflow migrate-filestore` "
                            f"converts an old ./mlruns)")


def ensure_writable(folder: Path, what: str) -> None:
    """Make ``folder`` and create a scratch file in it (permission bits do not show a read-only mount to root)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise TrackingError(f"{what}: cannot write in folder {folder} ({exc}); set output_dir or tracking.uri to "
                            f"a writable place") from None


def _probe_http(uri: str, timeout_s: float) -> None:
    reason = http_unreachable(uri, timeout_s)
    if reason is not None:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}). Start it (e.g. `mlflow server --host "
            f"0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db`), fix tracking.uri / --tracking-uri, "
            f"or leave tracking.uri unset to use the embedded sqlite store under output_dir")


def http_unreachable(uri: str, timeout_s: float = 10.0) -> str | None:
    """Why the server at ``uri`` gives no answer within ``timeout_s``, or None when it answers."""
    # The probe runs in a daemon thread so a hanging DNS lookup cannot outlive the deadline.
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
                resp.read(64)
            outcome.append(None)
        except urllib.error.HTTPError as exc:  # the server answered: reachable (auth is MLflow's business)
            outcome.append(None if exc.code in (401, 403) else exc)
        except Exception as exc:  # URLError, timeouts, resets: all mean "cannot reach"
            outcome.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        return f"no answer within {timeout_s:g} s"
    return None if outcome[0] is None else str(outcome[0])


def _sqlite_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """For a sqlite store, hold ``<db>.lock`` while this process first opens it: MLflow creates and migrates the
    schema on first use, and two processes doing so at once leave the file half-migrated for good
    (``table _alembic_tmp_tags already exists``); the lock also makes creating the experiment race-free."""
    if urlparse(uri).scheme != "sqlite":
        yield
        return
    db = _sqlite_path(uri)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(cfg: PipelineConfig, uri: str) -> str:
    """The experiment id for ``tracking.experiment``, created with an explicit artifact location if new."""
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return client.create_experiment(cfg.tracking.experiment, artifact_location=artifact_location(cfg, uri))
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(f"experiment {cfg.tracking.experiment!r} is deleted in {uri}; restore it "
                            f"(`mlflow experiments restore`) or set tracking.experiment to another name")
    return exp.experiment_id


def activate(uri: str) -> None:
    """Point the fluent API (``mlflow.log_*``) and the registry at ``uri``."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
