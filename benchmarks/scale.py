"""Scale benchmark: bring-your-own clustered embeddings through similarity, selection and export, each a cold command.

Writes ``--images`` unit vectors of ``--dim`` around ``images / --per-cluster`` random centres as the
embed stage's shards (``embeddings/part-*.parquet``, ``--shard-rows`` each; what ``enrich embed
--embedder byo`` leaves), a manifest to match, and marks both stages done. With ``embed`` among
``--stages`` it writes the vectors to one bring-your-own Parquet file instead, and the timed ``embed``
command (``enrich embed --embedder byo``) imports it. Then runs each stage as its own ``enrich``
command (a cold process, as a user or a cron job runs it): ``similarity`` (``--similarity-mode approx`` by default; duplicate groups come with it),
``select`` (``--select-mode``, default ``exact``; ``cells`` with ``--cell-size``; ``--replicates``) and ``export`` (csv of the first
``--export-n`` images). Memory is the whole machine's, sampled independently of Ray: MemAvailable
from /proc/meminfo every 0.5 s, peak = available before the command minus the least seen during it.
Approximate recall@k and threshold-count errors are the stage's own brute force on its sample.

    python -m benchmarks.scale --images 1000000 --out results.jsonl
    python -m benchmarks.scale --images 10000000 --out results.jsonl
    python -m benchmarks.scale --images 1000000 --stages embed,similarity --out results.jsonl
    python -m benchmarks.scale --images 10000000 --stages embed,similarity,select,export --select-mode cells \
        --max-memory 4G

Prints one line per stage and appends one JSON line (with the commit) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.similarity import source_version
from enrich_dist.schema import EMBEDDINGS_DIR, MANIFEST, MANIFEST_DIR, embeddings_schema
from enrich_dist.storage import RunDir, shard_name


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class MemorySampler:
    """The least MemAvailable seen every ``period`` seconds while running."""

    def __init__(self, period: float = 0.5):
        self.period, self.least, self._stop = period, mem_available(), threading.Event()
        self.before = self.least
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.least = min(self.least, mem_available())

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.least = min(self.least, mem_available())

    @property
    def peak_gib(self) -> float:
        return (self.before - self.least) / 2**30


def write_archive(
    run: RunDir, n: int, dim: int, per_cluster: int, shard_rows: int, seed: int, spread: float = 0.5,
    byo: str | None = None,
) -> float:
    """Clustered unit vectors as embedding shards plus a manifest, one shard at a time; seconds taken.

    ``byo``: write the vectors to this one Parquet file instead (``image_id``, ``embedding``), for a timed
    ``enrich embed --embedder byo`` to import; the embed stage is then left to do.
    """
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per_cluster), dim)).astype(np.float32)
    writer = pq.ParquetWriter(byo, embeddings_schema(dim)) if byo else None
    for s, first in enumerate(range(0, n, shard_rows)):
        ids = np.arange(first, min(first + shard_rows, n), dtype=np.int64)
        x = centres[rng.integers(0, len(centres), len(ids))]
        x += spread * rng.standard_normal(x.shape).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), dim)
        table = pa.Table.from_arrays([pa.array(ids), emb], schema=embeddings_schema(dim))
        if writer is not None:
            writer.write_table(table)
        else:
            run.write_table(f"{EMBEDDINGS_DIR}/{shard_name(s)}", table)
        columns = {f.name: pa.nulls(len(ids), f.type) for f in MANIFEST}
        columns.update(
            image_id=pa.array(ids),
            uri=pa.array([f"archive/{i}.png" for i in ids.tolist()]),
            status=pa.array(["ok"] * len(ids)),
        )
        run.write_table(f"{MANIFEST_DIR}/{shard_name(s)}", pa.table(columns, schema=MANIFEST))
    run.mark_done(MANIFEST_DIR, {"n_images": n, "n_ok": n, "source": "benchmarks.scale"})
    if writer is not None:
        writer.close()
    else:
        run.mark_done(EMBEDDINGS_DIR, {"n_embedded": n, "dim": dim, "embedder": "byo", "source": "benchmarks.scale"})
    return time.perf_counter() - start


def run_command(name: str, argv: list[str], timeout: float) -> dict:
    """One cold ``enrich`` command: wall seconds, the machine's peak memory, exit status and its last lines."""
    start = time.perf_counter()
    with MemorySampler() as mem:
        done = subprocess.run(
            [sys.executable, "-m", "enrich_dist", *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
    out = {
        "stage": name,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_gib": round(mem.peak_gib, 2),
        "returncode": done.returncode,
    }
    # the stage's own lines (passes, k-means, tiles at 10 % steps): where the time went
    out["log"] = [line[24:] for line in (done.stdout + done.stderr).splitlines() if " INFO enrich_dist." in line][-60:]
    if done.returncode:
        out["tail"] = (done.stdout + done.stderr)[-3000:]
    print(f"{name}: {out['seconds']} s, machine peak {out['peak_gib']} GiB, exit {done.returncode}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--per-cluster", type=int, default=500, help="images per cluster centre")
    parser.add_argument(
        "--spread", type=float, default=0.5,
        help="noise per coordinate around a centre (standard normal entries); smaller is more redundant",
    )
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--similarity-mode", default="approx", choices=["approx", "exact"])
    parser.add_argument("--select-mode", default="exact")
    parser.add_argument("--cell-size", type=int, help="cells mode: images per k-means cell (default: the stage's)")
    parser.add_argument("--replicates", type=int, default=1)
    parser.add_argument("--export-n", type=int, default=10_000)
    parser.add_argument("--stages", default="similarity,select,export")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per command")
    parser.add_argument("--run", help="run dir to use (default: a temporary folder, removed at the end)")
    parser.add_argument("--max-memory", help="the similarity stage's --max-memory (e.g. 4G at 10^7)")
    parser.add_argument("--extra", default="", help="more options for every stage command, e.g. '--max-memory 2G'")
    parser.add_argument("--out", help="append the JSON line here")
    args = parser.parse_args()

    folder = args.run or tempfile.mkdtemp(prefix="enrich-scale-")
    run = RunDir(folder)
    record: dict = {
        "benchmark": "scale",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": source_version(),
        "images": args.images,
        "dim": args.dim,
        "per_cluster": args.per_cluster,
        "spread": args.spread,
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "similarity_mode": args.similarity_mode,
        "select_mode": args.select_mode,
        "replicates": args.replicates,
        "stages": [],
    }
    try:
        stages = args.stages.split(",")
        byo = os.path.join(folder, "byo-embeddings.parquet") if "embed" in stages else None
        os.makedirs(folder, exist_ok=True)
        if not run.is_done(MANIFEST_DIR if byo else EMBEDDINGS_DIR):
            record["write_seconds"] = round(
                write_archive(
                    run, args.images, args.dim, args.per_cluster, args.shard_rows, seed=0, spread=args.spread, byo=byo
                ), 1,
            )
            print(f"archive: {args.images:,} embeddings written in {record['write_seconds']} s", flush=True)
        extra = args.extra.split()
        commands = {
            "embed": ["embed", "--output", folder, "--embedder", "byo", "--embeddings", str(byo)],
            "similarity": ["similarity", "--output", folder, "--similarity-mode", args.similarity_mode,
                           *(["--max-memory", args.max_memory] if args.max_memory else []), *extra],
            "select": ["select", "--output", folder, "--mode", args.select_mode,
                       "--replicates", str(args.replicates),
                       *(["--cell-size", str(args.cell_size)] if args.cell_size else []), *extra],
            "export": ["export", "--output", folder, "--n", str(args.export_n), "--to", os.path.join(folder, "next.csv")],
        }
        for name in stages:
            result = run_command(name, commands[name], args.timeout)
            record["stages"].append(result)
            if result["returncode"]:
                break
            if name == "select":
                chosen = run.read_json("selection/selection.json")
                record["selection"] = {key: chosen.get(key) for key in ("seconds", "replicate_seconds", "workers", "cells")}
            if name == "similarity":
                summary = run.read_json("similarity/summary.json")
                record["similarity"] = {
                    key: summary.get(key) for key in ("seconds", "mode", "kernel", "block_size", "tiles", "duplicates")
                }
                if "approx" in summary:
                    record["similarity"]["approx"] = summary["approx"]
                    quality = summary["approx"]
                    print(
                        f"  approx: recall@{summary['top_k']} {quality['recall_at_k']:.4f}, "
                        f"recall@1 {quality['recall_at_1']:.4f}, count errors {quality['threshold_count_rel_error']}, "
                        f"pairs computed {quality['pair_fraction_computed']:.2e} of all",
                        flush=True,
                    )
    finally:
        if not args.run:
            shutil.rmtree(folder, ignore_errors=True)
    record["peak_gib"] = max((s["peak_gib"] for s in record["stages"]), default=None)
    print(json.dumps(record))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
