"""Benchmark: a cold ``enrich similarity`` command on a redundant archive against the bare tiled GEMM.

What a user sees: a fresh process starts its own local Ray, reads the embeddings, computes every
pair, writes neighbors, edges and duplicate groups. The stage's seconds are read from ``run.json``
(as the pipeline records them), the whole command's wall time beside them. The baseline is the
bare tiled GEMM (same tile plan, grouping and one BLAS thread per task, as in
``benchmarks/similarity.py``) on warm workers, the fastest the tiles could be computed. The
embeddings mimic a redundant archive: noisy copies of ``--clusters`` centres plus a share of exact
duplicates. Prints one JSON line with the ratio, stage over GEMM, and appends it to ``--out``.

    python -m benchmarks.similarity_cold --n 45460 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from benchmarks.similarity import bare_gemm_seconds, source_version, unit_vectors
from enrich_dist import executor, stages
from enrich_dist.config import parse_memory
from enrich_dist.runtime import ray_session
from enrich_dist.schema import EMBEDDINGS_DIR, RUN_JSON, embeddings_schema
from enrich_dist.similarity import kernel
from enrich_dist.similarity.plan import choose_block
from enrich_dist.similarity.stage import PAPER_THRESHOLDS
from enrich_dist.storage import RunDir, shard_name

log = logging.getLogger("benchmarks.similarity_cold")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--n", type=int, default=45460)
parser.add_argument("--dim", type=int, default=128)
parser.add_argument("--clusters", type=int, default=50)
parser.add_argument("--spread", type=float, default=0.5, help="noise around cluster centres")
parser.add_argument(
    "--duplicates", type=float, default=0.02, help="share of images that are exact copies of another"
)
parser.add_argument("--shards", type=int, default=8)
parser.add_argument(
    "--repeats", type=int, default=2, help="cold commands (and GEMM runs); the best of each is kept"
)
parser.add_argument("--max-memory", default="2G", help="the stage's default; the GEMM uses the same block")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="results.jsonl")


def redundant_vectors(
    n: int, dim: int, clusters: int, spread: float, duplicates: float, seed: int
) -> np.ndarray:
    """Clustered unit vectors where a share ``duplicates`` of the rows are exact copies of other rows."""
    x = unit_vectors(n, dim, clusters, spread, seed)
    rng = np.random.default_rng(seed + 1)
    copies = rng.choice(n, int(duplicates * n), replace=False)
    x[copies] = x[rng.choice(n, len(copies))]
    return x


def embedded_run(path: str, x: np.ndarray, shards: int) -> None:
    """A run dir whose embed stage is complete with ``x`` (image ids 0..n-1), as after ``enrich embed``."""
    run = RunDir(path)
    for i, part in enumerate(np.array_split(np.arange(len(x)), shards)):
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x[part].reshape(-1)), x.shape[1])
        table = pa.Table.from_arrays(
            [pa.array(part.astype(np.int64)), emb], schema=embeddings_schema(x.shape[1])
        )
        run.write_table(f"{EMBEDDINGS_DIR}/{shard_name(i)}", table)
    executor.adopt(stages.EMBED, run, {"n_images": len(x), "embedder": "byo"})


def cold_command(template: str, scratch: str) -> tuple[float, float, dict]:
    """(stage seconds from run.json, command wall seconds, similarity summary) of one fresh ``enrich similarity``."""
    run_dir = os.path.join(scratch, f"run-{time.monotonic_ns()}")
    shutil.copytree(template, run_dir)
    cmd = [sys.executable, "-m", "enrich_dist", "similarity", "--output", run_dir]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    record = json.loads(open(os.path.join(run_dir, RUN_JSON), encoding="utf-8").read())
    summary = json.loads(open(os.path.join(run_dir, "similarity", "summary.json"), encoding="utf-8").read())
    shutil.rmtree(run_dir)
    return record["stages"]["similarity"]["seconds"], wall, summary


def main() -> None:
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    x = redundant_vectors(args.n, args.dim, args.clusters, args.spread, args.duplicates, args.seed)
    with tempfile.TemporaryDirectory(prefix="similarity-cold-") as scratch:
        template = os.path.join(scratch, "template")
        embedded_run(template, x, args.shards)
        stage, wall, gemm = [], [], []
        summary: dict = {}
        for _ in range(args.repeats):
            seconds, command, summary = cold_command(template, scratch)
            stage.append(seconds)
            wall.append(command)
            log.info("cold enrich similarity: stage %.2f s (run.json), command %.2f s", seconds, command)
        with ray_session() as resources:
            block = choose_block(
                args.n,
                args.dim,
                10,
                len(PAPER_THRESHOLDS),
                parse_memory(args.max_memory),
                resources.cpus,
                kernel.chunk_rows(args.n),
            )
            if block != summary["block_size"]:
                raise SystemExit(
                    f"block {block} differs from the stage's {summary['block_size']}: align the plan"
                )
            bare_gemm_seconds(x[: min(args.n, 2 * block)], block, resources.cpus)  # workers started and warm
            for _ in range(args.repeats + 1):
                gemm.append(bare_gemm_seconds(x, block, resources.cpus))
                log.info("bare tiled GEMM %.2f s", gemm[-1])
    result = {
        "benchmark": "similarity_cold",
        "n": args.n,
        "dim": args.dim,
        "clusters": args.clusters,
        "spread": args.spread,
        "duplicates": args.duplicates,
        "cpus": resources.cpus,
        "block": block,
        "stage_seconds": round(min(stage), 3),
        "stage_runs": [round(s, 3) for s in stage],
        "command_seconds": round(min(wall), 3),
        "gemm_seconds": round(min(gemm), 3),
        "gemm_runs": [round(s, 3) for s in gemm],
        "ratio": round(min(stage) / min(gemm), 3),
        "edges": (summary.get("edges") or {}).get("pairs"),
        "pairs_above_0.9": summary["thresholds"]["0.9"]["pairs"],
        "load_average": round(os.getloadavg()[0], 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": source_version(),
    }
    line = json.dumps(result)
    print(line)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


if __name__ == "__main__":
    main()
