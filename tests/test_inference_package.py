"""Model packaging: a tiny timm model logged to a real sqlite MLflow store and loaded back every way."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from medgcsam.inference.package import ModelLoadError, load_classifier, log_classifier
from medgcsam.models.factory import create_model
from medgcsam.models.spec import ModelSpec, Preprocessing, Threshold

IMAGE_SIZE = 32


def make_spec(backbone: str = "test_resnet") -> ModelSpec:
    return ModelSpec(
        backbone=backbone, num_classes=3, in_chans=3, class_names=["benign", "malignant", "normal"],
        preprocessing=Preprocessing(image_size=IMAGE_SIZE, channels=3, mean=[0.5] * 3, std=[0.25] * 3,
                                    modality="ultrasound"),
        threshold=Threshold(positive_class="malignant", value=0.4, rule="youden"),
        manifest_sha256="ab" * 32,
    )


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite tracking + registry store in tmp_path (artifacts beside it); yields an experiment id.

    The URI goes through the environment, as in a deployment; ``set_tracking_uri(None)`` afterwards
    clears MLflow's global before monkeypatch restores the caller's environment.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)
    yield mlflow.create_experiment("medgcsam-test", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def trained():
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, in_chans=3)
    # Non-default BN statistics make a state-dict mix-up visible in the outputs.
    with torch.no_grad():
        model.train()(torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE) * 3)
    return model.eval()


def batch(n: int = 5) -> np.ndarray:
    return np.random.default_rng(1).random((n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)


def test_registry_roundtrip_matches_in_memory_model(mlflow_store, trained, monkeypatch, tmp_path):
    # As in the container: serving must never need to unpickle anything.
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv("MLFLOW_ALLOW_MODEL_CODE_EXECUTION", "false")
    spec = make_spec()
    x = batch()
    with torch.no_grad():
        expected = trained(torch.from_numpy(x)).numpy()
    with mlflow.start_run(experiment_id=mlflow_store) as run:
        info = log_classifier(trained, spec, registered_model_name="bus-cls", alias="champion")
    assert info.registered_model_version == 1

    for uri in ("models:/bus-cls@champion", "models:/bus-cls/1", info.model_uri, f"runs:/{run.info.run_id}/model"):
        model, loaded_spec = load_classifier(uri)
        assert loaded_spec == spec, uri
        assert not model.training
        with torch.no_grad():
            np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)

    folder = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "downloaded"))
    model, _ = load_classifier(folder)  # a model copied to a machine without any MLflow server
    with torch.no_grad():
        np.testing.assert_allclose(model(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)

    pyfunc = mlflow.pyfunc.load_model("models:/bus-cls@champion")
    # the tensor interface of earlier versions, now asked for explicitly (images are the default)
    logits = pyfunc.predict(pd.DataFrame({"tensor": list(x)}), params={"input": "tensor"})
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)
    # The model card is also readable from the MLmodel metadata without downloading weights.
    assert pyfunc.metadata.metadata["medgcsam_spec"]["class_names"] == spec.class_names


def test_checkpoint_file_and_bad_references(tmp_path, trained):
    spec = make_spec()
    ckpt = tmp_path / "best.pt"
    torch.save({"model": trained.state_dict(), "spec": spec.model_dump(mode="json"), "epoch": 3}, ckpt)
    model, loaded = load_classifier(ckpt)
    x = torch.from_numpy(batch(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))
    assert loaded.threshold.value == 0.4

    torch.save({"state_dict": trained.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(ModelLoadError, match="needs keys 'model'.*'spec'"):
        load_classifier(tmp_path / "bare.pt")
    wrong = spec.model_copy(update={"num_classes": 2, "class_names": ["a", "b"]})
    torch.save({"model": trained.state_dict(), "spec": wrong.model_dump(mode="json")}, tmp_path / "wrong.pt")
    with pytest.raises(ModelLoadError, match="do not fit backbone 'test_resnet' with 2 classes"):
        load_classifier(tmp_path / "wrong.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a weights-only torch checkpoint"):
        load_classifier(tmp_path / "junk.pt")
    with pytest.raises(ModelLoadError, match="neither an existing file"):
        load_classifier(tmp_path / "missing.pt")


def test_log_refuses_an_alias_without_a_name_and_a_spec_that_does_not_fit(trained):
    with pytest.raises(ValueError, match="needs registered_model_name"):
        log_classifier(trained, make_spec(), alias="champion")
    two = make_spec().model_copy(update={"num_classes": 2, "class_names": ["benign", "malignant"]})
    with pytest.raises(ValueError, match=r"outputs shape \(2, 3\).*2 classes"):
        log_classifier(trained, two)


class _Payload:
    """Unpickling this would create ``path``: a stand-in for a malicious pickle."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_damaged_or_malicious_model_files_are_model_errors_and_never_run(tmp_path, trained):
    # A model folder (or registry artifact) whose state dict or spec is damaged must raise ModelLoadError (predict:
    # exit 2, "model error"), not an unpickling/validation traceback that reads as a crashed prediction job.
    spec = make_spec()
    folder = tmp_path / "model" / "extra_files"
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(spec.model_dump_json(), encoding="utf-8")
    marker = tmp_path / "pwned"
    torch.save(_Payload(marker), folder / "state_dict.pt")
    with pytest.raises(ModelLoadError, match="state_dict.pt is not a weights-only state dict"):
        load_classifier(tmp_path / "model")
    assert not marker.exists()

    torch.save(trained.state_dict(), folder / "state_dict.pt")
    (folder / "spec.json").write_text('{"backbone": ', encoding="utf-8")
    with pytest.raises(ModelLoadError, match="model spec is not valid"):
        load_classifier(tmp_path / "model")

    torch.save({"model": trained.state_dict(), "spec": {"backbone": "test_resnet"}}, tmp_path / "nospec.pt")
    with pytest.raises(ModelLoadError, match="(?s)model spec is not valid.*num_classes"):
        load_classifier(tmp_path / "nospec.pt")
    torch.save({"model": [1, 2], "spec": spec.model_dump(mode="json")}, tmp_path / "list.pt")
    with pytest.raises(ModelLoadError, match="weights are a list, not a state dict"):
        load_classifier(tmp_path / "list.pt")
    unknown = spec.model_copy(update={"backbone": "resnet81"}).model_dump(mode="json")
    torch.save({"model": trained.state_dict(), "spec": unknown}, tmp_path / "unknown.pt")
    with pytest.raises(ModelLoadError, match="unknown backbone 'resnet81'"):
        load_classifier(tmp_path / "unknown.pt")


def test_a_dead_tracking_server_fails_at_once(monkeypatch):
    """MLflow's client retries an unreachable server for minutes (about four); predict must say so at once."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)
    start = time.monotonic()
    try:
        with pytest.raises(ModelLoadError, match=rf"MLflow server {uri} is unreachable.*MLFLOW_TRACKING_URI"):
            load_classifier("models:/bus-cls@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert time.monotonic() - start < 15
