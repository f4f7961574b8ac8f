"""The prediction endpoint's computation: the spectra a crystal is expected to give.

For a material or a CIF, a set of FCs (or none: the e3nn model predicts them), Ei, the
temperature and a list of goniometer angles, :func:`predict` returns up to five outputs
(the first three on the material's (q, E) grid energies, meV):

``iqe``
    The folded I(q, E) that those orientations would give: the expected spectrum of a
    measurement, ``I = sum(signal) / sum(coverage)`` over the orientations, null where no
    orientation covers a bin. It is computed from the event simulator's expected-count
    machinery and folded with the service's own fold table, so it is what a simulated run
    (:func:`simulations.runs.simulate.simulate_run`) folds to on average, without counting noise:

    * the full coherent one-phonon S(Q, E) (:class:`~simulations.lattice.sqe.CoherentSQE`:
      eigenvectors, Debye-Waller and Bose factors, the instrument's energy resolution at
      Ei) is evaluated by :meth:`OrientationSimulator.expected` on the super-pixels of the
      ARCS-like detector (1 x 4 pixels, as in simulated runs) at the grid's energy centres
      (phonon table on a 40^3 mesh, as simulated runs use);
    * every detector pixel's trajectory is folded exactly as :meth:`Folder.coverage` folds
      it (every 2nd pixel, 4 energy samples per bin, the fold table of
      :meth:`FoldTable.cached`), each sample weighted by ``k_f/k_i dOmega dE`` (the coverage)
      and by that weight times the S of its super-pixel (the signal). ``coverage`` is
      therefore the service's exposure per unit proton charge (sr meV), and ``intensity``
      the coverage-weighted mean S(Q, E) over the Q that fold into each bin, in
      mbarn / (sr meV) per atom: what the service's ``counts / exposure`` estimates, up to
      the flux x sample-size factor.

    This is cheaper than sampling events and physically the right target: the structure
    factor changes from zone to zone, so a path spectrum times a coverage mask (the
    training forward model) would not give the intensities a measurement sees.
``detector``
    The expected S(Q, E) on the detector for each omega (the phonon background that a
    magnetic measurement at that angle would sit on): the solid-angle (``k_f/k_i dOmega
    dE``) weighted mean S over the super-pixels of each in-plane scattering-angle bin
    (detector tube angle, degrees, summed over the tube height), mbarn / (sr meV) per atom,
    with |Q| (1/Angstrom) of each (angle, E) in the horizontal plane.
``powder``
    The coherent one-phonon powder spectrum S(|Q|, E): CoherentSQE averaged over
    ``powder_directions`` directions at every |Q| (a Fibonacci sphere under a random rotation
    per |Q|, seeded), mbarn / meV per atom (per steradian omitted, as for S), with the mask
    of the (|Q|, E) that the detector's scattering angles reach at Ei.

``dos``
    Phonon DOS and partial DOS (per element and per atom) on a Gamma-centred q mesh,
    Gaussian broadening ``dos_sigma`` meV, states/meV per primitive cell
    (:func:`model_server.prediction.spectra.phonon_dos`).
``indirect``
    The 1D S(E) of a VISION- or TOSCA-like indirect-geometry spectrometer in the incoherent
    approximation, fundamentals and overtones up to ``indirect_orders``, mbarn/(sr meV) per
    atom (:func:`model_server.prediction.indirect.indirect_spectrum`).

Where the force constants come from (``fc_source`` in the result):

``reference``
    A shipped material (``Ge``, ``Nb``, ``Al``) with one of its named FC sets
    (:func:`simulations.fcdb.reference.named_fc_set`; default ``mlff_mean``).
``given``
    Coefficients by name (for a shipped material the others are held at ``mlff_mean``; for
    a CIF every coefficient of its 4-shell basis must be given), or a run's latest estimate.
``e3nn``
    Predicted from the structure by the e3nn model (:mod:`model_server.prediction.fc_source`): the
    default for a CIF, ``fc="e3nn"`` for a shipped material. The predicted per-pair FCs are
    used as they are, through a one-coefficient basis
    (:meth:`model_server.prediction.crystal_fc.CrystalFC.basis`: no projection, every bond up to the
    model's cutoff kept). The result carries the model's ``distance`` from its training
    set, ``in_domain`` and ``message``; an out-of-domain prediction is returned with a
    warning first in ``warnings`` and in the PNG's title. For a CIF the energy grid reaches
    1.1 x the highest predicted mode (rounded up to 5 meV; at most 0.9 Ei when Ei is
    given) and the default Ei is 1.25 x that. Without a usable model the answer is an
    error with status 503 that says what is missing.

``imported``
    An FC file (phonopy YAML, CASTEP ``.castep_bin``;
    :mod:`model_server.prediction.fc_import`), mapped onto the material's or CIF's cell (or
    the file's own structure) and used as it is, with the non-analytic (LO-TO) term of its
    Born charges; for a shipped material also projected onto its named coefficients.

A CIF is read by :func:`model_server.prediction.cif_input.crystal_from_cif` (clear errors for
unparseable text, partial occupancy with a supercell hint, too many sites); its q-path and
grid follow the generic defaults of :func:`simulations.lattice.materials.setup`, and its fold table
is built on first use (seconds). Primitive-cell atom limits: :data:`MAX_CIF_ATOMS` for
``iqe`` and ``detector`` and for given coefficients (the phonon table and FC basis grow
quickly), :data:`~model_server.prediction.spectra.MAX_ATOMS_POWDER` for ``powder``,
:data:`~model_server.prediction.spectra.MAX_ATOMS_DOS` for ``dos`` and ``indirect``.

Everything that does not change between requests is cached
(:mod:`model_server.prediction.cache`): material setups, fold tables, forward models (the
dispersion and stability check), phonon tables per FC set, S(Q, E) models per (FCs, T, Ei)
and powder spectra. Predictions in one process run one at a time (a lock). The service
runs them in worker processes instead (:mod:`model_server.prediction.pool`: one
prediction per worker, BLAS on one thread, a time budget, killed when the client leaves).

The parts: the request's checks and limits (:mod:`model_server.prediction.request`), the
crystal and FCs (:mod:`model_server.prediction.fc_choice`), the single-crystal and powder
outputs (:mod:`model_server.prediction.outputs`); this module puts them together.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import ConsumerError
from model_server.exceptions import ModelServerError
from model_server.prediction.cache import (
    LOCK,
    Material,
    cached_mesh_modes,
    forward_model,
    instrument,
    sqe_model,
)
from model_server.prediction.crystal_fc import CrystalFC
from model_server.prediction.fc_choice import FCChoice, choose_fcs
from model_server.prediction.fc_import import FCFile
from model_server.prediction.fc_source import FCModelUnavailableError
from model_server.prediction.indirect import IndirectSpectrum, indirect_spectrum
from model_server.prediction.outputs import powder, single_crystal
from model_server.prediction.request import (
    DEFAULT_BACKGROUNDS,
    FC_SOURCES,
    MAX_CIF_ATOMS,
    MAX_OMEGAS,
    PredictionError,
    PredictionOptions,
    atom_limit,
    check_ei,
    check_options,
)
from model_server.prediction.results import (
    DEFAULT_OUTPUTS,
    OUTPUTS,
    DetectorPrediction,
    IQEPrediction,
    PowderPrediction,
    Prediction,
)
from model_server.prediction.spectra import (
    PhononDOS,
    phonon_dos,
    powder_spectrum,
    single_threaded_blas,
)
from simulations.exceptions import SimulationError
from simulations.lattice.pair_phonons import MeshPhonons
from simulations.lattice.sqe import CoherentSQE
from simulations.units import THZ_TO_MEV, VASP_TO_THZ

__all__ = [
    "DEFAULT_OUTPUTS",
    "FC_SOURCES",
    "MAX_CIF_ATOMS",
    "MAX_OMEGAS",
    "OUTPUTS",
    "DetectorPrediction",
    "IQEPrediction",
    "PowderPrediction",
    "Prediction",
    "PredictionError",
    "atom_limit",
    "powder_spectrum",
    "predict",
]


def predict(
    material: str | None = None,
    *,
    cif: str | None = None,
    fc: str | Mapping[str, Any] | NDArray[np.float64] | FCFile | None = None,
    fc_label: str | None = None,
    ei: float | None = None,
    temperature: float = 5.0,
    omegas: Sequence[float] = (0.0,),
    outputs: Sequence[str] = DEFAULT_OUTPUTS,
    u: Sequence[float] = (1.0, 0.0, 0.0),
    v: Sequence[float] = (0.0, 1.0, 0.0),
    powder_directions: int = 128,
    seed: int = 0,
    detector_angle_step: float = 2.0,
    dos_sigma: float = 0.5,
    indirect_instrument: str = "vision",
    indirect_orders: int = 2,
    backgrounds: Sequence[str] = DEFAULT_BACKGROUNDS,
    background_fraction: float = 0.1,
    can_atoms: float = 0.2,
) -> Prediction:
    """Expected spectra of a crystal (see the module docstring).

    Parameters
    ----------
    material
        A shipped material (``"Ge"``, ``"Nb"``, ``"Al"``); or give ``cif`` instead.
    cif
        CIF text of an ordered crystal.
    fc
        ``None``: ``mlff_mean`` for a shipped material, the e3nn model's prediction for a
        CIF. ``"e3nn"``: the model's prediction (a shipped material too). A named set
        (``"mlff_mean"``, a force-field name, ``"raman"`` for Ge), a mapping ``{name:
        value}`` or ``{"coefficients": {name: value}}`` (eV/A^2; for a shipped material the
        coefficients left out are ``mlff_mean``'s; for a CIF all of its basis), or a full
        vector. An :class:`~model_server.prediction.fc_import.FCFile` (phonopy, CASTEP):
        its FCs as they are (``fc_source`` ``imported``; ``material`` and ``cif`` may both be
        left out, the file's structure is then used).
    fc_label
        Label of the FCs in the result (default: the set's name, ``custom``, or the model).
    ei
        Incident energy, meV (default: the material's); must exceed the grid's top energy.
    temperature
        Sample temperature, K.
    omegas
        Goniometer angles, degrees (within the goniometer limits), for ``iqe`` and
        ``detector``.
    outputs
        Any of :data:`OUTPUTS` (default :data:`DEFAULT_OUTPUTS`).
    u, v
        Orientation vectors (conventional hkl) along the beam / in the horizontal plane at
        omega = 0 (those of simulated runs by default).
    powder_directions, seed
        Directions averaged per |Q| and the seed of their rotations.
    detector_angle_step
        Width of the detector output's angle bins, degrees.
    dos_sigma
        Gaussian broadening of the ``dos`` output, meV.
    indirect_instrument, indirect_orders
        ``"vision"`` or ``"tosca"``; highest phonon order (1..4) of the ``indirect`` output.
    backgrounds
        The background components of ``iqe``, ``detector`` and ``powder`` (any of
        :data:`~simulations.lattice.backgrounds.COMPONENTS`; default
        :data:`~model_server.prediction.request.DEFAULT_BACKGROUNDS`; ``()``: none).
    background_fraction
        Share of a simulated run's events in the flat time-of-flight background
        (``tof_background``; 0.1 as in ``steer simulate run``).
    can_atoms
        Al atoms of the can in the beam per sample atom (``can``).

    Raises
    ------
    PredictionError
        For anything the request gets wrong (the message says what); status 503 when the
        FCs are to come from the e3nn model and it is unavailable.
    """
    t_start = time.perf_counter()
    options = check_options(
        temperature=temperature,
        omegas=omegas,
        outputs=outputs,
        u=u,
        v=v,
        powder_directions=powder_directions,
        seed=seed,
        detector_angle_step=detector_angle_step,
        dos_sigma=dos_sigma,
        indirect_instrument=indirect_instrument,
        indirect_orders=indirect_orders,
        backgrounds=backgrounds,
        background_fraction=background_fraction,
        can_atoms=can_atoms,
    )
    with LOCK, single_threaded_blas():
        try:
            return _predict_locked(
                material=material,
                cif=cif,
                fc=fc,
                fc_label=fc_label,
                ei=ei,
                options=options,
                t_start=t_start,
            )
        except PredictionError:
            raise
        except FCModelUnavailableError as exc:
            raise PredictionError(str(exc), status=503) from exc
        except (SimulationError, ConsumerError, ModelServerError) as exc:
            raise PredictionError(str(exc)) from exc


def _predict_locked(
    *,
    material: str | None,
    cif: str | None,
    fc: str | Mapping[str, Any] | NDArray[np.float64] | FCFile | None,
    fc_label: str | None,
    ei: float | None,
    options: PredictionOptions,
    t_start: float,
) -> Prediction:
    """:func:`predict` of validated options, under :data:`LOCK`."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    choice = choose_fcs(material, cif, fc, options.outputs, ei)
    seconds["fc"] = time.perf_counter() - t
    t = time.perf_counter()
    ms = choice.mat.setup
    ei_value = check_ei(ei, ms.defaults.ei, ms.grid, choice.mat.name)
    phonons = _phonons(choice, options.outputs)
    seconds["setup"] = time.perf_counter() - t
    computed = _outputs(choice, phonons, ei_value, options, seconds)
    seconds["total"] = time.perf_counter() - t_start
    qp = ms.grid.qpath
    ins = instrument()
    model = computed.model
    resolution = model.resolution if model is not None else ins.resolution(ei_value)
    return Prediction(
        material=choice.mat.name,
        fc_label=fc_label or choice.label,
        fc_names=tuple(ms.basis.names),
        coefficients=np.asarray(choice.coefficients, dtype=float),
        ei=ei_value,
        temperature=options.temperature,
        omegas=np.asarray(options.omegas, dtype=float),
        u=options.u,
        v=options.v,
        instrument=ins.to_metadata(),
        resolution=resolution.to_dict(),
        energy_edges=np.asarray(ms.grid.energy_edges, dtype=float),
        qpoints=np.asarray(qp.qpoints, dtype=float),
        q_distance=np.asarray(qp.distance, dtype=float),
        ticks=qp.ticks,
        stable=phonons.stable,
        min_frequency_thz=phonons.min_frequency,
        warnings=(*choice.notes, *phonons.notes),
        iqe=computed.iqe,
        detector=computed.detector,
        powder=computed.powder,
        dos=computed.dos,
        indirect=computed.indirect,
        formula=choice.formula,
        n_atoms=ms.crystal.n_atoms,
        fc_source=choice.source,
        fc_details=choice.details,
        model=choice.model,
        seconds=seconds,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Phonons:
    """The phonons of a prediction's FCs: dispersion and dynamical stability."""

    fcs: CrystalFC | None  # per-pair FCs (for dos, indirect and cells over MAX_CIF_ATOMS)
    modes: MeshPhonons | None  # their mesh phonons with eigenvectors
    dispersion: NDArray[np.float64]  # (n_q, n_branches) path energies, meV
    min_frequency: float  # lowest signed frequency, THz
    stable: bool
    notes: tuple[str, ...]  # the warning of an unstable FC set


def _phonons(choice: FCChoice, outputs: tuple[str, ...]) -> _Phonons:
    """Dispersion and stability of the chosen FCs: from the forward model on the path and a
    mesh for cells up to :data:`MAX_CIF_ATOMS` atoms, on the DOS mesh for larger ones."""
    mat = choice.mat
    grid = mat.setup.grid
    n_atoms = mat.setup.crystal.n_atoms
    fcs: CrystalFC | None = None
    modes: MeshPhonons | None = None
    if "dos" in outputs or "indirect" in outputs or n_atoms > MAX_CIF_ATOMS:
        fcs = choice.crystal_fc()
        modes, _ = cached_mesh_modes(fcs)
    if n_atoms <= MAX_CIF_ATOMS:  # dispersion and stability on the path and a mesh
        dispersion, min_freq = _dispersion(mat, choice.coefficients)
        stable = bool(min_freq >= -forward_model(mat).imaginary_tol)
    else:  # large cells (dos, indirect, powder only): stability on the DOS mesh
        assert modes is not None
        dispersion = np.zeros((grid.n_q, 0))
        min_freq = float(modes.frequencies.min())
        stable = bool(min_freq >= -0.05)
    notes: tuple[str, ...] = ()
    if not stable:
        notes = (
            f"the FC set is dynamically unstable (lowest frequency {min_freq:.3f} THz): "
            "imaginary modes are left out of S(Q, E) and of the indirect spectrum",
        )
    return _Phonons(
        fcs=fcs,
        modes=modes,
        dispersion=dispersion,
        min_frequency=min_freq,
        stable=stable,
        notes=notes,
    )


def _dispersion(mat: Material, c: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
    """Path energies (n_q, n_branches) meV and the lowest signed frequency (THz, path+mesh)."""
    import torch

    fm = forward_model(mat)
    with torch.no_grad():
        lam = fm.eigenvalues(c[None])[0].numpy()
    freq = np.sign(lam) * np.sqrt(np.abs(lam)) * VASP_TO_THZ
    return freq[: mat.setup.grid.n_q] * THZ_TO_MEV, float(freq.min())


@dataclass(frozen=True, slots=True, kw_only=True)
class _Outputs:
    """The outputs computed (``None``: not asked for) and the S(Q, E) model they used."""

    model: CoherentSQE | None = None
    iqe: IQEPrediction | None = None
    detector: DetectorPrediction | None = None
    powder: PowderPrediction | None = None
    dos: PhononDOS | None = None
    indirect: IndirectSpectrum | None = None


def _outputs(
    choice: FCChoice,
    phonons: _Phonons,
    ei: float,
    options: PredictionOptions,
    seconds: dict[str, float],
) -> _Outputs:
    """Compute the outputs asked for, timing each in ``seconds``."""
    mat, c, outputs = choice.mat, choice.coefficients, options.outputs
    model: CoherentSQE | None = None
    if {"iqe", "detector", "powder"} & set(outputs):
        t = time.perf_counter()
        model = sqe_model(mat, c, options.temperature, ei)
        seconds["sqe_model"] = time.perf_counter() - t
    iqe = detector = powder_out = None
    if "iqe" in outputs or "detector" in outputs:
        assert model is not None
        iqe, detector = single_crystal(mat, model, ei, phonons.dispersion, options, seconds)
    if "powder" in outputs:
        assert model is not None
        t = time.perf_counter()
        powder_out = powder(mat, model, c, ei, options)
        seconds["powder"] = time.perf_counter() - t
    dos = indirect = None
    if "dos" in outputs:
        assert phonons.fcs is not None
        assert phonons.modes is not None
        t = time.perf_counter()
        dos = phonon_dos(phonons.fcs, modes=phonons.modes, sigma=options.dos_sigma)
        seconds["dos"] = time.perf_counter() - t
    if "indirect" in outputs:
        assert phonons.fcs is not None
        assert phonons.modes is not None
        t = time.perf_counter()
        indirect = indirect_spectrum(
            phonons.fcs,
            temperature=options.temperature,
            instrument=options.indirect_instrument,
            orders=options.indirect_orders,
            modes=phonons.modes,
        )
        seconds["indirect"] = time.perf_counter() - t
    return _Outputs(
        model=model, iqe=iqe, detector=detector, powder=powder_out, dos=dos, indirect=indirect
    )
