"""`medgcsam predict` over a real folder of good and broken PNG/JPEG/DICOM files, through the real CLI."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medgcsam.cli import app
from medgcsam.inference.package import load_classifier, log_classifier
from medgcsam.inference.predict import PredictionError, errors_path, partial_path, predict
from medgcsam.models.factory import create_model
from tests import test_inference_package as package_tests

make_spec = package_tests.make_spec
mlflow_store = package_tests.mlflow_store  # the same sqlite-store fixture

GOOD = ["a/rgb.png", "a/grey.png", "b/photo.jpg", "c/ct.dcm", "c/IM000001", "c/mr_rle.dcm"]
BAD = {  # file -> words its reason must contain
    "truncated.png": "truncated or corrupt",
    "empty.png": "empty (0 bytes)",
    "notes.jpeg": "not a recognised image format",
    "c/cine_h264.dcm": "cannot decode DICOM transfer syntax 'MPEG-4 AVC/H.264",
    "c/mr_truncated.dcm": "does not decode",
}
DICOM_SOURCES = {"c/ct.dcm": "CT_small.dcm", "c/IM000001": "MR_small.dcm", "c/mr_rle.dcm": "MR_small_RLE.dcm",
                 "c/cine_h264.dcm": "MR_small_jpeg_ls_lossless.dcm", "c/mr_truncated.dcm": "MR_truncated.dcm"}
H264 = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264: ultrasound cine; no pydicom decoder exists, whatever is installed
PHI_KEYWORDS = ["PatientName", "PatientID", "PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate",
                "ContentDate", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
                "InstitutionName", "ReferringPhysicianName", "AccessionNumber", "StudyID", "StationName"]


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path) -> Path:
    """The mixed folder of the issue: good PNG/JPEG/DICOM, plus every kind of unreadable file."""
    rng = np.random.default_rng(0)
    for rel in ["a", "b", "c", "c/.hidden"]:
        (root / rel).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / "a/rgb.png")
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(root / "a/grey.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / "b/photo.jpg", quality=90)
    for rel, name in DICOM_SOURCES.items():
        shutil.copyfile(get_testdata_file(name), root / rel)
    cine = pydicom.dcmread(root / "c/cine_h264.dcm")
    cine.file_meta.TransferSyntaxUID = H264
    cine.save_as(root / "c/cine_h264.dcm", enforce_file_format=True)
    whole = _png_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (root / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpeg").write_text("referral notes, not an image\n")
    (root / "readme.txt").write_text("not an image and not listed anywhere\n")
    (root / "c/.hidden/skip.png").write_bytes(whole)
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, in_chans=3).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": model.state_dict(), "spec": make_spec().model_dump(mode="json"), "epoch": 1}, path)
    return path


def run_cli(*args: str):
    """`medgcsam predict ...` through the project's root command, in process."""
    return CliRunner().invoke(app, ["predict", *args, "--no-progress"], catch_exceptions=False)


def test_mixed_folder_predicts_good_files_and_lists_bad_ones(tmp_path, checkpoint):
    data = write_folder(tmp_path / "in")
    out = tmp_path / "out" / "predictions.csv"
    result = run_cli("--model", str(checkpoint), "--input", str(data), "--output", str(out),
                     "--batch-size", "4", "--num-workers", "2")
    assert result.exit_code == 1, result.output

    rows = read_rows(out)
    assert [r["path"] for r in rows] == sorted(GOOD)
    spec = make_spec()
    for r in rows:
        probs = np.array([float(r[f"prob_{c}"]) for c in spec.class_names])
        assert abs(probs.sum() - 1.0) < 1e-4
        assert r["label"] == spec.class_names[int(probs.argmax())]
        assert float(r["threshold_malignant"]) == pytest.approx(0.4)
        assert r["decision_malignant"] == ("positive" if float(r["prob_malignant"]) >= 0.4 else "negative")

    errors = {r["path"]: r["reason"] for r in read_rows(errors_path(out))}
    assert set(errors) == set(BAD)
    for rel, words in BAD.items():
        assert words in errors[rel], (rel, errors[rel])
    assert str(data) not in errors_path(out).read_text()  # only paths relative to the input folder
    assert not partial_path(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.csv", "predictions.errors.csv"]

    text = out.read_text() + errors_path(out).read_text() + result.output
    for rel in DICOM_SOURCES:
        ds = pydicom.dcmread(get_testdata_file(DICOM_SOURCES[rel]), stop_before_pixels=True, force=True)
        for keyword in PHI_KEYWORDS:
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 4:
                assert value not in text, f"{keyword} of {rel} leaked into an output"


def test_resume_after_interrupted_run_predicts_only_the_rest(tmp_path, checkpoint):
    data = tmp_path / "in"
    rng = np.random.default_rng(1)
    for i in range(10):
        (data / f"s{i // 5}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(data / f"s{i // 5}/img{i}.png")
    model, spec = load_classifier(checkpoint)

    class FailsOnThirdBatch(torch.nn.Module):
        """A forward pass that dies mid-job, as a GPU fault or a killed worker would."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("device lost")
            return self.inner(x)

    out = tmp_path / "pred.csv"
    with pytest.raises(RuntimeError, match="device lost"):
        predict(FailsOnThirdBatch(model), spec, data, out, batch_size=2, num_workers=0, progress=False)
    assert not out.exists()
    assert len(read_rows(partial_path(out))) == 4

    resumed = predict(model, spec, data, out, batch_size=2, num_workers=0, resume=True, progress=False)
    assert (resumed.skipped, resumed.predicted, resumed.failed, resumed.exit_code) == (4, 6, 0, 0)
    fresh = predict(model, spec, data, tmp_path / "fresh.csv", batch_size=3, num_workers=0, progress=False)
    assert fresh.predicted == 10
    assert out.read_text() == (tmp_path / "fresh.csv").read_text()

    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(data / "s1/new.png")
    again = predict(model, spec, data, out, batch_size=2, num_workers=0, resume=True, progress=False)
    assert (again.skipped, again.predicted) == (10, 1)
    assert len(read_rows(out)) == 11

    other = spec.model_copy(update={"threshold": None})
    with pytest.raises(PredictionError, match="written by another model"):
        predict(model, other, data, out, num_workers=0, resume=True, progress=False)


def test_registry_model_gives_the_same_csv_as_the_checkpoint(tmp_path, checkpoint, mlflow_store):
    model, spec = load_classifier(checkpoint)
    with mlflow.start_run(experiment_id=mlflow_store):
        log_classifier(model, spec, registered_model_name="bus", alias="champion")

    data = write_folder(tmp_path / "in")
    outs = {}
    for ref in ("models:/bus@champion", str(checkpoint)):
        out = tmp_path / f"{len(outs)}.csv"
        result = run_cli("--model", ref, "--input", str(data), "--output", str(out), "--num-workers", "0")
        assert result.exit_code == 1, result.output
        outs[ref] = out.read_text()
    assert outs["models:/bus@champion"] == outs[str(checkpoint)]

    result = run_cli("--model", "models:/bus@challenger", "--input", str(data), "--output", str(tmp_path / "x.csv"))
    assert result.exit_code == 2
    assert "cannot fetch models:/bus@challenger" in result.output


@pytest.mark.parametrize("case", ["missing_input", "empty_input", "bad_model", "bad_device", "bad_amp"])
def test_usage_and_model_errors_exit_2(tmp_path, checkpoint, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("no images here")
    write_folder(tmp_path / "in")
    extra = {"bad_device": ["--device", "gpu0"], "bad_amp": ["--amp", "fp8"]}.get(case, [])
    model, data, needle = {
        "missing_input": (str(checkpoint), tmp_path / "nope", "does not exist"),
        "empty_input": (str(checkpoint), tmp_path / "empty", "no PNG, JPEG or DICOM files"),
        "bad_model": (str(tmp_path / "missing.pt"), tmp_path / "in", "neither an existing file"),
        "bad_device": (str(checkpoint), tmp_path / "in", "is not a device"),
        "bad_amp": (str(checkpoint), tmp_path / "in", "amp 'fp8' not supported"),
    }[case]
    result = run_cli("--model", model, "--input", str(data), "--output", str(tmp_path / "o.csv"), *extra)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert not (tmp_path / "o.csv").exists()
