"""The compose file's tracking server, run for real on 127.0.0.1: basic auth on, secrets from files, none of them
on any command line."""

from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch

from medgcsam.inference.package import load_classifier, log_classifier
from medgcsam.models.factory import create_model
from medgcsam.tracking.server import ServerConfigError, server_environment
from tests.helpers_servers import free_port, running
from tests.test_inference_package import make_spec

ADMIN_PASSWORD = "s3cret/with:odd@chars"
SECRET_KEY = "flask-key-0123456789"


def _secrets(tmp_path: Path) -> dict[str, str]:
    files = {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": SECRET_KEY,
             "POSTGRES_PASSWORD": "pg p@ss/word"}
    env = {}
    for name, value in files.items():
        path = tmp_path / name.lower()
        path.write_text(value + "\n")
        env[f"{name}_FILE"] = str(path)
    return env


def test_secrets_come_from_files_and_the_database_password_is_quoted_into_the_uri(tmp_path):
    env = server_environment({**_secrets(tmp_path), "PATH": "/bin"}, tmp_path)
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+pg8000://mlflow:pg%20p%40ss%2Fword@db:5432/mlflow"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == ADMIN_PASSWORD and env["MLFLOW_AUTH_ADMIN_USERNAME"] == "admin"
    assert not any(k.endswith("_FILE") for k in env)
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert "database_uri = sqlite:////mlflow/basic_auth.db" in ini and ADMIN_PASSWORD not in ini

    with pytest.raises(ServerConfigError, match="MLFLOW_AUTH_ADMIN_PASSWORD is not set.*_FILE"):
        server_environment({"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"}, tmp_path)
    with pytest.raises(ServerConfigError, match="POSTGRES_PASSWORD_FILE=/nonexistent/pw: cannot read it"):
        server_environment({"POSTGRES_PASSWORD_FILE": "/nonexistent/pw"}, tmp_path)


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    req = urllib.request.Request(url)
    if user is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=90) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_tracking_server_needs_a_login_and_shows_no_secret_on_a_command_line(tmp_path, monkeypatch):
    port = free_port()
    env = {**os.environ, **_secrets(tmp_path), "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path / 'auth.db'}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "medgcsam.tracking.server", "--host", "127.0.0.1", "--port", str(port),
           "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/health", tmp_path / "server.log", env=env, cwd=tmp_path) as proc:
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 401
        assert _get(api, "admin", "wrong") == 401
        assert _get(api, "admin", ADMIN_PASSWORD) == 200
        # a job with the compose file's client credentials registers and loads a model through the login
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        try:
            torch.manual_seed(0)
            model = create_model("test_resnet", 3, in_chans=3).eval()
            mlflow.set_experiment("behind-login")
            with mlflow.start_run():
                log_classifier(model, make_spec(), registered_model_name="bus-auth", alias="champion")
            loaded, _ = load_classifier("models:/bus-auth@champion")
        finally:
            mlflow.set_tracking_uri(None)
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
        cmdlines = _group_cmdlines(proc.pid)
        assert len(cmdlines) >= 2, cmdlines  # the server and its uvicorn worker(s)
        for line in cmdlines:
            assert ADMIN_PASSWORD not in line and SECRET_KEY not in line, line


def _group_cmdlines(pgid: int) -> list[str]:
    """Command lines of every process in the server's process group, as `ps` would show them."""
    lines = []
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            if os.getpgid(int(proc_dir.name)) == pgid:
                lines.append((proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ProcessLookupError):
            continue
    return lines
