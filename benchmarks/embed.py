"""Embedding stage throughput against bare decode + resize of the same files, measured in one run.

Usage (from the repository root):

    python -P benchmarks/embed.py --images 8000 --out bench.jsonl
    python -P benchmarks/embed.py --archive runs/demo/archive/manifest.csv --out bench.jsonl

Makes (or reuses) an archive, lists it with the manifest stage, writes an untrained encoder of the
configured size (throughput does not depend on the weights), then times (a) bare decode + crop +
resize of every file with as many threads as cores, in this process, once before and once after
the stage (their mean is the baseline, so a change in machine load hits both sides), and (b) the
whole embed stage on a local Ray: actor start-up, decoding, encoding and committing shards. Prints
images/s of both, the ratio (b)/(a) without and with the Ray start-up (``ray.init``), and the peak
RSS of this process plus its children (Ray workers), and appends one JSON line to --out. Ray runs its
workers at niceness 15 by default; the benchmark starts them at 0 (``--worker-niceness``), the
baseline's priority, so that other programs on a shared machine do not starve one side only. On a GPU
machine use benchmarks/gpu_check_embed.py (no Ray needed).
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
    parser.add_argument("--images", type=int, default=8000, help="synthetic images when --archive is not given")
    parser.add_argument("--archive", help="an existing folder or manifest table to embed instead")
    parser.add_argument("--embedder", default="contrastive", choices=["vae", "contrastive", "pixels"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default="auto", help="the embed stage's precision (bf16 on a CPU with native bfloat16)")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--work", help="folder for the archive and run (default: a temporary folder)")
    parser.add_argument("--out", default="bench.jsonl")
    parser.add_argument(
        "--worker-niceness", type=int, default=0,
        help="niceness of the local Ray's workers (Ray's own default is 15; 0 runs them at the priority of the "
        "bare-decode baseline, which matters only when other programs load the machine)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # read by the raylet and the workers it starts: set before ray.init
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)

    import ray
    import torch

    from enrich_dist import imaging, schema
    from enrich_dist.config import EmbedConfig, EncoderConfig, ManifestConfig
    from enrich_dist.datasets import make_echo_archive
    from enrich_dist.embed import ShardEmbedder, actor_threads, pending_shards, plan_actors, run_embed
    from enrich_dist.encoder import CHECKPOINTS, BetaVAE, ContrastiveEncoder, encoder_bytes
    from enrich_dist.manifest import run_manifest
    from enrich_dist.runtime import ray_session
    from enrich_dist.storage import RunDir

    work = args.work or tempfile.mkdtemp(prefix="enrich-bench-embed-")
    source = args.archive
    if source is None:
        archive = os.path.join(work, f"archive-{args.images}")
        if not os.path.exists(os.path.join(archive, "manifest.csv")):
            make_echo_archive(archive, args.images, 0, progress=False)
        source = os.path.join(archive, "manifest.csv")
    run = RunDir(os.path.join(work, f"run-{time.time_ns()}"))
    t0 = time.perf_counter()
    with ray_session(num_cpus=args.num_cpus) as res:
        ray_init_s = time.perf_counter() - t0
        run_manifest(run, source, ManifestConfig())
        uris = [r["uri"] for r in run.read_table("manifest", columns=["uri", "status"]).to_pylist() if r["status"] == "ok"]
        torch.manual_seed(0)
        model = "contrastive" if args.embedder == "contrastive" else "vae"
        checkpoint = CHECKPOINTS[model]
        network = ContrastiveEncoder() if model == "contrastive" else BetaVAE()
        run.write_bytes(checkpoint, encoder_bytes(network, EncoderConfig()))
        run.write_json(schema.ENCODER_TRAIN_STATS, {"model": model})  # what the embed stage checks it holds
        run.mark_done("encoder", {"model": model})

        def bare_decode() -> float:
            start = time.perf_counter()
            for i in range(0, len(uris), 1024):
                imaging.load_images(uris[i : i + 1024], 64, threads=res.cpus)
            return time.perf_counter() - start

        with PeakMemory() as decode_mem:
            decode_before = bare_decode()
        work_items = pending_shards(run)
        shard_seconds: list[float] = []  # what the actor spent on each shard, from the stage's log records

        class ShardTimes(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if hasattr(record, "shard_seconds"):
                    shard_seconds.append(record.shard_seconds)

        embed_log = logging.getLogger("enrich_dist.embed")
        embed_log.setLevel(logging.INFO)
        embed_log.addHandler(ShardTimes())
        embed_log.propagate = False
        with PeakMemory() as stage_mem:
            t0 = time.perf_counter()
            stats = run_embed(
                run, EmbedConfig(embedder=args.embedder, batch_size=args.batch_size, precision=args.precision)
            )
            stage_s = time.perf_counter() - t0
        decode_after = bare_decode()
        # the actor's own code (decode thread feeding the encoder, shards committed) in this process, no Ray:
        # what the stage would reach without Ray Data's and the actor's overheads
        cfg = EmbedConfig(embedder=args.embedder, batch_size=args.batch_size, precision=args.precision)
        _, cpus, _, device = plan_actors(res, cfg)
        threads, decode_threads = actor_threads(cpus, device, cfg)
        bare_run = RunDir(os.path.join(work, f"bare-{time.time_ns()}"))
        bare_run.write_bytes(checkpoint, run.read_bytes(checkpoint))
        actor = ShardEmbedder(bare_run, cfg, device, threads, decode_threads)
        t0 = time.perf_counter()
        for item in work_items:
            actor.embed_shard(item["shard"], item["ids"], item["uris"])
        actor_s = time.perf_counter() - t0
        decode_s = (decode_before + decode_after) / 2
        n = stats["n_embedded"]
        decode_rate = len(uris) / decode_s
        result = {
            "benchmark": "embed",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "images": n,
            "embedder": args.embedder,
            "precision": args.precision,
            "cpus": res.cpus,
            "gpus": res.gpus,
            "device": stats.get("device"),
            "actors": stats.get("actors"),
            "bare_decode_images_per_s": round(decode_rate, 1),
            "bare_decode_before_after_s": [round(decode_before, 2), round(decode_after, 2)],
            "stage_images_per_s": round(n / stage_s, 1),
            "ratio_stage_to_decode": round((n / stage_s) / decode_rate, 3),
            "ratio_with_ray_start": round((n / (stage_s + ray_init_s)) / decode_rate, 3),
            "actor_shard_seconds": [round(v, 2) for v in shard_seconds],
            "stage_outside_shards_seconds": round(stage_s - sum(shard_seconds), 2),
            "actor_code_no_ray_images_per_s": round(n / actor_s, 1),
            "ratio_actor_code_no_ray_to_decode": round((n / actor_s) / decode_rate, 3),
            "ray_init_seconds": round(ray_init_s, 2),
            "decode_seconds": round(decode_s, 2),
            "stage_seconds": round(stage_s, 2),
            "peak_rss_mb_decode": round(decode_mem.peak / 2**20),
            "peak_rss_mb_stage": round(stage_mem.peak / 2**20),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "ray_worker_niceness": args.worker_niceness,
            "torch": torch.__version__,
            "ray": ray.__version__,
        }
    print(
        f"embed: stage {result['stage_images_per_s']} images/s vs bare decode {result['bare_decode_images_per_s']} "
        f"images/s -> ratio {result['ratio_stage_to_decode']:.2f} (target >= 0.70 on CPU), "
        f"{result['ratio_with_ray_start']:.2f} counting ray.init ({result['ray_init_seconds']} s), "
        f"{result['ratio_actor_code_no_ray_to_decode']:.2f} for the actor's code alone without Ray; "
        f"peak RSS {result['peak_rss_mb_stage']} MB ({result['device']}, {result['actors']} actor(s), {n} images, "
        f"load average {result['load_average_1min']}, Ray worker niceness {args.worker_niceness})"
    )
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
