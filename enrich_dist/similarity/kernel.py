"""One similarity tile on the CPU: ``S = X_i X_j^T`` by BLAS in row chunks, each chunk swept once, compiled.

The sweep (numba) bins every entry with exact float64 arithmetic, counts entries above each threshold
per row and per column, and keeps a heap of the best k neighbours per row and per column. A vectorised
check over short runs of a row skips runs that hold nothing above the lowest threshold and nothing
that could enter a heap, so the scalar work follows the candidates, not the tile. A heap admits an
entry only at or above its gate: the caller's floor, a lower bound of the tile's k-th best taken from
group maxima, or (once full) just above its worst entry.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numba import njit

CHUNK_ELEMENTS = 1 << 19
RUN = 32
HIST_COPIES = 4
NORM_LIMIT = 1.01
_INF = np.float32(np.inf)


@dataclass
class TileStats:
    """Partial results of one tile; indices are global row positions, ``-1``/``-inf`` pad top-k lists.

    Each unordered pair is seen once: a diagonal tile keeps only its strict upper triangle, so its
    rows see the columns to their right and its columns the rows above them. Top-k lists are sorted
    best first (ties to the smaller index).
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


def sorted_limits(thresholds: tuple[float, ...] | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Threshold order (ascending) and the float32 limits an entry must exceed, in that order."""
    order = np.argsort(np.asarray(thresholds, dtype=np.float64), kind="stable")
    return order, np.array([float32_below(thresholds[i]) for i in order], np.float32)


def chunk_rows(ncols: int, nrows: int) -> int:
    """Rows of ``S`` produced per BLAS call: about ``CHUNK_ELEMENTS`` entries, so a chunk stays in cache."""
    return max(1, min(nrows, CHUNK_ELEMENTS // max(ncols, 1)))


def tile_products(xi: np.ndarray, xj: np.ndarray, diagonal: bool) -> Iterator[tuple[np.ndarray, int, int]]:
    """``(S chunk, first row, first column)`` covering ``xi @ xj.T``; a diagonal tile skips columns left of the chunk.

    The chunk is a view of one reused buffer, valid until the next one is produced.
    """
    nr, nc = len(xi), len(xj)
    step = chunk_rows(nc, nr)
    buf = np.empty(step * nc, np.float32)
    for r in range(0, nr, step):
        h = min(step, nr - r)
        lo = r if diagonal else 0
        s = buf[: h * (nc - lo)].reshape(h, nc - lo)
        np.matmul(xi[r : r + h], xj[lo:].T, out=s)
        yield s, r, lo


@njit(cache=True, nogil=True, inline="always")
def _offer(vals, idx, fill, gate, floor, line, v, j, k):  # pragma: no cover - compiled
    """Offer entry (v, j) to the heap of ``line`` (worst at the root; later j loses ties)."""
    n = fill[line]
    if n < k:
        pos = n
        while pos > 0:
            parent = (pos - 1) >> 1
            pv = vals[line, parent]
            pj = idx[line, parent]
            if v < pv or (v == pv and j > pj):
                vals[line, pos] = pv
                idx[line, pos] = pj
                pos = parent
            else:
                break
        vals[line, pos] = v
        idx[line, pos] = j
        fill[line] = n + 1
        if n + 1 < k:
            return
    else:
        pos = 0
        while True:
            c = 2 * pos + 1
            if c >= k:
                break
            cv = vals[line, c]
            cj = idx[line, c]
            if c + 1 < k:
                dv = vals[line, c + 1]
                dj = idx[line, c + 1]
                if dv < cv or (dv == cv and dj > cj):
                    c += 1
                    cv = dv
                    cj = dj
            if cv < v or (cv == v and cj > j):
                vals[line, pos] = cv
                idx[line, pos] = cj
                pos = c
            else:
                break
        vals[line, pos] = v
        idx[line, pos] = j
    gate[line] = max(floor[line], np.nextafter(vals[line, 0], np.float32(np.inf)))


@njit(cache=True, nogil=True)
def _group_bound(s, ii, j0, w, k):  # pragma: no cover - compiled
    """Min over k contiguous groups of row ``ii``'s entries [j0, w) of each group's max: <= the row's k-th best."""
    size = (w - j0) // k
    bound = np.float32(np.inf)
    for g in range(k):
        m = np.float32(-np.inf)
        for jj in range(j0 + g * size, j0 + (g + 1) * size):
            m = max(m, s[ii, jj])
        bound = min(bound, m)
    return bound


@njit(cache=True, nogil=True)
def _column_bounds(s, j0, k, col_floor, col_gate, col_check, lim0, lo):  # pragma: no cover - compiled
    """Raise floors of columns [j0, w) to the min over k row groups of the group max (<= the column's k-th best)."""
    h, w = s.shape
    size = h // k
    bound = np.full(w, np.inf, np.float32)
    top = np.empty(w, np.float32)
    for g in range(k):
        top[:] = -np.inf
        for ii in range(g * size, (g + 1) * size):
            for jj in range(j0, w):
                top[jj] = max(top[jj], s[ii, jj])
        for jj in range(j0, w):
            bound[jj] = min(bound[jj], top[jj])
    for jj in range(j0, w):
        j = lo + jj
        if bound[jj] > col_floor[j]:
            col_floor[j] = bound[jj]
            col_gate[j] = max(col_gate[j], bound[jj])
            col_check[j] = min(col_gate[j], lim0)


@njit(cache=True, nogil=True)
def _sweep(
    s, r, lo, diagonal, limits, half, k, estimate_cols, hist, bins_buf, row_counts, col_counts,
    row_vals, row_idx, row_fill, row_gate, row_floor,
    col_vals, col_idx, col_fill, col_gate, col_floor, col_check,
):  # pragma: no cover - compiled
    """Histogram, threshold counts and heap offers for one chunk ``s`` (rows from ``r``, columns from ``lo``)."""
    h, w = s.shape
    nbins = hist.shape[0] // HIST_COPIES
    nt = limits.shape[0]
    lim0 = limits[0] if nt else np.float32(np.inf)
    counts = np.zeros(nt, np.int64)
    if estimate_cols and k > 0 and h >= k:
        _column_bounds(s, h if diagonal else 0, k, col_floor, col_gate, col_check, lim0, lo)
    for ii in range(h):
        i = r + ii
        j0 = ii + 1 if diagonal else 0
        if j0 >= w:
            continue
        for jj in range(j0, w):
            b = int((np.float64(s[ii, jj]) + 1.0) * half)
            bins_buf[jj] = min(max(b, 0), nbins - 1)
        for jj in range(j0, w):
            hist[(jj & (HIST_COPIES - 1)) * nbins + bins_buf[jj]] += 1
        if k > 0 and row_fill[i] == 0 and row_floor[i] == -np.inf and w - j0 >= 2 * k:
            row_floor[i] = _group_bound(s, ii, j0, w, k)
            row_gate[i] = row_floor[i]
        counts[:] = 0
        check = min(row_gate[i], lim0)
        for b0 in range(j0, w, RUN):
            b1 = min(b0 + RUN, w)
            hit = 0
            for jj in range(b0, b1):
                hit += s[ii, jj] >= min(check, col_check[lo + jj])
            if hit == 0:
                continue
            for jj in range(b0, b1):
                v = s[ii, jj]
                j = lo + jj
                if v > lim0:
                    for t in range(nt):
                        if v > limits[t]:
                            counts[t] += 1
                            col_counts[t, j] += 1
                        else:
                            break
                if v >= row_gate[i]:
                    _offer(row_vals, row_idx, row_fill, row_gate, row_floor, i, v, j, k)
                if v >= col_gate[j]:
                    _offer(col_vals, col_idx, col_fill, col_gate, col_floor, j, v, i, k)
                    col_check[j] = min(col_gate[j], lim0)
            check = min(row_gate[i], lim0)
        for t in range(nt):
            row_counts[t, i] += counts[t]


@njit(cache=True, nogil=True)
def _sort_heaps(vals, idx, fill):  # pragma: no cover - compiled
    """Heapsort each line's heap in place: best first, ties to the smaller index."""
    for line in range(vals.shape[0]):
        for end in range(fill[line] - 1, 0, -1):
            v = vals[line, end]
            j = idx[line, end]
            vals[line, end] = vals[line, 0]
            idx[line, end] = idx[line, 0]
            pos = 0
            while True:
                c = 2 * pos + 1
                if c >= end:
                    break
                cv = vals[line, c]
                cj = idx[line, c]
                if c + 1 < end:
                    dv = vals[line, c + 1]
                    dj = idx[line, c + 1]
                    if dv < cv or (dv == cv and dj > cj):
                        c += 1
                        cv = dv
                        cj = dj
                if cv < v or (cv == v and cj > j):
                    vals[line, pos] = cv
                    idx[line, pos] = cj
                    pos = c
                else:
                    break
            vals[line, pos] = v
            idx[line, pos] = j


@njit(cache=True, nogil=True)
def _merge_sorted(va, ia, vb, ib, k):  # pragma: no cover - compiled
    """Per row, the first k of two best-first lists (``-1`` index = empty), ties to the smaller index."""
    n = va.shape[0]
    out_v = np.full((n, k), -np.inf, np.float32)
    out_i = np.full((n, k), -1, np.int64)
    ka, kb = va.shape[1], vb.shape[1]
    for row in range(n):
        a = 0
        b = 0
        for o in range(k):
            take_a = a < ka and ia[row, a] >= 0
            take_b = b < kb and ib[row, b] >= 0
            if take_a and take_b:
                if vb[row, b] > va[row, a] or (vb[row, b] == va[row, a] and ib[row, b] < ia[row, a]):
                    take_a = False
            if take_a:
                out_v[row, o] = va[row, a]
                out_i[row, o] = ia[row, a]
                a += 1
            elif take_b:
                out_v[row, o] = vb[row, b]
                out_i[row, o] = ib[row, b]
                b += 1
            else:
                break
    return out_v, out_i


def merge_topk(
    vals_a: np.ndarray, idx_a: np.ndarray, vals_b: np.ndarray, idx_b: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two best-first per-row top-k lists into the best k (largest first, ties to the smaller index)."""
    return _merge_sorted(
        np.ascontiguousarray(vals_a, np.float32),
        np.ascontiguousarray(idx_a, np.int64),
        np.ascontiguousarray(vals_b, np.float32),
        np.ascontiguousarray(idx_b, np.int64),
        k,
    )


def _floor_array(floor: np.ndarray | None, n: int, k: int) -> np.ndarray:
    if k == 0:
        return np.full(n, _INF, np.float32)
    return np.full(n, -_INF, np.float32) if floor is None else np.array(floor, np.float32)


def _heap_result(vals: np.ndarray, idx: np.ndarray, fill: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    _sort_heaps(vals, idx, fill)
    return vals, np.where(idx >= 0, idx + offset, -1)


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
    clipped to [-1, 1]). ``edges`` are uniform over [-1, 1] (:func:`histogram_edges`). Optional
    floors (one value per row / column) promise that entries below them cannot reach that image's
    final top-k; top-k lists then leave such entries out.
    """
    nr, nc = len(xi), len(xj)
    if diagonal and (nr != nc or row_offset != col_offset):
        raise ValueError("a diagonal tile pairs a block with itself")
    if edges[0] != -1.0 or edges[-1] != 1.0:
        raise ValueError("histogram edges must span [-1, 1] uniformly (see histogram_edges)")
    bins = len(edges) - 1
    order, limits = sorted_limits(thresholds)
    row_counts = np.zeros((len(limits), nr), np.int64)
    col_counts = np.zeros((len(limits), nc), np.int64)
    hist = np.zeros(HIST_COPIES * bins, np.int64)
    bins_buf = np.empty(nc, np.int32)
    row_vals, col_vals = np.full((nr, k), -_INF, np.float32), np.full((nc, k), -_INF, np.float32)
    row_idx, col_idx = np.full((nr, k), -1, np.int64), np.full((nc, k), -1, np.int64)
    row_fill, col_fill = np.zeros(nr, np.int64), np.zeros(nc, np.int64)
    row_floor_, col_floor_ = _floor_array(row_floor, nr, k), _floor_array(col_floor, nc, k)
    row_gate, col_gate = row_floor_.copy(), col_floor_.copy()
    col_check = np.minimum(col_gate, limits[0] if len(limits) else _INF)
    estimate_cols = bool(np.any(col_floor_ == -_INF))
    for s, r, lo in tile_products(np.ascontiguousarray(xi), np.ascontiguousarray(xj), diagonal):
        _sweep(
            s, r, lo, diagonal, limits, bins / 2, k, estimate_cols and r == 0, hist, bins_buf,
            row_counts, col_counts, row_vals, row_idx, row_fill, row_gate, row_floor_,
            col_vals, col_idx, col_fill, col_gate, col_floor_, col_check,
        )
    inverse = np.argsort(order)
    row_vals, row_idx = _heap_result(row_vals, row_idx, row_fill, col_offset)
    col_vals, col_idx = _heap_result(col_vals, col_idx, col_fill, row_offset)
    return TileStats(
        row_counts[inverse], col_counts[inverse], row_vals, row_idx, col_vals, col_idx,
        hist.reshape(HIST_COPIES, bins).sum(axis=0),
    )
