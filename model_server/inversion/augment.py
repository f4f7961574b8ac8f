"""Training augmentation that matches what folded data look like.

Applied on the fly, batch by batch, to clean forward-model spectra (torch, seeded by a
``torch.Generator``). Each spectrum gets one of three conditions:

* ``clean`` (share ``p_clean``): the forward model as it is, every bin measured;
* ``paper`` (share ``p_paper``): the seed paper's noise on the min-max scaled spectrum,
  ``Poisson(P (I + B)) / P`` (:func:`simulations.instrument.noise.add_noise`), every bin measured,
  B and P drawn at random over and beyond the 5 x 5 evaluation grid;
* ``orientations`` (the rest): ``n`` random orientations of the instrument model (``n``
  log-uniform in 1..all) give a mask and a per-bin relative exposure ``e``; counts
  ``Poisson(P1 e (I + B))`` with ``P1`` counts per unit intensity per orientation, and the
  intensity ``counts / (P1 e)``, as the accumulators compute it. One orientation of the
  simulated Ge run has about 20 counts at its brightest bins: ``P1`` is drawn around that.

Before the noise, with probability ``p_weight``, the spectrum is multiplied by intensity
weights the forward model lacks: ``(E / E_ref)^-a`` (the 1/omega of the one-phonon cross
section, a up to 1.2) times a smooth random field ``exp(g(q, E))`` (structure factors of
branches, Debye-Waller), so that the model leans on where the branches are rather than on
how bright they are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model_server.inversion.coverage import CoverageBank

__all__ = ["AugmentConfig", "Augmenter"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AugmentConfig:
    """Shares and ranges of the augmentation (see the module docstring)."""

    p_clean: float = 0.2
    p_paper: float = 0.35
    p_weight: float = 0.5
    background_zero: float = 0.3
    background_range: tuple[float, float] = (0.001, 0.4)
    poisson_range: tuple[float, float] = (5.0, 3000.0)
    p1_range: tuple[float, float] = (3.0, 300.0)
    energy_power_max: float = 1.2
    field_amplitude: float = 0.5
    energy_floor_meV: float = 3.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict."""
        return asdict(self)


def _log_uniform(lo: float, hi: float, n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).to(torch.float32)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale each spectrum of (B, n_q, n_E) to [0, 1] (as
    ``simulations.instrument.noise``)."""
    lo = x.amin(dim=(1, 2), keepdim=True)
    span = x.amax(dim=(1, 2), keepdim=True) - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones(()))


class Augmenter:
    """Random conditions for batches of clean spectra.

    Parameters
    ----------
    bank
        Per-orientation relative exposure of the material's default mounting.
    energy_centres
        (n_E,) meV, bin centres of the grid.
    config
        Shares and ranges.
    """

    def __init__(
        self,
        bank: CoverageBank,
        energy_centres: np.ndarray,
        config: AugmentConfig | None = None,
    ) -> None:
        self.bank = bank
        self.energy_centres = np.asarray(energy_centres, dtype=np.float64)
        self.config = config or AugmentConfig()
        self._exposure = torch.from_numpy(bank.exposure.reshape(bank.n_orientations, -1))
        e = np.maximum(np.asarray(energy_centres, dtype=np.float64), self.config.energy_floor_meV)
        self._log_e = torch.from_numpy(np.log(e / e.mean())).to(torch.float32)

    def weights(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, n_q, n_E) random intensity weights (1/E^a and a smooth field)."""
        cfg = self.config
        n_q, n_e = self.bank.shape
        a = torch.rand(n, 1, 1, generator=gen) * cfg.energy_power_max
        coarse = torch.randn(n, 1, 8, 6, generator=gen) * cfg.field_amplitude
        field = F.interpolate(coarse, size=(n_q, n_e), mode="bicubic", align_corners=True)
        return torch.exp(field.squeeze(1) - a * self._log_e[None, None, :])

    def backgrounds(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n,) constant backgrounds B (a share exactly 0)."""
        cfg = self.config
        b = _log_uniform(*cfg.background_range, n, gen)
        zero = torch.rand(n, generator=gen) < cfg.background_zero
        return torch.where(zero, torch.zeros(()), b)

    def orientation_exposure(self, counts: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """(len(counts), n_q, n_E) relative exposure of random orientation subsets."""
        seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        sel = self.bank.selection(counts, np.random.default_rng(seed))
        exposure = torch.from_numpy(sel.astype(np.float32)) @ self._exposure
        return exposure.reshape(len(counts), *self.bank.shape)

    def __call__(
        self, clean: torch.Tensor, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Augment a batch.

        Parameters
        ----------
        clean
            (B, n_q, n_E) float32 forward-model spectra.
        gen
            Random generator (the same state gives the same batch).

        Returns
        -------
        spectra, mask, condition
            (B, n_q, n_E) float32 intensities (0 where unmeasured), (B, n_q, n_E) bool
            measured bins, (B,) int64 condition (0 clean, 1 paper noise, 2 orientations).
        """
        cfg = self.config
        n = clean.shape[0]
        u = torch.rand(n, generator=gen)
        cond = torch.where(
            u < cfg.p_clean,
            0,
            torch.where(u < cfg.p_clean + cfg.p_paper, 1, 2),
        ).to(torch.int64)
        x = clean.clone()
        weighted = torch.rand(n, generator=gen) < cfg.p_weight
        if bool(weighted.any()):
            x[weighted] = x[weighted] * self.weights(int(weighted.sum()), gen)
        x = minmax(x)
        mask = torch.ones_like(x, dtype=torch.bool)
        b = self.backgrounds(n, gen)[:, None, None]
        paper = cond == 1
        if bool(paper.any()):
            p = _log_uniform(*cfg.poisson_range, int(paper.sum()), gen)[:, None, None]
            lam = p * (x[paper] + b[paper])
            x[paper] = torch.poisson(lam, generator=gen) / p
        orient = cond == 2
        if bool(orient.any()):
            k = int(orient.sum())
            n_all = self.bank.n_orientations
            counts = np.exp(
                torch.rand(k, generator=gen, dtype=torch.float64).numpy() * math.log(n_all + 1)
            )
            counts = np.clip(np.floor(counts), 1, n_all).astype(np.int64)
            exposure = self.orientation_exposure(counts, gen)
            p1 = _log_uniform(*cfg.p1_range, k, gen)[:, None, None]
            scale = p1 * exposure
            measured = exposure > 0
            lam = scale * (x[orient] + b[orient])
            noisy = torch.poisson(lam, generator=gen) / scale.clamp(min=1e-12)
            x[orient] = torch.where(measured, noisy, torch.zeros(()))
            mask[orient] = measured
        return x, mask, cond
