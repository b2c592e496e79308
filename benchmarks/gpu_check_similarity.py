"""GPU check of the similarity tile kernel: correctness against the CPU kernel and brute force, then timings.

One run, one JSON file (``gpu_similarity.json`` in ``--out``):

1. correctness on small awkward data (sizes 1..1000, blocks 1..128, ties, duplicates, products past
   1.0): the torch kernel on the GPU equals a float64 brute force and the compiled CPU kernel exactly;
2. on N=45,460 random unit vectors (d=128): the GPU fp32 results against the CPU kernel (run on
   every core), and the error of fp16/bf16 products against fp32 (histogram L1 share, threshold
   count relative error, recall of the top-k, largest similarity error);
3. timings of the whole all-pairs pass (fused kernel, reduction included) against the bare tiled
   GEMM over the same tiles and chunks, at each ``--sizes`` N and precision.

Needs only torch with CUDA, numba and numpy (no Ray): run from the repository root as
``PYTHONPATH=. python benchmarks/gpu_check_similarity.py --out DIR``. Without CUDA it fails with
exit status 1 and says so; it never skips.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from enrich_dist.similarity import kernel, torch_kernel
from enrich_dist.similarity.plan import histogram_edges, schedule, tile_plan
from enrich_dist.similarity.reduce import Reduction

THRESHOLDS = (0.5, 0.7, 0.9)
BINS = 200
K = 10
GPU_BLOCK = 65536


def require_cuda() -> str:
    """The CUDA device name; raises when torch sees no CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "CUDA is not available to torch on this machine: the GPU similarity check needs an NVIDIA GPU "
            f"and a CUDA build of torch (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    return torch.cuda.get_device_name(0)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Seeded random L2-normalised float32 rows."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def grid_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Near-unit rows on a 2^-8 grid, a third duplicated: every dot product is exact in float32."""
    x = np.round(unit_vectors(n, dim, seed) * 256) / 256
    x[n - n // 3 :] = x[: n // 3]
    return x.astype(np.float32)


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float64 oracle: histogram of the upper triangle, counts strictly above, top-k by (-sim, index)."""
    n = len(x)
    s = x.astype(np.float64) @ x.astype(np.float64).T
    hist = np.histogram(np.clip(s[np.triu_indices(n, 1)], -1, 1), histogram_edges(BINS))[0]
    np.fill_diagonal(s, -np.inf)
    counts = np.array([(s > t).sum(axis=1) for t in THRESHOLDS]).reshape(len(THRESHOLDS), n)
    k = min(k, n - 1)
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -s), axis=1)[:, :k]
    return hist, counts, np.take_along_axis(s, order, axis=1).astype(np.float32), order


def all_pairs(x: np.ndarray, block: int, tile_fn, workers: int = 1) -> Reduction:
    """Every tile through ``tile_fn(xi, xj, diagonal, r0, c0)``, merged by the stage's reduction."""
    n = len(x)
    reduction = Reduction(n, min(K, max(n - 1, 0)), len(THRESHOLDS), BINS)
    tiles = schedule(tile_plan(n, block))

    def run(tile):
        r0, r1, c0, c1 = tile
        return tile, tile_fn(x[r0:r1], x[c0:c1], r0 == c0, r0, c0)

    with threadpool_limits(limits=1), ThreadPoolExecutor(max_workers=workers) as pool:
        for tile, stats in pool.map(run, tiles):
            reduction.add(tile, stats)
    return reduction


def cpu_tile(k: int):
    return lambda xi, xj, diag, r0, c0: kernel.tile_stats(
        xi, xj, diag, k, THRESHOLDS, histogram_edges(BINS), row_offset=r0, col_offset=c0
    )


def gpu_tile(k: int, device: str, precision: str):
    return lambda xi, xj, diag, r0, c0: torch_kernel.tile_stats_torch(
        xi, xj, diag, k, THRESHOLDS, histogram_edges(BINS), row_offset=r0, col_offset=c0, device=device,
        precision=precision,
    )


def check_small(device: str) -> dict:
    """Exact agreement of the torch kernel on ``device`` with brute force and the CPU kernel on awkward data."""
    cases = []
    for n, block in [(1, 1), (2, 1), (3, 2), (7, 3), (50, 16), (101, 37), (101, 128), (1000, 96)]:
        for x in (grid_vectors(n, 16, n + block), (np.sign(unit_vectors(n, 4, n)) / 2).astype(np.float32)):
            hist, counts, vals, idx = brute_force(x, K)
            gpu = all_pairs(x, block, gpu_tile(K, device, "fp32"))
            cpu = all_pairs(x, block, cpu_tile(K))
            same = all(
                np.array_equal(a, b)
                for a, b in [
                    (gpu.hist, hist), (gpu.counts, counts), (gpu.vals, vals), (gpu.idx, idx),
                    (cpu.hist, gpu.hist), (cpu.counts, gpu.counts), (cpu.idx, gpu.idx),
                ]
            )
            cases.append({"n": n, "block": block, "exact_match": bool(same)})
    past_one = np.array([[0.6, 0.8, 0.0]] * 3, np.float32) * np.float32(1.0000001)
    st = gpu_tile(2, device, "fp32")(past_one, past_one, True, 0, 0)
    cases.append({"case": "products of 1.0000001 in the last bin", "exact_match": bool(st.hist[-1] == 3)})
    return {"cases": cases, "all_exact": all(c["exact_match"] for c in cases)}


def compare(got: Reduction, want: Reduction, n: int) -> dict:
    """Histogram L1 share, threshold count relative errors, top-k recall and largest similarity error."""
    found = sum(np.isin(g, w).sum() for g, w in zip(got.idx, want.idx, strict=True))
    counts = {
        f"{t:g}": float(abs(int(got.counts[i].sum()) - int(want.counts[i].sum())) / max(int(want.counts[i].sum()), 1))
        for i, t in enumerate(THRESHOLDS)
    }
    return {
        "histogram_l1_share": float(np.abs(got.hist - want.hist).sum() / max(n * (n - 1) // 2, 1)),
        "threshold_count_rel_error": counts,
        "recall_at_k": float(found / want.idx.size),
        "max_sim_abs_error": float(np.abs(got.vals[:, 0] - want.vals[:, 0]).max()),
    }


def bare_gemm(x: torch.Tensor, block: int) -> float:
    """Seconds for only the chunked products of every tile, as the torch kernel makes them."""
    n = len(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for r0, r1, c0, c1 in tile_plan(n, block):
        xi, xj = x[r0:r1], x[c0:c1]
        step = max(1, min(len(xi), torch_kernel.CHUNK_ELEMENTS // len(xj)))
        for r in range(0, len(xi), step):
            lo = r if r0 == c0 else 0
            xi[r : r + step] @ xj[lo:].T
    torch.cuda.synchronize()
    return time.perf_counter() - start


def time_all_pairs(n: int, precision: str, dim: int = 128) -> dict:
    """Seconds of the fused all-pairs pass (reduction included) against the bare tiled GEMM, on the GPU."""
    x = torch.nn.functional.normalize(torch.randn(n, dim, device="cuda", generator=torch.Generator("cuda").manual_seed(0)))
    xs = x.to(torch_kernel.PRECISIONS[precision])
    block = min(GPU_BLOCK, n)
    bare_gemm(xs[: min(n, 4096)], min(block, 4096))
    gemm = bare_gemm(xs, block)
    torch.cuda.synchronize()
    start = time.perf_counter()
    reduction = all_pairs(x, block, gpu_tile(K, "cuda", precision))
    seconds = time.perf_counter() - start
    return {
        "n": n, "precision": precision, "block": block, "stage_seconds": round(seconds, 3),
        "gemm_seconds": round(gemm, 3), "ratio": round(seconds / gemm, 3),
        "pairs_above_0.5": int(reduction.counts[0].sum()) // 2,
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def check_gpu(out_dir: str, sizes: tuple[int, ...] = (45460, 1_000_000), precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")) -> dict:
    """Run every check and timing; write ``gpu_similarity.json`` to ``out_dir`` and return it."""
    name = require_cuda()
    torch.set_float32_matmul_precision("highest")
    result: dict = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    result["small_awkward"] = check_small("cuda")
    x = unit_vectors(45460, 128, 0)
    cpu = all_pairs(x, 5696, cpu_tile(K), workers=os.cpu_count() or 1)
    gpu = {p: all_pairs(x, GPU_BLOCK, gpu_tile(K, "cuda", p)) for p in precisions}
    result["n45460_vs_cpu_fp32"] = compare(gpu["fp32"], cpu, len(x))
    result["half_precision_error_vs_fp32"] = {p: compare(gpu[p], gpu["fp32"], len(x)) for p in precisions if p != "fp32"}
    result["timings"] = [time_all_pairs(n, p) for n in sizes for p in (precisions if n <= 100_000 else ("fp32", "bf16"))]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_similarity.json"), "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_similarity.json")
    parser.add_argument("--sizes", default="45460,1000000", help="N for the timings (default 45460,1000000)")
    args = parser.parse_args()
    try:
        result = check_gpu(args.out, tuple(int(s) for s in args.sizes.split(",")))
    except RuntimeError as exc:
        print(f"gpu_check_similarity: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0 if result["small_awkward"]["all_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
