"""The approximate mode's passes over streamed rows: no process holds the N x d matrix.

1. *Scan*: a task per block of rows (read from the embedding shards, or object-store pieces of a
   matrix the caller holds) checks the rows, digests them, and returns only the rows k-means trains
   on (256 per partition) and the quality sample's.
2. *k-means* on that sample (one task using every CPU of a node, its GPU with a GPU build of FAISS):
   centroids, and the partition pairs to compare (each partition with its ``nprobe`` nearest).
3. *Scatter*: a task per block assigns its rows to the centroids, writes them sorted by partition to
   a scratch file of the run dir (an object-store array without a run dir), and compares the quality
   sample with its rows by brute force (top-k, threshold counts), and a seeded random share of its rows
   with the sample for the histogram of the pairs whose partitions are never compared (about
   ``HISTOGRAM_PAIRS`` pairs in all), from which the stage estimates those pairs' histogram.
4. *Gather*: a task per group of whole partitions (about ``GROUP_ROWS`` rows) collects its
   partitions' rows from every scattered block into one scratch file, in partition order.

Tile tasks then read one range of one group file each. Memory per process: a scan or scatter task
holds one block (``SCAN_ROWS`` rows) and its sorted copy, a gather task one group twice, the driver
the ids, the assignment (8 bytes an image), the sample and the O(N k) reduction.
"""

from __future__ import annotations

import io
import logging
import posixpath
import time
from dataclasses import dataclass, replace

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from ..storage import RunDir
from . import approx
from .kernel import merge_topk
from .reduce import PARTIALS_DIR
from .source import RowRange, bad_rows, bad_rows_message, digest, read_rows

log = logging.getLogger("enrich_dist.similarity")

SCAN_ROWS = 1 << 17
HISTOGRAM_PAIRS = 4_000_000  # about this many (sampled image, random image) pairs estimate the uncompared ones
GROUP_ROWS = 1 << 17
SCRATCH_DIR = posixpath.join(PARTIALS_DIR, "scratch")
PARTITIONS = posixpath.join(PARTIALS_DIR, "partitions.npz")


def scan_ranges(n: int) -> list[tuple[int, int]]:
    """The blocks of image positions the scan and scatter tasks read."""
    return [(start, min(start + SCAN_ROWS, n)) for start in range(0, n, SCAN_ROWS)]


@ray.remote(num_cpus=1)
def _scan(block: RowRange, picks: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    rows = read_rows(block)
    where, norms = bad_rows(rows)
    return digest(rows), where, norms, np.array(rows[picks])


@dataclass
class Scan:
    """What the driver keeps from the scan: each block's digest and where it is, and the sampled rows."""

    ranges: list[tuple[int, int]]
    blocks: list[RowRange]
    digests: list[str]
    picks: np.ndarray  # sorted positions of the rows below
    rows: np.ndarray

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        return self.rows[np.searchsorted(self.picks, positions)]


def scan(source, n: int, picks: np.ndarray) -> Scan:
    """Check and digest every block; return the rows at ``picks`` (sorted positions).

    Raises ValueError naming the images whose embeddings the tiles cannot take.
    """
    ranges = scan_ranges(n)
    blocks = [source.block(start, stop) for start, stop in ranges]
    cut = np.searchsorted(picks, [start for start, _ in ranges] + [n])
    results = ray.get(
        [
            _scan.remote(block, picks[cut[b] : cut[b + 1]] - start)
            for b, (block, (start, _)) in enumerate(zip(blocks, ranges, strict=True))
        ]
    )
    bad = [(start + where, norms) for (start, _), (_, where, norms, _) in zip(ranges, results, strict=True) if len(where)]
    if bad:
        positions = np.concatenate([b[0] for b in bad])
        raise ValueError(bad_rows_message(source.ids[positions], np.concatenate([b[1] for b in bad])))
    rows = [r[3] for r in results]
    dim = source.dim
    return Scan(
        ranges, blocks, [r[0] for r in results], picks, np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
    )


@ray.remote
def _train(sample: np.ndarray, n_partitions: int, nprobe: int, seed: int, threads: int, gpu: bool) -> tuple:
    centroids, device, note = approx.train_centroids(sample, n_partitions, seed, threads, gpu)
    return centroids, approx.probe_pairs(centroids, nprobe), device, note


@dataclass
class Centroids:
    centroids: np.ndarray
    pairs: list[tuple[int, int]]
    device: str
    note: str


def centroids(
    found: Scan, n: int, n_partitions: int, nprobe: int, seed: int, threads: int, gpu: bool,
    run: RunDir | None, fingerprint: str,
) -> Centroids:
    """k-means on the sampled rows (one task, ``threads`` CPUs); reused from the run dir on a rerun."""
    if run is not None and run.exists(PARTITIONS):
        saved = np.load(io.BytesIO(run.read_bytes(PARTITIONS)))
        if "centroids" in saved and str(saved["fingerprint"]) == fingerprint:
            log.info("similarity: reusing k-means centroids from %s", run.uri_of(PARTITIONS))
            pairs = [(int(p), int(q)) for p, q in saved["pairs"]]
            return Centroids(saved["centroids"], pairs, str(saved["device"]), str(saved["note"]))
    start = time.perf_counter()
    sample = found.rows_at(approx.kmeans_sample(n, n_partitions, seed))
    task = _train.options(num_cpus=threads, num_gpus=1 if gpu else 0)
    out = Centroids(*ray.get(task.remote(sample, n_partitions, nprobe, seed, threads, gpu)))
    log.info(
        "similarity: %d k-means centroids from %d sampled images on %s in %.1f s, nprobe %d, %d partition pairs%s",
        len(out.centroids), len(sample), out.device, time.perf_counter() - start, nprobe, len(out.pairs),
        f" ({out.note})" if out.note else "",
    )
    if run is not None:
        buf = io.BytesIO()
        np.savez(
            buf, centroids=out.centroids, pairs=np.array(out.pairs, np.int64).reshape(-1, 2),
            fingerprint=np.array(fingerprint), device=np.array(out.device), note=np.array(out.note),
        )
        run.write_bytes(PARTITIONS, buf.getvalue())
    return out


@ray.remote(num_cpus=1, num_returns=2)
def _scatter(
    block: RowRange,
    first: int,
    cents: np.ndarray,
    compared: np.ndarray,
    sample: tuple,
    k: int,
    thresholds: list[float],
    edges: np.ndarray,
    out: tuple[str, dict | None, str] | None,
) -> tuple[np.ndarray | None, tuple]:
    """One block: its rows sorted by partition (written to ``out``, else returned), and what the driver keeps."""
    import faiss

    faiss.omp_set_num_threads(1)
    with threadpool_limits(limits=1):
        rows = read_rows(block)
        parts = approx.assign(rows, cents)
        ordered = np.ascontiguousarray(rows[np.argsort(parts, kind="stable")])
        sample_x, sample_pos, sample_parts, share, seed = sample
        vals, idx, counts = approx.rows_against_block(sample_x, sample_pos, rows, first, k, thresholds)
        cols = np.flatnonzero(np.random.default_rng([seed, first]).random(len(rows)) < share)
        hist = approx.uncovered_histogram(
            sample_x, sample_pos, sample_parts, rows[cols], first + cols, parts[cols], compared, edges
        )
    info = (parts.astype(np.int32), np.bincount(parts, minlength=len(cents)), vals, idx, counts, hist)
    if out is None:
        return ordered, info
    RunDir(out[0], out[1]).write_bytes(out[2], ordered.tobytes(), fsync=False)
    return None, info


@ray.remote(num_cpus=1)
def _gather(sources: list[RowRange], counts: np.ndarray, dim: int, out: tuple[str, dict | None, str] | None):
    """One group of partitions: each block's rows of them (partition order), reordered partition by partition."""
    chunks = [read_rows(s) for s in sources]
    starts = np.concatenate([np.zeros((len(sources), 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    pieces = [
        chunks[b][starts[b, p] : starts[b, p + 1]]
        for p in range(counts.shape[1])
        for b in range(len(sources))
        if counts[b, p]
    ]
    group = np.ascontiguousarray(np.concatenate(pieces) if pieces else np.zeros((0, dim), np.float32))
    if out is None:
        return group
    RunDir(out[0], out[1]).write_bytes(out[2], group.tobytes(), fsync=False)
    return None


@dataclass
class Layout:
    """The partitions, where each group of partitions' rows lie, and the quality sample's brute force."""

    parts: approx.Partitions
    group_starts: np.ndarray  # first position (partition order) of each group; one more entry: N
    groups: list[RowRange]
    sample: np.ndarray
    exact_idx: np.ndarray
    exact_counts: np.ndarray
    sampled_hist: np.ndarray  # histogram of the sample's pairs in partitions never compared

    def pieces(self, ranges: list[tuple[int, int]]) -> dict[tuple[int, int], RowRange]:
        """Each tile range (positions in partition order, within one partition) as a range of its group."""
        out = {}
        for start, stop in ranges:
            g = int(np.searchsorted(self.group_starts, start, side="right")) - 1
            first = int(self.group_starts[g])
            out[(start, stop)] = replace(self.groups[g], start=start - first, stop=stop - first)
        return out


def _where(run: RunDir | None, ref: ray.ObjectRef, name: str, start: int, stop: int, dim: int) -> RowRange:
    """Rows of a scratch matrix: file ``name`` of the run dir's scratch folder, or the object-store array ``ref``."""
    if run is None:
        return RowRange(start, stop, dim, ref=[ref])
    return RowRange(
        start, stop, dim, uri=run.uri, storage_options=run.storage_options, rel=posixpath.join(SCRATCH_DIR, name)
    )


def _groups(sizes: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Consecutive partitions in groups of at most ``rows`` rows (a larger partition alone)."""
    groups, first, total = [], 0, 0
    for p, size in enumerate(sizes):
        if total and total + size > rows:
            groups.append((first, p))
            first, total = p, 0
        total += int(size)
    groups.append((first, len(sizes)))
    return groups


def layout(
    found: Scan,
    cents: Centroids,
    n: int,
    dim: int,
    quality_size: int,
    seed: int,
    k: int,
    thresholds: list[float],
    edges: np.ndarray,
    run: RunDir | None,
) -> Layout:
    """Scatter every block by partition, gather each group of partitions; the quality sample on the way."""
    start = time.perf_counter()
    size = len(cents.centroids)
    compared = approx.covered_pairs(cents.pairs, size)
    sample = approx.quality_sample(n, quality_size, seed)
    sample_x = found.rows_at(sample)
    share = min(1.0, HISTOGRAM_PAIRS / max(1, len(sample) * n))  # columns each block pairs with the sample
    sample_ref = ray.put((sample_x, sample, approx.assign(sample_x, cents.centroids), share, seed))
    cents_ref, compared_ref = ray.put(cents.centroids), ray.put(compared)

    def scratch(name: str) -> tuple[str, dict | None, str] | None:
        return None if run is None else (run.uri, run.storage_options, posixpath.join(SCRATCH_DIR, name))

    if run is not None:
        run.remove(SCRATCH_DIR)
    scattered, infos = [], []
    for b, (block, (first, _)) in enumerate(zip(found.blocks, found.ranges, strict=True)):
        ordered, info = _scatter.remote(
            block, first, cents_ref, compared_ref, sample_ref, k, thresholds, edges, scratch(f"block-{b:06d}.f32")
        )
        scattered.append(ordered)
        infos.append(info)
    infos = ray.get(infos)
    assignment = np.concatenate([i[0] for i in infos]).astype(np.int64) if infos else np.zeros(0, np.int64)
    counts = np.stack([i[1] for i in infos]) if infos else np.zeros((0, size), np.int64)
    exact_vals = np.full((len(sample), k), -np.inf, np.float32)
    exact_idx = np.full((len(sample), k), -1, np.int64)
    exact_counts = np.zeros((len(thresholds), len(sample)), np.int64)
    sampled_hist = np.zeros(len(edges) - 1, np.int64)
    for _, _, vals, idx, cnt, hist in infos:
        exact_vals, exact_idx = merge_topk(exact_vals, exact_idx, vals, idx, k)
        exact_counts += cnt
        sampled_hist += hist
    parts = approx.from_assignment(assignment, size, cents.pairs, cents.device, cents.note)
    log.info(
        "similarity: %d blocks of up to %d rows assigned to partitions and scattered in %.1f s",
        len(infos), SCAN_ROWS, time.perf_counter() - start,
    )
    start = time.perf_counter()
    offsets = np.concatenate([np.zeros((len(counts), 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    bounds, groups, gathered = [], [], []
    for g, (p0, p1) in enumerate(_groups(np.bincount(assignment, minlength=size), GROUP_ROWS)):
        holding = [b for b in range(len(counts)) if offsets[b, p1] > offsets[b, p0]]
        sources = [
            _where(run, scattered[b], f"block-{b:06d}.f32", int(offsets[b, p0]), int(offsets[b, p1]), dim)
            for b in holding
        ]
        rel = f"group-{g:06d}.f32"
        gathered.append(_gather.remote(sources, counts[holding, p0:p1], dim, scratch(rel)))
        bounds.append(int(parts.bounds[p0]))
        groups.append(_where(run, gathered[-1], rel, 0, 0, dim))
    # every group is complete before the scattered blocks go (groups in the object store stay there)
    if run is None:
        ray.wait(gathered, num_returns=len(gathered), fetch_local=False)
    else:
        ray.get(gathered)  # a failed gather raises here
    del scattered
    if run is not None:
        for b in range(len(counts)):
            run.remove(posixpath.join(SCRATCH_DIR, f"block-{b:06d}.f32"))
    log.info(
        "similarity: %d groups of partitions (up to %d rows each) gathered in %.1f s",
        len(groups), GROUP_ROWS, time.perf_counter() - start,
    )
    return Layout(
        parts, np.array(bounds + [n], np.int64), groups, sample, exact_idx, exact_counts, sampled_hist
    )
