"""Selection benchmark: exact farthest-first (pooled, pruned) vs naive one-at-a-time loops, and the paper's batches.

Data: ``--n`` unit vectors of ``--dim`` drawn around ``n / 50`` cluster centres (redundant, like
frames of one clip); the top-k lists the similarity stage would write come from ``faiss.knn`` (not
timed). Measured in the same run, on the same data and seeds:

- ``naive_f32``: the honest baseline, one float32 matrix-vector product per pick with an incremental
  max, chosen rows dropped as they pile up. Its float32 sums may order near-ties differently, so its
  agreement with the exact ranking is reported, not required.
- ``naive_same``: the same loop in the package's arithmetic (each product's few decisive entries
  recomputed exactly, ``selection/sims.py``); its ranking must equal the exact one.
- ``exact`` without and with pruning, and the bare float32 GEMMs an unpruned run needs (pools of
  ``--pool`` picks against every remaining candidate).
- ``batch``: the paper's schedule (``--seed-size`` seeds, ``--batch-size`` per round) for
  ``--replicates`` replicates, with pruning.
- with ``--workers K``: the whole select stage with K shard actors in exact mode on a temporary run dir,
  checked against the single-process ranking of the same seeds.

Prints one summary and appends one JSON line to ``--out``. Run from the repository root as
``python -m benchmarks.selection`` (``select.py`` would shadow the standard library's ``select``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timezone

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from enrich_dist.selection import batch_greedy, choose_seeds, exact_greedy
from enrich_dist.selection.greedy import DEFAULT_POOL
from enrich_dist.selection.sims import error_scale, max_raises

log = logging.getLogger("benchmarks.selection")
GEMM_ELEMENTS = 1 << 22


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit rows scattered around ``n // 50`` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows and their similarities (FAISS, like the similarity stage)."""
    sims, rows = faiss.knn(x, x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    self_at = rows == np.arange(len(x))[:, None]
    drop = np.where(self_at.any(axis=1), self_at.argmax(axis=1), k)
    keep = np.ones(rows.shape, dtype=bool)
    keep[np.arange(len(x)), drop] = False
    return rows[keep].reshape(len(x), k).astype(np.int64), sims[keep].reshape(len(x), k)


def naive_exact(x: np.ndarray, seeds: np.ndarray, same_arithmetic: bool) -> np.ndarray:
    """Farthest-first by max similarity, one pick and one float32 matrix-vector product at a time."""
    vectors, rows = x, np.arange(len(x))
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    err = error_scale(x.shape[1]) * float(norms.max())
    scores = np.full(len(x), -np.inf, dtype=np.float32)
    step = max(1, GEMM_ELEMENTS // len(seeds))
    for start in range(0, len(x), step):
        part = slice(start, start + step)
        g = vectors[part] @ x[seeds].T
        if same_arithmetic:
            hit, values = max_raises(scores[part], g, vectors[part], x[seeds], norms[part], err)
            np.maximum.at(scores, start + hit, values)
        else:
            scores[part] = g.max(axis=1)
    scores[seeds] = np.inf
    order, dead = [int(s) for s in seeds], len(seeds)
    while len(order) < len(x):
        best = int(np.argmin(scores))
        order.append(int(rows[best]))
        v = vectors[best].copy()
        g = vectors @ v
        if same_arithmetic:
            hit, values = max_raises(scores, g[:, None], vectors, v[None, :], norms, err)
            np.maximum.at(scores, hit, values)
        else:
            np.maximum(scores, g, out=scores)
        scores[best] = np.inf
        dead += 1
        if dead * 16 >= len(scores):
            keep = scores < np.inf
            vectors, rows, scores, norms = vectors[keep], rows[keep], scores[keep], norms[keep]
            dead = 0
    return np.array(order)


def gemm_floor(x: np.ndarray, order: np.ndarray, n_seeds: int, pool: int) -> float:
    """Seconds of the float32 GEMMs of an unpruned run: each pool of picks against every remaining row."""
    start = time.perf_counter()
    for first in range(n_seeds, len(order), pool):
        rest, new = x[order[first:]], x[order[first : first + pool]]
        step = max(1, GEMM_ELEMENTS // len(new))
        for row in range(0, len(rest), step):
            rest[row : row + step] @ new.T
    return time.perf_counter() - start


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


def first_difference(a: np.ndarray, b: np.ndarray) -> int | None:
    """First rank where two rankings differ (None if identical)."""
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if len(differ) else None


def stage_with_actors(x: np.ndarray, workers: int, seed_size: int, lists: tuple) -> dict:
    """The select stage (exact, one replicate) with ``workers`` shard actors vs one process on its seeds."""
    import pyarrow as pa

    from enrich_dist.config import SelectConfig
    from enrich_dist.runtime import ray_session
    from enrich_dist.schema import MANIFEST, embeddings_schema, neighbors_schema
    from enrich_dist.selection import run_select
    from enrich_dist.storage import RunDir

    n, dim = x.shape
    ids = np.arange(n, dtype=np.int64)
    with tempfile.TemporaryDirectory() as folder:
        run = RunDir(folder)
        for shard, part in enumerate(np.array_split(ids, max(1, n // 4096))):
            table = pa.table(
                {
                    "image_id": pa.array(part),
                    "embedding": pa.FixedSizeListArray.from_arrays(x[part].ravel(), dim),
                },
                schema=embeddings_schema(dim),
            )
            run.write_table(f"embeddings/part-{shard:05d}.parquet", table)
        manifest = {f.name: pa.nulls(n, f.type) for f in MANIFEST}
        manifest.update(
            {
                "image_id": pa.array(ids),
                "uri": pa.array([f"{i}.png" for i in ids]),
                "status": pa.array(["ok"] * n),
            }
        )
        run.write_table("manifest/part-00000.parquet", pa.table(manifest, schema=MANIFEST))
        thresholds = (0.5, 0.7, 0.9)
        neighbors = {
            "image_id": pa.array(ids),
            "max_sim": pa.array(lists[1][:, 0]),
            "nn_ids": pa.FixedSizeListArray.from_arrays(lists[0].ravel(), lists[0].shape[1]).cast(
                pa.list_(pa.int64())
            ),
            "nn_sims": pa.FixedSizeListArray.from_arrays(lists[1].ravel(), lists[1].shape[1]).cast(
                pa.list_(pa.float32())
            ),
            **{f"n_above_{t:g}": pa.array(np.zeros(n, np.int64)) for t in thresholds},
        }
        run.write_table(
            "similarity/neighbors/part-00000.parquet",
            pa.Table.from_pydict(neighbors, schema=neighbors_schema(thresholds)),
        )
        summary = {"n_images": n, "exact": True, "top_k": lists[0].shape[1]}
        run.write_json("similarity/summary.json", summary)
        run.mark_done("similarity", summary)
        cfg = SelectConfig(mode="exact", seed_size=seed_size, replicates=1, workers=workers, budgets=(1.0,))
        with ray_session(num_cpus=None):
            stats, seconds = timed(run_select, run, cfg)
        ranking = run.read_table("selection/ranking.parquet")
    order = ranking["image_id"].to_numpy()
    seeds = order[ranking["is_seed"].to_numpy()]
    single, single_s = timed(exact_greedy, x, seeds, neighbors=lists)
    if not np.array_equal(order, single.order):
        raise AssertionError(
            f"actor ranking differs from one process at rank {first_difference(order, single.order)}"
        )
    return {
        "workers": workers,
        "stage_s": round(seconds, 3),
        "rank_s": round(stats["replicate_seconds"][0], 3),
        "single_process_s": round(single_s, 3),
        "identical": True,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=45460)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--replicates", type=int, default=10)
    p.add_argument("--seed-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=5000)
    p.add_argument("--pool", type=int, default=DEFAULT_POOL)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument(
        "--threads", type=int, default=None, help="BLAS threads for every timed loop (default: all)"
    )
    p.add_argument("--workers", type=int, default=0, help="also run the stage with this many shard actors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results.jsonl")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    x = clustered(args.n, args.dim, args.seed)
    seeds = choose_seeds(args.n, args.seed_size, np.random.default_rng([args.seed, 0]))
    lists, knn_s = timed(top_k, x, args.top_k)
    log.info("top-%d lists (faiss.knn, not part of selection): %.2f s", args.top_k, knn_s)
    limits = threadpool_limits(limits=args.threads) if args.threads else nullcontext()
    with limits:
        plain, plain_s = timed(exact_greedy, x, seeds, "max", pool=args.pool)
        log.info("exact greedy without pruning: %.2f s", plain_s)
        exact, exact_s = timed(exact_greedy, x, seeds, "max", pool=args.pool, neighbors=lists)
        log.info("exact greedy with pruning: %.2f s", exact_s)
        floor_s = gemm_floor(x, plain.order, len(seeds), args.pool)
        log.info("bare GEMMs of an unpruned run: %.2f s", floor_s)
        naive, naive_s = timed(naive_exact, x, seeds, False)
        log.info("naive float32 loop: %.2f s", naive_s)
        same, same_s = timed(naive_exact, x, seeds, True)
        log.info("naive loop, same arithmetic: %.2f s", same_s)
        for name, order in (("unpruned exact", plain.order), ("naive loop in the same arithmetic", same)):
            if not np.array_equal(exact.order, order):
                raise AssertionError(
                    f"exact ranking differs from the {name} at rank {first_difference(exact.order, order)}"
                )
        batch_s = []
        for r in range(args.replicates):
            rep_seeds = choose_seeds(args.n, args.seed_size, np.random.default_rng([args.seed, r]))
            ranking, seconds = timed(batch_greedy, x, rep_seeds, args.batch_size, neighbors=lists)
            batch_s.append(seconds)
            log.info("batch replicate %d: %.2f s, %d rounds", r, seconds, ranking.round.max())
    exact_mb = peak_mib(exact_greedy, x, seeds, "max", pool=args.pool, neighbors=lists)
    batch_mb = peak_mib(batch_greedy, x, seeds, args.batch_size, neighbors=lists)
    log.info("peak traced memory: exact %.0f MiB, batch %.0f MiB", exact_mb, batch_mb)

    result = {
        "benchmark": "selection",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n": args.n,
        "dim": args.dim,
        "seed_size": args.seed_size,
        "batch_size": args.batch_size,
        "pool": args.pool,
        "top_k": args.top_k,
        "threads": args.threads,
        "exact_s": round(exact_s, 3),
        "exact_unpruned_s": round(plain_s, 3),
        "gemm_floor_s": round(floor_s, 3),
        "naive_f32_s": round(naive_s, 3),
        "naive_same_s": round(same_s, 3),
        "speedup_vs_naive_f32": round(naive_s / exact_s, 2),
        "speedup_vs_naive_same": round(same_s / exact_s, 2),
        "identical_to_naive_same": True,
        "naive_f32_first_difference": first_difference(exact.order, naive),
        "exact_peak_mib": round(exact_mb, 1),
        "batch_replicates": args.replicates,
        "batch_s": [round(s, 3) for s in batch_s],
        "batch_mean_s": round(float(np.mean(batch_s)), 3),
        "batch_peak_mib": round(batch_mb, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.workers:
        result["actors"] = stage_with_actors(x, args.workers, args.seed_size, lists)
        log.info("stage with %d shard actors: %s", args.workers, result["actors"])
    with open(args.out, "a") as fh:
        fh.write(json.dumps(result) + "\n")
    log.info(
        "n=%d d=%d: exact %.1f s (unpruned %.1f s, bare GEMMs %.1f s) vs naive float32 loop %.1f s -> %.1fx "
        "(same-arithmetic loop %.1f s, identical ranking); batch %.1f s/replicate over %d; peak %.0f MiB exact, "
        "%.0f MiB batch",
        args.n,
        args.dim,
        exact_s,
        plain_s,
        floor_s,
        naive_s,
        result["speedup_vs_naive_f32"],
        same_s,
        result["batch_mean_s"],
        args.replicates,
        exact_mb,
        batch_mb,
    )


if __name__ == "__main__":
    main()
