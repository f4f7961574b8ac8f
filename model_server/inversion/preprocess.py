"""From a spectrum I(q, E) and its measured-bin mask to the network input.

The same steps run in training (on augmented forward-model spectra) and at inference (on
folded data), in torch, batched:

1. unmeasured bins (mask False, or not finite) are set to 0, negative intensities to 0;
2. 2 x 2 average pooling over (q, E) of the measured bins (a pooled bin is the mean of its
   measured sub-bins; its mask value is the fraction of them that were measured);
3. background: the median of the measured pooled bins is subtracted (phonon spectra are
   sparse, so the median is the flat background) and the result clipped at 0;
4. every q column is scaled to unit sum over its measured bins, then multiplied by
   ``n_E' / 4`` so that a phonon peak is of order 1, and clipped at :data:`CLIP`. Column
   scaling removes the q-dependent intensity of real data (structure factor, |Q|^2,
   Debye-Waller) that the forward model lacks: the Pearson correlation of a folded
   simulated Ge run with the forward model goes from 0.33 to 0.73 with it (README).

Output: (B, 2, n_q', n_E') float32, channel 0 the scaled intensity, channel 1 the mask
fraction, with ``n_q' = ceil(n_q / 2)``, ``n_E' = ceil(n_E / 2)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from model_server.exceptions import InputSpectrumError

__all__ = ["POOL", "check_spectrum", "pooled_shape", "prepare"]

#: Pooling factor over q and E.
POOL = 2
#: Upper bound of the scaled intensity (a column with one bright bin left after the
#: background reaches n_E' / 4; clean phonon peaks stay below about 3).
CLIP = 8.0


def pooled_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """(n_q', n_E') of the network input for a grid of shape (n_q, n_E)."""
    return (-(-shape[0] // POOL), -(-shape[1] // POOL))


def _pad(x: torch.Tensor) -> torch.Tensor:
    pq = (-x.shape[-2]) % POOL
    pe = (-x.shape[-1]) % POOL
    return F.pad(x, (0, pe, 0, pq)) if pq or pe else x


def prepare(spectra: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Network input from spectra and masks.

    Parameters
    ----------
    spectra
        (B, n_q, n_E) float, intensities in any units (NaN allowed where unmeasured).
    mask
        (B, n_q, n_E) bool or float: True / 1 where measured.

    Returns
    -------
    torch.Tensor
        (B, 2, n_q', n_E') float32: scaled intensity and measured fraction.
    """
    m = (mask > 0) & torch.isfinite(spectra)
    x = torch.where(m, spectra.clamp(min=0), torch.zeros((), dtype=spectra.dtype))
    mf = m.to(torch.float32)
    x = x.to(torch.float32)
    s = F.avg_pool2d(_pad(x).unsqueeze(1), POOL).squeeze(1)
    frac = F.avg_pool2d(_pad(mf).unsqueeze(1), POOL).squeeze(1)
    measured = frac > 0
    x = torch.where(measured, s / frac.clamp(min=1e-6), torch.zeros(()))
    flat = torch.where(measured, x, torch.full((), float("nan"))).flatten(1)
    background = torch.nan_to_num(flat.nanmedian(dim=1).values, nan=0.0)
    x = (x - background[:, None, None]).clamp(min=0) * measured
    col = x.sum(dim=2, keepdim=True)
    x = torch.where(col > 0, x / col.clamp(min=1e-12), torch.zeros(())) * (x.shape[2] / 4.0)
    x = x.clamp(max=CLIP)
    return torch.stack([x, frac], dim=1)


def check_spectrum(
    spectrum: NDArray[np.floating] | torch.Tensor,
    mask: NDArray[np.bool_] | torch.Tensor | None,
    shape: tuple[int, int],
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Validate one spectrum or a batch; return (B, n_q, n_E) float32 and bool arrays.

    Raises
    ------
    InputSpectrumError
        Wrong shape; a mask with no measured bin; measured bins that are all NaN / inf or
        hold a NaN; negative infinity; no positive intensity in the measured bins.
    """
    x = np.asarray(spectrum.detach().cpu() if isinstance(spectrum, torch.Tensor) else spectrum)
    if x.dtype.kind not in "fiu":
        raise InputSpectrumError(f"spectrum must be a real numeric array, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1:] != shape:
        raise InputSpectrumError(
            f"spectrum must be (n_q, n_E) = {shape} or (batch, n_q, n_E), got shape "
            f"{tuple(np.shape(spectrum))}"
        )
    if mask is None:
        m = np.isfinite(x)
    else:
        m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask)
        if m.ndim == 2:
            m = m[None]
        if m.shape != x.shape:
            raise InputSpectrumError(
                f"mask shape {tuple(np.shape(mask))} does not match spectrum shape "
                f"{tuple(np.shape(spectrum))}"
            )
        m = m.astype(bool)
    for i in range(len(x)):
        where = f" (spectrum {i} of the batch)" if len(x) > 1 else ""
        mi = m[i]
        if not mi.any():
            raise InputSpectrumError(
                f"the mask has no measured bin{where}: nothing to estimate from; "
                "measure at least one orientation first"
            )
        vals = x[i][mi]
        bad = ~np.isfinite(vals)
        if bad.any():
            raise InputSpectrumError(
                f"{int(bad.sum())} of {vals.size} measured bins are NaN or infinite{where}; "
                "mark unmeasured bins False in the mask"
            )
        if not (vals > 0).any():
            raise InputSpectrumError(
                f"the spectrum is zero (or negative) in every measured bin{where}: no signal "
                "to estimate force constants from"
            )
    return x.astype(np.float32), m
