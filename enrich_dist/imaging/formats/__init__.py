"""Medical image formats: DICOM (pydicom) and NIfTI (nibabel), addressed frame by frame."""

from __future__ import annotations

import posixpath

DICOM_EXTENSIONS = (".dcm", ".dicom")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
DICOM_MAGIC = b"DICM"
DICOM_MAGIC_OFFSET = 128  # the 128-byte preamble, then "DICM"
SNIFF_BYTES = DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)
NIFTI_AXES = (0, 1, 2)


MAX_PIXELS = 400_000_000  # larger images (above 20000 x 20000) are refused, never decoded


class ImageError(ValueError):
    """An image that cannot be decoded; the message says why."""


class NotAnImage(Exception):
    """A readable file that holds no image (a DICOM report, a DICOMDIR); the manifest skips it."""


def extension(name: str) -> str:
    """Lower-case extension of a file name, ``.nii.gz`` counted as one."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    return posixpath.splitext(posixpath.basename(lower))[1]


def has_dicom_magic(head: bytes) -> bool:
    """Whether file bytes start with a DICOM Part 10 preamble and the ``DICM`` marker."""
    return head[DICOM_MAGIC_OFFSET:SNIFF_BYTES] == DICOM_MAGIC


def is_dicom(name: str, head: bytes = b"") -> bool:
    """A DICOM file by extension, or by its ``DICM`` marker whatever the name (``IM0001``, ``.IMA``)."""
    return extension(name) in DICOM_EXTENSIONS or has_dicom_magic(head)


def is_nifti(name: str) -> bool:
    """A NIfTI-1/2 single-file volume (``.nii`` or ``.nii.gz``)."""
    return extension(name) in NIFTI_EXTENSIONS


def check_axis(axis: int) -> int:
    """The NIfTI slicing axis, or a clear error."""
    if axis not in NIFTI_AXES:
        raise ValueError(f"nifti_axis must be 0 (sagittal), 1 (coronal) or 2 (axial), got {axis!r}")
    return axis
