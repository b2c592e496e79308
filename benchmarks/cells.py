"""Benchmark: cells mode against the complete farthest-first ranking and random, on time and coverage.

Data: ``--n`` unit vectors of ``--dim`` around ``n / --per-cluster`` random centres with noise
``--spread`` per coordinate (the scale benchmark's archive); with ``--uneven`` the clusters' sizes
follow a Zipf law (exponent 1), so a few clusters hold most images, as repeated clips and common views
do in real archives. Every rule starts from the same seeds (``--seed-size``, default the stage's 2.2 %).

Measured in one process: seconds of each ranking (``exact``: the complete farthest-first; ``cells``:
k-means plus farthest-first per cell, for each ``--cell-sizes``), the similarity products each
computes, and per budget the coverage of the first B images: every image's largest similarity to
them, as the mean over the archive and the 1st percentile (the worst-covered images, which
farthest-first is built to lift). Higher is better; random is the baseline measured in the same run.

    python -m benchmarks.cells --n 100000 --out benchmarks/results/cells_cpu.jsonl
    python -m benchmarks.cells --n 100000 --uneven --out benchmarks/results/cells_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from datetime import datetime, timezone

import faiss
import numpy as np

from benchmarks.similarity import source_version
from enrich_dist.selection import choose_seeds, exact_greedy
from enrich_dist.selection.cells import cell_count, make_cells, rank_in_process
from enrich_dist.selection.greedy import DEFAULT_POOL

log = logging.getLogger("benchmarks.cells")
BUDGETS = (0.03, 0.07, 0.22)


def archive(n: int, dim: int, per_cluster: int, spread: float, uneven: bool, seed: int) -> np.ndarray:
    """Clustered unit rows; cluster sizes equal in expectation, or Zipf-distributed with ``uneven``."""
    rng = np.random.default_rng(seed)
    k = max(1, n // per_cluster)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, k + 1) if uneven else np.ones(k)
    members = rng.choice(k, size=n, p=weights / weights.sum())
    x = centres[members] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def coverage(x: np.ndarray, order: np.ndarray, budgets: tuple[float, ...]) -> dict[str, dict[str, float]]:
    """Per budget: mean and 1st percentile over all rows of the largest similarity to the ranking's first B rows."""
    out = {}
    for b in budgets:
        chosen = x[order[: max(1, round(b * len(x)))]]
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(chosen)
        best = index.search(x, 1)[0][:, 0]
        out[str(b)] = {"mean": float(best.mean()), "p1": float(np.percentile(best, 1))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--per-cluster", type=int, default=500)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--uneven", action="store_true", help="Zipf-distributed cluster sizes")
    parser.add_argument("--seed-size", type=float, default=0.022)
    parser.add_argument("--cell-sizes", default="4096,1024,256")
    parser.add_argument("--no-exact", action="store_true", help="skip the complete ranking (large --n)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="append one JSON line here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    x = archive(args.n, args.dim, args.per_cluster, args.spread, args.uneven, args.seed)
    rng = np.random.default_rng([args.seed, 1])
    seeds = rng.permutation(choose_seeds(args.n, max(1, round(args.seed_size * args.n)), rng))
    rest = np.setdiff1d(np.arange(args.n), seeds)
    rules: dict[str, dict] = {"random": {"order": np.concatenate([seeds, rng.permutation(rest)])}}
    if not args.no_exact:
        start = time.perf_counter()
        rules["exact"] = {"order": exact_greedy(x, seeds).order, "seconds": time.perf_counter() - start,
                          "products": args.n * (args.n - 1) / 2}
        log.info("exact: %.1f s", rules["exact"]["seconds"])
    for size in (int(s) for s in args.cell_sizes.split(",")):
        start = time.perf_counter()
        cells = make_cells(x, cell_count(args.n, size), seed=args.seed, threads=2)
        kmeans = time.perf_counter() - start
        ranking = rank_in_process(x, cells, seeds, DEFAULT_POOL)
        sizes = np.diff(cells.bounds).astype(np.float64)
        rules[f"cells@{size}"] = {
            "order": ranking.order, "seconds": time.perf_counter() - start, "kmeans_seconds": kmeans,
            "products": float(np.sum(sizes**2) / 2), "n_cells": int(cells.count), "largest_cell": int(sizes.max()),
        }
        log.info("cells@%d: %d cells, %.1f s (k-means %.1f s)", size, cells.count, rules[f"cells@{size}"]["seconds"], kmeans)
    for rule in rules.values():
        rule["coverage"] = coverage(x, rule.pop("order"), BUDGETS)

    print(f"{args.n} images, {'uneven' if args.uneven else 'even'} clusters of ~{args.per_cluster}, spread {args.spread}")
    print(f"{'rule':<12} {'seconds':>8} {'products':>10}  " + "  ".join(f"{b:>5.0%} mean / p1" for b in BUDGETS))
    for name, rule in rules.items():
        cov = "  ".join(f"{rule['coverage'][str(b)]['mean']:.4f}/{rule['coverage'][str(b)]['p1']:.4f}" for b in BUDGETS)
        seconds = f"{rule['seconds']:.1f}" if "seconds" in rule else "-"
        products = f"{rule['products']:.2e}" if "products" in rule else "-"
        print(f"{name:<12} {seconds:>8} {products:>10}  {cov}")
    record = {
        "benchmark": "cells", "commit": source_version(), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n": args.n, "dim": args.dim, "per_cluster": args.per_cluster, "spread": args.spread, "uneven": args.uneven,
        "seed_size": args.seed_size, "rules": rules,
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
