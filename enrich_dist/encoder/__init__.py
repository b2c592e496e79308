"""The beta-VAE encoder: model, training stage, checkpoints and embedding."""

from .model import BetaVAE, vae_loss
from .train import (
    CHECKPOINT,
    RECONSTRUCTIONS,
    TRAIN_STATS,
    embed_images,
    encoder_bytes,
    load_encoder,
    run_train_encoder,
    train_vae,
)

__all__ = [
    "CHECKPOINT",
    "RECONSTRUCTIONS",
    "TRAIN_STATS",
    "BetaVAE",
    "embed_images",
    "encoder_bytes",
    "load_encoder",
    "run_train_encoder",
    "train_vae",
    "vae_loss",
]
