"""``steer predict``: the spectra a crystal is expected to give, from a CIF or a shipped
material, with the force constants of the e3nn model, a coefficient file, a named set or
an FC file of phonopy or CASTEP.

``--fc FILE`` is read by its content: a JSON object of coefficients, a phonopy YAML
(``phonopy.yaml``, ``phonopy_params.yaml``; ``FORCE_CONSTANTS``, ``FORCE_SETS`` and ``BORN``
in the same folder are read with it, as phonopy reads them) or a CASTEP ``.castep_bin``
(``fc_source`` ``imported``). STRUCTURE may itself be such an FC file: its own structure is
then used (a shipped material's when it is one).

``--json`` prints one JSON object on stdout (progress and logs go to stderr)::

    kind            "powder" | "dos" | "indirect" | "single"
    material        the shipped material, or the CIF's cache name (cif-<hash>)
    formula         reduced formula
    n_atoms         atoms in the primitive cell
    fc_source       "e3nn" (predicted from the structure), "given" (--fc coefficient
                    file), "reference" (a shipped named set) or "imported" (phonopy/CASTEP)
    fc_label        name of the FC set
    distance        the e3nn model's distance from its training set (~1: its edge), or null
    in_domain       the model's verdict (null for other sources); false is also a warning
    message         the model's message when out of domain
    stable, min_frequency_thz, ei_meV, temperature_K, warnings, seconds
    out             the PNG written (--out), or null
    <kind>          the kind's arrays:
      dos       energy_meV, total, by_element (states/meV per cell), sigma_meV, mesh,
                mean_energy_meV
      indirect  energy_meV, total, by_bank, by_order (mbarn/(sr meV) per atom),
                instrument, orders
      powder    q_inv_angstrom, energy_meV, intensity (n_Q x n_E, mbarn/meV per atom;
                null where the detector does not reach)
      single    iqe: qpoints_rlu, ticks, energy_meV, intensity (n_q x n_E, null where no
                orientation covers), dispersion_meV; detector: angle_deg, energy_meV,
                intensity averaged over the omegas (n_angle x n_E)
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import typer

from steering.cli.options import IndirectInstrument, JsonOpt, TemperatureOpt
from steering.exceptions import SteeringError

if TYPE_CHECKING:
    from model_server.prediction.fc_import import FCFile

__all__ = ["KINDS", "predict_cmd", "summary"]

#: ``--kind`` -> the prediction outputs it asks for.
KINDS: dict[str, tuple[str, ...]] = {
    "powder": ("powder",),
    "dos": ("dos",),
    "indirect": ("indirect",),
    "single": ("iqe", "detector"),
}

Kind = Literal["powder", "dos", "indirect", "single"]


def _structure(arg: str) -> tuple[str | None, str | None]:
    """(shipped material, CIF text) of the STRUCTURE argument."""
    from simulations.lattice.crystals import SHIPPED_MATERIALS

    if arg in SHIPPED_MATERIALS:
        return arg, None
    path = Path(arg)
    if not path.is_file():
        raise SteeringError(
            f"{arg!r} is neither a CIF file nor a shipped material "
            f"({', '.join(sorted(SHIPPED_MATERIALS))})"
        )
    try:
        return None, path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SteeringError(f"cannot read {path}: {exc}") from exc


def _fc_file(path: Path) -> FCFile | None:
    """The FC file (phonopy YAML, CASTEP binary) at ``path``, or None for anything else."""
    from model_server.exceptions import FCImportError
    from model_server.prediction.fc_import import MAX_FC_FILE_BYTES, FCFile, detect_format

    if path.suffix.lower() == ".json":
        return None
    try:
        size = path.stat().st_size
        if size > MAX_FC_FILE_BYTES:
            raise SteeringError(
                f"the FC file {path} has {size} bytes; at most {MAX_FC_FILE_BYTES} are read"
            )
        data = path.read_bytes()
    except OSError as exc:
        raise SteeringError(f"cannot read the FC file {path}: {exc}") from exc
    try:
        fmt = detect_format(data, path.name)
    except FCImportError:  # a CIF, a coefficient file, or neither (their readers say so)
        return None
    extras: dict[str, bytes] = {}
    if fmt == "phonopy":
        for role, name in (
            ("force_constants", "FORCE_CONSTANTS"),
            ("force_sets", "FORCE_SETS"),
            ("born", "BORN"),
        ):
            beside = path.parent / name
            if beside.is_file():
                extras[role] = beside.read_bytes()
    return FCFile(data=data, filename=path.name, format=fmt, extras=extras)


def _fc_spec(fc: str | None) -> str | dict[str, Any] | FCFile | None:
    """``--fc``: a coefficient JSON file, an FC file (phonopy, CASTEP), ``e3nn`` or a named
    set; None: the default."""
    if fc is None or not (fc.endswith(".json") or Path(fc).is_file()):
        return fc
    imported = _fc_file(Path(fc))
    if imported is not None:
        return imported
    try:
        doc = json.loads(Path(fc).read_text())
    except (OSError, ValueError) as exc:
        raise SteeringError(
            f"cannot read the FC file {fc}: it is not a phonopy YAML or CASTEP .castep_bin, "
            f"and not JSON coefficients ({exc})"
        ) from exc
    values = doc.get("coefficients", doc) if isinstance(doc, dict) else None
    if not isinstance(values, dict) or not values:
        raise SteeringError(
            f'{fc} must hold {{"coefficients": {{name: value}}}} (eV/A^2), e.g. the JSON of '
            "steer simulate reference"
        )
    return {"coefficients": values}


def _omegas(values: list[str] | None) -> list[float]:
    out: list[float] = []
    for v in values or ["0"]:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError as exc:
                    raise SteeringError(f"--omega takes angles in degrees, got {part!r}") from exc
    return out


def summary(prediction: Any, kind: str, out: Path | None) -> dict[str, Any]:
    """The ``--json`` object of a :class:`model_server.prediction.results.Prediction` (see the
    module docstring)."""
    d = prediction.to_dict()
    doc: dict[str, Any] = {
        "kind": kind,
        "material": d["material"],
        "formula": d["formula"],
        "n_atoms": d["n_atoms"],
        "fc_source": d["fc_source"],
        "fc_label": d["fc"]["label"],
        "distance": d["distance"],
        "in_domain": d["in_domain"],
        "message": d["message"],
        "stable": d["stable"],
        "min_frequency_thz": d["min_frequency_thz"],
        "ei_meV": d["ei_meV"],
        "temperature_K": d["temperature_K"],
        "warnings": d["warnings"],
        "seconds": d["seconds"],
        "out": str(out) if out is not None else None,
    }
    if kind == "dos":
        dos = d["dos"]
        doc["dos"] = {
            k: dos[k]
            for k in (
                "units",
                "energy_meV",
                "total",
                "by_element",
                "sigma_meV",
                "mesh",
                "mean_energy_meV",
            )
        }
    elif kind == "indirect":
        ind = d["indirect"]
        doc["indirect"] = {
            k: ind[k]
            for k in ("units", "energy_meV", "total", "by_bank", "by_order", "instrument", "orders")
        }
    elif kind == "powder":
        p = prediction.powder
        doc["powder"] = {
            "units": d["powder"]["units"],
            "q_inv_angstrom": d["powder"]["q_inv_angstrom"],
            "energy_meV": d["energy_meV"],
            "intensity": np.where(p.accessible, p.intensity, np.nan),
            "components": {k: np.where(p.accessible, v, np.nan) for k, v in p.components.items()},
        }
    else:
        iqe, det = d["iqe"], d["detector"]
        with warnings.catch_warnings():  # an angle bin without detector: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(prediction.detector.intensity, axis=0)
        doc["single"] = {
            "omegas_deg": d["omegas_deg"],
            "iqe": {
                k: iqe[k]
                for k in (
                    "units",
                    "qpoints_rlu",
                    "ticks",
                    "energy_meV",
                    "intensity",
                    "dispersion_meV",
                    "components",
                    "total_intensity",
                )
            },
            "detector": {
                "units": det["units"],
                "angle_deg": det["angle_deg"],
                "energy_meV": det["energy_meV"],
                "intensity_mean_over_omegas": mean,
            },
        }
    return doc


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        from model_server.prediction.results import json_array

        return json_array(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def predict_cmd(
    structure: Annotated[
        str,
        typer.Argument(
            help="A CIF file, a shipped material (Ge, Nb, Al), or an FC file (phonopy YAML, "
            ".castep_bin) whose own structure and FCs are used."
        ),
    ],
    kind: Annotated[
        Kind,
        typer.Option(
            "--kind",
            help="powder: coherent S(|Q|,E); dos: phonon DOS and partial DOS; indirect: "
            "VISION/TOSCA-like S(E); single: single-crystal folded I(q,E) and detector S(Q,E) "
            "for --omega.",
        ),
    ] = "powder",
    ei: Annotated[
        float | None,
        typer.Option("--ei", help="Incident energy, meV (powder, single; default: automatic)."),
    ] = None,
    fc: Annotated[
        str | None,
        typer.Option(
            "--fc",
            help='FCs: a JSON file {"coefficients": {name: value}} (eV/A^2) overriding the '
            "model, a phonopy YAML or CASTEP .castep_bin (imported as they are; FORCE_CONSTANTS, "
            "FORCE_SETS, BORN beside the YAML are read with it), 'e3nn' (the model; the "
            "default for a CIF), or a named set of a shipped material (mlff_mean, raman...).",
        ),
    ] = None,
    temperature: TemperatureOpt = 5.0,
    omega: Annotated[
        list[str] | None,
        typer.Option(
            "--omega", help="Goniometer angles for single, degrees: repeat or comma-separate."
        ),
    ] = None,
    instrument: Annotated[
        IndirectInstrument,
        typer.Option("--instrument", case_sensitive=False, help="indirect: vision or tosca."),
    ] = "vision",
    orders: Annotated[
        int, typer.Option("--orders", help="indirect: highest phonon order (1-4).")
    ] = 2,
    sigma: Annotated[float, typer.Option("--sigma", help="dos: Gaussian sigma, meV.")] = 0.5,
    backgrounds: Annotated[
        str,
        typer.Option(
            "--backgrounds",
            help="powder, single: background components beside the one-phonon signal, "
            "comma-separated: elastic, multiphonon, tof_background (single only), can; "
            "'none' for the signal alone.",
        ),
    ] = "elastic,multiphonon,tof_background",
    out: Annotated[
        Path | None, typer.Option("--out", help="Write a PNG (labelled axes and units).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict the spectrum of a crystal. Without --fc a CIF's force constants come from
    the e3nn structure -> force-constant model, with its distance from the training set
    (an out-of-domain prediction is flagged in the output and the PNG's title)."""
    from model_server.prediction.predict import predict

    own = _fc_file(Path(structure)) if Path(structure).is_file() else None
    fc_value: Any
    if own is not None:  # an FC file as STRUCTURE: its own structure
        if fc is not None:
            raise SteeringError(f"{structure} is an FC file: leave --fc out, or give a CIF")
        material, cif, fc_value = None, None, own
    else:
        material, cif = _structure(structure)
        fc_value = _fc_spec(fc)
    prediction = predict(
        material,
        cif=cif,
        fc=fc_value,
        ei=ei,
        temperature=temperature,
        omegas=_omegas(omega),
        outputs=KINDS[kind],
        dos_sigma=sigma,
        indirect_instrument=instrument,
        indirect_orders=orders,
        backgrounds=_backgrounds(backgrounds),
    )
    if out is not None:
        _write_png(prediction, out)
    doc = summary(prediction, kind, out)
    if as_json:
        typer.echo(json.dumps(doc, default=_json_default))
    else:
        _print_summary(doc, kind, out)


def _backgrounds(spec: str) -> tuple[str, ...]:
    """``--backgrounds``: a comma-separated list, or ``none``."""
    words = tuple(w.strip() for w in spec.split(",") if w.strip())
    return () if words in ((), ("none",)) else words


def _write_png(prediction: Any, out: Path) -> None:
    """Write the prediction's figure to ``out`` (PNG), making its folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(prediction.to_png())
    except OSError as exc:
        raise SteeringError(f"cannot write {out}: {exc}") from exc


def _print_summary(doc: dict[str, Any], kind: str, out: Path | None) -> None:
    """The text form of :func:`summary`'s ``doc``: the crystal, its FCs, warnings."""
    domain = (
        ""
        if doc["in_domain"] is None
        else f", distance {doc['distance']:.2f} ({'in' if doc['in_domain'] else 'OUT OF'} domain)"
    )
    typer.echo(
        f"{doc['formula']} ({doc['n_atoms']} atoms/cell): {kind}, FCs {doc['fc_label']} "
        f"[{doc['fc_source']}{domain}], stable {doc['stable']}"
    )
    for note in doc["warnings"]:
        typer.echo(f"  warning: {note}")
    if kind == "dos":
        typer.echo(f"  mean phonon energy {doc['dos']['mean_energy_meV']:.2f} meV")
    if out is not None:
        typer.echo(f"  wrote {out}")
