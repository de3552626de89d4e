"""read_image on real files: PNG 8/16-bit, L/RGB/RGBA, JPEG, broken files and pydicom's DICOM test files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medgcsam.data.io import ImageReadError, read_image
from tests.helpers_images import (
    dicom_test_file,
    synthetic_pixels,
    write_dicom,
    write_empty_file,
    write_image,
    write_truncated_png,
)


@pytest.mark.parametrize("fmt, channels", [("png", 1), ("rgb", 3), ("rgba", 3), ("jpeg", 1)])
def test_8bit_formats_share_one_chw_convention(tmp_path, fmt, channels):
    pixels = synthetic_pixels(1, (30, 50))
    path = write_image(tmp_path / f"img.{fmt}", pixels, fmt)
    arr = read_image(path)
    assert arr.dtype == np.float32 and arr.shape == (channels, 30, 50)
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    tolerance = 3 / 255 if fmt == "jpeg" else 1e-6  # JPEG is lossy
    assert np.abs(arr[0] - pixels / 255.0).mean() < tolerance


def test_rgba_drops_alpha_instead_of_blending(tmp_path):
    pixels = synthetic_pixels(2)
    arr = read_image(write_image(tmp_path / "a.png", pixels, "rgba"))
    np.testing.assert_allclose(arr[0], pixels / 255.0, atol=1e-6)


def test_16bit_png_is_scaled_not_clamped(tmp_path):
    pixels = synthetic_pixels(3)  # 8-bit pattern stored as 12-bit values in a 16-bit PNG
    path = write_image(tmp_path / "x16.png", pixels, "png16")
    assert Image.open(path).mode.startswith("I")
    arr = read_image(path)
    assert arr.shape == (1, *pixels.shape)
    assert arr.min() == 0.0 and arr.max() == 1.0
    assert (arr > 0.99).mean() < 0.2  # Pillow's convert("L") would make nearly everything white
    expected = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    np.testing.assert_allclose(arr[0], expected, atol=1e-5)


@pytest.mark.parametrize("writer, reason", [(write_truncated_png, "truncated"), (write_empty_file, "empty")])
def test_broken_files_name_file_reason_and_fix(tmp_path, writer, reason):
    path = writer(tmp_path / "broken.png")
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    msg = str(info.value)
    assert str(path) in msg and reason in msg and "exclude_reason" in msg


def test_missing_and_unrecognised_files(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    junk = tmp_path / "notes.png"
    junk.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="not a recognised image"):
        read_image(junk)


def test_dicom_modality_lut_then_min_max_without_window():
    arr = read_image(dicom_test_file("CT_small.dcm"))  # signed CT with RescaleIntercept -1024, no window
    assert arr.shape == (1, 128, 128) and arr.dtype == np.float32
    assert arr.min() == 0.0 and arr.max() == 1.0


def test_dicom_saved_under_an_image_suffix_is_read_as_dicom(tmp_path):
    """Some exporters write DICOM files named .png; Pillow refused them as 'not a recognised image format'."""
    misnamed = tmp_path / "IM0001.png"
    misnamed.write_bytes(dicom_test_file("CT_small.dcm").read_bytes())
    np.testing.assert_array_equal(read_image(misnamed), read_image(dicom_test_file("CT_small.dcm")))


def test_dicom_window_is_applied(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (8, 1))  # 0..3960
    path = write_dicom(tmp_path / "w.dcm", ramp, window=(2000, 1000))
    arr = read_image(path)[0]
    below, above = ramp < 1500, ramp > 2500
    assert np.all(arr[below] == 0.0) and np.all(arr[above] == 1.0)
    mid = (ramp >= 1600) & (ramp <= 2400)
    assert np.all(np.diff(arr[0][mid[0]]) > 0)  # linear inside the window
    np.testing.assert_allclose(arr[ramp == 2000], 0.5, atol=2e-3)


def test_dicom_window_after_modality_lut(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (4, 1))
    # stored s -> 2*s - 1000 ; window centre 3000 in output units = stored 2000
    arr = read_image(write_dicom(tmp_path / "r.dcm", ramp, window=(3000, 2000), slope=2.0, intercept=-1000.0))[0]
    np.testing.assert_allclose(arr[ramp == 2000], 0.5, atol=2e-3)


def test_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (4, 1))
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", ramp, window=(2000, 3000)))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", ramp, window=(2000, 3000), photometric="MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0, 0] > m1[0, 0, -1]  # low stored values are bright in MONOCHROME1


def test_voi_lut_sequence_wins_over_window_and_inverse_presentation(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (4, 1))
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]  # 4096 entries from stored value 0, 16-bit output
    lut.LUTData = (65535 - np.arange(4096, dtype=np.uint16) * 16).tobytes()  # an inverting LUT
    path = write_dicom(tmp_path / "lut.dcm", ramp, window=(100, 10), VOILUTSequence=Sequence([lut]))
    arr = read_image(path)[0]
    np.testing.assert_allclose(arr, (65535 - ramp.astype(float) * 16) / 65535.0, atol=1e-6)
    inverse = read_image(write_dicom(tmp_path / "inv.dcm", ramp, window=(2048, 4096), PresentationLUTShape="INVERSE"))
    plain = read_image(write_dicom(tmp_path / "plain.dcm", ramp, window=(2048, 4096)))
    np.testing.assert_allclose(inverse, 1.0 - plain, atol=1e-6)


def test_multiframe_policy(tmp_path):
    frames = np.stack([np.full((6, 6), v, dtype=np.uint16) for v in (100, 200, 300)])
    frames[:, 0, 0] = 0  # min-max needs some contrast inside each frame
    frames[:, 0, 1] = 400
    path = write_dicom(tmp_path / "cine.dcm", frames)
    first = read_image(path, multiframe="first")[0]
    middle = read_image(path, multiframe="middle")[0]
    assert first.shape == (6, 6)
    assert first[3, 3] == pytest.approx(100 / 400) and middle[3, 3] == pytest.approx(200 / 400)
    with pytest.raises(ImageReadError, match="3 frames"):
        read_image(path, multiframe="error")


def test_colour_multiframe_dicom_gives_rgb():
    arr = read_image(dicom_test_file("SC_rgb_rle_2frame.dcm"))
    assert arr.shape == (3, 100, 100) and arr.min() >= 0.0 and arr.max() <= 1.0


def test_jpeg2000_dicom_decodes_with_bundled_pillow():
    arr = read_image(dicom_test_file("693_J2KI.dcm"))
    assert arr.shape == (1, 512, 512) and arr.std() > 0.01


def test_missing_codec_names_transfer_syntax_and_package():
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        arr = read_image(dicom_test_file("MR_small_jpeg_ls_lossless.dcm"))  # an installed [dicom] extra decodes it
        assert arr.shape == (1, 64, 64)
        return
    with pytest.raises(ImageReadError) as info:
        read_image(dicom_test_file("MR_small_jpeg_ls_lossless.dcm"))
    msg = str(info.value)
    assert "JPEG-LS Lossless" in msg and "1.2.840.10008.1.2.4.80" in msg
    assert 'pip install "medgcsam[dicom]"' in msg and "python-gdcm" in msg


@pytest.mark.parametrize("name, match", [("MR_truncated.dcm", "does not decode"),
                                         ("rtplan.dcm", "no pixel data"),
                                         ("badVR.dcm", "image attributes are invalid")])  # NumberOfFrames '1A'
def test_broken_dicom_files(name, match):
    with pytest.raises(ImageReadError, match=match):
        read_image(dicom_test_file(name))


def test_damaged_compressed_dicom_is_not_blamed_on_a_missing_codec_and_logs_nothing(tmp_path, caplog):
    """A JPEG codestream cut in half, with Pillow's JPEG decoder installed: it was reported as 'no installed
    decoder handles it', and pydicom's decoder logged an ERROR traceback to the root logger."""
    import logging

    import pydicom
    from pydicom.encaps import encapsulate, generate_fragments

    ds = pydicom.dcmread(dicom_test_file("SC_rgb_jpeg_dcmtk.dcm"))
    fragment = next(f for f in generate_fragments(ds.PixelData) if f)
    ds.PixelData = encapsulate([fragment[: len(fragment) // 2]])
    ds.PatientName, ds.PatientID = "Secret^Name", "MRN-998877"
    ds.save_as(tmp_path / "cut.dcm")
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageReadError) as info:
        read_image(tmp_path / "cut.dcm")
    assert "damaged or truncated" in str(info.value) and "no installed decoder" not in str(info.value)
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []
    assert "Secret" not in caplog.text + str(info.value) and "MRN-998877" not in caplog.text + str(info.value)


def test_exif_orientation_is_applied(tmp_path):
    """A JPEG/PNG saved rotated with an EXIF Orientation tag was read as stored, not as displayed."""
    pixels = synthetic_pixels(3, (20, 30))
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    img.save(tmp_path / "rotated.png", exif=exif)
    arr = read_image(tmp_path / "rotated.png")
    np.testing.assert_array_equal(arr[0], np.rot90(pixels, k=-1).astype(np.float32) / 255.0)


def test_dicom_suffix_on_non_dicom_file(tmp_path):
    fake = write_image(tmp_path / "x.png", synthetic_pixels(1)).rename(tmp_path / "x.dcm")
    with pytest.raises(ImageReadError, match="not a DICOM file"):
        read_image(fake)


def test_suffixless_dicom_is_detected_and_identifiers_stay_inside(tmp_path):
    frames = np.stack([synthetic_pixels(i).astype(np.uint16) for i in range(2)])
    path = write_dicom(tmp_path / "IM0001", frames, patient_name="Secret^Name", patient_id="MRN-998877")
    arr = read_image(path)
    assert isinstance(arr, np.ndarray) and arr.shape == (1, *frames.shape[1:])
    with pytest.raises(ImageReadError) as info:
        read_image(path, multiframe="error")
    assert "Secret" not in str(info.value) and "MRN-998877" not in str(info.value)


def test_multipage_tiff_follows_the_multiframe_policy(tmp_path):
    """A TIFF stack is not read as its first page without saying so: the page is picked like a DICOM frame."""
    pages = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 20, 30, 40, 50)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert read_image(path, multiframe="first")[0, 0, 0] == pytest.approx(10 / 255)
    assert read_image(path)[0, 0, 0] == pytest.approx(30 / 255)  # default: the middle page
    with pytest.raises(ImageReadError, match="TIFF has 5 pages"):
        read_image(path, multiframe="error")


def test_oversized_image_is_an_image_read_error(tmp_path, monkeypatch):
    """Pillow's DecompressionBombError is no OSError: it escaped read_image and crashed validate and split."""
    path = write_image(tmp_path / "big.png", synthetic_pixels(1))  # 40x48 > 2 x the lowered limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageReadError, match=r"big.png: Image size .* downscale it or set its exclude_reason"):
        read_image(path)
