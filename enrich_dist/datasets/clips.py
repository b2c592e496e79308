"""Labelled image sets made into clips, for benchmarks of redundancy measures (nothing is downloaded).

Three sources, each returned as a :class:`ClipSet` of float32 images (N, size, size) in [0, 1]:

- :func:`digits_clips`: scikit-learn's bundled digits (1,797 real 8x8 images, labels 0-9), each
  upscaled and turned into a clip by small shifts, rotations, gain changes and noise;
- :func:`deid_cine_frames`: the real echo cine DICOMs that deid-data ships, frame by frame, mixed with
  single-image distractors from deid-data and pydicom's test files;
- :func:`echo_clips`: the synthetic echo archive of :mod:`enrich_dist.datasets.echo`, in memory.

DICOM and echo frames go through :mod:`enrich_dist.imaging` exactly as the pipeline's embed stage
reads them (decode to grayscale, crop to content, resize).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .. import imaging
from .echo import plan_archive, render_clip

DIGIT_SIZE = 64
DIGIT_SHIFT = 3.0  # pixels (at 64x64), each way, drawn uniformly per frame
DIGIT_ROTATION = 5.0  # degrees, each way
DIGIT_GAIN = 0.1  # the frame is multiplied by 1 +- this
DIGIT_NOISE = 0.03  # standard deviation of added Gaussian noise
UNEVEN_SHARE = 0.2  # uneven digits: this share of the sources gets UNEVEN_LONG frames, the rest UNEVEN_SHORT
UNEVEN_LONG = (10, 40)
UNEVEN_SHORT = (1, 2)

# deid-data's cine DICOMs in its "ultrasounds" data set: (file, the DICOM inside it when it is a zip).
DEID_CINES = (
    ("ultrasound-multiframe.dcm", None),
    ("GREYSCALE_CINE.zip", "GREYSCALE_CINE.dcm"),
    ("RGB_CINE.zip", "RGB_CINE.dcm"),
)
# Single images beside them, (deid-data set, file) and pydicom test files: ultrasound stills (the hard
# distractors), then other modalities.
DEID_STILLS = (
    ("ultrasounds", "GREYSCALE_IMAGE.dcm"),
    ("ultrasounds", "RGB_IMAGE.dcm"),
    ("animals", "cat.dcm"),
)
PYDICOM_STILLS = (
    "US1_UNCR.dcm",
    "OBXXXX1A.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "examples_rgb_color.dcm",
    "examples_palette.dcm",
    "color-pl.dcm",
    "RG1_UNCR.dcm",
    "CT_small.dcm",
    "MR_small.dcm",
    "693_UNCR.dcm",
    "MR2_UNCR.dcm",
)


@dataclass(frozen=True)
class ClipSet:
    """Images with, per image, its label, clip, frame index within the clip and patient."""

    images: np.ndarray
    labels: np.ndarray
    clip_ids: np.ndarray
    frames: np.ndarray
    patient_ids: np.ndarray
    name: str

    def __len__(self) -> int:
        """The number of images."""
        return len(self.images)


def digits_clips(
    frames_per_clip: int = 5,
    *,
    uneven: bool = False,
    n_sources: int | None = None,
    seed: int = 0,
) -> ClipSet:
    """scikit-learn's digits upscaled to 64x64, each source a clip; frame 0 is the clean source.

    Every other frame is the source shifted, rotated, scaled in gain and noised, independently per
    frame. Clips hold ``frames_per_clip`` frames, or with ``uneven`` a fifth of the sources 10-40
    frames and the rest 1-2. ``n_sources`` takes a random subset of the 1,797 sources. Patient = source.
    """
    if frames_per_clip < 1:
        raise ValueError(f"frames_per_clip must be >= 1, got {frames_per_clip}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("digits_clips needs scikit-learn (pip install scikit-learn)") from exc
    digits = load_digits()
    n_all = len(digits.images)
    if n_sources is not None and not 1 <= n_sources <= n_all:
        raise ValueError(f"n_sources must be in 1..{n_all}, got {n_sources}")
    rng = np.random.default_rng(seed)
    sources = np.arange(n_all) if n_sources is None else np.sort(rng.choice(n_all, n_sources, replace=False))
    if uneven:
        counts = rng.integers(UNEVEN_SHORT[0], UNEVEN_SHORT[1] + 1, len(sources))
        long = rng.permutation(len(sources))[: round(UNEVEN_SHARE * len(sources))]
        counts[long] = rng.integers(UNEVEN_LONG[0], UNEVEN_LONG[1] + 1, len(long))
    else:
        counts = np.full(len(sources), frames_per_clip)
    images = np.empty((int(counts.sum()), DIGIT_SIZE, DIGIT_SIZE), np.float32)
    row = 0
    for source, count in zip(sources.tolist(), counts.tolist(), strict=True):
        clean = _upscale(digits.images[source] / 16.0)  # digit pixels are 0..16
        images[row] = clean
        for i in range(1, count):
            images[row + i] = _perturb(clean, rng)
        row += count
    ids = np.asarray([f"digit-{s:04d}" for s in sources])
    return ClipSet(
        images=images,
        labels=np.repeat(np.asarray([str(t) for t in digits.target[sources]]), counts),
        clip_ids=np.repeat(ids, counts),
        frames=np.concatenate([np.arange(c, dtype=np.int32) for c in counts.tolist()]),
        patient_ids=np.repeat(ids, counts),
        name="digits-uneven" if uneven else f"digits-{frames_per_clip}",
    )


def deid_cine_frames(size: int = 64) -> ClipSet:
    """Every frame of deid-data's three real echo cines, one clip per file, among single-image distractors.

    Labels are the DICOM Modality (``US`` for the cines); a distractor is a clip of one image, and
    the patient is the file.
    """
    from deid_data.data import get_dataset
    from pydicom.data import get_testdata_file

    from ..imaging.formats.dicom import DicomFrames

    folder = get_dataset("ultrasounds")
    sources: list[tuple[str, bytes]] = []
    for name, member in DEID_CINES:
        path = os.path.join(folder, name)
        if member is None:
            with open(path, "rb") as fh:
                sources.append((name, fh.read()))
        else:
            with zipfile.ZipFile(path) as zf:
                sources.append((member, zf.read(member)))
    for kind, name in DEID_STILLS:
        with open(os.path.join(get_dataset(kind), name), "rb") as fh:
            sources.append((name, fh.read()))
    for name in PYDICOM_STILLS:
        with open(get_testdata_file(name), "rb") as fh:
            sources.append((name, fh.read()))
    images, labels, clip_ids, frames = [], [], [], []
    for name, data in sources:
        dicom = DicomFrames(data)
        clip = os.path.splitext(name)[0]
        for f in range(dicom.frames):
            images.append(imaging.preprocess(dicom(f), size))
            labels.append(str(dicom.ds.get("Modality", "OT")))
            clip_ids.append(clip)
            frames.append(f)
    return ClipSet(
        images=np.stack(images),
        labels=np.asarray(labels),
        clip_ids=np.asarray(clip_ids),
        frames=np.asarray(frames, np.int32),
        patient_ids=np.asarray(clip_ids),
        name="deid-cine",
    )


def echo_clips(n_images: int = 600, profile: str = "uniform", seed: int = 0, size: int = 64) -> ClipSet:
    """The synthetic echo archive rendered in memory and preprocessed as the pipeline reads its PNGs.

    Labels are the views (``A4C``, ``SAX``, ``3VV``, and ``LVOT`` in the uneven profile); the
    archive's manifest label is ``A4C`` or ``NT`` (every other view).
    """
    plans = plan_archive(n_images, seed, profile)
    images = np.empty((n_images, size, size), np.float32)
    row = 0
    for plan in plans:
        rendered, _ = render_clip(plan.patient, plan.clip, plan.n_frames, plan.rng_seed)
        for frame in rendered:
            images[row] = imaging.preprocess(frame, size)
            row += 1
    counts = [p.n_frames for p in plans]
    return ClipSet(
        images=images,
        labels=np.repeat(np.asarray([p.clip.view for p in plans]), counts),
        clip_ids=np.repeat(np.asarray([p.clip_id for p in plans]), counts),
        frames=np.concatenate([np.arange(c, dtype=np.int32) for c in counts]),
        patient_ids=np.repeat(np.asarray([p.patient_id for p in plans]), counts),
        name=f"echo-{profile}",
    )


def _upscale(image: np.ndarray) -> np.ndarray:
    """A small image in [0, 1] resized (bicubic) to DIGIT_SIZE x DIGIT_SIZE, float32 in [0, 1]."""
    big = Image.fromarray(image.astype(np.float32)).resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(big), 0.0, 1.0)


def _perturb(clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One frame of a digit clip: the clean image rotated, shifted, scaled in gain and noised."""
    angle, dx, dy = (rng.uniform(-1, 1, 3) * (DIGIT_ROTATION, DIGIT_SHIFT, DIGIT_SHIFT)).tolist()
    moved = np.asarray(Image.fromarray(clean).rotate(angle, Image.Resampling.BILINEAR, translate=(dx, dy)))
    gain = 1.0 + rng.uniform(-DIGIT_GAIN, DIGIT_GAIN)
    noisy = moved * np.float32(gain) + rng.normal(0.0, DIGIT_NOISE, moved.shape).astype(np.float32)
    return np.clip(noisy, 0.0, 1.0)
