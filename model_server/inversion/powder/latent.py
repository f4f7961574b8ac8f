"""What a powder model's latent space says: how many of its dimensions carry information,
how the force constants lie in it, and the latent chi^2.

The powder-VAE paper counts the *active* latent dimensions, those whose posterior departs
from the prior, by the KL divergence of each dimension averaged over a data set::

    KL_d = < 0.5 (mu_d^2 + sigma_d^2 - log sigma_d^2 - 1) >

(nats); a dimension with KL_d above ``threshold`` is active. With 5 force constants
varied in the training set, an honest encoder has about 5 active dimensions of its 30:
the count is how many constants the spectra determine.

:func:`latent_map` projects the encoder's means onto two dimensions (PCA, the paper's
linear baseline; UMAP when ``umap-learn`` is installed) to be coloured by each force
constant (:func:`plot_latent_map`). :func:`latent_chi2` is the goodness of fit of the
magnetic-inverse-scattering paper (Samarakoon & Tennant): the squared distance between the
latent means of the data and of the model's spectrum at a parameter set, which they found
less sensitive to artefacts of the data than the chi^2 of the intensities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.inversion.powder.artifact import PowderModel, load_powder_model
from model_server.inversion.preprocess import prepare

__all__ = [
    "ACTIVE_KL",
    "active_dimensions",
    "latent_chi2",
    "latent_map",
    "latent_means",
    "plot_latent_map",
]

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


def latent_means(
    model: PowderModel | str | Path,
    spectra: NDArray[np.floating],
    masks: NDArray[np.bool_] | None = None,
    *,
    chunk: int = 500,
) -> NDArray[np.float64]:
    """(N, latent) encoder means of (N, n_Q, n_E) spectra on the model's crop (``masks``
    True where measured, default finite)."""
    m = model if isinstance(model, PowderModel) else load_powder_model(model)
    x = np.asarray(spectra, dtype=np.float32)
    mk = np.isfinite(x) if masks is None else np.broadcast_to(np.asarray(masks, bool), x.shape)
    kin = torch.from_numpy(m.kinematic_mask)
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), chunk):
            xs = torch.nan_to_num(torch.from_numpy(x[s : s + chunk]))
            inputs = prepare(xs, torch.from_numpy(np.array(mk[s : s + chunk], dtype=bool)) & kin)
            mu, _ = m.vae.encoder(inputs)  # type: ignore[operator]
            out.append(mu.double().numpy())
    return np.concatenate(out)


def latent_map(mu: NDArray[np.floating], method: str = "pca", *, seed: int = 0) -> dict[str, Any]:
    """Two-dimensional map of latent means ``mu`` (N, latent).

    ``method``: ``"pca"`` (the two leading principal components; ``explained`` gives the
    variance share of each of the first 10) or ``"umap"`` (``umap-learn``, 15 neighbours;
    raises ImportError without it). Returns ``xy`` (N, 2) and the method's facts.
    """
    z = np.asarray(mu, dtype=np.float64)
    if method == "pca":
        zc = z - z.mean(axis=0)
        _, sv, vt = np.linalg.svd(zc, full_matrices=False)
        var = sv**2 / max(float((sv**2).sum()), 1e-300)
        return {"method": "pca", "xy": zc @ vt[:2].T, "explained": var[:10].tolist()}
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=seed, n_jobs=1)
        return {"method": "umap", "xy": np.asarray(reducer.fit_transform(z)), "n_neighbors": 15}
    raise ValueError(f"method must be 'pca' or 'umap', got {method!r}")


def plot_latent_map(
    maps: list[dict[str, Any]],
    fc: NDArray[np.floating],
    names: list[str] | tuple[str, ...],
    out: str | Path,
    title: str,
) -> Path:
    """One row per map (:func:`latent_map`), one panel per force constant, each point
    coloured by that constant (eV/A^2). PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fc = np.asarray(fc, dtype=float)
    fig, axes = plt.subplots(
        len(maps), len(names), figsize=(3.1 * len(names), 2.9 * len(maps)), squeeze=False
    )
    for r, mp in enumerate(maps):
        xy = np.asarray(mp["xy"])
        for c, name in enumerate(names):
            ax = axes[r, c]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=fc[:, c], s=3, cmap="viridis", rasterized=True)
            fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{name} (eV/A^2)", fontsize=9)
            if c == 0:
                label = mp["method"].upper()
                if mp["method"] == "pca":
                    ex = mp["explained"]
                    label += f" ({100 * ex[0]:.0f} % + {100 * ex[1]:.0f} %)"
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def latent_chi2(
    mu_data: NDArray[np.floating], mu_model: NDArray[np.floating]
) -> NDArray[np.float64]:
    """Latent chi^2: squared distance between the data's latent mean ``mu_data``
    (latent,) and the model spectra's ``mu_model`` (M, latent) -> (M,)."""
    d = np.asarray(mu_model, dtype=np.float64) - np.asarray(mu_data, dtype=np.float64)[None, :]
    return np.asarray((d**2).sum(axis=1))
