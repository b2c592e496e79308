"""Decode, grayscale, crop and resize images to the paper's 64x64 inputs.

An image is addressed by (uri, frame): ``frame`` picks a frame of a multi-frame DICOM or a slice of a
NIfTI volume (0-based; None is the first); for a file holding one image it is only metadata.
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import stages
from ..executor import recorded
from ..storage import RunDir, read_uri
from . import formats
from .formats import MAX_PIXELS, ImageError  # defined with the formats, which decode below imaging

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPY_EXTENSIONS = (".npy",)
CROP_LEVEL = 0.02  # pixels brighter than this (in [0, 1]) count as content when cropping
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Images with a longer side are shrunk right after decoding (JPEG: while decoding), before any copy is
# made: a 20000 x 20000 8-bit PNG peaks at its decoded size (400 MB) instead of about three times that.
# The result is 64 x 64 anyway; the crop is then found on the shrunk image.
SHRINK_SIDE = 4096
TOO_LARGE = "image too large ({w}x{h} pixels, limit {limit}): downscale it below 20000 x 20000 pixels"


UNKNOWN_FORMAT = "not a recognised image format (PNG, JPEG, TIFF, BMP, NPY, DICOM or NIfTI expected)"
DEFAULT_NIFTI_AXIS = 2
FrameSource = Callable[[int | None], np.ndarray]


def manifest_nifti_axis(run: RunDir) -> int:
    """The axis along which the run's manifest sliced NIfTI volumes (pass it to decode with the frames)."""
    return int(recorded(run, stages.MANIFEST, "nifti_axis", DEFAULT_NIFTI_AXIS))


def _ext(name: str) -> str:
    return posixpath.splitext(name.lower())[1]


def to_unit_gray(arr: np.ndarray) -> np.ndarray:
    """Any 2-D/3-D pixel array to a float32 grayscale image in [0, 1].

    uint8 is divided by 255; other types are min-max scaled per image (16-bit, float), a constant
    image becomes zeros. Colour (H, W, 3|4) uses ITU-R 601 luma; alpha is ignored.
    """
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4):
            rgb = arr[..., :3].astype(np.float32)
            arr = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
            scale_u8 = True
        elif arr.shape[2] == 1:
            return to_unit_gray(arr[..., 0])
        else:
            raise ImageError(f"unsupported array shape {arr.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    elif arr.ndim == 2:
        scale_u8 = arr.dtype == np.uint8
    else:
        raise ImageError(f"unsupported array shape {arr.shape}: expected a 2-D image")
    if arr.size == 0:
        raise ImageError("empty image (0 pixels)")
    if scale_u8 and (arr.dtype == np.uint8 or arr.max() <= 255):
        return np.asarray(arr, dtype=np.float32) / 255.0
    out = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ImageError("image has NaN or infinite pixel values")
    lo, hi = float(out.min()), float(out.max())
    if hi <= lo:
        return np.zeros_like(out)
    return (out - lo) / (hi - lo)


def frame_source(data: bytes, name: str, nifti_axis: int = DEFAULT_NIFTI_AXIS) -> FrameSource:
    """Parse file bytes once; the result decodes any frame of it (DICOM, NIfTI) or its one image."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    if formats.is_nifti(name):
        from .formats.nifti import NiftiSlices

        return NiftiSlices(data, name, nifti_axis)
    if _ext(name) not in (*PIL_EXTENSIONS, *NPY_EXTENSIONS) and formats.is_dicom(name, data[: formats.SNIFF_BYTES]):
        from .formats.dicom import DicomFrames

        return DicomFrames(data)
    image = _decode_single(data, name)
    return lambda frame=None: image


def decode_native(
    data: bytes, name: str, frame: int | None = None, nifti_axis: int = DEFAULT_NIFTI_AXIS
) -> np.ndarray:
    """Decode one image of file bytes to grayscale: uint8 for 8-bit raster sources, else float32 in [0, 1]."""
    return frame_source(data, name, nifti_axis)(frame)


def _decode_single(data: bytes, name: str) -> np.ndarray:
    if _ext(name) in NPY_EXTENSIONS:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as exc:
            raise ImageError(f"not a readable .npy array: {exc}") from None
        if arr.dtype.kind not in "uif" and arr.dtype != np.bool_:
            raise ImageError(f".npy array has non-numeric dtype {arr.dtype}")
        return to_unit_gray(arr.astype(np.float32) if arr.dtype == np.bool_ else arr)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(TOO_LARGE.format(w=img.width, h=img.height, limit=MAX_PIXELS))
            factor = -(-max(img.width, img.height) // SHRINK_SIDE)
            if factor > 1:
                img.draft(img.mode, (max(1, img.width // factor), max(1, img.height // factor)))  # JPEG only
            img.load()
            return _pil_to_gray(_shrink(img))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(UNKNOWN_FORMAT) from None
    except Image.DecompressionBombError as exc:
        raise ImageError(_too_large(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None


def decode(data: bytes, name: str, frame: int | None = None, nifti_axis: int = DEFAULT_NIFTI_AXIS) -> np.ndarray:
    """Decode one image of file bytes (PNG, JPEG, TIFF, BMP, NPY, DICOM, NIfTI) to float32 grayscale in [0, 1]."""
    arr = decode_native(data, name, frame, nifti_axis)
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr


def _too_large(exc: Image.DecompressionBombError) -> str:
    """The refusal of an image PIL stops at its header (over twice MAX_PIXELS), in TOO_LARGE's words."""
    size = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = size.group(1) if size else "too many"
    return f"image too large ({pixels} pixels, limit {MAX_PIXELS}): downscale it below 20000 x 20000 pixels"


def _shrink(img: Image.Image) -> Image.Image:
    """An image whose longer side exceeds SHRINK_SIDE, box-reduced by an integer factor to fit it."""
    factor = -(-max(img.width, img.height) // SHRINK_SIDE)
    if factor <= 1:
        return img
    if img.mode in ("1", "P", "I;16", "I;16B", "I;16L"):  # modes Image.reduce does not take
        img = img.convert("RGBA" if img.mode == "P" else "L" if img.mode == "1" else "I")
    return img.reduce(factor)


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_unit_gray(np.asarray(img))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "L":
        img = img.convert("L")  # ITU-R 601 luma; alpha ignored
    if img.width < 1 or img.height < 1:
        raise ImageError("empty image (0 pixels)")
    return np.asarray(img)


def crop_to_content(img: np.ndarray, level: float = CROP_LEVEL) -> np.ndarray:
    """Crop to the bounding box of pixels above ``level`` (of full scale) and pad to a centred square.

    Works on uint8 (full scale 255) and float images in [0, 1]; keeps the dtype.
    """
    threshold = level * 255 if img.dtype == np.uint8 else level
    rows = np.flatnonzero(img.max(axis=1) > threshold)
    if len(rows):
        cols = np.flatnonzero(img[rows[0] : rows[-1] + 1].max(axis=0) > threshold)
        img = img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return pad_square(img)


def pad_square(img: np.ndarray) -> np.ndarray:
    """Zero-pad a 2-D array to a centred square, keeping its dtype."""
    h, w = img.shape
    side = max(h, w)
    out = np.zeros((side, side), dtype=img.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = img
    return out


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Area-averaging resize of a square uint8 or float image to a float32 ``size`` x ``size`` in [0, 1]."""
    if img.dtype == np.uint8:
        small = img if img.shape == (size, size) else np.asarray(
            Image.fromarray(img, mode="L").resize((size, size), Image.Resampling.BOX)
        )
        return small.astype(np.float32) / 255.0
    if img.shape == (size, size):
        return img.astype(np.float32, copy=False)
    pil = Image.fromarray(img.astype(np.float32), mode="F")
    return np.asarray(pil.resize((size, size), Image.Resampling.BOX), dtype=np.float32).clip(0.0, 1.0)


def preprocess(img: np.ndarray, size: int = 64) -> np.ndarray:
    """The paper's recipe on a grayscale image: crop to content, resize to ``size``."""
    return resize(crop_to_content(img), size)


def load_image(
    uri: str,
    size: int = 64,
    storage_options: dict | None = None,
    frame: int | None = None,
    nifti_axis: int = DEFAULT_NIFTI_AXIS,
) -> np.ndarray:
    """Read, decode and preprocess one image (one frame of a multi-frame file)."""
    return preprocess(decode_native(read_uri(uri, storage_options), uri, frame, nifti_axis), size)


def _error_text(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    return str(exc) or type(exc).__name__


def load_images(
    uris: list[str],
    size: int = 64,
    storage_options: dict | None = None,
    threads: int = 4,
    frames: list[int | None] | None = None,
    nifti_axis: int = DEFAULT_NIFTI_AXIS,
) -> tuple[np.ndarray, list[str | None]]:
    """Decode and preprocess many images in threads.

    ``frames`` (one per uri, None for single images) picks frames of multi-frame files; rows of one
    file are read and parsed once. Returns a float32 array (B, size, size) in [0, 1] and a per-image
    error (None when decoded); failed images are zero arrays.
    """
    if frames is not None and len(frames) != len(uris):
        raise ValueError(f"{len(frames)} frames for {len(uris)} uris")
    out = np.zeros((len(uris), size, size), dtype=np.float32)
    errors: list[str | None] = [None] * len(uris)
    rows_of: dict[str, list[int]] = {}
    for i, uri in enumerate(uris):
        rows_of.setdefault(uri, []).append(i)

    def one(uri: str) -> None:
        rows = rows_of[uri]
        try:
            source = frame_source(read_uri(uri, storage_options), uri, nifti_axis)
        except (ImageError, OSError) as exc:
            for i in rows:
                errors[i] = _error_text(exc)
            return
        for i in rows:
            try:
                out[i] = preprocess(source(None if frames is None else frames[i]), size)
            except ImageError as exc:
                errors[i] = _error_text(exc)

    if threads <= 1 or len(rows_of) <= 1:
        for uri in rows_of:
            one(uri)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, rows_of))
    return out, errors


def probe(data: bytes, name: str) -> str | None:
    """Cheap check that file bytes hold a decodable image; returns the reason when not."""
    if not data:
        return "empty file (0 bytes)"
    if _ext(name) in NPY_EXTENSIONS:
        try:
            decode(data, name)
        except ImageError as exc:
            return str(exc)
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                return TOO_LARGE.format(w=img.width, h=img.height, limit=MAX_PIXELS)
            if img.width < 1 or img.height < 1:
                return "empty image (0 pixels)"
            img.verify()
    except UnidentifiedImageError:
        return UNKNOWN_FORMAT
    except Image.DecompressionBombError as exc:
        return _too_large(exc)
    except (OSError, SyntaxError, ValueError) as exc:
        return f"cannot decode image: {exc}"
    return None
