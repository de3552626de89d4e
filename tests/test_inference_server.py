"""Through a real `mlflow server` on 127.0.0.1: the client has no artifact files, only the server's URL.

This is the hospital deployment of docker-compose.yml in miniature (sqlite instead of PostgreSQL):
the model is logged and registered over HTTP, its files live only behind the server's artifact
proxy, and `medgcsam predict --model models:/name@alias` gives the CSV the checkpoint gives.
"""

from __future__ import annotations

import sys

import mlflow
import pytest
import torch

from medgcsam.inference.package import load_classifier, log_classifier
from medgcsam.models.factory import create_model
from tests import test_inference_predict as predict_tests
from tests.helpers_servers import free_port, running


@pytest.fixture()
def mlflow_server(tmp_path, monkeypatch):
    port = free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
           "--artifacts-destination", str(server_dir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    with running(cmd, f"{url}/health", tmp_path / "server.log", cwd=server_dir):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(url)
        try:
            yield url, server_dir
        finally:
            mlflow.set_tracking_uri(None)


def test_predict_from_registry_behind_a_tracking_server(tmp_path, mlflow_server):
    url, server_dir = mlflow_server
    checkpoint = tmp_path / "best.pt"
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, in_chans=3).eval()
    spec = predict_tests.make_spec()
    torch.save({"model": model.state_dict(), "spec": spec.model_dump(mode="json")}, checkpoint)

    mlflow.set_experiment("predict-behind-server")  # an earlier test's active experiment id means nothing here
    with mlflow.start_run():
        info = log_classifier(model, spec, registered_model_name="bus-server", alias="champion")
    version = mlflow.MlflowClient().get_model_version_by_alias("bus-server", "champion")
    assert str(version.version) == str(info.registered_model_version)
    assert list((server_dir / "artifacts").rglob("spec.json")), "artifacts must live on the server side"

    loaded, loaded_spec = load_classifier("models:/bus-server@champion")
    assert loaded_spec == spec

    data = predict_tests.write_folder(tmp_path / "in")
    texts = []
    for ref in ("models:/bus-server@champion", str(checkpoint)):
        out = tmp_path / f"{len(texts)}.csv"
        result = predict_tests.run_cli("--model", ref, "--input", str(data), "--output", str(out),
                                       "--num-workers", "0")
        assert result.exit_code == 1, result.output
        texts.append(out.read_text())
    assert texts[0] == texts[1]
    assert url not in texts[0]
