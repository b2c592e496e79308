"""Sibling recall equals a brute force on awkward sets: ties, singletons, null clips, missing images, N < k."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from enrich_dist import schema
from enrich_dist.schema import MANIFEST_DIR, NEIGHBORS_DIR, neighbors_schema
from enrich_dist.similarity import siblings
from enrich_dist.similarity.siblings import (
    sibling_recall,
    sibling_recall_from_embeddings,
    sibling_recall_from_run,
)
from enrich_dist.storage import RunDir, shard_name


def sign_vectors(n: int, seed: int) -> np.ndarray:
    """Rows of +-0.5 in 4-d: exact unit norm, similarities only -1, -0.5, 0, 0.5, 1 (many ties)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, (n, 4)) - 0.5).astype(np.float32)


def grid_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Near-unit rows on a 2^-8 grid (every product exact in float32), with some rows repeated."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    x = np.round(x / np.linalg.norm(x, axis=1, keepdims=True) * 256) / 256
    x[n - n // 4 :] = x[: n // 4]
    return x.astype(np.float32)


def brute_force(x: np.ndarray, clips: list, k: int) -> tuple[float, float, int, int] | None:
    """The definitions, literally: neighbors sorted by (-similarity, index), clip sizes counted by hand."""
    n = len(x)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    size = {c: clips.count(c) for c in clips if c is not None}
    eligible = [i for i in range(n) if clips[i] is not None and size[clips[i]] >= 2]
    kk = min(k, n - 1)
    if not eligible or kk < 1:
        return None
    at_1, at_k = [], []
    for i in eligible:
        top = sorted((j for j in range(n) if j != i), key=lambda j: (-s[i, j], j))[:kk]
        same = [clips[j] == clips[i] for j in top]
        at_1.append(same[0])
        at_k.append(sum(same) / min(kk, size[clips[i]] - 1))
    return float(np.mean(at_1)), float(np.mean(at_k)), kk, len(eligible)


def as_tuple(record: dict | None) -> tuple[float, float, int, int] | None:
    return None if record is None else (record["at_1"], record["at_k"], record["k"], record["n_eligible"])


def awkward_clips(n: int, seed: int) -> list:
    """Clips of several sizes, singleton clips and null clip ids, in shuffled order."""
    rng = np.random.default_rng(seed)
    plain = n - n // 3
    clips = [f"c{i % max(1, min(5, plain // 2))}" for i in range(plain)] + [None] * (n // 6)
    clips += [f"single{i}" for i in range(n - len(clips))]
    return [clips[i] for i in rng.permutation(n)]


@pytest.mark.parametrize("n, k", [(40, 1), (40, 3), (40, 10), (40, 60), (9, 4), (3, 10)])
@pytest.mark.parametrize("make", [sign_vectors, lambda n, seed: grid_vectors(n, 8, seed)])
def test_matches_brute_force(n: int, k: int, make, monkeypatch) -> None:
    monkeypatch.setattr(siblings, "EXACT_ROWS", 4)  # several blocks
    x = make(n, seed=n + k)
    clips = awkward_clips(n, seed=k)
    got = sibling_recall_from_embeddings(x, clips, k)
    want = brute_force(x, clips, k)
    assert want is not None and as_tuple(got) == pytest.approx(want)
    assert got["k"] == min(k, n - 1) and got["n_images"] == n
    assert got["n_clips"] == len({c for c in clips if c is not None})
    assert got["n_clips_with_siblings"] == len({c for c in clips if c is not None and clips.count(c) > 1})


def test_ties_go_to_the_lower_index() -> None:
    """Identical vectors in two clips: the nearest other image is the tied one with the lower index."""
    e = np.eye(3, dtype=np.float32)
    x = np.stack([e[0], e[0], e[0], e[1]])
    # image 0 is another clip's copy of images 1 and 2: each of them finds image 0 first
    got = sibling_recall_from_embeddings(x, ["b", "a", "a", None], 2)
    assert as_tuple(got) == (0.0, 1.0, 2, 2) == brute_force(x, ["b", "a", "a", None], 2)
    # with the other clip's copy last, each finds its sibling first
    got = sibling_recall_from_embeddings(x, ["a", "a", "b", None], 1)
    assert as_tuple(got) == (1.0, 1.0, 1, 2) == brute_force(x, ["a", "a", "b", None], 1)


@pytest.mark.parametrize(
    "clips",
    [[None] * 6, ["a", "b", "c", "d", "e", "f"], ["a", None, "b", None, "c", None]],
    ids=["no clip ids", "one frame per clip", "singletons and nulls"],
)
def test_nothing_eligible_is_none(clips: list) -> None:
    x = sign_vectors(6, seed=1)
    assert sibling_recall_from_embeddings(x, clips, 3) is None
    assert brute_force(x, clips, 3) is None


def test_tiny_archives() -> None:
    assert sibling_recall_from_embeddings(np.zeros((0, 4), np.float32), [], 5) is None
    assert sibling_recall_from_embeddings(sign_vectors(1, seed=0), ["a"], 5) is None
    got = sibling_recall_from_embeddings(sign_vectors(2, seed=0), ["a", "a"], 5)
    assert as_tuple(got) == (1.0, 1.0, 1, 2)
    assert sibling_recall(np.arange(2), np.zeros((2, 0), np.int64), ["a", "a"], 5) is None  # no lists: k 0


def test_ids_mappings_padding_and_missing_images() -> None:
    """Sparse ids, a mapping with images that were never embedded, -1 padding and ragged lists."""
    ids = np.array([13, 10, 11, 14, 20])
    # 12 is in clip "a" but has no embedding (an error): 10 is its clip's only embedded image
    clip_of = {10: "a", 12: "a", 11: "b", 13: "b", 14: "b", 20: None}
    nn = [np.array([11, 14]), np.array([11, 12, 13]), np.array([-1, 13]), np.array([13]), np.array([11, 13])]
    got = sibling_recall(ids, nn, clip_of, 3)
    # eligible: 13, 11, 14 (clip b); k = 3 (the longest list); 11's list is [-1, 13, pad]
    assert got["k"] == 3 and got["n_eligible"] == 3 and got["n_clips"] == 2 and got["n_clips_with_siblings"] == 1
    assert got["at_1"] == pytest.approx(2 / 3)  # 13 -> 11, 14 -> 13 hit; 11 -> -1 misses
    assert got["at_k"] == pytest.approx(((2 / 2) + (1 / 2) + (1 / 2)) / 3)
    parallel = [clip_of[int(i)] for i in ids]
    assert sibling_recall(ids, nn, parallel, 3) == got
    assert sibling_recall(ids, nn, pa.array(parallel), 3) == got
    assert sibling_recall(ids, nn, clip_of, 1)["at_k"] == pytest.approx(2 / 3)  # only nn_ids[0] counts


def test_self_in_a_list_is_not_a_sibling() -> None:
    got = sibling_recall(np.arange(3), np.array([[0, 1], [2, 0], [1, 0]]), ["a", "a", "b"], 2)
    assert as_tuple(got) == (0.0, 1.0, 2, 2)  # image 0 lists itself first: a miss


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="unique"):
        sibling_recall(np.array([1, 1]), np.zeros((2, 1), np.int64), ["a", "a"], 1)
    with pytest.raises(ValueError, match="one clip id per image"):
        sibling_recall(np.arange(2), np.zeros((2, 1), np.int64), ["a"], 1)
    with pytest.raises(ValueError, match="one neighbor list per image"):
        sibling_recall(np.arange(2), np.zeros((3, 1), np.int64), ["a", "a"], 1)


def write_manifest(run, clip_ids: list, errors: set[int]) -> None:
    n = len(clip_ids)
    rows = {name: pa.nulls(n, schema.MANIFEST.field(name).type) for name in schema.MANIFEST.names}
    rows["image_id"] = pa.array(range(n), pa.int64())
    rows["uri"] = pa.array([f"/a/{i}.png" for i in range(n)])
    rows["clip_id"] = pa.array(clip_ids, pa.string())
    rows["status"] = pa.array(["error" if i in errors else "ok" for i in range(n)])
    table = pa.table(rows, schema=schema.MANIFEST)
    for shard, start in enumerate(range(0, n, 7)):
        run.write_table(f"{MANIFEST_DIR}/{shard_name(shard)}", table.slice(start, 7))


def write_neighbors(run, ids: np.ndarray, nn: np.ndarray) -> None:
    n, k = nn.shape
    table = pa.table(
        {
            "image_id": pa.array(ids, pa.int64()),
            "max_sim": pa.array(np.ones(n, np.float32)),
            "nn_ids": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * k), pa.array(nn.reshape(-1))),
            "nn_sims": pa.ListArray.from_arrays(
                pa.array(np.arange(n + 1, dtype=np.int32) * k), pa.array(np.ones(n * k, np.float32))
            ),
        },
        schema=neighbors_schema(()),
    )
    for shard, start in enumerate(range(0, n, 10)):
        run.write_table(f"{NEIGHBORS_DIR}/{shard_name(shard)}", table.slice(start, 10))


def test_from_run_reads_manifest_and_neighbors(run_dir) -> None:
    """Images with errors have no neighbor row: they neither count nor make their clip a multi-image one."""
    n, k = 30, 4
    clips = awkward_clips(n, seed=3)
    errors = {2, 5, 17}
    clips[2] = clips[5] = "lonely"  # a clip of two images, both errors
    clips[17], clips[18] = "half", "half"  # one embedded image left
    x = grid_vectors(n, 8, seed=4)
    kept = np.array([i for i in range(n) if i not in errors])
    write_manifest(run_dir, clips, errors)
    sims = x[kept] @ x[kept].T
    np.fill_diagonal(sims, -np.inf)
    order = np.array([sorted(range(len(kept)), key=lambda j: (-sims[i, j], j))[:k] for i in range(len(kept))])
    write_neighbors(run_dir, kept, kept[order])
    got, why = sibling_recall_from_run(run_dir, 10)
    want = brute_force(x[kept], [clips[i] for i in kept], k)
    assert why is None and as_tuple(got) == pytest.approx(want)
    assert got["k"] == k  # the lists are shorter than the asked 10
    got_k2, _ = sibling_recall_from_run(run_dir, 2)
    assert as_tuple(got_k2) == pytest.approx(brute_force(x[kept], [clips[i] for i in kept], 2))
    assert sibling_recall_from_run(run_dir, 0) == (None, siblings.NO_LISTS)


def test_from_run_says_why_not_measured(tmp_path) -> None:
    run = RunDir(str(tmp_path / "none"))
    assert sibling_recall_from_run(run, 5) == (None, siblings.NO_MANIFEST)
    ids = np.arange(4)
    nn = np.array([[1], [0], [3], [2]])
    for name, clips, why in [
        ("no_clips", [None] * 4, siblings.NO_CLIPS),
        ("singletons", ["a", "b", None, "c"], siblings.NO_SIBLINGS),
        ("errors", ["a", "b", "a", "b"], siblings.NO_SIBLINGS),
    ]:
        run = RunDir(str(tmp_path / name))
        write_manifest(run, clips, errors={2, 3} if name == "errors" else set())
        kept = ids[:2] if name == "errors" else ids
        write_neighbors(run, kept, nn[: len(kept)] % len(kept))
        assert sibling_recall_from_run(run, 5) == (None, why)


def test_from_run_reads_ragged_and_null_lists(run_dir) -> None:
    """Neighbor lists of unequal length (or null) are read row by row; the longest one sets k."""
    write_manifest(run_dir, ["a", "a", "a", "b"], errors=set())
    table = pa.table(
        {
            "image_id": pa.array([0, 1, 2, 3], pa.int64()),
            "max_sim": pa.array([1, 1, 1, None], pa.float32()),
            "nn_ids": pa.array([[1], [3, 0, 2], [3, 1], None], pa.list_(pa.int64())),
            "nn_sims": pa.array([[1], [1, 1, 1], [1, 1], None], pa.list_(pa.float32())),
        },
        schema=neighbors_schema(()),
    )
    run_dir.write_table(f"{NEIGHBORS_DIR}/{shard_name(0)}", table)
    got, why = sibling_recall_from_run(run_dir, 5)
    assert why is None and got["k"] == 3 and got["n_eligible"] == 3
    assert got["at_1"] == pytest.approx(1 / 3) and got["at_k"] == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
