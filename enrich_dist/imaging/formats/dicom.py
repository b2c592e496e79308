"""DICOM: header-only probes, and frames decoded to grayscale as a radiologist's viewer shows them.

Grayscale frames go through the Modality LUT (or rescale slope/intercept), then the VOI LUT or the
first window centre/width, scaled by that window's output range; without a window, 8-bit unsigned
data is divided by 255 and anything else is min-max scaled per frame. MONOCHROME1 is inverted after
windowing. RGB and YBR (converted by pydicom) and PALETTE COLOR (through its LUT) become ITU-R 601
luma scaled by their bit depth. Ultrasound frames are cropped to the union of their 2-D
SequenceOfUltrasoundRegions, so burned-in text and rulers outside the image do not drive similarity.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from . import MAX_PIXELS, ImageError, NotAnImage, has_dicom_magic

CODEC_HINT = "pip install 'enrich-dist[dicom-codecs]' (pylibjpeg) or python-gdcm"
HEADER_DEFER = "256 KB"  # large non-pixel elements are left on disk by header-only reads
PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little / big endian
UNDEFINED_LENGTH = 0xFFFFFFFF
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
REGION_2D = 1  # RegionSpatialFormat of a 2-D (tissue or colour flow) region


@dataclass(frozen=True)
class DicomHeader:
    """What the manifest takes from one DICOM header: the frame count and raw identifiers."""

    frames: int
    patient_id: str | None
    series_uid: str | None
    instance_uid: str | None

    @property
    def clip_uid(self) -> str | None:
        """The clip: the file itself for a cine (multi-frame), its series for single frames."""
        return (self.instance_uid if self.frames > 1 else self.series_uid) or self.series_uid


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return (str(value).strip() or None) if value is not None else None


def frame_count(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent), or a clear error when it is not a positive count."""
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ImageError(f"NumberOfFrames {value!r} is not a count") from None
    if n < 1:
        raise ImageError(f"NumberOfFrames is {n}: the file holds no frame")
    return n


def check_decodable(ds: Dataset) -> None:
    """Raise ImageError when the pixel data cannot be turned into a grayscale frame here."""
    if not ds.get("Rows") or not ds.get("Columns"):
        raise NotAnImage("DICOM object without an image (no Rows/Columns)")
    if int(ds.Rows) * int(ds.Columns) > MAX_PIXELS:
        raise ImageError(f"image too large ({ds.Columns}x{ds.Rows} pixels per frame, limit {MAX_PIXELS})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in (*MONOCHROME, *COLOUR, "PALETTE COLOR"):
        raise ImageError(f"unsupported PhotometricInterpretation {photometric or '(missing)'!r}")
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None or not tsyntax.is_compressed:
        return
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise ImageError(f"pixel data in transfer syntax {tsyntax.name} ({tsyntax}) cannot be decoded by pydicom") from None
    if not decoder.is_available:
        raise ImageError(
            f"pixel data compressed as {tsyntax.name} ({tsyntax}) and no decoder plugin for it is installed: {CODEC_HINT}"
        )


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (old or raw datasets) get the transfer syntax they were read with."""
    if ds.file_meta.get("TransferSyntaxUID") is not None:
        return
    implicit, little = ds.original_encoding
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _read(fh: BinaryIO, head_only: bool) -> Dataset:
    head = fh.read(132)
    fh.seek(0)
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=head_only, defer_size=HEADER_DEFER if head_only else None, force=True)
    except Exception as exc:  # pydicom's parser raises many kinds of error on malformed input
        raise ImageError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from None
    if not has_dicom_magic(head) and "SOPClassUID" not in ds and "Rows" not in ds:
        raise ImageError("not a DICOM file (no 'DICM' marker and no DICOM image attributes)")
    _ensure_transfer_syntax(ds)
    return ds


def _pixel_data_bytes(fh: BinaryIO, ds: Dataset, size: int) -> int | None:
    """Bytes the file holds for the pixel data element read next, None for encapsulated data; NotAnImage when absent."""
    start = fh.tell()
    element = fh.read(12)
    if element[:4] not in PIXEL_DATA_TAGS:
        raise NotAnImage("DICOM object without pixel data")
    implicit, little = ds.original_encoding
    order = "<" if little else ">"
    length, offset = (struct.unpack(order + "I", element[4:8])[0], 8) if implicit else (
        struct.unpack(order + "I", element[8:12])[0], 12
    )
    if length == UNDEFINED_LENGTH:
        return None
    return min(length, max(0, size - start - offset))


def read_header(fh: BinaryIO, size: int) -> DicomHeader:
    """Frame count and identifiers from the header only (reading stops before the pixel data).

    Checks that the image can be decoded here (photometric interpretation, a decoder for a
    compressed transfer syntax) and that natively encoded pixel data is complete.
    """
    ds = _read(fh, head_only=True)
    check_decodable(ds)
    frames = frame_count(ds)
    have = _pixel_data_bytes(fh, ds, size)
    if have is not None:
        need = get_expected_length(ds, "bytes")
        if have < need:
            raise ImageError(f"truncated DICOM: pixel data holds {have} bytes, {frames} frame(s) need {need}")
    return DicomHeader(frames, _text(ds, "PatientID"), _text(ds, "SeriesInstanceUID"), _text(ds, "SOPInstanceUID"))


def ultrasound_box(ds: Dataset) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the union of an ultrasound image's 2-D regions, or None."""
    regions = ds.get("SequenceOfUltrasoundRegions") or []
    if str(ds.get("Modality", "")).upper() != "US" or not regions:
        return None
    flat = [r for r in regions if r.get("RegionSpatialFormat") == REGION_2D] or list(regions)
    try:
        x0 = min(int(r.RegionLocationMinX0) for r in flat)
        y0 = min(int(r.RegionLocationMinY0) for r in flat)
        x1 = max(int(r.RegionLocationMaxX1) for r in flat) + 1  # the standard's max corner is inclusive
        y1 = max(int(r.RegionLocationMaxY1) for r in flat) + 1
    except (AttributeError, TypeError, ValueError):
        return None
    top, bottom = max(0, y0), min(int(ds.Rows), y1)
    left, right = max(0, x0), min(int(ds.Columns), x1)
    return (top, bottom, left, right) if bottom - top > 1 and right - left > 1 else None


def _voi_range(ds: Dataset) -> tuple[float, float]:
    """Output range of pydicom's VOI LUT / windowing for this dataset (PS3.3 C.11.2)."""
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:  # as pydicom's apply_windowing does
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _has_window(ds: Dataset) -> bool:
    return bool(ds.get("VOILUTSequence")) or (ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None)


def _is_plain_8bit(ds: Dataset) -> bool:
    """Unsigned 8-bit values with an identity modality transform: already display values."""
    identity = float(ds.get("RescaleSlope", 1) or 1) == 1 and float(ds.get("RescaleIntercept", 0) or 0) == 0
    unsigned = int(ds.get("PixelRepresentation", 0)) == 0
    return int(ds.BitsStored) == 8 and unsigned and identity and not ds.get("ModalityLUTSequence")


def _min_max(arr: np.ndarray) -> np.ndarray:
    out = arr.astype(np.float32)
    lo, hi = float(out.min()), float(out.max())
    return np.zeros_like(out) if hi <= lo else (out - lo) / (hi - lo)


def monochrome_to_unit(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored grayscale values to display values in [0, 1]: modality LUT, VOI LUT/window, MONOCHROME1 inverted."""
    values = apply_modality_lut(arr, ds)
    out = None
    if _has_window(ds):
        try:
            windowed = apply_voi_lut(values, ds, index=0)
        except ValueError:  # a window the standard rejects (width < 1) is ignored
            windowed = None
        if windowed is not None:
            lo, hi = _voi_range(ds)
            out = (windowed.astype(np.float32) - lo) / (hi - lo) if hi > lo else _min_max(windowed)
    if out is None:
        out = arr.astype(np.float32) / 255.0 if _is_plain_8bit(ds) else _min_max(values)
    out = np.clip(out, 0.0, 1.0, dtype=np.float32)
    return 1.0 - out if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1" else out


def _luma(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(rgb[..., :3].astype(np.float32) @ LUMA / full_scale, 0.0, 1.0)


def to_unit_gray(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """One decoded frame (as pydicom returns it) to a float32 grayscale image in [0, 1]."""
    photometric = str(ds.PhotometricInterpretation).strip()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)  # uint8 or uint16, by the LUT's bits per entry
        return _luma(rgb, float(np.iinfo(rgb.dtype).max))
    if photometric in MONOCHROME:
        return monochrome_to_unit(arr, ds)
    if arr.ndim != 3:
        raise ImageError(f"{photometric} frame has shape {arr.shape}, expected (rows, columns, 3)")
    return _luma(arr, float(2 ** int(ds.BitsStored) - 1))


class DicomFrames:
    """A DICOM file read once; frames decode on demand (a cine is not decoded whole per frame)."""

    def __init__(self, data: bytes):
        self.ds = _read(io.BytesIO(data), head_only=False)
        if "PixelData" not in self.ds:
            raise ImageError("DICOM object without pixel data (not an image)")
        try:
            check_decodable(self.ds)
        except NotAnImage as exc:
            raise ImageError(str(exc)) from None
        self.frames = frame_count(self.ds)
        self.box = ultrasound_box(self.ds)

    def __call__(self, frame: int | None = None) -> np.ndarray:
        """Frame ``frame`` (0-based; None or any value for a single-frame file) as grayscale in [0, 1]."""
        index = 0 if frame is None or self.frames == 1 else int(frame)
        if not 0 <= index < self.frames:
            raise ImageError(f"frame {frame} out of range: the file has {self.frames} frames")
        try:
            arr = pixel_array(self.ds, index=index)
            gray = to_unit_gray(arr, self.ds)
        except ImageError:
            raise
        except Exception as exc:  # a decoder plugin or LUT on a malformed file may raise anything
            tsyntax = self.ds.file_meta.TransferSyntaxUID
            hint = f"; another decoder plugin may read {tsyntax.name}: {CODEC_HINT}" if tsyntax.is_compressed else ""
            raise ImageError(f"cannot decode DICOM pixel data: {type(exc).__name__}: {exc}{hint}") from None
        if self.box is not None:
            top, bottom, left, right = self.box
            gray = gray[top:bottom, left:right]
        return np.ascontiguousarray(gray, dtype=np.float32)
