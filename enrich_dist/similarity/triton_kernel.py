"""One similarity tile with Triton, for GPUs: in fp32 the same results as the torch and CPU kernels, in one fused pass.

One program per ``BLOCK_M x BLOCK_N`` block of ``S = X_i X_j^T`` computes the block with ``tl.dot``
(fp32 in IEEE precision), masks entries outside the tile and, on a diagonal tile, on or below the
diagonal to ``-inf``, and reduces the block where it lies in registers:

* histogram: each entry's bin is the number of float32 bin limits at or below it (see
  :func:`~enrich_dist.similarity.torch_kernel.bin_limits`, which reproduce the CPU kernel's float64
  arithmetic). An fp32 estimate ``floor((v + 1) * bins / 2)`` is within one of it, and comparing ``v``
  with the limits just below and at the estimate makes it exact. ``tl.histogram`` counts the block,
  one atomic add per occupied bin adds it to the tile's histogram (past ``HIST_BLOCK_MAX`` bins, too
  many for one block's histogram, each entry is added atomically);
* threshold counts: per float32 limit (ascending, see :func:`~enrich_dist.similarity.kernel.sorted_limits`),
  row and column sums of ``s > limit`` are added atomically to the tile's counts;
* top-k: entries become the int64 keys of the torch kernel, ``desc(value) << bits | index``, whose
  ascending order is descending value, then ascending index, and which are unique per row (and per
  column). The block's ``min(k, BLOCK_N)`` smallest keys of each row (``min(k, BLOCK_M)`` of each
  column) are taken one at a time, by a min and the removal of the one key equal to it, into
  candidate buffers. Any top-k key of a row is among the k smallest of its block, so the host's
  ``torch.topk`` over the small candidate buffer (per row, then merged across row chunks per column,
  as in the torch kernel) is the exact top-k, ties to the smaller index included; masked entries hold
  an empty key and decode, as in the torch kernel, to ``-inf``/``-1``;
* edges: each block counts its entries above the edge limit, reserves as many slots with one atomic
  add on a global counter and stores (row, column, value) at its offsets (a prefix sum within the
  block). The counter counts every pair, stored or not: when it exceeds the buffer, the host
  allocates the exact count and reruns the chunk for its edges alone, so no pair is dropped.

Rows go in chunks, so that candidate buffers stay within ``CANDIDATE_ELEMENTS``; a diagonal tile's chunk
covers only the columns from its first row on, and skips blocks wholly on or below the diagonal.
Sums of exactly representable products (the tests' inputs) are exact in any order, so every field
matches the torch kernel; for general inputs the matmul's summation order differs from cuBLAS's, as
it already does between the CPU and torch kernels. ``fp16``/``bf16`` load half-precision inputs,
accumulate in fp32 and round the block to the input precision, like torch's half-precision matmul:
approximate, as there.

``triton`` is imported with the module when installed; without it the module still imports and
:func:`tile_stats_triton` says what to install. With ``TRITON_INTERPRET=1`` set before triton is
imported, Triton's interpreter runs the kernel on CPU tensors (``device="cpu"``, as in the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .kernel import TileStats, edge_limit, sorted_limits
from .torch_kernel import _EMPTY_KEY, PRECISIONS, _decode, _on_device, bin_limits, check_tile

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 32
NUM_WARPS = 8  # 64 x 64 blocks: 188 registers a thread on sm_90, no spills (4 warps spill)
CANDIDATE_ELEMENTS = 1 << 25
EDGE_BUFFER = 1 << 20
HIST_BLOCK_MAX = 8192  # more bins (a power of two) than this: atomics per entry, not a block histogram


def _tile_kernel(
    a_ptr, b_ptr, dim, row0, row_end, col0, ncols, n_col_blocks,
    bin_lim_ptr, nbins, half, hist_ptr,
    lim_ptr, row_cnt_ptr, col_cnt_ptr, nr, nc,
    row_cand_ptr, col_cand_ptr, kr, kc, row_bits, col_bits, n_row_blocks,
    edge_lim, edge_count_ptr, edge_cap, edge_i_ptr, edge_j_ptr, edge_v_ptr,
    DIAGONAL: tl.constexpr, ROUND: tl.constexpr, STATS: tl.constexpr, NT: tl.constexpr,
    TOPK: tl.constexpr, EDGES: tl.constexpr, HIST_BINS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One block of ``S``: rows ``row0 + pm * BLOCK_M ..`` (below ``row_end``), columns ``col0 + pn * BLOCK_N ..``.

    Rows and columns are tile-local. ``STATS`` adds the block's histogram and threshold counts and
    writes its top-k candidates (``TOPK``) at chunk-local row ``i - row0`` and column ``j - col0``;
    ``EDGES`` stores its pairs above ``edge_lim`` while the buffer has room. ``HIST_BINS`` is the block
    histogram's size (a power of two, at least ``nbins``), 0 for atomic adds per entry.
    """
    pid = tl.program_id(0)
    pm = pid // n_col_blocks
    pn = pid % n_col_blocks
    first_row = row0 + pm * BLOCK_M
    first_col = col0 + pn * BLOCK_N
    if DIAGONAL:
        if first_col + BLOCK_N - 1 <= first_row:  # every entry on or below the diagonal
            return
    rows = first_row + tl.arange(0, BLOCK_M)
    cols = first_col + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < ncols

    # the block of S: fp32 accumulation, IEEE products for fp32 inputs
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * dim
    b_rows = b_ptr + cols.to(tl.int64)[:, None] * dim
    for k0 in range(0, dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = (ks < dim)[None, :]
        a = tl.load(a_rows + ks[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        b = tl.load(b_rows + ks[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    if ROUND:  # half precision: the product rounded as torch's half-precision matmul rounds it
        acc = acc.to(a_ptr.dtype.element_ty).to(tl.float32)
    valid = row_ok[:, None] & col_ok[None, :]
    if DIAGONAL:
        valid = valid & (cols[None, :] > rows[:, None])
    s = tl.where(valid, acc, float("-inf"))

    if STATS:
        # histogram: the estimate is within one bin; the limits around it make it exact
        est = tl.floor((s + 1.0) * half)
        est = tl.minimum(tl.maximum(est, 0.0), nbins - 1.0).to(tl.int32)
        below = tl.load(bin_lim_ptr + est - 1, mask=valid & (est > 0), other=float("-inf"))
        at = tl.load(bin_lim_ptr + est, mask=valid & (est < nbins - 1), other=float("inf"))
        binned = est - (below > s).to(tl.int32) + (at <= s).to(tl.int32)
        if HIST_BINS > 0:
            counted = tl.histogram(
                tl.reshape(binned, [BLOCK_M * BLOCK_N]),
                HIST_BINS,
                mask=tl.reshape(valid, [BLOCK_M * BLOCK_N]),
            )
            tl.atomic_add(hist_ptr + tl.arange(0, HIST_BINS), counted.to(tl.int64), mask=counted > 0)
        else:  # too many bins for a block histogram: one atomic add per entry
            tl.atomic_add(hist_ptr + binned, tl.full((BLOCK_M, BLOCK_N), 1, tl.int64), mask=valid)

        # entries strictly above each limit, per row and per column
        for t in tl.static_range(NT):
            above = (valid & (s > tl.load(lim_ptr + t))).to(tl.int32)
            per_row = tl.sum(above, axis=1)
            tl.atomic_add(row_cnt_ptr + t * nr + rows, per_row, mask=per_row > 0)
            per_col = tl.sum(above, axis=0)
            tl.atomic_add(col_cnt_ptr + t * nc + cols, per_col, mask=per_col > 0)

        if TOPK:
            # keys as torch_kernel._desc_keys: ascending key = descending value (-0.0 as 0.0), then index
            bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))
            desc = 0x7FFFFFFF - tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
            empty = tl.full((BLOCK_M, BLOCK_N), 1 << 62, tl.int64)
            row_keys = tl.where(valid, (desc << row_bits) | cols.to(tl.int64)[None, :], empty)
            col_keys = tl.where(valid, (desc << col_bits) | rows.to(tl.int64)[:, None], empty)
            row_out = row_cand_ptr + ((rows - row0).to(tl.int64) * n_col_blocks + pn) * kr
            for t in range(kr):
                best = tl.min(row_keys, axis=1)
                tl.store(row_out + t, best, mask=row_ok)
                row_keys = tl.where(row_keys == best[:, None], empty, row_keys)
            col_out = col_cand_ptr + ((cols - col0).to(tl.int64) * n_row_blocks + pm) * kc
            for t in range(kc):
                best = tl.min(col_keys, axis=0)
                tl.store(col_out + t, best, mask=col_ok)
                col_keys = tl.where(col_keys == best[None, :], empty, col_keys)

    if EDGES:
        # slots: one atomic reservation per block, offsets by a prefix sum over rows, then within rows
        above = (valid & (s > edge_lim)).to(tl.int32)
        in_row = tl.cumsum(above, axis=1)
        per_row = tl.sum(above, axis=1)
        total = tl.sum(per_row, axis=0)
        if total > 0:
            base = tl.atomic_add(edge_count_ptr, total.to(tl.int64))
            pos = base + (tl.cumsum(per_row, axis=0) - per_row)[:, None] + in_row - 1
            keep = (above > 0) & (pos < edge_cap)
            tl.store(edge_i_ptr + pos, tl.broadcast_to(rows[:, None], (BLOCK_M, BLOCK_N)), mask=keep)
            tl.store(edge_j_ptr + pos, tl.broadcast_to(cols[None, :], (BLOCK_M, BLOCK_N)), mask=keep)
            tl.store(edge_v_ptr + pos, s, mask=keep)


if triton is not None:
    # jitted with triton's own library functions: interpreted when TRITON_INTERPRET=1 was set before both imports
    _tile_kernel = triton.jit(_tile_kernel)


def _jitted() -> tuple[Callable[..., Any], bool]:
    """The jitted kernel and whether it runs in Triton's interpreter (on CPU tensors) rather than compiled."""
    if triton is None:
        raise ImportError("tile_stats_triton needs Triton: pip install triton")
    from triton.runtime.interpreter import InterpretedFunction

    return _tile_kernel, isinstance(_tile_kernel, InterpretedFunction)


def chunk_rows(nr: int, nc: int, k: int) -> int:
    """Rows per launch (a multiple of ``BLOCK_M``): row and column candidates within ``CANDIDATE_ELEMENTS``."""
    if k == 0:
        return max(nr, 1)
    per_block = BLOCK_M * -(-nc // BLOCK_N) * min(k, BLOCK_N) + nc * min(k, BLOCK_M)
    return BLOCK_M * max(1, CANDIDATE_ELEMENTS // max(per_block, 1))


def _smallest(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the ``k`` smallest keys ascending, padded with empty keys when a row has fewer."""
    if keys.shape[1] < k:
        pad = torch.full((len(keys), k - keys.shape[1]), _EMPTY_KEY, dtype=torch.int64, device=keys.device)
        keys = torch.cat([keys, pad], dim=1)
    return torch.topk(keys, k, dim=1, largest=False, sorted=True).values


def tile_stats_triton(
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
    """Histogram, per-row/column threshold counts, exact top-k (and edges) of one tile ``S = xi @ xj.T`` with Triton.

    Arguments and results as :func:`~enrich_dist.similarity.torch_kernel.tile_stats_torch`; edges come
    in another order. ``device`` is a CUDA device, or ``"cpu"`` under ``TRITON_INTERPRET=1``.
    """
    nr, nc = check_tile(xi, xj, diagonal, edges, row_offset, col_offset, precision)
    edge_lim = float(edge_limit(edge_threshold, thresholds))
    kernel, interpret = _jitted()
    dev = torch.device(device)
    if dev.type != "cuda" and not interpret:
        raise ValueError(
            f"Triton runs on CUDA devices, got {device!r} (on the CPU: TRITON_INTERPRET=1 before importing triton)"
        )
    a = _on_device(xi, dev, PRECISIONS[precision]).contiguous()
    b = _on_device(xj, dev, PRECISIONS[precision]).contiguous()
    dim = a.shape[1] if a.ndim == 2 else 0
    bins = len(edges) - 1
    order, limits = sorted_limits(thresholds)
    want_edges = edge_lim < np.inf
    ints = {"dtype": torch.int32, "device": dev}
    longs = {"dtype": torch.int64, "device": dev}
    lim = torch.as_tensor(limits if len(limits) else np.zeros(1, np.float32), device=dev)
    bin_lim = torch.as_tensor(bin_limits(bins) if bins > 1 else np.zeros(1, np.float32), device=dev)
    row_counts = torch.zeros((len(limits), nr), **ints)
    col_counts = torch.zeros((len(limits), nc), **ints)
    hist_bins = max(16, triton.next_power_of_2(bins))
    hist = torch.zeros(hist_bins, **longs)
    if hist_bins > HIST_BLOCK_MAX:
        hist_bins = 0
    row_bits, col_bits = max(1, (nc - 1).bit_length()), max(1, (nr - 1).bit_length())
    row_keys = torch.full((nr, k), _EMPTY_KEY, **longs)
    col_keys = torch.full((nc, k), _EMPTY_KEY, **longs)
    kr, kc = min(k, BLOCK_N), min(k, BLOCK_M)
    cap = EDGE_BUFFER if want_edges else 1
    edge_count = torch.zeros(1, **longs)
    edge_i, edge_j = torch.empty(cap, **ints), torch.empty(cap, **ints)
    edge_v = torch.empty(cap, dtype=torch.float32, device=dev)
    found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    step = chunk_rows(nr, nc, k)
    for r in range(0, nr, step):
        h = min(step, nr - r)
        lo = r if diagonal else 0
        n_row_blocks, n_col_blocks = -(-h // BLOCK_M), -(-(nc - lo) // BLOCK_N)
        if n_col_blocks == 0:
            continue
        row_cand = torch.full((h, n_col_blocks, kr), _EMPTY_KEY, **longs)
        col_cand = torch.full((nc - lo, n_row_blocks, kc), _EMPTY_KEY, **longs)
        head = (
            a, b, dim, r, r + h, lo, nc, n_col_blocks, bin_lim, bins, bins / 2, hist, lim, row_counts, col_counts,
            nr, nc, row_cand, col_cand, kr, kc, row_bits, col_bits, n_row_blocks, edge_lim, edge_count,
        )  # fmt: skip
        meta = {
            "DIAGONAL": bool(diagonal), "ROUND": precision != "fp32", "NT": len(limits), "TOPK": k > 0,
            "HIST_BINS": hist_bins, "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "num_warps": NUM_WARPS,
        }  # fmt: skip
        grid = (n_row_blocks * n_col_blocks,)
        edge_count.zero_()
        kernel[grid](*head, cap, edge_i, edge_j, edge_v, STATS=True, EDGES=want_edges, **meta)
        if want_edges:
            n = int(edge_count.item())
            if n > cap:  # buffer too small: the exact size, and this chunk's edges again
                cap = n
                edge_i, edge_j = torch.empty(cap, **ints), torch.empty(cap, **ints)
                edge_v = torch.empty(cap, dtype=torch.float32, device=dev)
                edge_count.zero_()
                kernel[grid](*head, cap, edge_i, edge_j, edge_v, STATS=False, EDGES=True, **meta)
            found.append((edge_i[:n].clone(), edge_j[:n].clone(), edge_v[:n].clone()))
        if k > 0:
            row_keys[r : r + h] = _smallest(row_cand.view(h, -1), k)
            merged = torch.cat([col_keys[lo:], col_cand.view(nc - lo, -1)], dim=1)
            col_keys[lo:] = _smallest(merged, k)
    inverse = np.argsort(order)
    row_vals, row_idx = _decode(row_keys, row_bits, col_offset)
    col_vals, col_idx = _decode(col_keys, col_bits, row_offset)
    stats = TileStats(
        row_counts.cpu().numpy().astype(np.int64)[inverse],
        col_counts.cpu().numpy().astype(np.int64)[inverse],
        row_vals,
        row_idx,
        col_vals,
        col_idx,
        hist[:bins].cpu().numpy(),
    )
    if found:
        stats.edge_rows = torch.cat([f[0] for f in found]).cpu().numpy().astype(np.int64) + row_offset
        stats.edge_cols = torch.cat([f[1] for f in found]).cpu().numpy().astype(np.int64) + col_offset
        stats.edge_vals = torch.cat([f[2] for f in found]).cpu().numpy().astype(np.float32)
    return stats
