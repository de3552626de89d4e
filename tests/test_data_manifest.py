"""Manifest read/write, task label maps and merging of sources."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from medgcsam.data.manifest import (
    MANIFEST_COLUMNS,
    ManifestError,
    manifest_sha256,
    read_manifest,
    write_manifest,
)
from medgcsam.data.merge import merge_manifests
from medgcsam.data.tasks import apply_task, get_task
from tests.helpers_images import make_image_folder


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def test_minimal_manifest_gets_defaults_and_roundtrips(tmp_path):
    path = _write(tmp_path / "m.csv", "path,label,extra\na.png,benign,x\nb.png,malignant,y\n")
    df = read_manifest(path)
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS and "extra" in df.columns
    assert df["fold"].tolist() == [-1, -1] and df["split"].tolist() == ["", ""]
    out = write_manifest(df.assign(split=["train", "test"], fold=[0, -1]), tmp_path / "out" / "m2.csv")
    back = read_manifest(out)
    assert back["split"].tolist() == ["train", "test"] and back["fold"].tolist() == [0, -1]
    assert back["extra"].tolist() == ["x", "y"]
    assert [p.name for p in out.parent.iterdir()] == ["m2.csv"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # the team can read it: mkstemp made it 0600


def test_manifest_sha256_tracks_content(tmp_path):
    path = _write(tmp_path / "m.csv", "path,label\na.png,benign\n")
    before = manifest_sha256(path)
    _write(path, "path,label\na.png,malignant\n")
    assert manifest_sha256(path) != before and len(before) == 64


@pytest.mark.parametrize("text, match", [
    ("file,label\na.png,benign\n", r"missing column\(s\) \['path'\]"),
    ("path,label\na.png,benign\n,malignant\n", "empty 'path' on line\\(s\\) 3"),
    ("path,label,split\na.png,benign,training\n", "unknown split value\\(s\\) \\['training'\\] on line\\(s\\) 2"),
    ("path,label,fold\na.png,benign,one\n", "non-integer fold on line\\(s\\) 2"),
    ("path,label,label\na.png,benign,x\n", "appear more than once"),
])
def test_bad_manifests_name_line_and_fix(tmp_path, text, match):
    with pytest.raises(ManifestError, match=match):
        read_manifest(_write(tmp_path / "m.csv", text))


def test_non_utf8_manifest_says_which_encoding(tmp_path):
    path = _write(tmp_path / "m.csv", "path,label\nSão Paulo/é.png,benign\n", encoding="cp1252")
    with pytest.raises(ManifestError, match=r"not UTF-8 .* line 2.*--encoding cp1252"):
        read_manifest(path)
    assert read_manifest(path, encoding="cp1252")["path"].iloc[0] == "São Paulo/é.png"


def test_utf8_bom_is_accepted(tmp_path):
    path = _write(tmp_path / "m.csv", "\ufeffpath,label\na.png,benign\n")
    assert read_manifest(path)["path"].tolist() == ["a.png"]


def test_rows_longer_than_the_header_never_shift_columns(tmp_path):
    """pandas makes the first column the index when every row has one field more than the header: the paths
    were lost and labels read as paths (or a TypeError when a cell was empty)."""
    shifted = _write(tmp_path / "m.csv", "path,label\na.png,benign,x\nb.png,malignant,y\n")
    with pytest.raises(ManifestError, match=r"line\(s\) 2, 3 have more fields than the 2 header columns"):
        read_manifest(shifted)
    trailing = _write(tmp_path / "t.csv", "path,label\r\na.png,benign,\r\nb.png,malignant,\r\n")
    df = read_manifest(trailing)
    assert df["path"].tolist() == ["a.png", "b.png"] and df["label"].tolist() == ["benign", "malignant"]


def test_a_blank_line_between_rows_cannot_shift_the_line_numbers(tmp_path):
    """pandas skips blank lines, so the row after one was reported one line too early ('line 3' for line 4);
    trailing blank lines, as editors leave them, stay harmless."""
    gap = _write(tmp_path / "g.csv", "path,label\na.png,benign\n\nb.png,\n")
    with pytest.raises(ManifestError, match=r"line\(s\) 3 are blank; delete them"):
        read_manifest(gap)
    _write(gap, "path,label\na.png,benign\nb.png,\n\n\n")
    with pytest.raises(ManifestError, match=r"empty 'label' on line\(s\) 3;"):
        read_manifest(gap)
    _write(gap, "path,label\na.png,benign\nb.png,malignant\n\n")
    assert read_manifest(gap)["path"].tolist() == ["a.png", "b.png"]


def test_task_maps_labels_and_excludes_instead_of_deleting():
    df = pd.DataFrame({"path": ["a", "b", "c"], "label": ["benign", "Malignant", "normal"],
                       "exclude_reason": ["", "", ""]})
    out = apply_task(df, "bus_binary")
    assert out["label"].tolist() == ["benign", "malignant", "normal"]
    assert out["source_label"].tolist() == ["benign", "Malignant", "normal"]
    assert out["exclude_reason"].tolist() == ["", "", "task bus_binary: label not used"]
    covid = apply_task(pd.DataFrame({"path": ["a", "b", "c"], "label": ["COVID-19", "pneumonia", "negative"],
                                     "exclude_reason": ""}), "covid_binary")
    assert covid["label"].tolist() == ["positive", "negative", "negative"]


def test_task_errors():
    with pytest.raises(ValueError, match=r"labels \['cyst'\] \(line\(s\) 3\)"):
        apply_task(pd.DataFrame({"path": ["a", "b"], "label": ["benign", "cyst"], "exclude_reason": ""}), "bus_3class")
    with pytest.raises(KeyError, match="registered tasks"):
        get_task("bus_7class")


def test_merge_rebases_paths_and_applies_task(tmp_path):
    make_image_folder(tmp_path / "a" / "imgs", ("benign", "normal"), 2)
    make_image_folder(tmp_path / "b" / "imgs", ("malignant",), 2)
    write_manifest(pd.DataFrame({"path": ["imgs/benign/benign (1).png", "imgs/normal/normal (1).png"],
                                 "label": ["benign", "normal"], "source": "busi"}), tmp_path / "a" / "m.csv")
    write_manifest(pd.DataFrame({"path": ["imgs/malignant/malignant (1).png"], "label": ["malignant"],
                                 "source": "gdph_sysucc", "split": ["test"]}), tmp_path / "b" / "m.csv")
    out_dir = tmp_path / "merged"
    df = merge_manifests([tmp_path / "a" / "m.csv", tmp_path / "b" / "m.csv"], out_dir, task="bus_binary")
    assert df["path"].tolist() == ["../a/imgs/benign/benign (1).png", "../a/imgs/normal/normal (1).png",
                                   "../b/imgs/malignant/malignant (1).png"]
    assert all((out_dir / p).resolve().is_file() for p in df["path"])
    assert df["exclude_reason"].tolist() == ["", "task bus_binary: label not used", ""]
    assert df["split"].tolist() == ["", "", "test"]  # official splits survive a merge
    with pytest.raises(ValueError, match="more than one input"):
        merge_manifests([tmp_path / "a" / "m.csv", tmp_path / "a" / "m.csv"], out_dir)


def test_merge_names_the_input_and_keeps_provenance_without_a_source(tmp_path):
    """An unknown label was reported at the pooled frame's line (15 for line 3 of the second file), and rows
    of manifests without a source column could no longer be traced to their input."""
    (tmp_path / "a.csv").write_text("path,label,source\n" + "".join(f"x{i}.png,benign,busi\n" for i in range(12)))
    (tmp_path / "site_b.csv").write_text("path,label\ny1.png,Malignant\ny2.png,cyst\n")
    with pytest.raises(ValueError, match=r"site_b.csv: labels \['cyst'\] \(line\(s\) 3\)"):
        merge_manifests([tmp_path / "a.csv", tmp_path / "site_b.csv"], tmp_path, task="bus_3class")
    (tmp_path / "site_b.csv").write_text("path,label\ny1.png,Malignant\n")
    df = merge_manifests([tmp_path / "a.csv", tmp_path / "site_b.csv"], tmp_path, task="bus_3class")
    assert df["source"].tolist() == ["busi"] * 12 + ["site_b"] and df["label"].iloc[-1] == "malignant"
