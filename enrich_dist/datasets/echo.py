"""A seeded synthetic fetal-echocardiography archive at the paper's shape (ECHO-F).

Patients -> clips -> consecutive frames. Each frame is a 300x400 grayscale ultrasound sector with
speckle; anatomy and gain are per patient, probe pose per clip. Frame to frame the heart beats, the
probe drifts (a slow walk of a few pixels and a fraction of a degree), the gain wanders by a few per
cent and part of the speckle is fresh, so frames of one clip are similar but never identical, and
clips of one patient are similar. Two labels: ``A4C`` (apical four-chamber view) and ``NT``
(non-target views: a short-axis ring ``SAX``, the three-vessel view ``3VV`` and, in the ``uneven``
profile only, a rare outflow-tract view ``LVOT``). Masks hold 0 for background and 1..4 for the
chambers named in :data:`CHAMBERS`; NT frames have all-zero masks, because the four-chamber
segmentation task is defined on A4C frames only.

Profiles: ``uniform`` (the default) keeps the paper's averages, about 10.5 frames per clip and 4.7
clips per patient, with little spread; ``uneven`` is redundancy as raw archives hold it: clips of
10-200 frames and patients of 1-40 clips, both heavy-tailed, and a rare view.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import multiprocessing
import os
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from ..storage import RunDir

logger = logging.getLogger("enrich_dist.datasets")

HEIGHT, WIDTH = 300, 400
CHAMBERS = ("LV", "RV", "LA", "RA")
VIEWS = ("A4C", "SAX", "3VV", "LVOT")
PROFILES = ("uniform", "uneven")
MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS = ("uri", "mask_uri", "patient_id", "clip_id", "frame", "label", "split")

# ECHO-F training set in the paper: 45,460 images (20,378 A4C), 933 patients, 4,344 clips.
FRAMES_PER_CLIP = 45460 / 4344
CLIPS_PER_PATIENT = 4344 / 933
A4C_FRACTION = 20378 / 45460
TEST_FRACTION = 0.15
# The uneven profile: inclusive ranges of truncated power laws (P(x) ~ x^-2), and the rare view's share
# of images (at least one clip of it whenever two NT clips exist).
UNEVEN_FRAMES_PER_CLIP = (10, 200)
UNEVEN_CLIPS_PER_PATIENT = (1, 40)
RARE_VIEW = "LVOT"
RARE_FRACTION = 0.02

APEX_X, APEX_Y = WIDTH / 2, 8.0
SECTOR_RADIUS = 282.0
SECTOR_HALF_ANGLE = math.radians(40.0)
BLOOD = 0.05
FLUID = 0.06
EDGE = 0.08
SPECKLE_BANK_SEED = 20240101
SPECKLE_CONTRAST = 0.55
# Share of the speckle bound to the tissue (it moves with the probe); the rest is fresh in every frame.
SPECKLE_MEMORY = 0.6
# Probe drift over a clip: a random walk from frame 0's pose, scaled so that its farthest point is a
# shift of DRIFT_PIXELS and a tilt about the probe apex of DRIFT_DEGREES (both drawn per clip).
DRIFT_PIXELS = (1.0, 4.0)
DRIFT_DEGREES = (0.1, 0.6)
# Gain per frame: 1 at frame 0, then an AR(1) walk with this spread and lag-1 correlation.
FRAME_GAIN_SD = 0.03
FRAME_GAIN_MEMORY = 0.7
WRITE_THREADS = 8
# Heart body (myocardium and pericardium around the chambers): centre and radii in heart units.
HEART_BODY = {
    "A4C": ((0.0, -0.2), (0.9, 1.2)),
    "SAX": ((-0.05, 0.02), (0.85, 0.8)),
    "LVOT": ((0.0, -0.15), (0.85, 1.15)),
}


@dataclass(frozen=True)
class PatientParams:
    """Anatomy and machine settings shared by every clip of one patient."""

    heart_size: float
    aspect: float
    chamber_scale: tuple[float, float, float, float]
    wall: float
    wall_brightness: float
    tissue_brightness: float
    thorax_scale: float
    maternal_depth: float
    orientation: float
    position: tuple[float, float]
    gain: float
    beat_frames: float
    motion: float


@dataclass(frozen=True)
class ClipParams:
    """View and probe pose of one clip."""

    view: str
    rotation: float
    center: tuple[float, float]
    depth: float
    phase: float

    @property
    def label(self) -> str:
        """``A4C`` or ``NT``."""
        return "A4C" if self.view == "A4C" else "NT"


@dataclass(frozen=True)
class _Blob:
    """One blood pool with its wall, in heart units (u to the right, w down)."""

    center: tuple[float, float]
    radii: tuple[float, float]
    group: str
    wall: float
    mask_value: int
    carved: bool = False


@dataclass(frozen=True)
class _ClipPlan:
    """Everything a worker needs to render and write one clip."""

    patient_id: str
    clip_id: str
    label: str
    split: str
    n_frames: int
    rng_seed: int
    patient: PatientParams
    clip: ClipParams


def sample_patient(rng: np.random.Generator) -> PatientParams:
    """Draw one patient's anatomy and gain."""
    return PatientParams(
        heart_size=float(rng.uniform(48.0, 66.0)),
        aspect=float(rng.uniform(0.9, 1.1)),
        chamber_scale=tuple(float(s) for s in rng.uniform(0.85, 1.15, 4)),
        wall=float(rng.uniform(0.25, 0.45)),
        wall_brightness=float(rng.uniform(0.65, 0.95)),
        tissue_brightness=float(rng.uniform(0.22, 0.38)),
        thorax_scale=float(rng.uniform(1.6, 2.0)),
        maternal_depth=float(rng.uniform(30.0, 60.0)),
        orientation=float(rng.uniform(-0.7, 0.7)),
        position=(float(APEX_X + rng.normal(0.0, 16.0)), float(165.0 + rng.normal(0.0, 12.0))),
        gain=float(rng.uniform(0.75, 1.25)),
        beat_frames=float(rng.uniform(9.0, 16.0)),
        motion=float(rng.uniform(0.15, 0.21)),  # radii swing 1 +- m: fractional shortening 2m/(1+m), 26-35 %
    )


def sample_clip(rng: np.random.Generator, patient: PatientParams, view: str) -> ClipParams:
    """Draw one clip's probe pose around the patient's fetal orientation and position."""
    return ClipParams(
        view=view,
        rotation=float(patient.orientation + rng.normal(0.0, 0.12)),
        center=(
            float(patient.position[0] + rng.normal(0.0, 8.0)),
            float(patient.position[1] + rng.normal(0.0, 6.0)),
        ),
        depth=float(rng.uniform(0.9, 1.1)),
        phase=float(rng.uniform(0.0, 2 * math.pi)),
    )


def render_clip(
    patient: PatientParams, clip: ClipParams, n_frames: int, rng_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 (F,300,400), masks uint8 (F,300,400) with 0=background, 1..4 = four chambers)."""
    if clip.view not in VIEWS:
        raise ValueError(f"unknown view {clip.view!r}; known: {VIEWS}")
    rng = np.random.default_rng(rng_seed)
    shift_x, shift_y, tilt, frame_gain = _frame_motion(np.random.default_rng([rng_seed, 1]), n_frames)
    pose = _Pose(patient, clip)
    u, w = pose.heart_coords()
    sector = _sector_gain()
    visible = sector > 0
    gain = sector * np.float32(patient.gain * 255.0)
    static = _static_tissue(patient, clip.view, pose, u, w)
    bound_weight = np.float32(SPECKLE_CONTRAST * SPECKLE_MEMORY)
    bound = (1 - bound_weight) + bound_weight * _bank_crop(rng)
    lit = static * bound
    blobs = _layout(patient, clip.view)
    window = _window(blobs, pose, patient.motion)
    u, w = u[window], w[window]
    rhos = [np.hypot((u - b.center[0]) / b.radii[0], (w - b.center[1]) / b.radii[1]) for b in blobs]
    static_heart, bound_heart = static[window], bound[window]
    fresh_weight = np.float32(SPECKLE_CONTRAST * (1 - SPECKLE_MEMORY))

    frames = np.empty((n_frames, HEIGHT, WIDTH), np.uint8)
    masks = np.empty((n_frames, HEIGHT, WIDTH), np.uint8)
    for t in range(n_frames):
        beat = patient.motion * math.cos(clip.phase + 2 * math.pi * t / patient.beat_frames)
        swell = {"v": 1 + beat, "a": 1 - 0.8 * beat, "g": 1 + 0.4 * beat}
        blood = np.zeros(rhos[0].shape, np.float32)
        myo = np.zeros_like(blood)
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        for blob, rho in zip(blobs, rhos, strict=True):
            s = swell[blob.group]
            inner = np.clip((s + EDGE / 2 - rho) / EDGE, 0.0, 1.0)
            outer = np.clip((s * (1 + blob.wall) + EDGE / 2 - rho) / EDGE, 0.0, 1.0)
            if blob.carved:
                inner *= 1.0 - myo
            np.maximum(blood, inner, out=blood)
            np.maximum(myo, outer, out=myo)
            if blob.mask_value:
                mask[window][rho < s] = blob.mask_value
        anatomy = lit.copy()
        heart = np.float32(patient.wall_brightness) * (1.0 - blood) + np.float32(BLOOD) * blood
        anatomy[window] = (static_heart * (1.0 - myo) + myo * heart) * bound_heart
        tissue = _move(anatomy, shift_x[t], shift_y[t], tilt[t])
        tissue *= gain
        speckle = _bank_crop(rng) * np.float32(fresh_weight * frame_gain[t])
        speckle += np.float32((1 - fresh_weight) * frame_gain[t])
        tissue *= speckle
        np.minimum(tissue, 255.0, out=tissue)
        frames[t] = tissue
        np.multiply(_move(mask, shift_x[t], shift_y[t], tilt[t], nearest=True), visible, out=masks[t])
    return frames, masks


def make_echo_archive(
    out: str,
    n_images: int = 3000,
    seed: int = 0,
    *,
    profile: str = "uniform",
    storage_options: dict | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Write PNG frames, PNG masks and manifest.csv under ``out``; return image counts and seconds.

    ``profile`` is ``uniform`` (the paper's averages) or ``uneven`` (heavy-tailed clips and patients, a
    rare view); see the module docstring.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.perf_counter()
    plans = plan_archive(n_images, seed, profile)
    run = RunDir(out, storage_options)
    run.remove(MANIFEST_NAME)
    n_chunks = min(len(plans), max(20, 4 * workers))
    bounds = np.linspace(0, len(plans), n_chunks + 1).round().astype(int)
    chunks = [plans[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    done, next_report = 0, 0.1
    for count in _run_chunks(run, chunks, min(workers, len(chunks))):
        done += count
        if progress and done >= next_report * n_images:
            logger.info(
                "echo archive: %d/%d frames (%.0f%%) in %.1fs",
                done,
                n_images,
                100.0 * done / n_images,
                time.perf_counter() - start,
            )
            next_report = math.floor(10 * done / n_images) / 10 + 0.1
    run.write_bytes(MANIFEST_NAME, _manifest_csv(plans))
    stats = {
        "n_images": n_images,
        "n_patients": len({p.patient_id for p in plans}),
        "n_clips": len(plans),
        "n_a4c": sum(p.n_frames for p in plans if p.label == "A4C"),
        "n_nt": sum(p.n_frames for p in plans if p.label == "NT"),
        "n_train": sum(p.n_frames for p in plans if p.split == "train"),
        "n_test": sum(p.n_frames for p in plans if p.split == "test"),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if progress:
        logger.info("echo archive written to %s: %s", run.uri, stats)
    return stats


def archive_shape(n_images: int) -> tuple[int, int]:
    """(n_patients, n_clips) keeping the paper's frames-per-clip and clips-per-patient ratios."""
    n_clips = max(1, round(n_images / FRAMES_PER_CLIP))
    return max(1, round(n_clips / CLIPS_PER_PATIENT)), n_clips


def plan_archive(n_images: int, seed: int, profile: str = "uniform") -> list[_ClipPlan]:
    """Every clip of the archive with its patient, view, split, frame count and speckle seed."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {PROFILES}")
    rng = np.random.default_rng(seed)
    if profile == "uniform":
        n_patients, n_clips = archive_shape(n_images)
        frames = split_counts(n_images, rng.uniform(0.5, 1.5, n_clips))
        clips_per_patient = split_counts(n_clips, rng.uniform(0.5, 1.5, n_patients))
    else:
        frames = heavy_tailed_counts(n_images, *UNEVEN_FRAMES_PER_CLIP, rng)
        clips_per_patient = heavy_tailed_counts(len(frames), *UNEVEN_CLIPS_PER_PATIENT, rng)
        n_patients, n_clips = len(clips_per_patient), len(frames)
    patients = [sample_patient(rng) for _ in range(n_patients)]
    is_a4c = _choose_a4c(frames, rng)
    views = rng.choice(["SAX", "3VV"], n_clips).astype(object)
    views[is_a4c] = "A4C"
    if profile == "uneven":
        views[_choose_rare(frames, np.flatnonzero(~is_a4c), rng)] = RARE_VIEW
    n_test = 0 if n_patients == 1 else min(n_patients - 1, max(1, round(TEST_FRACTION * n_patients)))
    test = set(rng.permutation(n_patients)[:n_test].tolist())
    seeds = rng.integers(0, 2**63 - 1, n_clips)
    owner = np.repeat(np.arange(n_patients), clips_per_patient)
    width = max(4, len(str(n_patients)))
    plans = []
    for c in range(n_clips):
        p = int(owner[c])
        patient_id = f"P{p + 1:0{width}d}"
        clip = sample_clip(rng, patients[p], str(views[c]))
        clip_no = c - int(np.searchsorted(owner, p))
        plans.append(
            _ClipPlan(
                patient_id,
                f"{patient_id}-C{clip_no + 1:02d}",
                clip.label,
                "test" if p in test else "train",
                int(frames[c]),
                int(seeds[c]),
                patients[p],
                clip,
            )
        )
    return plans


def heavy_tailed_counts(total: int, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """Counts in [low, high] from a truncated power law (P(x) ~ x^-2) that add up to ``total``.

    Draws until the sum reaches ``total`` and cuts the last count; a cut count below ``low`` joins the
    smallest other one when that stays within ``high``.
    """
    n = total // low + 1
    x = 1.0 / (1.0 / low - rng.random(n) * (1.0 / low - 1.0 / (high + 1)))
    reached = np.cumsum(np.floor(x).astype(np.int64).clip(low, high))
    last = int(np.searchsorted(reached, total))
    counts = np.diff(reached[: last + 1], prepend=0)
    counts[-1] = total - (reached[last - 1] if last else 0)
    smallest = int(np.argmin(counts[:-1])) if last else 0
    if last and counts[-1] < low and counts[smallest] + counts[-1] <= high:
        counts[smallest] += counts[-1]
        counts = counts[:-1]
    return counts


def split_counts(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into ``len(weights)`` parts >= 1 proportional to ``weights`` (largest remainder)."""
    n = len(weights)
    shares = weights / weights.sum() * (total - n)
    counts = np.floor(shares).astype(np.int64)
    leftover = total - n - int(counts.sum())
    counts[np.argsort(-(shares - counts), kind="stable")[:leftover]] += 1
    return counts + 1


def _choose_a4c(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mark random clips A4C until their frames come closest to the paper's A4C share."""
    order = rng.permutation(len(frames))
    reached = np.concatenate([[0], np.cumsum(frames[order])])
    k = int(np.argmin(np.abs(reached - A4C_FRACTION * frames.sum())))
    is_a4c = np.zeros(len(frames), bool)
    is_a4c[order[:k]] = True
    return is_a4c


def _choose_rare(frames: np.ndarray, candidates: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Random candidate clips whose frames stay within the rare view's share, at least one (the shortest).

    None when fewer than two candidates exist, so that the common views stay.
    """
    if len(candidates) < 2:
        return []
    budget = RARE_FRACTION * frames.sum()
    chosen, total = [], 0
    for c in rng.permutation(candidates).tolist():
        if total + frames[c] <= budget:
            chosen.append(c)
            total += int(frames[c])
    return chosen or [int(candidates[np.argmin(frames[candidates])])]


def _layout(patient: PatientParams, view: str) -> list[_Blob]:
    """The blood pools of a view, sized by the patient's chamber proportions."""
    lv, rv, la, ra = patient.chamber_scale
    wall = patient.wall
    if view == "A4C":
        return [
            _Blob((0.42, -0.56), (0.30 * lv, 0.50 * lv), "v", wall, 1),
            _Blob((-0.42, -0.52), (0.32 * rv, 0.46 * rv), "v", wall * 0.8, 2),
            _Blob((0.40, 0.40), (0.30 * la, 0.27 * la), "a", wall * 0.6, 3),
            _Blob((-0.40, 0.40), (0.31 * ra, 0.28 * ra), "a", wall * 0.6, 4),
        ]
    if view == "SAX":
        return [
            _Blob((0.15, 0.0), (0.40 * lv, 0.40 * lv), "v", wall * 1.6, 0),
            _Blob((-0.45, 0.05), (0.40 * rv, 0.60 * rv), "v", wall * 0.5, 0, carved=True),
        ]
    if view == "LVOT":
        return [
            _Blob((0.30, -0.45), (0.30 * lv, 0.55 * lv), "v", wall, 0),
            _Blob((-0.48, -0.40), (0.26 * rv, 0.42 * rv), "v", wall * 0.8, 0),
            _Blob((0.02, 0.30), (0.14 * lv, 0.42 * lv), "g", 0.35, 0),
        ]
    vessel = (lv + rv) / 2
    return [
        _Blob((-0.55, -0.25), (0.26 * vessel, 0.26 * vessel), "g", 0.35, 0),
        _Blob((0.0, 0.0), (0.20 * vessel, 0.20 * vessel), "g", 0.35, 0),
        _Blob((0.42, 0.2), (0.13 * vessel, 0.13 * vessel), "g", 0.45, 0),
    ]


class _Pose:
    """Where the heart sits in the image: centre, scale (pixels per heart unit), rotation."""

    def __init__(self, patient: PatientParams, clip: ClipParams):
        self.cx, self.cy = clip.center
        self.scale = patient.heart_size / clip.depth
        self.aspect = patient.aspect
        self.cos, self.sin = math.cos(clip.rotation), math.sin(clip.rotation)

    def heart_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Every pixel in heart units (u to the heart's right, w towards the atria)."""
        x, y, _, _ = _polar_grid()
        dx, dy = x - np.float32(self.cx), y - np.float32(self.cy)
        u = (dx * self.cos + dy * self.sin) / np.float32(self.scale * self.aspect)
        w = (dy * self.cos - dx * self.sin) / np.float32(self.scale)
        return u, w

    def to_pixels(self, u: float, w: float) -> tuple[float, float]:
        """Image (x, y) of a point in heart units."""
        du, dw = u * self.scale * self.aspect, w * self.scale
        return self.cx + du * self.cos - dw * self.sin, self.cy + du * self.sin + dw * self.cos


def _window(blobs: list[_Blob], pose: _Pose, motion: float) -> tuple[slice, slice]:
    """The image rows and columns any blob's wall can reach during the beat."""
    top, left, bottom, right = HEIGHT, WIDTH, 0, 0
    for blob in blobs:
        x, y = pose.to_pixels(*blob.center)
        reach = (
            pose.scale * max(pose.aspect, 1.0) * (max(blob.radii) * (1 + motion) * (1 + blob.wall) + EDGE) + 2
        )
        top, bottom = min(top, math.floor(y - reach)), max(bottom, math.ceil(y + reach))
        left, right = min(left, math.floor(x - reach)), max(right, math.ceil(x + reach))
    top, left = min(max(top, 0), HEIGHT), min(max(left, 0), WIDTH)
    return slice(top, max(top, min(bottom, HEIGHT))), slice(left, max(left, min(right, WIDTH)))


def _frame_motion(rng: np.random.Generator, n_frames: int) -> tuple[np.ndarray, ...]:
    """Per frame: probe drift from frame 0 (x and y shift in pixels, tilt in radians) and gain factor."""
    walk = np.zeros((n_frames, 3))
    walk[1:] = np.cumsum(rng.standard_normal((n_frames - 1, 3)), axis=0)
    reach = max(float(np.hypot(walk[:, 0], walk[:, 1]).max()), 1e-9)
    turn = max(float(np.abs(walk[:, 2]).max()), 1e-9)
    walk[:, :2] *= rng.uniform(*DRIFT_PIXELS) / reach
    walk[:, 2] *= math.radians(rng.uniform(*DRIFT_DEGREES)) / turn
    kicks = rng.standard_normal(n_frames) * FRAME_GAIN_SD * math.sqrt(1 - FRAME_GAIN_MEMORY**2)
    gain = np.ones(n_frames)
    for t in range(1, n_frames):
        gain[t] = 1 + FRAME_GAIN_MEMORY * (gain[t - 1] - 1) + kicks[t]
    return walk[:, 0], walk[:, 1], walk[:, 2], gain


def _move(image: np.ndarray, dx: float, dy: float, tilt: float, nearest: bool = False) -> np.ndarray:
    """The image's content tilted about the probe apex and shifted right by dx and down by dy pixels.

    Two shears (each column down, then each row right, by its own amount) stand in for the small
    rotation; values between pixels are interpolated linearly, or taken from the nearest pixel.
    """
    down = dy + tilt * (np.arange(WIDTH) - APEX_X)
    right = dx - tilt * (np.arange(HEIGHT) - APEX_Y)
    return _shift_rows(_shift_rows(image.T, down, nearest).T, right, nearest)


def _shift_rows(image: np.ndarray, shift: np.ndarray, nearest: bool) -> np.ndarray:
    """Each row moved right by its own shift in pixels; zeros come in at the edge."""
    if nearest:
        return _shift_rows_whole(image, np.floor(shift + 0.5).astype(np.int64))
    whole = np.floor(shift).astype(np.int64)
    near = _shift_rows_whole(image, whole)
    out = _shift_rows_whole(image, whole + 1)
    out -= near
    out *= (shift - whole).astype(np.float32)[:, None]
    out += near
    return out


def _shift_rows_whole(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Each row moved right by its own whole number of pixels; runs of rows with one shift move as a block."""
    out = np.zeros_like(image)
    width = image.shape[1]
    edges = (np.flatnonzero(np.diff(shift)) + 1).tolist()
    for start, stop in zip([0, *edges], [*edges, len(shift)], strict=True):
        k = int(shift[start])
        if k >= 0:
            out[start:stop, k:] = image[start:stop, : width - k]
        else:
            out[start:stop, :k] = image[start:stop, -k:]
    return out


def _static_tissue(
    patient: PatientParams, view: str, pose: _Pose, u: np.ndarray, w: np.ndarray
) -> np.ndarray:
    """Echogenicity of everything that does not beat: fluid, maternal wall, thorax, spine, heart body."""
    _, _, r, theta = _polar_grid()
    tissue = np.full(u.shape, FLUID, np.float32)
    tissue += np.clip((patient.maternal_depth - r) / 6.0 + 0.5, 0.0, 1.0) * np.float32(0.4 - FLUID)
    t = patient.thorax_scale
    thorax = np.hypot((u - 0.15) / t, (w - 0.35) / (0.9 * t))
    body = np.clip((1.0 - thorax) / 0.03, 0.0, 1.0)
    rim = np.clip(1.0 - np.abs(thorax - 0.96) / 0.04, 0.0, 1.0)
    tissue += body * np.float32(patient.tissue_brightness - FLUID) + rim * np.float32(0.35)
    spine_u, spine_w = 0.15, 0.35 + 0.75 * 0.9 * t
    tissue += np.clip((0.22 - np.hypot(u - spine_u, w - spine_w)) / 0.05, 0.0, 1.0) * np.float32(0.6)
    if view in HEART_BODY:
        (bu, bw), (ru, rw) = HEART_BODY[view]
        inside = np.clip((1.0 - np.hypot((u - bu) / ru, (w - bw) / rw)) / 0.04, 0.0, 1.0)
        tissue += inside * (np.float32(0.75 * patient.wall_brightness) - tissue)
    sx, sy = pose.to_pixels(spine_u, spine_w)
    spine_r, spine_theta = math.hypot(sx - APEX_X, sy - APEX_Y), math.atan2(sx - APEX_X, sy - APEX_Y)
    shadow = np.clip((0.2 * pose.scale / spine_r - np.abs(theta - spine_theta)) * spine_r / 4.0, 0.0, 1.0)
    shadow *= np.clip((r - spine_r) / 4.0, 0.0, 1.0)
    tissue *= 1.0 - 0.7 * shadow
    return tissue


def _bank_crop(rng: np.random.Generator) -> np.ndarray:
    """A random window (maybe mirrored) of the speckle bank: fresh-looking speckle for one frame."""
    bank = _speckle_bank()
    top = int(rng.integers(0, bank.shape[0] - HEIGHT + 1))
    left = int(rng.integers(0, bank.shape[1] - WIDTH + 1))
    crop = bank[top : top + HEIGHT, left : left + WIDTH]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


@lru_cache(maxsize=1)
def _speckle_bank() -> np.ndarray:
    """Rayleigh speckle (mean 1) at twice the frame size, grains elongated laterally, same in every process."""
    field = np.random.default_rng(SPECKLE_BANK_SEED).standard_normal(
        (2, HEIGHT, WIDTH // 2), dtype=np.float32
    )
    magnitude = np.hypot(field[0], field[1]) / np.float32(math.sqrt(math.pi / 2))
    return np.asarray(Image.fromarray(magnitude).resize((2 * WIDTH, 2 * HEIGHT), Image.BILINEAR))


@lru_cache(maxsize=1)
def _polar_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel coordinates and their radius and angle from the probe apex."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    r = np.hypot(x - APEX_X, y - APEX_Y)
    theta = np.arctan2(x - APEX_X, y - APEX_Y)
    return x, y, r, theta


@lru_cache(maxsize=1)
def _sector_gain() -> np.ndarray:
    """Soft-edged fan with depth attenuation; exactly zero outside the sector."""
    _, _, r, theta = _polar_grid()
    sides = np.clip((SECTOR_HALF_ANGLE - np.abs(theta)) * r / 2.0, 0.0, 1.0)
    bottom = np.clip((SECTOR_RADIUS - r) / 2.0, 0.0, 1.0)
    return (sides * bottom * (1.15 - 0.5 * r / SECTOR_RADIUS)).astype(np.float32)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def _frame_paths(plan: _ClipPlan, frame: int) -> tuple[str, str]:
    rel = f"{plan.patient_id}/{plan.clip_id}/{frame:03d}.png"
    return f"images/{rel}", f"masks/{rel}"


def _write_png(run: RunDir, rel: str, array: np.ndarray) -> None:
    run.write_bytes(rel, _png(array), fsync=False)


def _render_chunk(run: RunDir, chunk: list[_ClipPlan]) -> int:
    """Render and write every frame and mask of a run of clips; returns the frame count.

    PNG encoding and writing run in threads, so the next clip renders while the previous one waits
    on fsync.
    """
    count = 0
    pending: list[Future] = []
    with ThreadPoolExecutor(WRITE_THREADS) as writers:
        for plan in chunk:
            frames, masks = render_clip(plan.patient, plan.clip, plan.n_frames, plan.rng_seed)
            for future in pending:
                future.result()
            pending = []
            for f in range(plan.n_frames):
                image_rel, mask_rel = _frame_paths(plan, f)
                pending.append(writers.submit(_write_png, run, image_rel, frames[f]))
                pending.append(writers.submit(_write_png, run, mask_rel, masks[f]))
            count += plan.n_frames
        for future in pending:
            future.result()
    return count


def _run_chunks(run: RunDir, chunks: list[list[_ClipPlan]], workers: int) -> Iterator[int]:
    """Frame counts of finished chunks, from this process or a process pool."""
    if workers <= 1:
        for chunk in chunks:
            yield _render_chunk(run, chunk)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_render_chunk, run, chunk) for chunk in chunks]
        for future in as_completed(futures):
            yield future.result()


def _manifest_csv(plans: list[_ClipPlan]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for plan in plans:
        for f in range(plan.n_frames):
            image_rel, mask_rel = _frame_paths(plan, f)
            writer.writerow([image_rel, mask_rel, plan.patient_id, plan.clip_id, f, plan.label, plan.split])
    return buf.getvalue().encode("utf-8")
