"""What a powder model's latent space says: how many of its dimensions carry information.

The powder-VAE paper counts the *active* latent dimensions, those whose posterior departs
from the prior, by the KL divergence of each dimension averaged over a data set::

    KL_d = < 0.5 (mu_d^2 + sigma_d^2 - log sigma_d^2 - 1) >

(nats); a dimension with KL_d above ``threshold`` is active. With 5 force constants
varied in the training set, an honest encoder has about 5 active dimensions of its 30:
the count is how many constants the spectra determine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.inversion.powder.artifact import PowderModel, load_powder_model
from model_server.inversion.preprocess import prepare

__all__ = ["ACTIVE_KL", "active_dimensions"]

#: KL (nats) above which a latent dimension counts as active (the usual 0.01).
ACTIVE_KL = 0.01


def active_dimensions(
    model: PowderModel | str | Path,
    spectra: NDArray[np.floating],
    masks: NDArray[np.bool_] | None = None,
    *,
    threshold: float = ACTIVE_KL,
) -> dict[str, Any]:
    """Per-dimension KL of the model's encoder over ``spectra`` ((N, n_Q, n_E) on its
    crop; ``masks`` True where measured, default finite), and the active ones.

    Returns ``kl_per_dimension`` (latent,) nats, sorted descending too
    (``kl_sorted``), ``active`` (the count above ``threshold``), ``latent``, ``n_fc``.
    """
    m = model if isinstance(model, PowderModel) else load_powder_model(model)
    x = torch.as_tensor(np.asarray(spectra, dtype=np.float32))
    mask = torch.isfinite(x) if masks is None else torch.as_tensor(np.asarray(masks, bool))
    kin = torch.from_numpy(m.kinematic_mask)
    with torch.inference_mode():
        inputs = prepare(torch.nan_to_num(x), mask & kin[None])
        _, mu, logvar, _ = m.vae(inputs)  # type: ignore[operator]
        kl = 0.5 * (mu**2 + torch.exp(logvar) - logvar - 1.0).mean(dim=0)
    values = kl.double().numpy()
    return {
        "kl_per_dimension": [float(v) for v in values],
        "kl_sorted": [float(v) for v in np.sort(values)[::-1]],
        "active": int(np.sum(values > threshold)),
        "threshold_nats": float(threshold),
        "latent": len(values),
        "n_fc": len(m.meta.get("fc_names", [])),
        "n_spectra": int(x.shape[0]),
    }
