"""Pure planning of the blocked all-pairs similarity: tiles, task groups, histogram edges."""

from __future__ import annotations

import numpy as np

Tile = tuple[int, int, int, int]


def tile_plan(n: int, block: int) -> list[Tile]:
    """Upper-triangular block pairs (i <= j) as ``(r0, r1, c0, c1)``, in row-block then column-block order."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if block < 1:
        raise ValueError(f"block size must be >= 1, got {block}")
    starts = range(0, n, block)
    return [(r0, min(r0 + block, n), c0, min(c0 + block, n)) for r0 in starts for c0 in starts if c0 >= r0]


def schedule(tiles: list[Tile]) -> list[Tile]:
    """Tiles in submission order: diagonal tiles first, so later tiles get neighbour floors early."""
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
