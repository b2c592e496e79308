"""GPU check of the selection's device fold: complete farthest-first rankings with their GEMMs on the GPU.

1. Exactness: on awkward small archives (ties, exact duplicates, sizes that no pool divides) the
   device fold's rankings equal the numpy fold's: order, rounds and scores, bit for bit.
2. Speed: one complete exact ranking (``Settings("exact")``, seeds 2.2 % of the images) of clustered
   unit vectors at each ``--sizes`` N with the fold on the GPU, and with the numpy fold on this
   machine's CPUs at ``--cpu-size`` for a ratio. Seconds, similarity products per second and the
   number of rounds are recorded. A size whose projection (quadratic in N from the last measured size,
   +30 %) would end past ``--budget-seconds`` is not run; its entry gives the projection, marked so.

Needs torch with CUDA and numpy; no Ray or pyarrow. ``--dry-run`` runs the same code with torch on
the CPU at small sizes (what the unit test runs). Writes ``gpu_select.json`` in ``--out`` after
every step.

    PYTHONPATH=. python benchmarks/gpu_check_select.py --out DIR
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_check_approx import clustered  # noqa: E402
from benchmarks.gpu_sizes import begin, run_sizes, size_arguments, write_json  # noqa: E402
from enrich_dist.selection.greedy import Settings, choose_seeds, rank  # noqa: E402
from enrich_dist.selection.shard import Shard  # noqa: E402

SIZES = (50_000, 200_000, 1_000_000, 10_000_000)
CPU_SIZE = 50_000
SEED_SHARE = 0.022
SAFETY = 1.3
DRY_RUN = {"sizes": (1500, 3000), "cpu_size": 1500}


def awkward(kind: str, n: int, seed: int) -> np.ndarray:
    """Small archives that stress the recheck: integer vectors (exact ties), copies, plain Gaussian."""
    rng = np.random.default_rng([seed, n])
    if kind == "ties":
        return rng.integers(-1, 2, size=(n, 3)).astype(np.float32)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    if kind == "duplicates":
        x = x[rng.integers(0, max(1, n // 4), size=n)]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranking_of(x: np.ndarray, device: str | None, seed: int, settings: Settings) -> tuple:
    """(ranking, seconds) of one ranking of ``x`` with the fold on ``device`` (None: numpy)."""
    seeds = choose_seeds(len(x), max(1, round(SEED_SHARE * len(x))), np.random.default_rng(seed))
    start = time.perf_counter()
    ranking = rank(Shard(np.arange(len(x)), x, device=device), len(x), seeds, settings)
    if device == "cuda":
        torch.cuda.synchronize()
    return ranking, time.perf_counter() - start


def exactness(device: str, seed: int) -> dict:
    """Device and numpy rankings on awkward archives, exact and batch: equal or not, per case."""
    cases = {}
    for kind in ("ties", "duplicates", "gauss"):
        for n in (1, 2, 257, 1031):
            x = awkward(kind, n, seed)
            for settings in (Settings("exact", pool=7), Settings("exact"), Settings("batch", batch_size=13)):
                got, _ = ranking_of(x, device, seed, settings)
                want, _ = ranking_of(x, None, seed, settings)
                same = all(
                    np.array_equal(getattr(got, f), getattr(want, f), equal_nan=f == "score")
                    for f in ("order", "round", "score")
                )
                cases[f"{kind}/{n}/{settings.mode}/pool{settings.pool}/batch{settings.batch_size}"] = same
    return {"cases": len(cases), "all_equal": all(cases.values()), "unequal": [k for k, v in cases.items() if not v]}


def timed(n: int, args: argparse.Namespace, device: str | None, make_device: str) -> dict:
    """One complete exact ranking of ``n`` clustered unit vectors, with the fold on ``device`` (None: numpy)."""
    x = clustered(n, args.dim, max(1, n // args.images_per_cluster), args.spread, args.seed, make_device)
    ranking, seconds = ranking_of(x, device, args.seed, Settings("exact"))
    products = n * (n - 1) / 2
    return {
        "n": n,
        "fold": device or "numpy",
        "seconds": round(seconds, 3),
        "picks": int(ranking.round.max()) if n else 0,
        "products": products,
        "products_per_second": products / max(seconds, 1e-9),
    }


def write_result(out_dir: str, result: dict) -> None:
    write_json(os.path.join(out_dir, "gpu_select.json"), result)


def main() -> int:
    parser = size_arguments(__doc__, "gpu_select.json", SIZES, 90.0)
    parser.add_argument("--cpu-size", type=int, default=CPU_SIZE, help="the numpy fold's ranking, for a ratio")
    parser.add_argument("--dry-run", action="store_true", help="torch on the CPU at small sizes")
    args = parser.parse_args()
    sizes, result = begin(args, DRY_RUN["sizes"])
    if args.dry_run:
        args.cpu_size = DRY_RUN["cpu_size"]
    if not args.dry_run and not torch.cuda.is_available():
        result["error"] = "torch sees no CUDA device"
        write_result(args.out, result)
        print("gpu_check_select: cannot run: torch sees no CUDA device", file=sys.stderr)
        return 1
    device = "cpu" if args.dry_run else "cuda"
    result["exactness"] = exactness(device, args.seed)
    print(json.dumps(result["exactness"]), flush=True)
    write_result(args.out, result)
    result["numpy_fold"] = timed(args.cpu_size, args, None, device)
    print(json.dumps(result["numpy_fold"]), flush=True)
    write_result(args.out, result)

    def measure(n: int) -> dict:
        entry = timed(n, args, device, device)
        if result["numpy_fold"]["n"] == n:
            entry["speedup_over_numpy_fold"] = result["numpy_fold"]["seconds"] / max(entry["seconds"], 1e-9)
        return entry

    def record(entry: dict) -> None:
        result["sizes"].append(entry)
        write_result(args.out, result)

    run_sizes(
        sizes, measure, lambda last, n: last["seconds"] * (n / last["n"]) ** 2 * SAFETY,
        "extrapolated, quadratic in N, +30 %", START, args.budget_seconds, record,
    )
    result["seconds_total"] = round(time.perf_counter() - START, 3)
    write_result(args.out, result)
    return 0 if result["exactness"]["all_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
