"""Run inside the image by scripts/container_check.sh (stdlib only): the two MLflow servers of a deployment.

1. `mlflow models serve` of the read-only model in /model answers a POST of a PNG from /data with the numbers
   `medgcsam predict` wrote for it to /out/predictions.csv (within 1e-6).
2. The compose file's tracking server (`python -m medgcsam.tracking.server`, MLflow's basic-auth app, secrets
   from files) refuses a request without a login and answers one with it.
Exits non-zero when either does not hold.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def wait(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except (OSError, urllib.error.URLError):
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{url} did not answer (exit {proc.poll()})")
            time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    """The server and the workers it started (uvicorn, MLflow's job runner) share its process group."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def status(url: str, auth: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def serve_model() -> None:
    with open("/out/predictions.csv", encoding="utf-8") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    rel = sorted(rows)[0]
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", "/model", "--env-manager", "local", "-h",
                             "127.0.0.1", "-p", "5001", "-w", "1"], start_new_session=True)
    try:
        wait("http://127.0.0.1:5001/ping", proc)
        body = {"dataframe_records": [{"image": base64.b64encode((Path("/data") / rel).read_bytes()).decode()}]}
        req = urllib.request.Request("http://127.0.0.1:5001/invocations", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            (answer,) = json.loads(resp.read())["predictions"]
    finally:
        stop(proc)
    print(f"POST {rel}: {json.dumps(answer)}")
    print(f"predict  : {json.dumps(rows[rel])}")
    diff = max(abs(float(answer[k]) - float(rows[rel][k])) for k in rows[rel] if k.startswith("prob_"))
    print(f"largest probability difference: {diff:.2e}")
    same = [str(answer[k]) == rows[rel][k] for k in ("decision", "argmax_label", "ood_flag")]
    if diff > 1e-6 or not all(same):
        sys.exit("the served model disagrees with medgcsam predict (probabilities, decision, argmax_label or ood_flag)")


def tracking_server() -> None:
    tmp = Path(tempfile.mkdtemp())
    env = {"MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp}/mlflow.db",
           "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp}/a.db"}
    for name, value in (("MLFLOW_AUTH_ADMIN_PASSWORD", "container-check-pw"),
                        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "k" * 32)):
        (tmp / name).write_text(value)
        env[f"{name}_FILE"] = str(tmp / name)
    proc = subprocess.Popen([sys.executable, "-m", "medgcsam.tracking.server", "--host", "127.0.0.1", "--port",
                             "5002", "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
                            env={**os.environ, **env}, start_new_session=True)
    try:
        wait("http://127.0.0.1:5002/health", proc)
        api = "http://127.0.0.1:5002/api/2.0/mlflow/experiments/search?max_results=1"
        anonymous, admin = status(api), status(api, base64.b64encode(b"admin:container-check-pw").decode())
    finally:
        stop(proc)
    print(f"tracking server: without login {anonymous}, as admin {admin}")
    if (anonymous, admin) != (401, 200):
        sys.exit("the tracking server does not enforce its login")


if __name__ == "__main__":
    serve_model()
    tracking_server()
