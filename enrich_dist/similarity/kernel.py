"""One similarity tile: S = X_i X_j^T computed once, reduced to a histogram, threshold counts and top-k.

S is produced a few hundred rows at a time so that every pass over it stays in cache. Top-k works on
candidates: entries at or above a per-row / per-column floor, below which nothing can still enter
that image's top-k. Floors come from the driver (the k-th neighbour found so far), from group maxima
of the chunk, and from the exact k-th value of the candidates kept so far. Rows without a floor go
through FAISS's heap instead, which scans every entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch

CHUNK_ELEMENTS = 1 << 20
NORM_LIMIT = 1.01
CANDIDATES_PER_LINE = 2
_EMPTY = np.uint64(0xFFFFFFFFFFFFFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN = np.uint32(0x80000000)
_FLOAT_MIN = np.float32(np.finfo(np.float32).min)
_INF = np.float32(np.inf)


@dataclass
class TileStats:
    """Partial results of one tile; indices are global row positions, ``-1``/``-inf`` pad top-k lists.

    Each unordered pair is seen once: a diagonal tile keeps only its strict upper triangle, so its
    rows see the columns to their right and its columns the rows above them.
    """

    row_counts: np.ndarray
    col_counts: np.ndarray
    row_vals: np.ndarray
    row_idx: np.ndarray
    col_vals: np.ndarray
    col_idx: np.ndarray
    hist: np.ndarray


def float32_below(t: float) -> np.float32:
    """Largest float32 <= ``t``: a float32 ``s`` is above it exactly when ``s > t``."""
    f = np.float32(t)
    return np.nextafter(f, -_INF) if float(f) > t else f


def _desc_key(vals: np.ndarray) -> np.ndarray:
    """uint32 keys whose ascending order is the floats' descending order (-0.0 taken as 0.0)."""
    bits = np.add(vals, np.float32(0.0), dtype=np.float32).view(np.uint32)
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | _SIGN
    return ~(bits ^ flip)


def _from_desc_key(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_desc_key`."""
    asc = ~keys.astype(np.uint32)
    flip = (~asc.view(np.int32) >> 31).view(np.uint32) | _SIGN
    return (asc ^ flip).view(np.float32)


def _best_k(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k entries with the largest values, ties to the smaller index, best first."""
    keys = (_desc_key(vals).astype(np.uint64) << np.uint64(32)) | idx.astype(np.uint64)
    keys[idx < 0] = _EMPTY
    keys.sort(axis=1)
    if keys.shape[1] < k:
        keys = np.pad(keys, ((0, 0), (0, k - keys.shape[1])), constant_values=_EMPTY)
    keys = keys[:, :k]
    empty = keys == _EMPTY
    out_vals = _from_desc_key((keys >> np.uint64(32)).astype(np.uint32))
    out_idx = (keys & _LOW32).astype(np.int64)
    out_vals[empty] = -_INF
    out_idx[empty] = -1
    return out_vals, out_idx


def merge_topk(
    vals_a: np.ndarray, idx_a: np.ndarray, vals_b: np.ndarray, idx_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two per-row top-k lists into the best k (largest first, ties to the smaller index)."""
    return _best_k(np.concatenate([vals_a, vals_b], axis=1), np.concatenate([idx_a, idx_b], axis=1), k)


class _Candidates:
    """Running top-k per line (a row or a column of the tile) fed with sparse candidate entries.

    Entries are packed into one uint64 key (line, descending value, neighbour), so one sort orders
    them by line, best first, ties to the smaller neighbour. Candidates of one line must arrive in
    increasing neighbour order: after a reduction a later entry equal to a full line's k-th value
    loses the tie, so that line's floor becomes strict.
    """

    def __init__(self, nlines: int, nneighbors: int, k: int):
        self.nlines = nlines
        self.k = k
        self.neighbor_bits = np.uint64(max(1, (nneighbors - 1).bit_length()))
        self.line_shift = np.uint64(32) + self.neighbor_bits
        if int(self.line_shift) + max(1, (nlines - 1).bit_length()) > 64:
            raise ValueError(
                f"tile of {nlines} x {nneighbors} is too large: use blocks of at most 65536 rows"
            )
        self.parts: list[np.ndarray] = []
        self.pending = 0
        self.strict = np.full(nlines, -_INF, np.float32)

    def add(self, lines: np.ndarray, neighbors: np.ndarray, vals: np.ndarray) -> None:
        """Add candidates: line, neighbour (both tile-local) and value."""
        keys = lines.astype(np.uint64) << self.line_shift
        keys |= _desc_key(vals).astype(np.uint64) << self.neighbor_bits
        keys |= neighbors.astype(np.uint64)
        self.parts.append(keys)
        self.pending += len(keys)
        if self.pending > CANDIDATES_PER_LINE * self.k * self.nlines:
            self._reduce()

    def _reduce(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Keep the best k per line; return the kept keys, their lines and ranks."""
        keys = np.concatenate(self.parts) if self.parts else np.empty(0, np.uint64)
        keys.sort()
        lines = (keys >> self.line_shift).astype(np.int64)
        position = np.arange(len(keys))
        first = np.ones(len(keys), np.bool_)
        np.not_equal(lines[1:], lines[:-1], out=first[1:])
        rank = position - np.maximum.accumulate(np.where(first, position, 0))
        keep = rank < self.k
        keys, lines, rank = keys[keep], lines[keep], rank[keep]
        self.parts, self.pending = [keys], 0
        full = rank == self.k - 1
        self.strict[lines[full]] = np.nextafter(_from_desc_key(keys[full] >> self.neighbor_bits), _INF)
        return keys, lines, rank

    def result(self, neighbor_offset: int) -> tuple[np.ndarray, np.ndarray]:
        """``(nlines, k)`` values and global neighbour indices, best first, ``-inf``/``-1`` padded."""
        keys, lines, rank = self._reduce()
        vals = np.full((self.nlines, self.k), -_INF, np.float32)
        idx = np.full((self.nlines, self.k), -1, np.int64)
        vals[lines, rank] = _from_desc_key(keys >> self.neighbor_bits)
        idx[lines, rank] = (keys & ((np.uint64(1) << self.neighbor_bits) - np.uint64(1))).astype(np.int64)
        idx[lines, rank] += neighbor_offset
        return vals, idx


def _row_topk(s: np.ndarray, neg_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row top-k of a C-contiguous chunk with FAISS's heap.

    FAISS breaks ties towards larger ids, so ids are passed negated (``-index - 1``): scanning columns
    in increasing index order then keeps the smaller index on ties.
    """
    h = s.shape[0]
    vals = np.full((h, k), -_INF, np.float32)
    ids = np.full((h, k), -1, np.int64)
    heap = faiss.float_minheap_array_t()
    heap.nh, heap.k = h, k
    heap.val, heap.ids = faiss.swig_ptr(vals), faiss.swig_ptr(ids)
    heap.addn_with_ids(s.shape[1], faiss.swig_ptr(s), faiss.swig_ptr(neg_ids), 0, 0, h)
    idx = np.where(vals > -_INF, -ids - 1, -1)
    return _best_k(vals, idx, k)


def _count_dtype(n: int) -> type:
    return np.uint16 if n < 1 << 16 else np.uint32


class _Buffers:
    """Scratch arrays for one chunk, reused across chunks."""

    def __init__(self, size: int, bins: int):
        self.s = np.empty(size, np.float32)
        self.bin = np.empty(size, np.uint8 if bins + 2 * _margin(bins) <= 256 else np.int32)
        self.mask = np.empty(size, np.bool_)
        self.other = np.empty(size, np.bool_)
        self.offset = torch.tensor(bins / 2 + _margin(bins), dtype=torch.float32)

    def view(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        return getattr(self, name)[: shape[0] * shape[1]].reshape(shape)


def _histogram_in_place(s: np.ndarray, bins: int, buf: _Buffers) -> np.ndarray:
    """Counts of ``clip(s, -1, 1)`` in ``bins`` uniform bins over [-1, 1] (1.0 in the last bin); overwrites s.

    The bin is ``(s + 1) * bins / 2`` truncated, shifted by ``margin`` bins so that products of rows
    of norm up to ``NORM_LIMIT`` stay non-negative and in range; the margins fold into the end bins.
    """
    margin = _margin(bins)
    scaled = torch.from_numpy(s)
    torch.add(buf.offset, scaled, alpha=bins / 2, out=scaled)
    index = buf.view("bin", s.shape)
    np.copyto(index, s, casting="unsafe")
    counts = torch.bincount(torch.from_numpy(index.reshape(-1)), minlength=bins + 2 * margin).numpy()
    counts[margin] += counts[:margin].sum()
    counts[margin + bins - 1] += counts[margin + bins :].sum()
    return counts[margin : margin + bins]


def _margin(bins: int) -> int:
    """Bins needed past each end of [-1, 1] for similarities of rows of norm up to ``NORM_LIMIT``."""
    return math.ceil(bins / 2 * (NORM_LIMIT**2 - 1)) + 1


def tile_stats(
    xi: np.ndarray,
    xj: np.ndarray,
    diagonal: bool,
    k: int,
    thresholds: tuple[float, ...] | list[float],
    edges: np.ndarray,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    row_floor: np.ndarray | None = None,
    col_floor: np.ndarray | None = None,
) -> TileStats:
    """Histogram, per-row/column threshold counts and top-k of one tile ``S = xi @ xj.T``.

    Rows of ``xi`` and ``xj`` are L2-normalised (norms up to ``NORM_LIMIT`` are binned as if
    clipped to [-1, 1]). ``edges`` are uniform over [-1, 1]
    (:func:`histogram_edges`). Optional floors (one value per row / column) promise that entries
    below them cannot reach that image's final top-k; top-k lists then leave such entries out.
    """
    nr, nc = len(xi), len(xj)
    if diagonal and (nr != nc or row_offset != col_offset):
        raise ValueError("a diagonal tile pairs a block with itself")
    if edges[0] != -1.0 or edges[-1] != 1.0:
        raise ValueError("histogram edges must span [-1, 1] uniformly (see histogram_edges)")
    bins = len(edges) - 1
    order = np.argsort(np.asarray(thresholds, dtype=np.float64), kind="stable")
    limits = [(int(i), float32_below(thresholds[i])) for i in order]
    row_counts = np.zeros((len(thresholds), nr), np.int64)
    col_counts = np.zeros((len(thresholds), nc), np.int64)
    hist = np.zeros(bins, np.int64)
    rows, columns = _Candidates(nr, nc, k), _Candidates(nc, nr, k)
    row_floor = np.full(nr, -_INF, np.float32) if row_floor is None else np.asarray(row_floor, np.float32)
    col_floor = np.full(nc, -_INF, np.float32) if col_floor is None else np.asarray(col_floor, np.float32)
    floored_cols = bool(np.all(col_floor > -_INF))
    estimate = np.full(nc, -_INF, np.float32)
    neg_ids = -np.arange(1, nc + 1, dtype=np.int64)
    step = max(1, min(nr, CHUNK_ELEMENTS // max(nc, 1)))
    buf = _Buffers(step * nc, bins)
    for r in range(0, nr, step):
        h = min(step, nr - r)
        lo = r if diagonal else 0
        w = nc - lo
        s = buf.view("s", (h, w))
        np.matmul(xi[r : r + h], xj[lo:].T, out=s)
        lower = np.tri(h, dtype=np.bool_) if diagonal else None
        if lower is not None:
            np.copyto(s[:, :h], -_INF, where=lower)
        mask = buf.view("mask", s.shape)
        ones = mask.view(np.uint8)
        for i, limit in limits:
            np.greater(s, limit, out=mask)
            per_row = np.add.reduce(ones, axis=1, dtype=_count_dtype(w))
            if not per_row.any():
                break
            row_counts[i, r : r + h] += per_row
            col_counts[i, lo:] += np.add.reduce(ones, axis=0, dtype=_count_dtype(h))
        if k:
            if h >= k and not floored_cols:
                groups = np.maximum.reduce(s[: h - h % k].reshape(k, h // k, w), axis=1)
                np.maximum(estimate[lo:], np.minimum.reduce(groups, axis=0), out=estimate[lo:])
            col_bound = np.maximum(np.maximum(estimate[lo:], col_floor[lo:]), columns.strict[lo:])
            np.maximum(col_bound, _FLOAT_MIN, out=col_bound)
            np.greater_equal(s, col_bound, out=mask)
            row_bound = row_floor[r : r + h]
            by_floor = bool(np.all(row_bound > -_INF))
            if by_floor:
                other = np.greater_equal(s, row_bound[:, None], out=buf.view("other", s.shape))
                np.logical_or(mask, other, out=mask)
            else:
                vals, idx = _row_topk(s, neg_ids[lo:], k)
                found = idx >= 0
                rows.add(np.nonzero(found)[0] + r, idx[found], vals[found])
            hits = np.flatnonzero(mask)
            hit_rows, hit_cols = np.divmod(hits, w)
            hit_vals = s.reshape(-1)[hits]
            take = hit_vals >= col_bound[hit_cols]
            columns.add(hit_cols[take] + lo, hit_rows[take] + r, hit_vals[take])
            if by_floor:
                take = hit_vals >= row_bound[hit_rows]
                rows.add(hit_rows[take] + r, hit_cols[take] + lo, hit_vals[take])
        if lower is not None:
            np.copyto(s[:, :h], np.float32(-1.0), where=lower)
            hist[0] -= h * (h + 1) // 2
        hist += _histogram_in_place(s, bins, buf)
    row_vals, row_idx = rows.result(col_offset)
    col_vals, col_idx = columns.result(row_offset)
    return TileStats(row_counts, col_counts, row_vals, row_idx, col_vals, col_idx, hist)
