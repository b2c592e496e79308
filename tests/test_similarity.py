"""Similarity stage against a dense brute-force oracle on small awkward inputs."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pyarrow as pa
import pytest

from enrich_dist.config import SimilarityConfig
from enrich_dist.schema import EMBEDDINGS_DIR, NEIGHBORS_DIR, embeddings_schema, threshold_column
from enrich_dist.similarity import (
    compute_similarity,
    histogram_edges,
    kernel,
    merge_topk,
    run_similarity,
    tile_plan,
    tile_stats,
)
from enrich_dist.similarity.plan import group_tiles, schedule
from enrich_dist.storage import shard_name

THRESHOLDS = (0.5, 0.7, 0.9)


def exact_unit_vectors(n: int, dim: int, seed: int, duplicates: int = 0) -> np.ndarray:
    """Random near-unit rows on a 2^-8 grid: every dot product is exact in float32, whatever the order."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = np.round(x * 256) / 256
    if duplicates:
        x[n - duplicates :] = x[:duplicates]
    return x.astype(np.float32)


def sign_vectors(n: int, seed: int) -> np.ndarray:
    """Rows of +-0.5 in 4-d: exact unit norm, similarities only -1, -0.5, 0, 0.5, 1 (many ties)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, (n, 4)) - 0.5).astype(np.float32)


def oracle(x: np.ndarray, k: int, thresholds, bins: int):
    """Dense brute force: histogram of the upper triangle, counts strictly above, top-k by (-sim, index)."""
    n = len(x)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    upper = s[np.triu_indices(n, 1)]
    hist = np.histogram(np.clip(upper, -1, 1), histogram_edges(bins))[0]
    np.fill_diagonal(s, -np.inf)
    counts = np.array([(s > t).sum(axis=1) for t in thresholds]).reshape(len(thresholds), n)
    k = min(k, n - 1)
    idx = np.array(
        [sorted(range(n), key=lambda j: (-s[i, j], j))[:k] for i in range(n)], dtype=np.int64
    ).reshape(n, k)
    vals = np.take_along_axis(s, idx, axis=1).astype(np.float32)
    return hist, counts, vals, idx


def tiled(x: np.ndarray, k: int, thresholds, bins: int, block: int):
    """The tile kernel over the tile plan, merged as the driver does, without Ray."""
    n = len(x)
    k = min(k, n - 1)
    vals, idx = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
    counts, hist = np.zeros((len(thresholds), n), np.int64), np.zeros(bins, np.int64)
    for r0, r1, c0, c1 in tile_plan(n, block):
        st = tile_stats(
            x[r0:r1], x[c0:c1], r0 == c0, k, thresholds, histogram_edges(bins), row_offset=r0, col_offset=c0
        )
        counts[:, r0:r1] += st.row_counts
        counts[:, c0:c1] += st.col_counts
        hist += st.hist
        vals[r0:r1], idx[r0:r1] = merge_topk(vals[r0:r1], idx[r0:r1], st.row_vals, st.row_idx, k)
        vals[c0:c1], idx[c0:c1] = merge_topk(vals[c0:c1], idx[c0:c1], st.col_vals, st.col_idx, k)
    return hist, counts, vals, idx


def assert_same(got, want) -> None:
    for name, g, w in zip(("hist", "counts", "vals", "idx"), got, want, strict=True):
        np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.mark.parametrize(
    "n, block", [(n, b) for n in (1, 2, 3, 7, 50, 101) for b in sorted({1, 3, 16, n, n + 5})]
)
def test_tiles_match_oracle(n: int, block: int) -> None:
    x = exact_unit_vectors(n, 8, seed=n * 31 + block, duplicates=min(3, n // 3))
    for k in (1, 10, n + 3) if block > 1 else (n + 3,):
        assert_same(tiled(x, k, THRESHOLDS, 40, block), oracle(x, k, THRESHOLDS, 40))


@pytest.mark.parametrize("n, block", [(7, 3), (50, 16), (101, 101), (101, 37)])
def test_tiles_match_oracle_in_small_chunks(n: int, block: int, monkeypatch) -> None:
    """Chunks of a few rows exercise the running column candidates and their reductions."""
    monkeypatch.setattr(kernel, "CHUNK_ELEMENTS", 40)
    x = exact_unit_vectors(n, 8, seed=n + block, duplicates=n // 4)
    x[: n // 3] = x[0]
    for k in (1, 3, 10):
        assert_same(tiled(x, k, THRESHOLDS, 20, block), oracle(x, k, THRESHOLDS, 20))


def test_ties_and_thresholds_on_present_values() -> None:
    x = sign_vectors(40, seed=3)
    thresholds = (-0.5, 0.0, 0.5)
    for block in (1, 6, 40):
        assert_same(tiled(x, 12, thresholds, 8, block), oracle(x, 12, thresholds, 8))


def test_floors_leave_results_exact() -> None:
    """Floors at the true k-th similarity (ties included) lose nothing after the merge."""
    x = sign_vectors(30, seed=5)
    k = 4
    hist, counts, vals, idx = oracle(x, k, THRESHOLDS, 10)
    floor = vals[:, -1]
    got_vals, got_idx = np.full((30, k), -np.inf, np.float32), np.full((30, k), -1, np.int64)
    for r0, r1, c0, c1 in tile_plan(30, 7):
        st = tile_stats(
            x[r0:r1],
            x[c0:c1],
            r0 == c0,
            k,
            THRESHOLDS,
            histogram_edges(10),
            row_offset=r0,
            col_offset=c0,
            row_floor=floor[r0:r1],
            col_floor=floor[c0:c1],
        )
        got_vals[r0:r1], got_idx[r0:r1] = merge_topk(
            got_vals[r0:r1], got_idx[r0:r1], st.row_vals, st.row_idx, k
        )
        got_vals[c0:c1], got_idx[c0:c1] = merge_topk(
            got_vals[c0:c1], got_idx[c0:c1], st.col_vals, st.col_idx, k
        )
    np.testing.assert_array_equal(got_vals, vals)
    np.testing.assert_array_equal(got_idx, idx)


def test_products_past_one_land_in_the_last_bin() -> None:
    x = np.array([[0.6, 0.8, 0.0]] * 3, np.float32) * np.float32(1.0000001)
    assert float(x[0] @ x[0]) > 1.0
    st = tile_stats(x, x, True, 2, THRESHOLDS, histogram_edges(200))
    assert st.hist[-1] == 3 and st.hist.sum() == 3
    assert st.row_counts.sum() + st.col_counts.sum() == 3 * 2 * len(THRESHOLDS)


def test_merge_topk_breaks_ties_by_index_and_pads() -> None:
    vals, idx = merge_topk(
        np.array([[0.9, 0.5, -np.inf]], np.float32),
        np.array([[7, 3, -1]]),
        np.array([[0.5, 0.5]], np.float32),
        np.array([[1, 9]]),
        4,
    )
    np.testing.assert_array_equal(idx, [[7, 1, 3, 9]])
    np.testing.assert_array_equal(vals, np.array([[0.9, 0.5, 0.5, 0.5]], np.float32))
    vals, idx = merge_topk(np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64), vals, idx, 6)
    np.testing.assert_array_equal(idx, [[7, 1, 3, 9, -1, -1]])
    assert np.isneginf(vals[0, 4:]).all()


def test_tile_plan_covers_every_pair_once() -> None:
    for n, block in itertools.product(range(0, 13), range(1, 15)):
        seen: dict[tuple[int, int], int] = {}
        for r0, r1, c0, c1 in tile_plan(n, block):
            assert 0 <= r0 < r1 <= n and 0 <= c0 < c1 <= n and r0 <= c0
            for i, j in itertools.product(range(r0, r1), range(c0, c1)):
                if r0 != c0 or i < j:
                    seen[(i, j)] = seen.get((i, j), 0) + 1
        assert seen == {(i, j): 1 for i in range(n) for j in range(i + 1, n)}, (n, block)
        tiles = tile_plan(n, block)
        assert sorted(schedule(tiles)) == sorted(tiles)
        for min_pairs in (1, 5, 1000):
            groups = group_tiles(tiles, min_pairs)
            assert [t for g in groups for t in g] == tiles
            assert all(sum((t[1] - t[0]) * (t[3] - t[2]) for t in g) >= min_pairs for g in groups[:-1])


def test_histogram_edges() -> None:
    edges = histogram_edges(200)
    assert len(edges) == 201 and edges[0] == -1.0 and edges[-1] == 1.0 and edges[150] == 0.5
    with pytest.raises(ValueError):
        tile_plan(4, 0)


def check_stage(x: np.ndarray, ids: np.ndarray, cfg: SimilarityConfig) -> tuple[pa.Table, dict]:
    """compute_similarity on Ray against the oracle, for rows given in any id order."""
    table, summary = compute_similarity(x, ids, cfg, progress=False)
    order = np.argsort(ids)
    xs, sorted_ids = x[order], ids[order]
    n = len(x)
    hist, counts, vals, idx = oracle(xs, cfg.top_k, cfg.thresholds, cfg.bins)
    assert table.column("image_id").to_pylist() == sorted_ids.tolist()
    assert table.column("nn_ids").to_pylist() == sorted_ids[idx].tolist()
    assert table.column("nn_sims").to_pylist() == vals.tolist()
    want_max = vals[:, 0].tolist() if n > 1 else [None] * n
    assert table.column("max_sim").to_pylist() == want_max
    for t, c in zip(cfg.thresholds, counts, strict=True):
        assert table.column(threshold_column(t)).to_pylist() == c.tolist()
    n_pairs = n * (n - 1) // 2
    assert summary["n_images"] == n and summary["n_pairs"] == n_pairs and summary["exact"] is True
    assert summary["histogram"]["counts"] == hist.tolist()
    assert summary["histogram"]["edges"] == histogram_edges(cfg.bins).tolist()
    for t, c in zip(cfg.thresholds, counts, strict=True):
        entry = summary["thresholds"][f"{t:g}"]
        assert entry["pairs"] == c.sum() // 2
        assert entry["pair_fraction"] == (c.sum() // 2 / n_pairs if n_pairs else 0.0)
        assert entry["images_with_neighbor"] == np.count_nonzero(c)
        assert entry["image_fraction"] == (np.count_nonzero(c) / n if n else 0.0)
    above = [int(c.sum()) // 2 for c in oracle(xs, 0, (0.5, 0.7, 0.9), 1)[1]]
    paper = summary["paper_bins"]
    assert [paper[b]["pairs"] for b in ("<=0.5", "0.5-0.7", "0.7-0.9", ">0.9")] == [
        n_pairs - above[0],
        above[0] - above[1],
        above[1] - above[2],
        above[2],
    ]
    assert sum(p["pairs"] for p in paper.values()) == n_pairs
    return table, summary


@pytest.fixture
def one_tile_per_task(monkeypatch):
    """One Ray task per tile, so later tiles get the driver's neighbour floors."""
    from enrich_dist.similarity import stage

    monkeypatch.setattr(stage, "MIN_TASK_PAIRS", 1)


@pytest.mark.parametrize("n, block", [(1, 4), (2, 1), (3, 2), (50, 7), (101, 16)])
def test_compute_similarity_matches_oracle(ray_local, one_tile_per_task, n: int, block: int) -> None:
    rng = np.random.default_rng(n)
    x = exact_unit_vectors(n, 8, seed=n, duplicates=n // 5)
    ids = rng.permutation(np.arange(n) * 3 + 11)
    check_stage(x, ids, SimilarityConfig(block_size=block, top_k=6, bins=50))


def test_compute_similarity_ties_and_progress(ray_local, one_tile_per_task, caplog) -> None:
    x = sign_vectors(90, seed=1)
    cfg = SimilarityConfig(block_size=8, top_k=25, thresholds=(0.0, 0.5), bins=4)
    with caplog.at_level(logging.INFO, logger="enrich_dist.similarity"):
        compute_similarity(x, np.arange(90), cfg)
    assert any("tiles" in r.message for r in caplog.records)
    _, summary = check_stage(x, np.arange(90)[::-1].copy(), cfg)
    assert (
        set(summary["thresholds"]) == {"0", "0.5"} and summary["block_size"] == 8 and summary["top_k"] == 25
    )


def write_embeddings(run_dir, x: np.ndarray, ids: np.ndarray, shards: int) -> None:
    for i, part in enumerate(np.array_split(np.arange(len(x)), shards)):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[part].reshape(-1)), x.shape[1])
        table = pa.Table.from_arrays([pa.array(ids[part]), emb], schema=embeddings_schema(x.shape[1]))
        run_dir.write_table(f"{EMBEDDINGS_DIR}/{shard_name(i)}", table)


def test_run_similarity_end_to_end(ray_local, run_dir, monkeypatch) -> None:
    from enrich_dist.similarity import stage

    monkeypatch.setattr(stage, "SHARD_ROWS", 30)
    x = exact_unit_vectors(70, 8, seed=9, duplicates=10)
    ids = np.delete(np.arange(75), [3, 20, 21, 40, 74])
    write_embeddings(run_dir, x, ids, shards=3)
    cfg = SimilarityConfig(block_size=16, top_k=5)
    stats = run_similarity(run_dir, cfg)
    assert run_dir.is_done("similarity")
    assert sorted(run_dir.shards(NEIGHBORS_DIR)) == [0, 1, 2]
    table = run_dir.read_table(NEIGHBORS_DIR)
    want, summary = check_stage(x, ids, cfg)
    assert table.equals(want)
    assert run_dir.read_json("similarity/summary.json")["thresholds"] == summary["thresholds"]
    assert stats["n_pairs"] == 70 * 69 // 2

    monkeypatch.setattr(stage, "compute_similarity", lambda *a, **kw: pytest.fail("rerun must skip"))
    assert run_similarity(run_dir, cfg) == stats


def test_run_similarity_needs_embeddings(run_dir) -> None:
    with pytest.raises(FileNotFoundError, match="enrich embed"):
        run_similarity(run_dir, SimilarityConfig())


def test_compute_similarity_rejects_unnormalised_rows() -> None:
    with pytest.raises(ValueError, match="L2-normalised"):
        compute_similarity(np.full((3, 4), 2.0, np.float32), np.arange(3), SimilarityConfig(), progress=False)
