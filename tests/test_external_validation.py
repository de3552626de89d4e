"""External validation of a registered model on a test-only manifest, and OOD flags, on real PNG files with a
real sqlite MLflow store: the training run stays as it was, the evaluated manifest's sha256 is recorded, and
shifted images score further from the training data than in-distribution ones."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from medgcsam.cli import app
from medgcsam.config import PipelineConfig
from medgcsam.data.manifest import file_sha256, read_manifest, write_manifest
from medgcsam.engine import train
from medgcsam.inference.package import load_classifier_with_ood
from medgcsam.inference.predict import predict
from tests.helpers_images import make_manifest, write_image

CLASSES = ("benign", "malignant")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """test_resnet trained 3 epochs, evaluated, OOD statistics fitted, registered as ext-model@champion."""
    root = tmp_path_factory.mktemp("ext")
    manifest = root / "data" / "manifest.csv"
    make_manifest(root / "data", manifest, classes=CLASSES, n_per_class=30, k=2, patients_per_class=10)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    raw = {"name": "ext", "output_dir": str(root / "out"),
           "data": {"manifest": str(manifest), "image_size": 32, "channels": 1, "batch_size": 8, "num_workers": 0,
                    "cache": "memory", "augment": False, "val_fold": 0},
           "model": {"name": "test_resnet"},
           "optimizer": {"name": "adam", "lr": 0.003},
           "train": {"epochs": 3, "warmup_epochs": 0.5, "amp": "none", "device": "cpu", "seed": 0},
           "tracking": {"uri": uri, "experiment": "ext", "log_model": True, "register_as": "ext-model",
                        "alias": "champion"},
           "evaluation": {"enabled": True, "positive_class": "malignant", "bootstrap": 50}}
    result = train(PipelineConfig.model_validate(raw))
    return root, manifest, uri, result


def _snapshot(client: MlflowClient, run_id: str, tmp: Path) -> tuple[dict, dict, list[str], str]:
    run = client.get_run(run_id)
    arts = sorted(a.path for a in client.list_artifacts(run_id, "evaluation"))
    report = Path(client.download_artifacts(run_id, "evaluation/report.md", str(tmp))).read_text()
    return run.data.metrics, run.data.tags, arts, report


def test_external_validation_logs_a_new_run_and_leaves_the_training_run_alone(trained, tmp_path):
    root, manifest, uri, result = trained
    df = read_manifest(manifest)
    ext = df[df["split"] == "test"].assign(split="", fold=-1)  # an external site: no split, no folds
    ext["source"] = np.where(np.arange(len(ext)) % 2 == 0, "siteA", "siteB")
    ext_manifest = write_manifest(ext, root / "data" / "external.csv")
    client = MlflowClient(tracking_uri=uri)
    before = _snapshot(client, result.run_id, tmp_path / "before")

    out = tmp_path / "external"
    res = CliRunner().invoke(app, ["validate-external", "--model", "models:/ext-model@champion", "--manifest",
                                   str(ext_manifest), "--tracking-uri", uri, "--output", str(out),
                                   "--bootstrap", "50", "--refit"])
    assert res.exit_code == 0, res.output

    after = _snapshot(client, result.run_id, tmp_path / "after")
    assert after == before  # metrics, tags, evaluation artifacts and report.md of the training run unchanged
    sha = file_sha256(ext_manifest)
    figures = json.loads((out / "external.json").read_text())
    assert figures["external_manifest"]["sha256"] == sha and sha in (out / "report.md").read_text()
    fig = figures["splits"]["external"]
    assert fig["n_images"] == len(ext) and set(fig["by_source"]) == {"siteA", "siteB"}
    assert fig["bootstrap"]["unit"] == "patient"
    # frozen: the threshold and temperature are the model's, not re-fitted on these images
    _, spec, ood = load_classifier_with_ood("models:/ext-model@champion")
    assert figures["threshold"]["value"] == spec.threshold.value and figures["temperature"] == spec.temperature
    assert "refit" in figures and "optimistic" in (out / "report.md").read_text()
    # the side-by-side table: internal test from the training run's own evaluation.json
    internal = json.loads(Path(client.download_artifacts(result.run_id, "evaluation/evaluation.json",
                                                         str(tmp_path))).read_text())
    acc = next(r for r in figures["comparison"] if r["figure"] == "accuracy")
    assert acc["internal"] == internal["splits"]["test"]["headline"]["accuracy"]
    assert acc["difference"] == pytest.approx(acc["external"] - acc["internal"])
    assert acc["low"] <= acc["difference"] <= acc["high"]
    # decisions at the operating point, per image
    preds = pd.read_csv(out / "predictions_external.csv")
    pos = preds["p_malignant"] >= spec.threshold.value
    assert (preds["decision"] == np.where(pos, "malignant", "benign")).all()
    assert {"argmax_label", "ood_score", "ood_flag"} <= set(preds.columns)

    runs = client.search_runs([client.get_run(result.run_id).info.experiment_id],
                              "tags.`medgcsam.kind` = 'external_validation'")
    assert len(runs) == 1
    new = runs[0]
    assert new.info.run_id != result.run_id
    assert new.data.tags["medgcsam.model_name"] == "ext-model" and new.data.tags["medgcsam.model_version"] == "1"
    assert new.data.tags["medgcsam.model_run_id"] == result.run_id
    assert new.data.params["external_manifest_sha256"] == sha
    assert new.data.metrics["external/accuracy"] == pytest.approx(fig["headline"]["accuracy"])
    assert "external_validation/report.md" in {a.path for a in client.list_artifacts(new.info.run_id,
                                                                                      "external_validation")}
    assert ood is not None and "external/ood_flag_rate" in new.data.metrics


def test_evaluate_changes_no_registry_version_nor_the_training_run_unless_asked(trained, tmp_path):
    _, manifest, uri, result = trained
    client = MlflowClient(tracking_uri=uri)
    before = _snapshot(client, result.run_id, tmp_path / "before")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({"name": "ext", "output_dir": str(tmp_path / "o"),
                                    "data": {"manifest": str(manifest), "image_size": 32, "channels": 1,
                                             "num_workers": 0, "val_fold": 0},
                                    "model": {"name": "test_resnet"}, "train": {"device": "cpu"},
                                    "tracking": {"uri": uri}, "evaluation": {"positive_class": "malignant",
                                                                             "bootstrap": 10}}))
    res = CliRunner().invoke(app, ["evaluate", "--model", "models:/ext-model@champion", "--pipeline",
                                   str(pipeline), "--output", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert len(client.search_model_versions("name = 'ext-model'")) == 1
    assert _snapshot(client, result.run_id, tmp_path / "after") == before
    run_id = res.output.strip().split("MLflow run ", 1)[1].split()[0]
    new = client.get_run(run_id)
    sha = file_sha256(manifest)
    assert new.data.tags["medgcsam.kind"] == "evaluation" and new.data.tags["medgcsam.model_run_id"] == result.run_id
    assert new.data.tags["medgcsam.evaluated_manifest_sha256"] == sha
    assert f"Evaluated manifest `{manifest.name}`, sha256 `{sha}`" in (tmp_path / "ev" / "report.md").read_text()


def test_ood_scores_higher_on_shifted_images(trained, tmp_path):
    root, manifest, uri, result = trained
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model, spec, ood = load_classifier_with_ood(result.best_checkpoint)
    assert ood is not None and ood.false_alarm == 0.05
    df = read_manifest(manifest)
    inside = tmp_path / "inside"
    for rel in df.loc[df["split"] == "test", "path"]:
        src = manifest.parent / rel
        (inside / src.name).parent.mkdir(parents=True, exist_ok=True)
        (inside / f"{Path(rel).parent.name}_{src.name}").write_bytes(src.read_bytes())
    shifted = tmp_path / "shifted"  # another "modality": stripes and speckle instead of discs on a grey field
    rng = np.random.default_rng(5)
    for i in range(12):
        stripes = (np.sin(np.arange(48) / (1.5 + i % 4))[None, :] * 0.5 + 0.5) * rng.gamma(1.0, 1.0, (40, 48))
        write_image(shifted / f"s{i}.png", (np.clip(stripes, 0, 1) * 255).astype(np.uint8))
    scores = {}
    for name, folder in (("inside", inside), ("shifted", shifted)):
        out = tmp_path / f"{name}.csv"
        predict(model, spec, folder, out, num_workers=0, progress=False, ood=ood)
        table = pd.read_csv(out)
        assert (table["ood_flag"] == (table["ood_score"] > ood.threshold)).all()
        scores[name] = table
    assert scores["shifted"]["ood_score"].median() > scores["inside"]["ood_score"].max()
    assert scores["shifted"]["ood_flag"].mean() > 0.9 and scores["inside"]["ood_flag"].mean() < 0.5


def test_validate_external_without_a_store_uses_train_s_default_store(trained, tmp_path):
    """No --tracking-uri and no $MLFLOW_TRACKING_URI: a models:/ reference is read from, and the new run logged
    to, sqlite:///outputs/mlflow.db under the working folder, the store `train` uses there (not MLflow's own
    default store)."""
    import os
    import shutil
    import subprocess
    import sys

    root, manifest, uri, _ = trained
    (tmp_path / "outputs").mkdir()
    store = tmp_path / "outputs" / "mlflow.db"
    shutil.copyfile(uri.removeprefix("sqlite:///"), store)  # artifact locations stay absolute: the copy serves
    df = read_manifest(manifest)
    ext_manifest = write_manifest(df[df["split"] == "test"].assign(split="", fold=-1), tmp_path / "external.csv")
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")

    def external_runs() -> list[str]:
        return [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()],
                                                           "tags.`medgcsam.kind` = 'external_validation'")]

    before = external_runs()  # the module's other tests may have logged some into the store copied here
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-m", "medgcsam", "validate-external", "--model",
                           "models:/ext-model@champion", "--manifest", str(ext_manifest), "--root",
                           str(root / "data"), "--bootstrap", "20"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert len(set(external_runs()) - set(before)) == 1
