"""The beta-VAE of Burgess et al. 2018 ("Understanding disentangling in beta-VAE") for grayscale inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = 32
HIDDEN = 256
BOTTOM = 4  # spatial size after the last stride-2 convolution


def conv_layers(image_size: int) -> int:
    """Stride-2 convolutions that take ``image_size`` down to 4x4 (4 for 64x64 inputs)."""
    if image_size < 2 * BOTTOM or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= {2 * BOTTOM}, got {image_size}")
    return int(math.log2(image_size // BOTTOM))


class BetaVAE(nn.Module):
    """Conv encoder to a Gaussian latent (mu, logvar) and a mirrored decoder producing Bernoulli logits.

    Two additions to Burgess et al.'s network, both set from the training images by
    :meth:`fit_data_statistics`: the encoder sees its input standardised by the training images' pixel
    mean and standard deviation (dark ultrasound frames average about 0.08 and train slowly
    unscaled), and the decoder's logits carry a learned per-pixel offset that starts at the logit of
    the mean training image, so the latents only have to explain how an image differs from the
    average one. Defaults (mean 0, std 1, offset 0) leave the original network unchanged.
    """

    def __init__(self, latent_dim: int = 128, image_size: int = 64):
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = latent_dim
        self.image_size = image_size
        layers = conv_layers(image_size)
        convs: list[nn.Module] = []
        for i in range(layers):
            convs += [nn.Conv2d(1 if i == 0 else CHANNELS, CHANNELS, 4, stride=2, padding=1), nn.ReLU()]
        flat = CHANNELS * BOTTOM * BOTTOM
        self.encoder = nn.Sequential(
            *convs,
            nn.Flatten(),
            nn.Linear(flat, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, 2 * latent_dim),
        )
        deconvs: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            deconvs.append(nn.ConvTranspose2d(CHANNELS, 1 if last else CHANNELS, 4, stride=2, padding=1))
            if not last:
                deconvs.append(nn.ReLU())
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, flat),
            nn.ReLU(),
            nn.Unflatten(1, (CHANNELS, BOTTOM, BOTTOM)),
            *deconvs,
        )
        self.register_buffer("input_mean", torch.zeros(()))
        self.register_buffer("input_std", torch.ones(()))
        self.pixel_bias = nn.Parameter(torch.zeros(1, 1, image_size, image_size))

    @torch.no_grad()
    def fit_data_statistics(self, images: torch.Tensor) -> None:
        """Input standardisation and the decoder's starting per-pixel offset from (N, S, S) training images in [0, 1]."""
        images = images.float()
        std = float(images.std()) if images.numel() > 1 else 1.0
        self.input_mean.fill_(float(images.mean()))
        self.input_std.fill_(std if std > 1e-6 else 1.0)
        mean_image = images.mean(dim=0).clamp(1e-3, 1 - 1e-3)
        self.pixel_bias.copy_(torch.logit(mean_image).reshape(self.pixel_bias.shape))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance for images (B, H, W) or (B, 1, H, W)."""
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if tuple(x.shape[1:]) != (1, self.image_size, self.image_size):
            raise ValueError(
                f"expected images of shape (B, 1, {self.image_size}, {self.image_size}), got {tuple(x.shape)}"
            )
        mu, logvar = self.encoder((x - self.input_mean) / self.input_std).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits (B, 1, H, W) for latents (B, latent_dim)."""
        return self.decoder(z) + self.pixel_bias

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """A latent drawn from N(mu, exp(logvar)) by the reparameterisation trick."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction logits, mu, logvar; samples z in training mode and uses z = mu in eval mode."""
        mu, logvar = self.encode(x)
        return self.decode(self.sample(mu, logvar) if self.training else mu), mu, logvar


def vae_loss(
    logits: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: float,
    capacity: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, recon, KL): BCE summed over pixels and KL over latents, averaged over the batch.

    total is recon + beta * KL, or with a ``capacity`` C (Burgess et al.) recon + beta * |KL - C|.
    """
    target = x.reshape(logits.shape)
    batch = logits.shape[0]
    recon = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / batch
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / batch
    if capacity is None:
        return recon + beta * kl, recon, kl
    return recon + beta * (kl - capacity).abs(), recon, kl
