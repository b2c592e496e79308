"""The similarity stage: tiles as Ray tasks, an incremental reduce on the driver, artifacts in the run dir."""

from __future__ import annotations

import logging
import math
import posixpath
import time
from collections.abc import Iterator

import faiss
import numpy as np
import pyarrow as pa
import ray
import torch
from threadpoolctl import threadpool_limits

from ..config import SimilarityConfig
from ..runtime import cluster_resources
from ..schema import EMBEDDINGS_DIR, NEIGHBORS_DIR, SIMILARITY_DIR, neighbors_schema
from ..storage import DONE_NAME, RunDir, shard_name
from .kernel import NORM_LIMIT, TileStats, merge_topk, tile_stats
from .plan import Tile, group_tiles, histogram_edges, schedule, tile_plan

log = logging.getLogger("enrich_dist.similarity")

PAPER_THRESHOLDS = (0.5, 0.7, 0.9)
SHARD_ROWS = 50_000
MIN_TASK_PAIRS = 1 << 22
SUMMARY = posixpath.join(SIMILARITY_DIR, "summary.json")


def _tile_group(
    x: np.ndarray,
    tiles: list[Tile],
    floors: list[tuple[np.ndarray | None, np.ndarray | None]],
    k: int,
    thresholds: list[float],
    edges: np.ndarray,
) -> list[tuple[Tile, TileStats]]:
    """Ray task body: a few tiles, with BLAS, OpenMP (FAISS) and torch threads set to the task's CPUs."""
    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    with threadpool_limits(limits=threads):
        return [
            (
                tile,
                tile_stats(
                    x[tile[0] : tile[1]],
                    x[tile[2] : tile[3]],
                    tile[0] == tile[2],
                    k,
                    thresholds,
                    edges,
                    row_offset=tile[0],
                    col_offset=tile[2],
                    row_floor=row_floor,
                    col_floor=col_floor,
                ),
            )
            for tile, (row_floor, col_floor) in zip(tiles, floors, strict=True)
        ]


_tile_task = ray.remote(num_cpus=1)(_tile_group)


class _Reduction:
    """Driver-side state, O(N k + N T + bins): merged top-k, per-image threshold counts, histogram."""

    def __init__(self, n: int, k: int, n_thresholds: int, bins: int):
        self.k = k
        self.vals = np.full((n, k), -np.inf, np.float32)
        self.idx = np.full((n, k), -1, np.int64)
        self.counts = np.zeros((n_thresholds, n), np.int64)
        self.hist = np.zeros(bins, np.int64)

    def floors(self, tile: Tile) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per row and per column of ``tile``: entries below these cannot enter that image's top-k."""
        if self.k == 0:
            return None, None
        r0, r1, c0, c1 = tile
        return self._floor(r0, r1, c0), self._floor(c0, c1, r0)

    def _floor(self, start: int, stop: int, first_neighbor: int) -> np.ndarray:
        kth_vals, kth_idx = self.vals[start:stop, -1], self.idx[start:stop, -1]
        # every neighbour in the tile has a larger index than a k-th neighbour below it, so ties lose
        strict = (kth_idx >= 0) & (kth_idx < first_neighbor)
        return np.where(strict, np.nextafter(kth_vals, np.float32(np.inf)), kth_vals)

    def add(self, tile: Tile, stats: TileStats) -> None:
        r0, r1, c0, c1 = tile
        self.counts[:, r0:r1] += stats.row_counts
        self.counts[:, c0:c1] += stats.col_counts
        self.hist += stats.hist
        if self.k:
            self.vals[r0:r1], self.idx[r0:r1] = merge_topk(
                self.vals[r0:r1], self.idx[r0:r1], stats.row_vals, stats.row_idx, self.k
            )
            self.vals[c0:c1], self.idx[c0:c1] = merge_topk(
                self.vals[c0:c1], self.idx[c0:c1], stats.col_vals, stats.col_idx, self.k
            )


def _run_tiles(
    x: np.ndarray, reduction: _Reduction, cfg: SimilarityConfig, thresholds: list[float], progress: bool
) -> None:
    """Submit tile groups through a bounded window, reducing each result as it completes."""
    tiles = schedule(tile_plan(len(x), cfg.block_size))
    groups: Iterator[list[Tile]] = iter(group_tiles(tiles, MIN_TASK_PAIRS))
    edges = histogram_edges(cfg.bins)
    x_ref = ray.put(x)
    window = 2 * max(1, cluster_resources().cpus)
    pending: dict[ray.ObjectRef, int] = {}

    def submit() -> None:
        group = next(groups, None)
        if group is not None:
            floors = [reduction.floors(tile) for tile in group]
            pending[_tile_task.remote(x_ref, group, floors, reduction.k, thresholds, edges)] = len(group)

    for _ in range(window):
        submit()
    start, done, logged = time.perf_counter(), 0, 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            pending.pop(ref)
            for tile, stats in ray.get(ref):
                reduction.add(tile, stats)
                done += 1
            submit()
        if progress and (10 * done // len(tiles) > logged or not pending):
            logged = 10 * done // len(tiles)
            elapsed = time.perf_counter() - start
            log.info(
                "similarity: %d/%d tiles (%.0f%%), %.2f tiles/s",
                done,
                len(tiles),
                100 * done / len(tiles),
                done / max(elapsed, 1e-9),
            )


def _summary(
    n: int,
    pairs_above: dict[float, int],
    reduction: _Reduction,
    cfg: SimilarityConfig,
    edges: np.ndarray,
    thresholds: list[float],
    seconds: float,
) -> dict:
    """The ``similarity/summary.json`` record."""
    n_pairs = n * (n - 1) // 2

    def fraction(count: int, total: int) -> float:
        return count / total if total else 0.0

    per_threshold = {}
    for t in cfg.thresholds:
        with_neighbor = int(np.count_nonzero(reduction.counts[thresholds.index(float(t))]))
        per_threshold[f"{t:g}"] = {
            "pairs": pairs_above[float(t)],
            "pair_fraction": fraction(pairs_above[float(t)], n_pairs),
            "images_with_neighbor": with_neighbor,
            "image_fraction": fraction(with_neighbor, n),
        }
    low, mid, high = (pairs_above[t] for t in PAPER_THRESHOLDS)
    paper = {"<=0.5": n_pairs - low, "0.5-0.7": low - mid, "0.7-0.9": mid - high, ">0.9": high}
    return {
        "n_images": n,
        "n_pairs": n_pairs,
        "histogram": {"edges": edges.tolist(), "counts": reduction.hist.tolist()},
        "thresholds": per_threshold,
        "paper_bins": {name: {"pairs": c, "fraction": fraction(c, n_pairs)} for name, c in paper.items()},
        "exact": True,
        "block_size": cfg.block_size,
        "top_k": cfg.top_k,
        "seconds": seconds,
    }


def _neighbors_table(
    ids: np.ndarray, reduction: _Reduction, cfg: SimilarityConfig, thresholds: list[float]
) -> pa.Table:
    """One row per image, sorted by ``image_id``, neighbours best first."""
    n, k = reduction.idx.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    columns = {
        "image_id": pa.array(ids),
        "max_sim": pa.array(reduction.vals[:, 0]) if k else pa.nulls(n, pa.float32()),
        "nn_ids": pa.ListArray.from_arrays(offsets, pa.array(ids[reduction.idx].reshape(-1))),
        "nn_sims": pa.ListArray.from_arrays(offsets, pa.array(reduction.vals.reshape(-1))),
    }
    schema = neighbors_schema(cfg.thresholds)
    for t, name in zip(cfg.thresholds, schema.names[4:], strict=True):
        columns[name] = pa.array(reduction.counts[thresholds.index(float(t))])
    return pa.Table.from_pydict(columns, schema=schema)


def compute_similarity(
    x: np.ndarray, ids: np.ndarray, cfg: SimilarityConfig, progress: bool = True
) -> tuple[pa.Table, dict]:
    """Exact all-pairs similarity of L2-normalised rows ``x``: the neighbors table and the summary."""
    start = time.perf_counter()
    x = np.asarray(x, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if x.ndim != 2 or len(ids) != len(x):
        raise ValueError(f"need a 2-d embedding matrix and one id per row, got {x.shape} and {ids.shape}")
    norms = np.linalg.norm(x, axis=1)
    if len(x) and norms.max() > NORM_LIMIT:
        raise ValueError(f"embeddings must be L2-normalised: a row has norm {norms.max():.4g} > {NORM_LIMIT}")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    if any(not -1.0 <= t < 1.0 for t in cfg.thresholds):
        raise ValueError(f"thresholds must lie in [-1, 1), got {cfg.thresholds}")
    order = np.argsort(ids, kind="stable")
    ids, x = ids[order], np.ascontiguousarray(x[order])
    n = len(x)
    thresholds = sorted({float(t) for t in cfg.thresholds} | set(PAPER_THRESHOLDS))
    reduction = _Reduction(n, min(cfg.top_k, max(n - 1, 0)), len(thresholds), cfg.bins)
    if progress:
        log.info(
            "similarity: %d images, dim %d, block %d, top-%d", n, x.shape[1], cfg.block_size, reduction.k
        )
    _run_tiles(x, reduction, cfg, thresholds, progress)
    pairs_above = {t: int(reduction.counts[i].sum()) // 2 for i, t in enumerate(thresholds)}
    table = _neighbors_table(ids, reduction, cfg, thresholds)
    seconds = time.perf_counter() - start
    summary = _summary(n, pairs_above, reduction, cfg, histogram_edges(cfg.bins), thresholds, seconds)
    if progress:
        log.info("similarity: %d pairs in %.1f s", summary["n_pairs"], seconds)
    return table, summary


def _read_embeddings(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """The embeddings artifact as a float32 matrix and its image ids."""
    if not run.shards(EMBEDDINGS_DIR):
        raise FileNotFoundError(
            f"no embeddings under {run.uri_of(EMBEDDINGS_DIR)}: run `enrich embed --output {run.uri}` first"
        )
    table = run.read_table(EMBEDDINGS_DIR, columns=["image_id", "embedding"])
    embedding = table.column("embedding").combine_chunks()
    dim = embedding.type.list_size
    x = embedding.flatten().to_numpy(zero_copy_only=False).reshape(len(table), dim)
    return x, table.column("image_id").to_numpy()


def run_similarity(run: RunDir, cfg: SimilarityConfig) -> dict:
    """The stage: read embeddings, write ``similarity/neighbors`` shards and ``summary.json``, mark done."""
    if run.is_done(SIMILARITY_DIR):
        log.info("similarity: already done in %s, skipping", run.uri)
        return run.read_json(posixpath.join(SIMILARITY_DIR, DONE_NAME))
    x, ids = _read_embeddings(run)
    table, summary = compute_similarity(x, ids, cfg)
    run.remove(NEIGHBORS_DIR)
    n_shards = max(1, math.ceil(len(table) / SHARD_ROWS))
    rows = math.ceil(len(table) / n_shards)
    for i in range(n_shards):
        run.write_table(posixpath.join(NEIGHBORS_DIR, shard_name(i)), table.slice(i * rows, rows))
    run.write_json(SUMMARY, summary)
    run.mark_done(SIMILARITY_DIR, summary)
    return summary
