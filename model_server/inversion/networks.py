"""The networks: a convolutional VAE, the latent -> FC regressor, the direct CNN baseline.

All take the prepared input of :func:`model_server.inversion.preprocess.prepare`, (B, 2, H, W)
float32 (scaled intensity and measured fraction on the 2 x 2 pooled grid). FC targets are
the coefficients scaled to [-1, 1] over the training domain.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VAE", "BaselineCNN", "Decoder", "Encoder", "Regressor"]

_CHANNELS = (16, 32, 64, 64)
_DECODER_CHANNELS = (32, 16, 8, 4)


def _down(shape: tuple[int, int], times: int) -> tuple[int, int]:
    h, w = shape
    for _ in range(times):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class Encoder(nn.Module):
    """(B, 2, H, W) -> latent mean and log-variance, each (B, latent)."""

    def __init__(self, shape: tuple[int, int], latent: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 2
        for k, c in enumerate(_CHANNELS):
            size = 5 if k == 0 else 3
            layers += [nn.Conv2d(c_in, c, size, stride=2, padding=size // 2), nn.GELU()]
            c_in = c
        self.conv = nn.Sequential(*layers)
        h, w = _down(shape, len(_CHANNELS))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * h * w, 256), nn.GELU(), nn.Linear(256, 2 * latent)
        )
        self.latent = latent

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.conv(x))
        mu, logvar = out[:, : self.latent], out[:, self.latent :]
        return mu, logvar.clamp(-12.0, 6.0)


class Decoder(nn.Module):
    """Latent (B, latent) -> reconstructed scaled intensity (B, H, W)."""

    def __init__(self, shape: tuple[int, int], latent: int) -> None:
        super().__init__()
        self.shape = shape
        self.h, self.w = _down(shape, len(_CHANNELS))
        c0 = _DECODER_CHANNELS[0]
        self.fc = nn.Sequential(
            nn.Linear(latent, 256), nn.GELU(), nn.Linear(256, c0 * self.h * self.w), nn.GELU()
        )
        layers: list[nn.Module] = []
        c_in = c0
        for c in (*_DECODER_CHANNELS[1:], _DECODER_CHANNELS[-1]):
            layers += [nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1), nn.GELU()]
            c_in = c
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.deconv = nn.Sequential(*layers)
        self.c0 = c0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.c0, self.h, self.w)
        out = self.deconv(h)[:, 0]
        return out[:, : self.shape[0], : self.shape[1]]


class VAE(nn.Module):
    """Encoder, decoder and an auxiliary linear FC head used only while training the VAE.

    The auxiliary head (FCs from a latent sample, weighted by ``aux_weight`` in the loss)
    keeps the FC-relevant information in the latent space; the regressor that serves the
    estimates is trained afterwards on the frozen encoder, as in the seed paper.
    """

    def __init__(self, shape: tuple[int, int], latent: int, n_fc: int) -> None:
        super().__init__()
        self.encoder = Encoder(shape, latent)
        self.decoder = Decoder(shape, latent)
        self.aux = nn.Linear(latent, n_fc)

    def forward(
        self, x: torch.Tensor, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x)
        eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype, device=mu.device)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar, self.aux(z)


class Regressor(nn.Module):
    """Latent (..., latent) -> FC mean and log-variance (..., n_fc) each, in scaled units."""

    def __init__(self, latent: int, n_fc: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 2 * n_fc),
        )
        self.n_fc = n_fc

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(z)
        return out[..., : self.n_fc], out[..., self.n_fc :].clamp(-14.0, 4.0)


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class BaselineCNN(nn.Module):
    """Direct regression, ResNet-style (the seed paper's ResNet-18 comparison, smaller).

    Stem, then three stages (16, 32, 64 channels) of one residual block each after a strided
    convolution, global average pooling, a linear layer to the scaled FCs.
    """

    def __init__(self, n_fc: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(2, 16, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        ]
        c_in = 16
        for c in (16, 32, 64):
            if c != c_in:
                layers += [
                    nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(c),
                    nn.ReLU(),
                ]
            layers.append(_Block(c))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in * 2, n_fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        out: torch.Tensor = self.head(pooled)
        return out
