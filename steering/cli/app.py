"""``steer``: the command line of the steering service.

This module only wires parts together; the physics lives in :mod:`simulations`.
Every command that computes results prints them as JSON with ``--json`` (on stdout;
progress bars and logs go to stderr).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from consumers.exceptions import ConsumerError
from model_server.exceptions import ModelServerError
from simulations.exceptions import SimulationError
from simulations.jsonutil import json_default
from steering.cli.advise import advise_app
from steering.cli.fcdb import fcdb_app
from steering.cli.predict import predict_cmd
from steering.exceptions import SteeringError

__all__ = ["app", "main"]

logger = logging.getLogger("steering")

app = typer.Typer(
    name="steer",
    help="Streaming steering service for single-crystal inelastic neutron scattering.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
simulate_app = typer.Typer(
    help="Physics and the synthetic instrument: force constants, dispersions, training sets, "
    "simulated runs.",
    no_args_is_help=True,
)
app.add_typer(simulate_app, name="simulate")
app.add_typer(advise_app, name="advise")
app.add_typer(fcdb_app, name="fcdb")
app.command("predict")(predict_cmd)

MaterialOpt = Annotated[
    str, typer.Option("--material", "-m", help="Shipped material (Ge, Nb, Al) or a CIF file.")
]
FcOpt = Annotated[
    str,
    typer.Option(
        "--fc",
        help="Named FC set (mlff_mean, a model name, raman for Ge) or a JSON file "
        '{"coefficients": {name: value}}.',
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _emit(payload: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=None, default=json_default))
    else:
        for key, value in payload.items():
            if isinstance(value, list) and len(value) > 8:
                value = f"[{len(value)} items]"
            typer.echo(f"{key}: {value}")


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
    _emit(
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
    _emit(payload, as_json)


@simulate_app.command("dataset")
def simulate_dataset(
    material: MaterialOpt = "Ge",
    n: Annotated[int, typer.Option("--n", help="Number of stable spectra.")] = 10000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="HDF5 file to write.")] = Path("train.h5"),
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Training set: FCs sampled uniformly in the training domain, stable ones kept, I(q,E)."""
    from simulations.fcdb.dataset import generate_dataset

    summary = generate_dataset(
        material,
        n,
        out,
        seed=seed,
        progress=not quiet,
        command=shlex.join(["steer", *sys.argv[1:]]),
    )
    _emit(summary.to_dict(), as_json)


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
    _emit(payload, as_json)


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
    _emit(
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
        typer.Option("--omegas", help="Goniometer angles, deg: 'start:stop:step' or 'a,b,c'."),
    ] = "0:120:1",
    events: Annotated[
        float,
        typer.Option("--events-per-orientation", help="Mean events per orientation."),
    ] = 2e5,
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    out: Annotated[Path, typer.Option("--out", help="Recorded-run file to write.")] = Path(
        "run.steer"
    ),
    ei: Annotated[
        float | None, typer.Option("--ei", help="Incident energy, meV (default: material's).")
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sample, K.")] = 5.0,
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
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Simulate a rotation run: pl72/f144/ev44/6s4t messages and bluesky documents."""
    from simulations.instrument.spectrometer import Instrument
    from simulations.runs.simulate import RunPlan, parse_omegas, simulate_run

    instrument = Instrument.from_pixel_table(pixel_table) if pixel_table else None

    plan = RunPlan(
        material=material,
        fc=fc,
        omegas=tuple(float(w) for w in parse_omegas(omegas)),
        events_per_orientation=events,
        seed=seed,
        ei=ei,
        temperature=temperature,
        count_time=count_time,
        background_fraction=background,
        prefix=prefix,
    )
    _emit(simulate_run(plan, out, instrument=instrument, progress=not quiet).to_dict(), as_json)


@simulate_app.command("sqe")
def simulate_sqe(
    material: MaterialOpt = "Ge",
    fc: FcOpt = "mlff_mean",
    ei: Annotated[
        float | None, typer.Option("--ei", help="Incident energy, meV (default: material's).")
    ] = None,
    omega: Annotated[float, typer.Option("--omega", help="Goniometer angle, deg.")] = 0.0,
    energy: Annotated[
        float | None,
        typer.Option("--energy", help="Energy of the constant-E slice, meV (default: mid)."),
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Sample, K.")] = 5.0,
    out: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("slice.png"),
    as_json: JsonOpt = False,
) -> None:
    """What one orientation sees: a constant-E slice and a Q-E cut of S(Q,E) on the detector."""
    from simulations.instrument.viewing import orientation_view

    _emit(
        orientation_view(
            material, fc, ei=ei, omega=omega, energy=energy, temperature=temperature, out=out
        ),
        as_json,
    )


@simulate_app.command("check-run")
def simulate_check_run(
    run: Annotated[Path, typer.Argument(help="Recorded-run file (.steer).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="PNG of the binned run over the dispersion.")
    ] = None,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Distance to the q-path, 1/A.")
    ] = 0.05,
    pixel_table: Annotated[
        Path | None,
        typer.Option("--pixel-table", help="The pixel table the run was made with, if any."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Bin a simulated run simply; check each q column's peak lies on a true branch."""
    from simulations.runs.check import check_run

    result = check_run(
        run, tolerance=tolerance, out=out, progress=not quiet, pixel_table=pixel_table
    )
    _emit(result, as_json)


@app.command("fold")
def fold(
    run: Annotated[Path, typer.Argument(help="Recorded-run file (.steer).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="HDF5 file for I(q,E), counts, exposure.")
    ] = None,
    mode: Annotated[
        str,
        typer.Option("--segmentation", help="auto, bluesky (Event documents) or omega (log)."),
    ] = "auto",
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Distance to the q-path, 1/A.")
    ] = 0.05,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Simulated run: compare with the forward model of its true FC set "
            "(Pearson correlations, peaks on branches) under 'dispersion'.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold a recorded run offline through the consumers' code path (no broker)."""
    from consumers.offline import fold_recorded_run

    summary, _ = fold_recorded_run(
        run, out, mode=mode, tolerance=tolerance, progress=not quiet, check=check
    )
    _emit(summary, as_json)


def _vector(spec: str, name: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in spec.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(np.isfinite(parts)):
        raise SteeringError(f"{name} {spec!r}: give three numbers h,k,l")
    return parts  # type: ignore[return-value]


@app.command("coverage")
def coverage_cmd(
    run: Annotated[
        Path | None,
        typer.Option(
            "--run",
            help="Recorded run (.steer): its set-up (run start) and the angles it counted at.",
        ),
    ] = None,
    material: Annotated[
        str, typer.Option("--material", "-m", help="Shipped material (without --run).")
    ] = "Ge",
    angles: Annotated[
        str | None,
        typer.Option(
            "--angles",
            help="Goniometer angles start:stop[:step], degrees, below stop as the "
            "advisor's candidates (default: the run's angles with --run, else 0:120:1).",
        ),
    ] = None,
    ei: Annotated[
        float | None, typer.Option("--ei", help="Incident energy, meV (material's default).")
    ] = None,
    u: Annotated[str, typer.Option("--u", help="Mounting: u (along the beam at omega 0).")] = (
        "1,0,0"
    ),
    v: Annotated[str, typer.Option("--v", help="Mounting: v (in the horizontal plane).")] = (
        "0,1,0"
    ),
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Distance to the q-path, 1/A.")
    ] = 0.05,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compute a set-up's coverages (exposure per unit charge) of its goniometer angles into
    the disk cache, before the run: its consumers then read them and compute none. Without
    --run: the ARCS-like instrument of the simulated runs."""
    from consumers.offline import precompute_coverages, run_setup
    from consumers.reduction.folding import Folder, FoldTable
    from simulations.instrument.spectrometer import Instrument, Orientation
    from simulations.lattice.materials import setup
    from steering.advisor.ranking import candidate_omegas
    from steering.cli.advise import _range

    if run is not None:
        folder, run_angles = run_setup(run, tolerance=tolerance)
    else:
        ms = setup(material)
        energy = float(ei if ei is not None else ms.defaults.ei)
        orientation = Orientation.from_vectors(ms.crystal, _vector(u, "--u"), _vector(v, "--v"))
        if not np.all(np.isfinite(orientation.ub)):
            raise SteeringError(f"--u {u} and --v {v} give no UB matrix (parallel?)")
        table = FoldTable.cached(ms.crystal, ms.grid, tolerance=tolerance)
        folder = Folder(table, ms.grid, Instrument.arcs_like(), orientation, energy)
        run_angles = []
    if angles is not None or run is None:
        # the advisor's candidates: the same angles, the same checks
        grid = candidate_omegas(*_range(angles or "0:120:1"), folder.instrument)
        todo = [float(x) for x in grid]
    else:
        todo = run_angles
    if not todo:
        raise SteeringError("no angles: the run has none; give --angles")
    _emit(precompute_coverages(folder, todo, progress=not quiet), as_json)


BootstrapOpt = Annotated[
    str, typer.Option("--bootstrap", envvar="STEER_KAFKA_BOOTSTRAP", help="Kafka host:port.")
]
PrefixOpt = Annotated[
    str, typer.Option("--prefix", envvar="STEER_PREFIX", help="Instrument topic prefix.")
]
ZmqPrefixOpt = Annotated[
    str, typer.Option("--zmq-prefix", help="bluesky 0MQ prefix (Publisher/RemoteDispatcher).")
]
ZmqFormatOpt = Annotated[
    str,
    typer.Option(
        "--zmq-format",
        help="bluesky 0MQ document serialization: pickle (bluesky's default; read by a "
        "restricted unpickler), json, or msgpack where installed.",
    ),
]


@app.command("replay")
def replay_cmd(
    run: Annotated[Path, typer.Argument(help="Recorded-run file (.steer).")],
    bootstrap: BootstrapOpt,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="Rename the topics to this prefix.")
    ] = None,
    speed: Annotated[
        str, typer.Option("--speed", help="Time scaling of the original timing, or 'max'.")
    ] = "max",
    bluesky_zmq: Annotated[
        str | None,
        typer.Option(
            "--bluesky-zmq",
            metavar="HOST:PORT",
            help="Publish the bluesky documents with bluesky's Publisher to this 0MQ proxy "
            "in port (steer zmq-proxy) instead of Kafka.",
        ),
    ] = None,
    zmq_prefix: ZmqPrefixOpt = "",
    zmq_format: ZmqFormatOpt = "pickle",
    partitions: Annotated[
        int,
        typer.Option(
            "--partitions",
            min=1,
            help="Partitions of the topics when they have to be created (messages go to the "
            "partition of their key, the run id).",
        ),
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Publish a recorded run onto Kafka (bluesky documents optionally over 0MQ), in order,
    at any speed."""
    from consumers.kafka.transport import replay

    factor = None if speed == "max" else float(speed)
    if factor is not None and not factor > 0:
        raise typer.BadParameter("--speed must be > 0 or 'max'")
    result = replay(
        run,
        bootstrap,
        prefix=prefix,
        speed=factor,
        bluesky_zmq=bluesky_zmq,
        zmq_prefix=zmq_prefix.encode(),
        zmq_format=zmq_format,
        partitions=partitions,
    )
    _emit(result, as_json)


@app.command("record")
def record_cmd(
    bootstrap: BootstrapOpt,
    prefix: PrefixOpt,
    out: Annotated[Path, typer.Option("--out", help="Recorded-run file to write.")] = Path(
        "run.steer"
    ),
    idle: Annotated[
        float, typer.Option("--idle-timeout", help="Stop after this many idle seconds.")
    ] = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Record a run's topics from Kafka into a recorded-run file."""
    from consumers.kafka.transport import record

    _emit(record(bootstrap, prefix, out, idle_timeout_s=idle), as_json)


@app.command("consume")
def consume_cmd(
    bootstrap: BootstrapOpt,
    prefix: PrefixOpt,
    state_dir: Annotated[
        Path, typer.Option("--state-dir", envvar="STEER_STATE_DIR", help="Checkpoint folder.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="HDF5 export when the run is complete.")
    ] = None,
    mode: Annotated[str, typer.Option("--segmentation", help="auto, bluesky or omega.")] = "auto",
    idle: Annotated[
        float | None, typer.Option("--idle-exit", help="Exit after this many idle seconds.")
    ] = None,
    publish: Annotated[
        bool,
        typer.Option("--publish-snapshots", help="Publish snapshots to <prefix>_folded."),
    ] = False,
    bluesky_zmq: Annotated[
        str | None,
        typer.Option(
            "--bluesky-zmq",
            metavar="HOST:PORT",
            help="Take the bluesky documents from this 0MQ proxy out port (bluesky's "
            "RemoteDispatcher, journalled in the state dir) instead of <prefix>_bluesky.",
        ),
    ] = None,
    zmq_prefix: ZmqPrefixOpt = "",
    zmq_format: ZmqFormatOpt = "pickle",
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Go on with the runs that follow on the topics (each complete run is "
            "exported to STATE_DIR/runs/<run id>.h5); stop with SIGTERM or --idle-exit.",
        ),
    ] = False,
    group: Annotated[
        bool,
        typer.Option(
            "--group",
            help="Scale out: join the consumer group steer-<prefix> and fold the partitions "
            "it gives this process, one lane per partition number in STATE_DIR/partition-<p>/ "
            "(a folder every member shares; a member that dies is taken over). Implies "
            "--follow; runs are exported to STATE_DIR/partition-<p>/runs/<run id>.h5.",
        ),
    ] = False,
    partitions: Annotated[
        int,
        typer.Option(
            "--partitions",
            min=1,
            help="With --group: partitions of the run topics when they have to be created.",
        ),
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Run the live consumer: fold a run, checkpointing after every orientation.

    Without --follow it returns when the run is complete (a later start of the same
    state dir takes the next run on the topics).
    """
    from consumers.kafka.transport import (
        KafkaDeadLetter,
        KafkaSnapshotSink,
        KafkaSource,
        MergedSource,
    )
    from consumers.service import ConsumerService

    if group and (out is not None or bluesky_zmq):
        raise typer.BadParameter(
            "--group exports every run to STATE_DIR/partition-<p>/runs/ and reads the bluesky "
            "documents from Kafka: leave out --out and --bluesky-zmq"
        )
    try:  # the state folder first: a bad one is refused before Kafka is reached
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConsumerError(
            f"state folder {state_dir} cannot be created: {exc.strerror or exc}"
        ) from exc
    dead = KafkaDeadLetter(bootstrap, prefix)
    if group:
        from consumers.kafka.group import GroupConsumer

        sink = KafkaSnapshotSink(bootstrap, prefix) if publish else None
        try:
            members = GroupConsumer(
                bootstrap,
                prefix,
                state_dir,
                partitions=partitions,
                mode=mode,
                dead_letter=dead,
                snapshots=sink,
            )
            members.run(idle_exit_s=idle)
        finally:
            dead.close()
            if sink is not None:
                sink.close()
        _emit(members.summary(), as_json)
        return
    source: KafkaSource | MergedSource
    zmq_source = None
    if bluesky_zmq:
        from consumers.zmq import ZmqBlueskySource

        kafka = KafkaSource(bootstrap, prefix, bluesky=False)
        try:
            zmq_source = ZmqBlueskySource(
                bluesky_zmq,
                state_dir,
                prefix=zmq_prefix.encode(),
                deserializer=zmq_format,
                dead_letter=dead,
            )
        except BaseException:
            kafka.close()
            dead.close()
            raise
        source = MergedSource(kafka, zmq_source)
    else:
        source = KafkaSource(bootstrap, prefix)
    sink = KafkaSnapshotSink(bootstrap, prefix) if publish else None
    try:
        service = ConsumerService(source, state_dir, mode=mode, dead_letter=dead, follow=follow)
        if sink is not None:
            service.set_snapshot_sink(sink.bind(service.run_info))
        service.run(idle_exit_s=idle)
        summary = service.summary()
        if zmq_source is not None:
            summary["bluesky_zmq"] = zmq_source.stats()
        if out is not None and service.pipeline.acc is not None:
            service.pipeline.acc.write_hdf5(out, metadata={"bootstrap": bootstrap})
            summary["path"] = str(out)
    finally:
        source.close()
        dead.close()
        if sink is not None:
            sink.close()
    _emit(summary, as_json)


@app.command("model-serve")
def model_serve_cmd(
    bootstrap: BootstrapOpt,
    prefix: PrefixOpt,
    model_dir: Annotated[
        Path,
        typer.Option("--model-dir", envvar="STEER_MODEL_DIR", help="Frozen models by material."),
    ] = Path("models"),
    partitions: Annotated[
        int,
        typer.Option(
            "--partitions", min=1, help="Partitions of <prefix>_folded when it is created."
        ),
    ] = 1,
    idle: Annotated[
        float | None, typer.Option("--idle-exit", help="Exit after this many idle seconds.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """A stateless model-server replica: estimates every snapshot on <prefix>_folded
    (published by steer consume --publish-snapshots) and publishes it to
    <prefix>_estimates. Run as many as <prefix>_folded has partitions; they share them in
    the consumer group steer-<prefix>-model. Stop with SIGTERM or --idle-exit."""
    from model_server.replica import ModelReplica

    replica = ModelReplica(bootstrap, prefix, model_dir, partitions=partitions)
    try:
        replica.run(idle_exit_s=idle)
    finally:
        replica.close()
    _emit(replica.summary(), as_json)


@app.command("zmq-proxy")
def zmq_proxy_cmd(
    in_port: Annotated[
        int, typer.Option("--in-port", help="Port the run engine's Publisher sends to.")
    ],
    out_port: Annotated[
        int, typer.Option("--out-port", help="Port consumers (RemoteDispatcher) subscribe to.")
    ],
    host: Annotated[
        str, typer.Option("--host", help="Interface to bind (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
) -> None:
    """Run bluesky's 0MQ Proxy (the same as bluesky's own `bluesky-0MQ-proxy IN OUT`) until
    interrupted: run engine -> --in-port, `steer consume --bluesky-zmq HOST:OUT`."""
    from bluesky.callbacks.zmq import Proxy

    proxy = Proxy(in_address=f"{host}:{in_port}", out_address=f"{host}:{out_port}")
    logger.info("0MQ proxy: in %s, out %s", proxy.in_port, proxy.out_port)
    proxy.start()


@app.command("serve")
def serve_cmd(
    host: Annotated[str, typer.Option("--host", envvar="STEER_HOST", help="Bind address.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option("--port", envvar="STEER_PORT", help="HTTP port.")] = 8000,
    database: Annotated[
        str,
        typer.Option(
            "--database", envvar="STEER_DATABASE_URL", help="SQLAlchemy URL of the run history."
        ),
    ] = "sqlite:///steer.db",
    bootstrap: Annotated[
        str | None,
        typer.Option(
            "--bootstrap",
            envvar=["STEER_KAFKA_BOOTSTRAP", "STEER_BOOTSTRAP"],
            help="Kafka to consume from (host:port); without it only the history is served.",
        ),
    ] = None,
    prefix: Annotated[
        str, typer.Option("--prefix", envvar="STEER_PREFIX", help="Instrument topic prefix.")
    ] = "arcs",
    state_dir: Annotated[
        Path,
        typer.Option("--state-dir", envvar="STEER_STATE_DIR", help="Consumer checkpoints."),
    ] = Path("steer_state"),
    model_dir: Annotated[
        Path,
        typer.Option("--model-dir", envvar="STEER_MODEL_DIR", help="Frozen models by material."),
    ] = Path("models"),
    advisor_score: Annotated[
        str,
        typer.Option(
            "--advisor-score",
            envvar="STEER_ADVISOR_SCORE",
            help="What the advisor sorts by: spectrum (the D-optimal gain of the spectrum, "
            "what the learned estimator needs) or fc (the FC posterior's).",
        ),
    ] = "spectrum",
    advisor_weighting: Annotated[
        str,
        typer.Option(
            "--advisor-weighting",
            envvar="STEER_ADVISOR_WEIGHTING",
            help="How the spectrum's gain weighs its bins: scarcity or uniform.",
        ),
    ] = "scarcity",
) -> None:
    """Status API (FastAPI + uvicorn) over the run history; with --bootstrap also the
    consumer, model server and advisor of a prefix. State changes need STEER_API_TOKEN."""
    import os
    import signal

    import uvicorn

    from steering.api.app import LiveState, create_app
    from steering.db import History
    from steering.service import SteeringService

    if (advisor_score, advisor_weighting) != ("spectrum", "scarcity"):
        from steering.advisor.ranking import check_score, check_weighting

        check_score(advisor_score, "--advisor-score")
        check_weighting(advisor_weighting, "--advisor-weighting")
    history = History(database)
    live = LiveState()
    service = None
    if bootstrap:
        service = SteeringService(
            bootstrap,
            prefix,
            state_dir=state_dir,
            history=history,
            live=live,
            model_dir=model_dir,
            advisor_score=advisor_score,
            advisor_weighting=advisor_weighting,
        )
        service.start()
    token = os.environ.get("STEER_API_TOKEN") or None
    if token is None:
        logger.warning("STEER_API_TOKEN is not set: state-changing endpoints are disabled")
    typer.echo(f"serving on http://{host}:{port}/ (OpenAPI at /docs)", err=True)

    class _Terminated(Exception):
        pass

    def _on_term(signum: int, frame: object) -> None:
        raise _Terminated

    # uvicorn shuts down on SIGTERM, then raises the signal again: here, so that the
    # consumer checkpoints and the process exits 0 (a restart, not a crash)
    signal.signal(signal.SIGTERM, _on_term)
    try:
        uvicorn.run(
            create_app(history, token=token, live=live),
            host=host,
            port=port,
            timeout_graceful_shutdown=5,
        )
    except _Terminated:
        logger.info("SIGTERM: stopped")
    finally:
        if service is not None:
            service.stop()


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's outputs.")] = Path(
        "demo_out"
    ),
    orientations: Annotated[
        int, typer.Option("--orientations", min=2, max=720, help="Angles of the run (0-120 deg).")
    ] = 60,
    events: Annotated[
        float, typer.Option("--events", min=1e3, help="Events per orientation (before folding).")
    ] = 2e5,
    speed: Annotated[
        float, typer.Option("--speed", min=1.0, help="Replay speed (x real time, 60 s/angle).")
    ] = 60.0,
    port: Annotated[
        int | None, typer.Option("--port", help="API / page port (default: a free one).")
    ] = None,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Keep the page up after the run (Ctrl-C).")
    ] = False,
    physics: Annotated[
        bool,
        typer.Option(
            "--physics", help="Also the physics demo (FC sets, phonopy export, training set)."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The whole service on a simulated Ge run: embedded broker, fast replay, consumer, model
    server, advisor, API and live page; a progress view, then a summary and plots."""
    from steering.demo import run_demo

    result = run_demo(
        out,
        orientations=orientations,
        events_per_orientation=events,
        speed=speed,
        port=port,
        keep_serving=keep_serving,
    )
    if physics:
        from simulations.demo import run_demo as physics_demo

        result["physics"] = physics_demo(out / "physics", n=500)
    if as_json:
        _emit(result, True)
    else:
        from steering.demo import format_summary

        typer.echo(format_summary(result))


# -- learned inversion (model_server) ---------------------------------------------------------
ModelOpt = Annotated[Path, typer.Option("--model", help="Frozen model directory.")]


@app.command("train")
def train_cmd(
    material: MaterialOpt = "Ge",
    data: Annotated[
        Path, typer.Option("--data", help="Training set (steer simulate dataset --out).")
    ] = Path("train.h5"),
    out: Annotated[Path, typer.Option("--out", help="Model directory to write.")] = Path(
        "models/ge"
    ),
    seed: Annotated[int, typer.Option("--seed", help="Random seed.")] = 0,
    vae_epochs: Annotated[int, typer.Option("--vae-epochs", help="VAE epochs.")] = 10,
    regressor_epochs: Annotated[
        int, typer.Option("--regressor-epochs", help="Regressor epochs.")
    ] = 8,
    baseline_epochs: Annotated[
        int, typer.Option("--baseline-epochs", help="Baseline CNN epochs.")
    ] = 8,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (<= cores).")] = 2,
    coverage: Annotated[
        Path | None,
        typer.Option("--coverage", help="Saved coverage bank (.npz) instead of rebuilding it."),
    ] = None,
    calibrate_only: Annotated[
        bool,
        typer.Option(
            "--calibrate-only",
            help="Only redo the calibration and out-of-domain thresholds of the model in "
            "--out (trained on --data).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the VAE, the regressor (calibrated) and the baseline CNN; write a frozen model."""
    from model_server.inversion.training import TrainConfig, recalibrate_model, train_model

    if calibrate_only:
        summary = recalibrate_model(
            out, data, progress=not quiet, command=shlex.join(["steer", *sys.argv[1:]])
        )
        _emit(summary, as_json)
        return

    config = TrainConfig(
        seed=seed,
        vae_epochs=vae_epochs,
        regressor_epochs=regressor_epochs,
        baseline_epochs=baseline_epochs,
        threads=threads,
    )
    summary = train_model(
        material,
        data,
        out,
        config=config,
        coverage=coverage,
        progress=not quiet,
        command=shlex.join(["steer", *sys.argv[1:]]),
    )
    _emit(summary, as_json)


@app.command("evaluate")
def evaluate_cmd(
    model: ModelOpt = Path("models/ge"),
    n: Annotated[int, typer.Option("--n", help="Fresh test spectra.")] = 1500,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the test set and noise.")] = 123,
    samples: Annotated[int, typer.Option("--samples", help="Latent samples per spectrum.")] = 256,
    threads: Annotated[int, typer.Option("--threads", help="torch threads (<= cores).")] = 2,
    no_write: Annotated[
        bool,
        typer.Option("--no-write", help="Do not write evaluation.json and PNGs to the model."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate on a fresh forward-model test set: R^2 clean and on the 5x5 noise grid,
    calibration (clean, noisy, by orientations), the baseline CNN side by side."""
    import torch

    from model_server.inversion.evaluation import evaluate_model

    torch.set_num_threads(max(1, threads))
    report = evaluate_model(
        model,
        n=n,
        seed=seed,
        n_samples=samples,
        write=not no_write,
        progress=not quiet,
        command=shlex.join(["steer", *sys.argv[1:]]),
    )
    _emit(report, as_json)


@app.command("estimate")
def estimate_cmd(
    iqe: Annotated[Path, typer.Argument(help="Folded spectrum file (steer fold --out).")],
    model: ModelOpt = Path("models/ge"),
    samples: Annotated[int, typer.Option("--samples", help="Latent samples per spectrum.")] = 256,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "cpu",
    first: Annotated[
        int | None,
        typer.Option("--orientations", help="Use only the run's first N orientations."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """FC estimate (mean, std, quantiles, out-of-domain flag) of a folded spectrum."""
    from model_server.inversion.inference import Estimator

    estimator = Estimator(model, device=device, n_samples=samples)
    _emit(estimator.estimate_file(iqe, first=first).to_dict(), as_json)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``steer`` console script."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("matplotlib", "h5py", "PIL", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python warns whenever another thread holds the GIL for 0.1 s (a fold): noise
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    try:
        app(args=argv, standalone_mode=False)
    except (SimulationError, ConsumerError, ModelServerError, SteeringError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        raise SystemExit(130) from None
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        if isinstance(exc, click.exceptions.Exit):
            raise SystemExit(exc.exit_code) from None
        from kafka.errors import KafkaError

        if isinstance(exc, KafkaError):  # e.g. no broker at the bootstrap address
            typer.echo(f"error: Kafka: {exc}", err=True)
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
