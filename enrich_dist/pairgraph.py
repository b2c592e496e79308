"""Graphs of image pairs (near-duplicates above a threshold): components and greedy removal lists.

Shared by the similarity stage (duplicate groups, removal lists) and the selection (the duplicate guard,
the removal list in ranking order); pure functions of pair lists, no artifact I/O.

- ``groups``: connected components of the pairs, ids ascending with each group's lowest image.
- ``removal``: a greedy maximal independent set is kept, visiting images in a keep order (``lowest_id``,
  ``central``: most near-duplicates first, or an explicit order such as a ranking); every other image is
  dropped, naming its most similar kept image. So every dropped image has a kept image among its pairs
  and no two kept images are a pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import njit

if TYPE_CHECKING:  # scipy is imported where a graph is built: tile workers import this module for float32_below
    import scipy.sparse as sp

KEEP_POLICIES = ("lowest_id", "central")


def float32_below(t: float) -> np.float32:
    """Largest float32 <= ``t``: a float32 ``s`` is above it exactly when ``s > t``."""
    f = np.float32(t)
    return np.nextafter(f, -np.inf) if float(f) > t else f


def component_labels(graph: sp.spmatrix) -> np.ndarray:
    """Connected component of each row of a graph, ids ascending with each component's lowest row."""
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[labels] if graph.shape[0] else np.empty(0, np.int64)


def symmetric(n: int, a: np.ndarray, b: np.ndarray, sims: np.ndarray) -> sp.csr_matrix:
    """The symmetric CSR graph of pairs (a, b) weighted by ``sims``, indices sorted."""
    import scipy.sparse as sp

    graph = sp.csr_matrix(
        (np.concatenate([sims, sims]), (np.concatenate([a, b]), np.concatenate([b, a]))), shape=(n, n)
    )
    graph.sort_indices()
    return graph


def groups(n: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group id, group size) per image: connected components of the pairs (a, b); ids ascend with each group's lowest image."""
    group = component_labels(symmetric(n, a, b, np.ones(len(a), np.int8)))
    return group, np.bincount(group)[group] if n else np.empty(0, np.int64)


def keep_order(n: int, a: np.ndarray, b: np.ndarray, policy: str) -> np.ndarray:
    """Images in the order the removal list considers them for keeping."""
    if policy not in KEEP_POLICIES:
        raise ValueError(f"keep policy must be one of {KEEP_POLICIES}, got {policy!r}")
    if policy == "lowest_id":
        return np.arange(n)
    degree = np.bincount(a, minlength=n) + np.bincount(b, minlength=n)
    return np.lexsort((np.arange(n), -degree))


@njit(cache=True)
def _independent(order, indptr, indices):  # pragma: no cover - compiled
    """Greedy maximal independent set in ``order``: an image is kept when no kept image is its neighbor."""
    kept = np.zeros(order.shape[0], np.bool_)
    for q in range(order.shape[0]):
        i = order[q]
        free = True
        for p in range(indptr[i], indptr[i + 1]):
            if kept[indices[p]]:
                free = False
                break
        kept[i] = free
    return kept


def removal(
    n: int, a: np.ndarray, b: np.ndarray, sims: np.ndarray, policy: str, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(most similar kept image per dropped image, -1 for kept ones; the similarity to it, NaN for kept ones).

    ``order`` (a permutation of 0..n-1, e.g. an ENRICH ranking) replaces the ``policy`` order when given.
    """
    graph = symmetric(n, a, b, np.asarray(sims, np.float32))
    if order is None:
        order = keep_order(n, a, b, policy)
    elif len(order) != n or np.bincount(order, minlength=n).max(initial=1) != 1:
        raise ValueError(f"a keep order must be a permutation of the {n} images")
    kept = _independent(np.asarray(order, np.int64), graph.indptr, graph.indices)
    best, sim = _most_similar_kept(kept, graph.indptr, graph.indices, graph.data)
    return np.where(kept, -1, best), np.where(kept, np.float32(np.nan), sim)


@njit(cache=True)
def _most_similar_kept(kept, indptr, indices, data):  # pragma: no cover - compiled
    n = kept.shape[0]
    best = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan, np.float32)
    for i in range(n):
        top = np.float32(-np.inf)
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if kept[j] and (data[p] > top or (data[p] == top and j < best[i])):
                best[i], top = j, data[p]
        if best[i] >= 0:
            sim[i] = top
    return best, sim
