"""Farthest-first within k-means cells (``--mode cells``): a ranking whose cost grows as N x cell size, not N^2.

A complete farthest-first ranking folds every pick into every candidate: about N^2 / 2 similarity
products, about 20 hours for 10^7 images on 2 cores (12.2 min measured at 10^6). This rule splits the images into cells of about
``cell_size`` by spherical k-means and runs exact farthest-first (``greedy.rank``) inside each cell,
started from the seeds in the cell (a cell holding no seed borrows those of the nearest cell that
holds some). The cells' pick sequences are merged by (score, row).

What it computes, exactly: the farthest-first ranking under a similarity that keeps the pairs within
a cell and the pairs between a cell's images and the seeds it uses, and drops every other pair. Within
a cell the picks' (score, row) keys strictly increase (scores only rise and ties go to the lower row),
so merging the cells by that key is the same as running the masked farthest-first one pick at a time
over the whole archive. Tests check it against that dense loop.

What it gives up: an image near a cell border is not seen as redundant with a pick across the border,
so borders are covered twice. How much that costs is measured, not assumed
(``benchmarks/selection_quality.py --rules exact,cells``, ``benchmarks/scale.py``). With one cell
(archives up to about 1.5 x ``cell_size``) the ranking is the exact one.

Vectors above ``IN_MEMORY_BYTES`` are read into a memory-mapped file in ``TMPDIR`` (removed after), and
cells go to Ray tasks in groups of about ``GROUP_ROWS`` rows through the object store, a bounded
number at a time, so no process holds the N x d matrix on its heap.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from ..runtime import cluster_resources
from ..storage import RunDir
from .greedy import Ranking, Settings, rank
from .inputs import Part
from .shard import Shard

log = logging.getLogger("enrich_dist.selection")

CELLS_MODE = "cells"
GROUP_ROWS = 1 << 17
IN_MEMORY_BYTES = 1 << 30
KMEANS_POINTS = 256  # training rows per cell
KMEANS_ITERATIONS = 20
ASSIGN_ROWS = 1 << 16
FLAT_CELLS = 256


def cell_count(n: int, cell_size: int) -> int:
    """How many cells hold ``n`` images at about ``cell_size`` each (at least one)."""
    return max(1, round(n / max(1, cell_size)))


@dataclass
class Cells:
    """Images sorted by cell (``perm``), cell c's images ``perm[bounds[c]:bounds[c + 1]]``, centroids."""

    perm: np.ndarray
    bounds: np.ndarray
    centroids: np.ndarray
    assignment: np.ndarray

    @property
    def count(self) -> int:
        """Number of cells."""
        return len(self.bounds) - 1

    @classmethod
    def of(cls, assignment: np.ndarray, centroids: np.ndarray) -> Cells:
        """Cells from each image's cell (0 .. len(centroids) - 1)."""
        assignment = np.asarray(assignment, dtype=np.int64)
        perm = np.argsort(assignment, kind="stable")
        bounds = np.searchsorted(assignment[perm], np.arange(len(centroids) + 1)).astype(np.int64)
        return cls(perm, bounds, np.asarray(centroids, dtype=np.float32), assignment)


def make_cells(x: np.ndarray, n_cells: int, seed: int, threads: int = 1) -> Cells:
    """Spherical k-means cells of the rows of ``x``, in two levels above ``FLAT_CELLS`` cells.

    Flat k-means trains on 256 rows per cell and compares every row with every centroid (N x cells
    products); above ``FLAT_CELLS`` it first splits the rows into about sqrt(cells) coarse cells, then
    each coarse cell into its share of the cells, so training and assignment cost N x 2 sqrt(cells).
    """
    n, dim = x.shape
    n_cells = max(1, min(n_cells, n))
    if n_cells == 1:
        return Cells.of(np.zeros(n, dtype=np.int64), np.zeros((1, dim), dtype=np.float32))
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    everything = np.arange(n, dtype=np.int64)
    if n_cells <= FLAT_CELLS:
        centroids, assignment = _kmeans(x, everything, n_cells, seed)
        return Cells.of(assignment, centroids)
    coarse_centroids, coarse = _kmeans(x, everything, round(math.sqrt(n_cells)), seed)
    assignment = np.empty(n, dtype=np.int64)
    centroids = []
    offset = 0
    for c in range(len(coarse_centroids)):
        rows = np.flatnonzero(coarse == c)
        if len(rows) == 0:
            continue
        k = max(1, min(len(rows), round(len(rows) * n_cells / n)))
        if k == 1:
            fine_centroids, fine = coarse_centroids[c : c + 1], np.zeros(len(rows), dtype=np.int64)
        else:
            fine_centroids, fine = _kmeans(x, rows, k, seed + 1 + c)
        assignment[rows] = offset + fine
        centroids.append(fine_centroids)
        offset += len(fine_centroids)
    return Cells.of(assignment, np.concatenate(centroids))


def _kmeans(x: np.ndarray, rows: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means of ``x[rows]`` (sorted rows; trained on a seeded sample of 256 per centroid): centroids, cells."""
    import faiss

    dim = x.shape[1]
    size = min(len(rows), KMEANS_POINTS * k)
    sample = rows[np.sort(np.random.default_rng(seed).choice(len(rows), size=size, replace=False))]
    kmeans = faiss.Kmeans(
        dim, k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
        min_points_per_centroid=1, max_points_per_centroid=KMEANS_POINTS,
    )
    kmeans.train(_unit(np.asarray(x[sample], dtype=np.float32)))
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(centroids)
    assignment = np.empty(len(rows), dtype=np.int64)
    for start in range(0, len(rows), ASSIGN_ROWS):
        block = _unit(np.asarray(x[rows[start : start + ASSIGN_ROWS]], dtype=np.float32))
        assignment[start : start + len(block)] = index.search(block, 1)[1][:, 0]
    return centroids, assignment


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def seed_reach(cells: Cells, seeds: np.ndarray) -> list[np.ndarray]:
    """Per cell, the seed rows its images start from: its own, else those of the nearest cell holding any."""
    seed_cells = cells.assignment[seeds]
    by_cell = np.lexsort((seeds, seed_cells))
    cuts = np.searchsorted(seed_cells[by_cell], np.arange(cells.count + 1))
    own = [seeds[by_cell[cuts[c] : cuts[c + 1]]] for c in range(cells.count)]
    holding = np.flatnonzero([len(s) > 0 for s in own])
    if len(holding) == 0:
        raise ValueError("at least one seed row is needed")
    out = []
    for c in range(cells.count):
        if len(own[c]) or cells.bounds[c + 1] == cells.bounds[c]:
            out.append(own[c])
            continue
        sims = cells.centroids[holding] @ cells.centroids[c]
        out.append(own[holding[int(np.argmax(sims))]])
    return out


def rank_cell(vectors: np.ndarray, rows: np.ndarray, seed_mask: np.ndarray, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact farthest-first over one cell's ``rows`` (sorted, seeds marked); the non-seed picks and their scores."""
    local_seeds = np.flatnonzero(seed_mask)
    shard = Shard(np.arange(len(rows)), vectors)
    ranking = rank(shard, len(rows), local_seeds, Settings("exact", "max", 1, pool))
    picked = ~ranking.is_seed
    return rows[ranking.order[picked]], ranking.score[picked]


@ray.remote
def _rank_group(
    vectors: np.ndarray, rows: np.ndarray, seed_mask: np.ndarray, bounds: np.ndarray, pool: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rank_group` as a Ray task on one thread."""
    with threadpool_limits(limits=1):
        return rank_group(vectors, rows, seed_mask, bounds, pool)


def rank_group(
    vectors: np.ndarray, rows: np.ndarray, seed_mask: np.ndarray, bounds: np.ndarray, pool: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every cell of one group (cell c: positions ``bounds[c]:bounds[c + 1]``); picks and scores, concatenated."""
    out_rows, out_scores = [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        r, s = rank_cell(vectors[a:b], rows[a:b], seed_mask[a:b], pool)
        out_rows.append(r)
        out_scores.append(s)
    return np.concatenate(out_rows), np.concatenate(out_scores)


def merge(seeds: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> Ranking:
    """The whole ranking: seeds in their order, then every cell's picks by (score, row)."""
    order = np.lexsort((rows, scores))
    n_seeds, n_picks = len(seeds), len(rows)
    return Ranking(
        np.concatenate([np.asarray(seeds, dtype=np.int64), rows[order].astype(np.int64)]),
        np.concatenate([np.zeros(n_seeds, np.int32), np.arange(1, n_picks + 1, dtype=np.int32)]),
        np.concatenate([np.full(n_seeds, np.nan, np.float32), scores[order].astype(np.float32)]),
    )


def _groups(cells: Cells, reach: list[np.ndarray]) -> Iterator[list[int]]:
    """Consecutive cells in groups of about ``GROUP_ROWS`` rows (members plus seeds used)."""
    group: list[int] = []
    size = 0
    for c in range(cells.count):
        rows = int(cells.bounds[c + 1] - cells.bounds[c])
        if rows == 0:
            continue
        if group and size + rows > GROUP_ROWS:
            yield group
            group, size = [], 0
        group.append(c)
        size += rows + len(reach[c])
    if group:
        yield group


def _group_inputs(
    x: np.ndarray, cells: Cells, reach: list[np.ndarray], is_seed: np.ndarray, group: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One group's rows (each cell: members and seeds used, sorted), their vectors, seed marks and cell bounds."""
    parts = [np.union1d(cells.perm[cells.bounds[c] : cells.bounds[c + 1]], reach[c]) for c in group]
    rows = np.concatenate(parts)
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    order = np.argsort(rows, kind="stable")  # read the (possibly mapped) matrix in row order
    vectors = np.empty((len(rows), x.shape[1]), dtype=np.float32)
    vectors[order] = x[rows[order]]
    return vectors, rows, is_seed[rows], bounds


def rank_by_cells(
    x: np.ndarray, cells: Cells, seeds: np.ndarray, pool: int, in_flight: int
) -> tuple[Ranking, dict]:
    """One replicate's ranking over ``x`` (an array or a memory map) split into ``cells``; and what it cost."""
    n = len(x)
    seeds = np.asarray(seeds, dtype=np.int64)
    reach = seed_reach(cells, seeds)
    is_seed = np.zeros(n, dtype=bool)
    is_seed[seeds] = True
    started = time.perf_counter()
    pending: dict = {}
    got_rows: list[np.ndarray] = []
    got_scores: list[np.ndarray] = []
    groups = list(_groups(cells, reach))
    done, last_log = 0, time.perf_counter()

    def collect(wait_for: int) -> None:
        nonlocal done, last_log
        ready, _ = ray.wait(list(pending), num_returns=wait_for)
        for ref in ready:
            pending.pop(ref)
            rows, scores = ray.get(ref)
            got_rows.append(rows)
            got_scores.append(scores)
            done += 1
        if time.perf_counter() - last_log > 30:
            log.info("cells mode: %d of %d cell groups ranked", done, len(groups))
            last_log = time.perf_counter()

    for group in groups:
        if len(pending) >= in_flight:
            collect(1)
        vectors, rows, marks, bounds = _group_inputs(x, cells, reach, is_seed, group)
        pending[_rank_group.remote(ray.put(vectors), rows, marks, bounds, pool)] = True
    if pending:
        collect(len(pending))
    rows = np.concatenate(got_rows) if got_rows else np.empty(0, np.int64)
    scores = np.concatenate(got_scores) if got_scores else np.empty(0, np.float32)
    ranking = merge(seeds, rows, scores)
    if len(ranking.order) != n or np.any(np.bincount(ranking.order, minlength=n) != 1):
        raise RuntimeError("cells mode: the merged ranking does not list every image once")
    sizes = np.diff(cells.bounds)
    products = float(np.sum(sizes.astype(np.float64) ** 2) / 2)
    return ranking, {"seconds": time.perf_counter() - started, "products": products, "groups": len(groups)}


def rank_in_process(x: np.ndarray, cells: Cells, seeds: np.ndarray, pool: int) -> Ranking:
    """:func:`rank_by_cells` in this process, one cell after another (benchmarks and small archives)."""
    seeds = np.asarray(seeds, dtype=np.int64)
    reach = seed_reach(cells, seeds)
    is_seed = np.zeros(len(x), dtype=bool)
    is_seed[seeds] = True
    picks = [rank_group(*_group_inputs(x, cells, reach, is_seed, group), pool) for group in _groups(cells, reach)]
    return merge(seeds, np.concatenate([p[0] for p in picks]), np.concatenate([p[1] for p in picks]))


@contextlib.contextmanager
def vectors_of(run: RunDir, parts: list[Part], ids: np.ndarray, dim: int) -> Iterator[np.ndarray]:
    """The embeddings of ``ids`` (sorted) in row order: in memory up to ``IN_MEMORY_BYTES``, else a mapped temp file."""
    n = len(ids)
    if n * dim * 4 <= IN_MEMORY_BYTES:
        yield _fill(np.empty((n, dim), dtype=np.float32), run, parts, ids)
        return
    with tempfile.TemporaryDirectory(prefix="enrich-select-") as scratch:
        path = os.path.join(scratch, "vectors.f32")
        log.info("selection: %d x %d embeddings mapped from %s (%.1f GB)", n, dim, path, n * dim * 4 / 1e9)
        try:
            mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
            _fill(mapped, run, parts, ids)
            mapped.flush()
            del mapped
        except OSError as exc:
            raise OSError(
                f"the selection maps the {n * dim * 4 / 1e9:.1f} GB of embeddings from a file in {scratch} and could "
                f"not write it ({exc}): point TMPDIR at a disk with that much free space"
            ) from exc
        yield np.load(path, mmap_mode="r")


def _fill(out: np.ndarray, run: RunDir, parts: list[Part], ids: np.ndarray) -> np.ndarray:
    """Write every part's embeddings of ``ids`` into ``out`` at their rows, one part at a time."""
    seen = 0
    for part in parts:
        if part.high < ids[0] or part.low > ids[-1]:
            continue
        table = run.read_table(part.path, columns=["image_id", "embedding"])
        part_ids = table["image_id"].to_numpy()
        at = np.minimum(np.searchsorted(ids, part_ids), len(ids) - 1)
        keep = np.flatnonzero(ids[at] == part_ids)
        column = table["embedding"].combine_chunks()
        values = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), out.shape[1])
        out[at[keep]] = values[keep]
        seen += len(keep)
        del table, column, values
    if seen != len(ids):
        raise ValueError(f"embedding shards hold {seen} of the {len(ids)} images to rank: rerun `enrich embed`")
    return out


def cells_in_flight() -> int:
    """Cell groups sent out at once: two per CPU, so workers never wait and memory stays bounded."""
    return max(2, 2 * max(1, cluster_resources().cpus))
