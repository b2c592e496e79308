"""Clip sets for benchmarks: digits made into clips, deid-data's real echo cines, the synthetic archive."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from enrich_dist import imaging
from enrich_dist.datasets import ClipSet, deid_cine_frames, digits_clips, echo_clips, make_echo_archive


def check_shape(clips: ClipSet, size: int = 64) -> None:
    n = len(clips)
    assert clips.images.shape == (n, size, size) and clips.images.dtype == np.float32
    assert 0.0 <= clips.images.min() and clips.images.max() <= 1.0
    for column in (clips.labels, clips.clip_ids, clips.frames, clips.patient_ids):
        assert len(column) == n
    assert clips.frames.dtype == np.int32
    for clip in np.unique(clips.clip_ids):
        rows = clips.clip_ids == clip
        assert clips.frames[rows].tolist() == list(range(rows.sum()))  # frames 0..F-1, in order
        assert len(set(clips.labels[rows])) == len(set(clips.patient_ids[rows])) == 1


def check_clips_are_redundant(clips: ClipSet) -> None:
    """Frames of a clip differ from each other, yet lie closer together than images of other clips."""
    flat = clips.images.reshape(len(clips), -1).astype(np.float64)
    ids, counts = np.unique(clips.clip_ids, return_counts=True)
    within, between = [], []
    rng = np.random.default_rng(0)
    for clip in ids[counts > 1]:
        rows = np.flatnonzero(clips.clip_ids == clip)
        frames = flat[rows]
        gaps = np.linalg.norm(frames[:, None] - frames[None], axis=2)[np.triu_indices(len(rows), 1)]
        assert gaps.min() > 0, f"{clip}: two identical frames"
        within.append(gaps.mean())
        pool = np.flatnonzero(clips.clip_ids != clip)
        others = rng.choice(pool, min(50, len(pool)), replace=False)
        between.append(np.linalg.norm(frames[:1] - flat[others], axis=1).mean())
    assert np.mean(within) < 0.75 * np.mean(between)


@pytest.fixture(scope="module")
def digits_module():
    return pytest.importorskip("sklearn.datasets")


def test_digits_clips_fixed_length(digits_module):
    clips = digits_clips(4, n_sources=120, seed=1)
    check_shape(clips)
    assert len(clips) == 480 and len(np.unique(clips.clip_ids)) == 120
    assert set(clips.labels) <= {str(d) for d in range(10)} and len(set(clips.labels)) == 10
    assert np.array_equal(clips.clip_ids, clips.patient_ids)
    check_clips_are_redundant(clips)
    source = int(clips.clip_ids[0].split("-")[1])
    digit = digits_module.load_digits().images[source] / 16.0
    frame0 = clips.images[0]
    assert np.corrcoef(frame0[4::8, 4::8].ravel(), digit.ravel())[0, 1] > 0.9  # frame 0: the clean source
    again = digits_clips(4, n_sources=120, seed=1)
    assert np.array_equal(again.images, clips.images) and np.array_equal(again.clip_ids, clips.clip_ids)
    assert not np.array_equal(digits_clips(4, n_sources=120, seed=2).images, clips.images)
    with pytest.raises(ValueError, match="frames_per_clip"):
        digits_clips(0)


def test_digits_clips_uneven(digits_module):
    clips = digits_clips(uneven=True, n_sources=500, seed=3)
    check_shape(clips)
    counts = np.unique(clips.clip_ids, return_counts=True)[1]
    assert len(counts) == 500
    long = counts[counts >= 10]
    assert len(long) == 100 and long.max() <= 40
    assert set(counts[counts < 10]) == {1, 2}
    assert long.sum() > 0.6 * len(clips)  # a fifth of the sources hold most of the images
    check_clips_are_redundant(clips)


def test_deid_cine_frames():
    clips = deid_cine_frames()
    check_shape(clips)
    ids, counts = np.unique(clips.clip_ids, return_counts=True)
    cines = dict(zip(ids[counts > 1].tolist(), counts[counts > 1].tolist(), strict=True))
    assert cines == {"ultrasound-multiframe": 30, "GREYSCALE_CINE": 27, "RGB_CINE": 51}
    assert (counts == 1).sum() >= 10  # single-image distractors
    assert set(clips.labels[np.isin(clips.clip_ids, list(cines))]) == {"US"}
    assert {"US", "CT", "MR"} <= set(clips.labels[~np.isin(clips.clip_ids, list(cines))])
    check_clips_are_redundant(clips)


@pytest.mark.parametrize("profile, n_images", [("uniform", 60), ("uneven", 100)])
def test_echo_clips_are_what_the_pipeline_reads(tmp_path, profile, n_images):
    clips = echo_clips(n_images, profile, seed=5)
    check_shape(clips)
    assert clips.name == f"echo-{profile}" and len(clips) == n_images
    assert set(clips.labels) <= {"A4C", "SAX", "3VV", "LVOT"}
    make_echo_archive(str(tmp_path), n_images, seed=5, profile=profile, workers=1, progress=False)
    with open(tmp_path / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["clip_id"] for r in rows] == clips.clip_ids.tolist()
    assert [r["patient_id"] for r in rows] == clips.patient_ids.tolist()
    assert [int(r["frame"]) for r in rows] == clips.frames.tolist()
    assert [r["label"] for r in rows] == ["A4C" if v == "A4C" else "NT" for v in clips.labels]
    loaded, errors = imaging.load_images([str(tmp_path / r["uri"]) for r in rows])
    assert not any(errors) and np.array_equal(loaded, clips.images)
    assert np.array_equal(echo_clips(n_images, profile, seed=5).images, clips.images)
    check_clips_are_redundant(clips)
