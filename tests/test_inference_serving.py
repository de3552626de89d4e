"""The registered model as a hospital integration uses it: image bytes or paths in, per-image answers out.

One tiny model is trained, evaluated (threshold and temperature frozen on validation) and registered through
the real trainer into a real sqlite store; its pyfunc, in process and behind a real `mlflow models serve` on
127.0.0.1, must answer PNG/JPEG/DICOM exactly as `medgcsam predict` does on the same files, and the
registry must describe the version and name its data.
"""

from __future__ import annotations

import base64
import json
import math
import os
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from medgcsam.config import PipelineConfig
from medgcsam.data.manifest import manifest_sha256
from medgcsam.engine import train
from medgcsam.evaluation.calibration import softmax
from medgcsam.inference.package import load_classifier
from tests import test_inference_predict as predict_tests
from tests.helpers_servers import free_port, running
from tests.test_engine import tiny_config, write_image_folder

NAME = "served-bus"
TOL = 1e-6


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(tracking URI, train result, manifest) of one registered model; the URI is set for the module's tests."""
    root = tmp_path_factory.mktemp("serving")
    manifest = write_image_folder(root / "images")
    raw = tiny_config(manifest, root / "runs", "served", "gcsam", epochs=1)
    raw["tracking"] = {"experiment": "served", "register_as": NAME, "alias": "champion", "log_model": True}
    raw["evaluation"] = {"enabled": True, "positive_class": "malignant", "bootstrap": 20}
    result = train(PipelineConfig.model_validate(raw))
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    yield uri, result, manifest
    mlflow.set_tracking_uri(None)
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI")
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def predicted(registered, tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]], dict[str, str]]:
    """The mixed folder of the predict tests and what `medgcsam predict` wrote for it: rows and errors by path."""
    root = tmp_path_factory.mktemp("predicted")
    folder = predict_tests.write_folder(root / "in")
    out = root / "predictions.csv"
    result = predict_tests.run_cli("--model", f"models:/{NAME}@champion", "--input", str(folder), "--output",
                                   str(out), "--num-workers", "0")
    assert result.exit_code == 1, result.output  # the broken files
    rows = {r["path"]: r for r in predict_tests.read_rows(out)}
    errors = {r["path"]: r["reason"] for r in predict_tests.read_rows(out.with_name("predictions.errors.csv"))}
    assert set(rows) == set(predict_tests.GOOD) and set(errors) == set(predict_tests.BAD)
    return folder, rows, errors


def _assert_same_as_predict(answer: dict, row: dict[str, str], where: str) -> None:
    assert answer["error"] is None, where
    assert answer["decision"] == row["decision"] and answer["argmax_label"] == row["argmax_label"], where
    for key in ("prob_benign", "prob_malignant", "threshold_malignant"):
        assert abs(float(answer[key]) - float(row[key])) <= TOL, (where, key, answer[key], row[key])
    assert "ood_score" in row  # the model carries OOD statistics: predict and the service both flag
    assert abs(float(answer["ood_score"]) - float(row["ood_score"])) <= 5e-5 * max(1.0, float(row["ood_score"]))
    assert str(answer["ood_flag"]) == row["ood_flag"], where


def test_pyfunc_answers_bytes_paths_and_broken_images_like_predict(registered, predicted):
    folder, rows, errors = predicted
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    order = sorted(rows) + sorted(errors)
    # every file twice: as the bytes a hospital system sends, and as a path on the serving host
    frame = pd.DataFrame({"image": [(folder / p).read_bytes() for p in order] + [None] * len(order),
                          "path": [None] * len(order) + [str(folder / p) for p in order]})
    answers = model.predict(frame).to_dict(orient="records")
    assert len(answers) == 2 * len(order)

    classifier, spec = load_classifier(f"models:/{NAME}@champion")
    assert spec.temperature is not None and spec.threshold is not None
    for i, rel in enumerate(order * 2):
        answer = answers[i]
        if rel in rows:
            _assert_same_as_predict(answer, rows[rel], f"{rel} as {'bytes' if i < len(order) else 'path'}")
            probs = np.array([answer["prob_benign"], answer["prob_malignant"]])
            calibrated = np.array([answer["calibrated_prob_benign"], answer["calibrated_prob_malignant"]])
            # the same logits scaled by the frozen temperature: softmax(log p / T) == softmax(logits / T)
            np.testing.assert_allclose(calibrated, softmax(np.log(probs)[None], spec.temperature)[0], atol=1e-5)
        else:
            assert answer["decision"] is None and answer["prob_malignant"] is None, rel
            assert answer["ood_score"] is None and answer["ood_flag"] is None, rel
            for words in predict_tests.BAD[rel].split("; "):
                assert words in answer["error"], (rel, answer["error"])
            assert "medgcsam-serve-" not in answer["error"]  # the row is named, not the temporary file

    # The earlier interface, explicitly: normalized tensors in, raw logits out.
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    logits = model.predict(pd.DataFrame({"tensor": list(x)}), params={"input": "tensor"})
    with torch.no_grad():
        np.testing.assert_allclose(logits, classifier(torch.from_numpy(x)).numpy(), atol=1e-5)
    # No usable column is a request error that says what to send.
    with pytest.raises(Exception, match="'image' column"):
        model.predict(pd.DataFrame({"tensor": list(x)}))


def test_signature_and_input_example_are_real_images(registered):
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.signature.inputs.input_names() == ["image", "path", "tensor"]
    assert info.signature.params.params[0].name == "input"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion"))
    example = json.loads((local / "serving_input_example.json").read_text())
    png = base64.b64decode(example["dataframe_split"]["data"][0][0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    weights = [p for p in local.rglob("*") if p.is_file() and p.stat().st_size > 100_000]
    assert [p.name for p in weights] == ["state_dict.pt"], "the weights are stored once"


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def test_mlflow_models_serve_answers_a_png_and_a_dicom_post_like_predict(registered, predicted, tmp_path):
    uri, _, _ = registered
    folder, rows, _ = predicted
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn of this venv
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
           "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with running(cmd, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log", env=env, cwd=tmp_path):
        sent = ["a/grey.png", "c/ct.dcm", "b/photo.jpg"]
        records = [{"image": base64.b64encode((folder / p).read_bytes()).decode()} for p in sent]
        records.append({"image": base64.b64encode(b"not an image at all").decode()})
        answers = _post(f"http://127.0.0.1:{port}/invocations", {"dataframe_records": records})["predictions"]
    for rel, answer in zip(sent, answers, strict=False):
        _assert_same_as_predict(answer, rows[rel], f"POST {rel}")
        assert all(not (isinstance(v, float) and math.isnan(v)) for v in answer.values())
    assert answers[3]["decision"] is None and "not a recognised image format" in answers[3]["error"]


def test_registry_version_describes_itself_and_the_run_names_its_data(registered):
    _, result, manifest = registered
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(NAME, "champion")
    text = version.description
    for words in ("test_resnet", "gcsam", "over adam", "manifest.csv", "Test (", "balanced_accuracy",
                  "95% bootstrap CI", "Operating point", "p(malignant) >=", "temperature"):
        assert words in text, (words, text)
    assert "[" in text.split("balanced_accuracy")[1].split(";")[0]  # the figure comes with its interval
    tags = version.tags
    sha = manifest_sha256(manifest)
    assert tags["task"] == "manifest labels" and tags["classes"] == "benign,malignant"
    assert tags["modality"] == "generic" and tags["input_size"] == "1x32x32"
    assert tags["manifest_sha256"] == sha and len(tags["git_commit"]) >= 7
    assert tags["operating_point"].startswith("p(malignant) >= ")

    run = client.get_run(result.run_id)
    by_split = {next(t.value for t in i.tags if t.key == "split"): i for i in run.inputs.dataset_inputs}
    assert set(by_split) == {"train", "val", "test"}
    for split, di in by_split.items():
        tags = {t.key: t.value for t in di.tags}
        assert tags["mlflow.data.context"] == ("training" if split == "train" else "evaluation")
        assert len(tags["rows_sha256"]) == 64 and di.dataset.digest == tags["rows_sha256"][:32]
        assert tags["manifest_sha256"] == sha and di.dataset.name == f"manifest:{split}"
        assert json.loads(di.dataset.profile)["num_rows"] == int(run.data.params[f"split.{split}.n"])
    assert len({di.dataset.digest for di in by_split.values()}) == 3


