"""Coverage of single orientations from the instrument model: masks and exposure.

One goniometer angle measures part of the (q, E) grid with a bin-dependent exposure: the
instrument model's coverage (sum of k_f/k_i dOmega dE of the detector cells folded into each
bin, sr meV, :meth:`consumers.reduction.folding.Folder.coverage`). A bin is measured where the
coverage
is positive. For Ge at the default mounting one orientation reaches about 94 % of the bins
(folding brings many Brillouin zones into the path), but with exposures that vary by orders
of magnitude; what accumulating orientations changes is mostly the exposure, hence the
counting noise, and the last few percent of bins.

A :class:`CoverageBank` holds these coverages for a set of angles of one crystal mounting
(by default the 120 angles 0..119 deg of :class:`simulations.runs.simulate.RunPlan`), stored as
8-bit
square-root codes (about 1 % precision, a zero code only for unmeasured bins), and gives the
relative exposure of any subset of orientations: the augmentation of partial coverage and
counting noise in training, and the evaluation by number of orientations.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from model_server.exceptions import ArtifactError, TrainingError

__all__ = ["CoverageBank", "build_coverage_bank"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class CoverageBank:
    """Per-orientation relative exposure of one crystal mounting.

    Attributes
    ----------
    exposure
        (n_omega, n_q, n_E) float32, dimensionless: each orientation's coverage divided by
        the mean coverage of measured bins over all orientations (so a well-measured bin of
        one orientation has about 1, and ``n`` orientations about ``n``); 0 = unmeasured.
    omegas
        (n_omega,) float, goniometer angles, degrees.
    grid_fingerprint
        Fingerprint of the (q, E) grid.
    description
        How the bank was made (instrument, orientation vectors, Ei, reference coverage).
    """

    exposure: NDArray[np.float32]
    omegas: NDArray[np.float64]
    grid_fingerprint: str
    description: dict[str, object]

    @property
    def n_orientations(self) -> int:
        """Number of orientations in the bank."""
        return int(self.exposure.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(n_q, n_E) of one orientation."""
        return (int(self.exposure.shape[1]), int(self.exposure.shape[2]))

    @property
    def masks(self) -> NDArray[np.bool_]:
        """(n_omega, n_q, n_E) bool: True where an orientation measures the bin."""
        return np.asarray(self.exposure > 0)

    def subset_exposure(self, indices: NDArray[np.integer] | list[int]) -> NDArray[np.float32]:
        """(n_q, n_E) relative exposure of the orientations ``indices`` together."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            raise TrainingError("an exposure needs at least one orientation")
        return np.asarray(self.exposure[idx].sum(axis=0), dtype=np.float32)

    def selection(self, counts: NDArray[np.integer], rng: np.random.Generator) -> NDArray[np.bool_]:
        """(len(counts), n_omega) bool: for each row, ``counts[i]`` distinct random angles."""
        n = self.n_orientations
        k = np.clip(np.asarray(counts, dtype=np.int64), 1, n)
        keys = rng.random((len(k), n))
        ranks = np.argsort(np.argsort(keys, axis=1), axis=1)
        return np.asarray(ranks < k[:, None])

    def save(self, path: str | Path) -> Path:
        """Write the bank (8-bit square-root codes, compressed) to an ``.npz`` file."""
        path = Path(path)
        top = float(self.exposure.max()) if self.exposure.size else 1.0
        code = np.sqrt(np.clip(self.exposure, 0, None) / max(top, 1e-30)) * 255.0
        code = np.where(self.exposure > 0, np.clip(np.round(code), 1, 255), 0).astype(np.uint8)
        np.savez_compressed(
            path,
            code=code,
            top=np.asarray(top),
            omegas=self.omegas,
            grid_fingerprint=np.asarray(self.grid_fingerprint),
            description=np.asarray(json.dumps(self.description)),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> CoverageBank:
        """Read a bank written by :meth:`save`."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                code = f["code"].astype(np.float32) / 255.0
                return cls(
                    exposure=(code * code * float(f["top"])).astype(np.float32),
                    omegas=np.asarray(f["omegas"], dtype=float),
                    grid_fingerprint=str(f["grid_fingerprint"]),
                    description=json.loads(str(f["description"])),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ArtifactError(f"cannot read the coverage bank {path}: {exc}") from exc


def build_coverage_bank(
    material: str,
    omegas: NDArray[np.float64] | None = None,
    *,
    u: tuple[float, float, float] = (1.0, 0.0, 0.0),
    v: tuple[float, float, float] = (0.0, 1.0, 0.0),
    ei: float | None = None,
    progress: bool = True,
) -> CoverageBank:
    """Coverage of single orientations from the ARCS-like instrument model (~0.3 s each).

    Parameters
    ----------
    material
        Shipped material; its default grid and Ei (``simulations.lattice.materials``).
    omegas
        (n,) goniometer angles, degrees; default 0, 1, ..., 119 (``RunPlan``'s default).
    u, v
        Orientation vectors of the mounting (conventional hkl), as ``RunPlan``'s defaults.
    ei
        Incident energy, meV (default: the material's).
    """
    from tqdm import tqdm

    from consumers.reduction.folding import Folder
    from consumers.reduction.table import FoldTable
    from simulations.instrument.spectrometer import Instrument, Orientation
    from simulations.lattice.materials import setup

    ms = setup(material)
    w = np.arange(0.0, 120.0) if omegas is None else np.asarray(omegas, dtype=float)
    e = float(ei if ei is not None else ms.defaults.ei)
    table = FoldTable.cached(ms.crystal, ms.grid)
    folder = Folder(
        table, ms.grid, Instrument.arcs_like(), Orientation.from_vectors(ms.crystal, u, v), e
    )
    cov = np.zeros((len(w), *ms.grid.shape), dtype=np.float64)
    for k, omega in enumerate(tqdm(w, desc=f"{material} coverage", disable=not progress)):
        cov[k] = folder.coverage(float(omega))
    measured = cov > 0
    if not measured.any():
        raise TrainingError(f"no orientation of {material} measures any bin of its grid")
    reference = float(cov[measured].mean())
    logger.info(
        "%s: %d orientations, %.1f %% of bins per orientation, %.1f %% in their union",
        material,
        len(w),
        100 * measured.mean(),
        100 * measured.any(axis=0).mean(),
    )
    return CoverageBank(
        exposure=(cov / reference).astype(np.float32),
        omegas=w,
        grid_fingerprint=ms.grid.fingerprint,
        description={
            "instrument": "ARCS-like (simulations.instrument.spectrometer.Instrument.arcs_like)",
            "u": list(u),
            "v": list(v),
            "ei_meV": e,
            "omegas_deg": f"{w.min():g}..{w.max():g} ({len(w)} angles)",
            "reference_coverage_sr_meV": reference,
        },
    )
