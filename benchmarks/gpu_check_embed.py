"""GPU check of the encoder and embedding stage: training speed, embedding throughput, mixed-precision error.

One run, one JSON file (``gpu_embed.json`` in ``--out``), all on a synthetic echo archive made in a
temporary folder:

1. bare decode + crop + resize of every image with ``--decode-threads`` threads (images/s);
2. the beta-VAE trained on the GPU by the stage's own ``train_vae`` for ``--epochs`` epochs (early stopping as in the stage) on a
   seeded ``--sample`` of the images: seconds per epoch, final KL, active latent dimensions and
   reconstruction error against the mean image (``encoder_quality``);
3. the whole embedding of every image by the stage's own ``ShardEmbedder`` (decode threads feeding
   the GPU, Parquet shards committed), in fp32 twice (determinism) and with the mixed precision the
   stage uses on GPU (bf16 autocast) and fp16: images/s, and the largest absolute difference and
   smallest cosine between fp32 and mixed-precision embeddings;
4. the bare model forward (``EncoderEmbedder.forward``) on images already on the GPU, per precision.

Needs only torch with CUDA, numpy, pyarrow, pillow and fsspec (no Ray): run from the repository root
as ``PYTHONPATH=. python benchmarks/gpu_check_embed.py --out DIR``. Without CUDA it fails with exit
status 1 and says so; it never skips. ``--device cpu --dry-run`` runs the same code on the CPU with
tiny sizes (what the unit test does, so this script cannot rot).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from enrich_dist import imaging, schema
from enrich_dist.config import EmbedConfig, EncoderConfig
from enrich_dist.datasets import make_echo_archive
from enrich_dist.embed import EncoderEmbedder, PixelEmbedder, ShardEmbedder
from enrich_dist.encoder import CHECKPOINT, encoder_bytes, train_vae
from enrich_dist.encoder.train import embed_images, encoder_quality, load_encoder, validation_split
from enrich_dist.storage import RunDir

SHARD = 4096  # images per committed shard, as the manifest stage's default shard_size


def require_cuda() -> str:
    """The CUDA device name; raises when torch sees no CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "CUDA is not available to torch on this machine: the GPU embedding check needs an NVIDIA GPU and a "
            f"CUDA build of torch (torch {torch.__version__}, CUDA {torch.version.cuda}); use --device cpu --dry-run "
            "only to test this script"
        )
    return torch.cuda.get_device_name(0)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_archive(archive: str) -> list[str]:
    """Absolute paths of the archive's images, in manifest order."""
    return [os.path.join(archive, row["uri"]) for row in read_rows(archive)]


def read_rows(archive: str) -> list[dict]:
    """The synthetic archive's manifest rows (uri, patient_id, clip_id, label, ...), in order."""
    with open(os.path.join(archive, "manifest.csv"), newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def label_agreement(vectors: np.ndarray, labels: np.ndarray, patients: np.ndarray, device: str) -> float:
    """Share of images whose most similar image of ANOTHER patient has the same label (view).

    A check of what an embedding captures, using the synthetic archive's labels (the product never
    uses labels to embed or select): frames of one clip are near-duplicates, so neighbors from the
    same patient are excluded.
    """
    x = torch.as_tensor(np.ascontiguousarray(vectors, np.float32), device=device)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    _, pat = np.unique(patients, return_inverse=True)
    pat_t = torch.as_tensor(pat, device=device)
    hits = 0
    for first in range(0, len(x), 2048):
        s = x[first : first + 2048] @ x.T
        s[pat_t[first : first + 2048, None] == pat_t[None, :]] = -2.0
        nn = s.argmax(dim=1).cpu().numpy()
        hits += int((labels[nn] == labels[first : first + 2048]).sum())
    return round(hits / len(x), 4)


def bare_decode(uris: list[str], threads: int) -> tuple[np.ndarray, float]:
    """Every image decoded, cropped and resized to 64x64 (the stage's own function); images and seconds."""
    start = time.perf_counter()
    parts = []
    for first in range(0, len(uris), 1024):
        images, errors = imaging.load_images(uris[first : first + 1024], 64, threads=threads)
        bad = [e for e in errors if e is not None]
        if bad:
            raise RuntimeError(f"{len(bad)} images of the synthetic archive failed to decode: {bad[0]}")
        parts.append(images)
    return np.concatenate(parts), time.perf_counter() - start


def train(images: np.ndarray, cfg: EncoderConfig, device: str) -> tuple[bytes, dict]:
    """The stage's training on ``device``; checkpoint bytes and the timings and quality to record."""
    model, history = train_vae(images, cfg, log_every=10**9, device=device)
    train_idx, val_idx = validation_split(len(images), cfg.seed)
    quality = encoder_quality(model, images[val_idx], images[train_idx].mean(axis=0))
    seconds = history["seconds"]
    return encoder_bytes(model, cfg), {
        "device": history["device"],
        "n_train": history["n_train"],
        "n_val": history["n_val"],
        "epochs_run": len(seconds),
        "seconds_per_epoch": round(float(np.mean(seconds[1:] if len(seconds) > 1 else seconds)), 4),
        "first_epoch_seconds": round(seconds[0], 4),
        "final_train_kl": round(history["train_kl"][-1], 4),
        "final_val_recon": round(history["val_recon"][-1], 3) if history["val_recon"] else None,
        "best_epoch": history["best_epoch"],
        **{k: v for k, v in quality.items() if not k.endswith("_per_dim")},
        "history": {k: [round(v, 3) for v in history[k]] for k in ("train_kl", "train_recon", "val_recon", "val_kl")},
    }


def stage_embed(
    root: str, ckpt: bytes, uris: list[str], precision: str, device: str, batch: int, decode_threads: int
) -> tuple[np.ndarray, float]:
    """The stage's actor code (decode thread feeding the encoder, shards committed) over every image, without Ray."""
    run = RunDir(root)
    run.write_bytes(CHECKPOINT, ckpt)
    cfg = EmbedConfig(embedder="vae", batch_size=batch, decode_threads=decode_threads, precision=precision)
    actor = ShardEmbedder(run, cfg, device, threads=1 if device.startswith("cuda") else decode_threads)
    actor.embedder(np.zeros((min(batch, 8), 64, 64), np.float32))  # warm-up: CUDA context, kernels
    sync(device)
    start = time.perf_counter()
    for shard, first in enumerate(range(0, len(uris), SHARD)):
        chunk = uris[first : first + SHARD]
        stats = actor.embed_shard(shard, list(range(first, first + len(chunk))), chunk)
        if stats["n_errors"]:
            raise RuntimeError(f"embedding shard {shard} recorded {stats['n_errors']} errors")
    sync(device)
    seconds = time.perf_counter() - start
    table = run.read_table(schema.EMBEDDINGS_DIR)
    order = np.argsort(table.column("image_id").to_numpy())
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten().to_numpy()).reshape(table.num_rows, -1)
    return vectors[order], seconds


def bare_forward(root: str, images: np.ndarray, precision: str, device: str, batch: int, repeats: int) -> float:
    """images/s of ``EncoderEmbedder.forward`` alone on batches already on the device (best of ``repeats``)."""
    embedder = EncoderEmbedder(RunDir(root), device, precision)
    x = torch.from_numpy(images).to(device)
    embedder.forward(x[:batch])
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for first in range(0, len(x), batch):
            embedder.forward(x[first : first + batch])
        sync(device)
        best = min(best, time.perf_counter() - start)
    return len(x) / best


def compare(ref: np.ndarray, other: np.ndarray) -> dict:
    """Largest absolute difference and smallest cosine between matching unit rows."""
    cos = np.sum(ref.astype(np.float64) * other.astype(np.float64), axis=1)
    return {"max_abs_diff": float(np.max(np.abs(ref - other))), "min_cosine": float(cos.min()),
            "mean_cosine": float(cos.mean())}


def write_json(path: str, result: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_embed.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes (with --device cpu: test this script)")
    parser.add_argument("--images", type=int, default=8000, help="synthetic images (default 8000)")
    parser.add_argument("--sample", type=int, default=5000, help="images the encoder trains on (default 5000)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs at most (default 30)")
    parser.add_argument("--batch-size", type=int, default=256, help="embedding batch (default 256)")
    parser.add_argument("--decode-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--long-epochs", type=int, default=0,
                        help="also train the default objective this many epochs (0: skip) and report its quality")
    parser.add_argument("--work", help="folder for the archive and runs (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.images, args.sample, args.epochs, args.batch_size = min(args.images, 48), min(args.sample, 40), 2, 16
        args.long_epochs = min(args.long_epochs, 3)
    try:
        name = require_cuda() if args.device == "cuda" else platform.processor() or "cpu"
    except RuntimeError as exc:
        print(f"gpu_check_embed: {exc}", file=sys.stderr)
        return 1
    device = args.device
    os.makedirs(args.out, exist_ok=True)
    work = args.work or tempfile.mkdtemp(prefix="enrich-gpu-embed-")
    t_all = time.perf_counter()
    result: dict = {
        "check": "gpu_embed", "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": device, "device_name": name,
        "dry_run": args.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
        "decode_threads": args.decode_threads, "batch_size": args.batch_size,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_precision": torch.get_float32_matmul_precision(),
    }
    path = os.path.join(args.out, "gpu_embed.json")
    try:
        t0 = time.perf_counter()
        archive = os.path.join(work, "archive")
        make_echo_archive(archive, args.images, 0, workers=1 if args.dry_run else os.cpu_count(), progress=False)
        rows = read_rows(archive)
        uris = [os.path.join(archive, row["uri"]) for row in rows]
        labels = np.array([row["label"] for row in rows])
        patients = np.array([row["patient_id"] for row in rows])
        result["archive"] = {"images": len(uris), "seconds": round(time.perf_counter() - t0, 2)}

        images, decode_s = bare_decode(uris, args.decode_threads)
        result["bare_decode_images_per_s"] = round(len(uris) / decode_s, 1)

        cfg = EncoderConfig(epochs=args.epochs, sample=args.sample, seed=0)
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(images), size=min(args.sample, len(images)),
                                                               replace=False))
        ckpt, result["train"] = train(images[pick], cfg, device)
        if device == "cuda":
            result["train"]["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        # the other objective, same data and epochs: does either learn more than the mean image?
        other = "beta" if cfg.objective == "capacity" else "capacity"
        result["train_other_objective"] = {"objective": other,
                                           **train(images[pick], dataclasses.replace(cfg, objective=other), device)[1]}

        precisions = ["fp32", "bf16", "fp16"] if device == "cuda" else ["fp32"]
        embeddings: dict[str, np.ndarray] = {}
        result["stage_images_per_s"], result["forward_images_per_s"] = {}, {}
        for i, precision in enumerate([precisions[0], *precisions]):
            key = precision if i else "fp32_first"
            vectors, seconds = stage_embed(
                os.path.join(work, f"run-{key}"), ckpt, uris, precision, device, args.batch_size, args.decode_threads
            )
            embeddings[key] = vectors
            result["stage_images_per_s"][key] = round(len(uris) / seconds, 1)
        for precision in precisions:
            result["forward_images_per_s"][precision] = round(
                bare_forward(os.path.join(work, "run-fp32"), images, precision, device, args.batch_size, 3), 1
            )
        if device == "cuda":  # how much a larger batch would give the model alone
            result["forward_images_per_s"]["bf16_batch_2048"] = round(
                bare_forward(os.path.join(work, "run-fp32"), images, "bf16", device, 2048, 3), 1
            )
        ref = embeddings["fp32"]
        norms = np.linalg.norm(ref, axis=1)
        result["embedding"] = {
            "n": len(ref), "dim": int(ref.shape[1]), "max_norm_error": float(np.max(np.abs(norms - 1))),
            "fp32_deterministic": bool(np.array_equal(embeddings["fp32_first"], ref)),
            **{f"fp32_vs_{p}": compare(ref, embeddings[p]) for p in precisions[1:]},
        }
        # what the embeddings capture: same-view neighbor across patients (labels used only here)
        pixels = PixelEmbedder(16)(images)
        result["label_agreement"] = {
            "vae_" + cfg.objective: label_agreement(ref, labels, patients, device),
            "pixels_16": label_agreement(pixels, labels, patients, device),
            "chance": round(float(sum((labels == v).mean() ** 2 for v in np.unique(labels))), 4),
        }
        if args.long_epochs:
            long_cfg = dataclasses.replace(cfg, epochs=args.long_epochs)
            long_ckpt, result["train_long"] = train(images[pick], long_cfg, device)
            model = load_encoder(long_ckpt)
            result["label_agreement"][f"vae_{cfg.objective}_{args.long_epochs}_epochs"] = label_agreement(
                embed_images(model, images, device=device), labels, patients, device)
        stage = result["stage_images_per_s"]["bf16" if device == "cuda" else "fp32"]
        result["stage_to_decode_ratio"] = round(stage / result["bare_decode_images_per_s"], 3)
        if device == "cuda":
            result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    except Exception:
        # keep what was measured: a GPU run is expensive to repeat
        result["error"] = traceback.format_exc()
        result["seconds"] = round(time.perf_counter() - t_all, 1)
        write_json(path, result)
        print(f"gpu_check_embed FAILED after {result['seconds']} s (partial results in {path}):\n{result['error']}",
              file=sys.stderr)
        return 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    write_json(path, result)
    t, e = result["train"], result["embedding"]
    mixed = {k: v for k, v in e.items() if k.startswith("fp32_vs_")}
    print(f"gpu_check_embed on {name} ({device}, {len(uris)} images, {result['seconds']} s):")
    print(f"  train ({cfg.objective}): {t['seconds_per_epoch']} s/epoch over {t['n_train']} images, {t['epochs_run']} epochs, "
          f"KL {t['kl_nats']:.2f} nats, {t['active_dims']} active dims, recon/mean {t['recon_to_mean_ratio']:.3f}"
          f"{' COLLAPSED' if t['collapsed'] else ''}")
    o = result["train_other_objective"]
    print(f"  {o['objective']} objective instead: KL {o['kl_nats']:.2f} nats, {o['active_dims']} active dims, "
          f"recon/mean {o['recon_to_mean_ratio']:.3f}{' COLLAPSED' if o['collapsed'] else ''}")
    print(f"  images/s: bare decode {result['bare_decode_images_per_s']}, whole stage {result['stage_images_per_s']}, "
          f"bare forward {result['forward_images_per_s']} (stage/decode {result['stage_to_decode_ratio']})")
    print(f"  fp32 deterministic: {e['fp32_deterministic']}; " + "; ".join(
        f"{k[8:]}: max|diff| {v['max_abs_diff']:.2e}, min cos {v['min_cosine']:.6f}" for k, v in mixed.items()))
    print(f"  label agreement of the nearest other-patient image: {result['label_agreement']}")
    if "train_long" in result:
        t = result["train_long"]
        print(f"  long training: {t['epochs_run']} epochs (best {t['best_epoch']}), KL {t['kl_nats']:.2f} nats, "
              f"{t['active_dims']} active dims, recon/mean {t['recon_to_mean_ratio']:.3f}{' COLLAPSED' if t['collapsed'] else ''}")
    print(f"  written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
