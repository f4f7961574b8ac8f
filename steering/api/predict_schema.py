"""The JSON answer of ``POST /predict`` as pydantic models, for the OpenAPI document.

They describe what :meth:`model_server.prediction.results.Prediction.to_dict` writes (axes,
units, where the force constants came from); the endpoint itself returns that dict as it
is. Arrays are nested lists, ``null`` where a value is not finite (e.g. a bin no
orientation covers).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DOSOutput",
    "DetectorOutput",
    "FCInfo",
    "FCModelInfo",
    "IQEOutput",
    "IndirectOutput",
    "PowderOutput",
    "PredictResponse",
]

_Grid = list[Any]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class FCModelInfo(_Doc):
    """What the e3nn structure -> force-constant model says about its prediction."""

    name: Literal["e3nn"] = Field(description="The model.")
    version: str = Field(description="`fc_e3nn-<12 hex digits of its weights' SHA-256>`.")
    distance: float = Field(
        description="Distance of the structure from the training set (~1: its edge)."
    )
    in_domain: bool = Field(description="Distance and ensemble spread below the thresholds.")
    message: str = Field(description="Why the prediction is not to be trusted (else empty).")
    relative_spread: float = Field(description="||ensemble std|| / ||mean|| over all blocks.")
    cutoff_A: float = Field(description="Bond cutoff of the model, Angstrom.")
    n_pairs: int = Field(description="Force-constant blocks predicted (bonds and self terms).")
    known_elements: list[str] = Field(description="Elements the model was trained on.")


class FCInfo(_Doc):
    """The force constants used."""

    label: str = Field(description="Name of the set, `custom`, or `e3nn (<version>)`.")
    source: Literal["reference", "given", "e3nn"] = Field(description="Where they came from.")
    units: Literal["eV/A^2"] = Field(description="Units of the coefficients.")
    coefficients: dict[str, float] = Field(
        description="Symmetry-reduced coefficients by name (empty for `e3nn`: the predicted "
        "per-pair blocks are used as they are; see `projection` for a shipped material)."
    )


class IQEOutput(_Doc):
    """Folded I(q, E) of the orientations together."""

    axes: list[str] = Field(description='`["q_index", "energy_meV"]`.')
    units: str = Field(description="`mbarn/(sr meV) per atom`.")
    intensity: _Grid = Field(description="(n_q, n_E) coverage-weighted mean S(Q, E).")
    coverage: _Grid = Field(description="(n_q, n_E) sr meV.")
    signal: _Grid = Field(description="(n_q, n_E) mbarn per atom.")
    qpoints_rlu: _Grid = Field(description="(n_q, 3) q-path, r.l.u. of the primitive cell.")
    dispersion_meV: _Grid = Field(description="(n_q, n_branches) phonon energies on the path.")


class DetectorOutput(_Doc):
    """Expected S(Q, E) on the detector for each omega."""

    axes: list[str] = Field(description='`["omega_deg", "angle_deg", "energy_meV"]`.')
    units: str = Field(description="`mbarn/(sr meV) per atom`.")
    intensity: _Grid = Field(description="(n_omega, n_angle, n_E).")
    angle_deg: list[float] = Field(description="In-plane scattering-angle bin centres.")
    q_magnitude_inv_angstrom: _Grid = Field(description="(n_angle, n_E) |Q| of every bin.")


class PowderOutput(_Doc):
    """Coherent one-phonon powder spectrum."""

    axes: list[str] = Field(description='`["q_inv_angstrom", "energy_meV"]`.')
    units: str = Field(description="`mbarn/meV per atom`.")
    q_inv_angstrom: list[float] = Field(description="|Q| bin centres, 1/Angstrom.")
    intensity: _Grid = Field(description="(n_Q, n_E) spherical average of S(Q, E).")
    accessible: _Grid = Field(description="(n_Q, n_E) bool: reached by the detector at Ei.")


class DOSOutput(_Doc):
    """Phonon density of states on a Gamma-centred q mesh."""

    units: str = Field(description="`states/meV per primitive cell`.")
    energy_meV: list[float] = Field(description="(n_E,) energies, meV.")
    energy_THz: list[float] = Field(description="(n_E,) the same in THz.")
    total: list[float] = Field(description="(n_E,) total DOS (integrates to 3 n).")
    by_element: dict[str, list[float]] = Field(description="Partial DOS of each element.")
    by_atom: _Grid = Field(description="(n_atoms, n_E) partial DOS (each integrates to 3).")
    sigma_meV: float = Field(description="Gaussian broadening (standard deviation).")
    mesh: list[int] = Field(description="q mesh, points per reciprocal axis.")
    mean_energy_meV: float = Field(description="Mean energy of the real modes.")
    min_frequency_THz: float = Field(description="Lowest mode (negative: imaginary).")


class IndirectOutput(_Doc):
    """1D S(E) of a VISION/TOSCA-like indirect-geometry spectrometer."""

    units: str = Field(description="`mbarn/(sr meV) per atom`.")
    instrument: dict[str, Any] = Field(
        description="Name, banks, scattering angles, final energies, resolution."
    )
    energy_meV: list[float] = Field(description="(n_E,) bin centres.")
    energy_edges_meV: list[float] = Field(description="(n_E + 1,) bin edges.")
    total: list[float] = Field(description="(n_E,) average of the banks, all orders.")
    by_bank: dict[str, list[float]] = Field(description="Each bank, all orders.")
    q_inv_angstrom: dict[str, list[float]] = Field(description="|Q| of each bank at each E.")
    by_order: dict[str, list[float]] = Field(description="Order 1, 2, ... (banks' average).")
    by_element: dict[str, list[float]] = Field(description="Each element's share.")
    temperature_K: float = Field(description="Sample temperature.")
    orders: int = Field(description="Highest phonon order.")
    cross_section: Literal["total", "incoherent"] = Field(description="Cross sections used.")


class PredictResponse(_Doc):
    """The JSON answer of `POST /predict`."""

    material: str = Field(description="Shipped material, or `cif-<hash>` / formula of a CIF.")
    formula: str = Field(description="Reduced formula.")
    n_atoms: int = Field(description="Atoms in the primitive cell.")
    fc_source: Literal["reference", "given", "e3nn"] = Field(
        description="`reference`: a shipped named set; `given`: coefficients or a run's "
        "estimate; `e3nn`: predicted from the structure."
    )
    in_domain: bool | None = Field(
        description="The e3nn model's verdict (null for other FC sources); an out-of-domain "
        "prediction is returned but marked in `warnings` and the PNG."
    )
    distance: float | None = Field(description="The model's distance from its training set.")
    message: str = Field(description="The model's message when out of domain (else empty).")
    fc_model: FCModelInfo | None = Field(description="The model's details (e3nn only).")
    fc: FCInfo = Field(description="The force constants used.")
    ei_meV: float = Field(description="Incident energy.")
    temperature_K: float = Field(description="Sample temperature.")
    stable: bool = Field(description="No imaginary mode beyond the tolerance.")
    warnings: list[str] = Field(description="Notes, the out-of-domain one first.")
    outputs: list[str] = Field(description="The outputs computed.")
    energy_meV: list[float] = Field(description="Energy bin centres of iqe/detector/powder.")
    iqe: IQEOutput | None = Field(None, description="When asked for.")
    detector: DetectorOutput | None = Field(None, description="When asked for.")
    powder: PowderOutput | None = Field(None, description="When asked for.")
    dos: DOSOutput | None = Field(None, description="When asked for.")
    indirect: IndirectOutput | None = Field(None, description="When asked for.")
