"""Benchmark: the whole similarity stage against the bare tiled GEMM over the same tile plan.

Both run as Ray tasks with the same tiles, task groups, row chunks and one BLAS thread per task, on
the same seeded unit vectors (optionally clustered, to mimic a redundant archive); the GEMM alone is
the fastest the stage could be. Runs alternate (GEMM, stage, GEMM, ...). Prints one JSON line with
the ratio of the best stage to the best GEMM run, the median of each stage run over the GEMM run
just before it (steadier on a shared machine), and the peak resident memory of the driver and of
the Ray workers, and appends it to ``--out``. Wall times on a shared machine move with its load, so
each run also records the CPU seconds spent by the driver and every Ray process it started (workers,
raylet, GCS): their ratio, stage over GEMM, is the same work comparison without the neighbors'
load (it leaves out idle waits, which the wall-time ratio counts). ``--mode approx``
times the approximate mode instead (no GEMM baseline) and reports its measured recall.

    python -P benchmarks/similarity.py --n 45460 --out results.jsonl
    python -P benchmarks/similarity.py --n 1000000 --mode approx --clusters 2000 --repeats 1 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import time

import numpy as np
import psutil
import ray
from threadpoolctl import threadpool_limits

from enrich_dist.config import SimilarityConfig, parse_memory
from enrich_dist.runtime import ray_session
from enrich_dist.similarity import compute_similarity, kernel, tile_plan
from enrich_dist.similarity.plan import Tile, choose_block, group_tiles, schedule
from enrich_dist.similarity.stage import MIN_TASK_PAIRS, PAPER_THRESHOLDS

log = logging.getLogger("benchmarks.similarity")


def unit_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Seeded L2-normalised float32 rows; with ``clusters`` > 0, noisy copies of random centres."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), np.float32)
    centres = rng.standard_normal((clusters, dim)) if clusters else None
    for start in range(0, n, 1 << 16):
        stop = min(n, start + (1 << 16))
        part = rng.standard_normal((stop - start, dim))
        if centres is not None:
            part = centres[rng.integers(0, clusters, stop - start)] + spread * part
        x[start:stop] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


@ray.remote(num_cpus=1)
def _gemm_group(x: np.ndarray, tiles: list[Tile]) -> float:
    """Only the products ``S = xi @ xj.T`` of each tile, in the stage's row chunks, one BLAS thread."""
    checksum = 0.0
    with threadpool_limits(limits=1):
        for r0, r1, c0, c1 in tiles:
            for s, _, _ in kernel.tile_products(x[r0:r1], x[c0:c1], r0 == c0):
                checksum += float(s[0, 0])
    return checksum


@ray.remote(num_cpus=1)
def _peak_rss() -> tuple[int, int]:
    """(pid, peak resident set in KiB) of the worker that runs it."""
    time.sleep(0.5)
    return os.getpid(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bare_gemm_seconds(x: np.ndarray, block: int, cpus: int) -> float:
    """Wall time of the tiled GEMM alone: same plan, grouping and submission window as the stage."""
    groups = iter(group_tiles(schedule(tile_plan(len(x), block)), MIN_TASK_PAIRS))
    start = time.perf_counter()
    x_ref = ray.put(x)
    pending = [_gemm_group.remote(x_ref, g) for g in (next(groups, None) for _ in range(2 * cpus)) if g]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
        group = next(groups, None)
        if group:
            pending.append(_gemm_group.remote(x_ref, group))
    return time.perf_counter() - start


def source_version() -> str:
    """The checkout's commit (with ``+dirty`` when files differ from it), or ``unknown`` outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty.strip() else "")


def cluster_cpu() -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) of this process and every process under it (the local Ray), per process."""
    me = psutil.Process()
    seconds = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            seconds[(proc.pid, proc.create_time())] = times.user + times.system
        except psutil.Error:
            continue
    return seconds


def cpu_since(before: dict[tuple[int, float], float]) -> float:
    """CPU seconds spent since ``before`` by this process and the processes under it (new ones from zero)."""
    return sum(v - before.get(key, 0.0) for key, v in cluster_cpu().items())


def workers_peak_mib(cpus: int) -> tuple[int, float]:
    """Number of pool workers and the sum of their peak resident memory (shared pages counted in each)."""
    peaks = dict(ray.get([_peak_rss.remote() for _ in range(4 * cpus)]))
    return len(peaks), sum(peaks.values()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=45460)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=None, help="default: chosen from --max-memory, as the stage does")
    parser.add_argument("--max-memory", default="2G")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--mode", choices=["exact", "approx"], default="exact")
    parser.add_argument("--n-partitions", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--clusters", type=int, default=0, help="0: uniform random directions")
    parser.add_argument("--spread", type=float, default=0.5, help="noise around cluster centres")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs; the best of each is kept")
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edge-threshold", default="0.9", help="the stage's edge list (default 0.9, as the stage; none: off)")
    parser.add_argument("--out", default="results.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    x = unit_vectors(args.n, args.dim, args.clusters, args.spread, args.seed)
    ids = np.arange(args.n, dtype=np.int64)
    with ray_session(num_cpus=args.num_cpus) as resources:
        block = args.block or choose_block(
            args.n, args.dim, args.top_k, len(PAPER_THRESHOLDS), parse_memory(args.max_memory), resources.cpus,
            kernel.chunk_rows(args.n),
        )
        cfg = SimilarityConfig(
            block_size=block, top_k=args.top_k, mode=args.mode, n_partitions=args.n_partitions,
            nprobe=args.nprobe, seed=args.seed, max_memory=args.max_memory,
            edge_threshold=None if args.edge_threshold.lower() == "none" else float(args.edge_threshold),
        )
        warm = min(args.n, 2 * block, 20_000)
        compute_similarity(x[:warm], ids[:warm], cfg, progress=False)
        gemm, stage, gemm_cpu, stage_cpu = [], [], [], []
        load = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            if args.mode == "exact":
                before = cluster_cpu()
                gemm.append(bare_gemm_seconds(x, block, resources.cpus))
                gemm_cpu.append(cpu_since(before))
            before = cluster_cpu()
            start = time.perf_counter()
            _, summary = compute_similarity(x, ids, cfg, progress=args.mode == "approx")
            stage.append(time.perf_counter() - start)
            stage_cpu.append(cpu_since(before))
            log.info(
                "bare GEMM %s s (%s CPU s), stage %.2f s (%.2f CPU s)",
                f"{gemm[-1]:.2f}" if gemm else "-", f"{gemm_cpu[-1]:.2f}" if gemm_cpu else "-", stage[-1], stage_cpu[-1],
            )
        load.append(os.getloadavg()[0])
        n_workers, workers = workers_peak_mib(resources.cpus)
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "benchmark": "similarity",
        "mode": args.mode,
        "n": args.n,
        "dim": args.dim,
        "block": block,
        "top_k": args.top_k,
        "clusters": args.clusters,
        "cpus": resources.cpus,
        "stage_seconds": round(min(stage), 3),
        "stage_runs": [round(s, 3) for s in stage],
        "stage_cpu_seconds": [round(s, 3) for s in stage_cpu],
        "load_average": [round(v, 1) for v in load],
        "pairs_above_0.5": summary["thresholds"]["0.5"]["pairs"],
        "edge_threshold": cfg.edge_threshold,
        "edges": (summary.get("edges") or {}).get("pairs"),
        "driver_peak_mib": round(driver, 1),
        "workers": n_workers,
        "workers_peak_mib": round(workers, 1),
        "peak_mib": round(driver + workers, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": source_version(),
    }
    if gemm:
        paired = [s / g for s, g in zip(stage, gemm, strict=True)]
        result.update(
            gemm_seconds=round(min(gemm), 3),
            ratio=round(min(stage) / min(gemm), 3),
            median_paired_ratio=round(float(np.median(paired)), 3),
            paired_ratios=[round(r, 3) for r in paired],
            gemm_runs=[round(s, 3) for s in gemm],
            gemm_cpu_seconds=[round(s, 3) for s in gemm_cpu],
            cpu_ratio=round(min(stage_cpu) / min(gemm_cpu), 3),
            median_paired_cpu_ratio=round(float(np.median([s / g for s, g in zip(stage_cpu, gemm_cpu, strict=True)])), 3),
        )
    if "approx" in summary:
        result["approx"] = summary["approx"]
    line = json.dumps(result)
    print(line)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    main()
