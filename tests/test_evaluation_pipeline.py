"""`evaluate` end to end on real PNG files and a manifest, and the evaluate/sharpness/landscape commands
against a checkpoint with an MLflow sqlite store."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, roc_auc_score
from typer.testing import CliRunner

from medgcsam.cli import app
from medgcsam.config import EvaluationConfig, PipelineConfig
from medgcsam.data.datasets import build_datasets
from medgcsam.data.manifest import read_manifest, write_manifest
from medgcsam.evaluation import choose_threshold, evaluate, log_evaluation
from medgcsam.evaluation.report import write_report
from medgcsam.metrics import binary_counts
from medgcsam.models.factory import create_model, input_spec
from medgcsam.models.spec import ModelSpec, Preprocessing
from tests.helpers_images import make_manifest

CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    manifest = root / "data" / "manifest.csv"
    make_manifest(root / "data", manifest, classes=tuple(CLASSES), n_per_class=24, size=(24, 24),
                  patients_per_class=8, k=3)
    df = read_manifest(manifest)
    df["source"] = np.where(np.arange(len(df)) % 2 == 0, "siteA", "siteB")
    write_manifest(df, manifest)
    raw = {"name": "evaltest", "output_dir": str(root / "out"),
           "data": {"manifest": str(manifest), "image_size": 32, "channels": 1, "batch_size": 8, "num_workers": 0,
                    "cache": "none", "augment": False, "val_fold": 0},
           "model": {"name": "test_resnet"},
           "train": {"device": "cpu"},
           "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "evaltest"},
           "evaluation": {"bootstrap": 200, "positive_class": "malignant"},
           "sharpness": {"n_samples": 6, "batch_size": 3, "lanczos_steps": 4, "trace_probes": 2,
                         "density_steps": 3}}
    cfg = PipelineConfig.model_validate(raw)
    torch.manual_seed(0)
    model = create_model("test_resnet", 2, in_chans=1)
    pre = input_spec(model, 32, 1)
    spec = ModelSpec(backbone="test_resnet", num_classes=2, in_chans=1, class_names=CLASSES,
                     preprocessing=Preprocessing(image_size=32, channels=1, mean=list(pre.mean), std=list(pre.std)))
    return root, raw, cfg, model, spec


def test_evaluate_figures_match_predictions(setup):
    root, _, cfg, model, spec = setup
    bundle = build_datasets(cfg.data, spec.preprocessing)
    out = root / "direct"
    result = evaluate(model, bundle, spec, cfg.evaluation, "cpu", out, batch_size=8)
    names = {p.name for p in out.iterdir()}
    for split in ("val", "test"):
        assert {f"predictions_{split}.csv", f"confusion_{split}.png", f"confusion_decision_{split}.png",
                f"roc_{split}.png", f"pr_{split}.png", f"reliability_{split}.png"} <= names
    assert {"evaluation.json", "report.md", "spec.json"} <= names

    val = pd.read_csv(out / "predictions_val.csv")
    test = pd.read_csv(out / "predictions_test.csv")
    assert "patient_id" not in test.columns and len(test) == len(bundle.frames["test"])
    # the threshold is chosen on validation ...
    thr = choose_threshold(val["p_malignant"].to_numpy(), (val["label"] == "malignant").to_numpy(), "youden",
                           positive_class="malignant")
    assert result.threshold == thr and result.spec.threshold == thr
    # ... and applied unchanged to test
    fig = result.figures["splits"]["test"]
    y = (test["label"] == "malignant").to_numpy()
    expected = binary_counts(test["p_malignant"].to_numpy() >= thr.value, y)
    assert fig["operating_point"] == expected
    assert fig["headline"]["accuracy"] == pytest.approx(accuracy_score(test["label"], test["argmax_label"]))
    # one answer per image: `decision` follows the frozen threshold, and its confusion matrix sits in the report
    assert (test["decision"] == np.where(test["p_malignant"] >= thr.value, "malignant", "benign")).all()
    cm = fig["confusion_decision"]["counts"]
    assert (cm[1][1], cm[1][0], cm[0][1], cm[0][0]) == (expected["tp"], expected["fn"], expected["fp"], expected["tn"])
    assert fig["headline"]["auroc_macro"] == pytest.approx(roc_auc_score(y, test["p_malignant"]))
    # patients, not images, are resampled; intervals bracket the point estimate
    assert fig["bootstrap"] == {"resamples": 200, "unit": "patient"}
    assert fig["n_patients"] == bundle.frames["test"]["patient_id"].nunique()
    ci = fig["ci95"]["accuracy"]
    assert ci["low"] <= fig["headline"]["accuracy"] <= ci["high"] and ci["n_valid"] == 200
    assert set(fig["by_source"]) == {"siteA", "siteB"}
    assert sum(s["n_images"] for s in fig["by_source"].values()) == fig["n_images"]
    # the temperature is the NLL minimiser on validation, so it cannot make validation NLL worse
    val_fig = result.figures["splits"]["val"]
    assert val_fig["calibration"]["nll_calibrated"] <= val_fig["headline"]["nll"] + 1e-9
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["threshold"]["value"] == thr.value
    report = (out / "report.md").read_text()
    assert "Operating point: p(malignant) >=" in report and "| malignant |" in report
    assert "Confusion matrix, at the operating point" in report and "Confusion matrix, argmax" in report
    assert result.spec.temperature == result.temperature  # frozen with the threshold, for external validation
    assert "no patient ids" not in report
    saved["splits"]["test"]["n_patients"] = None  # ids in validation are what the note is about
    assert "no patient ids" not in write_report(saved, out / "test_only.md").read_text()
    saved["splits"]["val"]["n_patients"] = None
    anonymous = write_report(saved, out / "anonymous.md").read_text()
    assert "The validation split has no patient ids, so its images, not patients, are resampled" in anonymous


def test_evaluate_needs_validation_split_and_known_positive_class(setup):
    root, _, cfg, model, spec = setup
    bundle = build_datasets(cfg.data, spec.preprocessing)
    bundle.val = None
    with pytest.raises(ValueError, match="validation split"):
        evaluate(model, bundle, spec, cfg.evaluation, "cpu", root / "x")
    bundle = build_datasets(cfg.data, spec.preprocessing)
    with pytest.raises(ValueError, match="positive_class 'cancer'"):
        evaluate(model, bundle, spec, EvaluationConfig(positive_class="cancer", bootstrap=0), "cpu", root / "y")


def _experiment(name: str, where: Path) -> str:
    """A sqlite store would put artifacts in ./mlruns of the working directory: keep them in tmp."""
    return mlflow.create_experiment(name, artifact_location=(where / "mlartifacts").as_uri())


def test_log_evaluation_to_mlflow(setup):
    root, _, cfg, model, spec = setup
    bundle = build_datasets(cfg.data, spec.preprocessing)
    result = evaluate(model, bundle, spec, cfg.evaluation.model_copy(update={"bootstrap": 0, "splits": ["test"]}),
                      "cpu", root / "logged")
    mlflow.set_tracking_uri(cfg.tracking.uri)
    with mlflow.start_run(experiment_id=_experiment("evaltest-direct", root)) as run:
        log_evaluation(result)
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.metrics["test/accuracy"] == pytest.approx(result.figures["splits"]["test"]["headline"]["accuracy"])
    assert "test/sensitivity/malignant" in data.metrics and "val/ece_calibrated" in data.metrics
    assert data.tags["operating_point.threshold"] == f"{result.threshold.value:.6g}"
    files = {f.path for f in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/report.md" in files and "evaluation/roc_test.png" in files


def test_cli_evaluate_sharpness_landscape_on_checkpoint(setup, tmp_path):
    root, raw, _, model, spec = setup
    ckpt = tmp_path / "best.pt"
    torch.save({"model": model.state_dict(), "spec": spec.model_dump(mode="json"), "epoch": 3}, ckpt)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(raw), encoding="utf-8")
    runner = CliRunner()

    res = runner.invoke(app, ["evaluate", "--model", str(ckpt), "--pipeline", str(pipeline), "--output",
                              str(tmp_path / "ev"), "--set", "evaluation.bootstrap=50"])
    assert res.exit_code == 0, res.output
    assert torch.load(ckpt, weights_only=True)["spec"]["threshold"] is None  # nothing stored unless asked
    res = runner.invoke(app, ["evaluate", "--model", str(ckpt), "--pipeline", str(pipeline), "--output",
                              str(tmp_path / "ev"), "--set", "evaluation.bootstrap=50", "--store-threshold"])
    assert res.exit_code == 0, res.output
    assert "operating point: p(malignant) >=" in res.output
    stored = torch.load(ckpt, weights_only=True)
    assert stored["spec"]["threshold"]["positive_class"] == "malignant" and stored["epoch"] == 3
    value = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["threshold"]["value"]
    assert stored["spec"]["threshold"]["value"] == value

    res = runner.invoke(app, ["sharpness", "--model", str(ckpt), "--pipeline", str(pipeline), "--output",
                              str(tmp_path / "sh")])
    assert res.exit_code == 0, res.output
    run_id = res.output.strip().rsplit("MLflow run ", 1)[1]
    mlflow.set_tracking_uri(raw["tracking"]["uri"])
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert {"hessian_top_eig", "hessian_trace", "hessian_trace_se", "hessian_esd_median", "hessian_hvp_count",
            "hessian_wall_s"} <= set(metrics)
    assert metrics["hessian_n_samples"] == 6

    res = runner.invoke(app, ["landscape", "--model", str(ckpt), "--pipeline", str(pipeline), "--output",
                              str(tmp_path / "ls"), "--points", "3"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "ls" / "landscape_2d_surface.png").is_file()

    res = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "missing.pt"), "--pipeline", str(pipeline)])
    assert res.exit_code == 2 and "missing.pt" in res.output


def test_cli_evaluate_registered_model_stores_threshold_in_new_version(setup, tmp_path):
    from medgcsam.inference.package import load_classifier, log_classifier

    root, raw, _, model, spec = setup
    raw = {**raw, "tracking": {**raw["tracking"], "uri": f"sqlite:///{tmp_path / 'reg.db'}"}}
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump(raw), encoding="utf-8")
    mlflow.set_tracking_uri(raw["tracking"]["uri"])
    mlflow.set_registry_uri(raw["tracking"]["uri"])
    with mlflow.start_run(experiment_id=_experiment("evaltest-registry", tmp_path)) as run:
        log_classifier(model, spec, registered_model_name="evaltest-model", alias="champion")
    res = CliRunner().invoke(app, ["evaluate", "--model", "models:/evaltest-model@champion", "--pipeline",
                                   str(pipeline), "--output", str(tmp_path / "ev"), "--split", "test",
                                   "--set", "evaluation.bootstrap=20", "--store-threshold"])
    assert res.exit_code == 0, res.output
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("evaltest-model", "champion").version) == 2
    _, new_spec = load_classifier("models:/evaltest-model@champion")
    assert new_spec.threshold is not None and new_spec.threshold.positive_class == "malignant"
    # the figures went to a new run beside the one that logged the model, linked to it by tags
    assert "test/accuracy" not in client.get_run(run.info.run_id).data.metrics
    (new,) = client.search_runs([run.info.experiment_id], "tags.`medgcsam.kind` = 'evaluation'")
    assert new.data.tags["medgcsam.model_run_id"] == run.info.run_id
    assert new.data.tags["medgcsam.model_version"] == "1" and "test/accuracy" in new.data.metrics

    res = CliRunner().invoke(app, ["evaluate", "--model", "models:/evaltest-model/1", "--pipeline", str(pipeline),
                                   "--output", str(tmp_path / "ev2"), "--split", "test",
                                   "--set", "evaluation.bootstrap=0", "--into-training-run"])
    assert res.exit_code == 0, res.output
    assert "test/accuracy" in client.get_run(run.info.run_id).data.metrics  # asked for: the old behaviour
