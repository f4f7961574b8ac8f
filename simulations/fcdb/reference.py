"""Reference force constants from universal ML force fields, named FC sets, training domain.

Stage I of the seed paper: every pretrained universal force field that ships inside an
installable wheel relaxes the crystal and gives finite-displacement force constants
(phonopy); each is projected onto our symmetry-reduced basis (least squares over the bonds
inside the cutoff). The ensemble (per-model coefficients, min, max, mean), the ranking of
the coefficients by how much they change I(q, E), the kept coefficients and the training
domain are stored as package data in ``simulations/data/reference_fc/<material>.json``
together with the command that rebuilds it (``steer simulate reference``).

Sensitivity: ``S_k = |c_k| * ||dI/dc_k||_2 / ||I||_2`` at ``mlff_mean``, with ``|c_k|`` the
largest magnitude the ensemble gives (the change of the spectrum per relative change of
the coefficient, exact broadening, float64). The ``n_keep`` largest are kept.

Training domain of a kept coefficient (the seed paper's "-25 % to +150 % of the uMLFF
bounds"): if all models agree on its sign ``s``, ``s * [0.75 min|phi|, 2.5 max|phi|]``;
if they disagree, ``[2.5 min phi, 2.5 max phi]`` (which spans zero). Coefficients not kept
are held at the ensemble mean.

Named FC sets: ``mlff_mean``, one per model, and for Ge ``raman``: ``mlff_mean`` scaled
uniformly so that the zone-centre optical mode is 9.0 THz (the 300 cm^-1 Raman line).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from simulations.exceptions import InvalidCoefficientsError, SimulationError, UnknownFCSetError
from simulations.lattice.force_constants import FCBasis
from simulations.lattice.materials import MaterialSetup, setup
from simulations.provenance import host
from simulations.units import VASP_TO_THZ

__all__ = [
    "RAMAN_GE_THZ",
    "ReferenceEnsemble",
    "build_reference",
    "gamma_optical_thz",
    "load_reference",
    "named_fc_set",
    "reference_path",
    "sensitivity",
    "training_domain",
]

logger = logging.getLogger(__name__)

#: Measured Raman line of Ge: 300 cm^-1 = 9.0 THz (zone-centre optical phonon).
RAMAN_GE_THZ = 9.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ReferenceEnsemble:
    """The stored reference force constants of one material.

    Attributes
    ----------
    material
        Material name.
    names
        (n_coeff,) coefficient names.
    models
        Model name -> (n_coeff,) coefficients, eV/A^2.
    kept
        Names of the influential coefficients (most influential first).
    domain
        (n_kept, 2) training-domain bounds (low, high), eV/A^2, aligned with ``kept``.
    sensitivity
        Name -> sensitivity score (see module docstring).
    extra
        Everything else stored (per-model lattice constants, frequencies, provenance).
    """

    material: str
    names: tuple[str, ...]
    models: dict[str, NDArray[np.float64]]
    kept: tuple[str, ...]
    domain: NDArray[np.float64]
    sensitivity: dict[str, float]
    extra: dict[str, object]

    @property
    def matrix(self) -> NDArray[np.float64]:
        """(n_models, n_coeff) coefficients of every model."""
        return np.array([self.models[m] for m in sorted(self.models)])

    @property
    def mean(self) -> NDArray[np.float64]:
        """(n_coeff,) ensemble mean."""
        return self.matrix.mean(axis=0)

    @property
    def minimum(self) -> NDArray[np.float64]:
        """(n_coeff,) ensemble minimum."""
        return self.matrix.min(axis=0)

    @property
    def maximum(self) -> NDArray[np.float64]:
        """(n_coeff,) ensemble maximum."""
        return self.matrix.max(axis=0)

    @property
    def kept_index(self) -> NDArray[np.int64]:
        """Positions of the kept coefficients in :attr:`names`."""
        return np.array([self.names.index(n) for n in self.kept], dtype=np.int64)

    def fc_set_names(self) -> list[str]:
        """Every named FC set of this material."""
        names = ["mlff_mean", *sorted(self.models)]
        if self.material == "Ge":
            names.append("raman")
        return names

    def in_domain(self, coefficients: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Whether each kept coefficient of a full vector lies inside the training domain."""
        kept = np.asarray(coefficients)[..., self.kept_index]
        return (kept >= self.domain[:, 0]) & (kept <= self.domain[:, 1])


def reference_path(material: str) -> Path:
    """Where the shipped reference of a material lives."""
    ref = resources.files("simulations") / "data" / "reference_fc" / f"{material}.json"
    return Path(str(ref))


@lru_cache(maxsize=16)
def load_reference(material: str) -> ReferenceEnsemble:
    """Load the stored reference ensemble of a shipped material.

    Raises
    ------
    SimulationError
        If none is stored (build it with ``steer simulate reference``).
    """
    path = reference_path(material)
    if not path.exists():
        raise SimulationError(
            f"no reference force constants stored for {material!r} ({path}); build them with "
            f"`steer simulate reference --material {material}` (needs pip install '.[mlff]')"
        )
    data = json.loads(path.read_text())
    return _from_json(data)


def _from_json(data: dict) -> ReferenceEnsemble:  # type: ignore[type-arg]
    names = tuple(data["names"])
    return ReferenceEnsemble(
        material=data["material"],
        names=names,
        models={m: np.array(v["coefficients"], dtype=float) for m, v in data["models"].items()},
        kept=tuple(data["kept"]),
        domain=np.array(data["domain"], dtype=float).reshape(-1, 2),
        sensitivity={k: float(v) for k, v in data["sensitivity"].items()},
        extra={k: v for k, v in data.items() if k not in ("names", "models", "kept", "domain")},
    )


def gamma_optical_thz(basis: FCBasis, coefficients: NDArray[np.float64]) -> float:
    """Highest zone-centre frequency (THz) of a coefficient vector."""
    d = np.einsum(
        "k,kqij->qij",
        basis.check_coefficients(coefficients),
        basis.dynamical_basis(np.zeros((1, 3))),
    )
    lam = np.linalg.eigvalsh(d)[0]
    return float(np.sign(lam[-1]) * np.sqrt(abs(lam[-1])) * VASP_TO_THZ)


def named_fc_set(
    material: str, name: str, material_setup: MaterialSetup | None = None
) -> NDArray[np.float64]:
    """Full coefficient vector (n_coeff,) of a named FC set, eV/A^2.

    Raises
    ------
    UnknownFCSetError
        If the material has no set of that name; the message lists the known ones.
    """
    ref = load_reference(material)
    if name == "mlff_mean":
        return ref.mean.copy()
    if name in ref.models:
        return ref.models[name].copy()
    if name == "raman" and material == "Ge":
        ms = material_setup or setup(material)
        mean = ref.mean
        nu = gamma_optical_thz(ms.basis, mean)
        return mean * (RAMAN_GE_THZ / nu) ** 2  # frequencies scale as sqrt(FC)
    raise UnknownFCSetError(
        f"unknown FC set {name!r} for {material}; known sets: {', '.join(ref.fc_set_names())}"
    )


def sensitivity(
    material_setup: MaterialSetup,
    coefficients: NDArray[np.float64],
    scale: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Sensitivity per coefficient, ``scale_k ||dI/dc_k|| / ||I||`` (float64, exact broadening).

    The derivative is a central difference with step ``1e-4 scale_k``, all coefficients in
    one batch.
    """
    fm = material_setup.forward_model(dtype=torch.float64, method="exact")
    c = np.asarray(coefficients, dtype=float)
    scale = np.where(np.abs(scale) > 0, np.abs(scale), 1e-3)
    steps = np.diag(1e-4 * scale)
    batch = np.vstack([c[None], c + steps, c - steps])
    with torch.no_grad():
        intensity = fm.spectra(batch).intensity.numpy()
    n = len(c)
    deriv = (intensity[1 : n + 1] - intensity[n + 1 :]) / (2e-4 * scale)[:, None, None]
    return scale * np.linalg.norm(deriv.reshape(n, -1), axis=1) / np.linalg.norm(intensity[0])


def training_domain(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Domain bounds (low, high) from the ensemble values (n_models,) of one coefficient."""
    v = np.asarray(values, dtype=float)
    if np.all(v > 0) or np.all(v < 0):
        s = np.sign(v[0])
        lo, hi = 0.75 * np.abs(v).min(), 2.5 * np.abs(v).max()
        return np.sort(np.array([s * lo, s * hi]))
    return np.array([2.5 * v.min(), 2.5 * v.max()])


def project(
    basis: FCBasis, fc: NDArray[np.float64], supercell: int
) -> tuple[NDArray[np.float64], float]:
    """Least-squares projection of a full supercell FC array onto the basis.

    Only the bonds inside the cutoff enter the fit (self terms follow from the acoustic
    sum rule). Returns the coefficients and the relative residual over those bonds.
    """
    from simulations.lattice.phonopy_export import full_force_constants

    cols = []
    for k in range(basis.n_coefficients):
        e = np.zeros(basis.n_coefficients)
        e[k] = 1.0
        cols.append(full_force_constants(basis, e, supercell)[0])
    a = np.stack(cols, axis=-1)  # (n_s, n_s, 3, 3, n_coeff)
    n_s = a.shape[0]
    off = ~np.eye(n_s, dtype=bool)
    inside = np.abs(a).sum(axis=(2, 3, 4)) > 0
    mask = off & inside
    rows = a[mask].reshape(-1, basis.n_coefficients)
    target = fc[mask].reshape(-1)
    coeffs, *_ = np.linalg.lstsq(rows, target, rcond=None)
    resid = float(np.linalg.norm(rows @ coeffs - target) / np.linalg.norm(target))
    return coeffs, resid


#: A model is left out of the ensemble when its projected FCs change by more than this
#: (relative norm) between 0.01 and 0.02 A displacements: its energy surface is not
#: harmonic enough near equilibrium for finite differences (seen for CHGNet 0.3.0, r2scan).
DISPLACEMENT_TOLERANCE = 0.05


def build_reference(
    material: str,
    models: list[str] | None = None,
    *,
    progress: bool = True,
) -> dict[str, object]:
    """Relax and compute FCs with every available ML force field; return the JSON record.

    Every model is run at two finite displacements (0.01 and 0.02 A). A model enters the
    ensemble only if its FCs are dynamically stable in our model (no imaginary mode on the
    path or the stability mesh) and change by less than ``DISPLACEMENT_TOLERANCE`` between
    the two displacements; the others are stored with the reason they were left out.
    Needs the optional ``mlff`` dependencies (CHGNet, SevenNet).
    """
    from tqdm import tqdm

    from simulations.fcdb import mlff
    from simulations.lattice.force_constants import build_fc_basis
    from simulations.lattice.phonopy_export import supercell_size

    ms = setup(material)
    available = mlff.available_models()
    chosen = models or available
    missing = sorted(set(chosen) - set(available))
    if missing:
        raise SimulationError(f"force fields not available here: {missing}; available: {available}")
    n = supercell_size(ms.basis)
    matrix = np.diag([n, n, n])
    fm = ms.forward_model(dtype=torch.float64, method="exact")
    records: dict[str, dict[str, object]] = {}
    for name in tqdm(chosen, desc=f"{material}: ML force fields", disable=not progress):
        calc = mlff.make_calculator(name)
        result = mlff.compute_reference(_ase_atoms(ms), name, matrix, calculator=calc)
        fc_large = mlff.force_constants(result.relaxed, calc, matrix, displacement=0.02)
        volume = abs(np.linalg.det(np.asarray(result.relaxed.cell)))
        scale = float(np.cbrt(volume / abs(np.linalg.det(ms.crystal.lattice))))
        rbasis = build_fc_basis(
            replace(ms.crystal, lattice=ms.crystal.lattice * scale), shells=ms.defaults.shells
        )
        if rbasis.names != ms.basis.names:  # pragma: no cover - symmetry must be kept
            raise SimulationError(f"{name}: relaxation changed the bond structure of {material}")
        coeffs, resid = project(rbasis, np.asarray(result.force_constants), n)
        coeffs_large, _ = project(rbasis, fc_large, n)
        change = float(np.linalg.norm(coeffs_large - coeffs) / np.linalg.norm(coeffs))
        with torch.no_grad():
            min_freq = float(fm.spectra(coeffs[None]).min_frequency_thz[0])
        reason = ""
        if min_freq < -fm.imaginary_tol:
            reason = f"dynamically unstable (lowest frequency {min_freq:.2f} THz)"
        elif change > DISPLACEMENT_TOLERANCE:
            reason = (
                f"FCs change by {100 * change:.0f} % between 0.01 and 0.02 A displacements "
                "(not harmonic near equilibrium)"
            )
        records[name] = {
            "coefficients": coeffs.tolist(),
            "included": not reason,
            "excluded_reason": reason,
            "lattice_constant_A": float(result.lattice_constant_a),
            "lattice_scale": scale,
            "projection_residual": resid,
            "displacement_change": change,
            "lowest_frequency_thz": min_freq,
            "gamma_optical_thz": gamma_optical_thz(ms.basis, coeffs),
            "wall_time_s": round(float(result.wall_time_s), 2),
        }
        logger.info(
            "%s %s: a=%.4f A, change %.3f, lowest %.2f THz %s",
            material,
            name,
            result.lattice_constant_a,
            change,
            min_freq,
            reason,
        )
    return finish_reference(ms, records, chosen)


def finish_reference(
    ms: MaterialSetup, records: dict[str, dict[str, object]], chosen: list[str]
) -> dict[str, object]:
    """Add ensemble statistics, sensitivity, kept coefficients and domain to model records."""
    included = sorted(m for m, r in records.items() if r.get("included", True))
    if len(included) < 2:
        raise SimulationError(
            f"{ms.crystal.name}: only {len(included)} force field(s) passed the checks; "
            "an ensemble needs at least two"
        )
    matrix = np.array([records[m]["coefficients"] for m in included], dtype=float)
    mean = matrix.mean(axis=0)
    scale = np.abs(matrix).max(axis=0)
    sens = sensitivity(ms, mean, scale)
    order = np.argsort(-sens)
    kept = [ms.basis.names[k] for k in order[: ms.defaults.n_keep]]
    domain = [training_domain(matrix[:, ms.basis.index(n)]).tolist() for n in kept]
    import phonopy

    record: dict[str, object] = {
        "material": ms.crystal.name,
        "shells": ms.defaults.shells,
        "cutoff_A": ms.basis.cutoff,
        "names": list(ms.basis.names),
        "coefficients_table": ms.basis.describe(),
        "models": {m: records[m] for m in included},
        "excluded_models": {m: r for m, r in records.items() if m not in included},
        "min": matrix.min(axis=0).tolist(),
        "max": matrix.max(axis=0).tolist(),
        "mean": mean.tolist(),
        "gamma_optical_thz_mean": gamma_optical_thz(ms.basis, mean),
        "sensitivity": {ms.basis.names[k]: float(sens[k]) for k in range(len(sens))},
        "kept": kept,
        "domain": domain,
        "domain_rule": "same sign s: s*[0.75 min|phi|, 2.5 max|phi|]; mixed: [2.5 min, 2.5 max]",
        "grid_fingerprint": ms.grid.fingerprint,
        "provenance": {
            "command": f"steer simulate reference --material {ms.crystal.name}",
            "models": chosen,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "python": host()["python"],
            "phonopy": phonopy.__version__,
        },
    }
    return record


def _ase_atoms(ms: MaterialSetup) -> Any:
    from ase import Atoms

    c = ms.crystal
    return Atoms(symbols=list(c.species), cell=c.lattice, scaled_positions=c.positions, pbc=True)


def resolve_fc(
    material: str,
    spec: str | dict[str, float],
    material_setup: MaterialSetup | None = None,
) -> tuple[str, NDArray[np.float64]]:
    """Turn an FC specification into ``(label, full coefficient vector)``.

    ``spec`` is a named set (``"mlff_mean"``, a model name, ``"raman"`` for Ge), a path to a
    JSON file ``{"coefficients": {name: value}}``, or such a mapping itself. Coefficients a
    mapping leaves out are taken from ``mlff_mean``; unknown names are an error.
    """
    ms = material_setup or setup(material)
    if isinstance(spec, str) and spec.endswith(".json"):
        path = Path(spec)
        if not path.exists():
            raise UnknownFCSetError(f"FC file {spec} does not exist")
        try:
            loaded = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidCoefficientsError(f"{spec} is not valid JSON: {exc}") from exc
        values = loaded.get("coefficients", loaded) if isinstance(loaded, dict) else None
        if not isinstance(values, dict):
            raise InvalidCoefficientsError(f'{spec} must hold {{"coefficients": {{name: value}}}}')
        return path.stem, _from_mapping(material, ms, values)
    if isinstance(spec, dict):
        return "custom", _from_mapping(material, ms, spec)
    return spec, named_fc_set(material, spec, ms)


def _from_mapping(
    material: str, ms: MaterialSetup, values: dict[str, float]
) -> NDArray[np.float64]:
    unknown = sorted(set(values) - set(ms.basis.names))
    if unknown:
        raise InvalidCoefficientsError(
            f"unknown force-constant names {unknown} for {material}; known: {list(ms.basis.names)}"
        )
    try:
        base = named_fc_set(material, "mlff_mean", ms)
    except SimulationError:
        base = np.zeros(ms.basis.n_coefficients)
    for name, value in values.items():
        try:
            base[ms.basis.index(name)] = float(value)
        except (TypeError, ValueError) as exc:
            raise InvalidCoefficientsError(f"coefficient {name}={value!r} is not a number") from exc
    return ms.basis.check_coefficients(base)
