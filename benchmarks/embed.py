"""Embedding stage throughput against bare decode + resize of the same files, measured in one run.

Usage (from the repository root):

    python -P benchmarks/embed.py --images 10000 --out bench.jsonl
    python -P benchmarks/embed.py --archive runs/demo/archive/manifest.csv --out bench.jsonl

Makes (or reuses) an archive, lists it with the manifest stage, writes an untrained encoder of the
configured size (throughput does not depend on the weights), then times (a) bare decode + crop +
resize of every file with as many threads as cores, in this process, and (b) the whole embed stage
on a local Ray (excluding Ray start). Prints images/s of both, the ratio (b)/(a) and the peak RSS
of this process plus its children (Ray workers), and appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import threading
import time

import psutil


def _tree_rss() -> int:
    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


class PeakMemory:
    """Samples the RSS of this process and its descendants in a thread."""

    def __init__(self, interval: float = 0.2):
        self.peak, self.interval, self._stop = 0, interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000, help="synthetic images when --archive is not given")
    parser.add_argument("--archive", help="an existing folder or manifest table to embed instead")
    parser.add_argument("--embedder", default="vae", choices=["vae", "pixels"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--work", help="folder for the archive and run (default: a temporary folder)")
    parser.add_argument("--out", default="bench.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    from enrich_dist import imaging
    from enrich_dist.config import EmbedConfig, EncoderConfig, ManifestConfig
    from enrich_dist.datasets import make_echo_archive
    from enrich_dist.embed import run_embed
    from enrich_dist.encoder import BetaVAE, encoder_bytes
    from enrich_dist.manifest import run_manifest
    from enrich_dist.runtime import ray_session
    from enrich_dist.storage import RunDir

    work = args.work or tempfile.mkdtemp(prefix="enrich-bench-embed-")
    source = args.archive
    if source is None:
        archive = os.path.join(work, "archive")
        if not os.path.exists(os.path.join(archive, "manifest.csv")):
            make_echo_archive(archive, args.images, 0, progress=False)
        source = os.path.join(archive, "manifest.csv")
    run = RunDir(os.path.join(work, f"run-{time.time_ns()}"))
    with ray_session(num_cpus=args.num_cpus) as res:
        run_manifest(run, source, ManifestConfig())
        uris = [r["uri"] for r in run.read_table("manifest", columns=["uri", "status"]).to_pylist() if r["status"] == "ok"]
        torch.manual_seed(0)
        run.write_bytes("encoder/vae.pt", encoder_bytes(BetaVAE(), EncoderConfig()))
        run.mark_done("encoder", {})

        with PeakMemory() as decode_mem:
            t0 = time.perf_counter()
            for i in range(0, len(uris), 1024):
                imaging.load_images(uris[i : i + 1024], 64, threads=res.cpus)
            decode_s = time.perf_counter() - t0
        with PeakMemory() as stage_mem:
            t0 = time.perf_counter()
            stats = run_embed(run, EmbedConfig(embedder=args.embedder, batch_size=args.batch_size))
            stage_s = time.perf_counter() - t0
        n = stats["n_embedded"]
        result = {
            "benchmark": "embed",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "images": n,
            "embedder": args.embedder,
            "cpus": res.cpus,
            "gpus": res.gpus,
            "device": stats.get("device"),
            "bare_decode_images_per_s": round(len(uris) / decode_s, 1),
            "stage_images_per_s": round(n / stage_s, 1),
            "ratio_stage_to_decode": round((n / stage_s) / (len(uris) / decode_s), 3),
            "decode_seconds": round(decode_s, 2),
            "stage_seconds": round(stage_s, 2),
            "peak_rss_mb_decode": round(decode_mem.peak / 2**20),
            "peak_rss_mb_stage": round(stage_mem.peak / 2**20),
            "torch": torch.__version__,
            "ray": ray.__version__,
        }
    print(
        f"embed: stage {result['stage_images_per_s']} images/s vs bare decode {result['bare_decode_images_per_s']} "
        f"images/s -> ratio {result['ratio_stage_to_decode']:.2f} (target >= 0.70 on CPU); "
        f"peak RSS {result['peak_rss_mb_stage']} MB ({result['device']}, {n} images)"
    )
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
