"""Harmonic force constants from pretrained universal machine-learned force fields.

This module wraps pretrained universal interatomic potentials whose weights ship
*inside* their installable wheels (CHGNet and SevenNet), so that no weights are
ever downloaded at run time.  It offers

* :func:`available_models` -- names of the models usable in this environment,
* :func:`make_calculator` -- an ASE calculator (CPU) for one of them,
* :func:`relax` -- a symmetry-preserving relaxation of cell and positions,
* :func:`build_phonopy` / :func:`force_constants` -- finite-displacement
  harmonic force constants through phonopy's Python API,
* :func:`compute_reference` -- relax + force constants in one call, returning
  an :class:`MLFFResult`,
* :func:`frequencies` -- phonon frequencies (THz) at a q-point.

Units follow ASE and phonopy's default (VASP-like) conventions: lengths in Å,
energies in eV, forces in eV/Å, force constants in eV/Å², masses in amu and
phonon frequencies in THz.

The packages are optional: install the project's ``mlff`` extra
(``pip install ".[mlff]"``).  Model weights are looked up on disk inside the
installed packages before anything is loaded; a model whose weights are not on
disk is reported as unavailable instead of being downloaded.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from simulations.exceptions import SimulationError

if TYPE_CHECKING:
    from ase import Atoms
    from ase.calculators.calculator import Calculator
    from phonopy import Phonopy

__all__ = [
    "MLFFResult",
    "MLFFUnavailableError",
    "available_models",
    "build_phonopy",
    "compute_reference",
    "conventional_lattice_constant",
    "force_constants",
    "frequencies",
    "known_models",
    "make_calculator",
    "relax",
]

logger = logging.getLogger(__name__)

#: Hint appended to every "package missing" error.
INSTALL_HINT = 'install the optional "mlff" extra of this project: pip install ".[mlff]"'


class MLFFUnavailableError(SimulationError, ImportError):
    """Raised when the package (or the weights) needed for a model is missing.

    Derives from :class:`ImportError` (so ``except ImportError`` keeps working)
    and from :class:`simulations.exceptions.SimulationError`.
    """


@dataclass(frozen=True)
class _ModelSpec:
    """Where a pretrained model lives and how to build its calculator.

    Attributes
    ----------
    package : str
        Top-level import name of the package shipping the model.
    checkpoint : str
        Checkpoint path relative to the package directory (inside
        site-packages).
    loader_key : str
        Name the package itself uses for the model (CHGNet ``model_name``);
        informational for SevenNet, which is loaded from ``checkpoint``.
    modal : str or None
        Fidelity (``modal``) of a multi-fidelity SevenNet model.
    """

    package: Literal["chgnet", "sevenn"]
    checkpoint: str
    loader_key: str
    modal: str | None = None


_MODELS: dict[str, _ModelSpec] = {
    "chgnet-0.3.0": _ModelSpec(
        "chgnet", "pretrained/0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar", "0.3.0"
    ),
    "chgnet-0.2.0": _ModelSpec(
        "chgnet", "pretrained/0.2.0/chgnet_0.2.0_e30f77s348m32.pth.tar", "0.2.0"
    ),
    "chgnet-r2scan": _ModelSpec(
        "chgnet",
        "pretrained/r2scan/chgnet_r2scan_transfer_learning_e15f36s161m23.pth.tar",
        "r2scan",
    ),
    "sevennet-0": _ModelSpec(
        "sevenn",
        "pretrained_potentials/SevenNet_0__11Jul2024/checkpoint_sevennet_0.pth",
        "7net-0",
    ),
    "sevennet-0-22may2024": _ModelSpec(
        "sevenn",
        "pretrained_potentials/SevenNet_0__22May2024/checkpoint_sevennet_0.pth",
        "7net-0_22May2024",
    ),
    "sevennet-l3i5": _ModelSpec(
        "sevenn", "pretrained_potentials/SevenNet_l3i5/checkpoint_l3i5.pth", "7net-l3i5"
    ),
    "sevennet-mf-0-pbe": _ModelSpec(
        "sevenn",
        "pretrained_potentials/SevenNet_MF_0/checkpoint_sevennet_mf_0.pth",
        "7net-mf-0",
        modal="PBE",
    ),
    "sevennet-mf-0-r2scan": _ModelSpec(
        "sevenn",
        "pretrained_potentials/SevenNet_MF_0/checkpoint_sevennet_mf_0.pth",
        "7net-mf-0",
        modal="R2SCAN",
    ),
}

#: Module that must import for a package's calculator to be usable.
_CALCULATOR_MODULE = {"chgnet": "chgnet.model.dynamics", "sevenn": "sevenn.calculator"}


def known_models() -> list[str]:
    """Return every model name this module knows, installed or not.

    Returns
    -------
    list of str
        Stable model names, e.g. ``"chgnet-0.3.0"`` or ``"sevennet-0"``.
    """
    return list(_MODELS)


def _package_dir(package: str) -> Path | None:
    """Locate an installed package's directory without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _checkpoint_path(name: str) -> Path | None:
    """Absolute checkpoint path of a model if the file is on disk, else None."""
    spec = _MODELS[name]
    pkg_dir = _package_dir(spec.package)
    if pkg_dir is None:
        return None
    path = pkg_dir / spec.checkpoint
    return path if path.is_file() else None


@cache
def _import_calculator_module(package: str) -> Any:
    """Import (once) the module holding a package's ASE calculator.

    Raises
    ------
    MLFFUnavailableError
        If the package or one of its runtime dependencies is not installed.
    """
    module_name = _CALCULATOR_MODULE[package]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(module_name)
    except ImportError as exc:  # includes ModuleNotFoundError of a dependency
        raise MLFFUnavailableError(
            f"cannot import {module_name!r} ({exc}); {INSTALL_HINT}"
        ) from exc


def available_models() -> list[str]:
    """Return the models that import and whose weights are on disk.

    A model counts as available only if its package (and the package's
    runtime dependencies) import and its checkpoint file is present inside
    the installed package, so using it can never trigger a download.

    Returns
    -------
    list of str
        Subset of :func:`known_models`, in the same order.
    """
    names: list[str] = []
    for name, spec in _MODELS.items():
        if _checkpoint_path(name) is None:
            continue
        try:
            _import_calculator_module(spec.package)
        except MLFFUnavailableError as exc:
            logger.debug("model %s unavailable: %s", name, exc)
            continue
        names.append(name)
    return names


def make_calculator(name: str, *, num_threads: int | None = None) -> Calculator:
    """Build an ASE calculator for a pretrained model, running on the CPU.

    Parameters
    ----------
    name : str
        One of :func:`known_models`, e.g. ``"chgnet-0.3.0"``.
    num_threads : int, optional
        If given, call ``torch.set_num_threads(num_threads)`` (process-wide).

    Returns
    -------
    ase.calculators.calculator.Calculator
        Calculator providing energy (eV), forces (eV/Å) and stress (eV/Å³).

    Raises
    ------
    ValueError
        If ``name`` is not a known model; the message lists the available ones.
    MLFFUnavailableError
        (an :class:`ImportError`) if the model's package is not installed or
        its weights are not inside the installed package.
    """
    if name not in _MODELS:
        raise ValueError(
            f"unknown MLFF model {name!r}; available: {available_models()} "
            f"(known: {known_models()})"
        )
    spec = _MODELS[name]
    module = _import_calculator_module(spec.package)
    path = _checkpoint_path(name)
    if path is None:
        raise MLFFUnavailableError(
            f"weights of {name!r} ({spec.checkpoint}) are not inside the installed "
            f"{spec.package!r} package and will not be downloaded; {INSTALL_HINT}"
        )

    import torch

    if num_threads is not None:
        torch.set_num_threads(num_threads)

    captured = io.StringIO()
    t0 = time.perf_counter()
    # Both packages print banners / warn about missing GPU accelerators: route
    # that to the logger instead of stdout.
    with contextlib.redirect_stdout(captured), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tensor product accelerator.*")
        calc: Calculator
        if spec.package == "chgnet":
            from chgnet.model import CHGNet

            model = CHGNet.from_file(
                str(path), mlp_out_bias=spec.loader_key == "0.2.0", version=spec.loader_key
            )
            calc = module.CHGNetCalculator(model=model, use_device="cpu")
        else:
            # An existing file path makes sevenn skip its name lookup, so no
            # download can be attempted.  Keep GPU-only backends off.
            for flag in ("SEVENNET_ENABLE_CUEQ", "SEVENNET_ENABLE_FLASH", "SEVENNET_ENABLE_OEQ"):
                if os.environ.get(flag) == "1":
                    logger.warning("ignoring %s=1: CPU calculator requested", flag)
                    os.environ[flag] = "0"
            calc = module.SevenNetCalculator(
                model=str(path), file_type="checkpoint", device="cpu", modal=spec.modal
            )
    for line in captured.getvalue().splitlines():
        logger.debug("%s: %s", name, line)
    logger.info("loaded %s from %s in %.2f s", name, path, time.perf_counter() - t0)
    return calc


@contextlib.contextmanager
def _quiet_known_warnings() -> Iterator[None]:
    """Silence harmless warnings the wrapped packages emit on every call."""
    with warnings.catch_warnings():
        # CHGNet converts ASE atoms to pymatgen, which drops FixSymmetry (the
        # constraint is applied by ASE, not by the model).
        warnings.filterwarnings("ignore", message="Only FixAtoms and FixCartesian")
        # CHGNet internals (torch autograd), harmless.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
        yield


def relax(
    atoms: Atoms,
    calculator: Calculator,
    fmax: float = 1e-4,
    *,
    steps: int = 500,
    relax_cell: bool = True,
    symprec: float = 1e-4,
    optimizer: Literal["BFGS", "FIRE"] = "BFGS",
) -> Atoms:
    """Relax cell and positions while keeping the space-group symmetry.

    Uses an ASE :class:`~ase.constraints.FixSymmetry` constraint, a
    :class:`~ase.filters.FrechetCellFilter` (when ``relax_cell``) and a
    BFGS or FIRE optimiser, so a cubic crystal stays exactly cubic.

    Parameters
    ----------
    atoms : ase.Atoms
        Starting structure; it is not modified.
    calculator : ase.calculators.calculator.Calculator
        Calculator providing forces and (for ``relax_cell``) stress.
    fmax : float, default 1e-4
        Convergence threshold in eV/Å on the largest atomic force and on the
        filter's cell "forces" (stress times volume / number of atoms, in eV/Å
        as well).
    steps : int, default 500
        Maximum number of optimiser steps.
    relax_cell : bool, default True
        Relax the cell as well as the positions.
    symprec : float, default 1e-4
        Symmetry tolerance in Å used by ``FixSymmetry`` (spglib).
    optimizer : {"BFGS", "FIRE"}, default "BFGS"
        ASE optimiser.

    Returns
    -------
    ase.Atoms
        Relaxed copy without constraints or calculator.
        ``info["relax_converged"]`` (bool), ``info["relax_steps"]`` (int),
        ``info["relax_max_force"]`` (eV/Å) and ``info["relax_max_stress"]``
        (eV/Å³) describe the outcome.  Failure to converge is logged as a
        warning, not raised.
    """
    from ase.constraints import FixSymmetry
    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS, FIRE

    work = atoms.copy()
    work.calc = calculator
    work.set_constraint(FixSymmetry(work, symprec=symprec))
    target: Any = FrechetCellFilter(work) if relax_cell else work
    opt_cls = {"BFGS": BFGS, "FIRE": FIRE}[optimizer]
    opt = opt_cls(target, logfile=None)
    with _quiet_known_warnings():
        converged = bool(opt.run(fmax=fmax, steps=steps))
        max_force = float(np.linalg.norm(work.get_forces(), axis=1).max())
        max_stress = float(np.abs(work.get_stress()).max()) if relax_cell else float("nan")
    n_steps = int(opt.get_number_of_steps())
    if converged:
        logger.info(
            "relaxed in %d steps: max |F| = %.2e eV/A, max |stress| = %.2e eV/A^3",
            n_steps,
            max_force,
            max_stress,
        )
    else:
        logger.warning(
            "relaxation not converged to fmax=%.1e eV/A in %d steps: "
            "max |F| = %.2e eV/A, max |stress| = %.2e eV/A^3",
            fmax,
            n_steps,
            max_force,
            max_stress,
        )

    relaxed = work.copy()  # Atoms.copy drops the calculator
    relaxed.set_constraint()
    relaxed.info.update(
        relax_converged=converged,
        relax_steps=n_steps,
        relax_max_force=max_force,
        relax_max_stress=max_stress,
    )
    return relaxed


def conventional_lattice_constant(atoms: Atoms, symprec: float = 1e-5) -> float:
    """Return the conventional lattice parameter ``a`` of a crystal.

    Parameters
    ----------
    atoms : ase.Atoms
        Any cell of the crystal (primitive or not).
    symprec : float, default 1e-5
        spglib symmetry tolerance in Å.

    Returns
    -------
    float
        Length in Å of the first vector of the spglib-standardised
        conventional cell (e.g. the cube edge of fcc/bcc/diamond crystals).
    """
    import spglib

    cell = (atoms.cell[:], atoms.get_scaled_positions(), atoms.numbers)
    std = spglib.standardize_cell(cell, to_primitive=False, no_idealize=False, symprec=symprec)
    if std is None:
        raise ValueError("spglib could not standardise the cell")
    return float(np.linalg.norm(np.asarray(std[0])[0]))


def _to_phonopy_atoms(atoms: Atoms) -> Any:
    from phonopy.structure.atoms import PhonopyAtoms

    return PhonopyAtoms(
        symbols=atoms.get_chemical_symbols(),
        cell=np.array(atoms.cell[:], dtype=float),
        scaled_positions=atoms.get_scaled_positions(),
        masses=atoms.get_masses(),
    )


def _forces(supercell: Any, calculator: Calculator) -> NDArray[np.float64]:
    """Forces (eV/Å) on a phonopy supercell, with the mean (drift) removed."""
    from ase import Atoms as AseAtoms

    atoms = AseAtoms(
        symbols=supercell.symbols,
        cell=supercell.cell,
        scaled_positions=supercell.scaled_positions,
        pbc=True,
    )
    atoms.calc = calculator
    with _quiet_known_warnings():
        forces = np.array(atoms.get_forces(), dtype=float)
    drift = forces.mean(axis=0)
    logger.debug("force drift %s eV/A", drift)
    return forces - drift


def build_phonopy(
    primitive: Atoms,
    calculator: Calculator,
    supercell_matrix: ArrayLike,
    displacement: float = 0.01,
    *,
    symprec: float = 1e-5,
    subtract_residual_forces: bool = False,
) -> Phonopy:
    """Compute finite-displacement harmonic force constants with phonopy.

    Parameters
    ----------
    primitive : ase.Atoms
        Unit cell (normally the relaxed primitive cell) in Å.  It is used as
        phonopy's unit cell with ``primitive_matrix=None``.
    calculator : ase.calculators.calculator.Calculator
        Calculator providing forces in eV/Å.
    supercell_matrix : array_like of int, shape (3, 3) or (3,)
        Supercell matrix relative to ``primitive``.
    displacement : float, default 0.01
        Atomic displacement amplitude in Å.
    symprec : float, default 1e-5
        phonopy symmetry tolerance in Å.
    subtract_residual_forces : bool, default False
        Subtract the forces of the undisplaced supercell from every displaced
        one (one extra force evaluation); useful for imperfectly relaxed
        structures with free internal coordinates.

    Returns
    -------
    phonopy.Phonopy
        Object with full (not compact), symmetrised force constants in eV/Å²
        (``.force_constants``, shape ``(N, N, 3, 3)`` for ``N`` supercell
        atoms) and a ready dynamical matrix, so that e.g.
        ``ph.get_frequencies([0, 0, 0])`` returns frequencies in THz.
    """
    from phonopy import Phonopy

    ph = Phonopy(
        _to_phonopy_atoms(primitive),
        supercell_matrix=np.asarray(supercell_matrix, dtype=int),
        primitive_matrix=None,
        symprec=symprec,
        log_level=0,
    )
    ph.generate_displacements(distance=displacement, is_plusminus="auto")
    supercells = ph.supercells_with_displacements
    assert supercells is not None
    t0 = time.perf_counter()
    sets = [_forces(sc, calculator) for sc in supercells]
    if subtract_residual_forces:
        sets = [f - _forces(ph.supercell, calculator) for f in sets]
    ph.forces = np.array(sets)
    logger.info(
        "%d displaced supercell(s) of %d atoms evaluated in %.1f s",
        len(sets),
        len(ph.supercell),
        time.perf_counter() - t0,
    )
    ph.produce_force_constants(calculate_full_force_constants=True, show_drift=False)
    ph.symmetrize_force_constants(show_drift=False)
    fc = ph.force_constants
    assert fc is not None
    assert fc.shape[0] == fc.shape[1] == len(ph.supercell)
    return ph


def force_constants(
    primitive: Atoms,
    calculator: Calculator,
    supercell_matrix: ArrayLike,
    displacement: float = 0.01,
    **kwargs: Any,
) -> NDArray[np.float64]:
    """Return full finite-displacement harmonic force constants.

    Thin wrapper around :func:`build_phonopy` (same parameters).

    Returns
    -------
    numpy.ndarray
        Shape ``(N, N, 3, 3)``, eV/Å², ``N`` = number of supercell atoms;
        ``fc[i, j, a, b] = d^2 E / du_ia du_jb``.
    """
    ph = build_phonopy(primitive, calculator, supercell_matrix, displacement, **kwargs)
    return np.array(ph.force_constants, dtype=float)


def frequencies(ph: Phonopy, q: ArrayLike) -> NDArray[np.float64]:
    """Phonon frequencies at one q-point.

    Non-deprecated equivalent of ``ph.get_frequencies(q)``.

    Parameters
    ----------
    ph : phonopy.Phonopy
        Phonopy object with force constants (e.g. from :func:`build_phonopy`).
    q : array_like, shape (3,)
        q-point in reduced coordinates of the reciprocal lattice of the
        phonopy primitive cell (here the cell passed to :func:`build_phonopy`).

    Returns
    -------
    numpy.ndarray
        Frequencies in THz, ascending; imaginary modes are negative.
    """
    qpoints = ph.run_qpoints(np.asarray(q, dtype=float).reshape(1, 3))
    return np.array(qpoints.frequencies[0], dtype=float)


@dataclass
class MLFFResult:
    """Outcome of :func:`compute_reference`.

    Attributes
    ----------
    model : str
        Model name.
    relaxed : ase.Atoms
        Relaxed unit (primitive) cell, Å.
    lattice_constant_a : float
        Conventional lattice parameter of the relaxed crystal, Å (see
        :func:`conventional_lattice_constant`).
    phonopy : phonopy.Phonopy
        Phonopy object holding the force constants (frequencies in THz).
    force_constants : numpy.ndarray
        Full supercell force constants, shape ``(N, N, 3, 3)``, eV/Å².
    wall_time_s : float
        Wall-clock time of the whole computation (loading, relaxation,
        forces), s.
    """

    model: str
    relaxed: Atoms
    lattice_constant_a: float
    phonopy: Phonopy
    force_constants: NDArray[np.float64]
    wall_time_s: float = float("nan")


def compute_reference(
    primitive_atoms: Atoms,
    model_name: str,
    supercell_matrix: ArrayLike,
    *,
    displacement: float = 0.01,
    fmax: float = 1e-4,
    relax_steps: int = 500,
    relax_cell: bool = True,
    num_threads: int | None = None,
    calculator: Calculator | None = None,
) -> MLFFResult:
    """Relax a crystal with a pretrained MLFF and compute its force constants.

    Parameters
    ----------
    primitive_atoms : ase.Atoms
        Starting (primitive) cell, Å.
    model_name : str
        One of :func:`available_models`.
    supercell_matrix : array_like of int, shape (3, 3) or (3,)
        Supercell matrix relative to ``primitive_atoms``.
    displacement : float, default 0.01
        Finite displacement, Å.
    fmax : float, default 1e-4
        Relaxation threshold, eV/Å (see :func:`relax`).
    relax_steps : int, default 500
        Maximum number of relaxation steps.
    relax_cell : bool, default True
        Relax the cell too (otherwise positions only).
    num_threads : int, optional
        ``torch.set_num_threads`` value applied when the calculator is built.
    calculator : ase.calculators.calculator.Calculator, optional
        Reuse an already built calculator for ``model_name``.

    Returns
    -------
    MLFFResult
    """
    t0 = time.perf_counter()
    calc = (
        calculator
        if calculator is not None
        else make_calculator(model_name, num_threads=num_threads)
    )
    relaxed = relax(primitive_atoms, calc, fmax=fmax, steps=relax_steps, relax_cell=relax_cell)
    a = conventional_lattice_constant(relaxed)
    ph = build_phonopy(relaxed, calc, supercell_matrix, displacement)
    fc = np.array(ph.force_constants, dtype=float)
    wall = time.perf_counter() - t0
    logger.info("%s: a = %.4f A, %.1f s", model_name, a, wall)
    return MLFFResult(
        model=model_name,
        relaxed=relaxed,
        lattice_constant_a=a,
        phonopy=ph,
        force_constants=fc,
        wall_time_s=wall,
    )
