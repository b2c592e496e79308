"""Benchmark: does each embedder see an archive's own redundancy? Sibling recall per embedder and image set.

Sibling recall@1 is the share of images (among those whose clip has another image) whose most
similar other image, by cosine of the embedding, is a frame of the same clip; recall@k the mean share
of an image's possible siblings found among its k nearest (``enrich_dist.similarity.siblings``). No
embedder but ``contrastive+clips`` is given the clip ids. Sets (``enrich_dist.datasets.clips``):

- ``echo``: the synthetic fetal-echo archive with realistic frame-to-frame change (cardiac motion,
  probe drift of a few pixels, gain changes, fresh speckle per frame);
- ``digits``: scikit-learn's 1,797 real 8x8 digits at 64x64, each made into a clip by small shifts,
  rotations, gain changes and noise;
- ``cine``: deid-data's real echo cine DICOMs (their frames must find each other) among distractors.

Embedders: ``pixels`` (16x16 block means, mean-centred), ``vae`` (the paper's beta-VAE),
``contrastive`` and ``contrastive+clips`` (half of its pairs two frames of one clip), all trained with the package defaults on a seeded sample of the set (``--sample``,
as the train-encoder stage does) for ``--epochs`` epochs on this machine's CPUs. Prints a table and
appends one JSON line per (set, embedder) to ``--out``:

    python -m benchmarks.redundancy --out benchmarks/results/redundancy.jsonl
    python -m benchmarks.redundancy --sets digits --embedders pixels,contrastive --epochs 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from datetime import datetime, timezone

import numpy as np
import torch

from benchmarks.similarity import source_version
from enrich_dist.config import EncoderConfig, resolve_size
from enrich_dist.datasets import clips
from enrich_dist.embed import PixelEmbedder
from enrich_dist.encoder import ENCODER_MODELS, embed_images, train_encoder_model
from enrich_dist.similarity.siblings import sibling_recall_from_embeddings

log = logging.getLogger("benchmarks.redundancy")
SETS = ("echo", "digits", "cine")
EMBEDDERS = ("pixels", "vae", "contrastive", "contrastive+clips")
TOP_K = 10


def load_set(name: str, args: argparse.Namespace) -> clips.ClipSet:
    """The named image set, made into clips."""
    if name == "echo":
        return clips.echo_clips(args.echo_images, profile=args.echo_profile, seed=args.seed)
    if name == "digits":
        return clips.digits_clips(args.digits_frames, seed=args.seed)
    if name == "cine":
        return clips.deid_cine_frames()
    raise ValueError(f"unknown set {name!r}; known: {', '.join(SETS)}")


def embed(name: str, data: clips.ClipSet, cfg: EncoderConfig) -> tuple[np.ndarray, dict]:
    """(L2-normalised embeddings, info) of the set's images by the named embedder, trained here when it needs training.

    ``contrastive+clips`` is the contrastive encoder with half of its pairs from two frames of one clip
    at most 2 apart (``clip_positives`` 0.5): the only embedder here that is given the clip ids.
    """
    images = data.images
    if name == "pixels":
        vectors = PixelEmbedder(16)(images)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12), {}
    extra = {}
    if name == "contrastive+clips":
        name, cfg = "contrastive", dataclasses.replace(cfg, clip_positives=0.5, clip_window=2)
    if name not in ENCODER_MODELS:
        raise ValueError(f"unknown embedder {name!r}; known: {', '.join(EMBEDDERS)}")
    n = resolve_size(cfg.sample, len(images))
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(images), size=n, replace=False))
    if cfg.clip_positives > 0:
        extra["clips"] = (data.clip_ids[pick].astype(object), data.frames[pick].astype(object))
    start = time.perf_counter()
    model, history = train_encoder_model(images[pick], cfg, model=name, log_every=10**9, **extra)
    seconds = time.perf_counter() - start
    return embed_images(model, images), {"train_images": n, "train_seconds": round(seconds, 1), "epochs": cfg.epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--embedders", default=",".join(EMBEDDERS))
    parser.add_argument("--echo-images", type=int, default=3000)
    parser.add_argument("--echo-profile", default="uniform", choices=["uniform", "uneven"])
    parser.add_argument("--digits-frames", type=int, default=5)
    parser.add_argument("--sample", default="5000", help="training sample per set (count or fraction), as the stage's")
    parser.add_argument("--epochs", type=int, default=EncoderConfig.epochs)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: this machine's cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="append JSON lines here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(EncoderConfig(), sample=args.sample, epochs=args.epochs, seed=args.seed, device="cpu")
    rows = []
    for set_name in args.sets.split(","):
        data = load_set(set_name, args)
        for embedder in args.embedders.split(","):
            vectors, info = embed(embedder, data, cfg)
            recall = sibling_recall_from_embeddings(vectors, data.clip_ids, TOP_K)
            row = {
                "benchmark": "redundancy",
                "set": set_name,
                "embedder": embedder,
                "n_images": len(data.images),
                "n_clips": len(set(data.clip_ids)),
                **(recall or {"at_1": None, "at_k": None}),
                **info,
                "threads": args.threads,
                "commit": source_version(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            rows.append(row)
            log.info("%s / %s: recall@1 %s, recall@%d %s %s", set_name, embedder, row["at_1"], TOP_K, row["at_k"], info)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print(f"{'set':<8} {'embedder':<12} {'images':>7} {'recall@1':>9} {'recall@10':>10} {'train s':>8}")
    for r in rows:
        at_1 = "-" if r["at_1"] is None else f"{r['at_1']:.3f}"
        at_k = "-" if r["at_k"] is None else f"{r['at_k']:.3f}"
        print(f"{r['set']:<8} {r['embedder']:<12} {r['n_images']:>7} {at_1:>9} {at_k:>10} {r.get('train_seconds', '-')!s:>8}")


if __name__ == "__main__":
    main()
