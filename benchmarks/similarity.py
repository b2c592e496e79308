"""Benchmark: the whole similarity stage against the bare tiled GEMM over the same tile plan.

Both run as Ray tasks with the same tile groups and the same threads per task, on the same seeded
unit vectors (optionally clustered, to mimic a redundant archive). Prints one JSON line with the
ratio stage / GEMM and the peak resident memory of the driver and of the Ray workers, and appends it
to ``--out``.

    python benchmarks/similarity.py --n 45460 --dim 128 --block 4096 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time

import numpy as np
import ray
from threadpoolctl import threadpool_limits

from enrich_dist.config import SimilarityConfig
from enrich_dist.runtime import ray_session
from enrich_dist.similarity import compute_similarity, tile_plan
from enrich_dist.similarity.plan import Tile, group_tiles, schedule
from enrich_dist.similarity.stage import MIN_TASK_PAIRS

log = logging.getLogger("benchmarks.similarity")


def unit_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Seeded L2-normalised float32 rows; with ``clusters`` > 0, noisy copies of random centres."""
    rng = np.random.default_rng(seed)
    if clusters:
        centres = rng.standard_normal((clusters, dim))
        x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    else:
        x = rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@ray.remote(num_cpus=1)
def _gemm_group(x: np.ndarray, tiles: list[Tile]) -> float:
    """Only ``S = xi @ xj.T`` for each tile, one BLAS thread per CPU of the task."""
    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    checksum = 0.0
    out = np.empty(max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in tiles), np.float32)
    with threadpool_limits(limits=threads):
        for r0, r1, c0, c1 in tiles:
            s = np.matmul(x[r0:r1], x[c0:c1].T, out=out[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0))
            checksum += float(s[0, 0])
    return checksum


@ray.remote(num_cpus=1)
def _peak_rss() -> tuple[int, int]:
    """(pid, peak resident set in KiB) of the worker that runs it."""
    time.sleep(0.5)
    return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bare_gemm_seconds(x: np.ndarray, block: int) -> float:
    """Wall time of the tiled GEMM alone, same plan and task grouping as the stage."""
    groups = group_tiles(schedule(tile_plan(len(x), block)), MIN_TASK_PAIRS)
    start = time.perf_counter()
    x_ref = ray.put(x)
    ray.get([_gemm_group.remote(x_ref, group) for group in groups])
    return time.perf_counter() - start


def workers_peak_mib(cpus: int) -> tuple[int, float]:
    """Number of pool workers and the sum of their peak resident memory (shared pages counted in each)."""
    peaks = dict(ray.get([_peak_rss.remote() for _ in range(4 * cpus)]))
    return len(peaks), sum(peaks.values()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=45460)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=0, help="0: uniform random directions")
    parser.add_argument("--spread", type=float, default=0.5, help="noise around cluster centres")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs; the best of each is kept")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    x = unit_vectors(args.n, args.dim, args.clusters, args.spread, args.seed)
    ids = np.arange(args.n, dtype=np.int64)
    cfg = SimilarityConfig(block_size=args.block, top_k=args.top_k)
    with ray_session(num_cpus=args.num_cpus) as resources:
        compute_similarity(
            x[: min(args.n, 2 * args.block)], ids[: min(args.n, 2 * args.block)], cfg, progress=False
        )
        gemm, stage = [], []
        for _ in range(args.repeats):
            gemm.append(bare_gemm_seconds(x, args.block))
            start = time.perf_counter()
            _, summary = compute_similarity(x, ids, cfg, progress=False)
            stage.append(time.perf_counter() - start)
            log.info("bare GEMM %.2f s, stage %.2f s", gemm[-1], stage[-1])
        n_workers, workers = workers_peak_mib(resources.cpus)
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "benchmark": "similarity",
        "n": args.n,
        "dim": args.dim,
        "block": args.block,
        "top_k": args.top_k,
        "clusters": args.clusters,
        "cpus": resources.cpus,
        "gemm_seconds": round(min(gemm), 3),
        "stage_seconds": round(min(stage), 3),
        "ratio": round(min(stage) / min(gemm), 3),
        "gemm_runs": [round(s, 3) for s in gemm],
        "stage_runs": [round(s, 3) for s in stage],
        "pairs_above_0.5": summary["thresholds"]["0.5"]["pairs"],
        "driver_peak_mib": round(driver, 1),
        "workers": n_workers,
        "workers_peak_mib": round(workers, 1),
        "peak_mib": round(driver + workers, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    line = json.dumps(result)
    print(line)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    main()
