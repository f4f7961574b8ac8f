"""Energy resolution of a direct-geometry spectrometer as a function of energy transfer.

The default comes from PACE's ``resins`` library (PyChop fits for ARCS, SEQUOIA, MAPS,
MERLIN...). Its Gaussian width sigma(E) is sampled once and stored as a polynomial in E, so
that the forward model evaluates it in torch, batched and differentiable, and so that a
frozen model can record exactly what resolution it was trained with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from simulations.cache import cache_root
from simulations.exceptions import GridError

__all__ = ["EnergyResolution", "instrument_resolution"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class EnergyResolution:
    """Gaussian energy resolution sigma(E) = polyval(coefficients, E).

    Attributes
    ----------
    instrument
        Instrument name, e.g. ``"ARCS"``, or ``"constant"``.
    ei
        Incident energy, meV.
    chopper_frequency
        Fermi chopper frequency, Hz (0 for a constant width).
    coefficients
        Polynomial coefficients, highest power first; E in meV, sigma in meV.
    e_max
        Largest energy transfer (meV) where the fit is valid (below Ei).
    """

    instrument: str
    ei: float
    chopper_frequency: float
    coefficients: tuple[float, ...]
    e_max: float

    def sigma(self, energy: NDArray[np.float64]) -> NDArray[np.float64]:
        """Gaussian standard deviation (meV) at energy transfers ``energy`` (meV)."""
        e = np.clip(np.asarray(energy, dtype=float), 0.0, self.e_max)
        return np.maximum(np.polyval(self.coefficients, e), 1e-3)

    def fwhm(self, energy: NDArray[np.float64]) -> NDArray[np.float64]:
        """Full width at half maximum (meV)."""
        return self.sigma(energy) * 2.0 * np.sqrt(2.0 * np.log(2.0))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description."""
        return {
            "instrument": self.instrument,
            "ei_meV": self.ei,
            "chopper_frequency_Hz": self.chopper_frequency,
            "sigma_poly_meV": list(self.coefficients),
            "e_max_meV": self.e_max,
        }

    @classmethod
    def constant(cls, sigma: float, e_max: float = 1e3) -> EnergyResolution:
        """A constant Gaussian width ``sigma`` (meV)."""
        if not sigma > 0:
            raise GridError(f"resolution width must be > 0 meV, got {sigma}")
        return cls(
            instrument="constant",
            ei=float("inf"),
            chopper_frequency=0.0,
            coefficients=(float(sigma),),
            e_max=float(e_max),
        )


def instrument_resolution(
    instrument: str = "ARCS",
    ei: float = 80.0,
    chopper_frequency: float = 600.0,
    e_max: float | None = None,
    degree: int = 3,
) -> EnergyResolution:
    """Resolution of a real instrument from ``resins`` (PyChop fit), fitted by a polynomial.

    Parameters
    ----------
    instrument
        A ``resins`` instrument name: ARCS, SEQUOIA, MAPS, MERLIN, MARI, ...
    ei
        Incident energy, meV.
    chopper_frequency
        Fermi chopper frequency, Hz.
    e_max
        Highest energy transfer needed, meV (default 0.95 Ei). Must be below Ei.
    degree
        Polynomial degree of the stored fit.

    Raises
    ------
    GridError
        If Ei is not positive, ``e_max`` is not below Ei, or resins rejects the setting.
    """
    if not np.isfinite(ei) or ei <= 0:
        raise GridError(f"incident energy Ei must be a positive number of meV, got {ei}")
    e_max = 0.95 * ei if e_max is None else float(e_max)
    if e_max >= ei:
        raise GridError(
            f"Ei = {ei} meV is too small for energy transfers up to {e_max} meV: a neutron "
            "cannot lose more energy than it has; choose Ei above the grid's E max"
        )
    key = _resolution_key(instrument, ei, chopper_frequency, e_max, degree)
    stored = _read_resolution(key)
    if stored is not None:
        return stored
    try:
        from resins import Instrument

        model = Instrument.from_default(instrument).get_resolution_function(
            "PyChop_fit", e_init=float(ei), chopper_frequency=float(chopper_frequency)
        )
        energies = np.linspace(0.0, e_max, 64)
        sigma = np.asarray(model.get_characteristics(energies[:, None])["sigma"], dtype=float)
    except Exception as exc:  # resins raises plain exceptions for bad settings
        raise GridError(
            f"resins has no resolution for {instrument} at Ei={ei} meV, "
            f"chopper {chopper_frequency} Hz: {exc}"
        ) from exc
    if not np.all(np.isfinite(sigma)) or np.any(sigma <= 0):
        raise GridError(f"resins gave an invalid resolution for {instrument} at Ei={ei} meV")
    coeffs = np.polyfit(energies, sigma, degree)
    err = np.max(np.abs(np.polyval(coeffs, energies) - sigma) / sigma)
    logger.debug("%s Ei=%g: sigma(E) polynomial fit, max rel. error %.2g", instrument, ei, err)
    result = EnergyResolution(
        instrument=instrument,
        ei=float(ei),
        chopper_frequency=float(chopper_frequency),
        coefficients=tuple(float(c) for c in coeffs),
        e_max=e_max,
    )
    _write_resolution(key, result)
    return result


def _resolution_key(
    instrument: str, ei: float, chopper_frequency: float, e_max: float, degree: int
) -> str:
    """Hash of a resolution fit's settings and the ``resins`` version that made it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        resins_version = version("resins")
    except PackageNotFoundError:
        resins_version = "none"
    text = json.dumps(
        [instrument, float(ei), float(chopper_frequency), float(e_max), int(degree), resins_version]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _resolution_path(key: str) -> Path:
    return cache_root() / "resolution" / f"{key}.json"


def _read_resolution(key: str) -> EnergyResolution | None:
    """A fit stored by :func:`_write_resolution` (``resins`` and scipy.stats take 0.6 s to
    import: a restarted service reads the fit instead), or None."""
    try:
        d = json.loads(_resolution_path(key).read_text())
        return EnergyResolution(
            instrument=str(d["instrument"]),
            ei=float(d["ei"]),
            chopper_frequency=float(d["chopper_frequency"]),
            coefficients=tuple(float(c) for c in d["coefficients"]),
            e_max=float(d["e_max"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_resolution(key: str, res: EnergyResolution) -> None:
    path = _resolution_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "instrument": res.instrument,
                    "ei": res.ei,
                    "chopper_frequency": res.chopper_frequency,
                    "coefficients": list(res.coefficients),
                    "e_max": res.e_max,
                }
            )
        )
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache: the fit is made again next time
        logger.debug("resolution fit not cached at %s: %s", path, exc)
