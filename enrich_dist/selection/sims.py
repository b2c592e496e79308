"""The similarity arithmetic every selection path shares, so that all of them rank identically.

The similarity of two rows is their dot product with each float32 product taken exactly in float64,
summed per row in numpy's fixed pairwise order and rounded to float32 (:func:`exact_sims`). That
value does not depend on how many pairs are computed together, unlike a float32 GEMM whose last bits
change with the matrix shape. Bulk work still runs as float32 GEMMs: a float32 dot product differs
from the exact one by at most ``gamma_d |x| |y|`` (Higham), so only the few entries whose float32
value comes within that bound of mattering are recomputed exactly.
"""

from __future__ import annotations

import numpy as np

UNIT_ROUNDOFF = 2.0**-24
SAFETY = 2.0
PAIR_CHUNK = 1 << 15


def error_scale(dim: int) -> float:
    """Bound on |float32 dot - exact dot| per unit of ``|x| |y|`` for ``dim``-long rows (gamma_d, doubled)."""
    d = max(1, dim) * UNIT_ROUNDOFF
    return SAFETY * d / (1.0 - d)


def exact_sims(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise similarities ``a[i] . b[i]`` in the shared arithmetic, as float32."""
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), PAIR_CHUNK):
        part = slice(start, start + PAIR_CHUNK)
        out[part] = np.multiply(a[part], b[part], dtype=np.float64).sum(axis=1)
    return out


def max_raises(
    scores: np.ndarray, g: np.ndarray, a: np.ndarray, b: np.ndarray, a_norms: np.ndarray, err: float
) -> tuple[np.ndarray, np.ndarray]:
    """Entries of ``g = a @ b.T`` (float32) that can raise a row's max: (row indices, exact values).

    ``err`` bounds the float32 error per unit of ``a_norms``. An entry can matter only if it may
    exceed the row's score and may be the row's largest, so a row needs just its float32 argmax
    unless a runner-up comes within twice the bound of it.
    """
    if g.shape[1] == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    bound = a_norms * err
    floor = scores.astype(np.float64) - bound
    best = g.argmax(axis=1)
    flagged = np.flatnonzero(g[np.arange(len(g)), best] > floor)
    if len(flagged) == 0:
        return flagged, np.empty(0, dtype=np.float32)
    sub = g[flagged]
    top = sub[np.arange(len(flagged)), best[flagged]].astype(np.float64)
    sub[np.arange(len(flagged)), best[flagged]] = -np.inf
    lower = np.maximum(floor[flagged], top - 2.0 * bound[flagged])
    close = np.flatnonzero(sub.max(axis=1) >= lower)
    hit, col = np.nonzero(sub[close] >= lower[close, None])
    rows = np.concatenate([flagged, flagged[close[hit]]])
    cols = np.concatenate([best[flagged], col])
    return rows, exact_sims(a[rows], b[cols])


def pool_sims(vectors: np.ndarray, scores: np.ndarray, norms: np.ndarray, err: float) -> np.ndarray:
    """Pool x pool similarities where they can raise the column's score from ``scores`` on, else -inf."""
    g = vectors @ vectors.T
    floor = scores.astype(np.float64) - err * norms * (norms.max() if len(norms) else 0.0)
    row, col = np.nonzero(g > floor[None, :])
    out = np.full(g.shape, -np.inf, dtype=np.float32)
    out[row, col] = exact_sims(vectors[row], vectors[col])
    return out
