"""Read one medical image file into a float32 ``(C, H, W)`` array in ``[0, 1]``.

One reader for PNG/JPEG/BMP/TIFF (Pillow) and DICOM (pydicom), so training, caching and batch
inference see identical pixels. DICOM goes through the display pipeline in the standard's order
(modality LUT, VOI LUT or window, MONOCHROME1/INVERSE inversion). Only pixel-module attributes are
parsed from a DICOM file, so names, IDs, dates and UIDs never enter this process's data.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")
DICOM_SUFFIXES = (".dcm", ".dicom")
Multiframe = Literal["first", "middle", "error"]

# Everything pydicom needs to decode and display pixels, and nothing else (no patient/study module).
_DICOM_PIXEL_TAGS = [
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "NumberOfFrames",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "PresentationLUTShape",
    "PixelPaddingValue", "PixelPaddingRangeLimit",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
]

# Transfer syntax UID -> permissively licensed decoder that handles it (all in the [dicom] extra).
_DECODER_PACKAGE = {
    "1.2.840.10008.1.2.4.50": "python-gdcm (or pylibjpeg)",
    "1.2.840.10008.1.2.4.51": "python-gdcm",
    "1.2.840.10008.1.2.4.57": "python-gdcm",
    "1.2.840.10008.1.2.4.70": "python-gdcm",
    "1.2.840.10008.1.2.4.80": "python-gdcm",
    "1.2.840.10008.1.2.4.81": "python-gdcm",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}


class ImageReadError(ValueError):
    """A file that cannot become pixels; the message names the file, the reason and the fix."""


def is_dicom(path: Path) -> bool:
    """By suffix, or by the ``DICM`` magic at byte 128 for suffix-less exports from PACS. A file with an
    image suffix is taken at its word (no extra read per image); :func:`read_image` checks the magic only
    when Pillow cannot identify it."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    return path.suffix.lower() not in IMAGE_SUFFIXES and _dicom_magic(path)


def _dicom_magic(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


def find_images(root: str | Path) -> tuple[list[str], list[str]]:
    """Relative POSIX paths under ``root``, recursively, sorted: (image files, other files).

    A file counts by image suffix or, whatever its name, by the DICOM ``DICM`` marker: PACS exports
    are often named ``IM000123`` or by UID with a numeric "suffix". Hidden files and folders are skipped;
    linked folders are followed once each. Everything else found (other formats, broken links, files
    too short to be DICOM) is returned as "other", so a job can say what it did not look at.
    """
    root = Path(root)
    found, other, seen = [], [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            image = path.is_file() and (path.suffix.lower() in IMAGE_SUFFIXES or _is_dicom(path))
            (found if image else other).append(rel)
    return sorted(found), sorted(other)


def _is_dicom(path: Path) -> bool:
    try:
        return is_dicom(path)
    except OSError:  # unreadable here; an image suffix would have listed it, so it is not ours to report
        return False


def read_image(path: str | Path, *, multiframe: Multiframe = "middle") -> np.ndarray:
    """Pixels of ``path`` as float32 ``(C, H, W)`` in ``[0, 1]``; C is 1 (grey) or 3 (RGB, alpha dropped).

    8-bit data is divided by 255 so values keep their display meaning; 16-bit and wider data is
    min-max scaled per image, because such containers often hold 10-14 significant bits and a fixed
    divisor would make them nearly black. ``multiframe`` picks the frame of a cine/multi-frame DICOM.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file does not exist; fix the path in the manifest or pass the right --root")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty (0 bytes); re-export it or set its exclude_reason in the manifest")
    arr = _read_dicom(path, multiframe) if is_dicom(path) else _read_pillow(path, multiframe)
    bad = int(np.count_nonzero(~np.isfinite(arr)))
    if bad:  # a float image with one NaN would otherwise be min-max scaled to NaN and scored as class 0
        raise ImageReadError(f"{path}: {bad} of {arr.size} pixel values are NaN or infinite after decoding; the "
                             f"file holds invalid floating-point data: re-export it or set its exclude_reason")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_pillow(path: Path, multiframe: Multiframe = "middle") -> np.ndarray:
    try:
        with Image.open(path) as img:
            frames = int(getattr(img, "n_frames", 1))
            if frames > 1 and img.format == "TIFF":  # a stack: the page is chosen as for a multi-frame DICOM
                if multiframe == "error":
                    raise ImageReadError(f"{path}: TIFF has {frames} pages and multiframe='error'; choose 'first' "
                                         f"or 'middle' (data.dicom_multiframe) or export single pages")
                img.seek(0 if multiframe == "first" else frames // 2)
            img.load()
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # phones and some scanners save rotated
                img = ImageOps.exif_transpose(img)  # pixels as displayed, as the annotator saw them
            return _pillow_to_chw(img)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        failed = None  # perhaps a DICOM saved under an image suffix (.png): checked below, outside this handler
    except Image.DecompressionBombError as exc:  # not an OSError: it escaped as a bare traceback
        raise ImageReadError(f"{path}: {exc} Pillow refuses an image this large: downscale it or set its "
                             f"exclude_reason in the manifest") from None
    except (OSError, SyntaxError, ValueError) as exc:
        failed = exc
    if _dicom_magic(path):  # also a DICOM whose preamble Pillow took for a TIFF: its text stays out of messages
        return _read_dicom(path, multiframe)
    if failed is not None:
        raise ImageReadError(f"{path}: image does not decode ({failed}); the file is probably truncated or corrupt: "
                             f"re-export it or set its exclude_reason in the manifest")
    raise ImageReadError(f"{path}: not a recognised image format; convert it to PNG/JPEG/DICOM or set its "
                         f"exclude_reason in the manifest")


def failure_reason(exc: BaseException) -> str:
    """One line on why a file could not become a model input: the :class:`ImageReadError` however deeply a
    transform pipeline wrapped it (MONAI's "applying transform ..."), else the innermost error by type and text."""
    inner = exc
    while True:
        if isinstance(inner, ImageReadError):
            return str(inner)
        if inner.__cause__ is None:
            return f"preprocessing failed ({type(inner).__name__}: {inner})"
        inner = inner.__cause__


def _pillow_to_chw(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
        img, mode = img.convert("RGB"), "RGB"
    elif mode in ("LA", "La"):
        img, mode = img.getchannel("L"), "L"
    elif mode == "1":
        img, mode = img.convert("L"), "L"
    arr = np.asarray(img)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return _minmax(arr.astype(np.float32))


def _minmax(arr: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the finite values; NaN and infinities stay non-finite, for read_image to count."""
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):  # rare: only then pay for a masked copy
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            return arr
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.where(np.isfinite(arr), 0.0, arr).astype(np.float32)
    return (arr - lo) / (hi - lo)


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings and log records about a damaged header quote the element values it read, and the
    file meta (always parsed) holds UIDs, while a damaged length can swallow the patient module: none of it
    may reach a log. Exceptions still propagate and are reported without their text."""
    import pydicom  # noqa: F401  (creates the module loggers below "pydicom", so each can be switched off)

    # a disabled parent does not stop its children's records, e.g. the decoders' logged tracebacks
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "pydicom" or name.startswith("pydicom.")]
    disabled = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, was in zip(loggers, disabled, strict=True):
            logger.disabled = was


def _read_dicom(path: Path, multiframe: Multiframe) -> np.ndarray:
    with _quiet_pydicom():
        try:
            return _decode_dicom(path, multiframe)
        except ImageReadError:
            raise
        except Exception as exc:  # e.g. NumberOfFrames '1A'; the text is left out as it may quote header values
            raise ImageReadError(f"{path}: DICOM image attributes are invalid ({type(exc).__name__} while using "
                                 f"them); the file is damaged: re-export it or set its exclude_reason") from None


def _decode_dicom(path: Path, multiframe: Multiframe) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, specific_tags=_DICOM_PIXEL_TAGS)
    except InvalidDicomError:
        raise ImageReadError(f"{path}: not a DICOM file (no 'DICM' preamble); if it is a raw dataset without a "
                             f"preamble, re-export it as a DICOM Part 10 file") from None
    except Exception as exc:  # pydicom raises many types for damaged headers; their text may quote header values
        raise ImageReadError(f"{path}: DICOM header does not parse ({type(exc).__name__}); the file is damaged or "
                             f"truncated: re-export it or set its exclude_reason") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data (a report, structure set or DICOMDIR?); "
                             f"remove it from the manifest")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        if multiframe == "error":
            raise ImageReadError(f"{path}: DICOM has {frames} frames and multiframe='error'; choose 'first' or "
                                 f"'middle' (data.dicom_multiframe) or export single frames")
        ds.pixel_array_options(index=0 if multiframe == "first" else frames // 2)
    try:
        arr = ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        raise ImageReadError(_codec_message(path, ds, exc)) from None
    except Exception as exc:  # pydicom's text quotes the values it rejects: only our own words go out
        cause = _attribute_problem(ds) or "the file is truncated or its image attributes are wrong"
        raise ImageReadError(f"{path}: DICOM pixel data does not decode ({type(exc).__name__}): {cause}; "
                             f"re-export it or set its exclude_reason") from None
    return _dicom_display(arr, ds)


def _attribute_problem(ds) -> str | None:
    """Which pixel-module attribute is out of its registered range, named by keyword with the values it may take;
    never the value found, which a damaged or hand-made header can fill with any text (a patient's name)."""
    from pydicom.pixels.common import PhotometricInterpretation

    allowed = {
        "PhotometricInterpretation": [p.value for p in PhotometricInterpretation],
        "SamplesPerPixel": [1, 3], "BitsAllocated": [1, 8, 16, 32, 64], "PixelRepresentation": [0, 1],
        "PlanarConfiguration": [0, 1],
    }
    for keyword, values in allowed.items():
        if keyword not in ds:
            continue
        value = ds.get(keyword)
        with contextlib.suppress(TypeError, ValueError):
            value = value.strip() if isinstance(value, str) else int(value)
        if value not in values:
            return f"its {keyword} is not one of the values the standard registers ({', '.join(map(str, values))})"
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        if int(ds.Rows) <= 0 or int(ds.Columns) <= 0:
            return "its Rows or Columns is zero"
        if not 0 < int(ds.BitsStored) <= int(ds.BitsAllocated) or int(ds.HighBit) != int(ds.BitsStored) - 1:
            return "its BitsStored/HighBit do not fit BitsAllocated (HighBit must be BitsStored - 1)"
    return None


def _codec_message(path: Path, ds, exc: Exception) -> str:
    from pydicom.uid import UID_dictionary

    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    # only a registered syntax is named: a damaged file meta can make this value run into the UIDs after it
    ts, name = (ts, UID_dictionary[ts][0]) if ts in UID_dictionary else ("unrecognised", "unknown")
    package = _DECODER_PACKAGE.get(ts, "python-gdcm")
    install = f"`pip install \"medgcsam[dicom]\"` ({package}); do not use the GPL pylibjpeg-libjpeg plugin"
    said = f"pydicom raised {type(exc).__name__}"  # not its text: decoders quote header values in it
    if _decoder_installed(ts):  # then a damaged codestream, not a missing package, is the likely cause
        return (f"{path}: DICOM pixel data ('{name}', {ts}) does not decode with the installed decoders: the "
                f"compressed data is damaged or truncated (re-export it or set its exclude_reason), or it needs "
                f"a decoder with more features: {install}. {said}")
    return (f"{path}: cannot decode DICOM transfer syntax '{name}' ({ts}): no installed decoder handles it. "
            f"Install the permissively licensed decoders with {install}. {said}")


def _decoder_installed(ts: str) -> bool:
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(ts).is_available
    except (NotImplementedError, ValueError):  # no pydicom decoder exists for this syntax at all
        return False


def _dicom_display(arr: np.ndarray, ds) -> np.ndarray:
    """Stored values -> displayed intensities in [0, 1], following PS3.3 C.11 order."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        rgb = apply_color_lut(arr, ds).astype(np.float32) / float(2**bits - 1)
        return rgb.transpose(2, 0, 1)
    if arr.ndim == 3:  # colour (YBR already converted to RGB by pydicom)
        bits = int(ds.get("BitsStored", 8))
        return (arr.astype(np.float32) / float(2**bits - 1)).transpose(2, 0, 1)
    out = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # a LUT is indexed by integer input values; the modality LUT may have produced floats
        out = apply_voi_lut(np.rint(out).astype(np.int64), ds, prefer_lut=True) / float(2**lut_bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = _window(out, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        out = _minmax(out)
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).strip() == "INVERSE":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0).astype(np.float32)[None]


def _first(value) -> float:
    return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window functions, mapped straight to [0, 1]."""
    function = function.strip().upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width <= 1.0:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
