"""`medgcsam predict` over a real folder of good and broken PNG/JPEG/DICOM files, through the real CLI."""

from __future__ import annotations

import csv
import io
import json
import os
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
from medgcsam.inference.predict import PredictionError, errors_path, model_path, partial_path, predict
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
        assert r["argmax_label"] == spec.class_names[int(probs.argmax())]
        assert float(r["threshold_malignant"]) == pytest.approx(0.4)
        # one answer: the operating point's (malignant at p >= 0.4, else the likelier of the other classes)
        others = {c: p for c, p in zip(spec.class_names, probs, strict=True) if c != "malignant"}
        expected = "malignant" if float(r["prob_malignant"]) >= 0.4 else max(others, key=others.get)
        assert r["decision"] == expected

    errors = {r["path"]: r["reason"] for r in read_rows(errors_path(out))}
    assert set(errors) == set(BAD)
    for rel, words in BAD.items():
        assert words in errors[rel], (rel, errors[rel])
    assert str(data) not in errors_path(out).read_text()  # only paths relative to the input folder
    assert "exclude_reason" not in errors_path(out).read_text()  # predict takes no manifest to set it in
    assert not partial_path(out).exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.csv", "predictions.errors.csv",
                                                            "predictions.model.json"]

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
    card = json.loads(model_path(out).read_text())
    assert card["classes"] == spec.class_names and len(card["fingerprint"]) == 64
    fresh = predict(model, spec, data, tmp_path / "fresh.csv", batch_size=3, num_workers=0, progress=False)
    assert fresh.predicted == 10
    resumed_rows, fresh_rows = read_rows(out), read_rows(tmp_path / "fresh.csv")
    # the same rows in the same order; probabilities may differ in the last printed digit, because
    # convolution kernels round differently at another batch size (2 vs 3 here)
    assert [(r["path"], r["decision"]) for r in resumed_rows] == [(r["path"], r["decision"]) for r in fresh_rows]
    probs = [[float(v) for k, v in r.items() if k.startswith("prob_")] for r in (*resumed_rows, *fresh_rows)]
    np.testing.assert_allclose(probs[:10], probs[10:], atol=2e-6)

    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(data / "s1/new.png")
    again = predict(model, spec, data, out, batch_size=2, num_workers=0, resume=True, progress=False)
    assert (again.skipped, again.predicted) == (10, 1)
    assert len(read_rows(out)) == 11

    other = spec.model_copy(update={"threshold": None})
    with pytest.raises(PredictionError, match="written by another model"):
        predict(model, other, data, out, num_workers=0, resume=True, progress=False)
    # same spec and columns, other weights: what an alias moved to a new version looks like
    retrained = load_classifier(checkpoint)[0]
    with torch.no_grad():
        next(retrained.parameters()).add_(1e-3)
    with pytest.raises(PredictionError, match="written by another model"):
        predict(retrained, spec, data, out, num_workers=0, resume=True, progress=False)
    # rows of files removed since the last run go with them
    (data / "s0/img0.png").unlink()
    gone = predict(model, spec, data, out, batch_size=2, num_workers=0, resume=True, progress=False)
    assert (gone.skipped, gone.predicted) == (10, 0)
    assert "s0/img0.png" not in {r["path"] for r in read_rows(out)}


def test_odd_files_are_predicted_reported_or_refused(tmp_path, checkpoint, monkeypatch):
    """Names that are not UTF-8, linked folders, formats we do not read, NaN pixels, a relative --input whose
    name is an ordinary word, an output that cannot be written, and the files' permissions."""
    rng = np.random.default_rng(2)
    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / "ok.png")
    shutil.copyfile(data / "ok.png", os.fsencode(data) + b"/lat\xe9.png")  # a Latin-1 name from an old share
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / "elsewhere.png")
    (tmp_path / "linked").mkdir()
    shutil.copyfile(tmp_path / "elsewhere.png", tmp_path / "linked/far.png")
    (data / "real/linked").symlink_to(tmp_path / "linked", target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / "clip.gif")
    (data / "gone.png").symlink_to(tmp_path / "missing.png")
    nan = np.full((16, 16), 0.5, np.float32)
    nan[3, 4] = np.nan
    Image.fromarray(nan, mode="F").save(data / "one_nan.tif")
    shutil.copyfile(get_testdata_file("MR_truncated.dcm"), data / "cut.dcm")

    monkeypatch.chdir(tmp_path)
    result = run_cli("--model", str(checkpoint), "--input", "data", "--output", "out/p.csv", "--num-workers", "0")
    assert result.exit_code == 1, result.output
    rows = {r["path"] for r in read_rows(tmp_path / "out/p.csv")}
    assert rows == {"ok.png", "lat\\xe9.png", "real/linked/far.png"}
    errors = {r["path"]: r["reason"] for r in read_rows(tmp_path / "out/p.errors.csv")}
    assert set(errors) == {"one_nan.tif", "cut.dcm"}
    assert "1 of 256 pixel values are NaN or infinite" in errors["one_nan.tif"]
    assert "DICOM pixel data does not decode" in errors["cut.dcm"]  # "data" is the input folder's name too
    assert "2 other files were not looked at" in result.output and "clip.gif, gone.png" in result.output
    mode = (tmp_path / "out/p.csv").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask

    (tmp_path / "afile").write_text("a file where a folder should be")
    result = run_cli("--model", str(checkpoint), "--input", "data", "--output", "afile/p.csv", "--num-workers", "0")
    assert result.exit_code == 2 and "cannot write beside --output afile/p.csv" in result.output


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_damaged_dicom_header_leaks_no_identifier_to_the_log(tmp_path, checkpoint, capfd, caplog, recwarn, workers):
    """pydicom warns with the raw values it read when a length is wrong; here the transfer syntax's length
    swallows the file meta and the patient module (PatientName Lestrade^G, PatientID ID1, 20170101)."""
    source = get_testdata_file("SC_rgb_rle.dcm")
    raw = bytearray(Path(source).read_bytes())
    at = raw.find(b"\x02\x00\x10\x00UI") + 6
    raw[at:at + 2] = (int.from_bytes(raw[at:at + 2], "little") + 400).to_bytes(2, "little")
    data = tmp_path / "in"
    data.mkdir()
    (data / "study.dcm").write_bytes(bytes(raw))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "ok.png")
    ds = pydicom.dcmread(source)
    secrets = [str(ds.PatientName), str(ds.PatientID), str(ds.StudyDate), str(ds.SOPInstanceUID),
               str(ds.StudyInstanceUID), str(ds.file_meta.MediaStorageSOPInstanceUID)]
    out = tmp_path / "p.csv"
    result = run_cli("--model", str(checkpoint), "--input", str(data), "--output", str(out), "--num-workers", workers)
    assert result.exit_code in (0, 1), result.output
    seen = capfd.readouterr()  # a worker process writes its warnings straight to file descriptor 2
    text = "\n".join([result.output, seen.out, seen.err, caplog.text, *(str(w.message) for w in recwarn),
                      *(f.read_text() for f in tmp_path.glob("p.*"))])
    for value in secrets:
        assert value not in text, f"{value!r} reached an output or the log"


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


def test_predict_feeds_the_model_exactly_what_evaluation_fed_it(tmp_path, checkpoint):
    """Training and evaluation read images through the uint8 cache; predict must quantize the same way, or
    the frozen threshold is applied to other probabilities (0.008 apart on real 28 px chest X-rays)."""
    import pandas as pd

    from medgcsam.data.datasets import BatchInputs, ManifestDataset
    from medgcsam.evaluation.predict import predict_split
    from medgcsam.inference.predict import ImageFolder

    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 255, (17, 23), dtype=np.uint8)).save(tmp_path / "in/odd.png")  # resized
    Image.fromarray(rng.integers(0, 65535, (40, 30), dtype=np.uint16)).save(tmp_path / "in/deep.png")  # 16-bit
    shutil.copyfile(get_testdata_file("CT_small.dcm"), tmp_path / "in/ct.dcm")
    names = ["ct.dcm", "deep.png", "odd.png"]
    spec = make_spec()
    frame = pd.DataFrame({"path": names, "label": ["benign"] * 3})
    evaluated = ManifestDataset(frame, tmp_path / "in", spec.class_names, spec.preprocessing,
                                modality=spec.preprocessing.modality, cache="memory")
    folder = ImageFolder(tmp_path / "in", names, spec)
    inputs = BatchInputs(spec.preprocessing, "cpu")
    for i, name in enumerate(names):
        rel, image, reason = folder[i]
        assert reason is None and rel == name
        assert torch.equal(inputs(image[None])[0], evaluated[i]["image"]), name
    model = create_model("test_resnet", 3, in_chans=3)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    logits, _ = predict_split(model, torch.utils.data.DataLoader(evaluated, batch_size=3))
    expected = torch.from_numpy(logits).softmax(dim=1).numpy()
    predict(model, spec, tmp_path / "in", tmp_path / "out.csv", num_workers=0, progress=False)
    rows = {r["path"]: r for r in read_rows(tmp_path / "out.csv")}
    got = np.array([[float(rows[n][f"prob_{c}"]) for c in spec.class_names] for n in names])
    np.testing.assert_allclose(got, expected, atol=6e-7)  # the CSV keeps 6 decimals
