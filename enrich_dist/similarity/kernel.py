"""One similarity tile on the CPU: ``S = X_i X_j^T`` by BLAS in row chunks, each chunk swept once, compiled.

The sweep (numba) bins every entry with exact float64 arithmetic, counts entries above each threshold
per row and per column, and keeps the best k neighbors per row and per column as heaps of int64
keys (value descending, then index ascending, so ties go to the smaller index). One vectorised loop
per row bins the entries and flags each entry that reaches the lowest threshold or its row's or
column's heap gate; the scalar work then visits only the 8-entry words that hold a flag, so it
follows the candidates, not the tile. Heaps start full of sentinels at a floor (the caller's; for a
row without one, a lower bound of its k-th best read from the row's own histogram; for the columns
of an off-diagonal tile, one from row-group maxima of the first chunk), so an entry is only looked
at when it reaches its line's gate. Row offers go to the row's heap at once (it stays in cache);
column candidates are buffered and offered once per chunk in column order (a counting sort), as
4,096 column heaps offered at random fall out of cache while the chunk streams through. A diagonal
tile runs its chunks last rows first, so each row's gate is already known when its column receives
entries, and serves as that column's floor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..pairgraph import float32_below

CHUNK_ROWS = 256
WORD = 8
HIST_COPIES = 4  # _scatter unrolls over exactly four copies
BOUND_MARGIN = 1e-6
CANDIDATES = 1 << 14
EDGE_BUFFER = 1 << 16
NORM_LIMIT = 1.01
INDEX_BITS = 20
EMPTY_INDEX = (1 << INDEX_BITS) - 1
_INF = np.float32(np.inf)
NEG_INF_BITS = int(np.float32(-np.inf).view(np.int32))


@dataclass
class TileStats:
    """Partial results of one tile; indices are global row positions, ``-1``/``-inf`` pad top-k lists.

    Each unordered pair is seen once: a diagonal tile keeps only its strict upper triangle, so its
    rows see the columns to their right and its columns the rows above them. Top-k lists are sorted
    best first (ties to the smaller index). ``edge_*`` are the tile's pairs above the edge threshold
    (global row, global column, similarity), in the order found.
    """

    row_counts: np.ndarray
    col_counts: np.ndarray
    row_vals: np.ndarray
    row_idx: np.ndarray
    col_vals: np.ndarray
    col_idx: np.ndarray
    hist: np.ndarray
    edge_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    edge_cols: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    edge_vals: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))


def sorted_limits(thresholds: tuple[float, ...] | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Threshold order (ascending) and the float32 limits an entry must exceed, in that order."""
    order = np.argsort(np.asarray(thresholds, dtype=np.float64), kind="stable")
    return order, np.array([float32_below(thresholds[i]) for i in order], np.float32)


def chunk_rows(nrows: int) -> int:
    """Rows of ``S`` produced per BLAS call: enough to amortise streaming ``X_j``, few enough to stay in cache."""
    return max(1, min(nrows, CHUNK_ROWS))


def tile_products(xi: np.ndarray, xj: np.ndarray, diagonal: bool) -> Iterator[tuple[np.ndarray, int, int]]:
    """``(S chunk, first row, first column)`` covering ``xi @ xj.T``; a diagonal tile skips columns left of the chunk.

    A diagonal tile's chunks come last rows first (see :func:`tile_stats`). The chunk is a view of
    one reused buffer, valid until the next one is produced.
    """
    nr, nc = len(xi), len(xj)
    step = chunk_rows(nr)
    buf = np.empty(step * nc, np.float32)
    starts = range(0, nr, step)
    for r in reversed(starts) if diagonal else starts:
        h = min(step, nr - r)
        lo = r if diagonal else 0
        s = buf[: h * (nc - lo)].reshape(h, nc - lo)
        np.matmul(xi[r : r + h], xj[lo:].T, out=s)
        yield s, r, lo


@njit(cache=True, nogil=True)
def _key(bits, j):  # pragma: no cover - compiled
    """Heap key of a float32 (its bits) and an index: smaller keys are larger values, then smaller indices."""
    if bits == -2147483648:
        bits = 0
    ascending = bits if bits >= 0 else bits ^ 0x7FFFFFFF
    return ((0x7FFFFFFF - np.int64(ascending)) << INDEX_BITS) | j


@njit(cache=True, nogil=True)
def _key_value(key, scratch_f, scratch_i):  # pragma: no cover - compiled
    """The float32 value of a heap key (through a one-element scratch array and its int32 view)."""
    ascending = 0x7FFFFFFF - (key >> INDEX_BITS)
    scratch_i[0] = ascending if ascending >= 0 else ascending ^ 0x7FFFFFFF
    return scratch_f[0]


@njit(cache=True, nogil=True)
def _offer(keys, gate, line, key, k, scratch_f, scratch_i):  # pragma: no cover - compiled
    """Replace the worst key of ``line``'s heap (largest, at the root) by a better ``key``; update the gate."""
    pos = 0
    while True:
        c = 2 * pos + 1
        if c >= k:
            break
        if c + 1 < k and keys[line, c + 1] > keys[line, c]:
            c += 1
        if keys[line, c] > key:
            keys[line, pos] = keys[line, c]
            pos = c
        else:
            break
    keys[line, pos] = key
    gate[line] = _key_value(keys[line, 0], scratch_f, scratch_i)


@njit(cache=True, nogil=True)
def _bin_row_bound(row, half, top, bins_buf, local, hist, k):  # pragma: no cover - compiled
    """Add a row's entries to the histogram through a per-row one; return a lower bound of its k-th best.

    The row's own histogram says which bin holds its k-th best entry; every entry binned there or
    above lies at or above that bin's lower edge, so the edge (less a margin far above float32
    rounding and far below a bin's width) bounds the k-th best from below. ``-inf`` when the k-th best
    is in the lowest bin (entries below -1 from rounding land there). Needs ``1 <= k <= len(row)``.
    """
    m = row.shape[0]
    nbins = local.shape[0]
    for q in range(m):
        bins_buf[q] = min(max((np.float64(row[q]) + 1.0) * half, 0.0), top)
    for q in range(m):
        local[bins_buf[q]] += 1
    seen = 0
    b = nbins - 1
    while b > 0:
        seen += local[b]
        if seen >= k:
            break
        b -= 1
    for q in range(nbins):
        hist[q] += local[q]
        local[q] = 0
    if b == 0:
        return np.float32(-np.inf)
    return np.float32(b / half - 1.0 - BOUND_MARGIN)


@njit(cache=True, nogil=True)
def _flag_row(row, col_check, check, flags):  # pragma: no cover - compiled
    """:func:`_bin_row`'s flags alone, for a row binned by :func:`_bin_row_bound`."""
    m = row.shape[0]
    for q in range(m):
        flags[q] = row[q] >= min(check, col_check[q])
    for q in range(m, min(flags.shape[0], (m + WORD - 1) // WORD * WORD)):
        flags[q] = 0


@njit(cache=True, nogil=True)
def _column_bounds(s, j0, k):  # pragma: no cover - compiled
    """Per column of ``s`` from ``j0`` on, min over k row groups of the group max: at most its k-th best entry."""
    h, w = s.shape
    size = h // k
    bound = np.full(w - j0, np.inf, np.float32)
    top = np.empty(w - j0, np.float32)
    for g in range(k):
        top[:] = -np.inf
        for ii in range(g * size, (g + 1) * size):
            row = s[ii, j0:]
            for q in range(row.shape[0]):
                top[q] = max(top[q], row[q])
        for q in range(top.shape[0]):
            bound[q] = min(bound[q], top[q])
    return bound


@njit(cache=True, nogil=True)
def _bin_row(row, col_check, check, half, top, bins_buf, flags, hist, nbins):  # pragma: no cover - compiled
    """Add a row's entries to the histogram (exact float64 bin arithmetic); flag each entry at a gate.

    ``flags[q]`` is 1 where the entry reaches ``min(check, col_check[q])``, 0 elsewhere, up to the next
    multiple of ``WORD`` (the caller scans the flags a ``WORD`` at a time). One long loop, not short
    runs: LLVM vectorises the binning and the check together.
    """
    m = row.shape[0]
    for q in range(m):
        v = row[q]
        bins_buf[q] = min(max((np.float64(v) + 1.0) * half, 0.0), top)
        flags[q] = v >= min(check, col_check[q])
    for q in range(m, min(flags.shape[0], (m + WORD - 1) // WORD * WORD)):
        flags[q] = 0
    _scatter(bins_buf, m, hist, nbins)


@njit(cache=True, nogil=True)
def _scatter(bins_buf, m, hist, nbins):  # pragma: no cover - compiled
    """Count ``bins_buf[:m]`` into ``hist``'s four copies, consecutive entries into different copies.

    Unrolled by four with one view per copy: no index arithmetic per entry, and no chain of
    increments on one counter when neighboring entries share a bin.
    """
    h0, h1, h2, h3 = hist[:nbins], hist[nbins : 2 * nbins], hist[2 * nbins : 3 * nbins], hist[3 * nbins :]
    m4 = m // 4 * 4
    for q in range(0, m4, 4):
        h0[bins_buf[q]] += 1
        h1[bins_buf[q + 1]] += 1
        h2[bins_buf[q + 2]] += 1
        h3[bins_buf[q + 3]] += 1
    for q in range(m4, m):
        h0[bins_buf[q]] += 1


@njit(cache=True, nogil=True)
def _count_row(row, limits, row_counts, i, col_counts, c0):  # pragma: no cover - compiled
    """Count a row's entries above each limit (ascending) into row ``i`` and columns ``c0`` on, vectorised.

    One pass per limit (int32 counters, so LLVM packs twice as many per instruction as for int64),
    stopping after the first limit nothing exceeds: the cost does not grow with the number of entries
    that pass, so a dense archive (most pairs above the lowest threshold) costs what a sparse one does.
    """
    m = row.shape[0]
    for t in range(limits.shape[0]):
        lim = limits[t]
        cols = col_counts[t, c0 : c0 + m]
        c = 0
        for q in range(m):
            hit = np.int32(row[q] > lim)
            c += hit
            cols[q] += hit
        row_counts[t, i] += c
        if c == 0:
            break


@njit(cache=True, nogil=True)
def _raise_floor(keys, gate, line, bound, scratch_f, scratch_i):  # pragma: no cover - compiled
    """Refill a heap that holds only floor sentinels with sentinels of a higher ``bound``."""
    if bound > gate[line]:
        scratch_f[0] = bound
        sentinel = _key(scratch_i[0], EMPTY_INDEX)
        for q in range(keys.shape[1]):
            keys[line, q] = sentinel
        gate[line] = bound


@njit(cache=True, nogil=True)
def _share_row_floors(r, h, row_gate, col_gate, col_floor, col_check, lim0):  # pragma: no cover - compiled
    """Diagonal tile: a row's gate bounds the same image's k-th best, so it is also its column floor."""
    for i in range(r, r + h):
        if row_gate[i] > col_floor[i]:
            col_floor[i] = row_gate[i]
            col_gate[i] = max(col_gate[i], col_floor[i])
            col_check[i] = min(col_gate[i], lim0)


@njit(cache=True, nogil=True)
def _sweep(
    s, bits, r, lo, diagonal, limits, half, k, estimate_cols, hist, bins_buf, row_counts, col_counts,
    row_keys, row_gate, col_keys, col_gate, col_floor, col_check, cand_key, cand_col, scratch_f, scratch_i,
    edge_lim, edge_i, edge_j, edge_v, n_edge,
):  # pragma: no cover - compiled
    """Histogram, threshold counts and heap offers for one chunk ``s`` (rows from ``r``, columns from ``lo``).

    Entries are visited one by one only where they reach their row's or column's heap gate or
    ``edge_lim``; the threshold counts are vectorised passes (:func:`_count_row`).

    Rows without a floor are binned first, through per-row histograms that give their heaps a floor
    near their k-th best (on a diagonal tile the floors are shared with the same images' columns
    before the sweep). Row heaps take offers as entries come; column candidates are buffered and
    offered in column order at the end of the chunk (or when the buffer fills). Entries above
    ``edge_lim`` (never below the lowest threshold, so always visited) go to the edge buffers while
    they have room; ``n_edge[0]`` counts them all, so the caller sees an overflow.
    """
    h, w = s.shape
    lim0 = edge_lim  # only heap offers and edges are visited one by one; threshold counts are vectorised
    if estimate_cols and k > 0 and h >= k:
        j0 = h if diagonal else 0
        bound = _column_bounds(s, j0, k)
        for q in range(bound.shape[0]):
            j = lo + j0 + q
            _raise_floor(col_keys, col_gate, j, bound[q], scratch_f, scratch_i)
            col_floor[j] = max(col_floor[j], col_gate[j])
            col_check[j] = min(col_gate[j], lim0)
    row_check = np.empty(h, np.float32)
    nbins = hist.shape[0] // HIST_COPIES
    top = nbins - 0.5
    local = np.zeros(nbins, np.int64)
    # rows without a floor: binned now, through a per-row histogram that bounds their k-th best
    binned = np.zeros(h, np.bool_)
    for ii in range(h):
        i = r + ii
        j0 = ii + 1 if diagonal else 0
        if k > 0 and row_gate[i] == -np.inf and w - j0 >= k:
            bound = _bin_row_bound(s[ii, j0:], half, top, bins_buf, local, hist, k)
            _raise_floor(row_keys, row_gate, i, bound, scratch_f, scratch_i)
            binned[ii] = True
        row_check[ii] = min(row_gate[i], lim0)
    if diagonal and k > 0:
        _share_row_floors(r, h, row_gate, col_gate, col_floor, col_check, lim0)
    n_cand = 0
    flags = np.zeros((w + WORD - 1) // WORD * WORD, np.uint8)
    words = flags.view(np.uint64)
    for ii in range(h):
        j0 = ii + 1 if diagonal else 0
        i = r + ii
        if binned[ii]:
            _flag_row(s[ii, j0:], col_check[lo + j0 : lo + w], row_check[ii], flags)
        else:
            _bin_row(s[ii, j0:], col_check[lo + j0 : lo + w], row_check[ii], half, top, bins_buf, flags, hist, nbins)
        _count_row(s[ii, j0:], limits, row_counts, i, col_counts, lo + j0)
        check = row_check[ii]
        for word in range((w - j0 + WORD - 1) // WORD):
            if words[word] == 0:
                continue
            for jj in range(j0 + word * WORD, min(j0 + (word + 1) * WORD, w)):
                v = s[ii, jj]
                j = lo + jj
                if v < min(check, col_check[j]):
                    continue
                if v > edge_lim:
                    e = n_edge[0]
                    if e < edge_i.shape[0]:
                        edge_i[e] = i
                        edge_j[e] = j
                        edge_v[e] = v
                    n_edge[0] = e + 1
                if v >= row_gate[i]:
                    key = _key(bits[ii, jj], j)
                    if key < row_keys[i, 0]:
                        _offer(row_keys, row_gate, i, key, k, scratch_f, scratch_i)
                        check = min(row_gate[i], lim0)
                if v >= col_gate[j]:
                    cand_key[n_cand] = _key(bits[ii, jj], i)
                    cand_col[n_cand] = jj
                    n_cand += 1
                    if n_cand == cand_key.shape[0]:
                        _offer_columns(
                            cand_key, cand_col, n_cand, lo, w, col_keys, col_gate, col_floor, col_check, lim0, k,
                            scratch_f, scratch_i,
                        )
                        n_cand = 0
    _offer_columns(
        cand_key, cand_col, n_cand, lo, w, col_keys, col_gate, col_floor, col_check, lim0, k, scratch_f, scratch_i
    )
    if diagonal and k > 0:
        _share_row_floors(r, h, row_gate, col_gate, col_floor, col_check, lim0)


@njit(cache=True, nogil=True)
def _offer_columns(
    cand_key, cand_col, n, lo, w, col_keys, col_gate, col_floor, col_check, lim0, k, scratch_f, scratch_i
):  # pragma: no cover - compiled
    """Offer buffered column candidates in column order (a counting sort), so heaps are visited in memory order."""
    if n == 0:
        return
    starts = np.zeros(w + 1, np.int32)
    for c in range(n):
        starts[cand_col[c] + 1] += 1
    for q in range(w):
        starts[q + 1] += starts[q]
    order = np.empty(n, np.int32)
    for c in range(n):
        jj = cand_col[c]
        order[starts[jj]] = c
        starts[jj] += 1
    for t in range(n):
        c = order[t]
        j = lo + cand_col[c]
        key = cand_key[c]
        if key < col_keys[j, 0] and _key_value(key, scratch_f, scratch_i) >= col_floor[j]:
            _offer(col_keys, col_gate, j, key, k, scratch_f, scratch_i)
            col_gate[j] = max(col_gate[j], col_floor[j])
            col_check[j] = min(col_gate[j], lim0)


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


def _heaps(floor: np.ndarray | None, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Heaps of k floor sentinels per line (keys) and their gates; without heaps (k = 0) gates are +inf."""
    if k == 0:
        return np.zeros((n, 0), np.int64), np.full(n, _INF, np.float32)
    gate = np.full(n, -_INF, np.float32) if floor is None else np.array(floor, np.float32)
    bits = (gate + np.float32(0.0)).view(np.int32).astype(np.int64)
    ascending = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    sentinel = ((0x7FFFFFFF - ascending) << INDEX_BITS) | EMPTY_INDEX
    return np.repeat(sentinel[:, None], k, axis=1), gate


@njit(cache=True, nogil=True)
def _decode_heaps(keys, offset, val_bits, idx):  # pragma: no cover - compiled
    """Each line's keys sorted (best first) and decoded: float32 bits and global indices; sentinels -inf / -1."""
    n, k = keys.shape
    row = np.empty(k, np.int64)
    for i in range(n):
        for c in range(k):  # insertion sort: k is small
            key = keys[i, c]
            p = c
            while p > 0 and row[p - 1] > key:
                row[p] = row[p - 1]
                p -= 1
            row[p] = key
        for c in range(k):
            key = row[c]
            j = key & EMPTY_INDEX
            if j == EMPTY_INDEX:
                val_bits[i, c] = NEG_INF_BITS
                idx[i, c] = -1
            else:
                ascending = 0x7FFFFFFF - (key >> INDEX_BITS)
                val_bits[i, c] = ascending if ascending >= 0 else ascending ^ 0x7FFFFFFF
                idx[i, c] = j + offset


def _heap_result(keys: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first values and global indices from heap keys; sentinels become ``-inf``/``-1``."""
    val_bits = np.empty(keys.shape, np.int32)
    idx = np.empty(keys.shape, np.int64)
    _decode_heaps(keys, offset, val_bits, idx)
    return val_bits.view(np.float32), idx


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
    edge_threshold: float | None = None,
) -> TileStats:
    """Histogram, per-row/column threshold counts and top-k of one tile ``S = xi @ xj.T``.

    Rows of ``xi`` and ``xj`` are L2-normalised (norms up to ``NORM_LIMIT`` are binned as if
    clipped to [-1, 1]). ``edges`` are uniform over [-1, 1] (:func:`histogram_edges`). Optional
    floors (one value per row / column) promise that entries below them cannot reach that image's
    final top-k; top-k lists then leave such entries out. ``edge_threshold`` (one of ``thresholds``)
    asks for every pair above it as well.
    """
    nr, nc = len(xi), len(xj)
    if diagonal and (nr != nc or row_offset != col_offset):
        raise ValueError("a diagonal tile pairs a block with itself")
    if edges[0] != -1.0 or edges[-1] != 1.0:
        raise ValueError("histogram edges must span [-1, 1] uniformly (see histogram_edges)")
    if max(nr, nc) >= EMPTY_INDEX:
        raise ValueError(f"tile of {nr} x {nc} is too large: blocks must hold fewer than {EMPTY_INDEX} rows")
    bins = len(edges) - 1
    order, limits = sorted_limits(thresholds)
    row_counts = np.zeros((len(limits), nr), np.int32)  # a tile has fewer than 2^20 rows and columns
    col_counts = np.zeros((len(limits), nc), np.int32)
    hist = np.zeros(HIST_COPIES * bins, np.int64)
    bins_buf = np.empty(nc, np.uint8 if bins <= 256 else np.int32)
    row_keys, row_gate = _heaps(row_floor, nr, k)
    col_keys, col_gate = _heaps(col_floor, nc, k)
    col_floor = col_gate.copy()
    edge_lim = edge_limit(edge_threshold, thresholds)
    col_check = np.minimum(col_gate, edge_lim)
    estimate_cols = not diagonal and bool(np.any(col_gate == -_INF))
    scratch_f = np.zeros(1, np.float32)
    cand_key, cand_col = np.empty(CANDIDATES, np.int64), np.empty(CANDIDATES, np.int32)
    buf_i, buf_j = np.empty(EDGE_BUFFER, np.int64), np.empty(EDGE_BUFFER, np.int64)
    buf_v, n_edge = np.empty(EDGE_BUFFER, np.float32), np.zeros(1, np.int64)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for s, r, lo in tile_products(np.ascontiguousarray(xi), np.ascontiguousarray(xj), diagonal):
        n_edge[0] = 0
        _sweep(
            s, s.view(np.int32), r, lo, diagonal, limits, bins / 2, k, estimate_cols and r == 0, hist, bins_buf,
            row_counts, col_counts, row_keys, row_gate, col_keys, col_gate, col_floor, col_check, cand_key, cand_col,
            scratch_f, scratch_f.view(np.int32), edge_lim, buf_i, buf_j, buf_v, n_edge,
        )
        if n_edge[0] > len(buf_i):  # a dense chunk: its pairs again, vectorised; larger buffers from now on
            found.append(chunk_edges(s, r, lo, diagonal, edge_lim))
            size = min(2 * int(n_edge[0]), s.size)
            buf_i, buf_j, buf_v = np.empty(size, np.int64), np.empty(size, np.int64), np.empty(size, np.float32)
        elif n_edge[0]:
            m = int(n_edge[0])
            found.append((buf_i[:m].copy(), buf_j[:m].copy(), buf_v[:m].copy()))
    inverse = np.argsort(order)
    row_vals, row_idx = _heap_result(row_keys, col_offset)
    col_vals, col_idx = _heap_result(col_keys, row_offset)
    stats = TileStats(
        row_counts[inverse].astype(np.int64), col_counts[inverse].astype(np.int64), row_vals, row_idx, col_vals, col_idx,
        hist.reshape(HIST_COPIES, bins).sum(axis=0),
    )
    if found:
        stats.edge_rows = np.concatenate([f[0] for f in found]) + row_offset
        stats.edge_cols = np.concatenate([f[1] for f in found]) + col_offset
        stats.edge_vals = np.concatenate([f[2] for f in found])
    return stats


def edge_limit(edge_threshold: float | None, thresholds: tuple[float, ...] | list[float]) -> np.float32:
    """The float32 an entry must exceed to be an edge (+inf: no edges); the threshold must be a counted one."""
    if edge_threshold is None:
        return _INF
    if float(edge_threshold) not in {float(t) for t in thresholds}:
        raise ValueError(f"edge_threshold {edge_threshold} must be one of the thresholds {list(thresholds)}")
    return float32_below(float(edge_threshold))


def chunk_edges(
    s: np.ndarray, r: int, lo: int, diagonal: bool, edge_lim: np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs above ``edge_lim`` in a chunk of :func:`tile_products` (tile-local rows and columns)."""
    above = s > edge_lim
    if diagonal:  # row ii is tile row r + ii, column jj tile column lo + jj = r + jj: keep jj > ii
        above = np.triu(above, 1)
    ii, jj = np.nonzero(above)
    return ii.astype(np.int64) + r, jj.astype(np.int64) + lo, s[ii, jj].astype(np.float32)
