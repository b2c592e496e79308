"""The synthetic fetal-echo archive: shape, determinism, splits, labels, redundancy, masks."""

from __future__ import annotations

import csv
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from enrich_dist import imaging
from enrich_dist.datasets import make_echo_archive, render_clip
from enrich_dist.datasets.echo import (
    APEX_X,
    APEX_Y,
    MANIFEST_COLUMNS,
    RARE_FRACTION,
    RARE_VIEW,
    _frame_motion,
    _move,
    archive_shape,
    heavy_tailed_counts,
    plan_archive,
    split_counts,
)


def read_manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def archive_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("echo") / "archive"
    return root, make_echo_archive(str(root), 60, seed=3, workers=1, progress=False)


def test_same_seed_same_bytes_regardless_of_workers(small_archive, tmp_path):
    root, _ = small_archive
    again = tmp_path / "again"
    make_echo_archive(str(again), 60, seed=3, workers=2, progress=False)
    assert archive_files(again) == archive_files(root)
    other = tmp_path / "other"
    make_echo_archive(str(other), 60, seed=4, workers=1, progress=False)
    assert archive_files(other)["manifest.csv"] != archive_files(root)["manifest.csv"]


def test_manifest_rows_files_and_stats(small_archive):
    root, stats = small_archive
    rows = read_manifest(root)
    assert tuple(rows[0]) == MANIFEST_COLUMNS
    assert len(rows) == stats["n_images"] == 60
    assert not any(p.name.startswith(".tmp-") for p in root.rglob("*"))
    for row in rows:
        assert not row["uri"].startswith("/") and (root / row["uri"]).is_file()
        assert (root / row["mask_uri"]).is_file()
        assert row["uri"] == f"images/{row['patient_id']}/{row['clip_id']}/{int(row['frame']):03d}.png"
        assert row["mask_uri"] == "masks/" + row["uri"][len("images/") :]
        assert row["label"] in ("A4C", "NT") and row["split"] in ("train", "test")
    frames_by_clip: dict[str, list[int]] = {}
    for row in rows:
        frames_by_clip.setdefault(row["clip_id"], []).append(int(row["frame"]))
    assert all(f == list(range(len(f))) for f in frames_by_clip.values())
    assert stats["n_clips"] == len(frames_by_clip)
    assert stats["n_patients"] == len({r["patient_id"] for r in rows})
    assert stats["n_a4c"] == sum(r["label"] == "A4C" for r in rows) == 60 - stats["n_nt"]
    assert stats["n_test"] == sum(r["split"] == "test" for r in rows) == 60 - stats["n_train"]


def test_frames_and_masks_on_disk(small_archive):
    root, _ = small_archive
    for row in read_manifest(root):
        frame = np.asarray(Image.open(root / row["uri"]))
        mask = np.asarray(Image.open(root / row["mask_uri"]))
        assert frame.shape == mask.shape == (300, 400) and frame.dtype == mask.dtype == np.uint8
        assert frame[0, 0] == frame[0, -1] == frame[-1, 0] == 0
        if row["label"] == "A4C":
            assert set(np.unique(mask)) == {0, 1, 2, 3, 4}
            assert frame[mask > 0].mean() < frame[(mask == 0) & (frame > 0)].mean()
        else:
            assert not mask.any()


@pytest.mark.parametrize("n_images", [1, 5, 11])
def test_tiny_archives(tmp_path, caplog, n_images):
    with caplog.at_level(logging.INFO, logger="enrich_dist.datasets"):
        stats = make_echo_archive(str(tmp_path / "a"), n_images, seed=1)
    assert stats["n_images"] == len(read_manifest(tmp_path / "a")) == n_images
    assert stats["n_patients"] == 1 and stats["n_test"] == 0
    assert any("100%" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("n_images", [1, 7, 100, 999, 3000, 45460, 123457])
def test_plan_keeps_paper_ratios_and_exact_size(n_images):
    plans = plan_archive(n_images, seed=0)
    n_patients, n_clips = archive_shape(n_images)
    assert sum(p.n_frames for p in plans) == n_images
    assert len(plans) == n_clips and len({p.patient_id for p in plans}) == n_patients
    assert len({p.clip_id for p in plans}) == n_clips
    assert min(p.n_frames for p in plans) >= 1
    if n_images >= 100:
        assert 9.0 < n_images / n_clips < 12.0
        assert 4.0 < n_clips / n_patients < 5.5


def test_paper_shape():
    assert archive_shape(45460) == (933, 4344)


@pytest.mark.parametrize("seed", range(5))
def test_split_is_patient_disjoint_and_labels_near_paper(seed):
    plans = plan_archive(300, seed)
    split_of: dict[str, set[str]] = {}
    for p in plans:
        split_of.setdefault(p.patient_id, set()).add(p.split)
    assert all(len(s) == 1 for s in split_of.values())
    n_test = sum(s == {"test"} for s in split_of.values())
    assert n_test == max(1, round(0.15 * len(split_of)))
    a4c = sum(p.n_frames for p in plans if p.label == "A4C") / 300
    assert 0.40 <= a4c <= 0.50
    big = plan_archive(20000, seed)
    test_share = len({p.patient_id for p in big if p.split == "test"}) / len({p.patient_id for p in big})
    assert abs(test_share - 0.15) < 0.01


def test_split_counts_sums_and_floors():
    rng = np.random.default_rng(0)
    for total, n in [(1, 1), (5, 5), (100, 7), (45460, 4344)]:
        counts = split_counts(total, rng.uniform(0.5, 1.5, n))
        assert counts.sum() == total and counts.min() >= 1 and len(counts) == n


def test_redundancy_within_clip_then_patient_then_archive():
    within, same_patient, cross = [], [], []
    clips = []
    for plan in plan_archive(300, seed=0):
        frames, masks = render_clip(plan.patient, plan.clip, plan.n_frames, plan.rng_seed)
        assert masks.max() <= 4
        within += [corr(frames[i], frames[i + 1]) for i in range(len(frames) - 1)]
        clips.append((plan, frames[0]))
    for (p, a), (q, b) in itertools.combinations(clips, 2):
        if p.clip.view == q.clip.view:
            (same_patient if p.patient_id == q.patient_id else cross).append(corr(a, b))
    assert 0.8 < min(within) and max(within) < 0.999  # similar, never identical
    assert np.mean(within) > np.mean(same_patient) + 0.2
    assert np.mean(same_patient) > np.mean(cross) + 0.05


def test_frames_at_64_pixels_are_near_but_not_duplicates():
    """What the encoder sees: neighboring frames close, frames a beat apart less so, never identical."""
    near, far = [], []
    for plan in plan_archive(200, seed=1)[:10]:
        frames, _ = render_clip(plan.patient, plan.clip, 12, plan.rng_seed)
        small = [imaging.preprocess(f, 64) for f in frames]
        near += [corr(small[i], small[i + 1]) for i in range(11)]
        far.append(corr(small[0], small[6]))
    assert 0.85 < min(near) and max(near) < 0.9995
    assert np.mean(far) < np.mean(near) - 0.02


def test_cardiac_motion_swings_chamber_area_as_a_fetal_heart():
    """LV area over a beat swings by ((1+m)/(1-m))^2: fractional shortening 26-35 %, the fetal range."""
    a4c = [p for p in plan_archive(300, seed=0) if p.clip.view == "A4C"][:3]
    for plan in a4c:
        _, masks = render_clip(plan.patient, plan.clip, 20, plan.rng_seed)
        areas = (masks == 1).sum(axis=(1, 2))
        m = plan.patient.motion
        assert 0.15 <= m <= 0.21
        assert areas.max() / areas.min() == pytest.approx(((1 + m) / (1 - m)) ** 2, rel=0.05)


@pytest.mark.parametrize("n_frames", [1, 2, 10, 200])
def test_probe_drift_and_gain_walk(n_frames):
    for seed in range(20):
        dx, dy, tilt, gain = _frame_motion(np.random.default_rng(seed), n_frames)
        assert len(dx) == len(dy) == len(tilt) == len(gain) == n_frames
        assert dx[0] == dy[0] == tilt[0] == 0 and gain[0] == 1
        if n_frames > 1:
            assert 1.0 - 1e-9 <= np.hypot(dx, dy).max() <= 4.0 + 1e-9
            assert 0.1 - 1e-9 <= np.degrees(np.abs(tilt)).max() <= 0.6 + 1e-9
            assert np.abs(gain - 1).max() < 0.15
    gains = np.concatenate([_frame_motion(np.random.default_rng(s), 200)[3] for s in range(20)])
    assert 0.02 < gains.std() < 0.04


def test_move_shifts_and_tilts_about_the_apex():
    image = np.zeros((300, 400), np.float32)
    image[150, 200] = 1.0
    moved = _move(image, 2.0, -3.0, 0.0)
    assert moved[147, 202] == pytest.approx(1.0) and moved.sum() == pytest.approx(1.0)
    half = _move(image, 0.5, 0.0, 0.0)
    assert half[150, 200] == pytest.approx(0.5) and half[150, 201] == pytest.approx(0.5)
    tilt = np.radians(0.5)
    spot = np.argwhere(_move(image, 0.0, 0.0, tilt, nearest=True))[0]
    r = np.hypot(200 - APEX_X, 150 - APEX_Y)
    assert np.hypot(*(spot - (150, 200))) == pytest.approx(tilt * r, abs=1.0)  # an arc about the apex
    mask = (image > 0).astype(np.uint8) * 3
    assert set(np.unique(_move(mask, 1.4, 2.6, tilt, nearest=True))) == {0, 3}
    assert np.array_equal(_move(image, 0.0, 0.0, 0.0), image)


def test_masks_follow_the_drifting_frames():
    plan = next(p for p in plan_archive(300, seed=2) if p.clip.view == "A4C")
    frames, masks = render_clip(plan.patient, plan.clip, 40, plan.rng_seed)
    for frame, mask in zip(frames, masks, strict=True):
        chambers = frame[mask > 0].mean()
        ring = frame[(mask == 0) & (frame > 0)].mean()
        assert chambers < 0.5 * ring


@pytest.mark.parametrize("total", [1, 9, 10, 11, 25, 199, 1000, 45460])
def test_heavy_tailed_counts(total):
    for seed in range(10):
        counts = heavy_tailed_counts(total, 10, 200, np.random.default_rng(seed))
        assert counts.sum() == total and counts.max() <= 200
        assert counts.min() >= min(10, total)
        patients = heavy_tailed_counts(total, 1, 40, np.random.default_rng(seed))
        assert patients.sum() == total and 1 <= patients.min() and patients.max() <= 40


def test_uneven_profile_is_heavy_tailed_with_a_rare_view():
    plans = plan_archive(45460, seed=0, profile="uneven")
    frames = np.array([p.n_frames for p in plans])
    clips_per_patient = np.unique([p.patient_id for p in plans], return_counts=True)[1]
    assert frames.sum() == 45460 and frames.min() >= 10 and frames.max() <= 200
    assert np.median(frames) < 30 < 150 < frames.max()  # most clips short, a few very long
    assert clips_per_patient.max() <= 40 and np.median(clips_per_patient) <= 3 < 30 < clips_per_patient.max()
    share = {v: sum(p.n_frames for p in plans if p.clip.view == v) / 45460 for v in ("A4C", RARE_VIEW)}
    assert 0.40 < share["A4C"] < 0.50 and 0.25 * RARE_FRACTION < share[RARE_VIEW] <= RARE_FRACTION
    assert all(p.label == "NT" for p in plans if p.clip.view == RARE_VIEW)
    assert sum(p.clip.view == RARE_VIEW for p in plan_archive(3000, seed=0)) == 0  # uniform: no rare view
    for n in (300, 3000):
        small = plan_archive(n, seed=1, profile="uneven")
        assert sum(p.n_frames for p in small) == n and any(p.clip.view == RARE_VIEW for p in small)
        split_of: dict[str, set[str]] = {}
        for p in small:
            split_of.setdefault(p.patient_id, set()).add(p.split)
        assert all(len(s) == 1 for s in split_of.values())
    with pytest.raises(ValueError, match="profile"):
        plan_archive(100, 0, profile="lumpy")


def test_uneven_archive_on_disk_is_deterministic(tmp_path):
    one = tmp_path / "one"
    stats = make_echo_archive(str(one), 40, seed=5, profile="uneven", workers=1, progress=False)
    make_echo_archive(str(tmp_path / "two"), 40, seed=5, profile="uneven", workers=2, progress=False)
    assert archive_files(one) == archive_files(tmp_path / "two")
    rows = read_manifest(one)
    assert tuple(rows[0]) == MANIFEST_COLUMNS and len(rows) == stats["n_images"] == 40
    lengths = np.unique([r["clip_id"] for r in rows], return_counts=True)[1]
    assert lengths.min() >= 10 and stats["n_clips"] == len(lengths)


def test_speckle_differs_per_frame_but_is_seeded():
    plan = plan_archive(50, seed=0)[0]
    frames, _ = render_clip(plan.patient, plan.clip, 2, plan.rng_seed)
    again, _ = render_clip(plan.patient, plan.clip, 2, plan.rng_seed)
    other, _ = render_clip(plan.patient, plan.clip, 2, plan.rng_seed + 1)
    assert np.array_equal(frames, again)
    assert not np.array_equal(frames[0], other[0])
    still = render_clip(plan.patient, plan.clip, 1, plan.rng_seed)[0][0]
    assert np.array_equal(still, frames[0]) and not np.array_equal(frames[0], frames[1])
