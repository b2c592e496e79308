"""GPU check of the approximate mode: FAISS k-means and assignment on the GPU, exact tiles with torch, measured recall.

For each ``--sizes`` N (default 10^6 and 10^7; d = 128, clustered unit vectors made on the GPU):
partitions as the stage makes them (``approx.partition`` with ``gpu=True``: about sqrt(N) spherical
k-means centroids, each partition with its ``--nprobe`` nearest), every paired tile with the torch
kernel on the GPU, reduced as the stage reduces them; then recall@10, recall@1 and threshold-count
errors on ``--sample`` images against a brute force on the GPU (every image against all N, the same
quantities ``similarity/summary.json`` reports). A size whose projection (the last measured size
scaled by N, plus 30 %) would end past ``--budget-seconds`` is not run; its entry gives the
projection, marked as such. Writes ``gpu_approx.json`` in ``--out`` after every size.

Needs torch with CUDA, numba, numpy and a GPU build of FAISS (``faiss-gpu``, the ``gpu`` extra); no
Ray. Without a GPU FAISS it stops with exit status 1 and says so, it never pretends. ``--dry-run``
runs the same code with torch and FAISS on the CPU at small sizes (what the unit test runs).

    PYTHONPATH=. python benchmarks/gpu_check_approx.py --out DIR
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_sizes import begin, run_sizes, size_arguments, write_json  # noqa: E402
from enrich_dist.pairgraph import float32_below  # noqa: E402
from enrich_dist.similarity import approx, kernel, torch_kernel  # noqa: E402
from enrich_dist.similarity.plan import histogram_edges, partition_tile_plan, schedule  # noqa: E402
from enrich_dist.similarity.reduce import Reduction  # noqa: E402

THRESHOLDS = (0.5, 0.7, 0.9)
BINS = 200
K = 10
SIZES = (1_000_000, 10_000_000)
BLOCK = 65536
SAFETY = 1.3
DRY_RUN = {"sizes": (3000, 6000), "sample": 300}


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int, device: str) -> np.ndarray:
    """Seeded unit vectors around ``clusters`` random centres, made on ``device`` in pieces, returned on the host."""
    gen = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=gen, device=device)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, 1 << 20):
        stop = min(n, start + (1 << 20))
        which = torch.randint(0, clusters, (stop - start,), generator=gen, device=device)
        part = centres[which] + spread * torch.randn(stop - start, dim, generator=gen, device=device)
        x[start:stop] = torch.nn.functional.normalize(part, dim=1).cpu().numpy()
    return x


def brute_force_rows(x_dev: torch.Tensor, rows: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k ids and per-threshold counts of images ``rows`` against every image (itself excluded)."""
    xs = x_dev[torch.as_tensor(rows, device=device)]
    vals = np.full((len(rows), K), -np.inf, np.float32)
    idx = np.full((len(rows), K), -1, np.int64)
    counts = np.zeros((len(THRESHOLDS), len(rows)), np.int64)
    limits = [float(float32_below(t)) for t in THRESHOLDS]
    local = torch.arange(len(rows), device=device)
    rows_dev = torch.as_tensor(rows, device=device)
    for c0 in range(0, len(x_dev), BLOCK):
        c1 = min(c0 + BLOCK, len(x_dev))
        s = xs @ x_dev[c0:c1].T
        own = (rows_dev >= c0) & (rows_dev < c1)
        s[local[own], rows_dev[own] - c0] = -math.inf
        for t, limit in enumerate(limits):
            counts[t] += (s > limit).sum(dim=1).cpu().numpy()
        top = torch.topk(s, min(K, c1 - c0), dim=1)
        vals, idx = kernel.merge_topk(vals, idx, top.values.cpu().numpy(), top.indices.cpu().numpy() + c0, K)
    return idx, counts


def one_size(n: int, args: argparse.Namespace, device: str) -> dict:
    """Partitions, tiles and measured quality at ``n`` images."""
    x = clustered(n, args.dim, max(1, n // args.images_per_cluster), args.spread, args.seed, device)
    t0 = time.perf_counter()
    parts = approx.partition(
        x, approx.default_partitions(n), args.nprobe, args.seed, os.cpu_count() or 1, gpu=not args.dry_run
    )
    t1 = time.perf_counter()
    xp = torch.as_tensor(np.ascontiguousarray(x[parts.perm]), device=device)
    reduction = Reduction(n, K, len(THRESHOLDS), BINS, parts.perm)
    edges = histogram_edges(BINS)
    tiles = schedule(partition_tile_plan(parts.bounds, parts.pairs, BLOCK))
    for r0, r1, c0, c1 in tiles:
        stats = torch_kernel.tile_stats_torch(
            xp[r0:r1], xp[c0:c1], r0 == c0, K, THRESHOLDS, edges, row_offset=r0, col_offset=c0, device=device
        )
        reduction.add((r0, r1, c0, c1), stats)
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    del xp
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(n, size=min(args.sample, n), replace=False))
    exact_idx, exact_counts = brute_force_rows(torch.as_tensor(x, device=device), sample, device)
    quality = approx.sample_quality(
        reduction.idx[sample], reduction.counts[:, sample], exact_idx, exact_counts, list(THRESHOLDS)
    )
    return {
        "n": n,
        "partitions": len(parts.bounds) - 1,
        "nprobe": args.nprobe,
        "partition_device": parts.device,
        "partition_device_note": parts.device_note,
        "tiles": len(tiles),
        "pair_fraction_computed": reduction.pairs / (n * (n - 1) // 2),
        "partition_seconds": round(t1 - t0, 3),
        "tile_seconds": round(t2 - t1, 3),
        "seconds": round(t2 - t0, 3),
        **quality,
    }


def write_result(out_dir: str, result: dict) -> None:
    write_json(os.path.join(out_dir, "gpu_approx.json"), result)


def main() -> int:
    parser = size_arguments(__doc__, "gpu_approx.json", SIZES, 150.0)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--dry-run", action="store_true", help="torch and FAISS on the CPU at small sizes")
    args = parser.parse_args()
    sizes, result = begin(args, DRY_RUN["sizes"])
    if args.dry_run:
        args.sample = DRY_RUN["sample"]
    gpus, why = approx.faiss_gpus()
    if not args.dry_run and (not torch.cuda.is_available() or not gpus):
        result["error"] = why or "torch sees no CUDA device"
        write_result(args.out, result)
        print(f"gpu_check_approx: cannot run: {result['error']}", file=sys.stderr)
        return 1
    device = "cpu" if args.dry_run else "cuda"

    def record(entry: dict) -> None:
        result["sizes"].append(entry)
        write_result(args.out, result)

    run_sizes(
        sizes, lambda n: one_size(n, args, device), lambda last, n: last["seconds"] * n / last["n"] * SAFETY,
        "extrapolated, linear in N, +30 %", START, args.budget_seconds, record,
    )
    result["seconds_total"] = round(time.perf_counter() - START, 3)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
