"""Train the beta-VAE on a sample of the archive, save it, and embed images with its encoder mean."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import posixpath
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from .. import imaging
from ..config import EncoderConfig, resolve_size
from ..schema import ENCODER_DIR, MANIFEST_DIR
from ..storage import DONE_NAME, RunDir
from .model import BetaVAE, vae_loss

log = logging.getLogger("enrich_dist.encoder")

CHECKPOINT = posixpath.join(ENCODER_DIR, "vae.pt")
TRAIN_STATS = posixpath.join(ENCODER_DIR, "train.json")
RECONSTRUCTIONS = posixpath.join(ENCODER_DIR, "reconstructions.png")
CHECKPOINT_FORMAT = 1
VAL_FRACTION = 0.1
MIN_IMAGES_FOR_VAL = 20
PATIENCE = 5
GRID_IMAGES = 8
MAX_LISTED_FAILURES = 20
LOSSES = ("total", "recon", "kl")


def validation_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices: a seeded 10 % validation slice when n >= 20, else no validation."""
    if n < MIN_IMAGES_FOR_VAL:
        return np.arange(n), np.arange(0)
    n_val = max(1, int(round(VAL_FRACTION * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic torch algorithms and a private, restored RNG state for the duration."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _check_images(images: np.ndarray, size: int) -> np.ndarray:
    """Images as a C-contiguous float32 (N, size, size) array, or a ValueError saying what is wrong."""
    arr = np.ascontiguousarray(images, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1:] != (size, size):
        raise ValueError(f"expected images of shape (N, {size}, {size}), got {arr.shape}")
    return arr


def _weight(cfg: EncoderConfig) -> float:
    return cfg.gamma if cfg.objective == "capacity" else cfg.beta


def capacity_schedule(cfg: EncoderConfig, epoch: int) -> tuple[float | None, float | None]:
    """KL target at the start and end of ``epoch`` (1-based): 0 -> capacity over the first 3/4 of epochs."""
    if cfg.objective == "beta":
        return None, None
    if cfg.objective != "capacity":
        raise ValueError(f"encoder objective must be 'capacity' or 'beta', got {cfg.objective!r}")
    ramp = max(1, math.ceil(0.75 * cfg.epochs))
    return cfg.capacity * min(1.0, (epoch - 1) / ramp), cfg.capacity * min(1.0, epoch / ramp)


def _train_epoch(
    model: BetaVAE,
    optimizer: torch.optim.Optimizer,
    data: torch.Tensor,
    order: torch.Tensor,
    cfg: EncoderConfig,
    capacity: tuple[float | None, float | None],
) -> np.ndarray:
    """One pass over ``data[order]`` in mini-batches; mean per-image (total, recon, KL)."""
    model.train()
    sums = np.zeros(len(LOSSES))
    c0, c1 = capacity
    for first in range(0, len(order), cfg.batch_size):
        xb = data[order[first : first + cfg.batch_size]]
        logits, mu, logvar = model(xb)
        c = None if c0 is None else c0 + (c1 - c0) * first / len(order)
        losses = vae_loss(logits, xb, mu, logvar, _weight(cfg), c)
        optimizer.zero_grad(set_to_none=True)
        losses[0].backward()
        optimizer.step()
        sums += [v.item() * len(xb) for v in losses]
    return sums / len(order)


def _evaluate(model: BetaVAE, data: torch.Tensor, cfg: EncoderConfig) -> np.ndarray:
    """Mean per-image (total, recon, KL) of held-out images, z sampled as in training."""
    model.eval()
    sums = np.zeros(len(LOSSES))
    with torch.inference_mode():
        for first in range(0, len(data), cfg.batch_size):
            xb = data[first : first + cfg.batch_size]
            mu, logvar = model.encode(xb)
            losses = vae_loss(
                model.decode(model.sample(mu, logvar)), xb, mu, logvar, _weight(cfg), capacity_schedule(cfg, cfg.epochs)[1]
            )
            sums += [v.item() * len(xb) for v in losses]
    return sums / len(data)


def train_vae(images: np.ndarray, cfg: EncoderConfig, log_every: int = 1) -> tuple[BetaVAE, dict]:
    """Fit a seeded beta-VAE on CPU to float32 (N, S, S) images in [0, 1]; returns the best model and history."""
    data = torch.from_numpy(_check_images(images, cfg.image_size))
    if len(data) == 0:
        raise ValueError("no images to train the encoder on")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    train_idx, val_idx = validation_split(len(data), cfg.seed)
    val_data = data[torch.from_numpy(val_idx)]
    monitor = "val_total" if len(val_idx) else "train_total"
    history: dict = {"n_train": len(train_idx), "n_val": len(val_idx), "monitor": monitor, "epoch": []}
    history.update({f"{part}_{name}": [] for part in ("train", "val") for name in LOSSES}, seconds=[])
    log.info(
        "training beta-VAE (latent %d, %s) on %d images, %d held out, up to %d epochs",
        cfg.latent_dim,
        f"capacity {cfg.capacity:g} nats, gamma {cfg.gamma:g}" if cfg.objective == "capacity" else f"beta {cfg.beta:g}",
        *(len(train_idx), len(val_idx), cfg.epochs),
    )
    shuffle_rng = np.random.default_rng([cfg.seed, 1])
    best_loss, best_epoch, best_state = math.inf, 0, {}
    with _deterministic():
        torch.manual_seed(cfg.seed)
        model = BetaVAE(cfg.latent_dim, cfg.image_size)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            order = torch.from_numpy(shuffle_rng.permutation(train_idx))
            schedule = capacity_schedule(cfg, epoch)
            results = {"train": _train_epoch(model, optimizer, data, order, cfg, schedule)}
            if len(val_idx):
                results["val"] = _evaluate(model, val_data, cfg)
            history["epoch"].append(epoch)
            for part, values in results.items():
                for name, value in zip(LOSSES, values, strict=True):
                    history[f"{part}_{name}"].append(float(value))
            history["seconds"].append(time.perf_counter() - start)
            current = history[monitor][-1]
            if not math.isfinite(current):
                raise FloatingPointError(
                    f"beta-VAE training diverged at epoch {epoch} ({monitor} {current}): lower the learning rate"
                )
            if current < best_loss:
                best_loss, best_epoch = current, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            annealing = schedule[1] is not None and schedule[1] < cfg.capacity
            stop = not annealing and epoch - best_epoch >= PATIENCE
            if epoch % log_every == 0 or stop or epoch == cfg.epochs:
                log.info(
                    "epoch %d/%d: train %.1f (recon %.1f, kl %.2f)%s, %.1fs",
                    *(epoch, cfg.epochs, *results["train"]),
                    f", val {results['val'][0]:.1f}" if len(val_idx) else "",
                    history["seconds"][-1],
                )
            if stop:
                log.info("early stop: %s has not improved for %d epochs", monitor, PATIENCE)
                break
    model.load_state_dict(best_state)
    model.eval()
    history.update(best_epoch=best_epoch, best_loss=best_loss, stopped_early=epoch < cfg.epochs)
    return model, history


def encoder_bytes(model: BetaVAE, cfg: EncoderConfig) -> bytes:
    """A checkpoint (state_dict + plain config) that ``torch.load(..., weights_only=True)`` reads."""
    config = {
        "latent_dim": int(model.latent_dim),
        "image_size": int(model.image_size),
        "objective": cfg.objective,
        "beta": float(cfg.beta),
        "capacity": float(cfg.capacity),
        "gamma": float(cfg.gamma),
        "seed": int(cfg.seed),
        "epochs": int(cfg.epochs),
        "batch_size": int(cfg.batch_size),
        "learning_rate": float(cfg.learning_rate),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "state_dict": state}, buf)
    return buf.getvalue()


def load_encoder(data: bytes) -> BetaVAE:
    """The model saved by :func:`encoder_bytes`, on CPU and in eval mode."""
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not an enrich_dist encoder checkpoint (format {CHECKPOINT_FORMAT} expected)")
    config = ckpt["config"]
    model = BetaVAE(int(config["latent_dim"]), int(config["image_size"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def embed_images(
    model: BetaVAE, images: np.ndarray, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    """L2-normalised float32 encoder means (N, latent_dim) of (N, S, S) images; moves the model to ``device``."""
    arr = _check_images(images, model.image_size)
    out = np.empty((len(arr), model.latent_dim), dtype=np.float32)
    model.eval().to(device)
    with torch.inference_mode():
        for start in range(0, len(arr), batch_size):
            mu, _ = model.encode(torch.from_numpy(arr[start : start + batch_size]).to(device))
            out[start : start + len(mu)] = mu.float().cpu().numpy()
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    bad = ~(np.isfinite(norms[:, 0]) & (norms[:, 0] > 0))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {len(arr)} embeddings have zero or non-finite norm")
    return out / norms


def reconstruction_grid(model: BetaVAE, images: np.ndarray) -> bytes:
    """PNG of images (top row) over their reconstructions from z = mu (bottom row)."""
    arr = _check_images(images, model.image_size)
    model.eval()
    with torch.inference_mode():
        recon = torch.sigmoid(model(torch.from_numpy(arr))[0])[:, 0].cpu().numpy()
    n, size, gap = len(arr), model.image_size, 2
    canvas = np.ones((2 * size + 3 * gap, n * (size + gap) + gap), dtype=np.float32)
    for i in range(n):
        left = gap + i * (size + gap)
        canvas[gap : gap + size, left : left + size] = arr[i]
        canvas[2 * gap + size : 2 * gap + 2 * size, left : left + size] = recon[i]
    buf = io.BytesIO()
    Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sample_manifest(run: RunDir, cfg: EncoderConfig) -> tuple[np.ndarray, list[str], list[int | None]]:
    """Image ids (sorted), URIs and frames (None: a single image) of a seeded sample of the manifest's ok rows."""
    try:
        table = run.read_table(MANIFEST_DIR, columns=["image_id", "uri", "frame", "status"])
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest in {run.uri}: run `enrich manifest` first") from None
    ok = np.asarray(table["status"].to_pylist(), dtype=object) == "ok"
    ids = table["image_id"].to_numpy()[ok]
    uris = np.asarray(table["uri"].to_pylist(), dtype=object)[ok]
    frames = np.asarray(table["frame"].to_pylist(), dtype=object)[ok]
    order = np.argsort(ids, kind="stable")
    ids, uris, frames = ids[order], uris[order], frames[order]
    n = resolve_size(cfg.sample, len(ids))
    if n == 0:
        raise ValueError(
            f"nothing to train the encoder on: {len(ids)} readable images in {run.uri}, sample {cfg.sample!r}"
        )
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(ids), size=n, replace=False))
    return ids[pick], uris[pick].tolist(), frames[pick].tolist()


def run_train_encoder(run: RunDir, cfg: EncoderConfig) -> dict:
    """Stage: fit the encoder on a sample of the archive and write ``encoder/``; skipped when already done."""
    if run.is_done(ENCODER_DIR):
        log.info("encoder already trained in %s: skipping", run.uri_of(ENCODER_DIR))
        return run.read_json(posixpath.join(ENCODER_DIR, DONE_NAME))
    start = time.perf_counter()
    ids, uris, frames = sample_manifest(run, cfg)
    images, errors = imaging.load_images(
        uris, cfg.image_size, run.storage_options, frames=frames, nifti_axis=imaging.manifest_nifti_axis(run)
    )
    keep = np.array([e is None for e in errors], dtype=bool)
    failures = [{"image_id": int(ids[i]), "uri": uris[i], "error": errors[i]} for i in np.flatnonzero(~keep)]
    if failures:
        log.warning(
            "%d of %d sampled images failed to decode (first: %s: %s)",
            len(failures),
            len(uris),
            failures[0]["uri"],
            failures[0]["error"],
        )
    if not keep.any():
        raise ValueError(
            f"none of the {len(uris)} sampled images could be decoded; first error: {failures[0]['error']}"
        )
    images = images[keep]
    model, history = train_vae(images, cfg)
    train_idx, val_idx = validation_split(len(images), cfg.seed)
    shown = (val_idx if len(val_idx) else train_idx)[:GRID_IMAGES]
    run.write_bytes(CHECKPOINT, encoder_bytes(model, cfg))
    run.write_bytes(RECONSTRUCTIONS, reconstruction_grid(model, images[shown]))
    stats = {
        "n_sampled": len(uris),
        "n_failed": len(failures),
        "n_train": history["n_train"],
        "n_val": history["n_val"],
        "epochs_run": len(history["epoch"]),
        "best_epoch": history["best_epoch"],
        "best_loss": history["best_loss"],
        "monitor": history["monitor"],
        "seconds": time.perf_counter() - start,
    }
    run.write_json(
        TRAIN_STATS,
        {
            "config": dataclasses.asdict(cfg),
            **stats,
            "failures": failures[:MAX_LISTED_FAILURES],
            "history": history,
        },
    )
    run.mark_done(ENCODER_DIR, stats)
    log.info("encoder trained in %.1fs: %s", stats["seconds"], run.uri_of(CHECKPOINT))
    return stats
