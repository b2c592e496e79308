"""The approximate mode streamed (scan, k-means on a sample, scatter, gather, tiles) against a brute force.

The oracle recomputes the partitions from the whole matrix (``approx.partition``: the same k-means sample
and assignment) and compares every image with every image of the partitions it is compared with.
Blocks and groups are made tiny so that blocks straddle shards and partitions straddle blocks.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_similarity import clustered, write_embeddings

from enrich_dist.config import SimilarityConfig
from enrich_dist.schema import EDGES_DIR, NEIGHBORS_DIR, threshold_column
from enrich_dist.similarity import approx, partitioned, stage
from enrich_dist.similarity.stage import compute_similarity, compute_similarity_edges, run_similarity

THRESHOLDS = (0.5, 0.9)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(partitioned, "SCAN_ROWS", 37)
    monkeypatch.setattr(partitioned, "GROUP_ROWS", 50)
    monkeypatch.setattr(stage, "MIN_TASK_PAIRS", 1)


def brute_force(x: np.ndarray, cfg: SimilarityConfig):
    """Top-k, counts and edges over the compared pairs only, from partitions of the whole matrix."""
    n = len(x)
    parts = approx.partition(x, cfg.n_partitions, cfg.nprobe, cfg.seed, threads=1)
    compared = approx.covered_pairs(parts.pairs, len(parts.bounds) - 1)[parts.assignment][:, parts.assignment]
    np.fill_diagonal(compared, False)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    s[~compared] = -np.inf
    counts = np.array([(s > t).sum(axis=1) for t in THRESHOLDS])
    idx = np.array([sorted(range(n), key=lambda j: (-s[i, j], j))[: cfg.top_k] for i in range(n)])
    vals = np.take_along_axis(s, idx, axis=1)
    idx[np.isneginf(vals)] = -1
    i, j = np.nonzero(np.triu(s > cfg.edge_threshold, 1))
    return idx, vals, counts, (i, j), int(np.triu(compared, 1).sum())


def test_streamed_approx_stage_equals_a_brute_force_over_compared_partitions(
    ray_local, run_dir, small_blocks, monkeypatch
) -> None:
    n = 301
    x = clustered(n, 8, 14, 0.4, seed=21)
    ids = np.arange(n) * 2 + 7
    write_embeddings(run_dir, x, ids, shards=4)  # 76, 75, 75, 75 rows; scan blocks of 37 straddle them
    monkeypatch.setattr(stage, "_read_embeddings", lambda run: pytest.fail("approx mode must not read the matrix"))
    cfg = SimilarityConfig(
        mode="approx", n_partitions=9, nprobe=2, top_k=5, block_size=16, sample_size=40, thresholds=THRESHOLDS,
        edge_threshold=0.8,
    )
    run_similarity(run_dir, cfg)
    table = run_dir.read_table(NEIGHBORS_DIR)
    idx, vals, counts, (ei, ej), compared_pairs = brute_force(x, cfg)
    got_idx = np.array(table.column("nn_ids").to_pylist())
    np.testing.assert_array_equal(np.where(got_idx >= 0, (got_idx - 7) // 2, -1), idx)
    got_vals = np.array(table.column("nn_sims").to_pylist(), np.float64)
    np.testing.assert_allclose(got_vals[idx >= 0], vals[idx >= 0], atol=1e-5)
    assert np.isneginf(got_vals[idx < 0]).all()
    for t, want in zip(THRESHOLDS, counts, strict=True):
        np.testing.assert_array_equal(table.column(threshold_column(t)).to_numpy(), want)
    edges = run_dir.read_table(EDGES_DIR)
    got_edges = set(zip(edges.column("i").to_pylist(), edges.column("j").to_pylist(), strict=True))
    assert len(got_edges) == edges.num_rows and got_edges == set(zip(ids[ei].tolist(), ids[ej].tolist(), strict=True))
    summary = run_dir.read_json("similarity/summary.json")
    quality = summary["approx"]
    assert quality["pairs_computed"] == compared_pairs and sum(summary["histogram"]["counts"]) == n * (n - 1) // 2
    # the sample's brute force: recall of the approximate lists among its true top-k
    sample = approx.quality_sample(n, cfg.sample_size, cfg.seed)
    true = approx.exact_rows(x, sample, cfg.top_k, list(THRESHOLDS))[1]
    found = sum(np.isin(g[g >= 0], t).sum() for g, t in zip(idx[sample], true, strict=True))
    assert quality["recall_at_k"] == pytest.approx(found / true.size) and quality["sample_size"] == 40
    assert quality["n_partitions"] == 9 and 0 < quality["pair_fraction_computed"] < 1
    # the scratch files are gone once the stage is committed; the in-memory path gives the same table
    assert not run_dir.exists(partitioned.SCRATCH_DIR)
    assert compute_similarity(x, ids, cfg, progress=False)[0].equals(table)


def test_streamed_approx_reuses_its_centroids_on_a_rerun(ray_local, run_dir, small_blocks, caplog) -> None:
    n = 120
    x = clustered(n, 8, 6, 0.4, seed=22)
    cfg = SimilarityConfig(mode="approx", n_partitions=5, nprobe=2, top_k=3, block_size=16, sample_size=20)
    first = compute_similarity_edges(x, np.arange(n), cfg, progress=False, run=run_dir)
    assert run_dir.exists(partitioned.PARTITIONS)
    with caplog.at_level(logging.INFO, logger="enrich_dist.similarity"):
        again = compute_similarity_edges(x, np.arange(n), cfg, progress=False, run=run_dir)
    assert any("reusing k-means centroids" in r.message for r in caplog.records)
    assert again[0].equals(first[0]) and again[2].equals(first[2])
    assert {k: v for k, v in again[1].items() if k not in ("seconds", "tiles")} == {
        k: v for k, v in first[1].items() if k not in ("seconds", "tiles")
    }


def test_streamed_approx_names_bad_embeddings(ray_local, run_dir, small_blocks) -> None:
    x = clustered(90, 8, 5, 0.4, seed=23)
    x[[3, 80]] *= 2.0
    write_embeddings(run_dir, x, np.arange(90) + 100, shards=2)
    with pytest.raises(ValueError, match=r"2 rows are not \(image ids \[103, 180\]"):
        run_similarity(run_dir, SimilarityConfig(mode="approx", n_partitions=4, top_k=3))
    assert not run_dir.is_done("similarity")


def test_missing_histogram_keeps_the_total_and_the_shape() -> None:
    sampled = np.array([0, 3, 1, 0, 6])
    got = approx.missing_histogram(sampled, 101)
    assert got.sum() == 101 and got.dtype == np.int64
    np.testing.assert_allclose(got, sampled * 10.1, atol=1)
    assert approx.missing_histogram(sampled, 0).sum() == 0 and approx.missing_histogram(np.zeros(5, int), 9).sum() == 0


@pytest.mark.parametrize("sizes, rows, want", [
    ([5, 5, 5], 10, [(0, 2), (2, 3)]),
    ([12, 1, 1], 10, [(0, 1), (1, 3)]),
    ([0, 0, 4], 3, [(0, 3)]),
    ([3], 1, [(0, 1)]),
])
def test_partition_groups_hold_whole_partitions(sizes, rows, want) -> None:
    assert partitioned._groups(np.array(sizes), rows) == want


def test_sample_rows_against_blocks_merge_to_the_brute_force_with_ties(monkeypatch) -> None:
    """The scatter tasks' brute force for the quality sample: blocks and chunks of awkward sizes, many ties."""
    from test_similarity import oracle, sign_vectors

    from enrich_dist.similarity.kernel import merge_topk

    monkeypatch.setattr(approx, "EXACT_CHUNK", 16)
    x = sign_vectors(130, seed=9)
    _, counts, vals, idx = oracle(x, 6, THRESHOLDS, 4)
    rows = np.array([0, 5, 36, 37, 64, 129])
    got_vals = np.full((len(rows), 6), -np.inf, np.float32)
    got_idx = np.full((len(rows), 6), -1, np.int64)
    got_counts = np.zeros((len(THRESHOLDS), len(rows)), np.int64)
    for a, b in [(0, 37), (37, 90), (90, 130)]:
        v, i, c = approx.rows_against_block(x[rows], rows, x[a:b], a, 6, list(THRESHOLDS))
        got_vals, got_idx = merge_topk(got_vals, got_idx, v, i, 6)
        got_counts += c
    np.testing.assert_array_equal(got_idx, idx[rows])
    np.testing.assert_array_equal(got_vals, vals[rows])
    np.testing.assert_array_equal(got_counts, counts[:, rows])


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_read_spans_decodes_in_batches_and_takes_only_the_span(run_dir, monkeypatch, batch) -> None:
    from enrich_dist.similarity import source

    monkeypatch.setattr(source, "READ_BATCH", batch)
    x = clustered(61, 5, clusters=4, spread=0.1, seed=4)
    write_embeddings(run_dir, x, np.arange(61), shards=3)  # shards of 21, 20, 20 rows
    names = sorted(run_dir.shards("embeddings").values())
    spans = [(names[0], 5, 21), (names[1], 0, 20), (names[2], 3, 9), (names[2], 9, 9)]
    block = source.read_spans(run_dir.uri, None, spans, 5)
    assert block.dtype == np.float32 and block.flags.c_contiguous
    assert np.array_equal(block, np.concatenate([x[5:21], x[21:41], x[44:50]]))
    with pytest.raises(ValueError, match="dimension 5 and 6"):
        source.read_spans(run_dir.uri, None, spans[:1], 6)
