"""Crash and bad-input safety: real processes killed with SIGKILL at chosen points (the product's
``MEDGCSAM_TEST_PAUSE_AT`` hook writes a marker file and sleeps there), real files that are broken, hostile
or ambiguous. Each test reproduces one defect of issue 18 and fails on the code before its fix.

Also in other modules: SIGKILL mid-epoch then bitwise resume (test_engine), SIGTERM ends the run KILLED
(test_engine), predict resume after a crash (test_inference_predict).
"""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from medgcsam.checkpoint import load_checkpoint, weights_digest
from medgcsam.cli import app
from medgcsam.config import PipelineConfig
from medgcsam.data.manifest import read_manifest, write_manifest
from medgcsam.engine import train
from medgcsam.files import PAUSE_ENV, PAUSE_MARKER_ENV
from medgcsam.inference.predict import errors_path, lock_path, partial_path
from medgcsam.models.factory import create_model
from tests import test_inference_package as package_tests
from tests.helpers_images import make_image_folder, write_dicom
from tests.test_engine import tiny_config, write_image_folder

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def start_cli(*args: str, pause_at: str | None = None, marker: Path | None = None) -> subprocess.Popen:
    """``python -m medgcsam ARGS`` in its own process; with ``pause_at`` it stops at that point of the product."""
    env = dict(ENV)
    if pause_at is not None:
        env.update({PAUSE_ENV: pause_at, PAUSE_MARKER_ENV: str(marker)})
    return subprocess.Popen([sys.executable, "-m", "medgcsam", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_cli(*args: str, timeout: float = 300) -> tuple[int, str]:
    proc = start_cli(*args)
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def wait_for_marker(proc: subprocess.Popen, marker: Path, timeout: float = 240) -> None:
    """Until ``proc`` has paused at its point (the marker names its pid)."""
    deadline = time.monotonic() + timeout
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.is_file():
        proc.kill()
        pytest.fail(f"the process never reached its pause point:\n{proc.communicate(timeout=30)[0]}")
    assert int(marker.read_text()) == proc.pid


def kill_at_marker(proc: subprocess.Popen, marker: Path) -> None:
    """SIGKILL ``proc`` once it has paused at its point."""
    wait_for_marker(proc, marker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


# --------------------------------------------------------------------------- training checkpoints (1, 2)
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def _no_val_config(images: Path, out: Path) -> dict:
    """Two epochs, no validation split: every epoch is an improvement, so epoch 2 commits a new best.pt."""
    raw = tiny_config(images, out, "faults", "gcsam", epochs=2)
    raw["data"]["val_fold"] = None
    return raw


@pytest.fixture(scope="module")
def reference_best(images, tmp_path_factory) -> dict[str, torch.Tensor]:
    """best.pt of the same training, never interrupted."""
    cfg = PipelineConfig.model_validate(_no_val_config(images, tmp_path_factory.mktemp("straight")))
    return load_checkpoint(train(cfg).best_checkpoint)["model"]


@pytest.mark.parametrize("point", ["replace best.pt.staged#2", "replace last.pt#2", "commit best.pt#2"])
def test_sigkill_while_saving_the_best_checkpoint_then_resume_keeps_the_right_weights(images, reference_best,
                                                                                       tmp_path, point):
    """Defects 1 and 2: killed while the last improving epoch's best.pt was being written, ``--resume`` selected
    (and registered) the previous best weights while reporting the new best epoch, and the killed write's 16 MB
    temp file stayed in the checkpoint folder for good."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_no_val_config(images, tmp_path / "out")))
    ckpt = tmp_path / "out" / "faults" / "checkpoints"
    marker = tmp_path / "paused"
    kill_at_marker(start_cli("train", str(config), pause_at=point, marker=marker), marker)

    code, output = run_cli("train", str(config), "--resume")
    assert code == 0, output
    assert "best epoch 2" in output
    best = load_checkpoint(ckpt / "best.pt")
    for key, value in reference_best.items():
        assert torch.equal(value, best["model"][key]), f"{key}: best.pt does not hold the epoch-2 weights"
    assert load_checkpoint(ckpt / "last.pt")["best_sha256"] == weights_digest(best["model"])
    left = sorted(p.name for p in ckpt.iterdir())
    assert left == ["best.pt", "last.pt"], f"files left by the killed write: {left}"


def test_resume_refuses_a_best_checkpoint_that_last_does_not_name(images, tmp_path):
    """Defect 1: a best.pt that is not the one last.pt recorded (here: other weights) was loaded silently."""
    raw = _no_val_config(images, tmp_path / "out")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    train(PipelineConfig.model_validate(raw))
    best_path = tmp_path / "out" / "faults" / "checkpoints" / "best.pt"
    best = load_checkpoint(best_path)
    next(v for v in best["model"].values() if v.is_floating_point()).add_(1.0)
    torch.save(best, best_path)

    code, output = run_cli("train", str(config), "--resume")
    assert code == 2, output
    assert "do not belong together" in output and "best.pt" in output and "Traceback" not in output


def test_second_training_into_the_same_run_folder_is_refused(images, tmp_path):
    """Same class as defect 4: two trainings of one pipeline wrote the same checkpoints (and the second now
    removes temp files it takes for stale ones); the second is refused, naming the first."""
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(_no_val_config(images, tmp_path / "out")))
    ckpt = tmp_path / "out" / "faults" / "checkpoints"
    marker = tmp_path / "paused"
    first = start_cli("train", str(config), pause_at="replace last.pt#2", marker=marker)
    try:
        wait_for_marker(first, marker)
        code, output = run_cli("train", str(config))
        assert code == 2, output
        assert f"pid {first.pid}" in output and "being written by another process" in output
        assert "Traceback" not in output
        assert list(ckpt.glob(".last.pt.*.tmp")), "the first run's checkpoint write was disturbed"
    finally:
        first.kill()
        first.wait(30)
    code, output = run_cli("train", str(config), "--resume")
    assert code == 0, output
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.pt", "last.pt"]


def test_sigkill_after_registration_then_resume_registers_one_version(images, tmp_path):
    """Same class as defect 1, found while looking: killed after MLflow registered the model but before the run
    recorded the stage as done, ``--resume`` registered a second version of the same run."""
    raw = tiny_config(images, tmp_path / "out", "registered", "adam", epochs=1)
    raw["tracking"] = {"log_model": True, "register_as": "faults-once", "alias": "champion"}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    marker = tmp_path / "paused"
    kill_at_marker(start_cli("train", str(config), pause_at="model registered", marker=marker), marker)

    code, output = run_cli("train", str(config), "--resume")
    assert code == 0, output
    assert "registered: models:/faults-once@champion (version 1)" in output
    store = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    assert [str(v.version) for v in client.search_model_versions("name = 'faults-once'")] == ["1"]
    assert str(client.get_model_version_by_alias("faults-once", "champion").version) == "1"


# --------------------------------------------------------------------------- predict (3, 4)
@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(8):
        (root / f"s{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / f"s{i % 2}" / f"img{i}.png")
    return root


def _checkpoint(path: Path, threshold: bool) -> Path:
    torch.manual_seed(0)
    spec = package_tests.make_spec()
    if not threshold:
        spec = spec.model_copy(update={"threshold": None})
    torch.save({"model": create_model("test_resnet", 3, in_chans=3).state_dict(), "spec": spec.model_dump(mode="json"),
                "epoch": 1}, path)
    return path


def _predict(model: Path, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["predict", "--model", str(model), "--input", str(data), "--output", str(out),
                                      "--batch-size", "1", "--num-workers", "0", "--no-progress", *extra])
    return result.exit_code, result.output


@pytest.mark.parametrize("threshold", [True, False])
@pytest.mark.parametrize("cut", ["last value", "path", "newline"])
def test_predict_resume_recomputes_a_row_cut_short(photos, tmp_path, threshold, cut):
    """Defect 3: a .partial whose last row a kill cut mid-value was resumed with the cut value in the final CSV."""
    model = _checkpoint(tmp_path / "model.pt", threshold)
    reference = tmp_path / "reference.csv"
    assert _predict(model, photos, reference)[0] == 0
    lines = reference.read_text(encoding="utf-8").splitlines(keepends=True)
    row = lines[4]
    torn = {"last value": row[:-3], "path": row[:4], "newline": row[:-1]}[cut]
    out = tmp_path / "pred.csv"
    shutil.copyfile(tmp_path / "reference.model.json", tmp_path / "pred.model.json")
    partial_path(out).write_text("".join(lines[:4]) + torn, encoding="utf-8")

    code, output = _predict(model, photos, out, "--resume")
    assert code == 0, output
    assert out.read_bytes() == reference.read_bytes(), f"resumed CSV differs from an uninterrupted run ({cut})"
    assert "1 row(s) of the earlier run were cut short" in output


def test_second_predict_on_the_same_output_is_refused_while_the_first_runs(photos, tmp_path):
    """Defect 4: a second job on the same --output truncated the first one's .partial and crashed with a
    traceback; the lock names the running job, and a lock left by a killed job is taken over."""
    model = _checkpoint(tmp_path / "model.pt", True)
    out, marker = tmp_path / "same.csv", tmp_path / "paused"
    first = start_cli("predict", "--model", str(model), "--input", str(photos), "--output", str(out),
                      "--batch-size", "1", "--num-workers", "0", "--no-progress",
                      pause_at="predict batch written#4", marker=marker)
    try:
        wait_for_marker(first, marker)
        rows_before = partial_path(out).read_bytes()
        code, output = _predict(model, photos, out)
        assert code == 2, output
        assert f"pid {first.pid}" in output and "being written by another process" in output
        assert "Traceback" not in output
        assert partial_path(out).read_bytes() == rows_before  # the first job's rows are untouched
    finally:
        first.kill()
        first.wait(30)
    assert lock_path(out).exists()  # left by the killed job: stale, and taken over below
    code, output = _predict(model, photos, out, "--resume")
    assert code == 0, output
    assert "4 already done" in output
    reference = tmp_path / "reference.csv"
    assert _predict(model, photos, reference)[0] == 0
    assert out.read_bytes() == reference.read_bytes()
    assert not lock_path(out).exists()


# --------------------------------------------------------------------------- bad inputs (5-9)
def test_manifest_build_names_a_file_whose_name_is_not_utf8_and_builds_the_rest(tmp_path):
    """Defect 5: one file named with latin-1 bytes blocked the whole build with a bare codec error."""
    root = tmp_path / "data"
    make_image_folder(root, n_per_class=3)
    bad = os.fsdecode(b"bad\xff\xfename.png")
    shutil.copyfile(root / "benign" / "benign (1).png", root / "benign" / bad)
    out = tmp_path / "manifest.csv"
    result = CliRunner().invoke(app, ["manifest", "build", str(root), "--format", "folder", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "benign/bad\\xff\\xfename.png" in result.output and "not valid UTF-8" in result.output
    df = read_manifest(out)
    assert len(df) == 7
    flagged = df[df["path"].str.contains("bad")]
    assert flagged["path"].tolist() == ["data/benign/bad\\xff\\xfename.png"]
    assert flagged["exclude_reason"].tolist() == ["file name is not UTF-8"]
    assert (df.loc[df["exclude_reason"] == "", "sha256"].str.len() == 64).all()
    assert CliRunner().invoke(app, ["manifest", "validate", str(out)]).exit_code == 0


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_train_lists_every_unreadable_row_before_training(tmp_path, cache):
    """Defect 6: a zero-byte PNG (or a text file named .png) ended training in a MONAI traceback, one file at a
    time, or (without a cache) in the middle of an epoch."""
    manifest = write_image_folder(tmp_path / "data")
    df = read_manifest(manifest)
    train_row = df.index[(df["split"] == "train") & (df["fold"] == 1)][0]
    test_row = df.index[df["split"] == "test"][0]
    (manifest.parent / df.at[train_row, "path"]).write_bytes(b"")
    (manifest.parent / df.at[test_row, "path"]).write_text("referral letter, not an image\n")
    raw = tiny_config(manifest, tmp_path / "out", "unreadable", "adam")
    raw["data"]["cache"] = cache
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))

    code, output = run_cli("train", str(config))
    assert code == 2, output
    assert "Traceback" not in output
    assert "cannot be read" in output
    for row, why in ((train_row, "empty (0 bytes)"), (test_row, "not a recognised image format")):
        assert f"manifest line {row + 2} ({df.at[row, 'path']}):" in output, output
        assert why in output
    assert not (tmp_path / "out" / "unreadable" / "checkpoints" / "last.pt").exists()


def test_train_refuses_an_image_labelled_differently_in_train_and_test(tmp_path):
    """Defect 7: ``manifest validate`` rejects it, ``train`` trained and registered on it without a word."""
    manifest = write_image_folder(tmp_path / "data")
    df = read_manifest(manifest)
    source = df[(df["split"] == "train") & (df["label"] == "benign")].iloc[0]
    copy = "images/copy_of_a_benign_image.png"
    shutil.copyfile(manifest.parent / source["path"], manifest.parent / copy)
    extra = {**source.to_dict(), "path": copy, "label": "malignant", "split": "test", "fold": -1}
    write_manifest(pd.concat([df, pd.DataFrame([extra])], ignore_index=True), manifest)
    assert CliRunner().invoke(app, ["manifest", "validate", str(manifest)]).exit_code == 1

    raw = tiny_config(manifest, tmp_path / "out", "leaky", "adam", epochs=1)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw))
    code, output = run_cli("train", str(config))
    assert code == 2, output
    assert "duplicate-conflicting-labels" in output and "duplicate-across-splits" in output
    assert f"line {len(df) + 2} ('{copy}'" in output and "data.allow_leakage" in output
    assert "Traceback" not in output
    assert not (tmp_path / "out" / "leaky" / "checkpoints").exists()

    raw["data"]["allow_leakage"] = True  # the explicit opt-out trains, and the run records it
    result = train(PipelineConfig.model_validate(raw))
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(result.run_id)
    assert run.data.params["data.allow_leakage"] == "True"


class _Payload:
    """Unpickling this runs ``os.makedirs(marker)``: what a hostile "weights" file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.mark.parametrize("kind", ["pickle", "safetensors"])
def test_hostile_pretrained_weights_are_refused_by_name(images, tmp_path, kind):
    """Defect 8: a malicious model.pretrained_path was blocked, but as a raw traceback from timm's helpers."""
    marker = tmp_path / "code_ran"
    if kind == "pickle":
        weights = tmp_path / "weights.pt"
        weights.write_bytes(pickle.dumps({"conv1.weight": _Payload(marker)}))
    else:
        weights = tmp_path / "weights.safetensors"
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}....")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_config(images, tmp_path / "out", "hostile", "adam")))
    code, output = run_cli("train", str(config), "--set", f"model.pretrained_path={weights}")
    assert code == 2, output
    assert f"{weights} (model.pretrained_path): not a weights-only tensor file" in output
    assert "Traceback" not in output
    assert not marker.exists()


def test_dicom_error_messages_hold_no_header_text(tmp_path):
    """Defect 9: the decoder's exception text, with the Photometric Interpretation value 'SMITH^JOHN^PHI', went
    verbatim into the errors CSV and the output of ``manifest validate``."""
    data = tmp_path / "in"
    pixels = np.random.default_rng(0).integers(0, 4000, (32, 32))
    write_dicom(data / "benign" / "phi.dcm", pixels, photometric="SMITH^JOHN^PHI", patient_name="DOE^JANE^PHI")
    write_dicom(data / "benign" / "ok.dcm", pixels)
    model = _checkpoint(tmp_path / "model.pt", True)
    out = tmp_path / "pred.csv"
    code, output = _predict(model, data, out)
    assert code == 1, output
    with errors_path(out).open(newline="", encoding="utf-8") as fh:
        reasons = {r["path"]: r["reason"] for r in csv.DictReader(fh)}
    assert "PhotometricInterpretation is not one of the values the standard registers" in reasons["benign/phi.dcm"]

    manifest = tmp_path / "manifest.csv"
    assert CliRunner().invoke(app, ["manifest", "build", str(data), "-f", "folder", "-o", str(manifest)]).exit_code == 0
    validated = CliRunner().invoke(app, ["manifest", "validate", str(manifest)])
    assert validated.exit_code == 1 and "PhotometricInterpretation" in validated.output
    text = errors_path(out).read_text() + output + validated.output
    assert "SMITH" not in text and "JOHN" not in text and "DOE^JANE" not in text
