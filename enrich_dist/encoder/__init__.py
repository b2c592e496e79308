"""The encoders: the paper's beta-VAE and a contrastive encoder; training stage, checkpoints and embedding."""

from .contrastive import ContrastiveEncoder
from .model import BetaVAE, vae_loss
from .train import (
    CHECKPOINT,
    CHECKPOINTS,
    CONTRASTIVE_CHECKPOINT,
    RECONSTRUCTIONS,
    TRAIN_STATS,
    VIEWS,
    embed_images,
    encoder_bytes,
    load_encoder,
    run_train_encoder,
    train_contrastive,
    train_vae,
)

ENCODER_MODELS = tuple(CHECKPOINTS)  # the embedders that need a trained encoder


def train_encoder_model(images, cfg, model: str = "vae", device: str = "cpu", log_every: int = 1, clips=None):
    """(model, history) of the ``model`` encoder ("vae" or "contrastive") fitted to (N, S, S) images in [0, 1].

    ``clips`` (clip ids, frames) per image: the contrastive encoder's clip positives (``cfg.clip_positives``).
    """
    if model == "contrastive":
        return train_contrastive(images, cfg, log_every=log_every, device=device, clips=clips)
    if model == "vae":
        return train_vae(images, cfg, log_every=log_every, device=device)
    raise ValueError(f"unknown encoder model {model!r}: use one of {ENCODER_MODELS}")


__all__ = [
    "CHECKPOINT",
    "CHECKPOINTS",
    "CONTRASTIVE_CHECKPOINT",
    "ENCODER_MODELS",
    "RECONSTRUCTIONS",
    "TRAIN_STATS",
    "VIEWS",
    "BetaVAE",
    "ContrastiveEncoder",
    "embed_images",
    "encoder_bytes",
    "load_encoder",
    "run_train_encoder",
    "train_contrastive",
    "train_encoder_model",
    "train_vae",
    "vae_loss",
]
