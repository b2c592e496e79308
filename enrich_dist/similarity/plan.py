"""Pure planning of the blocked all-pairs similarity: tiles, task groups, block size from memory, edges."""

from __future__ import annotations

import math

import numpy as np

Tile = tuple[int, int, int, int]

MIN_BLOCK = 256
MAX_BLOCK = 16384
PANEL_BYTES = 2 << 20
TILES_PER_WORKER = 16


def tile_plan(n: int, block: int) -> list[Tile]:
    """Upper-triangular block pairs (i <= j) as ``(r0, r1, c0, c1)``, in row-block then column-block order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    starts = range(0, n, block)
    return [(r0, min(r0 + block, n), c0, min(c0 + block, n)) for r0 in starts for c0 in starts if c0 >= r0]


def partition_tile_plan(bounds: np.ndarray, pairs: list[tuple[int, int]], block: int) -> list[Tile]:
    """Tiles covering each partition pair ``(p, q)``, p <= q, over rows sorted by partition.

    ``bounds[p]:bounds[p + 1]`` are partition p's rows. A pair (p, p) gets the upper-triangular tiles of
    that range; a pair p < q every block of p's rows against every block of q's rows.
    """
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    tiles: list[Tile] = []
    for p, q in pairs:
        if p > q:
            raise ValueError(f"partition pairs must have p <= q, got {(p, q)}")
        p0, p1, q0, q1 = int(bounds[p]), int(bounds[p + 1]), int(bounds[q]), int(bounds[q + 1])
        for r0 in range(p0, p1, block):
            for c0 in range(q0 if p != q else r0, q1, block):
                tiles.append((r0, min(r0 + block, p1), c0, min(c0 + block, q1)))
    return tiles


def partition_pairs(neighbors: np.ndarray) -> list[tuple[int, int]]:
    """Unordered partition pairs (p <= q) where q is among p's probed partitions or p among q's, sorted."""
    pairs = {(p, p) for p in range(len(neighbors))}
    for p, row in enumerate(neighbors):
        pairs.update((min(p, int(q)), max(p, int(q))) for q in row if q >= 0)
    return sorted(pairs)


def tile_pairs(tile: Tile) -> int:
    """Unordered pairs a tile covers (a diagonal tile only its strict upper triangle)."""
    r0, r1, c0, c1 = tile
    if r0 == c0:
        return (r1 - r0) * (r1 - r0 - 1) // 2
    return (r1 - r0) * (c1 - c0)


def schedule(tiles: list[Tile]) -> list[Tile]:
    """Tiles in submission order: diagonal tiles first, so later tiles get neighbor floors early."""
    return sorted(tiles, key=lambda t: (t[0] != t[2], t[2] - t[0], t[0]))


def group_tiles(tiles: list[Tile], min_pairs: int) -> list[list[Tile]]:
    """Consecutive tiles packed into groups of at least ``min_pairs`` products (the last may be smaller)."""
    groups: list[list[Tile]] = []
    current: list[Tile] = []
    size = 0
    for tile in tiles:
        current.append(tile)
        size += (tile[1] - tile[0]) * (tile[3] - tile[2])
        if size >= min_pairs:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def histogram_edges(bins: int) -> np.ndarray:
    """``bins + 1`` uniform edges over [-1, 1]."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return np.linspace(-1.0, 1.0, bins + 1)


def task_bytes(block: int, k: int, n_thresholds: int, chunk_rows: int) -> int:
    """Buffers of one tile task: the S chunk, row and column heaps and counts, and the tile's result."""
    per_line = k * (4 + 4) + k * (4 + 8) + n_thresholds * 8 * 2 + 4 * 8
    return chunk_rows * block * 4 + block * 4 + 2 * block * per_line


def driver_bytes(n: int, dim: int, k: int, n_thresholds: int) -> int:
    """The embeddings (shared once through the object store) and the driver's O(N k) reduction, twice."""
    return n * dim * 4 + 2 * n * (k * 12 + n_thresholds * 8)


GPU_BLOCK = 65536  # rows of a GPU tile side


def approx_driver_bytes(n: int, dim: int, k: int, n_thresholds: int, sample_rows: int) -> int:
    """What the approximate mode's driver holds: ids, assignment and order, the reduction twice, the k-means sample."""
    return 24 * n + 2 * n * (k * 12 + n_thresholds * 8) + sample_rows * dim * 4


def choose_block(
    n: int, dim: int, k: int, n_thresholds: int, max_memory: int, workers: int, chunk_rows: int,
    held: int | None = None,
) -> int:
    """Largest block (a multiple of 64, at most ``MAX_BLOCK``) whose buffers fit ``max_memory``.

    The budget covers what the stage holds besides its tasks (``held``; by default the embeddings and
    the driver's reduction, :func:`driver_bytes`), and ``2 * workers`` tasks in flight (running ones
    and finished results waiting to be reduced). Blocks also stay small enough to
    give every worker ``TILES_PER_WORKER`` tiles, so the last tiles do not leave workers idle, and
    for a block's rows (``block * dim`` floats) to stay within ``PANEL_BYTES``, so the GEMM streams
    them from cache.
    """
    fixed = driver_bytes(n, dim, k, n_thresholds) if held is None else held
    if n <= 1:
        return max(n, 1)
    blocks = 1
    while blocks * (blocks + 1) // 2 < TILES_PER_WORKER * workers and blocks < n:
        blocks += 1
    panel = max(MIN_BLOCK, PANEL_BYTES // (4 * dim) // 64 * 64)
    block = min(MAX_BLOCK, panel, _round_up(math.ceil(n / blocks), 64))
    while block > MIN_BLOCK and fixed + 2 * workers * task_bytes(block, k, n_thresholds, chunk_rows) > max_memory:
        block = max(MIN_BLOCK, _round_up(block // 2, 64))
    if fixed + 2 * workers * task_bytes(block, k, n_thresholds, chunk_rows) > max_memory:
        need = fixed + 2 * workers * task_bytes(block, k, n_thresholds, chunk_rows)
        raise ValueError(
            f"--max-memory {max_memory / 2**20:.0f}M is too small for {n} images of dim {dim} on {workers} "
            f"workers: need at least {math.ceil(need / 2**20)}M"
        )
    return min(block, _round_up(n, 64))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
