"""NIfTI volumes: slices along a canonical axis, header-only frame counts, manifest rows per slice."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

from enrich_dist import imaging, schema
from enrich_dist.config import ManifestConfig
from enrich_dist.imaging.formats import nifti
from enrich_dist.manifest import run_manifest

NIBABEL_DATA = os.path.join(os.path.dirname(nib.__file__), "tests", "data")


def volume(shape=(6, 7, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16)


def save(path, data: np.ndarray, affine: np.ndarray | None = None, klass=nib.Nifti1Image) -> str:
    nib.save(klass(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def header_frames(path: str, axis: int) -> int:
    with open(path, "rb") as fh:
        return nifti.read_header(fh, path, axis)


def test_slices_follow_the_canonical_axis(tmp_path):
    data = volume()
    flip_x = np.diag([-1.0, 1.0, 1.0, 1.0])  # stored LAS: canonical RAS reverses the first axis
    path = save(tmp_path / "v.nii.gz", data, flip_x)
    raw = open(path, "rb").read()
    canonical = data[::-1].astype(np.float32)
    lo, hi = np.percentile(canonical, nifti.PERCENTILES)
    for axis in (0, 1, 2):
        assert header_frames(path, axis) == data.shape[axis]
        slices = nifti.NiftiSlices(raw, path, axis)
        assert slices.frames == data.shape[axis]
        for k in (0, data.shape[axis] - 1):
            expected = np.rot90(np.clip((np.take(canonical, k, axis=axis) - lo) / (hi - lo), 0, 1))
            np.testing.assert_allclose(slices(k), expected, atol=1e-5)
    with pytest.raises(imaging.ImageError, match="frame 5 out of range"):
        nifti.NiftiSlices(raw, path, 2)(5)
    with pytest.raises(ValueError, match="nifti_axis must be 0"):
        nifti.NiftiSlices(raw, path, 3)


def test_scaling_four_d_and_nifti2(tmp_path):
    data = volume((5, 6, 4, 3)).astype(np.float32)
    data[0, 0, 0, 0] = 1e6  # one hot voxel does not set the scale
    path = save(tmp_path / "t.nii", data, klass=nib.Nifti2Image)
    assert header_frames(path, 2) == 4 * 3
    slices = nifti.NiftiSlices(open(path, "rb").read(), path, 2)
    assert slices.frames == 12 and slices(11).shape == (6, 5)
    assert 0.3 < slices(0).mean() < 0.7
    np.testing.assert_allclose(slices(4 + 2), np.rot90(np.clip((data[:, :, 2, 1] - slices.lo) * slices.scale, 0, 1)))


def test_nibabel_test_volumes_header_agrees_with_decode():
    for name in ("anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz"):
        path = os.path.join(NIBABEL_DATA, name)
        assert os.path.isfile(path), f"{name} ships with nibabel"
        raw = open(path, "rb").read()
        for axis in (0, 2):
            n, slices = header_frames(path, axis), nifti.NiftiSlices(raw, path, axis)
            assert slices.frames == n and n % slices.slices == 0
            mid = slices.slices // 2  # the middle slice of the first volume
            images, errors = imaging.load_images([path] * 3, 32, frames=[0, mid, n - 1], nifti_axis=axis)
            assert errors == [None] * 3 and images[1].std() > 0


def test_bad_volumes(tmp_path):
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"\x00" * 400)
    with open(junk, "rb") as fh, pytest.raises(imaging.ImageError, match="not a NIfTI"):
        nifti.read_header(fh, str(junk), 2)
    flat = save(tmp_path / "flat.nii", volume((6, 1, 5)))
    with pytest.raises(imaging.ImageError, match="not 2-D images"):
        header_frames(flat, 2)  # slices of 6 x 1 voxels
    assert header_frames(flat, 1) == 1  # one 6 x 5 slice
    gz = tmp_path / "cut.nii.gz"
    gz.write_bytes(open(save(tmp_path / "whole.nii.gz", volume()), "rb").read()[:60])
    _, errors = imaging.load_images([str(gz)], 16, frames=[0])
    assert errors[0].startswith("cannot read NIfTI")


def test_manifest_rows_per_slice(ray_local, tmp_path, run_dir):
    root = tmp_path / "vols"
    root.mkdir()
    save(root / "a.nii.gz", volume((6, 7, 5)))
    save(root / "b.nii", volume((4, 4, 3), seed=1))
    stats = run_manifest(run_dir, str(root), ManifestConfig(nifti_axis=1))
    rows = run_dir.read_table(schema.MANIFEST_DIR).to_pylist()
    assert [r["frame"] for r in rows] == list(range(7)) + list(range(4))
    assert [r["clip_id"] for r in rows] == [str(root / "a.nii.gz")] * 7 + [str(root / "b.nii")] * 4
    assert {r["status"] for r in rows} == {"ok"} and stats["nifti_axis"] == 1
    assert imaging.manifest_nifti_axis(run_dir) == 1
