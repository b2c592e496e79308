"""Selection benchmark: exact (pooled) greedy vs a naive one-at-a-time loop, and the paper's batch schedule.

Data: ``--n`` unit vectors of ``--dim`` drawn around ``n / 50`` cluster centres (redundant, like
frames of one clip). The naive loop computes one candidate x new-row product per pick with the same
float64-then-float32 rule as the package, so its ranking must be identical. Prints one summary and
appends one JSON line to ``--out``. Run from the repository root as ``python -m benchmarks.select``
(run as a script, this file's name would shadow the standard library's ``select``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import tracemalloc
from collections.abc import Callable
from datetime import datetime, timezone

import numpy as np

from enrich_dist.selection import batch_greedy, choose_seeds, exact_greedy
from enrich_dist.selection.greedy import DEFAULT_POOL

log = logging.getLogger("benchmarks.select")


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit rows scattered around ``n // 50`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_exact(x: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Farthest-first by max similarity, one pick and one matrix-vector product at a time."""
    vectors = x.astype(np.float64)
    rows = np.arange(len(x))
    scores = np.full(len(x), -np.inf, dtype=np.float32)
    for s in seeds:
        np.maximum(scores, (vectors @ vectors[s]).astype(np.float32), out=scores)
    scores[seeds] = np.inf
    order = [int(s) for s in seeds]
    while len(order) < len(x):
        best = int(np.argmin(scores))
        order.append(int(rows[best]))
        np.maximum(scores, (vectors @ vectors[best]).astype(np.float32), out=scores)
        scores[best] = np.inf
        if np.isinf(scores).sum() * 2 > len(scores):  # drop chosen rows so each product shrinks
            keep = ~np.isinf(scores)
            vectors, rows, scores = vectors[keep], rows[keep], scores[keep]
    return np.array(order)


def timed(fn: Callable, *args, **kwargs) -> tuple:
    """Result and seconds of one call."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def peak_mib(fn: Callable, *args, **kwargs) -> float:
    """Peak traced allocation (MiB) of one call, run again untimed (tracing slows small allocations)."""
    tracemalloc.start()
    fn(*args, **kwargs)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=45460)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--replicates", type=int, default=10)
    p.add_argument("--seed-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--pool", type=int, default=DEFAULT_POOL)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results.jsonl")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    x = clustered(args.n, args.dim, args.seed)
    seeds = choose_seeds(args.n, args.seed_size, np.random.default_rng([args.seed, 0]))
    exact, exact_s = timed(exact_greedy, x, seeds, "max", pool=args.pool)
    log.info("exact greedy: %.2f s", exact_s)
    naive, naive_s = timed(naive_exact, x, seeds)
    log.info("naive loop: %.2f s", naive_s)
    if not np.array_equal(exact.order, naive):
        raise AssertionError(
            f"exact ranking differs from the naive loop at rank {np.argmax(exact.order != naive)}"
        )

    batch_s = []
    for r in range(args.replicates):
        rep_seeds = choose_seeds(args.n, args.seed_size, np.random.default_rng([args.seed, r]))
        ranking, seconds = timed(batch_greedy, x, rep_seeds, args.batch_size)
        batch_s.append(seconds)
        log.info("batch replicate %d: %.2f s, %d rounds", r, seconds, ranking.round.max())
    exact_mb = peak_mib(exact_greedy, x, seeds, "max", pool=args.pool)
    batch_mb = peak_mib(batch_greedy, x, seeds, args.batch_size)
    log.info("peak traced memory: exact %.0f MiB, batch %.0f MiB", exact_mb, batch_mb)

    result = {
        "benchmark": "select",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n": args.n,
        "dim": args.dim,
        "seed_size": args.seed_size,
        "batch_size": args.batch_size,
        "pool": args.pool,
        "exact_s": round(exact_s, 3),
        "naive_s": round(naive_s, 3),
        "exact_speedup": round(naive_s / exact_s, 2),
        "identical": True,
        "exact_peak_mib": round(exact_mb, 1),
        "batch_replicates": args.replicates,
        "batch_s": [round(s, 3) for s in batch_s],
        "batch_mean_s": round(float(np.mean(batch_s)), 3),
        "batch_peak_mib": round(batch_mb, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    with open(args.out, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(
        f"n={args.n} d={args.dim}: exact {exact_s:.1f} s vs naive {naive_s:.1f} s "
        f"-> {result['exact_speedup']}x (identical ranking); batch {result['batch_mean_s']:.1f} s/replicate "
        f"over {args.replicates}; peak {result['batch_peak_mib']:.0f} MiB batch, {exact_mb:.0f} MiB exact"
    )


if __name__ == "__main__":
    main()
