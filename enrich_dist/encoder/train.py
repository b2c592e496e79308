"""Train the encoder (the paper's beta-VAE, or the contrastive encoder) on a sample of the archive, save it, embed with it."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import imaging, stages
from ..config import EmbedConfig, EncoderConfig, RunConfig, resolve_size
from ..errors import ConfigError
from ..executor import Context, execute
from ..schema import ENCODER_DIR, ENCODER_RECONSTRUCTIONS, ENCODER_TRAIN_STATS, ENCODER_VIEWS, MANIFEST_DIR
from ..storage import RunDir
from . import contrastive
from .contrastive import ContrastiveEncoder
from .model import BetaVAE, vae_loss

log = logging.getLogger("enrich_dist.encoder")

CHECKPOINT = posixpath.join(ENCODER_DIR, "vae.pt")
CONTRASTIVE_CHECKPOINT = posixpath.join(ENCODER_DIR, "contrastive.pt")
CHECKPOINTS = {"vae": CHECKPOINT, "contrastive": CONTRASTIVE_CHECKPOINT}  # encoder model -> its checkpoint
TRAIN_STATS = ENCODER_TRAIN_STATS
RECONSTRUCTIONS = ENCODER_RECONSTRUCTIONS
VIEWS = ENCODER_VIEWS
TRAIN_STATE = posixpath.join(ENCODER_DIR, "_partial", "contrastive.state")  # resumable state while training
CHECKPOINT_FORMAT = 2  # 2: input standardisation and the decoder's per-pixel offset (format 1 had neither)
VAL_FRACTION = 0.1
MIN_IMAGES_FOR_VAL = 20
PATIENCE = 5
GRID_IMAGES = 8
MAX_LISTED_FAILURES = 20
LOSSES = ("total", "recon", "kl")
ACTIVE_VARIANCE = 0.01  # a latent dimension whose posterior mean varies more than this across images is active
ACTIVE_KL = 0.01  # nats: KL per latent dimension reported as well (KL alone can come from shrunk variances)
MIN_ACTIVE_DIMS = 2  # fewer active dimensions than this: collapsed
MAX_RECON_RATIO = 0.9  # reconstruction error at least this share of the mean image's: collapsed
MIN_EFFECTIVE_RANK = 2.0  # contrastive embeddings spread over fewer dimensions than this: collapsed
MAX_MEAN_COSINE = 0.95  # contrastive embeddings this alike on average: collapsed
Encoder = BetaVAE | ContrastiveEncoder


def validation_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices: a seeded 10 % validation slice when n >= 20, else no validation."""
    if n < MIN_IMAGES_FOR_VAL:
        return np.arange(n), np.arange(0)
    n_val = max(1, int(round(VAL_FRACTION * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@contextmanager
def _deterministic(device: str = "cpu") -> Iterator[None]:
    """Deterministic torch algorithms and a private, restored RNG state for the duration.

    On CUDA the RNG of the current device is forked too, and an op without a deterministic CUDA
    kernel warns instead of failing (CPU training is the bit-for-bit reproducible one).
    """
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cuda = device.startswith("cuda")
    index = torch.device(device).index
    devices = [torch.cuda.current_device() if index is None else index] if cuda else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.use_deterministic_algorithms(True, warn_only=cuda)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def resolve_device(device: str) -> str:
    """'cpu', or 'cuda' for "cuda" / "auto" with a CUDA device visible to torch; refuses cuda without one."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"encoder device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("encoder device 'cuda' requested but torch sees no CUDA device: use --device auto or cpu")
    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def _check_images(images: np.ndarray, size: int) -> np.ndarray:
    """Images as a C-contiguous float32 (N, size, size) array, or a ValueError saying what is wrong."""
    arr = np.ascontiguousarray(images, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1:] != (size, size):
        raise ValueError(f"expected images of shape (N, {size}, {size}), got {arr.shape}")
    return arr


def _weight(cfg: EncoderConfig, progress: float = math.inf) -> float:
    """The KL weight after ``progress`` epochs of training: gamma, or beta raised from 0 over the warm-up epochs."""
    if cfg.objective == "capacity":
        return cfg.gamma
    warmup = cfg.kl_warmup * cfg.epochs
    return cfg.beta * min(1.0, progress / warmup) if warmup > 0 else cfg.beta


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
    epoch: int,
) -> np.ndarray:
    """One pass over ``data[order]`` in mini-batches (``epoch`` is 1-based); mean per-image (total, recon, KL)."""
    model.train()
    sums = np.zeros(len(LOSSES))
    c0, c1 = capacity
    for first in range(0, len(order), cfg.batch_size):
        xb = data[order[first : first + cfg.batch_size]]
        logits, mu, logvar = model(xb)
        c = None if c0 is None else c0 + (c1 - c0) * first / len(order)
        losses = vae_loss(logits, xb, mu, logvar, _weight(cfg, epoch - 1 + first / len(order)), c)
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


def train_vae(
    images: np.ndarray, cfg: EncoderConfig, log_every: int = 1, device: str = "cpu"
) -> tuple[BetaVAE, dict]:
    """Fit a seeded beta-VAE to float32 (N, S, S) images in [0, 1]; returns the best model (on CPU) and history.

    Bit-for-bit reproducible from ``cfg.seed`` on CPU; on ``device`` "cuda" the images live on the GPU
    and the result may differ in the last bits between runs.
    """
    if device.startswith("cuda"):
        # cuBLAS needs a fixed workspace for deterministic GEMMs; it is read when the first handle is made
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    data = torch.from_numpy(_check_images(images, cfg.image_size)).to(device)
    if len(data) == 0:
        raise ValueError("no images to train the encoder on")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs} and {cfg.batch_size}")
    if not 0.0 <= cfg.kl_warmup <= 1.0:
        raise ValueError(f"kl_warmup is a share of the epochs between 0 and 1, got {cfg.kl_warmup}")
    train_idx, val_idx = validation_split(len(data), cfg.seed)
    val_data = data[torch.from_numpy(val_idx).to(device)]
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
    with _deterministic(device):
        torch.manual_seed(cfg.seed)
        model = BetaVAE(cfg.latent_dim, cfg.image_size).to(device)
        model.fit_data_statistics(data[torch.from_numpy(train_idx).to(device)])
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
        for epoch in range(1, cfg.epochs + 1):
            start = time.perf_counter()
            order = torch.from_numpy(shuffle_rng.permutation(train_idx)).to(device)
            schedule = capacity_schedule(cfg, epoch)
            results = {"train": _train_epoch(model, optimizer, data, order, cfg, schedule, epoch)}
            if len(val_idx):
                results["val"] = _evaluate(model, val_data, cfg)
            history["epoch"].append(epoch)
            for part, values in results.items():
                for name, value in zip(LOSSES, values, strict=True):
                    history[f"{part}_{name}"].append(float(value))
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            history["seconds"].append(time.perf_counter() - start)
            current = history[monitor][-1]
            if not math.isfinite(current):
                raise FloatingPointError(
                    f"beta-VAE training diverged at epoch {epoch} ({monitor} {current}): lower the learning rate"
                )
            # while the KL target or weight is still ramping the loss is not yet the final objective:
            # those epochs are candidates only when training ends before the ramp does
            annealing = (schedule[1] is not None and schedule[1] < cfg.capacity) or _weight(cfg, epoch) < _weight(cfg)
            if (current < best_loss and not annealing) or (epoch == cfg.epochs and not best_state):
                best_loss, best_epoch = current, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
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
    model = model.cpu()
    model.load_state_dict(best_state)
    model.eval()
    history.update(best_epoch=best_epoch, best_loss=best_loss, stopped_early=epoch < cfg.epochs, device=device)
    return model, history


def train_contrastive(
    images: np.ndarray, cfg: EncoderConfig, log_every: int = 1, device: str = "cpu",
    resume: dict | None = None, on_epoch=None, clips: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[ContrastiveEncoder, dict]:
    """Fit a seeded contrastive encoder to float32 (N, S, S) images in [0, 1]; returns the model (on CPU) and history.

    Bit-for-bit reproducible from ``cfg.seed`` on CPU. Uses ``cfg.epochs``, ``cfg.contrastive_batch_size``
    image pairs per step, ``cfg.learning_rate`` and ``cfg.temperature``; the validation slice only
    measures held-out view retrieval (the model after the last epoch is kept). ``on_epoch`` receives a
    resumable state after each epoch but the last; ``resume`` continues from one (same images and cfg).
    ``clips``: (clip ids, frames) per image, used when ``cfg.clip_positives`` > 0 (nearby frames of a
    clip as extra positive pairs).
    """
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    data = torch.from_numpy(_check_images(images, cfg.image_size)).to(device)
    if len(data) < 2:
        raise ValueError(f"the contrastive encoder needs at least 2 images to train on, got {len(data)}")
    if cfg.epochs < 1 or cfg.contrastive_batch_size < 2:
        raise ValueError(
            f"epochs must be >= 1 and contrastive_batch_size >= 2, got {cfg.epochs} and {cfg.contrastive_batch_size}"
        )
    if not cfg.temperature > 0:
        raise ValueError(f"temperature must be > 0, got {cfg.temperature}")
    if not 0.0 <= cfg.clip_positives <= 1.0 or cfg.clip_window < 1:
        raise ValueError(
            f"clip_positives is a share between 0 and 1 and clip_window >= 1, got {cfg.clip_positives} and {cfg.clip_window}"
        )
    train_idx, val_idx = validation_split(len(data), cfg.seed)
    partners, with_partner = None, 0
    if clips is not None and cfg.clip_positives > 0:
        clip_ids, frames = (np.asarray(c, dtype=object) for c in clips)
        if len(clip_ids) != len(data) or len(frames) != len(data):
            raise ValueError(f"clips must give a clip id and a frame per image: {len(clip_ids)}, {len(frames)} for {len(data)}")
        partners = contrastive.clip_partners(clip_ids[train_idx], frames[train_idx], cfg.clip_window)
        with_partner = int((partners[:, 0] != np.arange(len(partners))).sum())
        log.info(
            "clip positives: %.0f %% of pairs from a frame within %d of the same clip (%d of %d training images have one)",
            100 * cfg.clip_positives, cfg.clip_window, with_partner, len(partners),
        )
    log.info(
        "training the contrastive encoder (embedding %d, temperature %g) on %d images, %d held out, %d epochs",
        cfg.latent_dim, cfg.temperature, len(train_idx), len(val_idx), cfg.epochs,
    )
    with _deterministic(device):
        torch.manual_seed(cfg.seed)
        model = ContrastiveEncoder(cfg.latent_dim, cfg.image_size).to(device)
        train = data[torch.from_numpy(train_idx).to(device)]
        model.fit_data_statistics(train)
        history = contrastive.fit(
            model, train, data[torch.from_numpy(val_idx).to(device)], cfg.epochs, cfg.contrastive_batch_size,
            cfg.learning_rate, cfg.temperature, cfg.seed, log=log, log_every=log_every,
            resume=resume, on_epoch=on_epoch, partners=partners, partner_share=cfg.clip_positives,
        )
    history.update(
        n_train=len(train_idx), n_val=len(val_idx), best_epoch=len(history["epoch"]), device=device,
        clip_positives=cfg.clip_positives if partners is not None else 0.0, n_with_clip_partner=with_partner,
    )
    return model.cpu().eval(), history


def contrastive_quality(model: ContrastiveEncoder, images: np.ndarray, seed: int = 0) -> dict:
    """Label-free signs that the contrastive encoder learned the images rather than collapsing.

    On held-out ``images``: view retrieval (the share of images whose random view finds its own other
    view first among all images' views; an untrained network of the same shape is measured beside it),
    the mean pairwise cosine of the embeddings and their effective rank. A collapsed encoder maps
    every image to nearly the same direction (mean cosine near 1, effective rank near 1).
    """
    arr = torch.from_numpy(_check_images(images, model.image_size))
    if len(arr) < 2:
        raise ValueError("contrastive_quality needs at least two images")
    untrained = ContrastiveEncoder(model.latent_dim, model.image_size)
    untrained.load_state_dict({k: v for k, v in model.state_dict().items() if "input_" in k}, strict=False)
    retrieval = contrastive.view_retrieval(model, arr, torch.Generator().manual_seed(seed))
    baseline = contrastive.view_retrieval(untrained.eval(), arr, torch.Generator().manual_seed(seed))
    spread = contrastive.embedding_spread(model, arr)
    # n centred points span at most n - 1 dimensions: a handful of held-out images cannot show rank 2
    low_rank = spread["effective_rank"] < min(MIN_EFFECTIVE_RANK, len(arr) - 1)
    collapsed = low_rank or spread["mean_pairwise_cosine"] > MAX_MEAN_COSINE
    return {
        "model": "contrastive",
        "n_images": len(arr),
        "view_retrieval": retrieval,
        "untrained_view_retrieval": baseline,
        **spread,
        "collapsed": bool(collapsed),
    }


def encoder_quality(model: BetaVAE, images: np.ndarray, mean_image: np.ndarray, batch_size: int = 256) -> dict:
    """Label-free signs that the encoder learned the images rather than collapsing to the prior.

    On held-out ``images``: the number of *active* latent dimensions, whose posterior mean varies across
    images with variance above ``ACTIVE_VARIANCE`` (Burda et al. 2016; a dimension can carry KL without
    telling images apart, by shrinking its variance alone), the KL of each dimension (nats, averaged over
    images) and how many exceed ``ACTIVE_KL``, and the reconstruction from z = mu against predicting
    ``mean_image`` (the training images' mean) for every image: mean squared error and Bernoulli
    cross-entropy (nats per image, the training loss). A collapsed encoder has almost no active
    dimension; an untrained one reconstructs no better than the mean image.
    """
    arr = _check_images(images, model.image_size)
    if len(arr) < 2:
        raise ValueError("encoder_quality needs at least two images")
    model.eval()
    mus, kl_dims, sq_err, bce = [], torch.zeros(model.latent_dim, dtype=torch.float64), 0.0, 0.0
    with torch.inference_mode():
        for first in range(0, len(arr), batch_size):
            xb = torch.from_numpy(arr[first : first + batch_size])
            mu, logvar = model.encode(xb)
            mus.append(mu.double())
            kl_dims += (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).double().sum(dim=0)
            logits = model.decode(mu)[:, 0]
            sq_err += float((torch.sigmoid(logits).double() - xb.double()).pow(2).sum())
            bce += float(F.binary_cross_entropy_with_logits(logits.double(), xb.double(), reduction="sum"))
    kl_dims /= len(arr)
    variance = torch.cat(mus).var(dim=0)
    x = arr.astype(np.float64)
    mean = np.clip(np.asarray(mean_image, np.float64), 1e-6, 1 - 1e-6)[None]
    baseline = float(np.mean((x - mean) ** 2))
    baseline_bce = float(-(x * np.log(mean) + (1 - x) * np.log1p(-mean)).sum() / len(arr))
    mse = sq_err / arr.size
    active = int((variance > ACTIVE_VARIANCE).sum())
    ratio = mse / baseline if baseline > 0 else float("nan")
    collapsed = active < MIN_ACTIVE_DIMS or not ratio < MAX_RECON_RATIO
    return {
        "n_images": len(arr),
        "active_dims": active,
        "active_variance_threshold": ACTIVE_VARIANCE,
        "kl_nats": float(kl_dims.sum()),
        "kl_active_dims": int((kl_dims > ACTIVE_KL).sum()),
        "active_kl_threshold": ACTIVE_KL,
        "recon_mse": mse,
        "mean_image_mse": baseline,
        "recon_to_mean_ratio": ratio,
        "recon_bce": bce / len(arr),
        "mean_image_bce": baseline_bce,
        "collapsed": bool(collapsed),
        "kl_per_dim": [round(float(v), 5) for v in kl_dims],
        "mu_variance_per_dim": [round(float(v), 6) for v in variance],
    }


def collapse_warning(quality: dict) -> str | None:
    """A message saying why the encoder looks collapsed (or unlearned) and what to try; None when it looks fine."""
    if not quality["collapsed"]:
        return None
    if quality.get("model") == "contrastive":
        return (
            f"the contrastive encoder looks collapsed: its held-out embeddings have a mean pairwise cosine of "
            f"{quality['mean_pairwise_cosine']:.2f} and an effective rank of {quality['effective_rank']:.1f}, so they "
            "say little about the images; lower --learning-rate, train on a larger --sample, or use --embedder vae"
        )
    ratio = quality["recon_to_mean_ratio"]
    why = []
    if quality["active_dims"] < MIN_ACTIVE_DIMS:
        why.append(
            f"only {quality['active_dims']} latent dimension(s) vary across images (KL {quality['kl_nats']:.2f} nats "
            "in total)"
        )
    if not ratio < MAX_RECON_RATIO:
        why.append(f"its reconstructions have {100 * ratio:.0f}% of the error of the mean image")
    return (
        f"the beta-VAE looks collapsed or untrained: {' and '.join(why)}, so its embeddings say little about the "
        "images; train longer (--epochs, a larger --sample), lower --beta (default 0.1) with --kl-warmup on, "
        "or use --embedder pixels"
    )


def encoder_bytes(model: Encoder, cfg: EncoderConfig) -> bytes:
    """A checkpoint (state_dict + plain config) that ``torch.load(..., weights_only=True)`` reads."""
    config = {
        "model": "contrastive" if isinstance(model, ContrastiveEncoder) else "vae",
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
        "kl_warmup": float(cfg.kl_warmup),
        "temperature": float(cfg.temperature),
        "contrastive_batch_size": int(cfg.contrastive_batch_size),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "config": config, "state_dict": state}, buf)
    return buf.getvalue()


def load_encoder(data: bytes, name: str = "encoder/vae.pt") -> Encoder:
    """The model saved by :func:`encoder_bytes`, on CPU and in eval mode.

    Only tensors and plain containers are loaded (``weights_only=True``): a checkpoint carrying code,
    or one that is damaged, is refused with a ValueError naming ``name`` and the fix.
    """
    fix = "delete the run dir's encoder/ folder and rerun `enrich train-encoder`"
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for code, RuntimeError/EOFError for damage
        raise ValueError(f"{name} is not a loadable encoder checkpoint ({type(exc).__name__}: {str(exc)[:200]}); {fix}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") not in (1, CHECKPOINT_FORMAT):
        raise ValueError(f"{name} is not an enrich_dist encoder checkpoint (format {CHECKPOINT_FORMAT} expected); {fix}")
    config = ckpt["config"]
    kind = config.get("model", "vae") if isinstance(config, dict) else None
    if kind not in ("vae", "contrastive"):
        raise ValueError(f"{name} holds an unknown encoder model {kind!r}; {fix}")
    try:
        network = BetaVAE if kind == "vae" else ContrastiveEncoder
        model = network(int(config["latent_dim"]), int(config["image_size"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{name} has a damaged config ({type(exc).__name__}: {exc}); {fix}") from exc
    # format 1 predates the standardisation and offset: their defaults reproduce that network exactly
    allowed = {"input_mean", "input_std", "pixel_bias"} if ckpt["format"] == 1 else set()
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ValueError(f"{name} does not match the encoder network ({str(exc)[:200]}); {fix}") from exc
    if unexpected or set(missing) - allowed:
        raise ValueError(f"{name} does not match the encoder network (missing {missing}, unexpected {unexpected}); {fix}")
    return model.eval()


def embed_images(
    model: Encoder, images: np.ndarray, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    """L2-normalised float32 embeddings (N, latent_dim) of (N, S, S) images; moves the model to ``device``.

    The beta-VAE's encoder mean, or the contrastive encoder's backbone output.
    """
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


def image_rows_png(top: np.ndarray, bottom: np.ndarray) -> bytes:
    """PNG of two rows of (N, S, S) images in [0, 1], ``top`` over ``bottom``."""
    n, size, gap = len(top), top.shape[-1], 2
    canvas = np.ones((2 * size + 3 * gap, n * (size + gap) + gap), dtype=np.float32)
    for i in range(n):
        left = gap + i * (size + gap)
        canvas[gap : gap + size, left : left + size] = top[i]
        canvas[2 * gap + size : 2 * gap + 2 * size, left : left + size] = bottom[i]
    buf = io.BytesIO()
    Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def reconstruction_grid(model: BetaVAE, images: np.ndarray) -> bytes:
    """PNG of images (top row) over their reconstructions from z = mu (bottom row)."""
    arr = _check_images(images, model.image_size)
    model.eval()
    with torch.inference_mode():
        recon = torch.sigmoid(model(torch.from_numpy(arr))[0])[:, 0].cpu().numpy()
    return image_rows_png(arr, recon)


def views_grid(images: np.ndarray, seed: int = 0) -> bytes:
    """PNG of images (top row) over one random training view of each (bottom row): the nuisance the encoder ignores."""
    arr = np.ascontiguousarray(images, dtype=np.float32)
    views = contrastive.augment(torch.from_numpy(arr), torch.Generator().manual_seed(seed)).numpy()
    return image_rows_png(arr, views)


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


def run_train_encoder(run: RunDir, cfg: EncoderConfig, use_ray: bool | None = None, model: str = "vae") -> dict:
    """Stage: fit the ``model`` encoder on a sample of the archive and write ``encoder/``; skipped when already done.

    With a Ray attached (``use_ray`` None: whenever Ray is initialised) the work runs as one Ray task
    holding a GPU when the cluster has one (else the CPUs of the largest node); otherwise here.
    """
    ctx = Context(RunConfig(encoder=cfg, embed=EmbedConfig(embedder=model)), run.storage_options, {"use_ray": use_ray})
    return execute(stages.TRAIN_ENCODER, run, ctx).stats


def encoder_matches(run: RunDir, ctx: Context, stats: dict) -> None:
    """A trained encoder is of the model this run embeds with, or the run is refused."""
    held, model = stats.get("model", "vae"), ctx.config.embed.embedder
    if held != model:
        raise ConfigError(
            f"{run.uri_of(ENCODER_DIR)} holds a trained {held} encoder, this run asks for {model}: use "
            f"--embedder {held}, or a new --output folder to compare encoders"
        )


def remove_train_state(run: RunDir) -> None:
    """Once the encoder is committed, its resumable training state is scratch."""
    if run.exists(TRAIN_STATE):
        run.remove(TRAIN_STATE)


def compute_encoder(run: RunDir, ctx: Context) -> dict:
    """The stage's work (the executor skips, commits and checks): train and write the encoder's files."""
    cfg, model, use_ray = ctx.config.encoder, ctx.config.embed.embedder, ctx.extras.get("use_ray")
    if model not in CHECKPOINTS:
        raise ValueError(f"unknown encoder model {model!r}: use one of {sorted(CHECKPOINTS)}")
    if use_ray is None:
        use_ray = _ray_initialized()
    if use_ray:
        stats = _train_on_ray(run, cfg, model)
    else:
        stats = train_encoder_stage(run, cfg, resolve_device(cfg.device), threads=torch.get_num_threads(), model=model)
    warning = collapse_warning(stats["quality"])
    if warning:
        log.warning("%s (see %s)", warning, run.uri_of(TRAIN_STATS))
    log.info("encoder trained in %.1fs on %s: %s", stats["seconds"], stats["device"], run.uri_of(CHECKPOINTS[model]))
    return stats


def _ray_initialized() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def _train_on_ray(run: RunDir, cfg: EncoderConfig, model: str) -> dict:
    """Run :func:`train_encoder_stage` as one Ray task on a GPU, or on the CPUs of the largest node."""
    import ray

    from ..runtime import cluster_resources

    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"encoder device must be auto, cpu or cuda, got {cfg.device!r}")
    res = cluster_resources()
    if cfg.device == "cuda" and res.gpus == 0:
        raise ValueError("encoder device 'cuda' requested but the Ray cluster has no GPUs: use --device auto or cpu")
    if res.gpus > 0 and cfg.device != "cpu":
        device, options = "cuda", {"num_gpus": 1, "num_cpus": 1}
        threads = 4
    else:
        cpus = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] + [1])
        device, options, threads = "cpu", {"num_cpus": cpus}, cpus
    log.info("training the encoder as a Ray task on %s (%s)", device.upper(), options)
    level = logging.getLogger("enrich_dist").getEffectiveLevel()
    task = ray.remote(_train_task).options(max_retries=0, **options)
    return ray.get(task.remote(run, cfg, device, threads, level, model))


def _train_task(run: RunDir, cfg: EncoderConfig, device: str, threads: int, level: int, model: str) -> dict:
    """Ray task body: the driver's log level, the task's threads, then the stage's work."""
    package = logging.getLogger("enrich_dist")
    package.setLevel(level)
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    return train_encoder_stage(run, cfg, device, threads, ray_task=True, model=model)


def train_encoder_stage(
    run: RunDir, cfg: EncoderConfig, device: str, threads: int = 1, ray_task: bool = False, model: str = "vae"
) -> dict:
    """Decode the seeded sample, train, and write the checkpoint, a picture and train.json (the executor commits).

    The picture is ``reconstructions.png`` (beta-VAE) or ``views.png`` (contrastive: images over one
    training view each).
    """
    if device == "cpu":
        torch.set_num_threads(max(1, threads))
    start = time.perf_counter()
    ids, uris, frames = sample_manifest(run, cfg)
    images, errors = imaging.load_images(
        uris, cfg.image_size, run.storage_options, max(4, threads), frames=frames,
        nifti_axis=imaging.manifest_nifti_axis(run),
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
    train_idx, val_idx = validation_split(len(images), cfg.seed)
    held_out = val_idx if len(val_idx) else train_idx
    shown = held_out[:GRID_IMAGES]
    if model == "contrastive":
        resume, on_epoch = _resumable(run, cfg, ids[keep])
        clips = _sample_clips(run, ids[keep]) if cfg.clip_positives > 0 else None
        network, history = train_contrastive(
            images, cfg, device=device, resume=resume, on_epoch=on_epoch, clips=clips
        )
        quality = contrastive_quality(network, images[held_out], cfg.seed)
        run.write_bytes(VIEWS, views_grid(images[shown], cfg.seed))
    else:
        network, history = train_vae(images, cfg, device=device)
        quality = encoder_quality(network, images[held_out], images[train_idx].mean(axis=0))
        run.write_bytes(RECONSTRUCTIONS, reconstruction_grid(network, images[shown]))
    run.write_bytes(CHECKPOINTS[model], encoder_bytes(network, cfg))
    stats = {
        "model": model,
        "n_sampled": len(uris),
        "n_failed": len(failures),
        "n_train": history["n_train"],
        "n_val": history["n_val"],
        "epochs_run": len(history["epoch"]),
        "best_epoch": history["best_epoch"],
        "best_loss": history.get("best_loss"),
        "monitor": history.get("monitor"),
        "device": device,
        "ray_task": ray_task,
        "quality": {k: v for k, v in quality.items() if k != "kl_per_dim"},
        "seconds": time.perf_counter() - start,
    }
    run.write_json(
        TRAIN_STATS,
        {
            "config": dataclasses.asdict(cfg),
            **stats,
            "quality": quality,
            "failures": failures[:MAX_LISTED_FAILURES],
            "history": history,
        },
    )
    return stats


def _sample_clips(run: RunDir, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(clip ids, frames) of the images ``ids`` from the manifest; None when it has no clip ids."""
    table = run.read_table(MANIFEST_DIR, columns=["image_id", "clip_id", "frame"])
    clip_ids = np.asarray(table["clip_id"].to_pylist(), dtype=object)
    if all(c is None for c in clip_ids):
        log.info("clip positives asked for, but the manifest has no clip ids: training on the images alone")
        return None
    where = {int(i): row for row, i in enumerate(table["image_id"].to_numpy())}
    rows = np.array([where[int(i)] for i in ids], dtype=np.int64)
    return clip_ids[rows], np.asarray(table["frame"].to_pylist(), dtype=object)[rows]


def _resumable(run: RunDir, cfg: EncoderConfig, ids: np.ndarray):
    """(state to resume from or None, callback that saves one) for contrastive training in ``run``.

    The state is written to ``encoder/_partial/contrastive.state`` after every epoch, keyed by the
    training settings and the sampled image ids: an interrupted train-encoder continues from its last
    finished epoch with the same result, and a state made with other settings or images is ignored.
    """
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "device"}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + np.asarray(ids, np.int64).tobytes()).hexdigest()
    resume = None
    if run.exists(TRAIN_STATE):
        try:
            saved = torch.load(io.BytesIO(run.read_bytes(TRAIN_STATE)), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a damaged state costs a restart, never the run
            log.warning("ignoring the unreadable training state %s (%s): training from the start", run.uri_of(TRAIN_STATE), exc)
        else:
            if isinstance(saved, dict) and saved.get("key") == key:
                resume = saved["state"]
            else:
                log.info("ignoring %s: it was made with other settings or images", run.uri_of(TRAIN_STATE))

    def save(state: dict) -> None:
        buffer = io.BytesIO()
        torch.save({"key": key, "state": state}, buffer)
        run.write_bytes(TRAIN_STATE, buffer.getvalue())

    return resume, save


def check_encoder(run: RunDir) -> tuple[dict, list[str]]:
    """The checkpoint loads (``weights_only``) and holds no NaN or infinite weight."""
    present = [path for path in CHECKPOINTS.values() if run.exists(path)]
    if not present:
        return {"skipped": "no encoder (embedder needs none)"}, []
    checkpoint = present[0]
    model = load_encoder(run.read_bytes(checkpoint), name=checkpoint)
    n_params = nan = 0
    for tensor in model.state_dict().values():
        values = tensor.detach().float().numpy()
        n_params += values.size
        nan += int(np.count_nonzero(~np.isfinite(values)))
    problems = [f"{nan} NaN or infinite weights in {run.uri_of(checkpoint)}"] if nan else []
    return {"parameters": n_params, "nan": nan}, problems
