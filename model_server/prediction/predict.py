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

A CIF is read by :func:`model_server.prediction.cif_input.crystal_from_cif` (clear errors for
unparseable text, partial occupancy with a supercell hint, too many sites); its q-path and
grid follow the generic defaults of :func:`simulations.lattice.materials.setup`, and its fold table
is built on first use (seconds). Primitive-cell atom limits: :data:`MAX_CIF_ATOMS` for
``iqe`` and ``detector`` and for given coefficients (the phonon table and FC basis grow
quickly), :data:`~model_server.prediction.spectra.MAX_ATOMS_POWDER` for ``powder``,
:data:`~model_server.prediction.spectra.MAX_ATOMS_DOS` for ``dos`` and ``indirect``.

Everything that does not change between requests is cached: material setups, fold tables,
forward models (the dispersion and stability check), phonon tables per FC set, S(Q, E)
models per (FCs, T, Ei) and powder spectra. Predictions run one at a time (a lock): the
kernels use every core already.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from consumers.exceptions import ConsumerError
from consumers.reduction.folding import Folder
from consumers.reduction.table import FoldTable, table_cache_dir
from model_server.exceptions import ModelServerError
from model_server.prediction.cif_input import CIFError, ParsedCIF, crystal_from_cif
from model_server.prediction.crystal_fc import CrystalFC, project_onto_basis
from model_server.prediction.expected import FoldSampler, GridSimulator, accessible, angle_bins
from model_server.prediction.fc_source import (
    FC_MODEL_NAME,
    FCModelUnavailableError,
    ModelFCs,
    model_version,
    predict_fcs,
)
from model_server.prediction.indirect import INDIRECT_INSTRUMENTS, indirect_spectrum
from model_server.prediction.results import (
    DEFAULT_OUTPUTS,
    OUTPUTS,
    DetectorPrediction,
    IQEPrediction,
    PowderPrediction,
    Prediction,
)
from model_server.prediction.spectra import (
    MAX_ATOMS_DOS,
    MAX_ATOMS_POWDER,
    debye_waller_mesh,
    mesh_modes,
    phonon_dos,
    powder_spectrum,
    single_threaded_blas,
)
from simulations.exceptions import GridError, SimulationError
from simulations.fcdb.reference import resolve_fc
from simulations.instrument.events import PhononTable
from simulations.instrument.spectrometer import Instrument, Orientation, energy_to_k
from simulations.lattice.crystals import SHIPPED_MATERIALS, Crystal
from simulations.lattice.grid import Grid, make_grid
from simulations.lattice.materials import MaterialDefaults, MaterialSetup, setup
from simulations.lattice.pair_phonons import MeshPhonons
from simulations.lattice.resolution import instrument_resolution
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

#: Where a prediction's force constants come from.
FC_SOURCES = ("reference", "given", "e3nn")
#: Most goniometer angles in one prediction.
MAX_OMEGAS = 360
#: Most atoms in the primitive cell for ``iqe`` and ``detector`` (the 40^3 phonon table) and
#: for a CIF with given coefficients (its FC basis); see :func:`atom_limit` for the others.
MAX_CIF_ATOMS = 8
#: Energy-grid resolution (meV) of a CIF's grid top with predicted FCs.
_E_TOP_STEP = 5.0
#: Phonon-table mesh (points per axis), the one simulated runs use.
TABLE_MESH = 40
#: Powder |Q| points.
POWDER_N_Q = 100


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


def _check_atom_limits(n_atoms: int, outputs: Sequence[str], what: str) -> None:
    over = [o for o in outputs if n_atoms > atom_limit(o)]
    if over:
        limits = ", ".join(f"{o} {atom_limit(o)}" for o in OUTPUTS)
        raise PredictionError(
            f"{what}'s primitive cell has {n_atoms} atoms, more than the "
            f"{', '.join(over)} output{'s' if len(over) > 1 else ''} can take "
            f"(atom limits: {limits}); ask for other outputs or a smaller cell"
        )


# -- caches -------------------------------------------------------------------------------

_V = TypeVar("_V")


class _LRU:
    """A small least-recently-used cache (callers hold :data:`_LOCK`)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, make: Callable[[], _V]) -> _V:
        if key in self._items:
            self._items.move_to_end(key)
            value: _V = self._items[key]
            return value
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


_LOCK = threading.Lock()
_SETUPS = _LRU(8)
_FORWARD = _LRU(8)
_FOLD_TABLES = _LRU(8)
_PHONON_TABLES = _LRU(4)  # up to ~40 MB each (Ge, 40^3 mesh)
_MODELS = _LRU(16)
_POWDER = _LRU(16)
_PARSED = _LRU(16)  # CIF text -> ParsedCIF
_PREDICTED = _LRU(16)  # crystal + model version -> ModelFCs
_MODES = _LRU(4)  # FC set -> mesh phonons with eigenvectors


def clear_caches() -> None:
    """Forget every cached setup, table and spectrum (tests, memory)."""
    with _LOCK:
        for c in (
            _SETUPS,
            _FORWARD,
            _FOLD_TABLES,
            _PHONON_TABLES,
            _MODELS,
            _POWDER,
            _PARSED,
            _PREDICTED,
            _MODES,
        ):
            c.clear()


@lru_cache(maxsize=1)
def _instrument() -> Instrument:
    return Instrument.arcs_like()


@dataclass(frozen=True, slots=True)
class _Material:
    key: str  # cache key: the shipped name, "cif-<sha>", or either + "-e3nn-<version>..."
    name: str
    setup: MaterialSetup
    shipped: bool


def _cif_key(cif: str) -> str:
    return "cif-" + hashlib.sha256(cif.encode()).hexdigest()[:16]


def _parsed_cif(cif: str) -> ParsedCIF:
    """The CIF read and checked (:func:`crystal_from_cif`), cached by its text."""
    key = _cif_key(cif)

    def parse() -> ParsedCIF:
        try:
            return crystal_from_cif(cif, name=key)
        except CIFError as exc:
            raise PredictionError(str(exc)) from exc

    return _PARSED.get(key, parse)


def _check_material_choice(material: str | None, cif: str | None) -> None:
    if (material is None) == (cif is None):
        raise PredictionError(
            "give either a shipped material "
            f"({', '.join(sorted(SHIPPED_MATERIALS))}) or a CIF, not "
            + ("both" if material is not None else "neither")
        )
    if material is not None and material not in SHIPPED_MATERIALS:
        raise PredictionError(
            f"unknown material {material!r}; shipped materials: "
            f"{', '.join(sorted(SHIPPED_MATERIALS))} (or send a CIF as 'cif')"
        )


def _material(material: str | None, cif: str | None) -> _Material:
    _check_material_choice(material, cif)
    if material is not None:
        ms = _SETUPS.get(material, lambda: setup(material))
        return _Material(key=material, name=material, setup=ms, shipped=True)
    assert cif is not None
    key = _cif_key(cif)
    return _Material(
        key=key, name=key, setup=_SETUPS.get(key, lambda: _cif_setup(cif, key)), shipped=False
    )


def _cif_setup(cif: str, key: str) -> MaterialSetup:
    """MaterialSetup of a CIF's crystal (generic defaults, 4-shell basis), via a file in the
    cache folder."""
    parsed = _parsed_cif(cif)
    n = parsed.crystal.n_atoms
    if n > MAX_CIF_ATOMS:
        raise PredictionError(
            f"the CIF's primitive cell ({parsed.formula}) has {n} atoms; FCs given as "
            f"coefficients need a basis, built for at most {MAX_CIF_ATOMS} atoms. Leave fc out "
            "to have the e3nn model predict them (dos and indirect up to "
            f"{MAX_ATOMS_DOS} atoms, powder up to {MAX_ATOMS_POWDER})"
        )
    folder = table_cache_dir() / "cif"
    path = folder / f"{key}.cif"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(cif)
            os.replace(tmp, path)
    except OSError as exc:
        raise PredictionError(f"cannot store the CIF for parsing: {exc}") from exc
    try:
        return setup(Path(path))
    except SimulationError as exc:
        raise PredictionError(f"cannot build the model of the CIF's crystal: {exc}") from exc
    except Exception as exc:
        raise PredictionError(f"cannot build the model of the CIF's crystal: {exc}") from exc


def _coefficients(
    mat: _Material, fc: str | Mapping[str, Any] | NDArray[np.float64]
) -> tuple[str, NDArray[np.float64]]:
    """(label, full coefficient vector) of an FC specification."""
    ms = mat.setup
    basis = ms.basis
    if isinstance(fc, np.ndarray):
        return "custom", basis.check_coefficients(np.asarray(fc, dtype=float))
    if isinstance(fc, Mapping):
        values = fc.get("coefficients", fc)
        if not isinstance(values, Mapping):
            raise PredictionError('FC coefficients must be {"coefficients": {name: value}}')
        if not mat.shipped:
            try:
                return "custom", basis.coefficients_from_dict(dict(values))
            except (SimulationError, TypeError, ValueError) as exc:
                raise PredictionError(f"a CIF needs every FC coefficient by name: {exc}") from exc
        try:
            return resolve_fc(mat.name, {str(k): v for k, v in values.items()}, ms)
        except SimulationError as exc:
            raise PredictionError(str(exc)) from exc
    if not isinstance(fc, str):
        raise PredictionError(f"cannot read FC specification {fc!r}")
    if not mat.shipped:
        raise PredictionError(
            f"a CIF has no named FC sets (got {fc!r}): leave fc out (or give "
            f'"{FC_MODEL_NAME}") to have the e3nn model predict them from the structure, or '
            'give them as {"coefficients": {name: value}} (eV/A^2) with every one of '
            f"{', '.join(basis.names)}"
        )
    if fc.endswith(".json") or "/" in fc or "\\" in fc:
        raise PredictionError(f"unknown FC set {fc!r}: give a named set or coefficients")
    try:
        return resolve_fc(mat.name, fc, ms)
    except SimulationError as exc:
        raise PredictionError(str(exc)) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class _FCChoice:
    """The material and FCs a prediction runs on."""

    mat: _Material
    label: str
    coefficients: NDArray[np.float64]
    source: str
    formula: str
    model: ModelFCs | None = None
    notes: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def crystal_fc(self) -> CrystalFC:
        """The FCs per pair (those of the model, or the basis' blocks)."""
        if self.model is not None:
            return self.model.fcs
        basis = self.mat.setup.basis
        return CrystalFC.from_basis(basis, self.coefficients, name=self.formula)


def _uses_model(cif: str | None, fc: object) -> bool:
    return (fc is None and cif is not None) or (isinstance(fc, str) and fc == FC_MODEL_NAME)


def _choose_fcs(
    material: str | None,
    cif: str | None,
    fc: str | Mapping[str, Any] | NDArray[np.float64] | None,
    outputs: tuple[str, ...],
    ei: float | None,
) -> _FCChoice:
    """Resolve the material and its FCs (shipped set, given coefficients or the model)."""
    _check_material_choice(material, cif)
    if not _uses_model(cif, fc):
        mat = _material(material, cif)
        formula = material if material is not None else _parsed_cif(str(cif)).formula
        label, c = _coefficients(mat, "mlff_mean" if fc is None else fc)
        source = "reference" if mat.shipped and (fc is None or isinstance(fc, str)) else "given"
        return _FCChoice(mat=mat, label=label, coefficients=c, source=source, formula=formula)
    if material is not None:
        base_setup = _SETUPS.get(material, lambda: setup(material))
        crystal, formula, base_key = base_setup.crystal, material, material
    else:
        parsed = _parsed_cif(str(cif))
        crystal, formula, base_key = parsed.crystal, parsed.formula, _cif_key(str(cif))
    _check_atom_limits(crystal.n_atoms, outputs, f"{formula}")
    try:
        version = model_version()
    except FCModelUnavailableError as exc:
        raise PredictionError(str(exc), status=503) from exc
    key = f"{base_key}-e3nn-{version}"
    predicted = _PREDICTED.get(key, lambda: predict_fcs(crystal, name=formula))
    fcs = predicted.fcs
    notes: list[str] = []
    details: dict[str, Any] = {
        "model_version": predicted.version,
        "n_pairs": len(fcs.pairs),
        "longest_bond_A": fcs.cutoff,
        "acoustic_sum_rule_residual": fcs.asr_residual(),
        "symmetry_residual": fcs.symmetry_residual(),
    }
    if material is not None:
        ms = replace(base_setup, basis=fcs.basis(base_setup.crystal))
        proj = project_onto_basis(fcs, base_setup.basis)
        details["projection"] = {
            "description": f"least-squares projection onto {material}'s symmetry-reduced "
            "basis (for comparison with its named sets; the spectra use the FCs as predicted)",
            "coefficients": dict(
                zip(base_setup.basis.names, proj.coefficients.tolist(), strict=True)
            ),
            "residual": proj.residual,
            "truncated": proj.truncated,
        }
    else:
        modes, _ = _mesh_modes(fcs)
        e_phonon = float(modes.frequencies.max()) * THZ_TO_MEV
        e_top = max(20.0, _E_TOP_STEP * math.ceil(1.1 * e_phonon / _E_TOP_STEP))
        if ei is not None and math.isfinite(ei) and e_top > 0.9 * ei:
            e_top = 0.9 * float(ei)
            if e_phonon > e_top:
                notes.append(
                    f"the highest predicted mode ({e_phonon:.1f} meV) lies above 0.9 Ei: iqe, "
                    f"detector and powder stop at {e_top:.1f} meV"
                )
        ei_default = (
            float(ei) if ei is not None else _E_TOP_STEP * math.ceil(1.25 * e_top / _E_TOP_STEP)
        )
        key = f"{key}-E{e_top:.3f}-Ei{ei_default:.3f}"
        ms = _SETUPS.get(key, lambda: _predicted_setup(crystal, fcs, e_top, ei_default))
        if ms.defaults.path is not None and {"iqe", "detector"} & set(outputs):
            notes.append(
                f"the lattice's standard q-path has a piece of zero length; iqe uses the path "
                f"{ms.defaults.path} ({crystal.kpoints[ms.defaults.path[2:]]} r.l.u.)"
            )
    if not predicted.in_domain:
        message = predicted.message.removeprefix("Out of the model's domain: ")
        notes.insert(0, f"OUT OF THE MODEL'S DOMAIN: {message}")
    mat = _Material(
        key=key, name=formula if material is None else material, setup=ms, shipped=False
    )
    return _FCChoice(
        mat=mat,
        label=f"{FC_MODEL_NAME} ({predicted.version})",
        coefficients=np.ones(1),
        source=FC_MODEL_NAME,
        formula=formula,
        model=predicted,
        notes=tuple(notes),
        details=details,
    )


def _predicted_setup(crystal: Crystal, fcs: CrystalFC, e_top: float, ei: float) -> MaterialSetup:
    """Generic grid (q-path of the lattice, 100 energy bins up to ``e_top`` meV) on the
    predicted FCs as a one-coefficient basis."""
    defaults = replace(MaterialDefaults(), e_max=float(e_top), ei=float(ei))
    try:
        grid = _grid(crystal, defaults)
    except GridError:
        # pymatgen's standard path of a distorted low-symmetry cell can have a zero-length
        # piece: fall back to Gamma and the first other labelled point
        label = next(
            (k for k, v in crystal.kpoints.items() if k != "G" and np.linalg.norm(v) > 1e-6),
            None,
        )
        if label is None:
            raise PredictionError(f"no q-path can be made for {crystal.name}'s lattice") from None
        defaults = replace(defaults, path=f"G-{label}")
        grid = _grid(crystal, defaults)
    return MaterialSetup(
        crystal=crystal,
        basis=fcs.basis(crystal),
        grid=grid,
        resolution=instrument_resolution(
            defaults.instrument, defaults.ei, defaults.chopper_frequency, e_max=defaults.e_max
        ),
        defaults=defaults,
    )


def _grid(crystal: Crystal, defaults: MaterialDefaults) -> Grid:
    return make_grid(
        crystal,
        path=defaults.path,
        n_q=defaults.n_q,
        e_min=defaults.e_min,
        e_max=defaults.e_max,
        n_e=defaults.n_e,
    )


def _mesh_modes(fcs: CrystalFC) -> tuple[MeshPhonons, tuple[int, int, int]]:
    """Mesh phonons with eigenvectors (default mesh) of an FC set, cached by its arrays."""
    h = hashlib.sha256()
    for a in (fcs.numbers, fcs.lattice, fcs.frac, fcs.pairs, fcs.fc, fcs.masses):
        h.update(np.ascontiguousarray(a).tobytes())
    return _MODES.get(h.hexdigest(), lambda: mesh_modes(fcs))


def _forward(mat: _Material) -> Any:
    import torch

    return _FORWARD.get(
        mat.key, lambda: mat.setup.forward_model(dtype=torch.float64, method="exact")
    )


def _dispersion(mat: _Material, c: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
    """Path energies (n_q, n_branches) meV and the lowest signed frequency (THz, path+mesh)."""
    import torch

    fm = _forward(mat)
    with torch.no_grad():
        lam = fm.eigenvalues(c[None])[0].numpy()
    freq = np.sign(lam) * np.sqrt(np.abs(lam)) * VASP_TO_THZ
    return freq[: mat.setup.grid.n_q] * THZ_TO_MEV, float(freq.min())


def _fold_table(mat: _Material) -> FoldTable:
    ms = mat.setup
    return _FOLD_TABLES.get(mat.key, lambda: FoldTable.cached(ms.crystal, ms.grid))


def _model(mat: _Material, c: NDArray[np.float64], temperature: float, ei: float) -> CoherentSQE:
    key = (mat.key, np.asarray(c, dtype=np.float64).tobytes(), float(temperature), float(ei))
    return _MODELS.get(
        key,
        lambda: CoherentSQE(
            mat.setup.basis,
            c,
            temperature=temperature,
            resolution=_instrument().resolution(ei),
            dw_mesh=debye_waller_mesh(mat.setup.crystal.n_atoms),
        ),
    )


def _phonon_table(mat: _Material, model: CoherentSQE) -> PhononTable:
    """The phonon table of the model's FCs (it depends on nothing else)."""
    key = (mat.key, np.asarray(model.coefficients, dtype=np.float64).tobytes())
    return _PHONON_TABLES.get(key, lambda: PhononTable.build(model, TABLE_MESH))


# -- the entry point ----------------------------------------------------------------------


def predict(
    material: str | None = None,
    *,
    cif: str | None = None,
    fc: str | Mapping[str, Any] | NDArray[np.float64] | None = None,
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
        vector.
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

    Raises
    ------
    PredictionError
        For anything the request gets wrong (the message says what); status 503 when the
        FCs are to come from the e3nn model and it is unavailable.
    """
    t_start = time.perf_counter()
    wanted = tuple(dict.fromkeys(str(o) for o in outputs))
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown:
        raise PredictionError(f"unknown outputs {unknown}; choose from {', '.join(OUTPUTS)}")
    if not wanted:
        raise PredictionError(f"no outputs requested; choose from {', '.join(OUTPUTS)}")
    _check_number("temperature", temperature, lo=0.0, hi=1e4)
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
    ins = _instrument()
    if "iqe" in wanted or "detector" in wanted:
        if len(w) == 0:
            raise PredictionError("iqe and detector outputs need at least one omega")
        try:
            w = ins.check_omegas(w)
        except SimulationError as exc:
            raise PredictionError(str(exc)) from exc
    options = _Options(
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
    )
    with _LOCK, single_threaded_blas():
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


@dataclass(frozen=True, slots=True, kw_only=True)
class _Options:
    """The validated settings of one prediction (see :func:`predict`)."""

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


def _predict_locked(
    *,
    material: str | None,
    cif: str | None,
    fc: str | Mapping[str, Any] | NDArray[np.float64] | None,
    fc_label: str | None,
    ei: float | None,
    options: _Options,
    t_start: float,
) -> Prediction:
    seconds: dict[str, float] = {}
    outputs = options.outputs
    t = time.perf_counter()
    choice = _choose_fcs(material, cif, fc, outputs, ei)
    seconds["fc"] = time.perf_counter() - t
    t = time.perf_counter()
    mat = choice.mat
    ms = mat.setup
    grid = ms.grid
    c = choice.coefficients
    e_top = float(grid.energy_edges[-1])
    ei_value = float(ms.defaults.ei if ei is None else ei)
    if not math.isfinite(ei_value) or not ei_value > e_top:
        raise PredictionError(
            f"Ei = {ei_value:g} meV is too small: it must exceed the top of {mat.name}'s "
            f"energy grid, {e_top:g} meV (a neutron cannot lose more energy than it has)"
        )
    ins = _instrument()
    notes = list(choice.notes)
    n_atoms = ms.crystal.n_atoms
    fcs: CrystalFC | None = None
    modes: MeshPhonons | None = None
    if "dos" in outputs or "indirect" in outputs or n_atoms > MAX_CIF_ATOMS:
        fcs = choice.crystal_fc()
        modes, _ = _mesh_modes(fcs)
    if n_atoms <= MAX_CIF_ATOMS:  # dispersion and stability on the path and a mesh
        dispersion, min_freq = _dispersion(mat, c)
        stable = bool(min_freq >= -_forward(mat).imaginary_tol)
    else:  # large cells (dos, indirect, powder only): stability on the DOS mesh
        assert modes is not None
        dispersion = np.zeros((grid.n_q, 0))
        min_freq = float(modes.frequencies.min())
        stable = bool(min_freq >= -0.05)
    if not stable:
        notes.append(
            f"the FC set is dynamically unstable (lowest frequency {min_freq:.3f} THz): "
            "imaginary modes are left out of S(Q, E) and of the indirect spectrum"
        )
    seconds["setup"] = time.perf_counter() - t
    model: CoherentSQE | None = None
    if {"iqe", "detector", "powder"} & set(outputs):
        t = time.perf_counter()
        model = _model(mat, c, options.temperature, ei_value)
        seconds["sqe_model"] = time.perf_counter() - t
    iqe = detector = powder = None
    if "iqe" in outputs or "detector" in outputs:
        assert model is not None
        iqe, detector = _single_crystal(mat, model, ei_value, dispersion, options, seconds)
    if "powder" in outputs:
        assert model is not None
        t = time.perf_counter()
        powder = _powder(mat, model, c, ei_value, options)
        seconds["powder"] = time.perf_counter() - t
    dos = indirect = None
    if "dos" in outputs:
        assert fcs is not None
        assert modes is not None
        t = time.perf_counter()
        dos = phonon_dos(fcs, modes=modes, sigma=options.dos_sigma)
        seconds["dos"] = time.perf_counter() - t
    if "indirect" in outputs:
        assert fcs is not None
        assert modes is not None
        t = time.perf_counter()
        indirect = indirect_spectrum(
            fcs,
            temperature=options.temperature,
            instrument=options.indirect_instrument,
            orders=options.indirect_orders,
            modes=modes,
        )
        seconds["indirect"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    qp = grid.qpath
    resolution = model.resolution if model is not None else ins.resolution(ei_value)
    return Prediction(
        material=mat.name,
        fc_label=fc_label or choice.label,
        fc_names=tuple(ms.basis.names),
        coefficients=np.asarray(c, dtype=float),
        ei=ei_value,
        temperature=options.temperature,
        omegas=np.asarray(options.omegas, dtype=float),
        u=options.u,
        v=options.v,
        instrument=ins.to_metadata(),
        resolution=resolution.to_dict(),
        energy_edges=np.asarray(grid.energy_edges, dtype=float),
        qpoints=np.asarray(qp.qpoints, dtype=float),
        q_distance=np.asarray(qp.distance, dtype=float),
        ticks=qp.ticks,
        stable=stable,
        min_frequency_thz=min_freq,
        warnings=tuple(notes),
        iqe=iqe,
        detector=detector,
        powder=powder,
        dos=dos,
        indirect=indirect,
        formula=choice.formula,
        n_atoms=n_atoms,
        fc_source=choice.source,
        fc_details=choice.details,
        model=choice.model,
        seconds=seconds,
    )


def _single_crystal(
    mat: _Material,
    model: CoherentSQE,
    ei: float,
    dispersion: NDArray[np.float64],
    options: _Options,
    seconds: dict[str, float],
) -> tuple[IQEPrediction | None, DetectorPrediction | None]:
    """The ``iqe`` and ``detector`` outputs (those asked for) of the orientations."""
    ms = mat.setup
    grid = ms.grid
    ins = _instrument()
    outputs = options.outputs
    energies = grid.energy_centres
    try:
        orientation = Orientation.from_vectors(ms.crystal, options.u, options.v)
    except SimulationError as exc:
        raise PredictionError(str(exc)) from exc
    t = time.perf_counter()
    table = _phonon_table(mat, model)
    seconds["phonon_table"] = time.perf_counter() - t
    sim = GridSimulator(model, ins, orientation, ei, energy_edges=grid.energy_edges, table=table)
    t = time.perf_counter()
    sampler = None
    if "iqe" in outputs:
        folder = Folder(_fold_table(mat), grid, ins, orientation, ei)
        sampler = FoldSampler(folder, sim.group_of_pixel, threads=min(4, os.cpu_count() or 1))
    seconds["fold_setup"] = time.perf_counter() - t
    cov = np.zeros(grid.shape)
    sig = np.zeros(grid.shape)
    det_num: list[NDArray[np.float64]] = []
    if "detector" in outputs:
        edges, bin_of = angle_bins(sim.group_directions, options.detector_angle_step)
        n_bins = len(edges) - 1
        onehot = np.zeros((n_bins, sim.n_groups))
        onehot[bin_of, np.arange(sim.n_groups)] = sim.group_solid_angles
        den = onehot.sum(axis=1)[:, None] * sim.kf_over_ki[None, :]
    t_s = t_f = 0.0
    for omega in options.omegas:
        t = time.perf_counter()
        s_group = sim.sqe(float(omega))
        t_s += time.perf_counter() - t
        t = time.perf_counter()
        if sampler is not None:
            c_w, s_w = sampler.fold(float(omega), s_group)
            cov += c_w
            sig += s_w
        if "detector" in outputs:
            det_num.append(onehot @ (s_group * sim.kf_over_ki[None, :]))
        t_f += time.perf_counter() - t
    seconds["sqe"] = t_s
    seconds["fold"] = t_f
    iqe = detector = None
    if "iqe" in outputs:
        with np.errstate(invalid="ignore", divide="ignore"):
            intensity = np.where(cov > 0, sig / np.where(cov > 0, cov, 1.0), np.nan)
        iqe = IQEPrediction(intensity=intensity, coverage=cov, signal=sig, dispersion=dispersion)
    if "detector" in outputs:
        with np.errstate(invalid="ignore", divide="ignore"):
            det = np.stack(det_num) / np.where(den > 0, den, np.nan)[None]
        centres = 0.5 * (edges[1:] + edges[:-1])
        ki = float(energy_to_k(ei))
        kf = np.asarray(energy_to_k(ei - energies))
        qmag = np.sqrt(
            np.maximum(
                ki * ki
                + kf[None, :] ** 2
                - 2 * ki * kf[None, :] * np.cos(np.radians(centres))[:, None],
                0.0,
            )
        )
        detector = DetectorPrediction(angle_edges=edges, intensity=det, q_magnitude=qmag)
    return iqe, detector


def _powder(
    mat: _Material,
    model: CoherentSQE,
    c: NDArray[np.float64],
    ei: float,
    options: _Options,
) -> PowderPrediction:
    """The ``powder`` output: |Q| up to what the detector reaches at the grid's lowest E."""
    grid = mat.setup.grid
    ins = _instrument()
    energies = grid.energy_centres
    cos_max = float(ins.directions[:, 2].min())
    ki = float(energy_to_k(ei))
    kf0 = float(energy_to_k(ei - float(grid.energy_edges[0])))
    q_top = math.sqrt(ki * ki + kf0 * kf0 - 2 * ki * kf0 * cos_max)
    q = (np.arange(POWDER_N_Q) + 0.5) * q_top / POWDER_N_Q
    key = (
        mat.key,
        np.asarray(c).tobytes(),
        options.temperature,
        ei,
        options.powder_directions,
        options.seed,
    )
    spectrum = _POWDER.get(
        key,
        lambda: powder_spectrum(
            model, q, energies, directions=options.powder_directions, seed=options.seed
        ),
    )
    return PowderPrediction(
        q=q,
        intensity=spectrum,
        accessible=accessible(q, energies, ei, ins),
        directions=options.powder_directions,
        seed=options.seed,
    )
