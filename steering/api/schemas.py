"""The API's schemas: the bodies, answers and path values of the routes, as pydantic models.

* ``POST /predict``: :class:`PredictRequest` (with :class:`FCCoefficients` or
  :class:`FCFileUpload`), its JSON answer
  :class:`PredictResponse` and :class:`PredictError`. The answer's models describe what
  :meth:`model_server.prediction.results.Prediction.to_dict` writes (axes, units, where the
  force constants came from); the endpoint itself returns that dict as it is. Arrays are
  nested lists, ``null`` where a value is not finite (e.g. a bin no orientation covers).
* ``POST /runs/{id}/advisor``: :class:`AdvisorRange`.
* ``POST /runs/{id}/advisor/exclude``, ``/force``, ``/target``: :class:`ExcludeRange`,
  :class:`ForceNext`, :class:`TargetPrecision`.
* ``GET /runs/{id}/figures/{name}.png``: :class:`FigureName`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from model_server.prediction.indirect import INDIRECT_INSTRUMENTS
from model_server.prediction.predict import DEFAULT_OUTPUTS, MAX_CIF_ATOMS, MAX_OMEGAS, OUTPUTS
from model_server.prediction.spectra import MAX_ATOMS_DOS, MAX_ATOMS_POWDER
from simulations.lattice.backgrounds import COMPONENTS
from simulations.lattice.crystals import SHIPPED_MATERIALS

__all__ = [
    "AdvisorRange",
    "DOSOutput",
    "DetectorOutput",
    "ErrorBody",
    "ExcludeRange",
    "FCCoefficients",
    "FCFileUpload",
    "FCInfo",
    "FCModelInfo",
    "FigureName",
    "ForceNext",
    "IQEOutput",
    "IndirectOutput",
    "PowderOutput",
    "PredictError",
    "PredictRequest",
    "PredictResponse",
    "TargetPrecision",
]

_SHIPPED = ", ".join(sorted(SHIPPED_MATERIALS))

Finite = Annotated[float, Field(allow_inf_nan=False)]
Miller = Annotated[float, Field(allow_inf_nan=False, ge=-100.0, le=100.0)]
CoefficientValue = Annotated[float, Field(allow_inf_nan=False, ge=-1000.0, le=1000.0)]
Output = Literal["iqe", "detector", "powder", "dos", "indirect"]
CoefficientName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def _default_outputs() -> list[Output]:
    return ["iqe", "detector", "powder"]


class FCCoefficients(BaseModel):
    """Force constants by coefficient name."""

    model_config = ConfigDict(extra="forbid", strict=True)

    coefficients: dict[CoefficientName, CoefficientValue] = Field(
        max_length=500,
        description="Symmetry-reduced FC coefficients by name (e.g. `1NN_xx`), eV/A^2. For a "
        "shipped material the coefficients left out are those of `mlff_mean`; for a CIF "
        "every coefficient of its basis must be given (a request without them is answered "
        "with their names).",
    )


#: A background component of a prediction.
Background = Literal["elastic", "multiphonon", "tof_background", "can"]

Base64 = Annotated[str, StringConstraints(min_length=1, max_length=50_000_000)]


class FCFileUpload(BaseModel):
    """Force constants of a file: phonopy's YAML or CASTEP's .castep_bin, base64-encoded."""

    model_config = ConfigDict(extra="forbid", strict=True)

    file: Base64 = Field(
        description="The file's bytes, base64: `phonopy.yaml` / `phonopy_params.yaml` (with "
        "force constants or forces inside, or FORCE_CONSTANTS / FORCE_SETS below) or a "
        "CASTEP `.castep_bin` (PHONON_WRITE_FORCE_CONSTANTS). The body size limit applies "
        "(`STEER_MAX_BODY_BYTES`, 1 MiB by default: raise it for large supercells)."
    )
    format: Literal["phonopy", "castep_bin"] | None = Field(
        None, description="The file's format; left out: told from the content."
    )
    filename: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        None, description="The file's name, shown in the answer (`fc.file.filename`)."
    )
    force_constants: Base64 | None = Field(
        None, description="phonopy: FORCE_CONSTANTS beside the YAML, base64."
    )
    force_sets: Base64 | None = Field(
        None, description="phonopy: FORCE_SETS beside the YAML, base64 (phonopy makes the FCs)."
    )
    born: Base64 | None = Field(
        None, description="phonopy: BORN beside the YAML, base64 (used when the YAML has none)."
    )
    nac: bool = Field(
        True,
        description="Apply the non-analytic (LO-TO) term when the file has Born charges and "
        "a dielectric tensor (Wang's method; see docs/predict.md for where it applies).",
    )


class PredictRequest(BaseModel):
    """What to predict: crystal, force constants, instrument setting and orientations."""

    # strict: a boolean or a string is not a number (lax mode would read true as 1.0)
    # the examples are requests the server answers (a test sends each)
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"material": "Ge", "fc": "raman", "ei": 80.0, "omegas": [0.0, 30.0]},
                {"material": "Nb", "fc": {"coefficients": {"1NN_xx": 1.9}}, "ei": 50.0},
                {"material": "Al", "temperature": 300.0, "outputs": ["dos", "indirect"]},
            ]
        },
    )

    material: Annotated[str, StringConstraints(max_length=100)] | None = Field(
        None,
        description=f"A shipped material: {_SHIPPED}. Leave it out with `cif`, or with "
        "`fc: current:<run id>` (the run's material).",
    )
    cif: Annotated[str, StringConstraints(max_length=200_000)] | None = Field(
        None,
        description="CIF text of an ordered crystal instead of `material`. Without `fc` the "
        "e3nn structure -> force-constant model predicts its FCs (the answer carries the "
        "model's `distance`, `in_domain` and `message`; 503 when no model is installed). "
        "Atoms in the primitive cell: at most "
        f"{MAX_CIF_ATOMS} for `iqe`/`detector` and for FCs given as coefficients (every "
        "coefficient of its 4-shell basis; the 422 answer to a named set lists them), "
        f"{MAX_ATOMS_POWDER} for `powder`, {MAX_ATOMS_DOS} for `dos`/`indirect`. Partial "
        "occupancy is refused with a supercell hint. Its q-path and grid are the generic "
        "defaults (with predicted FCs the grid reaches 1.1 x the highest mode); the first "
        "request builds its fold table (seconds).",
    )
    fc: (
        Annotated[str, StringConstraints(min_length=1, max_length=300)]
        | FCCoefficients
        | FCFileUpload
        | None
    ) = Field(
        None,
        description="Force constants. Left out: `mlff_mean` for a shipped material, the e3nn "
        "model's prediction for a CIF. `e3nn`: the model's prediction (shipped materials "
        "too, with its projection onto their named coefficients for comparison). A named "
        "set of the material (`mlff_mean`, a force-field name, `raman` for Ge), "
        "`current:<run id>` (the latest estimate of that run in the history: its FC "
        'means), `{"coefficients": {name: value}}` (eV/A^2), or an FC file `{"file": '
        '"<base64>", "format": "phonopy" | "castep_bin"}` (`fc_source: imported`; with a '
        "material or CIF the file must be for that structure, without either its own "
        "structure is used).",
    )
    ei: float | None = Field(
        None,
        gt=0.0,
        le=1000.0,
        allow_inf_nan=False,
        description="Incident energy, meV (default: the material's, 80 for Ge, 50 for Nb, "
        "60 for Al). Must exceed the top of the material's energy grid.",
    )
    temperature: float = Field(
        5.0, ge=0.0, le=2000.0, allow_inf_nan=False, description="Sample temperature, K."
    )
    omegas: list[Finite] = Field(
        default_factory=lambda: [0.0],
        max_length=MAX_OMEGAS,
        description="Goniometer angles, degrees, within the goniometer's limits (-180..180); "
        f"at most {MAX_OMEGAS}. Needed by `iqe` and `detector`; about 0.5 s each.",
    )
    outputs: list[Output] = Field(
        default_factory=_default_outputs,
        max_length=10,
        description="Any of `iqe` (the folded I(q,E) the orientations would give), `detector` "
        "(expected S(Q,E) on the detector per omega: scattering angle vs E), `powder` "
        "(coherent S(|Q|,E)), `dos` (phonon DOS, partial by element and atom) and "
        "`indirect` (1D S(E) of a VISION/TOSCA-like indirect-geometry spectrometer); "
        f"default {', '.join(DEFAULT_OUTPUTS)}.",
    )
    u: tuple[Miller, Miller, Miller] = Field(
        (1.0, 0.0, 0.0),
        description="Conventional hkl along the beam at omega = 0 (simulated runs' default).",
    )
    v: tuple[Miller, Miller, Miller] = Field(
        (0.0, 1.0, 0.0),
        description="Conventional hkl in the horizontal plane at omega = 0 (not parallel to u).",
    )
    powder_directions: int = Field(
        128, ge=8, le=2048, description="Directions averaged at every |Q| of the powder output."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seed of the powder average's random directions."
    )
    detector_angle_step: float = Field(
        2.0,
        ge=0.25,
        le=30.0,
        allow_inf_nan=False,
        description="Width of the detector output's scattering-angle bins, degrees.",
    )
    dos_sigma: float = Field(
        0.5,
        ge=0.05,
        le=20.0,
        allow_inf_nan=False,
        description="Gaussian broadening (standard deviation) of the `dos` output, meV.",
    )
    indirect_instrument: Literal[tuple(INDIRECT_INSTRUMENTS)] = Field(  # type: ignore[valid-type]
        "vision",
        description="Indirect-geometry spectrometer of the `indirect` output: `vision` (E_f "
        "3.5 meV, banks at 45 and 135 deg, FWHM 1.25 % of E) or `tosca`.",
    )
    indirect_orders: int = Field(
        2,
        ge=1,
        le=4,
        description="Highest phonon order of the `indirect` output (1: fundamentals; 2: "
        "with overtones and combinations of two phonons, ...).",
    )
    backgrounds: list[Background] = Field(
        ["elastic", "multiphonon", "tof_background"],
        max_length=len(COMPONENTS),
        description="Background components returned beside the one-phonon signal (in "
        "`iqe`, `detector` and `powder`, under `components`; `iqe.total_intensity` is their "
        "sum with the signal): `elastic` (incoherent elastic line: sigma_inc/(4 pi) "
        "exp(-Q^2 <u^2>) times the resolution at E = 0), `multiphonon` (orders 2-3 in the "
        "incoherent approximation, total cross sections), `tof_background` (a background "
        "flat in time of flight with `background_fraction` of the events; not in `powder`), "
        "`can` (an aluminium can: its powder phonons, multiphonon, elastic line and "
        "Debye-Scherrer rings, `can_atoms` Al atoms per sample atom). Same units as the "
        "signal, mbarn/(sr meV) per atom. `[]`: the one-phonon signal alone.",
    )
    background_fraction: float = Field(
        0.1,
        ge=0.0,
        le=0.99,
        allow_inf_nan=False,
        description="Share of the events in the time-of-flight background, as `steer "
        "simulate run --background-fraction` makes it.",
    )
    can_atoms: float = Field(
        0.2,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="Al atoms of the can in the beam per sample atom.",
    )

    @field_validator("outputs")
    @classmethod
    def _some_outputs(cls, value: list[Output]) -> list[Output]:
        if not value:
            raise ValueError(f"outputs is empty: ask for at least one of {', '.join(OUTPUTS)}")
        return list(dict.fromkeys(value))


class ErrorBody(BaseModel):
    """An error answer: a message, or (422 for a request that does not match its schema)
    pydantic's list of validation errors, each with ``loc``, ``msg``, ``type`` and the
    offending ``input`` (shortened)."""

    detail: str | list[dict[str, Any]] = Field(
        description="What was wrong and how to fix it, or the list of validation errors."
    )


#: The error answer of ``POST /predict`` (the same as every route's).
PredictError = ErrorBody


# The JSON answer of ``POST /predict``.

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
    source: Literal["reference", "given", "e3nn", "imported"] = Field(
        description="Where they came from."
    )
    units: Literal["eV/A^2"] = Field(description="Units of the coefficients.")
    coefficients: dict[str, float] = Field(
        description="Symmetry-reduced coefficients by name (empty for `e3nn` and `imported`: "
        "the per-pair blocks are used as they are; see `projection` for a shipped material)."
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
    components: dict[str, _Grid] = Field(
        description="Background component (`elastic`, `multiphonon`, `tof_background`, "
        "`can`: those asked for in `backgrounds`) -> (n_q, n_E) its coverage-weighted mean, "
        "in the units of `intensity`; null where not covered."
    )
    total_intensity: _Grid = Field(
        description="(n_q, n_E) `intensity` plus every component: the expected spectrum."
    )
    components_description: dict[str, str] = Field(description="What each component is.")


class DetectorOutput(_Doc):
    """Expected S(Q, E) on the detector for each omega."""

    axes: list[str] = Field(description='`["omega_deg", "angle_deg", "energy_meV"]`.')
    units: str = Field(description="`mbarn/(sr meV) per atom`.")
    intensity: _Grid = Field(description="(n_omega, n_angle, n_E).")
    angle_deg: list[float] = Field(description="In-plane scattering-angle bin centres.")
    q_magnitude_inv_angstrom: _Grid = Field(description="(n_angle, n_E) |Q| of every bin.")
    components: dict[str, _Grid] = Field(
        description="Background component -> (n_angle, n_E), the same at every omega "
        "(functions of |Q| and E), in the units of `intensity`."
    )


class PowderOutput(_Doc):
    """Coherent one-phonon powder spectrum."""

    axes: list[str] = Field(description='`["q_inv_angstrom", "energy_meV"]`.')
    units: str = Field(description="`mbarn/meV per atom`.")
    q_inv_angstrom: list[float] = Field(description="|Q| bin centres, 1/Angstrom.")
    intensity: _Grid = Field(description="(n_Q, n_E) spherical average of S(Q, E).")
    accessible: _Grid = Field(description="(n_Q, n_E) bool: reached by the detector at Ei.")
    components: dict[str, _Grid] = Field(
        description="Background component (`elastic`, `multiphonon`, `can`; the "
        "time-of-flight background is the detector's and not here) -> (n_Q, n_E), in the "
        "units of `intensity`."
    )


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
    fc_source: Literal["reference", "given", "e3nn", "imported"] = Field(
        description="`reference`: a shipped named set; `given`: coefficients or a run's "
        "estimate; `e3nn`: predicted from the structure; `imported`: an FC file (`fc.file`: "
        "name, format, SHA-256)."
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


class AdvisorRange(BaseModel):
    """Candidate range of a run's advisor (degrees)."""

    # strict: a boolean is not an angle (lax mode would read false as 0.0)
    model_config = ConfigDict(allow_inf_nan=False, strict=True)

    start: float = Field(ge=-360.0, le=360.0, description="First candidate angle, degrees.")
    stop: float = Field(ge=-360.0, le=360.0, description="Stop (exclusive), degrees.")
    step: float = Field(
        1.0,
        gt=0,
        le=360.0,
        description="Step, degrees; at most `STEER_ADVISOR_MAX_CANDIDATES` (3600) angles, "
        "counted before they are made, within the goniometer's limits.",
    )


Angle = Annotated[float, Field(ge=-360.0, le=360.0)]
PositiveFinite = Annotated[float, Field(gt=0.0, le=1e6)]


class ExcludeRange(BaseModel):
    """A closed range of goniometer angles the advisor must not offer (degrees)."""

    model_config = ConfigDict(allow_inf_nan=False, strict=True, extra="forbid")

    from_: Angle = Field(alias="from", description="Lower end, degrees (included).")
    to: Angle = Field(description="Upper end, degrees (included); above `from`.")


class ForceNext(BaseModel):
    """The angle to offer next, once, before the advisor's best (degrees)."""

    model_config = ConfigDict(allow_inf_nan=False, strict=True, extra="forbid")

    omega: Angle = Field(description="Goniometer angle, degrees, within the run's candidates.")


class TargetPrecision(BaseModel):
    """The precision the experiment aims at: per-coefficient standard deviations and/or a
    D-criterion (at least one)."""

    model_config = ConfigDict(allow_inf_nan=False, strict=True, extra="forbid")

    std: dict[CoefficientName, PositiveFinite] | None = Field(
        None,
        max_length=500,
        description="Target standard deviation per FC coefficient, eV/A^2 (positive).",
    )
    d_criterion: PositiveFinite | None = Field(
        None,
        description="Target D-criterion: det(FC covariance)^(1/n_fc), (eV/A^2)^2 (positive).",
    )


class FigureName(StrEnum):
    """Figures of a run."""

    spectrum = "spectrum"
    dispersion = "dispersion"
    coverage = "coverage"
    fc = "fc"
