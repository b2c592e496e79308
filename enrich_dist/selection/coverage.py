"""Coverage rules: rankings that are representative as well as diverse, on a sparse neighbor graph.

Farthest-first (``exact``) and least-similar (``batch``) rankings take outliers first and lose to
random choice at small budgets (Hacohen et al. 2022, "Active learning on a budget"). The rules here
prefer rows that stand for many others, on the graph of pairs whose similarity exceeds ``delta``
(:func:`neighbor_graph`, exact similarities from ``sims.py``). The ball of a row is the row itself
plus its graph neighbors.

- ``coverage`` (ProbCover, Yehuda et al. 2022): greedy maximum coverage. A row is covered once it lies
  in the ball of a chosen row (seeds included); each pick is the row whose ball holds the most rows not
  yet covered. Its score is that number.
- ``herding``: greedy facility location, f(S) = sum_i max_{j in S} w(i, j) with w the graph
  similarity clipped to [0, 1], w(i, i) = 1 and 0 off the graph; each pick adds the largest gain
  f(S + c) - f(S), which is its score. This is kernel herding with a truncated kernel as in MaxHerding
  (Bae et al. 2024). Coverage is the same objective with every weight 1.

Both objectives are monotone submodular, so lazy greedy (a heap of stale gains, which only fall and so
stay upper bounds) picks exactly what the naive loop picks. Weights are fixed point (multiples of
2^-40, rounded down; exact for similarities >= 2^-17), so gains are exact integer sums: ties are real
ties and go to the lower row.

After saturation no row adds anything: coverage has every row covered, herding has every row's best
chosen neighbor as similar as its own ball allows (only exact duplicates get there before the end).
The greedy then restarts as ProbCover would on the rows not yet chosen: a new pass of the same rule in
which the chosen rows count as covered (fully represented) and their balls no longer cover anyone else.
Every pass takes at least one row, and a row is taken within |ball| passes, so the ranking is complete:
the seeds first, in their order, then every other row.

``delta`` (:func:`choose_delta`) follows ProbCover's purity rule without labels. ProbCover's ball is
{x' : ||x - x'|| <= r}; for unit vectors ||x - x'||^2 = 2 - 2 sim, so a radius r is a similarity
threshold s = 1 - r^2 / 2 and a larger ball is a lower threshold. Rows get k-means pseudo-labels; the
purity of s is the share of rows whose ball {j : sim > s} holds only rows of their own cluster, and it
can only grow with s. ProbCover takes the largest radius whose purity is at least alpha = 0.95, i.e.
the lowest threshold on the grid that passes.

The duplicate guard (:func:`duplicate_guard`) moves every second member of a near-duplicate group
(:func:`duplicate_groups`) behind the first members of all groups.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import scipy.sparse as sp

from ..pairgraph import component_labels, symmetric
from .greedy import Ranking
from .sims import error_scale, exact_sims

FIXED_ONE = 1 << 40
PAIR_CHUNK = 1 << 16
PURITY_BLOCK = 256
DEFAULT_GRID = tuple(round(0.50 + 0.01 * i, 2) for i in range(50))
ALPHA = 0.95
PURITY_SAMPLE = 2000
TRAIN_PER_CLUSTER = 256
KMEANS_ITERATIONS = 20


def neighbor_graph(
    x: np.ndarray, delta: float, block: int = 4096, max_edges: int = 50_000_000
) -> sp.csr_matrix:
    """Symmetric CSR graph of all pairs i != j with similarity > ``delta``, weighted by that similarity.

    Blocks of ``block`` x ``block`` float32 products find the candidates (the upper triangle only);
    every candidate is then rescored with :func:`~.sims.exact_sims`, so the graph does not depend on
    ``block``. Raises ``ValueError`` once more than ``max_edges`` stored entries (two per pair) are found.
    """
    x = _matrix(x)
    n, dim = x.shape
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if not math.isfinite(delta):
        raise ValueError(f"delta must be finite, got {delta}")
    norm = max_norm(x)
    floor = delta - error_scale(dim) * norm * norm
    index = np.int32 if n < 2**31 else np.int64
    rows, cols, sims = [np.empty(0, index)], [np.empty(0, index)], [np.empty(0, np.float32)]
    found = 0
    starts = range(0, n, block)
    for done, a in enumerate(starts, 1):
        for b in range(a, n, block):
            width = min(block, n - b)
            r, c = np.divmod(np.flatnonzero(x[a : a + block] @ x[b : b + width].T > floor), width)
            if a == b:
                r, c = r[r < c], c[r < c]
            r, c = (r + a).astype(index), (c + b).astype(index)
            s = _pair_sims(x, r, c)
            keep = s > delta
            rows.append(r[keep])
            cols.append(c[keep])
            sims.append(s[keep])
            found += 2 * int(keep.sum())
            if found > max_edges:
                raise ValueError(
                    f"the neighbor graph at delta={delta} has more than max_edges={max_edges} edges "
                    f"({found} found in {done} of {len(starts)} row blocks): use a higher delta or a "
                    "larger max_edges"
                )
    return symmetric(n, np.concatenate(rows), np.concatenate(cols), np.concatenate(sims))


def graph_from_pairs(
    x: np.ndarray, a: np.ndarray, b: np.ndarray, found_above: float, delta: float, max_edges: int = 50_000_000
) -> sp.csr_matrix | None:
    """:func:`neighbor_graph` at ``delta`` from a list of candidate pairs, or None when the list cannot give it.

    ``a``, ``b`` must hold every pair whose float32 GEMM product exceeds ``found_above`` (the similarity
    stage's edge list). Every pair with exact similarity > ``delta`` is among them when ``delta`` less
    the float32 error bound still exceeds ``found_above``; the candidates are then rescored exactly, so
    the graph equals :func:`neighbor_graph`'s.
    """
    x = _matrix(x)
    n, dim = x.shape
    norm = max_norm(x)
    if delta - error_scale(dim) * norm * norm <= found_above:
        return None
    index = np.int32 if n < 2**31 else np.int64
    a, b = np.asarray(a, index), np.asarray(b, index)
    s = _pair_sims(x, a, b)
    keep = s > delta
    if 2 * int(keep.sum()) > max_edges:
        raise ValueError(
            f"the neighbor graph at delta={delta} has more than max_edges={max_edges} edges "
            f"({2 * int(keep.sum())}): use a higher delta or a larger max_edges"
        )
    return symmetric(n, a[keep], b[keep], s[keep])


def _pair_sims(x: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Exact similarities of the pairs (r[i], c[i]), gathered in chunks to bound memory."""
    out = np.empty(len(r), dtype=np.float32)
    for start in range(0, len(r), PAIR_CHUNK):
        part = slice(start, start + PAIR_CHUNK)
        out[part] = exact_sims(x[r[part]], x[c[part]])
    return out


def default_k(n: int) -> int:
    """Pseudo-label clusters for ``n`` rows: round(sqrt(n / 2)), at least 2 and at most ``n``."""
    return min(n, max(2, round(math.sqrt(n / 2))))


def pseudo_labels(
    x: np.ndarray, k: int, seed: int = 0, iterations: int = KMEANS_ITERATIONS, block: int = 4096
) -> np.ndarray:
    """k-means cluster of every row: Lloyd's iterations from k random rows, trained on at most 256 k rows."""
    x = _matrix(x)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    rng = np.random.default_rng(seed)
    train = x[np.sort(rng.choice(n, size=min(n, TRAIN_PER_CLUSTER * k), replace=False))]
    centroids = train[np.sort(rng.choice(len(train), size=k, replace=False))]
    assign = np.full(len(train), -1)
    for _ in range(iterations):
        new = _nearest(train, centroids, block)
        if np.array_equal(new, assign):
            break
        assign = new
        one_hot = sp.csr_matrix(
            (np.ones(len(train), np.float32), (assign, np.arange(len(train)))), shape=(k, len(train))
        )
        counts = np.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = (one_hot @ train)[filled] / counts[filled, None]
    return _nearest(x, centroids, block)


def _nearest(x: np.ndarray, centroids: np.ndarray, block: int) -> np.ndarray:
    """Index of each row's nearest centroid in Euclidean distance (ties: lower index)."""
    half = 0.5 * np.einsum("ij,ij->i", centroids, centroids)
    out = np.empty(len(x), dtype=np.int64)
    for a in range(0, len(x), block):
        out[a : a + block] = np.argmax(x[a : a + block] @ centroids.T - half, axis=1)
    return out


def ball_purity(
    x: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, rows: np.ndarray, block: int = 4096
) -> np.ndarray:
    """For each threshold s, the share of ``rows`` whose ball {j : sim > s} holds only rows of their label.

    One pass of float32 products of ``rows`` against every row finds each row's most similar row of
    another label; the ball of threshold s is pure exactly when that similarity is <= s.
    """
    x = _matrix(x)
    labels = np.asarray(labels)
    rows = np.asarray(rows, dtype=np.int64)
    if len(labels) != len(x) or len(rows) == 0:
        raise ValueError("labels must hold one label per row and rows must not be empty")
    rival = np.full(len(rows), -np.inf, dtype=np.float32)
    for a in range(0, len(rows), PURITY_BLOCK):
        part = rows[a : a + PURITY_BLOCK]
        for b in range(0, len(x), block):
            sims = x[part] @ x[b : b + block].T
            sims[labels[part, None] == labels[None, b : b + block]] = -np.inf
            np.maximum(rival[a : a + PURITY_BLOCK], sims.max(axis=1), out=rival[a : a + PURITY_BLOCK])
    thresholds = np.asarray(thresholds, dtype=np.float64)
    return (rival[None, :] <= thresholds[:, None]).mean(axis=1)


def choose_delta(
    x: np.ndarray,
    grid: tuple[float, ...] | np.ndarray = DEFAULT_GRID,
    alpha: float = ALPHA,
    k: int | None = None,
    sample: int = PURITY_SAMPLE,
    seed: int = 0,
    block: int = 4096,
) -> tuple[float, dict]:
    """ProbCover's label-free delta: the lowest similarity threshold on ``grid`` whose ball purity is >= alpha.

    Pseudo-labels are k-means clusters with ``k = default_k(N)`` unless given: ProbCover uses the
    number of classes, which a label-free ranking does not know; sqrt(N / 2) (Mardia et al.'s rule of
    thumb) grows with the archive and, erring on more clusters than classes, errs towards smaller,
    purer balls. Purity is estimated on ``sample`` random rows against all rows. If no threshold
    passes, the highest one (smallest balls) is returned and ``info["passed"]`` is False.
    """
    x = _matrix(x)
    n = len(x)
    grid = np.asarray(grid, dtype=np.float64)
    if n == 0:
        raise ValueError("choose_delta needs at least one row")
    if grid.ndim != 1 or len(grid) == 0 or np.any(np.diff(grid) <= 0):
        raise ValueError("grid must be a non-empty, strictly increasing list of thresholds")
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    k = default_k(n) if k is None else k
    labels = pseudo_labels(x, k, seed, block=block)
    rows = np.sort(np.random.default_rng([seed, 1]).choice(n, size=min(n, sample), replace=False))
    purity = ball_purity(x, labels, grid, rows, block)
    passing = np.flatnonzero(purity >= alpha)
    delta = float(grid[passing[0]] if len(passing) else grid[-1])
    info = {
        "how": "purity rule",
        "delta": delta,
        "passed": bool(len(passing)),
        "alpha": alpha,
        "k": k,
        "sample": len(rows),
        "seed": seed,
        "grid": grid.tolist(),
        "purity": purity.tolist(),
    }
    return delta, info


def coverage_ranking(graph: sp.spmatrix, n: int, seeds: np.ndarray) -> Ranking:
    """All ``n`` rows ranked by greedy ball coverage (ProbCover), restarted over the rest once all are covered.

    ``graph`` must be symmetric (its stored entries are the edges, diagonal ignored). Round k is the
    k-th pick; its score is the number of rows it newly covered.
    """
    seeds = _seeds(seeds, n)
    indptr, indices, _ = _balls(graph, n, weighted=False)
    order, gains = _cover(indptr, indices, seeds)
    return _ranking(len(seeds), order, gains, 1)


def herding_ranking(graph: sp.spmatrix, n: int, seeds: np.ndarray) -> Ranking:
    """All ``n`` rows ranked by greedy facility location on the graph's similarities, restarted when saturated.

    ``graph`` must be symmetric with similarities as values. Round k is the k-th pick; its score is
    the gain in f (in similarity units).
    """
    seeds = _seeds(seeds, n)
    order, gains = _herd(*_balls(graph, n, weighted=True), seeds)
    return _ranking(len(seeds), order, gains, FIXED_ONE)


def _balls(graph: sp.spmatrix, n: int, weighted: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's ball (itself and its neighbors, ascending) as CSR arrays, with fixed-point weights."""
    graph = sp.csr_matrix(graph)
    if graph.shape != (n, n):
        raise ValueError(f"the graph must be {n} x {n}, got {graph.shape[0]} x {graph.shape[1]}")
    if not graph.has_sorted_indices:
        graph = graph.sorted_indices()
    mirror = graph.T.tocsr().sorted_indices()
    if not (
        np.array_equal(graph.indptr, mirror.indptr)
        and np.array_equal(graph.indices, mirror.indices)
        and (not weighted or np.array_equal(graph.data, mirror.data))
    ):
        raise ValueError("the graph must be symmetric")
    rows = np.repeat(np.arange(n, dtype=graph.indices.dtype), np.diff(graph.indptr))
    off = graph.indices != rows
    if weighted:
        weights = np.floor(np.clip(graph.data[off].astype(np.float64), 0.0, 1.0) * FIXED_ONE).astype(np.int64)
    else:
        weights = np.ones(int(off.sum()), dtype=np.int8)
    self_ = np.arange(n, dtype=rows.dtype)
    ball = sp.csr_matrix(
        (
            np.concatenate([weights, np.full(n, FIXED_ONE if weighted else 1, dtype=weights.dtype)]),
            (np.concatenate([rows[off], self_]), np.concatenate([graph.indices[off], self_])),
        ),
        shape=(n, n),
    )
    ball.sort_indices()
    return ball.indptr.astype(np.int64), ball.indices, ball.data


def _seeds(seeds: np.ndarray, n: int) -> np.ndarray:
    """Seeds as int64 rows (possibly none), or an error if out of range or repeated."""
    seeds = np.asarray(seeds, dtype=np.int64).ravel()
    if len(seeds) and (seeds.min() < 0 or seeds.max() >= n or len(np.unique(seeds)) != len(seeds)):
        raise ValueError(f"seed rows must be distinct indices in [0, {n})")
    return seeds


def _positions(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions in the CSR arrays of the entries of ``rows``, row after row."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())


def _cover(indptr: np.ndarray, indices: np.ndarray, seeds: np.ndarray) -> tuple[list[int], list[int]]:
    """Greedy max coverage after the seeds, restarted at full coverage: rows in order and their gains.

    Gains are kept exact: a newly covered row takes one off the gain of every row in its ball. A
    restart's gains are ball sizes less ``held`` (chosen rows in each ball), without a pass over the edges.
    """
    n = len(indptr) - 1
    bounds = indptr.tolist()
    chosen = np.zeros(n, dtype=bool)
    chosen[seeds] = True
    covered = np.zeros(n, dtype=bool)
    held = np.zeros(n, dtype=np.int64)
    at = indices[_positions(indptr, seeds)]
    covered[at] = True
    np.add.at(held, at, 1)
    gains = _row_sums(~covered[indices], indptr)
    left = n - int(np.count_nonzero(covered))
    order, scores = seeds.tolist(), []
    while len(order) < n:
        if not left:
            covered, left, gains = chosen.copy(), n - len(order), np.diff(indptr) - held
        heap = _heap(gains, chosen)
        while left:
            bound, row = heap[0]
            gain = int(gains[row])
            if gain != -bound:
                if gain:
                    heapq.heapreplace(heap, (-gain, row))
                else:
                    heapq.heappop(heap)
                continue
            heapq.heappop(heap)
            members = indices[bounds[row] : bounds[row + 1]]
            fresh = members[~covered[members]]
            covered[fresh] = True
            left -= len(fresh)
            held[members] += 1
            np.subtract.at(
                gains, np.concatenate([indices[bounds[u] : bounds[u + 1]] for u in fresh.tolist()]), 1
            )
            chosen[row] = True
            order.append(row)
            scores.append(gain)
    return order, scores


def _herd(
    indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray, seeds: np.ndarray
) -> tuple[list[int], list[int]]:
    """Lazy greedy facility location after the seeds, restarted at saturation: rows in order and their gains.

    ``best[i]`` is row i's best weight to a chosen row in this pass and ``short`` counts the rows below
    ``FIXED_ONE``: a gain is left exactly while one is (every row is in its own ball with that weight).
    A restart starts every row's bound at its ball's total weight.
    """
    n = len(indptr) - 1
    bounds = indptr.tolist()
    chosen = np.zeros(n, dtype=bool)
    chosen[seeds] = True
    best = np.zeros(n, dtype=np.int64)
    at = _positions(indptr, seeds)
    np.maximum.at(best, indices[at], weights[at])
    total = _row_sums(weights, indptr)
    gains = _row_sums(np.maximum(weights - best[indices], 0), indptr)
    short = int(np.count_nonzero(best < FIXED_ONE))
    order, scores = seeds.tolist(), []
    while len(order) < n:
        if not short:
            best, short, gains = np.where(chosen, FIXED_ONE, 0), n - len(order), total
        heap = _heap(gains, chosen)
        while short:
            bound, row = heap[0]
            members, w = indices[bounds[row] : bounds[row + 1]], weights[bounds[row] : bounds[row + 1]]
            had = best[members]
            gain = int(np.maximum(w - had, 0).sum())
            if gain != -bound:
                if gain:
                    heapq.heapreplace(heap, (-gain, row))
                else:
                    heapq.heappop(heap)
                continue
            heapq.heappop(heap)
            now = np.maximum(had, w)
            best[members] = now
            short -= int(np.count_nonzero(had < FIXED_ONE)) - int(np.count_nonzero(now < FIXED_ONE))
            chosen[row] = True
            order.append(row)
            scores.append(gain)
    return order, scores


def _row_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-row sums of CSR-aligned ``values`` as int64 (every row is non-empty)."""
    if len(indptr) == 1:
        return np.zeros(0, dtype=np.int64)
    return np.add.reduceat(values, indptr[:-1], dtype=np.int64)


def _heap(gains: np.ndarray, chosen: np.ndarray) -> list[tuple[int, int]]:
    """A heap of (-gain, row) over the rows not chosen that still gain anything."""
    rows = np.flatnonzero(~chosen & (gains > 0))
    heap = list(zip((-gains[rows]).tolist(), rows.tolist(), strict=True))
    heapq.heapify(heap)
    return heap


def _ranking(n_seeds: int, order: list[int], gains: list[int], one: int) -> Ranking:
    """The ranking of ``order``: seeds in round 0 without score, then one pick per round scored gain / one."""
    rounds = np.concatenate([np.zeros(n_seeds, np.int32), np.arange(1, len(gains) + 1, dtype=np.int32)])
    scores = np.concatenate([np.full(n_seeds, np.nan), np.array(gains, dtype=np.float64) / one])
    return Ranking(np.array(order, dtype=np.int64), rounds, scores.astype(np.float32))


def duplicate_groups(source: np.ndarray | sp.spmatrix, t: float, block: int = 4096) -> np.ndarray:
    """Near-duplicate group of each row: connected components of the pairs with similarity > ``t``.

    ``source`` is the rows themselves, or a graph built at a threshold <= ``t`` (its values are
    similarities). Group ids ascend with each group's lowest row.
    """
    if sp.issparse(source):
        graph = sp.csr_matrix(source, copy=True)
        graph.data = (graph.data > t).astype(np.int8)
        graph.eliminate_zeros()
    else:
        graph = neighbor_graph(source, t, block)
    return component_labels(graph)


def duplicate_guard(order: np.ndarray, groups: np.ndarray, n_seeds: int = 0) -> np.ndarray:
    """``order`` with no group's second member ahead of any group's first; the seeds stay first, order kept otherwise.

    ``groups`` holds a group id per row. The first ``n_seeds`` entries of ``order`` stay in place and
    their groups count as represented; the rest split into first members of a group and later ones,
    each keeping its relative order.
    """
    order = np.asarray(order, dtype=np.int64)
    groups = np.asarray(groups)
    if not 0 <= n_seeds <= len(order):
        raise ValueError(f"n_seeds must be in [0, {len(order)}], got {n_seeds}")
    head, tail = order[:n_seeds], order[n_seeds:]
    ids = groups[tail]
    first = np.zeros(len(tail), dtype=bool)
    first[np.unique(ids, return_index=True)[1]] = True
    first &= ~np.isin(ids, groups[head])
    return np.concatenate([head, tail[first], tail[~first]])


def max_norm(x: np.ndarray, rows: int = 1 << 16) -> float:
    """Largest row norm (float64), ``rows`` at a time: ``x`` may be a mapped file larger than memory."""
    norms = (np.linalg.norm(x[i : i + rows].astype(np.float64), axis=1).max() for i in range(0, len(x), rows))
    return float(max(norms, default=0.0))


def _matrix(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float32 (rows x dim) matrix."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be 2-D (rows x dim), got shape {x.shape}")
    return x
