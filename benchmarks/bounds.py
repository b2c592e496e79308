"""Benchmark: the complete farthest-first ranking with and without cell bounds (``selection/bounds.py``).

Same data, same seeds, one process: the ranking without bounds (the baseline, every pick folded into
every candidate), then with ``--bound-cells`` (k-means cells and their refinement timed apart). The two
rankings must be equal row for row (exit status 1 otherwise). Prints the ratio, the share of products
the bounds skipped and peak memory; appends one JSON line with the commit to ``--out``.

Data: ``--n`` unit vectors around ``n / --per-cluster`` random centres (``benchmarks/cells.py``'s
archive, ``--uneven`` for Zipf cluster sizes), or ``--embeddings DIR``: the Parquet shards of a run's
``embeddings/`` folder (e.g. the demo's contrastive embeddings).

    python -m benchmarks.bounds --n 200000 --out results.jsonl
    python -m benchmarks.bounds --embeddings RUN/embeddings --skip-baseline
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow.dataset as ds

from benchmarks.similarity import source_version
from enrich_dist.selection import Settings, Shard, choose_seeds, rank

log = logging.getLogger("benchmarks.bounds")
PART_ROWS = 1 << 20


def archive(n: int, dim: int, per_cluster: int, spread: float, uneven: bool, seed: int) -> np.ndarray:
    """``benchmarks/cells.py``'s archive (the same rows for the same arguments), its noise drawn in parts.

    One draw of N x dim float64 noise would need 10 GB at 10^7 images; the generator gives the same
    numbers drawn part by part.
    """
    rng = np.random.default_rng(seed)
    k = max(1, n // per_cluster)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, k + 1) if uneven else np.ones(k)
    members = rng.choice(k, size=n, p=weights / weights.sum())
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, PART_ROWS):
        part = slice(start, start + PART_ROWS)
        rows = centres[members[part]] + spread * rng.standard_normal((len(members[part]), dim)).astype(np.float32)
        x[part] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return x


def read_embeddings(folder: str) -> np.ndarray:
    """Every row of the embedding shards in ``folder``, in image-id order."""
    table = ds.dataset(folder, format="parquet").to_table(columns=["image_id", "embedding"])
    order = np.argsort(table.column("image_id").to_numpy(), kind="stable")
    flat = table.column("embedding").combine_chunks().flatten().to_numpy()
    return np.ascontiguousarray(flat.reshape(len(order), -1)[order], dtype=np.float32)


def timed_ranking(x: np.ndarray, seeds: np.ndarray, cell_size: int, seed: int) -> dict:
    """One complete ranking; with ``cell_size`` > 0 the shard's folds use cell bounds."""
    shard = Shard(np.arange(len(x)), x)
    record: dict = {"cell_size": cell_size}
    if cell_size:
        start = time.perf_counter()
        record["cells"] = shard.enable_bounds(cell_size, seed, threads=2)
        record["cells_seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    ranking = rank(shard, len(x), seeds, Settings("exact"))
    record["rank_seconds"] = round(time.perf_counter() - start, 2)
    record["computed"], record["skipped"] = shard.products()
    record["ranking"] = ranking
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--per-cluster", type=int, default=500)
    parser.add_argument("--spread", type=float, default=0.5)
    parser.add_argument("--uneven", action="store_true", help="Zipf-distributed cluster sizes")
    parser.add_argument("--embeddings", help="a run's embeddings/ folder instead of the synthetic archive")
    parser.add_argument("--seed-size", type=float, default=0.022)
    parser.add_argument("--bound-cells", type=int, default=256)
    parser.add_argument("--skip-baseline", action="store_true", help="bounds only (large --n); no equality check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="append one JSON line here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    if args.embeddings:
        x = read_embeddings(args.embeddings)
        data = {"embeddings": args.embeddings}
    else:
        x = archive(args.n, args.dim, args.per_cluster, args.spread, args.uneven, args.seed)
        data = {"per_cluster": args.per_cluster, "spread": args.spread, "uneven": args.uneven}
    n = len(x)
    rng = np.random.default_rng([args.seed, 1])
    seeds = rng.permutation(choose_seeds(n, max(1, round(args.seed_size * n)), rng))
    runs = [] if args.skip_baseline else [timed_ranking(x, seeds, 0, args.seed)]
    runs.append(timed_ranking(x, seeds, args.bound_cells, args.seed))
    bounded = runs[-1]
    equal = None
    if len(runs) == 2:
        a, b = runs[0]["ranking"], runs[1]["ranking"]
        equal = bool(
            np.array_equal(a.order, b.order) and np.array_equal(a.round, b.round)
            and np.array_equal(a.score, b.score, equal_nan=True)
        )
    for r in runs:
        del r["ranking"]
    total = bounded["computed"] + bounded["skipped"]
    skipped = bounded["skipped"] / total if total else 0.0
    print(f"{n} images x {x.shape[1]}: {data}")
    if len(runs) == 2:
        base = runs[0]["rank_seconds"]
        with_cells = bounded["rank_seconds"] + bounded["cells_seconds"]
        print(
            f"without bounds {base:.1f} s; with bounds {bounded['rank_seconds']:.1f} s + cells "
            f"{bounded['cells_seconds']:.1f} s = {with_cells:.1f} s ({base / with_cells:.2f}x); equal: {equal}"
        )
    else:
        print(f"with bounds {bounded['rank_seconds']:.1f} s + cells {bounded.get('cells_seconds', 0):.1f} s")
    print(f"{bounded.get('cells', 0)} cells; bounds skipped {skipped:.1%} of {total:.3g} products")
    record = {
        "benchmark": "bounds", "commit": source_version(), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n": n, "dim": int(x.shape[1]), **data, "seed_size": args.seed_size, "runs": runs, "equal": equal,
        "skipped_share": round(skipped, 4),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    if equal is False:
        raise SystemExit("the rankings with and without bounds differ")


if __name__ == "__main__":
    main()
