"""Decode, grayscale, crop and resize images to the paper's 64x64 inputs."""

from __future__ import annotations

import io
import posixpath
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, UnidentifiedImageError

from .storage import read_uri

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NPY_EXTENSIONS = (".npy",)
CROP_LEVEL = 0.02  # pixels brighter than this (in [0, 1]) count as content when cropping
MAX_PIXELS = 400_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


UNKNOWN_FORMAT = "not a recognised image format (PNG, JPEG, TIFF, BMP or NPY expected)"


class ImageError(ValueError):
    """An image that cannot be decoded; the message says why."""


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


def decode_native(data: bytes, name: str) -> np.ndarray:
    """Decode file bytes into a grayscale image: uint8 for 8-bit sources, else float32 in [0, 1]."""
    if not data:
        raise ImageError("empty file (0 bytes)")
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
                raise ImageError(f"image too large ({img.width}x{img.height} pixels, limit {MAX_PIXELS})")
            img.load()
            return _pil_to_gray(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(UNKNOWN_FORMAT) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None


def decode(data: bytes, name: str) -> np.ndarray:
    """Decode file bytes (PNG, JPEG, TIFF, BMP, NPY) into a float32 grayscale image in [0, 1]."""
    arr = decode_native(data, name)
    return arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr


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


def load_image(uri: str, size: int = 64, storage_options: dict | None = None) -> np.ndarray:
    """Read, decode and preprocess one image."""
    return preprocess(decode_native(read_uri(uri, storage_options), uri), size)


def load_images(
    uris: list[str], size: int = 64, storage_options: dict | None = None, threads: int = 4
) -> tuple[np.ndarray, list[str | None]]:
    """Decode and preprocess many images in threads.

    Returns a float32 array (B, size, size) in [0, 1] and a per-image error (None when decoded);
    failed images are zero arrays.
    """
    out = np.zeros((len(uris), size, size), dtype=np.float32)
    errors: list[str | None] = [None] * len(uris)

    def one(i: int) -> None:
        try:
            out[i] = load_image(uris[i], size, storage_options)
        except FileNotFoundError:
            errors[i] = "file not found"
        except (ImageError, OSError) as exc:
            errors[i] = str(exc) or type(exc).__name__

    if threads <= 1 or len(uris) <= 1:
        for i in range(len(uris)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, range(len(uris))))
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
                return f"image too large ({img.width}x{img.height} pixels, limit {MAX_PIXELS})"
            if img.width < 1 or img.height < 1:
                return "empty image (0 pixels)"
            img.verify()
    except UnidentifiedImageError:
        return UNKNOWN_FORMAT
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"cannot decode image: {exc}"
    return None
