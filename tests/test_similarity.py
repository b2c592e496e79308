"""Similarity stage against a dense brute-force oracle on small awkward inputs."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
import pyarrow as pa
import pytest
from test_siblings import write_manifest  # tests/ is on sys.path (rootdir conftest)

from enrich_dist.config import SimilarityConfig, parse_memory
from enrich_dist.schema import EMBEDDINGS_DIR, NEIGHBORS_DIR, embeddings_schema, threshold_column
from enrich_dist.similarity import (
    approx,
    compute_similarity,
    histogram_edges,
    kernel,
    merge_topk,
    plan,
    reduce,
    run_similarity,
    siblings,
    stage,
    tile_plan,
    tile_stats,
    torch_kernel,
)
from enrich_dist.similarity.plan import group_tiles, schedule
from enrich_dist.similarity.siblings import sibling_recall, sibling_recall_from_embeddings
from enrich_dist.similarity.torch_kernel import tile_stats_torch
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


def torch_cpu(xi, xj, diagonal, k, thresholds, edges, **offsets):
    """The GPU kernel, run on the CPU."""
    return tile_stats_torch(xi, xj, diagonal, k, thresholds, edges, device="cpu", **offsets)


def tiled(x: np.ndarray, k: int, thresholds, bins: int, block: int, kernel_fn=tile_stats):
    """A tile kernel over the tile plan, merged as the driver does, without Ray."""
    n = len(x)
    k = min(k, n - 1)
    vals, idx = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
    counts, hist = np.zeros((len(thresholds), n), np.int64), np.zeros(bins, np.int64)
    for r0, r1, c0, c1 in tile_plan(n, block):
        st = kernel_fn(
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
    """Chunks of a few rows exercise the column heaps across chunks and the column bounds; a buffer of
    3 column candidates makes every chunk offer them in several batches."""
    monkeypatch.setattr(kernel, "CHUNK_ROWS", 12)
    monkeypatch.setattr(kernel, "CANDIDATES", 3)
    monkeypatch.setattr(torch_kernel, "CHUNK_ELEMENTS", 40)
    x = exact_unit_vectors(n, 8, seed=n + block, duplicates=n // 4)
    x[: n // 3] = x[0]
    for k in (1, 3, 10):
        want = oracle(x, k, THRESHOLDS, 20)
        assert_same(tiled(x, k, THRESHOLDS, 20, block), want)
        assert_same(tiled(x, k, THRESHOLDS, 20, block, torch_cpu), want)


@pytest.mark.parametrize("n, block", [(1, 1), (2, 1), (3, 2), (7, 3), (50, 16), (101, 37), (101, 128)])
def test_torch_kernel_matches_oracle(n: int, block: int) -> None:
    """The GPU path's kernel, on the CPU: identical to brute force in fp32, ties and duplicates included."""
    x = exact_unit_vectors(n, 8, seed=7 * n + block, duplicates=min(3, n // 3))
    for k in (1, 4, n + 3):
        assert_same(tiled(x, k, THRESHOLDS, 40, block, torch_cpu), oracle(x, k, THRESHOLDS, 40))
    x = sign_vectors(n, seed=n)
    assert_same(tiled(x, 5, (-0.5, 0.0, 0.5), 8, block, torch_cpu), oracle(x, 5, (-0.5, 0.0, 0.5), 8))


def reference_topk_keys(s: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, values and indices of the top-k by (descending value, ascending index), -0.0 as 0.0."""
    s = s + np.float32(0.0)
    order = np.lexsort((np.broadcast_to(index, s.shape), -s.astype(np.float64)), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), index[order]


def test_torch_row_topk_with_ties_across_the_boundary() -> None:
    """float32 top-k fast path: rows whose k-th value is tied past k fall back to keys, ties to the smaller index."""
    import torch

    rng = np.random.default_rng(5)
    s = rng.choice(np.float32([-0.5, -0.0, 0.0, 0.25, 0.5, 1.0]), size=(40, 23)).astype(np.float32)
    s[0] = np.arange(23, dtype=np.float32)  # no ties at all
    s[1] = 0.5  # every entry tied
    s[2, :5] = -np.inf  # masked entries, fewer valid than k in row 3
    s[3, 3:] = -np.inf
    s[4] = np.where(np.arange(23) % 2, np.float32(0.0), np.float32(-0.0))  # -0.0 ties 0.0
    s[5] = np.float32(0.25)
    s[5, [0, 22]] = 1.0  # k-th tied across the boundary, the tie's indices on both sides
    index = rng.permutation(1000)[:23].astype(np.int64)
    bits = 10
    for k in (1, 2, 4, 22, 23, 30):
        keys = torch_kernel._row_topk_keys(torch.tensor(s), torch.tensor(index), k, bits)
        vals, idx = torch_kernel._decode(keys, bits, 0)
        want_vals, want_idx = reference_topk_keys(s, index, min(k, 23))
        valid = np.isfinite(want_vals)
        np.testing.assert_array_equal(np.where(valid, want_idx, -1), idx, err_msg=f"k={k}")
        np.testing.assert_array_equal(np.where(valid, want_vals, -np.inf), vals, err_msg=f"k={k}")


@pytest.mark.parametrize("chunk_elements", [1, 7, 40, 1 << 25])
def test_torch_kernel_off_diagonal_ties_across_chunks(chunk_elements: int, monkeypatch) -> None:
    """An off-diagonal tile full of duplicate rows and columns, in chunks of 1 row up to one chunk: the CPU kernel's results."""
    monkeypatch.setattr(torch_kernel, "CHUNK_ELEMENTS", chunk_elements)
    assert torch_kernel.chunk_elements(__import__("torch").device("cpu"), 9) == chunk_elements
    x = exact_unit_vectors(30, 8, seed=chunk_elements)
    xi, xj = x[:13].copy(), x[13:].copy()
    xi[5:] = xi[0]
    xj[::2] = xj[1]
    for k in (1, 3, 9, 20):
        edges = histogram_edges(40)
        want = tile_stats(xi, xj, False, k, THRESHOLDS, edges, row_offset=3, col_offset=40)
        got = torch_cpu(xi, xj, False, k, THRESHOLDS, edges, row_offset=3, col_offset=40)
        for name in ("row_counts", "col_counts", "row_vals", "row_idx", "col_vals", "col_idx", "hist"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{name}, k={k}")


def test_torch_kernel_half_precision_is_close() -> None:
    """bf16 products are approximate: same histogram mass, neighbors mostly the same."""
    x = exact_unit_vectors(60, 16, seed=2)
    st = tile_stats_torch(x, x, True, 5, THRESHOLDS, histogram_edges(20), device="cpu", precision="bf16")
    hist, counts, vals, idx = oracle(x, 5, THRESHOLDS, 20)
    assert st.hist.sum() == hist.sum()
    assert np.abs(st.row_vals[:-1, 0] - (x[:-1] * x[st.row_idx[:-1, 0]]).sum(1)).max() < 0.02
    with pytest.raises(ValueError, match="precision"):
        tile_stats_torch(x, x, True, 5, THRESHOLDS, histogram_edges(20), device="cpu", precision="fp8")


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


@pytest.mark.parametrize("kernel_fn", [tile_stats, torch_cpu])
def test_products_past_one_land_in_the_last_bin(kernel_fn) -> None:
    x = np.array([[0.6, 0.8, 0.0]] * 3, np.float32) * np.float32(1.0000001)
    assert float(x[0] @ x[0]) > 1.0
    st = kernel_fn(x, x, True, 2, THRESHOLDS + (0.9999999,), histogram_edges(200))
    assert st.hist[-1] == 3 and st.hist.sum() == 3
    assert st.row_counts.sum() + st.col_counts.sum() == 3 * 2 * (len(THRESHOLDS) + 1)
    assert (st.row_vals[:2, 0] > 1.0).all() and st.row_idx[0].tolist() == [1, 2]


@pytest.mark.parametrize("kernel_fn", [tile_stats, torch_cpu])
def test_products_past_minus_one_land_in_the_first_bin(kernel_fn) -> None:
    """An antipodal pair whose product rounds below -1 is binned as -1, off-diagonal and diagonal tiles alike."""
    x = np.array([[0.6, 0.8, 0.0]], np.float32) * np.float32(1.0000001)
    y = np.concatenate([x, -x, x, -x])
    assert float(x[0] @ -x[0]) < -1.0
    st = kernel_fn(y, y, True, 3, THRESHOLDS, histogram_edges(200))
    assert st.hist[0] == 4 and st.hist[-1] == 2 and st.hist.sum() == 6
    st = kernel_fn(y[:2], y[2:], False, 1, THRESHOLDS, histogram_edges(200), row_offset=0, col_offset=2)
    assert st.hist[0] == 2 and st.hist[-1] == 2
    assert st.row_idx[:, 0].tolist() == [2, 3] and st.col_idx[:, 0].tolist() == [0, 1]


def test_stage_bins_products_past_one_like_the_oracle(ray_local, one_tile_per_task) -> None:
    """Duplicates of a row of norm 1.0016 (on the 2^-8 grid, so every product is exact) meet at 1.003, antipodes
    at -1.003: through Ray they land in the last and first bins and count above 0.9999999, as in the oracle."""
    x = exact_unit_vectors(40, 8, seed=5, duplicates=6)
    g = np.float32([154, 205, 0, 0, 0, 0, 0, 0]) / 256
    assert float(g @ g) > 1.003
    x[[0, 9, 17, 33]] = g
    x[[4, 25]] = -g
    check_stage(
        x, np.arange(40), SimilarityConfig(block_size=16, top_k=4, bins=20, thresholds=(0.5, 0.9, 0.9999999))
    )


@pytest.mark.parametrize("bins", [1, 2, 3, 4, 40, 200, 257, 1000])
def test_torch_bin_limits_reproduce_the_cpu_arithmetic(bins: int) -> None:
    """The GPU kernel's float32 bin limits give every float32 the CPU kernel's float64 bin, tiny negatives included."""
    limits = torch_kernel.bin_limits(bins)
    assert limits.dtype == np.float32 and len(limits) == bins - 1 and (np.diff(limits) > 0).all()
    rng = np.random.default_rng(bins)
    special = np.float32([-1, 1, 0, -0.0, 1.0000001, -1.0000001, 1e-30, -1e-30, 1e-45, -1e-45, -3e-17, 3e-17])
    v = np.concatenate(
        [rng.uniform(-1.01, 1.01, 20000).astype(np.float32), limits, np.nextafter(limits, -np.inf), special]
    )
    cpu_bins = np.clip(np.floor((v.astype(np.float64) + 1.0) * (bins / 2)), 0, bins - 1)
    np.testing.assert_array_equal(np.searchsorted(limits, v, side="right"), cpu_bins)


@pytest.mark.parametrize("kernel_fn", [tile_stats, torch_cpu])
def test_values_on_bin_edges_and_thresholds(kernel_fn) -> None:
    """Similarities exactly on an edge go to the bin above it; counts are strictly above the threshold."""
    x = (
        np.array([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, -1], [-1, -1, -1, -1], [1, -1, 1, -1]], np.float32)
        / 2
    )
    thresholds = (0.5, 0.0, -0.5, -1.0)
    st = kernel_fn(x, x, True, 3, thresholds, histogram_edges(4))
    hist, counts, vals, idx = oracle(x, 3, thresholds, 4)
    np.testing.assert_array_equal(st.hist, hist)
    np.testing.assert_array_equal(st.row_counts + st.col_counts, counts)
    assert st.hist.tolist() == [1, 1, 5, 3] and counts[0].sum() == 0 and counts[3].sum() == 2 * 9


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
    assert summary["inexact_reasons"] == []
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
    """One Ray task per tile, so later tiles get the driver's neighbor floors."""
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


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_run_similarity_writes_sibling_recall(ray_local, run_dir, one_tile_per_task, mode: str) -> None:
    """summary.json holds the sibling recall of the lists written; images with errors are in no clip's count."""
    n, k = 84, 5
    errors = {3, 40, 41, 83}
    ids = np.array([i for i in range(n) if i not in errors])
    x = exact_unit_vectors(len(ids), 8, seed=5, duplicates=12)
    clips = [f"c{i % 9}" if i % 7 else None for i in range(n)]
    clips[40] = clips[2] = "pair"  # 40 is an error: clip "pair" has one embedded image
    write_manifest(run_dir, clips, errors)
    write_embeddings(run_dir, x, ids, shards=2)
    cfg = SimilarityConfig(block_size=16, top_k=k, mode=mode, n_partitions=8, nprobe=2, sample_size=20)
    summary = run_similarity(run_dir, cfg)
    assert run_dir.read_json("similarity/summary.json")["sibling_recall"] == summary["sibling_recall"]
    got = summary["sibling_recall"]
    assert summary["sibling_recall_not_measured"] is None and got["k"] == k
    kept_clips = [clips[i] for i in ids]
    assert got["n_eligible"] == sum(c is not None and kept_clips.count(c) > 1 for c in kept_clips)
    if mode == "exact":
        assert got == sibling_recall_from_embeddings(x, kept_clips, k)
    else:
        table = run_dir.read_table(NEIGHBORS_DIR)
        assert got == sibling_recall(ids, np.array(table.column("nn_ids").to_pylist()), kept_clips, k)


def test_run_similarity_without_clips_writes_null(ray_local, run_dir) -> None:
    x = exact_unit_vectors(12, 8, seed=6, duplicates=4)
    write_embeddings(run_dir, x, np.arange(12), shards=1)
    write_manifest(run_dir, [None] * 12, errors=set())
    run_similarity(run_dir, SimilarityConfig())
    summary = run_dir.read_json("similarity/summary.json")
    assert summary["sibling_recall"] is None and summary["sibling_recall_not_measured"] == siblings.NO_CLIPS


def test_approx_lists_pad_unfound_neighbors_with_minus_one(ray_local, one_tile_per_task) -> None:
    """Tiny partitions leave top-k slots empty: they read -1 (never another image) with similarity -inf."""
    x = clustered(60, 8, 20, 0.3, seed=2)
    cfg = SimilarityConfig(mode="approx", n_partitions=20, nprobe=1, top_k=10, block_size=8, sample_size=10)
    table, _ = compute_similarity(x, np.arange(60) + 100, cfg, progress=False)
    nn = np.array(table.column("nn_ids").to_pylist())
    sims = np.array(table.column("nn_sims").to_pylist(), np.float32)
    assert np.isneginf(sims).any()
    np.testing.assert_array_equal(nn == -1, np.isneginf(sims))
    assert ((nn >= 100) | (nn == -1)).all()


def test_run_similarity_needs_embeddings(run_dir) -> None:
    with pytest.raises(FileNotFoundError, match="enrich embed"):
        run_similarity(run_dir, SimilarityConfig())


def test_compute_similarity_rejects_unnormalised_rows() -> None:
    with pytest.raises(ValueError, match="L2-normalised"):
        compute_similarity(np.full((3, 4), 2.0, np.float32), np.arange(3), SimilarityConfig(), progress=False)


def test_compute_similarity_rejects_zero_and_non_finite_rows() -> None:
    x = exact_unit_vectors(6, 4, seed=1)
    x[2] = 0.0
    with pytest.raises(ValueError, match=r"zero vectors.*enrich embed") as err:
        compute_similarity(x, np.arange(10, 16), SimilarityConfig(), progress=False)
    assert "[12]" in str(err.value)
    x[2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        compute_similarity(x, np.arange(6), SimilarityConfig(), progress=False)


def test_parse_memory_and_block_choice() -> None:
    assert parse_memory("4G") == 4 << 30 and parse_memory("512M") == 512 << 20
    assert parse_memory("1.5g") == 3 << 29 and parse_memory("300000") == 300000
    assert parse_memory("64MiB") == 64 << 20 and parse_memory(1000) == 1000
    for bad in ("", "4X", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_memory(bad)
    n, dim, k = 45460, 128, 10
    block = plan.choose_block(n, dim, k, 3, 2 << 30, 2, 256)
    nb = -(-n // block)
    assert (
        block % 64 == 0
        and nb * (nb + 1) // 2 >= plan.TILES_PER_WORKER * 2
        and block * dim * 4 <= plan.PANEL_BYTES
    )
    small = plan.choose_block(n, dim, k, 3, 40 << 20, 2, 256)
    assert small < block
    assert plan.driver_bytes(n, dim, k, 3) + 4 * plan.task_bytes(small, k, 3, 256) <= 40 << 20
    with pytest.raises(ValueError, match="max-memory"):
        plan.choose_block(n, dim, k, 3, 1 << 20, 2, 256)
    assert plan.choose_block(10**6, dim, k, 3, 4 << 30, 2, 256) == plan.PANEL_BYTES // (4 * dim)
    assert plan.choose_block(10**6, 16, k, 3, 4 << 30, 2, 256) == plan.MAX_BLOCK
    assert plan.choose_block(1, dim, k, 3, 1 << 30, 2, 256) == 1


def test_partition_tile_plan_covers_paired_partitions_once() -> None:
    bounds = np.array([0, 3, 3, 10, 17])
    neighbors = np.array([[0, 2], [1, 0], [2, 3], [3, 2]])
    pairs = plan.partition_pairs(neighbors)
    assert pairs == [(0, 0), (0, 1), (0, 2), (1, 1), (2, 2), (2, 3), (3, 3)]
    part = np.repeat(np.arange(4), np.diff(bounds))
    for block in (1, 2, 4, 20):
        seen: dict[tuple[int, int], int] = {}
        for r0, r1, c0, c1 in plan.partition_tile_plan(bounds, pairs, block):
            for i, j in itertools.product(range(r0, r1), range(c0, c1)):
                if r0 != c0 or i < j:
                    seen[(i, j)] = seen.get((i, j), 0) + 1
        want = {
            (i, j): 1
            for i in range(17)
            for j in range(i + 1, 17)
            if (min(part[i], part[j]), max(part[i], part[j])) in pairs
        }
        assert seen == want
        assert sum(plan.tile_pairs(t) for t in plan.partition_tile_plan(bounds, pairs, block)) == len(want)


def test_tile_task_torch_branch_matches_numba() -> None:
    """The task body's GPU branch (torch, blocks moved once), run on the CPU, reduces to the numba branch's results."""
    x = exact_unit_vectors(40, 8, seed=4, duplicates=5)
    tiles = tile_plan(40, 16)
    floors = [(None, None)] * len(tiles)
    merged = []
    for backend in ("numba", "torch"):
        spec = stage._Kernel(backend, "cpu", "fp32", 6, THRESHOLDS, histogram_edges(30))
        reduction = reduce.Reduction(40, 6, len(THRESHOLDS), 30)
        for tile, stats in stage._tile_group(lambda a, b: x[a:b], tiles, floors, spec):
            reduction.add(tile, stats)
        merged.append(reduction)
    for name in ("hist", "counts", "vals", "idx"):
        np.testing.assert_array_equal(getattr(merged[0], name), getattr(merged[1], name), err_msg=name)
    np.testing.assert_array_equal(merged[0].idx, oracle(x, 6, THRESHOLDS, 30)[3])


def test_device_choice_says_what_is_missing() -> None:
    assert stage._device(SimilarityConfig(), 0) == "cpu"
    assert stage._device(SimilarityConfig(), 2) == "cuda"
    assert stage._device(SimilarityConfig(device="cpu"), 2) == "cpu"
    with pytest.raises(ValueError, match="no GPU"):
        stage._device(SimilarityConfig(device="cuda"), 0)
    with pytest.raises(ValueError, match="needs a GPU"):
        stage._device(SimilarityConfig(precision="bf16"), 0)
    with pytest.raises(ValueError, match="device"):
        stage._device(SimilarityConfig(device="tpu"), 0)


def test_cli_similarity_options() -> None:
    from enrich_dist.cli import build_parser, config_from_args

    args = build_parser().parse_args(
        [
            "similarity",
            "--output",
            "r",
            "--max-memory",
            "4G",
            "--similarity-mode",
            "approx",
            "--n-partitions",
            "64",
            "--nprobe",
            "4",
            "--similarity-device",
            "cpu",
            "--precision",
            "fp32",
            "--block-size",
            "512",
        ]
    )
    cfg = config_from_args(args).similarity
    assert (
        cfg.max_memory,
        cfg.mode,
        cfg.n_partitions,
        cfg.nprobe,
        cfg.device,
        cfg.precision,
        cfg.block_size,
    ) == ("4G", "approx", 64, 4, "cpu", "fp32", 512)


def test_run_similarity_resumes_only_uncommitted_tiles(
    ray_local, run_dir, one_tile_per_task, monkeypatch
) -> None:
    """A driver killed mid-run leaves committed partials; the rerun computes only the other tiles, same outputs."""
    x = exact_unit_vectors(90, 8, seed=12, duplicates=9)
    ids = np.arange(90) * 2
    write_embeddings(run_dir, x, ids, shards=2)
    cfg = SimilarityConfig(block_size=16, top_k=4, checkpoint_seconds=0.0)
    n_tiles = len(tile_plan(90, 16))
    crash_after_tiles(monkeypatch, run_dir, cfg, 8)
    assert run_dir.exists(reduce.STATE) and not run_dir.is_done("similarity")
    summary = run_similarity(run_dir, cfg)
    assert summary["tiles"] == {"total": n_tiles, "computed": n_tiles - 8, "resumed": 8, "nodes": 1}
    assert not run_dir.exists(reduce.PARTIALS_DIR)
    want_table, want_summary = check_stage(x, ids, cfg)
    assert run_dir.read_table(NEIGHBORS_DIR).equals(want_table)
    for key in ("histogram", "thresholds", "paper_bins", "n_pairs"):
        assert summary[key] == want_summary[key]


def crash_after_tiles(monkeypatch, run_dir, cfg: SimilarityConfig, n: int) -> None:
    """Run the stage until the driver has folded ``n`` tiles in, then crash it; the next run is a plain rerun."""
    added = []
    real_add = reduce.Reduction.add

    def crash_after_some(self, tile, stats):
        if len(added) == n:
            raise KeyboardInterrupt("simulated driver crash")
        added.append(tile)
        real_add(self, tile, stats)

    monkeypatch.setattr(reduce.Reduction, "add", crash_after_some)
    with pytest.raises(KeyboardInterrupt):
        run_similarity(run_dir, cfg)
    monkeypatch.setattr(reduce.Reduction, "add", real_add)


def test_stale_checkpoint_is_ignored(run_dir) -> None:
    red = reduce.Reduction(5, 2, 3, 10)
    reduce.save_checkpoint(run_dir, red, np.ones(4, bool), "old")
    assert not reduce.load_checkpoint(run_dir, reduce.Reduction(5, 2, 3, 10), 4, "new").any()
    assert reduce.load_checkpoint(run_dir, reduce.Reduction(5, 2, 3, 10), 4, "old").all()
    assert not reduce.load_checkpoint(run_dir, reduce.Reduction(5, 2, 3, 10), 6, "old").any()


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approx_mode_reports_measured_quality(ray_local, one_tile_per_task) -> None:
    """Approximate results are true similarities; recall and count errors equal a brute-force recount."""
    n, k = 300, 5
    x = clustered(n, 16, 12, 0.35, seed=3)
    ids = np.arange(n) + 100
    cfg = SimilarityConfig(
        mode="approx", n_partitions=10, nprobe=2, top_k=k, block_size=16, sample_size=n, thresholds=(0.5, 0.9)
    )
    table, summary = compute_similarity(x, ids, cfg, progress=False)
    hist, counts, vals, idx = oracle(x, k, (0.5, 0.9), cfg.bins)
    got_idx = np.array(table.column("nn_ids").to_pylist()) - 100
    got_vals = np.array(table.column("nn_sims").to_pylist(), np.float32)
    found = got_idx >= 0
    true = (x[:, None, :] * x[np.maximum(got_idx, 0)]).sum(-1)
    np.testing.assert_allclose(got_vals[found], true[found], atol=1e-5)
    got_counts = np.array([table.column(threshold_column(t)).to_pylist() for t in (0.5, 0.9)])
    assert (got_counts <= counts).all()
    quality = summary["approx"]
    recall = sum(np.isin(g[g >= 0], w).sum() for g, w in zip(got_idx, idx, strict=True)) / idx.size
    assert quality["recall_at_k"] == pytest.approx(recall)
    assert quality["recall_at_1"] == pytest.approx(np.mean(got_idx[:, 0] == idx[:, 0]))
    for t, g, w in zip((0.5, 0.9), got_counts, counts, strict=True):
        assert quality["threshold_count_rel_error"][f"{t:g}"] == pytest.approx((w.sum() - g.sum()) / w.sum())
    assert summary["exact"] is False and summary["mode"] == "approx" and quality["sample_size"] == n
    assert quality["partition_device"] == "cpu" and quality["partition_device_note"] == ""
    assert summary["inexact_reasons"] == [stage.inexact_reasons("approx", "fp32")[0]]
    assert "partitions" in summary["inexact_reasons"][0]
    assert sum(summary["histogram"]["counts"]) == n * (n - 1) // 2
    assert 0 < quality["pair_fraction_computed"] < 1 and quality["recall_at_k"] > 0.8
    full = compute_similarity(x, ids, dataclasses.replace(cfg, nprobe=10), progress=False)[1]
    assert full["approx"]["recall_at_k"] == 1.0 and full["histogram"]["counts"] == hist.tolist()


@pytest.mark.parametrize(
    "mode, precision, words",
    [
        ("exact", "fp32", ["counts are exact (all pairs)"]),
        ("approx", "fp32", ["approximate (approximate mode", "k-means partitions"]),
        ("exact", "bf16", ["approximate (bf16 products"]),
        ("approx", "fp16", ["k-means partitions", "fp16 products"]),
    ],
)
def test_report_says_why_similarity_is_inexact(run_dir, mode: str, precision: str, words: list[str]) -> None:
    """summary.json names the cause (approximate mode, half precision); the report repeats it, not a guess."""
    from enrich_dist.report import sections
    from enrich_dist.report.page import ReportPage

    reasons = stage.inexact_reasons(mode, precision)
    assert bool(reasons) == (mode != "exact" or precision != "fp32")
    summary = {
        "n_images": 3,
        "n_pairs": 3,
        "exact": not reasons,
        "inexact_reasons": reasons,
        "mode": mode,
        "precision": precision,
        "thresholds": {},
    }
    text = " ".join(str(p) for p in sections.redundancy(ReportPage(run_dir), summary))
    for w in words:
        assert w in text
    if precision != "fp32" and mode == "exact":
        assert "partitions" not in text
    # summaries written before the reasons existed: mode and precision decide the words
    old = {k: v for k, v in summary.items() if k != "inexact_reasons"}
    text = " ".join(str(p) for p in sections.redundancy(ReportPage(run_dir), old))
    assert ("partitions" in text) == (mode == "approx") and (f"{precision} products" in text) == (
        precision != "fp32"
    )


def test_exact_rows_and_sample_quality_against_oracle() -> None:
    x = sign_vectors(50, seed=8)
    hist, counts, vals, idx = oracle(x, 7, THRESHOLDS, 4)
    rows = np.array([0, 3, 17, 49])
    got_vals, got_idx, got_counts = approx.exact_rows(x, rows, 7, list(THRESHOLDS))
    np.testing.assert_array_equal(got_idx, idx[rows])
    np.testing.assert_array_equal(got_vals, vals[rows])
    np.testing.assert_array_equal(got_counts, counts[:, rows])
    q = approx.sample_quality(got_idx, got_counts // 2, idx[rows], counts[:, rows], list(THRESHOLDS))
    assert q["recall_at_k"] == 1.0 and q["sample_size"] == 4
    for t, c in zip(THRESHOLDS, counts[:, rows], strict=True):
        want = (c.sum() - (c // 2).sum()) / c.sum() if c.sum() else 0.0
        assert q["threshold_count_rel_error"][f"{t:g}"] == pytest.approx(want)


@pytest.mark.parametrize("bins", [1, 3, 256, 257, 1000])
def test_histogram_bin_counts(bins: int) -> None:
    """Few and many bins (the CPU kernel stores bins as bytes up to 256, as int32 past it)."""
    x = exact_unit_vectors(60, 8, seed=bins)
    for kernel_fn in (tile_stats, torch_cpu):
        assert_same(tiled(x, 3, THRESHOLDS, bins, 16, kernel_fn), oracle(x, 3, THRESHOLDS, bins))


@pytest.mark.parametrize("bins", [1, 2, 3, 7, 40, 200, 257, 1000])
def test_row_histogram_bound_is_a_tight_lower_bound(bins: int) -> None:
    """A row without a floor is binned through its own histogram, whose k-th best bin bounds its k-th best entry."""
    rng = np.random.default_rng(bins)
    edges32 = histogram_edges(bins).astype(np.float32)
    half, top = bins / 2, bins - 0.5
    for trial in range(30):
        row = rng.uniform(-1.0, 1.0, 60).astype(np.float32)
        row[: trial % 7] = rng.choice(
            np.concatenate([edges32, np.float32([1.0000001, -1.0000001])]), trial % 7
        )
        for k in (1, 3, 10, 60):
            bins_buf = np.zeros(len(row), np.uint8 if bins <= 256 else np.int32)
            local, hist = np.zeros(bins, np.int64), np.zeros(bins, np.int64)
            bound = kernel._bin_row_bound(row, half, top, bins_buf, local, hist, k)
            np.testing.assert_array_equal(
                hist, np.histogram(np.clip(row.astype(np.float64), -1, 1), histogram_edges(bins))[0]
            )
            assert not local.any()
            kth = np.sort(row)[-k]
            kth_bin = min(int(np.floor((float(kth) + 1.0) * half)), bins - 1)
            assert bound <= kth
            if kth_bin > 0:
                assert bound >= kth_bin / half - 1.0 - 2e-6
            else:
                assert bound == -np.inf


def test_embedding_matrix_reads_chunks_and_slices_and_refuses_nulls() -> None:
    from enrich_dist.similarity.source import embedding_matrix

    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3)
    # chunks that are slices of one array: each carries an offset into the shared values
    chunked = pa.chunked_array([column.slice(0, 2), column.slice(2, 4), column.slice(6, 1)])
    assert np.array_equal(embedding_matrix(chunked), x)
    assert embedding_matrix(pa.chunked_array([], type=column.type)).shape == (0, 3)
    with_null = pa.FixedSizeListArray.from_arrays(
        pa.array(x.reshape(-1)), 3, mask=pa.array([False] * 6 + [True])
    )
    with pytest.raises(ValueError, match="1 embeddings are missing"):
        embedding_matrix(pa.chunked_array([with_null]))


def test_workers_warm_up_only_for_the_exact_cpu_kernel(ray_local) -> None:
    from enrich_dist.runtime import cluster_resources
    from enrich_dist.similarity.stage import warm_workers

    refs = warm_workers(SimilarityConfig(device="cpu"))
    assert len(refs) == cluster_resources().cpus and ray_local.get(refs) == [None] * len(refs)
    assert warm_workers(SimilarityConfig(mode="approx")) == []


def test_gpu_partitions_fall_back_to_the_cpu_and_say_why() -> None:
    """Asked for a GPU, a FAISS without one (this machine's faiss-cpu) partitions on the CPU, identically, and says so."""
    x = clustered(400, 16, 12, 0.35, seed=5)
    cpu = approx.partition(x, 12, 3, seed=0, threads=1)
    gpus, why = approx.faiss_gpus()
    if gpus:
        pytest.skip("FAISS sees a GPU here: the fallback is for machines without one")
    asked = approx.partition(x, 12, 3, seed=0, threads=1, gpu=True)
    assert (asked.device, asked.device_note) == ("cpu", why) and why
    assert np.array_equal(asked.assignment, cpu.assignment) and asked.pairs == cpu.pairs
    assert cpu.device == "cpu" and cpu.device_note == ""


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_stage_with_the_gpu_kernels_on_cpu_equals_the_oracle(ray_local, kernel: str) -> None:
    """The stage runs the torch and the fused Triton kernel (Triton's interpreter on CPU workers) exactly."""
    x = exact_unit_vectors(70, 8, seed=21, duplicates=12)
    ids = np.arange(70)[::-1].copy()
    cfg = SimilarityConfig(block_size=32, top_k=5, device="cpu", kernel=kernel, edge_threshold=0.5)
    _, summary = check_stage(x, ids, cfg)
    assert summary["kernel"] == kernel
    _, _, edges = stage.compute_similarity_edges(x, ids, cfg, progress=False)
    _, _, want = stage.compute_similarity_edges(x, ids, dataclasses.replace(cfg, kernel="auto"), progress=False)
    assert edges.equals(want) and edges.num_rows > 0


def test_kernel_choice_follows_device_and_what_is_installed(monkeypatch) -> None:
    assert stage._backend(SimilarityConfig(), "cpu") == "numba"
    assert stage._backend(SimilarityConfig(), "cuda") == "triton"  # triton is in the test extra
    assert stage._backend(SimilarityConfig(kernel="torch"), "cuda") == "torch"
    monkeypatch.setattr(stage.importlib.util, "find_spec", lambda name: None)
    assert stage._backend(SimilarityConfig(), "cuda") == "torch"
    with pytest.raises(ValueError, match="pip install triton"):
        stage._backend(SimilarityConfig(kernel="triton"), "cpu")


@pytest.mark.parametrize("plan", ["exact", "partitions"])
def test_tile_tasks_get_pieces_of_their_own_rows(ray_local, plan: str) -> None:
    """The object store holds each row range the tiles read once; every row lies in exactly one piece."""
    from enrich_dist.similarity.plan import partition_tile_plan

    x = exact_unit_vectors(53, 8, seed=2)
    if plan == "exact":
        tiles = tile_plan(53, 16)
    else:
        tiles = partition_tile_plan(np.array([0, 7, 30, 31, 53]), [(0, 0), (0, 2), (1, 1), (1, 3), (2, 2), (3, 3)], 8)
    pieces = stage.put_pieces(x, tiles)
    covered = np.zeros(53, int)
    for (start, stop), ref in pieces.items():
        np.testing.assert_array_equal(ray_local.get(ref), x[start:stop])
        covered[start:stop] += 1
    read = {(t[0], t[1]) for t in tiles} | {(t[2], t[3]) for t in tiles}
    assert set(pieces) == read and covered.max() == 1


def test_stage_streams_blocks_from_the_shards_without_reading_the_matrix(ray_local, run_dir, monkeypatch) -> None:
    """Exact mode: loader tasks read the blocks from shards of awkward sizes; the driver never reads the matrix."""
    from enrich_dist.similarity import source as source_module

    x = exact_unit_vectors(61, 8, seed=13, duplicates=9)
    ids = np.arange(61) * 3 + 5
    write_embeddings(run_dir, x, ids, shards=4)  # 16, 15, 15, 15 rows: blocks of 8 straddle shards
    src = source_module.ShardSource.open(run_dir)
    assert src is not None and src.ids.tolist() == ids.tolist() and src.dim == 8
    assert src.spans(14, 33) == [(src.paths[0], 14, 16), (src.paths[1], 0, 15), (src.paths[2], 0, 2)]
    pieces, digests = src.load([(0, 8), (14, 33), (60, 61)])
    for (a, b), ref in pieces.items():
        np.testing.assert_array_equal(ray_local.get(ref), x[a:b])
    assert len(digests) == 3 and len(set(digests)) == 3
    monkeypatch.setattr(stage, "_read_embeddings", lambda run: pytest.fail("exact mode must not read the matrix"))
    cfg = SimilarityConfig(block_size=8, top_k=4, edge_threshold=0.5)
    run_similarity(run_dir, cfg)
    want, summary = check_stage(x, ids, cfg)
    assert run_dir.read_table(NEIGHBORS_DIR).equals(want)
    assert run_dir.read_json("similarity/summary.json")["histogram"] == summary["histogram"]


def test_stage_reads_shards_whole_when_ids_do_not_increase(ray_local, run_dir) -> None:
    x = exact_unit_vectors(40, 8, seed=14, duplicates=4)
    ids = np.arange(40)[::-1].copy()  # shards hold descending ids: blocks of sorted ids are not shard ranges
    write_embeddings(run_dir, x, ids, shards=3)
    from enrich_dist.similarity.source import ShardSource

    assert ShardSource.open(run_dir) is None
    cfg = SimilarityConfig(block_size=16, top_k=3)
    run_similarity(run_dir, cfg)
    assert run_dir.read_table(NEIGHBORS_DIR).equals(check_stage(x, ids, cfg)[0])


def test_streamed_blocks_name_bad_embeddings(ray_local, run_dir) -> None:
    x = exact_unit_vectors(30, 8, seed=15)
    x[[3, 22]] *= 2.0
    write_embeddings(run_dir, x, np.arange(30) + 100, shards=2)
    with pytest.raises(ValueError, match=r"2 rows are not \(image ids \[103, 122\]"):
        run_similarity(run_dir, SimilarityConfig(block_size=8, top_k=3))
    assert not run_dir.is_done("similarity")
