"""Driver-side reduction of tile results, O(N k): merged top-k, per-image threshold counts, histogram; checkpoints.

A checkpoint is the whole reduction plus the set of tiles it holds, committed atomically to
``similarity/partials/state.npz``; a rerun after a crash loads it and recomputes only the other tiles.
Merges are exact and order-independent, so a resumed run writes the same outputs as an uninterrupted one.
"""

from __future__ import annotations

import io
import logging
import posixpath
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from .kernel import TileStats, merge_topk
from .plan import Tile, tile_pairs

if TYPE_CHECKING:  # the GPU check imports this module where pyarrow and fsspec are not installed
    from ..storage import RunDir

log = logging.getLogger("enrich_dist.similarity")

PARTIALS_DIR = posixpath.join("similarity", "partials")  # under schema.SIMILARITY_DIR (a test checks)
STATE = posixpath.join(PARTIALS_DIR, "state.npz")


def sort_pairs(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int):
    """Pairs from ``pieces`` sorted by (a, b), stable: a counting sort by ``a``, then each ``a``'s run by ``b``.

    O(E log(E / n)), and the pieces are read in place: large fresh arrays are slow to fill, so the
    only new ones are the three outputs.
    """
    counts = np.zeros(n + 1, np.int64)
    for a, _, _ in pieces:
        counts[1:] += np.bincount(a, minlength=n)
    np.cumsum(counts, out=counts)
    total = int(counts[-1])
    out_a, out_b = np.empty(total, np.int64), np.empty(total, np.int64)
    out_s = np.empty(total, np.float32)
    fill = counts[:-1].copy()
    for a, b, sims in pieces:
        _scatter_pairs(a, b, sims, fill, out_b, out_s)
    _sort_runs(counts, out_a, out_b, out_s)
    return out_a, out_b, out_s


@njit(cache=True)
def _scatter_pairs(a, b, s, fill, out_b, out_s):  # pragma: no cover - compiled
    for e in range(a.shape[0]):
        p = fill[a[e]]
        out_b[p], out_s[p] = b[e], s[e]
        fill[a[e]] = p + 1


@njit(cache=True)
def _sort_runs(counts, out_a, out_b, out_s):  # pragma: no cover - compiled
    for i in range(counts.shape[0] - 1):
        lo, hi = counts[i], counts[i + 1]
        out_a[lo:hi] = i
        if hi - lo > 1:
            order = np.argsort(out_b[lo:hi], kind="mergesort")
            out_b[lo:hi] = out_b[lo:hi][order]
            out_s[lo:hi] = out_s[lo:hi][order]


class EdgeCapError(ValueError):
    """More pairs above the edge threshold than the configured cap."""


class Reduction:
    """Merged partial results per image, in the order of the sorted image ids.

    Tiles address rows of the matrix the tasks see; ``perm[p]`` is the image at tile position p
    (``None``: the same order). Within any tile's columns, positions must increase with images, so
    that the tile's own tie-breaking (smaller position first) is the global one (smaller image first).
    """

    def __init__(
        self, n: int, k: int, n_thresholds: int, bins: int, perm: np.ndarray | None = None, max_edges: int = 0
    ):
        self.k = k
        self.perm = perm
        self.vals = np.full((n, k), -np.inf, np.float32)
        self.idx = np.full((n, k), -1, np.int64)
        self.counts = np.zeros((n_thresholds, n), np.int64)
        self.hist = np.zeros(bins, np.int64)
        self.pairs = 0
        self.max_edges = max_edges
        self.n_edges = 0
        self._edges: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _images(self, start: int, stop: int) -> slice | np.ndarray:
        return slice(start, stop) if self.perm is None else self.perm[start:stop]

    def floors(self, tile: Tile) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per row and per column of ``tile``: entries below these cannot enter that image's top-k."""
        if self.k == 0:
            return None, None
        r0, r1, c0, c1 = tile
        return self._floor(self._images(r0, r1), c0), self._floor(self._images(c0, c1), r0)

    def _floor(self, images: slice | np.ndarray, first_position: int) -> np.ndarray:
        first = first_position if self.perm is None else int(self.perm[first_position])
        kth_vals, kth_idx = self.vals[images, -1], self.idx[images, -1]
        # every neighbor in the tile comes after a k-th neighbor below it, so ties lose
        strict = (kth_idx >= 0) & (kth_idx < first)
        return np.where(strict, np.nextafter(kth_vals, np.float32(np.inf)), kth_vals)

    def _to_images(self, idx: np.ndarray) -> np.ndarray:
        return idx if self.perm is None else np.where(idx >= 0, self.perm[np.maximum(idx, 0)], -1)

    def add(self, tile: Tile, stats: TileStats) -> None:
        """Fold one tile's partial results in."""
        r0, r1, c0, c1 = tile
        rows, cols = self._images(r0, r1), self._images(c0, c1)
        self.counts[:, rows] += stats.row_counts
        self.counts[:, cols] += stats.col_counts
        self.hist += stats.hist
        self.pairs += tile_pairs(tile)
        if len(stats.edge_rows):
            self._add_edges(self._to_images(stats.edge_rows), self._to_images(stats.edge_cols), stats.edge_vals)
        if self.k:
            self.vals[rows], self.idx[rows] = merge_topk(
                self.vals[rows], self.idx[rows], stats.row_vals, self._to_images(stats.row_idx), self.k
            )
            self.vals[cols], self.idx[cols] = merge_topk(
                self.vals[cols], self.idx[cols], stats.col_vals, self._to_images(stats.col_idx), self.k
            )

    def _add_edges(self, a: np.ndarray, b: np.ndarray, sims: np.ndarray) -> None:
        self.n_edges += len(a)
        if self.n_edges > self.max_edges:
            raise EdgeCapError(
                f"more than max_edges={self.max_edges} pairs lie above the edge threshold "
                f"({self.n_edges} found so far): raise --edge-threshold or --max-edge-pairs, or turn "
                "the edge list off with --edge-threshold none"
            )
        if self.perm is not None:  # tile positions are permuted images: either may be the smaller
            a, b = np.minimum(a, b), np.maximum(a, b)
        self._edges.append((np.asarray(a, np.int64), np.asarray(b, np.int64), np.asarray(sims, np.float32)))

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair found above the edge threshold as image positions (a < b) and similarity, sorted by (a, b)."""
        if not self._edges:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        a, b, s = sort_pairs(self._edges, len(self.vals))
        # a pair compared in more than one tile (approximate mode) is kept once
        first = np.ones(len(a), bool)
        first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
        self._edges = [(a[first], b[first], s[first])]
        self.n_edges = int(first.sum())
        return self._edges[0]

    def to_bytes(self, done: np.ndarray, fingerprint: str) -> bytes:
        """The reduction, the done-tile mask and the inputs' fingerprint as one ``.npz``."""
        buf = io.BytesIO()
        edge_a, edge_b, edge_s = self.edges()
        np.savez(
            buf, vals=self.vals, idx=self.idx, counts=self.counts, hist=self.hist,
            pairs=np.int64(self.pairs), done=done, fingerprint=np.array(fingerprint),
            edge_a=edge_a, edge_b=edge_b, edge_s=edge_s,
        )
        return buf.getvalue()

    def restore(self, data: bytes, n_tiles: int, fingerprint: str) -> np.ndarray | None:
        """Load a checkpoint made for the same inputs; returns its done-tile mask, or None if it does not match."""
        state = np.load(io.BytesIO(data))
        if str(state["fingerprint"]) != fingerprint or len(state["done"]) != n_tiles:
            return None
        self.vals[:], self.idx[:], self.counts[:], self.hist[:] = (
            state["vals"], state["idx"], state["counts"], state["hist"],
        )
        self.pairs = int(state["pairs"])
        self._edges = [(state["edge_a"], state["edge_b"], state["edge_s"])]
        self.n_edges = len(state["edge_a"])
        return state["done"].astype(bool)


def load_checkpoint(run: RunDir, reduction: Reduction, n_tiles: int, fingerprint: str) -> np.ndarray:
    """Tiles already committed in ``run`` for these inputs (all False when there is no matching checkpoint)."""
    if run.exists(STATE):
        done = reduction.restore(run.read_bytes(STATE), n_tiles, fingerprint)
        if done is not None:
            log.info("similarity: resuming from %s, %d of %d tiles committed", run.uri_of(STATE), done.sum(), n_tiles)
            return done
        log.info("similarity: %s was made for other inputs or settings, starting over", run.uri_of(STATE))
    return np.zeros(n_tiles, bool)


def save_checkpoint(run: RunDir, reduction: Reduction, done: np.ndarray, fingerprint: str) -> None:
    """Commit the reduction and its done tiles atomically."""
    run.write_bytes(STATE, reduction.to_bytes(done, fingerprint))
