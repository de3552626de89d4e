"""Builders on real files laid out as each public source publishes them, and the COVIDx parser traps."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from medgcsam.data.builders import BuildError, build_manifest, parse_covidx_line
from medgcsam.data.cli import manifest_app
from medgcsam.data.manifest import read_manifest
from tests.helpers_images import dicom_test_file, make_image_folder, synthetic_pixels, write_image


def test_busi_drops_every_mask_file(tmp_path):
    root = tmp_path / "Dataset_BUSI_with_GT"
    make_image_folder(root, ("benign", "malignant", "normal"), 3)
    for stem in ("benign (1)_mask", "benign (1)_mask_1", "malignant (2)_mask"):
        cls = stem.split(" ")[0]
        write_image(root / cls / f"{stem}.png", synthetic_pixels(9))
    (root / "normal" / "Thumbs.db").write_bytes(b"x")
    result = build_manifest("busi", tmp_path)
    df = result.frame
    assert len(df) == 9 and not df["path"].str.contains("_mask").any()
    assert df["path"].str.startswith("Dataset_BUSI_with_GT/").all()
    assert sorted(df["label"].unique()) == ["benign", "malignant", "normal"]
    assert (df["source"] == "busi").all() and (df["sha256"].str.len() == 64).all()
    assert "3 mask file(s) dropped" in result.notes[0]


def test_busi_rejects_foreign_folders(tmp_path):
    make_image_folder(tmp_path, ("benign", "lymph"), 1)
    with pytest.raises(BuildError, match=r"unexpected folder\(s\) \['lymph'\]"):
        build_manifest("busi", tmp_path)


def test_generic_folder_layout(tmp_path):
    make_image_folder(tmp_path / "ds", ("a", "b"), 2, fmt="jpeg")
    df = build_manifest("folder", tmp_path / "ds").frame
    assert df["label"].tolist() == ["a", "a", "b", "b"] and (df["source"] == "ds").all()
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(BuildError, match="no images"):
        build_manifest("folder", tmp_path / "empty")


def test_flat_folder_is_refused_naming_the_folder_and_the_layout(tmp_path):
    """Images straight in the folder have no class: refused, not one class named after a stray sub-folder."""
    flat = tmp_path / "flat"
    make_image_folder(tmp_path, ("flat",), 3)
    make_image_folder(flat, ("images",), 2)
    out = tmp_path / "m.csv"
    res = CliRunner().invoke(manifest_app, ["build", "--format", "folder", str(flat), "-o", str(out)])
    assert res.exit_code == 2 and not out.exists()
    assert f"{flat}: 3 image(s) lie directly in the folder" in res.output
    assert f"{flat}/<class>/<image>" in res.output and "flat (1).png" in res.output


def test_one_class_folder_builds_with_a_warning(tmp_path):
    make_image_folder(tmp_path / "site", ("images",), 2)
    result = build_manifest("folder", tmp_path / "site")
    assert result.frame["label"].eq("images").all()
    assert any("every image is labelled 'images'" in note for note in result.notes)


def test_folder_keeps_suffixless_dicom_and_reports_what_it_leaves_out(tmp_path):
    """A PACS export named IM0001 (readable by read_image) and a GIF were dropped without a word."""
    write_image(tmp_path / "ds" / "a" / "x.png", synthetic_pixels(1))
    (tmp_path / "ds" / "b").mkdir()
    shutil.copy(dicom_test_file("CT_small.dcm"), tmp_path / "ds" / "b" / "IM0001")
    Image.fromarray(synthetic_pixels(2)).save(tmp_path / "ds" / "b" / "y.gif")
    result = build_manifest("folder", tmp_path / "ds")
    assert result.frame["path"].tolist() == ["a/x.png", "b/IM0001"]
    assert any("1 file(s) left out" in n and "b/y.gif" in n for n in result.notes)


def test_folder_finds_images_as_batch_inference_does(tmp_path):
    """A class folder linked in from elsewhere (a common way to assemble a dataset) was skipped by rglob,
    while batch inference over the same tree read it; hidden folders stay out of both."""
    write_image(tmp_path / "store" / "img1.png", synthetic_pixels(1))
    write_image(tmp_path / "ds" / "a" / "x.png", synthetic_pixels(2))
    write_image(tmp_path / "ds" / "a" / ".cache" / "z.png", synthetic_pixels(3))
    (tmp_path / "ds" / "b").mkdir()
    (tmp_path / "ds" / "b" / "linked").symlink_to(tmp_path / "store", target_is_directory=True)
    result = build_manifest("folder", tmp_path / "ds")
    assert result.frame["path"].tolist() == ["a/x.png", "b/linked/img1.png"]
    assert result.frame["label"].tolist() == ["a", "b"]


def test_label_files_in_other_encodings_name_file_and_line(tmp_path):
    """A cp1252 label.csv or COVIDx label file raised a bare UnicodeDecodeError naming neither."""
    write_image(tmp_path / "img" / "café.png", synthetic_pixels(1))
    (tmp_path / "label.csv").write_bytes("name,label\ncafé,0\n".encode("cp1252"))
    with pytest.raises(BuildError, match=r"label.csv: not UTF-8 \(byte 0xe9 on line 2\)"):
        build_manifest("gdph_sysucc", tmp_path)
    (tmp_path / "test.txt").write_bytes("p\xe91 café.png negative rsna\n".encode("latin-1"))
    with pytest.raises(BuildError, match=r"test.txt: not UTF-8 \(byte 0x[0-9a-f]{2} on line 1\)"):
        build_manifest("covidx", tmp_path)


def test_label_file_bom_and_trailing_commas_do_not_corrupt_rows(tmp_path):
    """A BOM stuck to the first COVIDx patient id (so that patient became two split groups), and a trailing
    comma on every label.csv row shifted the columns (names read as labels)."""
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "train" / name, synthetic_pixels(len(name)))
    (tmp_path / "train.txt").write_bytes("\ufeffp1 a.png positive rsna\r\np1 b.png positive rsna\r\n".encode())
    assert build_manifest("covidx", tmp_path).frame["patient_id"].tolist() == ["rsna:p1", "rsna:p1"]
    (tmp_path / "gdph" / "img").mkdir(parents=True)
    (tmp_path / "gdph" / "label.csv").write_text("name,label\nx,0,\ny,1,\n")
    df = build_manifest("gdph_sysucc", tmp_path / "gdph").frame
    assert df["path"].tolist() == ["img/x", "img/y"] and df["label"].tolist() == ["benign", "malignant"]


def test_gdph_sysucc_label_csv_and_missing_images(tmp_path):
    img = tmp_path / "GDPH&SYSUCC" / "img"
    for name, c in (("benign(0)", 0), ("malignant(0)", 1)):
        write_image(img / f"{name}.png", synthetic_pixels(c, class_index=c))
    (tmp_path / "GDPH&SYSUCC" / "label.csv").write_text("name,label\nbenign(0),0\nmalignant(0).png,1\nbenign(1),0\n")
    df = build_manifest("gdph_sysucc", tmp_path / "GDPH&SYSUCC").frame
    assert df["label"].tolist() == ["benign", "malignant", "benign"]
    assert df["path"].tolist()[:2] == ["img/benign(0).png", "img/malignant(0).png"]
    assert df["exclude_reason"].tolist() == ["", "", "file not found"]
    (tmp_path / "GDPH&SYSUCC" / "label.csv").write_text("name,label\nbenign(0),2\n")
    with pytest.raises(BuildError, match="label.csv line 2: label '2'"):
        build_manifest("gdph_sysucc", tmp_path / "GDPH&SYSUCC")


def test_busbra_cases_become_patients_and_official_folds_are_kept(tmp_path):
    ids = ["bus_0001-l", "bus_0001-r", "bus_0002-l", "bus_0003-s"]
    for i, image_id in enumerate(ids):
        write_image(tmp_path / "Images" / f"{image_id}.png", synthetic_pixels(i))
    (tmp_path / "bus_data.csv").write_text("ID,Histology,Pathology,BIRADS\n" + "".join(
        f"{i},x,{p},4\n" for i, p in zip(ids, ["benign", "benign", "malignant", "benign"], strict=True)))
    (tmp_path / "5-fold-cv.csv").write_text("ID,kFold\nbus_0001-l,1\nbus_0001-r,1\nbus_0002-l,3\nbus_0003-s,5\n")
    df = build_manifest("busbra", tmp_path).frame
    assert df["patient_id"].tolist() == ["busbra:0001", "busbra:0001", "busbra:0002", "busbra:0003"]
    assert df["fold"].tolist() == [0, 0, 2, 4] and (df["split"] == "train").all()
    (tmp_path / "5-fold-cv.csv").write_text("ID,kFold\nbus_0001-l,1\n")
    with pytest.raises(BuildError, match="no fold for ID"):
        build_manifest("busbra", tmp_path)


@pytest.mark.parametrize("line, expected", [
    ("419639-003251 MIDRC-RICORD-1C-419639-003251-46647-0.png COVID-19 ricord",
     ("419639-003251", "MIDRC-RICORD-1C-419639-003251-46647-0.png", "COVID-19", "ricord")),
    ("COVID 1 COVID(1).png positive sirm", ("COVID 1", "COVID(1).png", "positive", "sirm")),
    ("8 covid-19-pneumonia-15-PA.jpg COVID-19", ("8", "covid-19-pneumonia-15-PA.jpg", "COVID-19", "unknown")),
    ("COVID 7 COVID(7).png COVID-19", ("COVID 7", "COVID(7).png", "COVID-19", "unknown")),
    ("0a1b uuid.png negative rnsa\r\n", ("0a1b", "uuid.png", "negative", "rsna")),
])
def test_covidx_rows_parse_from_the_right(line, expected):
    row = parse_covidx_line(line, "t.txt line 1")
    assert (row.patient_id, row.filename, row.label, row.source) == expected


@pytest.mark.parametrize("line, match", [("onlytwo fields", "2 field"), ("p f.png cat src", "class 'cat'")])
def test_covidx_bad_rows_name_file_and_line(line, match):
    with pytest.raises(BuildError, match=f"t.txt line 7.*{match}"):
        parse_covidx_line(line, "t.txt line 7")


def _covidx_tree(tmp_path):
    rows = {"train": ["1 a.png positive cohen", "COVID 1 COVID(1).png positive sirm", "u1 b.png negative rnsa",
                      "1 c.png negative rsna"],
            "test": ["9 t1.png positive ricord", "u2 t2.png negative rsna"]}
    for split, lines in rows.items():
        for i, line in enumerate(lines):
            write_image(tmp_path / split / line.rsplit(" ", 3)[1], synthetic_pixels(i + 10 * len(split)))
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_covidx_layout_keeps_first_row_groups_by_source_and_freezes_test(tmp_path):
    result = build_manifest("covidx", _covidx_tree(tmp_path))
    df = result.frame
    assert len(df) == 6 and df["path"].iloc[0] == "test/t1.png"  # no header row swallowed
    train = df[df["split"] == "train"]
    assert train["patient_id"].tolist() == ["cohen:1", "sirm:COVID 1", "rsna:u1", "rsna:1"]
    assert "rnsa" not in set(df["source"]) and any("'rnsa' normalised" in n for n in result.notes)
    assert df.loc[df["split"] == "test", "path"].tolist() == ["test/t1.png", "test/t2.png"]


def test_cli_build_and_split_keep_official_covidx_test(tmp_path):
    root = _covidx_tree(tmp_path / "covidx")
    out = tmp_path / "manifests" / "covidx.csv"
    runner = CliRunner()
    res = runner.invoke(manifest_app, ["build", "--format", "covidx", str(root), "-o", str(out),
                                       "--task", "covid_binary"])
    assert res.exit_code == 0, res.output
    df = read_manifest(out)
    assert df["path"].iloc[0] == "../covidx/test/t1.png" and (out.parent / df["path"].iloc[0]).is_file()
    res = runner.invoke(manifest_app, ["split", str(out), "--k", "2", "--no-near-duplicates"])
    assert res.exit_code == 0, res.output
    split = read_manifest(out)
    assert split.loc[split["path"].str.contains("/test/"), "split"].eq("test").all()
    assert split.loc[~split["path"].str.contains("/test/"), "split"].eq("train").all()
    assert "Source x class per split" in res.output


def test_cli_reports_build_errors(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    res = CliRunner().invoke(manifest_app, ["build", "--format", "gdph_sysucc", str(tmp_path), "-o",
                                            str(tmp_path / "m.csv")])
    assert res.exit_code == 2 and "no label.csv" in res.output
    assert not (tmp_path / "m.csv").exists()
