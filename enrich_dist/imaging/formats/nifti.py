"""NIfTI-1/2 volumes: header-only probes, and slices along one axis of the closest canonical (RAS+) orientation.

Axis 0 gives sagittal, 1 coronal, 2 axial slices whatever the voxel order on disk; a slice is
rotated so that the second remaining axis points up. Volumes with more than three dimensions (time
series) give every slice of every volume: frame = volume index x slices + slice. Intensities are
the scaled voxel values (scl_slope/scl_inter), mapped to [0, 1] between the 0.5th and 99.5th
percentiles of the whole file's finite voxels, so slices of one volume share one scale and a few hot
voxels do not darken the rest.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from typing import BinaryIO

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from . import ImageError, check_axis, extension

PERCENTILES = (0.5, 99.5)
HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}


def _image_class(head: bytes) -> type[nib.Nifti1Image]:
    """Nifti1Image or Nifti2Image, told by sizeof_hdr (either byte order)."""
    if len(head) >= 4:
        for order in "<>":
            klass = HEADER_SIZES.get(struct.unpack(order + "i", head[:4])[0])
            if klass is not None:
                return klass
    raise ImageError("not a NIfTI-1/2 file (sizeof_hdr is neither 348 nor 540)")


def _stream(fh: BinaryIO, name: str) -> BinaryIO:
    return gzip.GzipFile(fileobj=fh, mode="rb") if extension(name) == ".nii.gz" else fh


def _slicing(shape: tuple[int, ...], affine: np.ndarray, axis: int) -> tuple[int, int]:
    """(slices per volume along canonical ``axis``, volumes), checking that slices are 2-D images."""
    shape3 = tuple(shape[:3]) + (1,) * max(0, 3 - len(shape))
    ornt = nib.io_orientation(affine)
    canonical = [0, 0, 0]
    for voxel_axis, (out_axis, _) in enumerate(ornt):
        canonical[int(out_axis)] = shape3[voxel_axis]
    others = [n for a, n in enumerate(canonical) if a != axis]
    if min(others) < 2:
        raise ImageError(f"slices along axis {axis} of a {'x'.join(map(str, canonical))} volume are not 2-D images")
    return canonical[axis], math.prod(shape[3:])


def read_header(fh: BinaryIO, name: str, axis: int) -> int:
    """Number of frames (slices x volumes) along ``axis``, from the header only."""
    check_axis(axis)
    try:
        head = _stream(fh, name).read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise ImageError(f"cannot read NIfTI header: {exc}") from None
    klass = _image_class(head)
    size = klass.header_class.template_dtype.itemsize
    if len(head) < size:
        raise ImageError(f"truncated NIfTI header ({len(head)} of {size} bytes)")
    try:
        header = klass.header_class(head[:size])
        shape, affine = header.get_data_shape(), header.get_best_affine()
    except (HeaderDataError, ValueError) as exc:
        raise ImageError(f"invalid NIfTI header: {exc}") from None
    if not shape or min(shape) < 1:
        raise ImageError(f"NIfTI volume has an empty shape {shape}")
    slices, volumes = _slicing(shape, affine, axis)
    return slices * volumes


class NiftiSlices:
    """A NIfTI volume read once, reoriented to RAS+ and scaled; slices on demand."""

    def __init__(self, data: bytes, name: str, axis: int):
        self.axis = check_axis(axis)
        try:
            raw = gzip.decompress(data) if extension(name) == ".nii.gz" else data
            img = _image_class(raw[:4]).from_bytes(raw)
            img = nib.as_closest_canonical(img)
            vol = np.asarray(img.get_fdata(dtype=np.float32))
        except ImageError:
            raise
        except (OSError, EOFError, zlib.error, ValueError, HeaderDataError, ImageFileError) as exc:
            raise ImageError(f"cannot read NIfTI volume: {exc}") from None
        self.slices, volumes = _slicing(vol.shape, np.eye(4), self.axis)
        self.volume = vol.reshape(*vol.shape[:3], volumes) if vol.ndim >= 3 else vol.reshape(*vol.shape, 1, 1)
        self.frames = self.slices * volumes
        finite = self.volume[np.isfinite(self.volume)]
        if finite.size == 0:
            raise ImageError("NIfTI volume has no finite voxel values")
        lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES))
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
        self.lo, self.scale = lo, (1.0 / (hi - lo) if hi > lo else 0.0)

    def __call__(self, frame: int | None = None) -> np.ndarray:
        """Slice ``frame`` (0-based, volume-major; None is the first) as grayscale in [0, 1]."""
        index = 0 if frame is None else int(frame)
        if not 0 <= index < self.frames:
            raise ImageError(f"frame {frame} out of range: the volume has {self.frames} slices along axis {self.axis}")
        volume, position = divmod(index, self.slices)
        plane = np.take(self.volume[..., volume], position, axis=self.axis)
        plane = np.nan_to_num(plane, nan=self.lo, posinf=self.lo, neginf=self.lo)
        out = np.clip((plane - self.lo) * self.scale, 0.0, 1.0)
        return np.ascontiguousarray(np.rot90(out), dtype=np.float32)

