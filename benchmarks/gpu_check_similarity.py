"""GPU check of the similarity tile kernel: correctness against the CPU kernel and brute force, then timings.

One run, one JSON file (``gpu_similarity.json`` in ``--out``), rewritten after every part so a run
cut short still leaves what it measured:

1. correctness on small awkward data (sizes 1..1000, blocks 1..128, ties, duplicates, products past
   1.0): the torch kernel and the fused Triton kernel on the GPU equal a float64 brute force and the
   compiled CPU kernel exactly;
2. on N=45,460 random unit vectors (d=128): the GPU fp32 results against the CPU kernel (run on
   every core), the fused Triton kernel's against torch's, and the error of fp16/bf16 products
   against fp32 (histogram L1 share, threshold count relative error, recall of the top-k, largest
   similarity error);
3. a profile of the fp32 kernel's parts (matmul, binning + histogram, threshold counts, keys, row and
   column top-k, device-to-host copies), each timed alone on the N=45,460 chunks (``profile_45460``);
4. timings of the whole all-pairs pass (reduction included) against the bare tiled GEMM over the
   same tiles and chunks, at each ``--sizes`` N, per variant: ``fp32`` (torch), ``triton`` (the fused
   Triton kernel, fp32), ``bf16``, ``fp16`` (torch; fp16 up to 100,000). A timing whose projection (the last measured one of that precision, scaled by
   N^2, plus 30 %) would end past ``--budget-seconds`` from the start is not run; its entry says
   so and gives the projection, marked as extrapolated.

Needs only torch with CUDA, Triton (which CUDA builds of torch bring), numba and numpy (no Ray, pyarrow, fsspec or FAISS; threadpoolctl is used
when present): run from the repository root as
``PYTHONPATH=. python benchmarks/gpu_check_similarity.py --out DIR`` (about 3 minutes on one H200 with
the defaults). Without CUDA it fails with exit status 1 and says so; it never skips.
``--dry-run`` runs every part with torch on the CPU at small sizes, the Triton kernel in Triton's
interpreter (what the unit test runs).
"""

from __future__ import annotations

import time

START = time.perf_counter()

import os  # noqa: E402
import sys  # noqa: E402

if "--dry-run" in sys.argv:  # the fused kernel runs in Triton's interpreter on the CPU: set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.gpu_sizes import write_json  # noqa: E402
from enrich_dist.similarity import kernel, torch_kernel, triton_kernel  # noqa: E402
from enrich_dist.similarity.plan import histogram_edges, schedule, tile_plan  # noqa: E402
from enrich_dist.similarity.reduce import Reduction  # noqa: E402

THRESHOLDS = (0.5, 0.7, 0.9)
BINS = 200
K = 10
GPU_BLOCK = 65536
CPU_BLOCK = 5696
COMPARE_N = 45460
SIZES = (45460, 200_000, 1_000_000)
BUDGET_SECONDS = 180.0
SAFETY = 1.3
HALF_MAX_N = 100_000
DRY_RUN = {"compare_n": 1500, "sizes": (600, 1200), "block": 512}


def one_blas_thread():
    """One BLAS thread per caller (threadpoolctl when installed; otherwise the BLAS defaults)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1)


def require_cuda() -> str:
    """The CUDA device name; raises when torch sees no CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "CUDA is not available to torch on this machine: the GPU similarity check needs an NVIDIA GPU "
            f"and a CUDA build of torch (torch {torch.__version__}, CUDA {torch.version.cuda}); "
            "--dry-run checks the script on the CPU"
        )
    return torch.cuda.get_device_name(0)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Seeded random L2-normalised float32 rows."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def device_unit_vectors(n: int, dim: int, seed: int, device: str) -> torch.Tensor:
    """Seeded random L2-normalised float32 rows made on ``device`` (no host copy of a large N)."""
    gen = torch.Generator(device).manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, device=device, generator=gen))


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


def all_pairs(x: np.ndarray | torch.Tensor, block: int, tile_fn, workers: int = 1) -> Reduction:
    """Every tile through ``tile_fn(xi, xj, diagonal, r0, c0)``, merged by the stage's reduction."""
    n = len(x)
    reduction = Reduction(n, min(K, max(n - 1, 0)), len(THRESHOLDS), BINS)
    tiles = schedule(tile_plan(n, block))

    def run(tile):
        r0, r1, c0, c1 = tile
        return tile, tile_fn(x[r0:r1], x[c0:c1], r0 == c0, r0, c0)

    with one_blas_thread(), ThreadPoolExecutor(max_workers=workers) as pool:
        for tile, stats in pool.map(run, tiles):
            reduction.add(tile, stats)
    return reduction


def cpu_tile(k: int):
    return lambda xi, xj, diag, r0, c0: kernel.tile_stats(
        xi, xj, diag, k, THRESHOLDS, histogram_edges(BINS), row_offset=r0, col_offset=c0
    )


def variant(name: str) -> tuple[str, str]:
    """(kernel, precision) of a timed variant: ``triton`` is the fused Triton kernel in fp32, others torch."""
    return ("triton", "fp32") if name == "triton" else ("torch", name)


def gpu_tile(k: int, device: str, precision: str, kernel_name: str = "torch"):
    tile_stats = triton_kernel.tile_stats_triton if kernel_name == "triton" else torch_kernel.tile_stats_torch
    return lambda xi, xj, diag, r0, c0: tile_stats(
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
            fused = all_pairs(x, block, gpu_tile(K, device, "fp32", "triton"))
            cpu = all_pairs(x, block, cpu_tile(K))
            same = all(
                np.array_equal(a, b)
                for a, b in [
                    (gpu.hist, hist), (gpu.counts, counts), (gpu.vals, vals), (gpu.idx, idx),
                    (cpu.hist, gpu.hist), (cpu.counts, gpu.counts), (cpu.idx, gpu.idx),
                    (fused.hist, hist), (fused.counts, counts), (fused.vals, vals), (fused.idx, idx),
                ]
            )
            cases.append({"n": n, "block": block, "exact_match": bool(same)})
    past_one = np.array([[0.6, 0.8, 0.0]] * 3, np.float32) * np.float32(1.0000001)
    st = gpu_tile(2, device, "fp32")(past_one, past_one, True, 0, 0)
    cases.append({"case": "products of 1.0000001 in the last bin", "exact_match": bool(st.hist[-1] == 3)})
    return {"cases": cases, "all_exact": all(c["exact_match"] for c in cases)}


def compare(got: Reduction, want: Reduction, n: int) -> dict:
    """Histogram L1 share, threshold count relative errors, top-k recall and largest similarity error."""
    valid = want.idx >= 0
    found = ((got.idx[:, :, None] == want.idx[:, None, :]) & valid[:, None, :]).any(axis=1)
    counts = {
        f"{t:g}": float(abs(int(got.counts[i].sum()) - int(want.counts[i].sum())) / max(int(want.counts[i].sum()), 1))
        for i, t in enumerate(THRESHOLDS)
    }
    return {
        "histogram_l1_share": float(np.abs(got.hist - want.hist).sum() / max(n * (n - 1) // 2, 1)),
        "threshold_count_rel_error": counts,
        "recall_at_k": float(found.sum() / max(valid.sum(), 1)),
        "max_sim_abs_error": float(np.abs(got.vals[:, 0] - want.vals[:, 0]).max()) if got.k else 0.0,
    }


def bare_gemm(x: torch.Tensor, block: int, device: str) -> float:
    """Seconds for only the chunked products of every tile, as the torch kernel makes them."""
    n = len(x)
    synchronize(device)
    start = time.perf_counter()
    for r0, r1, c0, c1 in tile_plan(n, block):
        xi, xj = x[r0:r1], x[c0:c1]
        step = max(1, min(len(xi), torch_kernel.chunk_elements(torch.device(device), len(xj)) // len(xj)))
        for r in range(0, len(xi), step):
            lo = r if r0 == c0 else 0
            xi[r : r + step] @ xj[lo:].T
    synchronize(device)
    return time.perf_counter() - start


def time_all_pairs(x: torch.Tensor, name: str, block: int, device: str) -> tuple[dict, Reduction]:
    """Seconds of variant ``name``'s all-pairs pass (reduction included) against the bare tiled GEMM on ``device``."""
    kernel_name, precision = variant(name)
    n = len(x)
    block = min(block, n)
    warm = x[: min(n, 4096)]
    bare_gemm(warm.to(torch_kernel.PRECISIONS[precision]), min(block, 2048), device)
    all_pairs(warm, min(block, 2048), gpu_tile(K, device, precision, kernel_name))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gemm = bare_gemm(x.to(torch_kernel.PRECISIONS[precision]), block, device)
    synchronize(device)
    start = time.perf_counter()
    reduction = all_pairs(x, block, gpu_tile(K, device, precision, kernel_name))
    seconds = time.perf_counter() - start
    timing = {
        "n": n, "variant": name, "kernel": kernel_name, "precision": precision, "block": block,
        "stage_seconds": round(seconds, 3),
        "chunk_elements": torch_kernel.chunk_elements(torch.device(device), min(block, n)),
        "gemm_seconds": round(gemm, 3), "ratio": round(seconds / gemm, 3),
        "pairs_above_0.5": int(reduction.counts[0].sum()) // 2,
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
    }
    return timing, reduction


class PartTimer:
    """Seconds per named part: CUDA events on the GPU (read once at the end), wall clock on the CPU."""

    def __init__(self, device: str) -> None:
        self.device, self.events, self.seconds = device, [], {}

    def __call__(self, name: str, fn):
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            out = fn()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        return out

    def totals(self) -> dict:
        synchronize(self.device)
        for name, start, end in self.events:
            self.seconds[name] = self.seconds.get(name, 0.0) + start.elapsed_time(end) / 1000
        self.events = []
        return {name: round(s, 4) for name, s in self.seconds.items()}


def profile_parts(x: torch.Tensor, device: str, k: int = K) -> dict:
    """Seconds of each part of the fp32 tile kernel, timed separately on the chunks of one diagonal tile of ``x``.

    Every part starts from the same chunk product, so the parts are timed alone: the matmul, the
    diagonal mask, binning + histogram and threshold counts (the kernel's helpers; ``alt_*`` entries are
    other ways, timed for comparison), building the int64 (value, index) keys,
    row and column top-k over those keys, row and column top-k over float32 values (the fast path),
    and the device-to-host copies of one tile's results.
    """
    n = len(x)
    a = x.float()
    bins = BINS
    bin_lim = torch.as_tensor(torch_kernel.bin_limits(bins), device=device)
    lowest = np.array([np.finfo(np.float32).min], np.float32)
    kernel_lim = torch.as_tensor(np.concatenate([lowest, torch_kernel.bin_limits(bins)]), device=device)
    lim = torch.as_tensor(kernel.sorted_limits(THRESHOLDS)[1], device=device)
    step = max(1, min(n, torch_kernel.chunk_elements(torch.device(device), n) // n))
    bits = max(1, (n - 1).bit_length())
    timer = PartTimer(device)
    hist = torch.zeros(bins + 1, dtype=torch.int64, device=device)
    counts = torch.zeros((len(THRESHOLDS), n), dtype=torch.int64, device=device)
    row_keys = torch.zeros((n, k), dtype=torch.int64, device=device)
    synchronize(device)
    wall = time.perf_counter()
    def chunk_parts(r: int, h: int) -> None:
        """Every part, timed alone, on the chunk of rows ``r .. r + h``."""
        s = timer("matmul", lambda: a[r : r + h] @ a[r:].T)
        mask = torch.ones((h, h), dtype=torch.bool, device=device).tril()
        timer("diagonal_mask", lambda: s[:, :h].masked_fill_(mask, -np.inf))

        groups = torch.arange(h, device=device, dtype=torch.int32) % torch_kernel.HIST_GROUPS * (bins + 1)
        groups = groups[:, None]
        timer("bin_histogram", lambda: torch_kernel._add_histogram(hist, s, kernel_lim, groups))
        row_part, col_part = counts[:, r : r + h], counts[:, r:]
        timer("threshold_counts", lambda: torch_kernel._add_threshold_counts(row_part, col_part, s, lim))

        def histogram_one_group():
            binned = torch.bucketize(s, bin_lim, out_int32=True, right=True)
            hist.add_(torch.bincount(binned.reshape(-1), minlength=bins + 1))

        timer("alt_bin_histogram_one_group", histogram_one_group)

        def thresholds_all_rows():
            for t in range(len(THRESHOLDS)):
                above = s > lim[t]
                counts[t, r : r + h] += above.sum(dim=1)
                counts[t, r:] += above.sum(dim=0)

        timer("alt_threshold_counts_all_rows", thresholds_all_rows)
        cols = torch.arange(r, n, device=device)
        rows = torch.arange(r, r + h, device=device)
        keys = timer("key_building", lambda: (torch_kernel._desc_keys(s) << bits) | cols[None, :])
        kk = min(k, n - r)
        timer("row_topk_int64_keys", lambda: torch.topk(keys, kk, dim=1, largest=False, sorted=True))
        keys = None  # free it before the next part
        ckeys = (torch_kernel._desc_keys(s) << bits) | rows[:, None]
        timer("col_topk_int64_keys_dim0", lambda: torch.topk(ckeys, min(k, h), dim=0, largest=False, sorted=True))
        ckeys = None
        timer("row_topk_float32", lambda: torch.topk(s, min(k + 1, n - r), dim=1, sorted=True))
        timer("col_transpose_float32", lambda: s.T.contiguous())
        timer("col_topk_float32_transposed", lambda: torch.topk(s.T.contiguous(), min(k + 1, h), dim=1, sorted=True))
        # alternatives, timed alone, for the next change: where the histogram's time goes, other ways
        # to count thresholds, column top-k without the transpose
        binned = timer("alt_bucketize_only", lambda: torch.bucketize(s, bin_lim, out_int32=True, right=True))
        timer("alt_bincount_only", lambda: torch.bincount(binned.reshape(-1), minlength=bins + 1))
        spread = torch_kernel.HIST_GROUPS * (bins + 1)
        timer("alt_bincount_only_spread_row_groups", lambda: torch.bincount((binned + groups).reshape(-1), minlength=spread))
        binned = None

        def thresholds_3d():
            above = s.unsqueeze(0) > lim[:, None, None]
            return above.sum(dim=2), above.sum(dim=1)

        timer("alt_threshold_counts_one_3d_compare", thresholds_3d)
        timer("alt_threshold_row_sums_only", lambda: [(s > lim[t]).sum(dim=1) for t in range(len(THRESHOLDS))])
        timer("alt_col_topk_float32_dim0", lambda: torch.topk(s, min(k + 1, h), dim=0, sorted=True))
        timer("alt_row_topk_float32_unsorted", lambda: torch.topk(s, min(k + 1, n - r), dim=1, sorted=False))
        rk = timer("row_topk_kernel", lambda: torch_kernel._row_topk_keys(s, cols, k, bits))
        timer("col_topk_kernel", lambda: torch_kernel._row_topk_keys(s.T.contiguous(), rows, k, bits))
        row_keys[r : r + h, : rk.shape[1]] = rk

    chunks = 0
    for r in range(0, n, step):
        chunks += 1
        chunk_parts(r, min(step, n - r))

    timer("device_to_host", lambda: (row_keys.cpu(), counts.cpu(), hist.cpu(), row_keys.T.contiguous().cpu()))
    parts = timer.totals()
    return {
        "n": n, "precision": "fp32", "chunks": chunks, "rows_per_chunk": step,
        "chunk_elements": step * n, "parts_seconds": parts,
        "wall_seconds_all_parts": round(time.perf_counter() - wall, 3),
        "note": "each part timed alone on the same chunks (a diagonal tile of all N); top-k is timed both on "
        "int64 keys (the exact slow path) and on float32 values (the fast path); *_kernel is the kernel's helper",
    }


def write_result(out_dir: str, result: dict) -> None:
    """Commit ``gpu_similarity.json`` by rename, so the file on disk is always a whole record."""
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "gpu_similarity.json"), result)


def check_gpu(
    out_dir: str,
    sizes: tuple[int, ...] = SIZES,
    precisions: tuple[str, ...] = ("fp32", "triton", "bf16", "fp16"),
    budget_seconds: float = BUDGET_SECONDS,
    dry_run: bool = False,
) -> dict:
    """Run every check and timing; write ``gpu_similarity.json`` to ``out_dir`` after each part and return it."""
    if dry_run:
        device, name, compare_n, block = "cpu", "cpu (dry run)", DRY_RUN["compare_n"], DRY_RUN["block"]
        sizes = DRY_RUN["sizes"]
    else:
        device, name, compare_n, block = "cuda", require_cuda(), COMPARE_N, GPU_BLOCK
    torch.set_float32_matmul_precision("highest")
    result: dict = {
        "device": name, "dry_run": dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
        "cpu_cores": os.cpu_count(), "budget_seconds": budget_seconds,
    }
    result["small_awkward"] = check_small(device)
    result["seconds_so_far"] = round(time.perf_counter() - START, 1)
    write_result(out_dir, result)

    x = unit_vectors(compare_n, 128, 0)
    start = time.perf_counter()
    cpu = all_pairs(x, min(CPU_BLOCK, max(64, compare_n // 8)), cpu_tile(K), workers=os.cpu_count() or 1)
    result["cpu_kernel_seconds"] = {"n": compare_n, "threads": os.cpu_count(), "seconds": round(time.perf_counter() - start, 3)}
    xt = torch.tensor(x, device=device)
    timings, gpu, last = [], {}, {}
    for p in precisions:
        timing, gpu[p] = time_all_pairs(xt, p, block, device)
        timings.append(timing)
        last[p] = timing
    result["seconds_so_far"] = round(time.perf_counter() - START, 1)
    write_result(out_dir, result)
    try:
        result[f"profile_{compare_n}"] = profile_parts(xt, device)
    except (RuntimeError, ValueError) as exc:  # a profile that fails (out of memory, say) must not stop the checks
        result[f"profile_{compare_n}"] = {"failed": f"{type(exc).__name__}: {exc}"}
        if device == "cuda":
            torch.cuda.empty_cache()
    del xt
    result[f"n{compare_n}_vs_cpu_fp32"] = compare(gpu["fp32"], cpu, compare_n)
    if "triton" in gpu:
        result[f"n{compare_n}_triton_vs_torch_fp32"] = compare(gpu["triton"], gpu["fp32"], compare_n)
    result["half_precision_error_vs_fp32"] = {
        p: compare(gpu[p], gpu["fp32"], compare_n) for p in precisions if p not in ("fp32", "triton")
    }
    del gpu, cpu
    result["timings"] = timings
    result["seconds_so_far"] = round(time.perf_counter() - START, 1)
    write_result(out_dir, result)

    time_sizes(out_dir, result, [s for s in sizes if s != compare_n], precisions, last, block, device, budget_seconds)
    result["seconds_total"] = round(time.perf_counter() - START, 1)
    write_result(out_dir, result)
    return result


def time_sizes(
    out_dir: str,
    result: dict,
    sizes: list[int],
    precisions: tuple[str, ...],
    last: dict[str, dict],
    block: int,
    device: str,
    budget_seconds: float,
) -> None:
    """Timings at each N (ascending) appended to ``result["timings"]``; ``last[p]`` is the latest timing of p.

    A timing projected to end past the budget is skipped with the reason and its extrapolation.
    """
    timings = result["timings"]
    for n in sorted(sizes):
        x_n = None
        for p in precisions if n <= HALF_MAX_N or device == "cpu" else [q for q in precisions if q != "fp16"]:
            prev = last.get(p)
            elapsed = time.perf_counter() - START
            if prev is not None:
                scale = (n / prev["n"]) ** 2
                projected = (prev["stage_seconds"] + prev["gemm_seconds"]) * scale * SAFETY
                if elapsed + projected > budget_seconds:
                    timings.append({
                        "n": n, "precision": p, "skipped": (
                            f"projected {projected:.0f} s (from N={prev['n']}, scaled by N^2, +30 %) would end "
                            f"past the {budget_seconds:.0f} s budget ({elapsed:.0f} s used)"
                        ),
                        "extrapolated_stage_seconds": round(prev["stage_seconds"] * scale, 1),
                        "extrapolated_gemm_seconds": round(prev["gemm_seconds"] * scale, 1),
                    })
                    write_result(out_dir, result)
                    continue
            if x_n is None:
                x_n = device_unit_vectors(n, 128, 1, device)
            timing, _ = time_all_pairs(x_n, p, block, device)
            timings.append(timing)
            last[p] = timing
            result["seconds_so_far"] = round(time.perf_counter() - START, 1)
            write_result(out_dir, result)
        del x_n
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_similarity.json")
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)),
        help=f"N for the timings, each run only if projected to fit the budget (default {','.join(map(str, SIZES))})",
    )
    parser.add_argument(
        "--budget-seconds", type=float, default=BUDGET_SECONDS,
        help=f"no timing starts that is projected to end later than this after start-up (default {BUDGET_SECONDS:g})",
    )
    parser.add_argument("--dry-run", action="store_true", help="torch on the CPU at small sizes: checks the script, not a GPU")
    args = parser.parse_args()
    try:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes {args.sizes!r} must be comma-separated integers, e.g. 45460,200000")
    if any(n < 2 for n in sizes):
        parser.error(f"--sizes {args.sizes!r}: every N must be at least 2")
    try:
        result = check_gpu(args.out, sizes, budget_seconds=args.budget_seconds, dry_run=args.dry_run)
    except RuntimeError as exc:
        print(f"gpu_check_similarity: FAILED: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0 if result["small_awkward"]["all_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
