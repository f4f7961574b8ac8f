"""What a prediction request may ask: its limits, the checks of its settings and the error
it gets when it asks for something that cannot be answered.

The atom limits of the outputs (primitive-cell atoms): :data:`MAX_CIF_ATOMS` for ``iqe`` and
``detector`` and for FCs given as coefficients of a CIF's basis,
:data:`~model_server.prediction.spectra.MAX_ATOMS_POWDER` for ``powder``,
:data:`~model_server.prediction.spectra.MAX_ATOMS_DOS` for ``dos`` and ``indirect``
(:func:`atom_limit`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from model_server.exceptions import ModelServerError
from model_server.prediction.cache import instrument
from model_server.prediction.indirect import INDIRECT_INSTRUMENTS
from model_server.prediction.results import OUTPUTS
from model_server.prediction.spectra import MAX_ATOMS_DOS, MAX_ATOMS_POWDER
from simulations.exceptions import SimulationError
from simulations.lattice.backgrounds import COMPONENTS
from simulations.lattice.grid import Grid

__all__ = [
    "DEFAULT_BACKGROUNDS",
    "FC_SOURCES",
    "MAX_CIF_ATOMS",
    "MAX_OMEGAS",
    "MAX_TEMPERATURE",
    "PredictionError",
    "PredictionOptions",
    "atom_limit",
    "check_atom_limits",
    "check_ei",
    "check_options",
]

#: The background components of a request that names none (the can is asked for).
DEFAULT_BACKGROUNDS = ("elastic", "multiphonon", "tof_background")
#: Where a prediction's force constants come from.
FC_SOURCES = ("reference", "given", "e3nn", "imported")
#: Highest sample temperature, K (the API's schema and the CLI take the same range).
MAX_TEMPERATURE = 2000.0
#: Most goniometer angles in one prediction.
MAX_OMEGAS = 360
#: Most atoms in the primitive cell for ``iqe`` and ``detector`` (the 40^3 phonon table) and
#: for a CIF with given coefficients (its FC basis); see :func:`atom_limit` for the others.
MAX_CIF_ATOMS = 8


class PredictionError(ModelServerError, ValueError):
    """A prediction request that cannot be answered; ``status`` is the HTTP status to give
    (404 for an unknown run, 503 when the structure -> FC model is unavailable, else 422)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def atom_limit(output: str) -> int:
    """Most atoms in the primitive cell for ``output`` (with predicted FCs)."""
    if output in ("iqe", "detector"):
        return MAX_CIF_ATOMS
    if output == "powder":
        return MAX_ATOMS_POWDER
    return MAX_ATOMS_DOS


def check_atom_limits(n_atoms: int, outputs: Sequence[str], what: str) -> None:
    """Raise :class:`PredictionError` when ``what``'s ``n_atoms`` exceed an output's limit."""
    over = [o for o in outputs if n_atoms > atom_limit(o)]
    if over:
        limits = ", ".join(f"{o} {atom_limit(o)}" for o in OUTPUTS)
        raise PredictionError(
            f"{what}'s primitive cell has {n_atoms} atoms, more than the "
            f"{', '.join(over)} output{'s' if len(over) > 1 else ''} can take "
            f"(atom limits: {limits}); ask for other outputs or a smaller cell"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PredictionOptions:
    """The validated settings of one prediction (see
    :func:`model_server.prediction.predict.predict`)."""

    temperature: float
    omegas: NDArray[np.float64]
    outputs: tuple[str, ...]
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    powder_directions: int
    seed: int
    detector_angle_step: float
    dos_sigma: float
    indirect_instrument: str
    indirect_orders: int
    backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS
    background_fraction: float = 0.1
    can_atoms: float = 0.2


def check_options(
    *,
    temperature: float,
    omegas: Sequence[float],
    outputs: Sequence[str],
    u: Sequence[float],
    v: Sequence[float],
    powder_directions: int,
    seed: int,
    detector_angle_step: float,
    dos_sigma: float,
    indirect_instrument: str,
    indirect_orders: int,
    backgrounds: Sequence[str] = DEFAULT_BACKGROUNDS,
    background_fraction: float = 0.1,
    can_atoms: float = 0.2,
) -> PredictionOptions:
    """Check a request's settings (those of :func:`~model_server.prediction.predict.predict`
    besides the crystal, its FCs and Ei) and return them validated.

    Raises
    ------
    PredictionError
        The first setting out of range, unknown or malformed (the message says which).
    """
    wanted = _check_outputs(outputs)
    components = _check_backgrounds(backgrounds)
    _check_number("background_fraction", background_fraction, lo=0.0, hi=0.99)
    _check_number("can_atoms", can_atoms, lo=0.0, hi=100.0)
    _check_number("temperature", temperature, lo=0.0, hi=MAX_TEMPERATURE)
    _check_number("detector_angle_step", detector_angle_step, lo=0.05, hi=90.0, open_lo=True)
    _check_number("dos_sigma", dos_sigma, lo=0.0, hi=50.0, open_lo=True)
    if str(indirect_instrument).lower() not in INDIRECT_INSTRUMENTS:
        raise PredictionError(
            f"unknown indirect_instrument {indirect_instrument!r}; choose from "
            f"{', '.join(INDIRECT_INSTRUMENTS)}"
        )
    if not 1 <= int(indirect_orders) <= 4:
        raise PredictionError(f"indirect_orders must be 1..4, got {indirect_orders}")
    if not 1 <= int(powder_directions) <= 100_000:
        raise PredictionError(f"powder_directions must be 1..100000, got {powder_directions}")
    w = np.atleast_1d(np.asarray(omegas, dtype=float))
    if w.ndim != 1:
        raise PredictionError("omegas must be a flat list of angles in degrees")
    if len(w) > MAX_OMEGAS:
        raise PredictionError(f"at most {MAX_OMEGAS} omegas per prediction, got {len(w)}")
    uu, vv = _check_vector("u", u), _check_vector("v", v)
    if "iqe" in wanted or "detector" in wanted:
        if len(w) == 0:
            raise PredictionError("iqe and detector outputs need at least one omega")
        try:
            w = instrument().check_omegas(w)
        except SimulationError as exc:
            raise PredictionError(str(exc)) from exc
    return PredictionOptions(
        temperature=float(temperature),
        omegas=w,
        outputs=wanted,
        u=uu,
        v=vv,
        powder_directions=int(powder_directions),
        seed=int(seed),
        detector_angle_step=float(detector_angle_step),
        dos_sigma=float(dos_sigma),
        indirect_instrument=str(indirect_instrument).lower(),
        indirect_orders=int(indirect_orders),
        backgrounds=components,
        background_fraction=float(background_fraction),
        can_atoms=float(can_atoms),
    )


def check_ei(ei: float | None, default: float, grid: Grid, name: str) -> float:
    """Ei (meV; ``default`` when ``None``), which must exceed the top of ``name``'s energy
    grid."""
    e_top = float(grid.energy_edges[-1])
    ei_value = float(default if ei is None else ei)
    if not math.isfinite(ei_value) or not ei_value > e_top:
        raise PredictionError(
            f"Ei = {ei_value:g} meV is too small: it must exceed the top of {name}'s "
            f"energy grid, {e_top:g} meV (a neutron cannot lose more energy than it has)"
        )
    return ei_value


def _check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(str(o) for o in outputs))
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown:
        raise PredictionError(f"unknown outputs {unknown}; choose from {', '.join(OUTPUTS)}")
    if not wanted:
        raise PredictionError(f"no outputs requested; choose from {', '.join(OUTPUTS)}")
    return wanted


def _check_backgrounds(backgrounds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(backgrounds, str):
        backgrounds = [backgrounds]
    wanted = tuple(dict.fromkeys(str(b) for b in backgrounds))
    unknown = [b for b in wanted if b not in COMPONENTS]
    if unknown:
        raise PredictionError(
            f"unknown background components {unknown}; choose from {', '.join(COMPONENTS)} "
            "(an empty list: the one-phonon signal alone)"
        )
    return wanted


def _check_number(name: str, value: float, *, lo: float, hi: float, open_lo: bool = False) -> None:
    x = float(value)
    if not math.isfinite(x) or x < lo or x > hi or (open_lo and x == lo):
        raise PredictionError(f"{name} must be a number in {lo:g}..{hi:g}, got {value!r}")


def _check_vector(name: str, vec: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(vec, dtype=float)
    if a.shape != (3,) or not np.all(np.isfinite(a)) or np.abs(a).max() > 1e3:
        raise PredictionError(f"{name} must be three finite Miller indices, got {list(vec)!r}")
    if np.linalg.norm(a) < 1e-6:
        raise PredictionError(f"{name} must not be the zero vector")
    return (float(a[0]), float(a[1]), float(a[2]))
