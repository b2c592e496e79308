"""Approximate mode: FAISS k-means partitions, exact tiles within each partition and its nearest ones.

Pairs in partitions that are not paired are never computed: top-k lists and threshold counts can
miss them (counts are lower bounds), and the histogram estimates them from the pairs of a uniform
sample of images. Quality is measured, not assumed: the sample is compared with an exact brute force.
On a GPU node with a GPU build of FAISS (the ``gpu`` extra), k-means runs on the GPU; otherwise, or
when the FAISS build has no GPU support, on the CPU (the partitions record which, and why). The
stage assigns images to centroids in its scatter tasks, on CPUs (``partitioned.py``);
:func:`partition` assigns on the GPU too when asked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .kernel import float32_below, merge_topk
from .plan import partition_pairs

EXACT_CHUNK = 2048


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


KMEANS_POINTS = 256  # training rows per centroid (FAISS's own default cap)


def kmeans_rows(n: int, n_partitions: int | None) -> int:
    """How many images k-means trains on: every image, or 256 per partition (about sqrt(N) partitions by default)."""
    return min(n, KMEANS_POINTS * max(1, n_partitions or default_partitions(n)))


def kmeans_sample(n: int, n_partitions: int, seed: int) -> np.ndarray:
    """Sorted image positions k-means trains on: every image, or a seeded sample of 256 per partition."""
    size = kmeans_rows(n, n_partitions)
    if size == n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)).astype(np.int64)


def quality_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of the images whose approximate results are checked against a brute force."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False)).astype(np.int64)


def train_centroids(
    sample: np.ndarray, n_partitions: int, seed: int, threads: int, gpu: bool = False
) -> tuple[np.ndarray, str, str]:
    """Spherical k-means centroids of the sample rows; the device it ran on and why not the GPU asked for."""
    import faiss

    n, dim = sample.shape
    n_partitions = max(1, min(n_partitions, n))
    faiss.omp_set_num_threads(threads)
    device, note = "cpu", ""
    if gpu:
        count, note = faiss_gpus()
        device = "cuda" if count else "cpu"
    kmeans = faiss.Kmeans(
        dim, n_partitions, niter=20, seed=seed, spherical=True, verbose=False, gpu=device == "cuda",
        max_points_per_centroid=max(KMEANS_POINTS, -(-n // n_partitions)),
    )
    kmeans.train(np.ascontiguousarray(sample, np.float32))
    return np.ascontiguousarray(kmeans.centroids, np.float32), device, note


def _index(centroids: np.ndarray, gpu: bool):
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(centroids)
    return index


def assign(x: np.ndarray, centroids: np.ndarray, gpu: bool = False) -> np.ndarray:
    """Each row's nearest centroid (largest inner product)."""
    if len(x) == 0:
        return np.zeros(0, np.int64)
    return _index(centroids, gpu).search(np.ascontiguousarray(x, np.float32), 1)[1][:, 0].astype(np.int64)


def probe_pairs(centroids: np.ndarray, nprobe: int, gpu: bool = False) -> list[tuple[int, int]]:
    """Partition pairs compared: each partition with its ``nprobe`` nearest (itself included)."""
    nprobe = max(1, min(nprobe, len(centroids)))
    return partition_pairs(_index(centroids, gpu).search(centroids, nprobe)[1])


def from_assignment(
    assignment: np.ndarray, n_partitions: int, pairs: list[tuple[int, int]], device: str = "cpu", note: str = ""
) -> Partitions:
    """Images sorted by partition (stable: by position within one) and each partition's rows."""
    perm = np.argsort(assignment, kind="stable")
    bounds = np.searchsorted(assignment[perm], np.arange(n_partitions + 1))
    return Partitions(perm, bounds, assignment, pairs, device, note)


def partition(
    x: np.ndarray, n_partitions: int, nprobe: int, seed: int, threads: int, gpu: bool = False
) -> Partitions:
    """Spherical k-means of the rows, each row to its nearest centroid, each partition with its ``nprobe`` nearest.

    k-means trains on :func:`kmeans_sample`'s rows, as the stage's streamed passes do. ``gpu`` asks for
    k-means and the assignment on this node's GPU; without a GPU FAISS build or device they run on the
    CPU and the partitions say why.
    """
    n = len(x)
    n_partitions = max(1, min(n_partitions, n))
    x = np.ascontiguousarray(x, np.float32)
    centroids, device, note = train_centroids(x[kmeans_sample(n, n_partitions, seed)], n_partitions, seed, threads, gpu)
    on_gpu = device == "cuda"
    return from_assignment(
        assign(x, centroids, on_gpu), len(centroids), probe_pairs(centroids, nprobe, on_gpu), device, note
    )


def covered_pairs(pairs: list[tuple[int, int]], size: int) -> np.ndarray:
    """Boolean matrix: whether images of partitions p and q are compared."""
    covered = np.zeros((size, size), bool)
    for p, q in pairs:
        covered[p, q] = covered[q, p] = True
    return covered


def missing_histogram(sampled: np.ndarray, missing_pairs: int) -> np.ndarray:
    """The histogram of ``missing_pairs`` pairs never compared, scaled from the sampled ones' (whole counts)."""
    bins = len(sampled)
    total = int(sampled.sum())
    if missing_pairs == 0 or total == 0:
        return np.zeros(bins, np.int64)
    counts = sampled * (missing_pairs / total)
    whole = np.floor(counts).astype(np.int64)
    short = missing_pairs - int(whole.sum())
    whole[np.argsort(-(counts - whole), kind="stable")[:short]] += 1
    return whole


def exact_rows(
    x: np.ndarray, rows: np.ndarray, k: int, thresholds: list[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force for images ``rows`` against all images: top-k values and ids (ties to the smaller id), counts above each threshold."""
    return rows_against_block(x[rows], rows, x, 0, k, thresholds)


def rows_against_block(
    xs: np.ndarray,
    rows: np.ndarray,
    block: np.ndarray,
    first: int,
    k: int,
    thresholds: list[float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images ``rows`` (their rows ``xs``) against the images ``first:first + len(block)``, by brute force.

    Top-k values and ids (ties to the smaller id; a row is never its own neighbour) and counts above
    each threshold.
    """
    limits = [float32_below(t) for t in thresholds]
    vals = np.full((len(rows), k), -np.inf, np.float32)
    idx = np.full((len(rows), k), -1, np.int64)
    counts = np.zeros((len(thresholds), len(rows)), np.int64)
    local = np.arange(len(rows))
    for c0 in range(0, len(block), EXACT_CHUNK):
        c1 = min(c0 + EXACT_CHUNK, len(block))
        s = xs @ block[c0:c1].T
        own = (rows >= first + c0) & (rows < first + c1)
        s[local[own], rows[own] - first - c0] = -np.inf
        for t, limit in enumerate(limits):
            counts[t] += np.count_nonzero(s > limit, axis=1)
        if k == 0:
            continue
        kk = min(k, c1 - c0)
        kth = np.partition(s, c1 - c0 - kk, axis=1)[:, c1 - c0 - kk]
        r, c = np.nonzero(s >= kth[:, None])  # the k best of each row, with any ties at the k-th
        v = s[r, c]
        order = np.lexsort((c, -v, r))  # by row, then largest first, then smaller index
        r, c, v = r[order], c[order], v[order]
        rank = np.arange(len(r)) - np.searchsorted(r, r)
        keep = rank < kk
        chunk_vals = np.full((len(rows), kk), -np.inf, np.float32)
        chunk_idx = np.full((len(rows), kk), -1, np.int64)
        chunk_vals[r[keep], rank[keep]] = v[keep]
        chunk_idx[r[keep], rank[keep]] = np.where(np.isneginf(v[keep]), -1, first + c0 + c[keep])
        vals, idx = merge_topk(vals, idx, chunk_vals, chunk_idx, k)
    return vals, idx, counts


def uncovered_histogram(
    xs: np.ndarray,
    rows: np.ndarray,
    row_parts: np.ndarray,
    cols_x: np.ndarray,
    cols: np.ndarray,
    col_parts: np.ndarray,
    compared: np.ndarray,
    edges: np.ndarray,
) -> np.ndarray:
    """Histogram of the pairs (sampled row, sampled column) whose partitions are never compared."""
    if len(rows) == 0 or len(cols) == 0:
        return np.zeros(len(edges) - 1, np.int64)
    sims = (xs @ cols_x.T).astype(np.float64)
    keep = ~compared[row_parts][:, col_parts] & (rows[:, None] != cols[None, :])
    return np.histogram(np.clip(sims[keep], -1.0, 1.0), edges)[0].astype(np.int64)


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
