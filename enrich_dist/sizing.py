"""``enrich plan``: the similarity and select stages' plans for an archive size on a cluster, before anything runs.

For N images of dimension D on ``nodes`` x (``cpus``, ``gpus``, ``memory``) it prints what the stage
would do and need: exact mode's block size, tiles and pairs, the buffers of one tile task, the driver's
reduction, the embeddings held in every node's object store, the bytes tiles read and return; approximate
mode's partitions, probed pairs and the share of all pairs they are. Wall time is projected from a short
run of the real stage on the cluster it is started on (``calibrate``): two sizes give a fixed cost and a
cost per pair, scaled by the target's CPUs. GPU projections use the rate measured on one H200 on
2026-11-30 (docs/performance.md), as no GPU run calibrates here; they are labelled so.

The select stage's part (:func:`select_plan`): a complete ranking (``exact``, ``batch``) computes N^2 / 2
similarity products per replicate, cells mode about N x cell size / 2; its time per replicate is
projected from the ranking itself timed here in this process at two sizes (:func:`calibrate_select`).

A projection is a projection: the output says which numbers are computed from the plan (exact), which
are measured now (calibration) and which are projected.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .config import SimilarityConfig, parse_memory
from .similarity.approx import default_partitions, kmeans_rows
from .similarity.kernel import CHUNK_ROWS
from .similarity.partitioned import SCAN_ROWS
from .similarity.plan import GPU_BLOCK, approx_driver_bytes, choose_block, driver_bytes, task_bytes

log = logging.getLogger("enrich_dist.sizing")

SELECT_CALIBRATION = {"exact": (20_000, 40_000), "cells": (40_000, 80_000)}
SELECT_SEED_SHARE = 0.022  # the select stage's default seed set
SELECT_BATCH_SHARE = 0.11  # and its default batch
H200_PAIRS_PER_SECOND = 5.0e11 / 33.7  # all pairs of 10^6 images, fp32, fused pass incl. reduction (2026-11-30)
CALIBRATION_SIZES = {"exact": (30_000, 60_000), "approx": (100_000, 200_000)}
WARM_UP_SIZE = 3_000  # compiles the kernels and starts the workers before anything is timed
CALIBRATION_DIM = 128


@dataclass(frozen=True)
class Cluster:
    """The target: ``nodes`` alike, each with ``cpus``, ``gpus`` and ``memory`` bytes."""

    nodes: int = 1
    cpus: int = os.cpu_count() or 1
    gpus: int = 0
    memory: int = 0

    @property
    def total_cpus(self) -> int:
        return self.nodes * self.cpus


@dataclass(frozen=True)
class Calibration:
    """The stage's cost on the current cluster: ``fixed`` seconds plus ``per_unit_cpu`` CPU-seconds per unit of
    work (a pair in exact mode, a compared pair in approximate mode: :func:`work`)."""

    mode: str
    fixed: float
    per_unit_cpu: float
    cpus: int
    runs: tuple[tuple[int, float], ...]  # (images, seconds) measured

    def seconds(self, n: int, cpus: int, units: float | None = None) -> float:
        """Wall seconds for ``n`` images on ``cpus`` (``units``: the plan's own count of work, else :func:`work`)."""
        return self.fixed + (work(self.mode, n) if units is None else units) * self.per_unit_cpu / max(1, cpus)


def work(mode: str, n: int) -> float:
    """The units of work the stage's time grows with: all pairs (exact); the pairs compared with the default
    partitions (approximate: about N^1.5 with sqrt(N) partitions).

    Approximate mode measured on 2 cores: 35.5-37.4 s at 10^6 and 715 s at 10^7 (20x for 31x the pairs
    compared: part of its work grows with the images). Projected from 10^5 and 2 x 10^5 per compared pair:
    40.3 s and 22.4 min (high by 8-14 % and 88 %); per image: 24.4 s and about 4 min (short by 31-35 % and
    66 %). :func:`project` reports both as the range.
    """
    if mode == "exact":
        return n * (n - 1) / 2
    return float(approx_plan(n, CALIBRATION_DIM, SimilarityConfig(mode="approx"))["pairs_compared"])


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Clustered unit vectors (archives are clustered), seeded."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 50), dim))
    x = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def calibrate(
    cpus: int, mode: str = "exact", sizes: tuple[int, int] | None = None, dim: int = CALIBRATION_DIM
) -> Calibration:
    """Time the real stage (inside the attached Ray, after a warm-up) at two sizes: fixed cost and cost per unit."""
    from .similarity.stage import compute_similarity

    cfg = SimilarityConfig(mode=mode, edge_threshold=None, duplicate_thresholds=())
    compute_similarity(_vectors(WARM_UP_SIZE, dim, seed=99), np.arange(WARM_UP_SIZE), cfg, progress=False)
    runs = []
    for i, n in enumerate(sizes or CALIBRATION_SIZES[mode]):
        x = _vectors(n, dim, seed=i)
        start = time.perf_counter()
        compute_similarity(x, np.arange(n), cfg, progress=False)
        runs.append((n, time.perf_counter() - start))
        log.info("calibration (%s): %d images in %.2f s", mode, n, runs[-1][1])
    (n1, t1), (n2, t2) = runs
    w1, w2 = work(mode, n1), work(mode, n2)
    per_unit = max((t2 - t1) / (w2 - w1), 1e-15)
    return Calibration(mode, max(0.0, t1 - w1 * per_unit), per_unit * cpus, cpus, tuple(runs))


def exact_plan(n: int, dim: int, cluster: Cluster, cfg: SimilarityConfig) -> dict:
    """Blocks, tiles, pairs and memory of the exact stage for ``n`` images on ``cluster`` (computed, not measured)."""
    k, n_thr = cfg.top_k, len(cfg.thresholds)
    budget = parse_memory(cfg.max_memory)
    on_gpus = cluster.gpus > 0 and cfg.device != "cpu"  # as the stage: GPU tiles of GPU_BLOCK rows
    workers = cluster.nodes * cluster.gpus if on_gpus else cluster.total_cpus
    block = cfg.block_size or (
        max(1, min(GPU_BLOCK, n)) if on_gpus
        else choose_block(n, dim, k, n_thr, max(budget, _least_budget(n, dim, k, n_thr)), workers, CHUNK_ROWS)
    )
    n_blocks = math.ceil(n / block)
    tiles = n_blocks * (n_blocks + 1) // 2
    per_task = task_bytes(block, k, n_thr, min(block, CHUNK_ROWS))
    result_per_tile = 2 * block * (k * 12 + n_thr * 8)
    return {
        "mode": "exact",
        "images": n,
        "dim": dim,
        "pairs": n * (n - 1) // 2,
        "block": block,
        "tiles": tiles,
        "task_memory": per_task,
        "tasks_in_flight": 2 * workers,
        "driver_memory": reduction_bytes(n, k, n_thr),
        "object_store_per_node": n * dim * 4,
        "bytes_read_by_tiles": tiles * 2 * block * dim * 4,
        "bytes_returned_to_driver": tiles * result_per_tile,
        "edges_cap_bytes": cfg.max_edges * 20 if cfg.edge_threshold is not None else 0,
    }


def _least_budget(n: int, dim: int, k: int, n_thr: int) -> int:
    """The memory the plan must assume at least: the driver's share (a budget below it is refused at run time)."""
    return driver_bytes(n, dim, k, n_thr) + (1 << 30)


def reduction_bytes(n: int, k: int, n_thresholds: int) -> int:
    """The driver's share when the rows stream: image ids, the O(N k) reduction and the neighbor table made from it."""
    return 8 * n + 2 * n * (k * 12 + n_thresholds * 8)


def approx_plan(n: int, dim: int, cfg: SimilarityConfig) -> dict:
    """Partitions and probed pairs of the approximate mode (each partition against its ``nprobe`` nearest)."""
    partitions = cfg.n_partitions or default_partitions(n)
    nprobe = min(cfg.nprobe, partitions)
    per_partition = n / partitions
    # each unordered pair of probed partitions once; a partition pair (p, q) is probed from p or from q
    probed_pairs = partitions * per_partition * per_partition * (nprobe - 0.5)
    probed_pairs = min(probed_pairs, n * (n - 1) / 2)
    return {
        "mode": "approx",
        "images": n,
        "dim": dim,
        "partitions": partitions,
        "nprobe": nprobe,
        "pairs": n * (n - 1) // 2,
        "pairs_compared": int(probed_pairs),
        "share_compared": probed_pairs / max(1, n * (n - 1) / 2),
        # ids, assignment and order (24 bytes an image), the reduction, the k-means sample
        "driver_memory": approx_driver_bytes(n, dim, cfg.top_k, len(cfg.thresholds), kmeans_rows(n, cfg.n_partitions)),
        "task_memory": 3 * min(n, SCAN_ROWS) * dim * 4,
        "scratch_bytes": 2 * n * dim * 4,
    }


def project(plan: dict, cluster: Cluster, calibration: Calibration | None) -> dict:
    """Projected wall seconds on ``cluster``: CPU from the calibration, GPU from the H200 measurement."""
    pairs = plan.get("pairs_compared", plan["pairs"])
    out: dict = {}
    if calibration is not None:
        unit = "pair" if calibration.mode == "exact" else "compared pair"
        out["cpu_seconds"] = calibration.seconds(plan["images"], cluster.total_cpus, units=pairs)
        out["cpu_basis"] = (
            f"{calibration.mode} stage measured now on {calibration.cpus} CPUs: "
            + ", ".join(f"{n:,} images {t:.2f} s" for n, t in calibration.runs)
            + f"; fixed {calibration.fixed:.2f} s + {calibration.per_unit_cpu:.3g} CPU-s per {unit}"
        )
        if calibration.mode == "approx" and len(calibration.runs) == 2:
            # part of the approximate stage grows with the images (reading, assignment, the quality sample),
            # part with the pairs compared: the same two runs fitted per image give the low end
            (n1, t1), (n2, t2) = calibration.runs
            per_image = max((t2 - t1) / max(1, n2 - n1), 0.0) * calibration.cpus
            fixed = max(0.0, t1 - n1 * per_image / calibration.cpus)
            out["cpu_seconds_low"] = fixed + plan["images"] * per_image / max(1, cluster.total_cpus)
            out["cpu_basis"] += f"; {_duration(out['cpu_seconds_low'])} if it grew with the images only"
    if cluster.gpus:
        out["gpu_seconds"] = pairs / (H200_PAIRS_PER_SECOND * cluster.gpus * cluster.nodes)
        out["gpu_basis"] = "the fused pass measured on one H200 (2026-11-30), not calibrated on this cluster"
    return out


def select_plan(n: int, dim: int, mode: str, cell_size: int, replicates: int) -> dict:
    """What one ranking computes and holds: products per replicate, where the vectors sit, a cells task's memory."""
    from .selection.cells import GROUP_ROWS, IN_MEMORY_BYTES, cell_count

    cells = mode == "cells"
    vectors = n * dim * 4
    if cells:
        # sum over cells of size^2 / 2: k-means cells vary in size (10^7 measured: 7 % above N x size / 2)
        products = n * min(n, cell_size) / 2
        held = "a memory-mapped file in TMPDIR" if vectors > IN_MEMORY_BYTES else "the driver's memory"
    else:
        products = n * (n - 1) / 2
        held = "the shard actors' memory (or one process per replicate when small)"
    return {
        "mode": mode,
        "images": n,
        "dim": dim,
        "replicates": replicates,
        "products_per_replicate": products,
        "share_of_complete": products / max(1.0, n * (n - 1) / 2),
        "cells": cell_count(n, cell_size) if cells else None,
        "vectors_bytes": vectors,
        "vectors_held_in": held,
        "task_memory": 3 * min(n, GROUP_ROWS) * dim * 4 if cells else None,
    }


def calibrate_select(cpus: int, mode: str, sizes: tuple[int, int] | None = None, dim: int = CALIBRATION_DIM) -> Calibration:
    """Time one ranking in this process at two sizes (2.2 % seeds, clustered vectors): fixed cost and cost per unit.

    A unit is a similarity product of a complete ranking, an image in cells mode (whose products grow as N).
    """
    from threadpoolctl import threadpool_limits

    from .selection.cells import cell_count, make_cells, rank_in_process
    from .selection.greedy import DEFAULT_POOL, batch_greedy, choose_seeds, exact_greedy

    cells = mode == "cells"

    def one(n: int, seed: int) -> float:
        x = _vectors(n, dim, seed=seed)
        seeds = choose_seeds(n, max(1, round(SELECT_SEED_SHARE * n)), np.random.default_rng(seed))
        with threadpool_limits(limits=1 if cells else cpus):
            start = time.perf_counter()
            if cells:
                rank_in_process(x, make_cells(x, cell_count(n, 1024), seed=0, threads=1), seeds, DEFAULT_POOL)
            elif mode == "batch":
                batch_greedy(x, seeds, max(1, round(SELECT_BATCH_SHARE * n)))
            else:
                exact_greedy(x, seeds)
            return time.perf_counter() - start

    one(WARM_UP_SIZE, seed=99)  # loads BLAS and FAISS before anything is timed
    runs = []
    for i, n in enumerate(sizes or SELECT_CALIBRATION["cells" if cells else "exact"]):  # batch: as exact
        runs.append((n, one(n, seed=10 + i)))
        log.info("calibration (select %s): %d images in %.2f s", mode, n, runs[-1][1])
    (n1, t1), (n2, t2) = runs
    w1, w2 = (float(n1), float(n2)) if cells else (n1 * (n1 - 1) / 2, n2 * (n2 - 1) / 2)
    per_unit = max((t2 - t1) / (w2 - w1), 1e-15)
    cpu_seconds = per_unit * (1 if cells else cpus)  # cells ran on one thread; the complete ranking on ``cpus``
    return Calibration(f"select-{mode}", max(0.0, t1 - w1 * per_unit), cpu_seconds, cpus, tuple(runs))


def project_select(plan: dict, cluster: Cluster, calibration: Calibration | None) -> dict:
    """Projected wall seconds of one ranking and of all replicates on ``cluster``'s CPUs (None without calibration)."""
    if calibration is None:
        return {}
    units = float(plan["images"]) if plan["mode"] == "cells" else plan["products_per_replicate"]
    one = calibration.seconds(plan["images"], cluster.total_cpus, units=units)
    what = "image" if plan["mode"] == "cells" else "product"
    return {
        "cpu_seconds_per_replicate": one,
        "cpu_seconds": one * plan["replicates"],
        "cpu_basis": (
            "the ranking timed now in this process: "
            + ", ".join(f"{n:,} images {t:.2f} s" for n, t in calibration.runs)
            + f"; {calibration.per_unit_cpu:.3g} CPU-s per {what}, assuming the work spreads over every CPU"
        ),
    }


def describe_select(plan: dict, projection: dict) -> str:
    """The selection plan as lines for a terminal."""
    rule = {"cells": "farthest-first within k-means cells", "exact": "a complete farthest-first ranking",
            "batch": "a complete ranking in the paper's batches"}[plan["mode"]]
    lines = [
        f"select, {plan['mode']} mode ({rule}): {plan['images']:,} images, {plan['replicates']} replicate(s)",
        f"  products: about {plan['products_per_replicate']:.2g} per replicate "
        f"({_share(plan['share_of_complete'])} of a complete ranking's N^2/2; computed)",
        f"  memory: the {_size(plan['vectors_bytes'])} of vectors in {plan['vectors_held_in']} (computed)",
    ]
    if plan["cells"]:
        lines.append(f"  cells: {plan['cells']:,}; a cell task about {_size(plan['task_memory'])} (computed)")
    if "cpu_seconds" in projection:
        lines.append(
            f"  projected wall time on the CPUs: {_duration(projection['cpu_seconds_per_replicate'])} per replicate, "
            f"{_duration(projection['cpu_seconds'])} for {plan['replicates']} (projected; {projection['cpu_basis']})"
        )
    if plan["mode"] != "cells":
        lines.append(
            "  note: an upper bound: cell bounds (--bound-cells, from 64 cells up) skip the products no pick can use,"
            " as many as the embeddings are clustered (none on diffuse ones); the log reports the share skipped"
        )
    if plan["mode"] != "cells" and plan["images"] > 1_000_000:
        lines.append("  note: this grows as N^2; --select-mode cells grows as N x cell size")
    return "\n".join(lines)


def _share(fraction: float) -> str:
    """A share as a percentage that keeps small shares visible (100 %, 0.01 %)."""
    return f"{100 * fraction:.0f} %" if fraction >= 0.01 else f"{100 * fraction:.2g} %"


def _size(value: float) -> str:
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def describe(plan: dict, projection: dict, cluster: Cluster) -> str:
    """The plan as lines for a terminal."""
    lines = [
        f"similarity, {plan['mode']} mode: {plan['images']:,} images x {plan['dim']} dims on {cluster.nodes} node(s) of "
        f"{cluster.cpus} CPUs, {cluster.gpus} GPUs" + (f", {_size(cluster.memory)}" if cluster.memory else ""),
        f"  pairs: {plan['pairs']:,}",
    ]
    if plan["mode"] == "exact":
        lines += [
            f"  tiles: {plan['tiles']:,} of {plan['block']:,} x {plan['block']:,} rows (computed)",
            f"  memory: {_size(plan['task_memory'])} per tile task, {plan['tasks_in_flight']} in flight; driver "
            f"{_size(plan['driver_memory'])}; object store {_size(plan['object_store_per_node'])} per node (computed)",
            f"  bytes: tiles read {_size(plan['bytes_read_by_tiles'])} of row blocks, return "
            f"{_size(plan['bytes_returned_to_driver'])} to the driver; the edge list up to "
            f"{_size(plan['edges_cap_bytes'])} (computed)",
        ]
    else:
        lines += [
            f"  partitions: {plan['partitions']:,}, each compared with its {plan['nprobe']} nearest (computed)",
            f"  pairs compared: about {plan['pairs_compared']:,} ({plan['share_compared']:.2%} of all; computed)",
            f"  memory: driver {_size(plan['driver_memory'])}; a scan, scatter or gather task "
            f"{_size(plan['task_memory'])}; scratch files in the run dir {_size(plan['scratch_bytes'])} at most "
            "(computed)",
        ]
    if cluster.memory and plan.get("object_store_per_node", 0) * 2 > cluster.memory:
        lines.append("  warning: the embeddings take more than half of a node's memory; use more memory per node")
    if "cpu_seconds" in projection:
        low = f"{_duration(projection['cpu_seconds_low'])} to " if "cpu_seconds_low" in projection else ""
        lines.append(f"  projected wall time on the CPUs: {low}{_duration(projection['cpu_seconds'])} "
                     f"(projected; {projection['cpu_basis']})")
    if "gpu_seconds" in projection:
        lines.append(f"  projected wall time on the GPUs: {_duration(projection['gpu_seconds'])} "
                     f"(projected; {projection['gpu_basis']})")
    return "\n".join(lines)
