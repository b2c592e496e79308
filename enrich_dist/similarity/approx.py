"""Approximate mode: FAISS k-means partitions, exact tiles within each partition and its nearest ones.

Pairs in partitions that are not paired are never computed: top-k lists and threshold counts can
miss them (counts are lower bounds), and the histogram estimates them from a uniform sample of
pairs. Quality is measured, not assumed: a sample of images is compared with an exact brute force.
On a GPU node with a GPU build of FAISS (the ``gpu`` extra), k-means and the assignment to
centroids run on the GPU; otherwise, or when the FAISS build has no GPU support, on the CPU (the
partitions record which, and why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .kernel import float32_below, merge_topk
from .plan import partition_pairs

SAMPLE_PAIRS = 1_000_000
PAIR_CHUNK = 1 << 16
EXACT_CHUNK = 8192


@dataclass
class Partitions:
    """Images sorted by partition (``perm``), partition p's rows ``bounds[p]:bounds[p + 1]``, paired partitions."""

    perm: np.ndarray
    bounds: np.ndarray
    assignment: np.ndarray
    pairs: list[tuple[int, int]]
    device: str = "cpu"
    device_note: str = ""


def default_partitions(n: int) -> int:
    """About sqrt(N) partitions, so partitions hold about sqrt(N) images each."""
    return max(1, round(math.sqrt(n)))


def faiss_gpus() -> tuple[int, str]:
    """GPUs this process's FAISS build can use, and why none when none (build without GPU support, no device)."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources"):
        return 0, "this FAISS build has no GPU support (install the gpu extra: faiss-gpu)"
    count = faiss.get_num_gpus()
    return count, "" if count else "FAISS sees no GPU on this node"


def partition(
    x: np.ndarray, n_partitions: int, nprobe: int, seed: int, threads: int, gpu: bool = False
) -> Partitions:
    """Spherical k-means of the rows, each row to its nearest centroid, each partition with its ``nprobe`` nearest.

    ``gpu`` asks for k-means and the assignment on this node's GPU; without a GPU FAISS build or
    device they run on the CPU and the partitions say why.
    """
    import faiss

    n, dim = x.shape
    n_partitions = max(1, min(n_partitions, n))
    nprobe = max(1, min(nprobe, n_partitions))
    faiss.omp_set_num_threads(threads)
    device, note = "cpu", ""
    if gpu:
        count, note = faiss_gpus()
        device = "cuda" if count else "cpu"
    x = np.ascontiguousarray(x, np.float32)
    kmeans = faiss.Kmeans(
        dim, n_partitions, niter=20, seed=seed, spherical=True, verbose=False, gpu=device == "cuda"
    )
    kmeans.train(x)
    index = faiss.IndexFlatIP(dim)
    if device == "cuda":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(kmeans.centroids)
    assignment = index.search(x, 1)[1][:, 0].astype(np.int64)
    neighbors = index.search(kmeans.centroids, nprobe)[1]
    perm = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[perm], np.arange(n_partitions + 1))
    return Partitions(perm, bounds, assignment, partition_pairs(neighbors), device, note)


def covered_pairs(parts: Partitions) -> np.ndarray:
    """Boolean matrix: whether images of partitions p and q are compared."""
    size = len(parts.bounds) - 1
    covered = np.zeros((size, size), bool)
    for p, q in parts.pairs:
        covered[p, q] = covered[q, p] = True
    return covered


def estimate_missing_histogram(
    x: np.ndarray, parts: Partitions, edges: np.ndarray, missing_pairs: int, seed: int
) -> tuple[np.ndarray, int]:
    """Histogram of the pairs no tile computed, scaled from a uniform sample of pairs; and how many were sampled."""
    n = len(x)
    bins = len(edges) - 1
    if missing_pairs == 0 or n < 2:
        return np.zeros(bins, np.int64), 0
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, SAMPLE_PAIRS)
    j = rng.integers(0, n, SAMPLE_PAIRS)
    keep = (i != j) & ~covered_pairs(parts)[parts.assignment[i], parts.assignment[j]]
    i, j = i[keep], j[keep]
    if len(i) == 0:
        return np.zeros(bins, np.int64), 0
    sims = np.concatenate(
        [
            np.einsum("ij,ij->i", x[i[c : c + PAIR_CHUNK]], x[j[c : c + PAIR_CHUNK]])
            for c in range(0, len(i), PAIR_CHUNK)
        ]
    ).astype(np.float64)
    counts = np.histogram(np.clip(sims, -1.0, 1.0), edges)[0] * (missing_pairs / len(i))
    whole = np.floor(counts).astype(np.int64)
    short = missing_pairs - int(whole.sum())
    whole[np.argsort(-(counts - whole), kind="stable")[:short]] += 1
    return whole, len(i)


def _desc_keys(vals: np.ndarray) -> np.ndarray:
    """uint64 keys whose ascending order is the float32 values' descending order (-0.0 as 0.0)."""
    bits = np.add(vals, np.float32(0.0), dtype=np.float32).view(np.int32)
    ascending = np.where(bits >= 0, bits, bits ^ np.int32(0x7FFFFFFF)).astype(np.int64)
    return (np.int64(0x7FFFFFFF) - ascending).astype(np.uint64)


def exact_rows(
    x: np.ndarray, rows: np.ndarray, k: int, thresholds: list[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force for images ``rows`` against all images: top-k values and ids (ties to the smaller id), counts above each threshold."""
    limits = [float32_below(t) for t in thresholds]
    vals = np.full((len(rows), k), -np.inf, np.float32)
    idx = np.full((len(rows), k), -1, np.int64)
    counts = np.zeros((len(thresholds), len(rows)), np.int64)
    local = np.arange(len(rows))
    xs = x[rows]
    for c0 in range(0, len(x), EXACT_CHUNK):
        c1 = min(c0 + EXACT_CHUNK, len(x))
        s = xs @ x[c0:c1].T
        own = (rows >= c0) & (rows < c1)
        s[local[own], rows[own] - c0] = -np.inf
        for t, limit in enumerate(limits):
            counts[t] += np.count_nonzero(s > limit, axis=1)
        if k == 0:
            continue
        keys = (_desc_keys(s) << np.uint64(32)) | np.arange(c0, c1, dtype=np.uint64)
        kk = min(k, c1 - c0)
        best = np.sort(np.partition(keys, kk - 1, axis=1)[:, :kk], axis=1)
        chunk_idx = (best & np.uint64(0xFFFFFFFF)).astype(np.int64)
        chunk_vals = np.take_along_axis(s, chunk_idx - c0, axis=1)
        chunk_idx[np.isneginf(chunk_vals)] = -1
        vals, idx = merge_topk(vals, idx, chunk_vals, chunk_idx, k)
    return vals, idx, counts


def sample_quality(
    approx_idx: np.ndarray,
    approx_counts: np.ndarray,
    exact_idx: np.ndarray,
    exact_counts: np.ndarray,
    thresholds: list[float],
) -> dict:
    """Recall of the top-k (and of the top-1) and relative error of threshold counts, approximate vs exact."""
    k = exact_idx.shape[1]
    found = [np.isin(a[a >= 0], e[e >= 0]).sum() for a, e in zip(approx_idx, exact_idx, strict=True)]
    wanted = (exact_idx >= 0).sum()
    errors = {}
    for t, a, e in zip(thresholds, approx_counts, exact_counts, strict=True):
        total = int(e.sum())
        errors[f"{t:g}"] = (total - int(a.sum())) / total if total else 0.0
    return {
        "recall_at_k": float(sum(found) / wanted) if wanted else 1.0,
        "recall_at_1": float(np.mean(approx_idx[:, 0] == exact_idx[:, 0])) if k and len(exact_idx) else 1.0,
        "threshold_count_rel_error": errors,
        "sample_size": len(exact_idx),
    }
