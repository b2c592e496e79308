"""Embedding stage: Ray Data over manifest shards, an actor pool of encoder replicas, one Parquet shard each."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from . import imaging, schema
from .config import EmbedConfig
from .runtime import Resources, cluster_resources
from .storage import RunDir, shard_name

log = logging.getLogger(__name__)
ERRORS_DIR = f"{schema.EMBEDDINGS_DIR}/errors"


def plan_actors(res: Resources, cfg: EmbedConfig) -> tuple[int, float, float, str]:
    """(actors, cpus per actor, gpus per actor, device) for the cluster; never asks for absent GPUs."""
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"embed device must be auto, cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and res.gpus == 0:
        raise ValueError("embed device 'cuda' requested but the Ray cluster has no GPUs: use --device auto or cpu")
    if res.gpus > 0 and cfg.device != "cpu":
        n = cfg.num_actors or res.gpus
        return min(n, res.gpus), 1.0, 1.0, "cuda"
    n = cfg.num_actors or max(1, res.cpus - 1)
    return max(1, min(n, max(1, res.cpus))), 1.0, 0.0, "cpu"


class ShardEmbedder:
    """A Ray Data actor holding one encoder replica; embeds whole manifest shards and commits them."""

    def __init__(self, run: RunDir, cfg: EmbedConfig, device: str, threads: int):
        import torch

        from .encoder import load_encoder

        torch.set_num_threads(max(1, threads))
        self.run, self.cfg, self.device = run, cfg, device
        self.model = load_encoder(run.read_bytes(f"{schema.ENCODER_DIR}/vae.pt")).to(device).eval()
        self.image_size = self.model.image_size
        self.pool = ThreadPoolExecutor(max_workers=max(1, cfg.decode_threads))

    def _decode(self, uris: list[str]) -> tuple[np.ndarray, list[str | None]]:
        return imaging.load_images(uris, self.image_size, self.run.storage_options, threads=self.cfg.decode_threads)

    def _encode(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(images).unsqueeze(1).to(self.device)
            if self.device == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    mu, _ = self.model.encode(x)
            else:
                mu, _ = self.model.encode(x)
            return mu.float().cpu().numpy()

    def embed_shard(self, shard: int, ids: list[int], uris: list[str]) -> dict:
        """Decode (next batch in threads while this one encodes), encode, normalise, write the shard."""
        start = time.monotonic()
        bs = self.cfg.batch_size
        batches = [(ids[i : i + bs], uris[i : i + bs]) for i in range(0, len(ids), bs)]
        out_ids, out_vecs, err_rows = [], [], []
        pending = self.pool.submit(self._decode, batches[0][1]) if batches else None
        for b, (bids, buris) in enumerate(batches):
            images, errors = pending.result()
            if b + 1 < len(batches):
                pending = self.pool.submit(self._decode, batches[b + 1][1])
            ok = np.array([e is None for e in errors], dtype=bool)
            for i in np.flatnonzero(~ok):
                err_rows.append((bids[i], buris[i], errors[i]))
            if ok.any():
                mu = self._encode(images[ok])
                norms = np.linalg.norm(mu, axis=1)
                good = norms > 0
                kept_ids = np.asarray(bids)[ok]
                for i in np.flatnonzero(~good):
                    err_rows.append((int(kept_ids[i]), buris[int(np.flatnonzero(ok)[i])], "zero-norm embedding"))
                out_ids.append(kept_ids[good])
                out_vecs.append((mu[good] / norms[good, None]).astype(np.float32))
        dim = self.model.latent_dim
        vecs = np.concatenate(out_vecs) if out_vecs else np.zeros((0, dim), np.float32)
        emb_ids = np.concatenate(out_ids).astype(np.int64) if out_ids else np.zeros(0, np.int64)
        if err_rows:
            err_ids, err_uris, err_msgs = zip(*err_rows, strict=True)
            self.run.write_table(
                f"{ERRORS_DIR}/{shard_name(shard)}",
                pa.table({"image_id": list(err_ids), "uri": list(err_uris), "error": list(err_msgs)}, schema=schema.EMBED_ERRORS),
            )
        table = pa.table(
            {
                "image_id": pa.array(emb_ids, pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim),
            },
            schema=schema.embeddings_schema(dim),
        )
        self.run.write_table(f"{schema.EMBEDDINGS_DIR}/{shard_name(shard)}", table)
        return {"shard": shard, "n": len(emb_ids), "n_errors": len(err_rows), "seconds": time.monotonic() - start}

    def __call__(self, batch: dict) -> dict:
        stats = [
            self.embed_shard(int(s), list(i), list(u))
            for s, i, u in zip(batch["shard"], batch["ids"], batch["uris"], strict=True)
        ]
        return {key: np.array([s[key] for s in stats]) for key in ("shard", "n", "n_errors", "seconds")}


def pending_shards(run: RunDir) -> list[dict]:
    """Manifest shards whose embedding shard is not committed yet, with their ok rows."""
    done = set(run.shards(schema.EMBEDDINGS_DIR))
    work = []
    for index, path in run.shards(schema.MANIFEST_DIR).items():
        if index in done:
            continue
        part = run.read_table(path, columns=["image_id", "uri", "status"])
        part = part.filter(pc.equal(part.column("status"), "ok"))
        work.append({"shard": index, "ids": part.column("image_id").to_pylist(), "uris": part.column("uri").to_pylist()})
    return work


def run_embed(run: RunDir, cfg: EmbedConfig) -> dict:
    """Embed every ok manifest row into ``embeddings/part-NNNNN.parquet``; committed shards are skipped."""
    if run.is_done(schema.EMBEDDINGS_DIR):
        stats = run.read_json(f"{schema.EMBEDDINGS_DIR}/_SUCCESS")
        log.info("embed: already complete (%d embeddings), skipping", stats["n_embedded"])
        return stats
    run.require(schema.MANIFEST_DIR, "manifest --input SRC")
    run.require(schema.ENCODER_DIR, "train-encoder")
    start = time.monotonic()
    run.remove_stale_tmp(schema.EMBEDDINGS_DIR)
    work = pending_shards(run)
    n_shards = len(run.shards(schema.MANIFEST_DIR))
    res = cluster_resources()
    n_actors, cpus, gpus, device = plan_actors(res, cfg)
    n_actors = max(1, min(n_actors, len(work)))
    threads = max(1, res.cpus // n_actors) if device == "cpu" else 2
    log.info(
        "embed: %d of %d shards to do, %d %s actor(s), batch %d",
        len(work), n_shards, n_actors, device.upper(), cfg.batch_size,
    )
    done_images = 0
    if work:
        total_images = sum(len(w["ids"]) for w in work)
        ds = ray.data.from_items(work, override_num_blocks=len(work)).map_batches(
            ShardEmbedder,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_cpus=cpus,
            num_gpus=gpus,
            fn_constructor_kwargs={
                "run": run, "cfg": cfg, "device": device, "threads": threads,
            },
        )
        for row in ds.iter_rows():
            done_images += int(row["n"]) + int(row["n_errors"])
            rate = done_images / max(time.monotonic() - start, 1e-9)
            log.info(
                "embed: shard %d done (%d images, %d errors); %d/%d images, %.0f images/s",
                row["shard"], row["n"], row["n_errors"], done_images, total_images, rate,
            )
    emb = run.read_table(schema.EMBEDDINGS_DIR, columns=["image_id"])
    errors = run.read_table(ERRORS_DIR).num_rows if run.shards(ERRORS_DIR) else 0
    stats = {
        "n_embedded": emb.num_rows,
        "n_errors": errors,
        "n_shards": n_shards,
        "device": device,
        "actors": n_actors,
        "seconds": round(time.monotonic() - start, 3),
    }
    if len(run.shards(schema.EMBEDDINGS_DIR)) != n_shards:
        raise RuntimeError(f"embed: only {len(run.shards(schema.EMBEDDINGS_DIR))} of {n_shards} shards committed")
    run.mark_done(schema.EMBEDDINGS_DIR, stats)
    log.info("embed: %d embeddings, %d errors in %.1fs", stats["n_embedded"], errors, stats["seconds"])
    return stats
