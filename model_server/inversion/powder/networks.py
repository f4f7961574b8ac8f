"""Networks of the powder inversion.

Inputs are those of :func:`model_server.inversion.preprocess.prepare`: (B, 2, H, W)
float32 (scaled intensity, measured fraction) on the 2 x 2 pooled crop of the powder grid.

* :class:`FCVAE`: the paper's fully connected variant. The encoder takes the scaled
  intensity of the pixels inside the kinematic limit (a masked flatten), 400 tanh units,
  then the latent mean and log-variance; the decoder mirrors it and puts the pixels back
  (zero outside the limit).
* the convolutional variant is :class:`model_server.inversion.networks.VAE`.
* :class:`PaperRegressor`: latent -> 100 -> 1000 -> 1000 -> 100 (tanh) -> FC mean and
  log-variance (scaled units), the paper's regressor with a variance head.
"""

from __future__ import annotations

import torch
from torch import nn

from model_server.inversion.networks import VAE

__all__ = ["FCVAE", "PaperRegressor", "PowderVAE", "build_networks"]


class _FCEncoder(nn.Module):
    """(B, 2, H, W) -> latent mean and log-variance (B, latent) each."""

    pixels: torch.Tensor

    def __init__(self, pixels: torch.Tensor, latent: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("pixels", pixels.clone())
        self.net = nn.Sequential(
            nn.Linear(int(pixels.sum()), hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent)
        )
        self.latent = latent

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x[:, 0].flatten(1)[:, self.pixels.flatten()]
        out = self.net(flat)
        return out[:, : self.latent], out[:, self.latent :].clamp(-12.0, 6.0)


class _FCDecoder(nn.Module):
    """Latent (B, latent) -> scaled intensity (B, H, W), zero outside the kinematic limit."""

    pixels: torch.Tensor

    def __init__(self, pixels: torch.Tensor, latent: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("pixels", pixels.clone())
        self.net = nn.Sequential(
            nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, int(pixels.sum()))
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = self.net(z)
        out = flat.new_zeros((len(z), self.pixels.numel()))
        out[:, self.pixels.flatten()] = flat
        return out.view(len(z), int(self.pixels.shape[0]), int(self.pixels.shape[1]))


class FCVAE(nn.Module):
    """The fully connected VAE, with the auxiliary linear FC head of
    :class:`~model_server.inversion.networks.VAE` (used only while training the VAE).

    Parameters
    ----------
    pixels
        (H, W) bool: the pooled pixels inside the kinematic limit.
    latent
        Latent dimensions (30 in the paper).
    n_fc
        Number of force constants.
    hidden
        Units of the hidden layer (400 in the paper).
    """

    def __init__(self, pixels: torch.Tensor, latent: int, n_fc: int, hidden: int = 400) -> None:
        super().__init__()
        pixels = pixels.to(torch.bool)
        self.encoder = _FCEncoder(pixels, latent, hidden)
        self.decoder = _FCDecoder(pixels, latent, hidden)
        self.aux = nn.Linear(latent, n_fc)

    def forward(
        self, x: torch.Tensor, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x)
        eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype, device=mu.device)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar, self.aux(z)


class PaperRegressor(nn.Module):
    """Latent (..., latent) -> FC mean and log-variance (..., n_fc) each, scaled units.

    ``widths`` hidden layers with tanh (the paper: 100, 1000, 1000, 100).
    """

    def __init__(
        self, latent: int, n_fc: int, widths: tuple[int, ...] = (100, 1000, 1000, 100)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = latent
        for w in widths:
            layers += [nn.Linear(c_in, w), nn.Tanh()]
            c_in = w
        layers.append(nn.Linear(c_in, 2 * n_fc))
        self.net = nn.Sequential(*layers)
        self.n_fc = n_fc

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(z)
        return out[..., : self.n_fc], out[..., self.n_fc :].clamp(-14.0, 4.0)


#: Either variant's VAE.
PowderVAE = FCVAE | VAE


def build_networks(
    variant: str,
    shape: tuple[int, int],
    pixels: torch.Tensor,
    latent: int,
    n_fc: int,
    hidden: int,
    widths: tuple[int, ...],
) -> tuple[PowderVAE, PaperRegressor]:
    """Untrained VAE of ``variant`` for pooled inputs of ``shape`` (H, W) (``pixels`` (H, W)
    bool: inside the kinematic limit) and the regressor."""
    vae: PowderVAE = (
        FCVAE(pixels, latent, n_fc, hidden) if variant == "fc" else VAE(shape, latent, n_fc)
    )
    return vae, PaperRegressor(latent, n_fc, tuple(widths))
