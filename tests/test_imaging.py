"""Decoding, grayscale, crop and resize of many image kinds."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from enrich_dist import imaging


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_uint8_gray_scaled_to_unit():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = imaging.decode(png(arr), "x.png")
    assert out.dtype == np.float32 and out.shape == (16, 16)
    np.testing.assert_allclose(out, arr / 255.0, atol=1e-7)


def test_rgb_and_rgba_to_luma():
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255
    out = imaging.decode(png(rgb), "x.png")
    np.testing.assert_allclose(out, 0.299, atol=2e-3)
    rgba = np.concatenate([rgb, np.full((4, 5, 1), 7, np.uint8)], axis=2)
    np.testing.assert_allclose(imaging.decode(png(rgba), "x.png"), out)


def test_sixteen_bit_uses_full_range():
    arr = np.zeros((8, 8), np.uint16)
    arr[0, 0] = 4095  # 12-bit data in a 16-bit container
    out = imaging.decode(png(arr), "x.png")
    assert out.max() == pytest.approx(1.0) and out.min() == 0.0


def test_palette_image():
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert imaging.decode(buf.getvalue(), "p.png").shape == (8, 8)


def test_npy_and_constant_image():
    buf = io.BytesIO()
    np.save(buf, np.full((5, 6), 3.0))
    out = imaging.decode(buf.getvalue(), "c.npy")
    assert out.shape == (5, 6) and not out.any()


@pytest.mark.parametrize(
    "data, name, message",
    [
        (b"", "a.png", "empty file"),
        (b"not an image", "a.png", "not a recognised image format"),
        (b"\x93NUMPY garbage", "a.npy", "not a readable .npy"),
    ],
)
def test_bad_files_raise_image_error(data, name, message):
    with pytest.raises(imaging.ImageError, match=message):
        imaging.decode(data, name)
    assert message in imaging.probe(data, name)


def test_truncated_png_caught_by_probe_and_decode():
    data = png((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    half = data[: len(data) // 2]
    assert imaging.probe(half, "t.png") is not None
    with pytest.raises(imaging.ImageError):
        imaging.decode(half, "t.png")
    assert imaging.probe(data, "t.png") is None


def test_crop_removes_black_border_and_keeps_aspect():
    img = np.zeros((100, 200), np.float32)
    img[20:40, 50:90] = 1.0  # a 20 x 40 bright box
    out = imaging.crop_to_content(img)
    assert out.shape == (40, 40)
    assert out[10:30].all() and not out[:10].any() and not out[30:].any()


def test_preprocess_size_and_range():
    img = np.random.default_rng(1).random((300, 400)).astype(np.float32)
    out = imaging.preprocess(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # area averaging preserves brightness; the square padding adds 100 black rows to 300 x 400
    assert abs(out.mean() - img.mean() * 300 / 400) < 0.01


def test_load_images_reports_errors_per_file(tmp_path):
    good = tmp_path / "g.png"
    good.write_bytes(png(np.full((10, 10), 200, np.uint8)))
    bad = tmp_path / "b.png"
    bad.write_bytes(b"junk")
    images, errors = imaging.load_images([str(good), str(bad), str(tmp_path / "missing.png")], size=8, threads=2)
    assert images.shape == (3, 8, 8)
    assert errors[0] is None and "recognised" in errors[1] and errors[2] == "file not found"
    assert images[0].min() > 0.7 and not images[1].any()
