"""``steer simulate``: the physics and the synthetic instrument (force constants, dispersions,
training sets, simulated runs and their checks)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from consumers.exceptions import ConsumerError
from simulations.exceptions import SimulationError
from steering.cli.options import (
    BlueskyFormat,
    EiOpt,
    FcOpt,
    InstrumentFileOpt,
    JsonOpt,
    MaterialOpt,
    QuietOpt,
    RunArg,
    RunOutOpt,
    SeedOpt,
    StreamLayout,
    TemperatureOpt,
    ToleranceOpt,
)
from steering.cli.output import command_line, emit
from steering.exceptions import SteeringError

__all__ = ["simulate_app"]

logger = logging.getLogger(__name__)

simulate_app = typer.Typer(
    help="Physics and the synthetic instrument: force constants, dispersions, training sets, "
    "simulated runs.",
    no_args_is_help=True,
)


@simulate_app.command("fc")
def simulate_fc(
    material: MaterialOpt = "Ge",
    fc: FcOpt = "mlff_mean",
    out: Annotated[Path, typer.Option("--out", help="Folder for phonopy_params.yaml.")] = Path(
        "fc_export"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Write the full force constants of an FC set in phonopy's format (phonopy_params.yaml)."""
    from simulations.fcdb.reference import resolve_fc
    from simulations.lattice.materials import setup
    from simulations.lattice.phonopy_export import supercell_size, write_phonopy_params

    ms = setup(material)
    label, coeffs = resolve_fc(material, fc, ms)
    path = write_phonopy_params(ms.basis, coeffs, out)
    table = out / "coefficients.json"
    table.write_text(
        json.dumps(
            {
                "material": ms.crystal.name,
                "fc_set": label,
                "coefficients": dict(zip(ms.basis.names, coeffs.tolist(), strict=True)),
                "orbits": ms.basis.describe(),
                "units": "eV/A^2",
            },
            indent=2,
        )
    )
    n = supercell_size(ms.basis)
    emit(
        {
            "material": ms.crystal.name,
            "fc_set": label,
            "phonopy_params": str(path),
            "coefficients_file": str(table),
            "supercell_matrix": np.diag([n, n, n]).tolist(),
            "n_coefficients": ms.basis.n_coefficients,
        },
        as_json,
    )


@simulate_app.command("dispersion")
def simulate_dispersion(
    material: MaterialOpt = "Ge",
    fc: FcOpt = "mlff_mean",
    out: Annotated[
        Path | None, typer.Option("--out", help="PNG of I(q,E) with the dispersion.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Phonon dispersion of an FC set along the material's q-path, drawn over I(q, E)."""
    import torch

    from simulations.fcdb.reference import gamma_optical_thz, resolve_fc
    from simulations.lattice.materials import setup
    from simulations.plotting import plot_dispersion

    ms = setup(material)
    label, coeffs = resolve_fc(material, fc, ms)
    fm = ms.forward_model(dtype=torch.float64, method="exact")
    with torch.no_grad():
        freqs = fm.frequencies(coeffs[None])[0].numpy()
        result = fm.spectra(coeffs[None])
    if not bool(result.stable[0]):
        logger.warning(
            "FC set %s is dynamically unstable (lowest frequency %.3f THz)",
            label,
            float(result.min_frequency_thz[0]),
        )
    if out is not None:
        plot_dispersion(
            ms.grid,
            result.intensity[0].numpy(),
            freqs,
            out,
            title=f"{ms.crystal.name}, FC set {label}",
        )
    payload = {
        "material": ms.crystal.name,
        "fc_set": label,
        "fc_names": list(ms.basis.names),
        "fc_values": coeffs.tolist(),
        "qpoints_rlu": ms.grid.qpath.qpoints.round(10).tolist(),
        "frequencies_thz": freqs.round(8).tolist(),
        "gamma_optical_thz": gamma_optical_thz(ms.basis, coeffs),
    }
    if out is not None:
        payload["plot"] = str(out)
    emit(payload, as_json)


@simulate_app.command("dataset")
def simulate_dataset(
    material: MaterialOpt = "Ge",
    n: Annotated[int, typer.Option("--n", help="Number of stable spectra.")] = 10000,
    seed: SeedOpt = 0,
    out: Annotated[Path, typer.Option("--out", help="HDF5 file to write.")] = Path("train.h5"),
    powder: Annotated[
        bool,
        typer.Option(
            "--powder",
            help="A powder training set: S(|Q|, E) on the powder grid at --ei, cropped to "
            "0-10 1/A x 10-45 meV, each FC uniform in 0.5-1.5 x reference.",
        ),
    ] = False,
    ei: Annotated[float, typer.Option("--ei", help="With --powder: incident energy, meV.")] = 50.0,
    temperature: Annotated[
        float, typer.Option("--temperature", help="With --powder: sample temperature, K.")
    ] = 300.0,
    averaging: Annotated[
        str,
        typer.Option(
            "--averaging",
            help="With --powder: powder average, 'shells' (every q + G of a 32^3 q mesh "
            "with the runs' |Q| resolution, averaged over each |Q| bin: what a simulated "
            "powder run folds to) or 'directions' (sampled, no |Q| resolution).",
        ),
    ] = "shells",
    directions: Annotated[
        int, typer.Option("--directions", help="With --powder: directions per |Q|.")
    ] = 512,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Training set: FCs sampled uniformly in the training domain, stable ones kept, I(q,E)
    (with --powder: S(|Q|, E) of a powder)."""
    from simulations.fcdb.dataset import generate_dataset

    if powder:
        from simulations.fcdb.powder_dataset import PowderSpec, generate_powder_dataset

        spec = PowderSpec(
            material=material,
            ei=ei,
            temperature=temperature,
            averaging=averaging,
            directions=directions,
        )
        summary = generate_powder_dataset(
            spec, n, out, seed=seed, progress=not quiet, command=command_line()
        )
        emit({**summary.to_dict(), "sample_kind": "powder", "spec": spec.to_dict()}, as_json)
        return
    summary = generate_dataset(
        material,
        n,
        out,
        seed=seed,
        progress=not quiet,
        command=command_line(),
    )
    emit(summary.to_dict(), as_json)


@simulate_app.command("info")
def simulate_info(material: MaterialOpt = "Ge", as_json: JsonOpt = False) -> None:
    """The material's crystal, FC coefficients, named sets, kept coefficients, domain, grid."""
    from simulations.fcdb.reference import load_reference
    from simulations.lattice.materials import setup

    ms = setup(material)
    payload: dict[str, Any] = {
        "crystal": ms.crystal.summary(),
        "shells": ms.defaults.shells,
        "cutoff_A": round(ms.basis.cutoff, 6),
        "coefficients": ms.basis.describe(),
        "grid": ms.grid.to_dict(),
        "resolution": ms.resolution.to_dict(),
    }
    try:
        ref = load_reference(ms.crystal.name)
    except (SimulationError, ConsumerError) as exc:
        payload["reference"] = str(exc)
    else:
        payload["fc_sets"] = ref.fc_set_names()
        payload["kept"] = list(ref.kept)
        payload["domain"] = ref.domain.tolist()
        payload["sensitivity"] = ref.sensitivity
    emit(payload, as_json)


@simulate_app.command("reference")
def simulate_reference(
    material: MaterialOpt = "Ge",
    models: Annotated[
        list[str] | None, typer.Option("--model", help="Force field (repeat); default all.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="JSON to write (default: the package data file)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the reference FCs from the ML force fields in wheels (needs the mlff extra)."""
    from simulations.fcdb.reference import build_reference, reference_path

    record = build_reference(material, models)
    target = out or reference_path(material)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=1) + "\n")
    emit(
        {
            "material": material,
            "written": str(target),
            "models": list(record["models"]),  # type: ignore[call-overload]
            "kept": record["kept"],
            "gamma_optical_thz_mean": record["gamma_optical_thz_mean"],
        },
        as_json,
    )


@simulate_app.command("run")
def simulate_run_cmd(
    material: MaterialOpt = "Ge",
    fc: FcOpt = "mlff_mean",
    omegas: Annotated[
        str,
        typer.Option(
            "--omegas",
            help="Goniometer angles, deg: 'start:stop:step' or 'a,b,c'; at most "
            "--max-orientations.",
        ),
    ] = "0:120:1",
    events: Annotated[
        float,
        typer.Option(
            "--events-per-orientation",
            min=1.0,
            help="Mean events per orientation (1 to --max-events-per-orientation).",
        ),
    ] = 2e5,
    max_orientations: Annotated[
        int,
        typer.Option(
            "--max-orientations",
            envvar="STEER_MAX_ORIENTATIONS",
            min=1,
            help="Most angles a run may have: counted before any is made (a run of 3,600 "
            "angles at 2e5 events is about 6 GB of events).",
        ),
    ] = 3600,
    max_events: Annotated[
        float,
        typer.Option(
            "--max-events-per-orientation",
            envvar="STEER_MAX_EVENTS_PER_ORIENTATION",
            min=1.0,
            help="Most mean events per orientation (1e8 events are about 2 GB while drawn).",
        ),
    ] = 1e8,
    seed: SeedOpt = 0,
    out: RunOutOpt = Path("run.steer"),
    ei: EiOpt = None,
    temperature: TemperatureOpt = 5.0,
    count_time: Annotated[
        float, typer.Option("--count-time", help="Seconds of counting per orientation.")
    ] = 60.0,
    background: Annotated[
        float, typer.Option("--background-fraction", help="Share of flat-background events.")
    ] = 0.1,
    prefix: Annotated[str, typer.Option("--prefix", help="Kafka topic prefix.")] = "arcs",
    pixel_table: Annotated[
        Path | None,
        typer.Option("--pixel-table", help="CSV id,x,y,z[,solid_angle] (default: ARCS-like)."),
    ] = None,
    instrument_file: Annotated[
        Path | None,
        typer.Option(
            "--instrument",
            help="Mantid instrument definition (IDF .xml, e.g. ARCS_Definition_*.xml): the "
            "real detector geometry (default: ARCS-like). Not with --pixel-table.",
        ),
    ] = None,
    mesh: Annotated[
        int,
        typer.Option(
            "--phonon-mesh",
            min=4,
            help="Phonon-table points per axis (energies interpolated, eigenvectors from the "
            "nearest point); finer is more exact and slower to build. With every pixel "
            "evaluated, the run's expected counts are 3.5-3.6 % per bin (median) off an "
            "exact fold at 80 (the default), 3.8-4.0 % at 40 (docs/refinement.md).",
        ),
    ] = 80,
    group_rows: Annotated[
        int,
        typer.Option(
            "--super-pixel-rows",
            min=1,
            help="Pixels per super-pixel along a tube (S(Q, E) is evaluated at its centre). "
            "The default, 1, evaluates every pixel; 4 is faster and the largest of the "
            "simulator's shortcuts (with --phonon-mesh 40: 4.4-4.8 % per bin off an exact "
            "fold, median; 3 orientations of the README run in 19 s against 35 s at the "
            "defaults).",
        ),
    ] = 1,
    bluesky_format: Annotated[
        BlueskyFormat,
        typer.Option(
            "--bluesky-format",
            help="bluesky documents as JSON with a schema header, or as bluesky-kafka's "
            "Publisher sends them (msgpack, no header, keyed by the RunStart uid).",
        ),
    ] = "json",
    stream_layout: Annotated[
        StreamLayout,
        typer.Option(
            "--stream-layout",
            help="Topic and source names: simulator (<prefix>_runInfo/_events/_motion/"
            "_bluesky, keyed by run id, private metadata beside the nexus_structure) or ess "
            "(<prefix>_filewriter/_detector/_motion, EPICS-style sources, no keys, the run "
            "start's nexus_structure alone; consume with --instrument-config ess).",
        ),
    ] = "simulator",
    monitors: Annotated[
        bool,
        typer.Option(
            "--monitors/--no-monitors",
            help="Publish beam-monitor events (monitor1, monitor2: counts proportional to "
            "each pulse's proton charge) on <prefix>_monitor (ess: <prefix>_beam_monitor) "
            "and name them in the run start.",
        ),
    ] = False,
    backgrounds: Annotated[
        str,
        typer.Option(
            "--backgrounds",
            help="The sample's scattering besides the one-phonon signal, comma-separated: "
            "elastic (incoherent elastic line), multiphonon (orders 2-3, incoherent "
            "approximation), can (an aluminium can's powder phonons, elastic line and "
            "rings); 'none' for the one-phonon signal alone, 'all' for the three. The flat "
            "time-of-flight background is --background-fraction.",
        ),
    ] = "elastic,multiphonon",
    can_atoms: Annotated[
        float,
        typer.Option(
            "--can-atoms",
            min=0.0,
            help="With the can: Al atoms in the beam per sample atom.",
        ),
    ] = 0.2,
    powder: Annotated[
        bool,
        typer.Option(
            "--powder",
            help="A powder sample: no goniometer, --steps counts of --count-time at one "
            "position, events from the spherical average S(|Q|, E); the run start says "
            "sample_kind powder (fold and consume detect it).",
        ),
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps",
            min=1,
            help="With --powder: counting steps (bluesky Events), default 30.",
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Simulate a rotation run (or, with --powder, a powder run): pl72/f144/ev44/6s4t
    messages and bluesky documents."""
    from dataclasses import replace

    from simulations.instrument.spectrometer import Instrument
    from simulations.lattice.backgrounds import Backgrounds
    from simulations.runs.simulate import RunPlan, parse_omegas, simulate_run

    components = replace(Backgrounds.parse(backgrounds), can_atoms=can_atoms)
    if powder and omegas != "0:120:1":
        raise SteeringError(
            "--omegas are a rotation run's angles; a powder run has no goniometer: give --steps"
        )
    if steps is not None and not powder:
        raise SteeringError("--steps counts a powder run's steps: add --powder")
    if powder and steps is not None and steps > max_orientations:
        raise SteeringError(
            f"a run has at most {max_orientations} steps (--max-orientations), got {steps}"
        )
    angles = (
        (0.0,) * (30 if steps is None else steps)
        if powder
        else tuple(float(w) for w in parse_omegas(omegas, max_count=max_orientations))
    )

    if pixel_table is not None and instrument_file is not None:
        raise SteeringError(
            "--pixel-table and --instrument both give the detector: give one of them"
        )
    instrument = None
    if pixel_table is not None:
        instrument = Instrument.from_pixel_table(pixel_table)
    elif instrument_file is not None:
        instrument = Instrument.from_idf(instrument_file)

    plan = RunPlan(
        material=material,
        fc=fc,
        omegas=angles,
        powder=powder,
        events_per_orientation=events,
        max_orientations=max_orientations,
        max_events_per_orientation=max_events,
        seed=seed,
        ei=ei,
        temperature=temperature,
        count_time=count_time,
        background_fraction=background,
        backgrounds=components,
        prefix=prefix,
        mesh=mesh,
        group_rows=group_rows,
        monitors=monitors,
    )
    summary = simulate_run(
        plan,
        out,
        instrument=instrument,
        progress=not quiet,
        bluesky_format=bluesky_format,
        stream_layout=stream_layout,
    )
    emit(summary.to_dict(), as_json)


@simulate_app.command("sqe")
def simulate_sqe(
    material: MaterialOpt = "Ge",
    fc: FcOpt = "mlff_mean",
    ei: EiOpt = None,
    omega: Annotated[float, typer.Option("--omega", help="Goniometer angle, deg.")] = 0.0,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="Energy of the constant-E slice, meV (default: mid)."),
    ] = None,
    temperature: TemperatureOpt = 5.0,
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("slice.png"),
    as_json: JsonOpt = False,
) -> None:
    """What one orientation sees: a constant-E slice and a Q-E cut of S(Q,E) on the detector."""
    from simulations.runs.view import orientation_view

    emit(
        orientation_view(
            material, fc, ei=ei, omega=omega, energy=energy, temperature=temperature, out=out
        ),
        as_json,
    )


@simulate_app.command("check-run")
def simulate_check_run(
    run: RunArg,
    out: Annotated[
        Path | None, typer.Option("--out", help="PNG of the binned run over the dispersion.")
    ] = None,
    tolerance: ToleranceOpt = 0.05,
    pixel_table: Annotated[
        Path | None,
        typer.Option("--pixel-table", help="The pixel table the run was made with, if any."),
    ] = None,
    instrument_file: InstrumentFileOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Bin a simulated run simply; check each q column's peak lies on a true branch."""
    from simulations.runs.check import check_run

    if pixel_table is not None and instrument_file is not None:
        raise SteeringError("--pixel-table and --instrument both name the detector: give one")
    result = check_run(
        run,
        tolerance=tolerance,
        out=out,
        progress=not quiet,
        pixel_table=pixel_table,
        instrument_file=instrument_file,
    )
    emit(result, as_json)
