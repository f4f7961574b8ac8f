"""The crystal and FCs a prediction runs on: a shipped material or a CIF; a named FC set,
given coefficients, the e3nn model's prediction, or an imported FC file (phonopy, CASTEP;
:mod:`model_server.prediction.fc_import`) (see ``fc_source`` in
:mod:`model_server.prediction.predict`).

A CIF is read by :func:`model_server.prediction.cif_input.crystal_from_cif`; its q-path and
grid follow the generic defaults of :func:`simulations.lattice.materials.setup`. With
predicted FCs, the grid of a CIF's crystal reaches 1.1 x the highest predicted mode (rounded
up to 5 meV; at most 0.9 Ei when Ei is given) and the default Ei is 1.25 x that.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.table import table_cache_dir
from model_server.exceptions import FCImportError
from model_server.prediction.cache import (
    PARSED,
    PREDICTED,
    SETUPS,
    Material,
    cached_mesh_modes,
)
from model_server.prediction.cif_input import CIFError, ParsedCIF, crystal_from_cif
from model_server.prediction.crystal_fc import CrystalFC, project_onto_basis
from model_server.prediction.fc_import import FCFile, align_to_crystal, read_fc_file
from model_server.prediction.fc_source import (
    FC_MODEL_NAME,
    FCModelUnavailableError,
    ModelFCs,
    model_version,
    predict_fcs,
)
from model_server.prediction.request import MAX_CIF_ATOMS, PredictionError, check_atom_limits
from model_server.prediction.spectra import MAX_ATOMS_DOS, MAX_ATOMS_POWDER
from simulations.exceptions import GridError, SimulationError
from simulations.fcdb.reference import resolve_fc
from simulations.lattice.crystals import (
    SHIPPED_MATERIALS,
    Crystal,
    crystal_from_structure,
    load_crystal,
)
from simulations.lattice.grid import Grid, make_grid
from simulations.lattice.materials import MaterialDefaults, MaterialSetup, setup
from simulations.lattice.resolution import instrument_resolution
from simulations.units import THZ_TO_MEV

__all__ = ["FCChoice", "choose_fcs"]

#: Energy-grid resolution (meV) of a CIF's grid top with predicted FCs.
_E_TOP_STEP = 5.0


def _cif_key(cif: str) -> str:
    """Cache key of a CIF: ``cif-`` and 16 hex digits of its text's SHA-256."""
    return "cif-" + hashlib.sha256(cif.encode()).hexdigest()[:16]


def _parsed_cif(cif: str) -> ParsedCIF:
    """The CIF read and checked (:func:`crystal_from_cif`), cached by its text."""
    key = _cif_key(cif)

    def parse() -> ParsedCIF:
        try:
            return crystal_from_cif(cif, name=key)
        except CIFError as exc:
            raise PredictionError(str(exc)) from exc

    return PARSED.get(key, parse)


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


def _material(material: str | None, cif: str | None) -> Material:
    _check_material_choice(material, cif)
    if material is not None:
        ms = SETUPS.get(material, lambda: setup(material))
        return Material(key=material, name=material, setup=ms, shipped=True)
    assert cif is not None
    key = _cif_key(cif)
    return Material(
        key=key, name=key, setup=SETUPS.get(key, lambda: _cif_setup(cif, key)), shipped=False
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
    mat: Material, fc: str | Mapping[str, Any] | NDArray[np.float64]
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
class FCChoice:
    """The material and FCs a prediction runs on."""

    mat: Material
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


def choose_fcs(
    material: str | None,
    cif: str | None,
    fc: str | Mapping[str, Any] | NDArray[np.float64] | FCFile | None,
    outputs: tuple[str, ...],
    ei: float | None,
) -> FCChoice:
    """Resolve the material and its FCs (shipped set, given coefficients, the model or an
    imported file).

    Raises
    ------
    PredictionError
        Neither or both of ``material`` and ``cif`` (an imported file may come without
        either), an unknown material, a bad CIF, FC specification or FC file, a cell over an
        output's atom limit; status 503 when the FCs are to come from the e3nn model and it
        is unavailable.
    """
    if isinstance(fc, FCFile):
        try:
            return _imported_fcs(material, cif, fc, outputs, ei)
        except FCImportError as exc:
            raise PredictionError(str(exc)) from exc
    _check_material_choice(material, cif)
    if not _uses_model(cif, fc):
        return _given_fcs(material, cif, fc)
    return _model_fcs(material, cif, outputs, ei)


def _given_fcs(
    material: str | None,
    cif: str | None,
    fc: str | Mapping[str, Any] | NDArray[np.float64] | None,
) -> FCChoice:
    """A shipped material's named set (``mlff_mean`` by default) or given coefficients."""
    mat = _material(material, cif)
    formula = material if material is not None else _parsed_cif(str(cif)).formula
    label, c = _coefficients(mat, "mlff_mean" if fc is None else fc)
    source = "reference" if mat.shipped and (fc is None or isinstance(fc, str)) else "given"
    return FCChoice(mat=mat, label=label, coefficients=c, source=source, formula=formula)


def _model_fcs(
    material: str | None, cif: str | None, outputs: tuple[str, ...], ei: float | None
) -> FCChoice:
    """The e3nn model's FCs of a shipped material's or a CIF's crystal, used as predicted."""
    if material is not None:
        base_setup = SETUPS.get(material, lambda: setup(material))
        crystal, formula, base_key = base_setup.crystal, material, material
    else:
        parsed = _parsed_cif(str(cif))
        crystal, formula, base_key = parsed.crystal, parsed.formula, _cif_key(str(cif))
    check_atom_limits(crystal.n_atoms, outputs, f"{formula}")
    try:
        version = model_version()
    except FCModelUnavailableError as exc:
        raise PredictionError(str(exc), status=503) from exc
    key = f"{base_key}-e3nn-{version}"
    predicted = PREDICTED.get(key, lambda: predict_fcs(crystal, name=formula))
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
        details["projection"] = _projection(fcs, base_setup, material)
    else:
        key, ms = _predicted_cif_setup(crystal, fcs, key, outputs, ei, notes)
    if not predicted.in_domain:
        message = predicted.message.removeprefix("Out of the model's domain: ")
        notes.insert(0, f"OUT OF THE MODEL'S DOMAIN: {message}")
    mat = Material(key=key, name=formula if material is None else material, setup=ms, shipped=False)
    return FCChoice(
        mat=mat,
        label=f"{FC_MODEL_NAME} ({predicted.version})",
        coefficients=np.ones(1),
        source=FC_MODEL_NAME,
        formula=formula,
        model=predicted,
        notes=tuple(notes),
        details=details,
    )


def _projection(
    fcs: CrystalFC, base_setup: MaterialSetup, material: str, what: str = "predicted"
) -> dict[str, Any]:
    """The predicted (or imported) FCs projected onto a shipped material's symmetry-reduced
    basis."""
    proj = project_onto_basis(fcs, base_setup.basis)
    return {
        "description": f"least-squares projection onto {material}'s symmetry-reduced "
        f"basis (for comparison with its named sets and to seed a refinement; the spectra "
        f"use the FCs as {what})",
        "coefficients": dict(zip(base_setup.basis.names, proj.coefficients.tolist(), strict=True)),
        "residual": proj.residual,
        "truncated": proj.truncated,
    }


def _shipped_match(fcs: CrystalFC) -> str | None:
    """The shipped material whose structure the FCs' cell is, if any."""
    for name in sorted(SHIPPED_MATERIALS):
        crystal = load_crystal(name)  # cached; the setup (its basis) only for a match
        if sorted(crystal.species) != sorted(fcs.species):
            continue
        try:
            align_to_crystal(fcs, crystal)
        except FCImportError:
            continue
        return name
    return None


def _imported_fcs(
    material: str | None,
    cif: str | None,
    spec: FCFile,
    outputs: tuple[str, ...],
    ei: float | None,
) -> FCChoice:
    """An FC file's FCs on the request's structure (a shipped material, a CIF, or the
    file's own cell, which is a shipped material's when it matches one), used as they are;
    for a shipped material also projected onto its named coefficients."""
    if material is not None and cif is not None:
        raise PredictionError("give a shipped material or a CIF with the FC file, not both")
    if material is not None:
        _check_material_choice(material, None)
    imported = read_fc_file(spec)
    if material is None and cif is None:
        material = _shipped_match(imported.fcs)
    if material is not None:
        base_setup = SETUPS.get(material, lambda: setup(material))
        crystal, formula, base_key = base_setup.crystal, material, material
    elif cif is not None:
        parsed = _parsed_cif(cif)
        crystal, formula, base_key = parsed.crystal, parsed.formula, _cif_key(cif)
    else:
        crystal = _file_crystal(imported.fcs)
        formula, base_key = imported.fcs.name, f"fcfile-{imported.fcs.name}"
    check_atom_limits(crystal.n_atoms, outputs, formula)
    alignment = align_to_crystal(imported.fcs, crystal)
    fcs = alignment.fcs
    notes: list[str] = []
    if abs(alignment.scale - 1.0) > 1e-3:
        notes.append(
            f"the FC file's lattice constant is {100 * (alignment.scale - 1):+.1f} % off "
            f"{formula}'s; its force constants are used on {formula}'s cell"
        )
    if alignment.mass_ratio > 1e-3:
        notes.append(f"the FC file's masses differ from {formula}'s; {formula}'s are used")
    details: dict[str, Any] = {
        "file": imported.meta,
        "alignment": alignment.to_dict(),
        "n_pairs": len(fcs.pairs),
        "longest_bond_A": fcs.cutoff,
        "acoustic_sum_rule_residual": fcs.asr_residual(),
        "symmetry_residual": fcs.symmetry_residual(),
        "nac": _nac_details(fcs),
    }
    key = f"{base_key}-imported-{spec.sha256[:16]}"
    if material is not None:
        ms = replace(base_setup, basis=fcs.basis(base_setup.crystal))
        details["projection"] = _projection(fcs, base_setup, material, what="imported")
        name = material
    else:
        key, ms = _predicted_cif_setup(crystal, fcs, key, outputs, ei, notes)
        name = formula
    mat = Material(key=key, name=name, setup=ms, shipped=False)
    return FCChoice(
        mat=mat,
        label=spec.label,
        coefficients=np.ones(1),
        source="imported",
        formula=formula,
        notes=tuple(notes),
        details=details,
    )


def _file_crystal(fcs: CrystalFC) -> Crystal:
    """The standard primitive cell (with its q-path) of an FC file's own structure."""
    from pymatgen.core import Lattice, Structure

    try:
        structure = Structure(Lattice(fcs.lattice), list(fcs.species), fcs.frac)
        return crystal_from_structure(structure, name=fcs.name)
    except Exception as exc:
        raise PredictionError(f"cannot make a crystal of the FC file's cell: {exc}") from exc


def _nac_details(fcs: CrystalFC) -> dict[str, Any] | None:
    """The non-analytic term's inputs and where it applies (None without Born charges)."""
    if fcs.nac is None:
        return None
    return {
        "method": "wang",
        "born_charges_e": fcs.nac.born.tolist(),
        "dielectric": fcs.nac.dielectric.tolist(),
        "applied_to": ["dos", "indirect", "iqe", "detector", "powder"],
        "not_applied_to": ["dispersion_meV", "stability check"],
    }


def _predicted_cif_setup(
    crystal: Crystal,
    fcs: CrystalFC,
    key: str,
    outputs: tuple[str, ...],
    ei: float | None,
    notes: list[str],
) -> tuple[str, MaterialSetup]:
    """(cache key, setup) of a CIF's crystal on predicted FCs: the energy grid reaches 1.1 x
    the highest mode (rounded up to 5 meV; at most 0.9 Ei when Ei is given), the default Ei
    is 1.25 x that. What the user should know is appended to ``notes``."""
    modes, _ = cached_mesh_modes(fcs)
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
    ms = SETUPS.get(key, lambda: _predicted_setup(crystal, fcs, e_top, ei_default))
    if ms.defaults.path is not None and {"iqe", "detector"} & set(outputs):
        notes.append(
            f"the lattice's standard q-path has a piece of zero length; iqe uses the path "
            f"{ms.defaults.path} ({crystal.kpoints[ms.defaults.path[2:]]} r.l.u.)"
        )
    return key, ms


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
