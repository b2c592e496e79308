"""One similarity tile with torch, for GPUs (and on the CPU in tests): in fp32 the same results as the CPU kernel.

Each chunk of ``S`` is one matmul. The histogram is a bincount of the CPU kernel's float64 bins
(found by a search over precomputed float32 bin limits, see :func:`bin_limits`), spread over
``HIST_GROUPS`` row groups; threshold counts are comparisons, over only the rows whose largest
entry passes the lowest threshold when those are few. Top-k per row is ``torch.topk`` of ``k + 1`` float32 values: where the
``k``-th value is strictly above the ``(k+1)``-th, those ``k`` entries are the top-k whatever the
tie order, and they are sorted by int64 keys that order by descending value, then ascending
index. Only rows where the ``k``-th value is tied across that boundary take the top-k of keys over
the whole row, so ties go to the smaller index as everywhere else. Columns are rows of the
transposed chunk, merged across chunks by key. On CUDA, chunks are sized from free GPU memory.
``fp16``/``bf16`` compute the product in half precision: faster, approximate (the error is measured
by ``benchmarks/gpu_check_similarity.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from .kernel import TileStats, edge_limit, sorted_limits

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CHUNK_ELEMENTS = 1 << 25
GPU_CHUNK_MAX = 1 << 28
GPU_BYTES_PER_ELEMENT = 64
HIST_GROUPS = 16
_SIGN_FLIP = 0x7FFFFFFF
_EMPTY_KEY = 1 << 62


def _desc_keys(s: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2^32) whose ascending order is the float32 values' descending order (-0.0 as 0.0)."""
    bits = (s + 0.0).view(torch.int32)
    ascending = torch.where(bits >= 0, bits, bits ^ _SIGN_FLIP)
    return _SIGN_FLIP - ascending.long()


def _key_values(desc: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_desc_keys`."""
    ascending = (_SIGN_FLIP - desc).int()
    return torch.where(ascending >= 0, ascending, ascending ^ _SIGN_FLIP).view(torch.float32)


def _decode(keys: torch.Tensor, bits: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Values and indices (plus ``offset``) of keys; empty and masked entries become ``-inf``/``-1``."""
    vals = _key_values(torch.clamp(keys, max=(1 << (32 + bits)) - 1) >> bits)
    idx = (keys & ((1 << bits) - 1)) + offset
    empty = (keys >= _EMPTY_KEY) | torch.isinf(vals)
    vals = torch.where(empty, torch.full_like(vals, -np.inf), vals)
    idx = torch.where(empty, torch.full_like(idx, -1), idx)
    return vals.cpu().numpy(), idx.cpu().numpy()


def _monotone(v: np.float32) -> int:
    """An integer that orders float32 values as their values do."""
    bits = int(np.array(v, np.float32).view(np.int32))
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def bin_limits(bins: int) -> np.ndarray:
    """float32 ``L[b - 1]``, b = 1..bins-1: the smallest float32 ``v`` with ``floor((float64(v) + 1) * bins / 2) >= b``.

    The bin of ``v`` under the CPU kernel's float64 arithmetic (clipped to [0, bins - 1]) is the
    number of limits at or below ``v``, so one search over float32 values replaces the float64
    temporaries, bin for bin the same.
    """
    half = bins / 2
    target = np.arange(1, bins, dtype=np.float64)

    def binned(keys: np.ndarray) -> np.ndarray:
        bits = (keys ^ ((keys >> 31) & 0x7FFFFFFF)).astype(np.int32)
        return np.floor((bits.view(np.float32).astype(np.float64) + 1.0) * half)

    # binary search over float32s in value order (sign-magnitude bits made monotone), all bins at once
    lo = np.full(len(target), _monotone(np.float32(-2.0)), np.int64)
    hi = np.full(len(target), _monotone(np.float32(2.0)), np.int64)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        up = binned(mid) >= target
        hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
    limits = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).astype(np.int32).view(np.float32)
    return limits


def chunk_elements(device: torch.device, ncols: int) -> int:
    """Elements of ``S`` per chunk: ``CHUNK_ELEMENTS`` on the CPU; on CUDA as many as free memory allows, up to ``GPU_CHUNK_MAX``."""
    if device.type != "cuda":
        return CHUNK_ELEMENTS
    free, _ = torch.cuda.mem_get_info(device)
    return max(CHUNK_ELEMENTS, min(GPU_CHUNK_MAX, free // GPU_BYTES_PER_ELEMENT))


def _row_topk_keys(s: torch.Tensor, index: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """Per row of ``s`` (h, w), the ``min(k, w)`` smallest keys ``desc(value) << bits | index[col]``, ascending.

    float32 ``topk`` of ``k + 1`` finds them; a row whose ``k``-th and ``(k+1)``-th values are equal
    (a tie across the boundary, masked ``-inf`` entries included) is done again over all its keys.
    """
    h, w = s.shape
    kk = min(k, w)
    if kk == w:
        return torch.sort((_desc_keys(s) << bits) | index[None, :], dim=1).values
    vals, pos = torch.topk(s, kk + 1, dim=1, sorted=True)
    keys = torch.sort((_desc_keys(vals[:, :kk]) << bits) | index[pos[:, :kk]], dim=1).values
    tied = (vals[:, kk] == vals[:, kk - 1]).nonzero()[:, 0]
    if len(tied):
        full = (_desc_keys(s[tied]) << bits) | index[None, :]
        keys[tied] = torch.topk(full, kk, dim=1, largest=False, sorted=True).values
    return keys


def _add_histogram(hist: torch.Tensor, s: torch.Tensor, bin_lim: torch.Tensor, groups: torch.Tensor) -> None:
    """Adds the bins of ``s`` (``bin_lim`` starts with a sentinel: ``-inf`` in 0, bin b in b + 1) to ``hist``.

    Rows in ``HIST_GROUPS`` groups (``groups``: each row's group times ``len(hist)``) count into separate
    copies of the bins, so fewer atomic adds collide.
    """
    binned = torch.bucketize(s, bin_lim, out_int32=True, right=True)
    binned += groups[: len(s)]
    hist += torch.bincount(binned.reshape(-1), minlength=HIST_GROUPS * len(hist)).view(HIST_GROUPS, -1).sum(0)


def _add_threshold_counts(
    row_counts: torch.Tensor, col_counts: torch.Tensor, s: torch.Tensor, lim: torch.Tensor
) -> None:
    """Adds, per limit (ascending), the entries of ``s`` strictly above it per row and per column.

    Only rows whose largest entry is above the lowest limit can count: when they are at most half
    the rows, those rows alone are compared.
    """
    if len(lim) == 0:
        return
    active = (s.amax(dim=1) > lim[0]).nonzero()[:, 0]
    if len(active) == 0:
        return
    sub = s if 2 * len(active) > len(s) else s[active]
    for t in range(len(lim)):
        above = sub > lim[t]
        if sub is s:
            row_counts[t] += above.sum(dim=1)
        else:
            row_counts[t, active] += above.sum(dim=1)
        col_counts[t] += above.sum(dim=0)


def _on_device(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor on ``device`` (numpy input is copied, so read-only arrays from the object store are fine)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype)
    return torch.tensor(np.asarray(x), device=device).to(dtype)


def check_tile(xi, xj, diagonal: bool, edges: np.ndarray, row_offset: int, col_offset: int, precision: str):
    """The tile's (rows, columns) after checking what the GPU kernels (torch and Triton) accept."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    nr, nc = len(xi), len(xj)
    if diagonal and (nr != nc or row_offset != col_offset):
        raise ValueError("a diagonal tile pairs a block with itself")
    if edges[0] != -1.0 or edges[-1] != 1.0:
        raise ValueError("histogram edges must span [-1, 1] uniformly (see histogram_edges)")
    return nr, nc


def tile_stats_torch(
    xi: np.ndarray | torch.Tensor,
    xj: np.ndarray | torch.Tensor,
    diagonal: bool,
    k: int,
    thresholds: tuple[float, ...] | list[float],
    edges: np.ndarray,
    *,
    row_offset: int = 0,
    col_offset: int = 0,
    device: str = "cuda",
    precision: str = "fp32",
    edge_threshold: float | None = None,
) -> TileStats:
    """Histogram, per-row/column threshold counts and exact top-k of one tile ``S = xi @ xj.T`` with torch.

    ``edge_threshold`` (one of ``thresholds``) asks for every pair above it as well.
    """
    nr, nc = check_tile(xi, xj, diagonal, edges, row_offset, col_offset, precision)
    dev = torch.device(device)
    a = _on_device(xi, dev, PRECISIONS[precision])
    b = _on_device(xj, dev, PRECISIONS[precision])
    bins = len(edges) - 1
    order, limits = sorted_limits(thresholds)
    lim = torch.as_tensor(limits, device=dev)
    edge_lim = float(edge_limit(edge_threshold, thresholds))
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    row_counts = torch.zeros((len(limits), nr), dtype=torch.int64, device=dev)
    col_counts = torch.zeros((len(limits), nc), dtype=torch.int64, device=dev)
    hist = torch.zeros(bins + 1, dtype=torch.int64, device=dev)
    # a sentinel limit below every finite value: masked (-inf) entries count in bin 0, bin b in b + 1
    lowest = np.array([np.finfo(np.float32).min], np.float32)
    bin_lim = torch.as_tensor(np.concatenate([lowest, bin_limits(bins)]), device=dev)
    row_bits, col_bits = max(1, (nc - 1).bit_length()), max(1, (nr - 1).bit_length())
    row_keys = torch.full((nr, k), _EMPTY_KEY, dtype=torch.int64, device=dev)
    col_keys = torch.full((nc, k), _EMPTY_KEY, dtype=torch.int64, device=dev)
    step = max(1, min(nr, chunk_elements(dev, nc) // max(nc, 1)))
    tril = torch.ones((step, step), dtype=torch.bool, device=dev).tril() if diagonal else None
    groups = (torch.arange(step, dtype=torch.int32, device=dev) % HIST_GROUPS * (bins + 1))[:, None]
    for r in range(0, nr, step):
        h = min(step, nr - r)
        lo = r if diagonal else 0
        s = (a[r : r + h] @ b[lo:].T).float()
        if diagonal:
            # columns lo..lo+h-1 are rows r..r+h-1: the diagonal and below are not pairs
            s[:, :h].masked_fill_(tril[:h, :h], -np.inf)
        _add_histogram(hist, s, bin_lim, groups)
        _add_threshold_counts(row_counts[:, r : r + h], col_counts[:, lo:], s, lim)
        if edge_lim < np.inf:
            ii, jj = torch.nonzero(s > edge_lim, as_tuple=True)
            found.append((ii + r, jj + lo, s[ii, jj]))
        if k == 0:
            continue
        rows = torch.arange(r, r + h, device=dev)
        cols = torch.arange(lo, nc, device=dev)
        top = _row_topk_keys(s, cols, k, row_bits)
        row_keys[r : r + h, : top.shape[1]] = top
        top = _row_topk_keys(s.T.contiguous(), rows, k, col_bits)
        merged = torch.cat([col_keys[lo:], top], dim=1)
        col_keys[lo:] = torch.topk(merged, k, dim=1, largest=False, sorted=True).values
    inverse = np.argsort(order)
    row_vals, row_idx = _decode(row_keys, row_bits, col_offset)
    col_vals, col_idx = _decode(col_keys, col_bits, row_offset)
    stats = TileStats(
        row_counts.cpu().numpy()[inverse],
        col_counts.cpu().numpy()[inverse],
        row_vals,
        row_idx,
        col_vals,
        col_idx,
        hist[1:].cpu().numpy(),
    )
    if found:
        stats.edge_rows = torch.cat([f[0] for f in found]).cpu().numpy().astype(np.int64) + row_offset
        stats.edge_cols = torch.cat([f[1] for f in found]).cpu().numpy().astype(np.int64) + col_offset
        stats.edge_vals = torch.cat([f[2] for f in found]).cpu().numpy().astype(np.float32)
    return stats
