"""Exact cell bounds: a max fold skips the candidates that no pick can raise.

The candidates of a shard are grouped in spherical k-means cells. For a cell with unit centre c,
whose members lie within angle r of c and have norms up to N, a pick x of norm q at angle t from c
has a dot product with any member of at most q N cos(max(0, t - r)) (write both vectors as their
part along c plus a perpendicular part; Cauchy-Schwarz on the perpendicular parts). When that is
below the lowest score in the cell, the pick cannot raise any member, and the cell x pick block of
the fold is skipped. The ranking is unchanged: every product that could raise a score is still
computed, and decided in the shared exact arithmetic (``sims.py``).

The bound pays where redundancy is clustered: once each cluster holds a pick, its members' scores
are their similarity to it, typically far above any similarity to another cluster, so a pick folds
only into its own cluster's cells. On diffuse embeddings (cells wide, scores low) nothing is skipped
and the fold runs as before, at the cost of the pick x centre products (1 / cell size of the fold).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .sims import error_scale, exact_sims

WIDE = 1.25  # a cell wider than this times the median cell is split in two (k-means may join two clusters)
STRAYS = 1.5  # ... and one whose widest member is this many times its mean member's angle (a few strays)
SPLIT_ROUNDS = 6
LLOYD_STEPS = 5
MARGIN = 2.0**-20  # relative slack on each bound: float64 rounding and the float32 rounding of exact values
FLAG_BUFFER = 1 << 16  # flagged entries per fold before a second pass with room for all
BOUNDED_SHARE = 0.25  # above this share of the full fold's products, the fold runs as one GEMM instead


class CellBounds:
    """Cells of one shard's positions and, per cell, the centre and the angle and norm that bound its members."""

    def __init__(self, vectors: np.ndarray, labels: np.ndarray, centres: np.ndarray):
        labels = np.asarray(labels, dtype=np.int64)
        self.labels = labels
        self.centres = np.ascontiguousarray(centres, dtype=np.float32)
        k = len(self.centres)
        centre_norms = np.linalg.norm(self.centres.astype(np.float64), axis=1)
        self.centre_norms = centre_norms
        # largest member angle from its centre (float64 from the float32 vectors), and largest member norm
        angle, norms = member_angles(vectors, labels, self.centres)
        self.radius = np.zeros(k, dtype=np.float64)
        self.top = np.zeros(k, dtype=np.float64)
        np.maximum.at(self.radius, labels, angle)
        np.maximum.at(self.top, labels, norms)
        angle_sum = np.bincount(labels, weights=angle, minlength=k)
        self.mean_angle = angle_sum / np.maximum(np.bincount(labels, minlength=k), 1)
        self.radius = np.where(centre_norms > 0, self.radius * (1 + MARGIN) + MARGIN, math.pi)
        self.top *= 1 + MARGIN

    def strays(self, vectors: np.ndarray) -> np.ndarray:
        """Members much farther from their centre than their cell's mean member (by ``STRAYS``)."""
        angle, _ = member_angles(vectors, self.labels, self.centres)
        return np.flatnonzero(angle > STRAYS * self.mean_angle[self.labels])

    def thresholds(self, cell_min: np.ndarray, q_low: float, q_high: float, err: float) -> np.ndarray:
        """Per cell, the float32 pick . centre below which a pick (norm in [q_low, q_high]) cannot raise it.

        ``cell_min`` is the lowest score of each cell's candidates (+inf for a cell without any; such a
        cell is never folded). ``err`` bounds a float32 product's error per unit of the norms' product.
        """
        t = cell_min.astype(np.float64) - MARGIN * self.top * q_high
        q = np.where(t > 0, q_high, q_low)
        with np.errstate(divide="ignore", invalid="ignore"):  # a cell of zero vectors: every product is 0
            u = np.where(self.top > 0, t / (q * self.top), np.where(t > 0, np.inf, -np.inf))
        angle = self.radius + np.arccos(np.clip(u, -1.0, 1.0))
        cosine = np.cos(np.minimum(angle, math.pi))
        scale = np.where(cosine >= 0, q_low, q_high) * self.centre_norms
        out = scale * cosine - err * q_high * self.centre_norms
        out[angle >= math.pi] = -np.inf  # every direction may be within reach: never skipped
        out[u > 1.0] = np.inf  # the cell's scores exceed any product of these norms (or it has none left)
        return out


def member_angles(vectors: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's angle from its cell's centre (pi for a zero row or centre) and its norm, in float64."""
    angle = np.empty(len(labels), dtype=np.float64)
    norms = np.empty(len(labels), dtype=np.float64)
    centre_norms = np.linalg.norm(centres.astype(np.float64), axis=1)
    step = max(1, (1 << 20) // max(1, vectors.shape[1]))
    for start in range(0, len(labels), step):
        part = slice(start, start + step)
        lab = labels[part]
        v = vectors[part].astype(np.float64)
        norms[part] = np.linalg.norm(v, axis=1)
        along = np.einsum("ij,ij->i", v, centres[lab].astype(np.float64))
        denom = norms[part] * centre_norms[lab]
        cosine = np.where(denom > 0, along / np.where(denom > 0, denom, 1.0), -1.0)
        angle[part] = np.arccos(np.clip(cosine, -1.0, 1.0))
    return angle, norms


def refine(vectors: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, CellBounds]:
    """Split wide cells in two (spherical 2-means) until none is much wider than the median cell.

    k-means leaves some cells over two clusters, or with a few strays; such a cell's bound reaches
    every pick. Strays first move to their nearest centre of all; then wide cells are halved, a few
    rounds. Returns the labels, centres and bounds of the refined cells.
    """
    labels = np.array(labels, dtype=np.int64)
    centres = np.array(centres, dtype=np.float32)
    bounds = CellBounds(vectors, labels, centres)
    strays = bounds.strays(vectors)
    if len(strays):  # a two-level k-means assigns a row only among its coarse cell's centres: try them all
        unit = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), np.float32(1e-30))
        for start in range(0, len(strays), 1 << 14):
            rows = strays[start : start + (1 << 14)]
            labels[rows] = np.argmax(vectors[rows] @ unit.T, axis=1)
        bounds = CellBounds(vectors, labels, centres)
    for _ in range(SPLIT_ROUNDS):
        sizes = np.bincount(labels, minlength=len(centres))
        spread = bounds.radius[sizes >= 2]
        if len(spread) == 0:
            break
        wide = (bounds.radius > WIDE * np.median(spread)) | (bounds.radius > STRAYS * bounds.mean_angle)
        wide = np.flatnonzero(wide & (sizes >= 4))
        if len(wide) == 0:
            break
        order = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[order], np.arange(len(centres) + 1))
        added = []
        for c in wide:
            members = order[starts[c] : starts[c + 1]]
            first, second, centre = _bisect(vectors[members])
            labels[members[second]] = len(centres) + len(added)
            centres[c] = centre[0]
            added.append(centre[1])
        centres = np.concatenate([centres, np.asarray(added, dtype=np.float32)])
        bounds = CellBounds(vectors, labels, centres)
    return labels, centres, bounds


def _bisect(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spherical 2-means of ``x`` from its two most distant directions: (first, second) member masks, 2 centres."""
    unit = x.astype(np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit /= np.where(norms > 0, norms, 1.0)
    mean = unit.mean(axis=0)
    a = unit[int(np.argmin(unit @ mean))]
    b = unit[int(np.argmin(unit @ a))]
    centre = np.stack([a, b])
    second = np.zeros(len(x), dtype=bool)
    for _ in range(LLOYD_STEPS):
        sims = unit @ centre.T
        second = sims[:, 1] > sims[:, 0]
        if second.all() or not second.any():  # no direction separates them (e.g. equal rows): halve by position
            second[:] = np.arange(len(x)) >= len(x) // 2
        for side, mask in enumerate((~second, second)):
            m = unit[mask].sum(axis=0)
            length = np.linalg.norm(m)
            centre[side] = m / length if length > 0 else unit[mask][0]
    return ~second, second, centre.astype(np.float32)


def fold_pairs(
    cells: np.ndarray, picks: np.ndarray, starts: np.ndarray, active: np.ndarray, active_vectors: np.ndarray,
    vectors: np.ndarray, scores: np.ndarray, norms: np.ndarray, err: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Raise max scores over the (cell, pick) blocks listed (sorted by cell); the positions flagged.

    A float32 product that comes within the error bound of its candidate's score is recomputed
    exactly, so the scores end as a full fold would leave them.
    """
    size = FLAG_BUFFER
    while True:
        member, pick = np.empty(size, np.int64), np.empty(size, np.int64)
        n = _flag(cells, picks, starts, active, active_vectors, vectors, scores, norms, err, member, pick)
        if n <= size:
            member, pick = member[:n], pick[:n]
            break
        size = n
    pos = active[member]
    np.maximum.at(scores, pos, exact_sims(active_vectors[member], vectors[pick]))
    return np.unique(pos), np.unique(cells)


@njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _flag(cells, picks, starts, active, active_vectors, vectors, scores, norms, err, member, pick):  # pragma: no cover
    """Write (active index, pick) of every block entry whose float32 product may exceed its candidate's score.

    Returns how many there are; only the first ``len(member)`` are written (the caller retries with
    room for all). Blocks come sorted by cell: each member is read once for all the picks that reach
    its cell. Any order of summation (and fused multiply-adds) stays within the float32 error bound.
    """
    cap = member.shape[0]
    n = 0
    dim = active_vectors.shape[1]
    b = 0
    while b < cells.shape[0]:
        c = cells[b]
        e = b
        while e < cells.shape[0] and cells[e] == c:
            e += 1
        for i in range(starts[c], starts[c + 1]):
            floor = scores[active[i]] - norms[active[i]] * err
            for q in range(b, e):
                j = picks[q]
                total = np.float32(0.0)
                for d in range(dim):
                    total += active_vectors[i, d] * vectors[j, d]
                if total > floor:
                    if n < cap:
                        member[n] = i
                        pick[n] = j
                    n += 1
        b = e
    return n


@njit(cache=True, nogil=True)
def reach(products, limits, starts):  # pragma: no cover - compiled
    """(cell, pick) blocks where ``products`` (cells x picks, pick . centre) reach the cell's limit; their rows in all."""
    k, m = products.shape
    n = 0
    for c in range(k):
        lim = limits[c]
        if starts[c + 1] > starts[c] and lim != np.inf:
            for j in range(m):
                n += products[c, j] >= lim
    cells = np.empty(n, np.int64)
    picks = np.empty(n, np.int64)
    n = 0
    work = 0
    for c in range(k):
        lim = limits[c]
        size = starts[c + 1] - starts[c]
        if size > 0 and lim != np.inf:
            for j in range(m):
                if products[c, j] >= lim:
                    cells[n] = c
                    picks[n] = j
                    n += 1
                    work += size
    return cells, picks, work


@njit(cache=True, nogil=True)
def cell_minima(cells, starts, active, scores, out):  # pragma: no cover - compiled
    """``out[c]`` = the lowest score of cell c's active candidates, for each listed cell (+inf when empty)."""
    for b in range(cells.shape[0]):
        c = cells[b]
        low = np.inf
        for i in range(starts[c], starts[c + 1]):
            s = scores[active[i]]
            if s < low:
                low = s
        out[c] = low


def pick_norm_range(vectors: np.ndarray) -> tuple[float, float]:
    """Smallest and largest norm of the picks (float64)."""
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    return float(norms.min()), float(norms.max())


__all__ = ["CellBounds", "cell_minima", "error_scale", "fold_pairs", "pick_norm_range", "reach", "refine"]
