"""Options that several ``steer`` commands share: declared once, with one help text.

Each alias is an ``Annotated`` type a command gives its parameter, with the default after it
(``material: MaterialOpt = "Ge"``). Options whose values are a fixed set of words are
``Literal`` choices: typer refuses any other value (exit 2) with a usage message that lists
them, before the command runs. The library checks the same values again
(:func:`steering.advisor.ranking.check_score` and the like), for the callers that are not the
command line.

Also here: the parsers of the option values that several commands read (angle ranges,
h,k,l vectors).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import typer

from steering.exceptions import AdvisorError, SteeringError

if TYPE_CHECKING:
    from consumers.streams import InstrumentConfig

__all__ = [
    "BlueskyFormat",
    "BootstrapOpt",
    "EiOpt",
    "FcOpt",
    "IdleExitOpt",
    "IndirectInstrument",
    "InstrumentConfigOpt",
    "InstrumentFileOpt",
    "JsonOpt",
    "MaterialOpt",
    "ModelDirOpt",
    "ModelOpt",
    "NumericThreadsOpt",
    "PrefixOpt",
    "Prior",
    "QuietOpt",
    "RunArg",
    "RunOutOpt",
    "SamplesOpt",
    "Score",
    "ScoreOpt",
    "SeedOpt",
    "Segmentation",
    "SegmentationOpt",
    "StateDirOpt",
    "StreamLayout",
    "TemperatureOpt",
    "ThreadsOpt",
    "ToleranceOpt",
    "Weighting",
    "WeightingOpt",
    "ZmqFormat",
    "ZmqFormatOpt",
    "ZmqPrefixOpt",
    "instrument_streams",
    "limit_numeric_threads",
    "parse_range",
    "parse_vector",
]

# -- choices ---------------------------------------------------------------------------------

#: What the advisor sorts by (:data:`steering.advisor.ranking.SCORES`).
Score = Literal["spectrum", "fc"]
#: How the spectrum's gain weighs its bins (:data:`steering.advisor.ranking.WEIGHTINGS`).
Weighting = Literal["scarcity", "uniform"]
#: The closed-loop advisor's posterior.
Prior = Literal["information", "model"]
#: How events are cut into orientations (:mod:`consumers.reduction.segment`).
Segmentation = Literal["auto", "bluesky", "omega"]
#: bluesky 0MQ document serialization (:data:`consumers.zmq.DESERIALIZERS`; msgpack where
#: installed).
ZmqFormat = Literal["pickle", "json", "msgpack"]
#: bluesky documents of a simulated run (:data:`simulations.runs.simulate.BLUESKY_FORMATS`).
BlueskyFormat = Literal["json", "msgpack"]
#: the simulator's stream layouts (simulations.runs.nexus_structure.STREAM_LAYOUTS)
StreamLayout = Literal["simulator", "ess"]
#: Indirect-geometry instruments (:data:`model_server.prediction.indirect.INDIRECT_INSTRUMENTS`).
IndirectInstrument = Literal["vision", "tosca"]

# -- common to most commands -------------------------------------------------------------------

InstrumentFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--instrument",
        help="The instrument file the run was made with (the Mantid IDF .xml or the "
        "pixel-table CSV), when it is not where the run start says (nor, for an IDF, in "
        "the cache).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
LiveBinningOpt = Annotated[
    str,
    typer.Option(
        "--binning",
        envvar="STEER_BINNING",
        help="What the running refinement fits: classes (default; the q-path's bins split "
        "by the zone class of each event's Brillouin zone, 2-4x tighter for the 1NN pair "
        "from the same counts, where the material has more than one class) or path. The "
        "page, the VAE and the exports show the path's I(q, E) either way "
        "(docs/refinement.md).",
    ),
]
WedgeMeshOpt = Annotated[
    int,
    typer.Option("--wedge-mesh", help="With --binning wedge: points per axis of the wedge's mesh."),
]

# -- physics -----------------------------------------------------------------------------------

MaterialOpt = Annotated[
    str,
    typer.Option(
        "--material",
        "-m",
        help="Shipped material (Ge, Nb, Al) or a CIF file; what needs the stored reference "
        "FCs (named FC sets, the advisor) takes a shipped material only.",
    ),
]
FcOpt = Annotated[
    str,
    typer.Option(
        "--fc",
        help="Named FC set (mlff_mean, a model name, raman for Ge) or a JSON file "
        '{"coefficients": {name: value}}.',
    ),
]
EiOpt = Annotated[
    float | None, typer.Option("--ei", help="Incident energy, meV (default: material's).")
]
TemperatureOpt = Annotated[
    float,
    typer.Option("--temperature", min=0.0, max=2000.0, help="Sample temperature, K (0 to 2000)."),
]
ToleranceOpt = Annotated[float, typer.Option("--tolerance", help="Distance to the q-path, 1/A.")]

# -- recorded runs and the live services -------------------------------------------------------

RunArg = Annotated[Path, typer.Argument(help="Recorded-run file (.steer).")]
RunOutOpt = Annotated[Path, typer.Option("--out", help="Recorded-run file to write.")]
BootstrapOpt = Annotated[
    str, typer.Option("--bootstrap", envvar="STEER_KAFKA_BOOTSTRAP", help="Kafka host:port.")
]
InstrumentConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--instrument-config",
        envvar="STEER_INSTRUMENT_CONFIG",
        metavar="FILE|PRESET",
        help="Which topic and source is which: a TOML or YAML instrument config "
        "(docs/streams.md) or a preset (simulator, ess; its topics take --prefix). Default: "
        "the simulator's topics of --prefix.",
    ),
]
PrefixOpt = Annotated[
    str, typer.Option("--prefix", envvar="STEER_PREFIX", help="Instrument topic prefix.")
]
StateDirOpt = Annotated[
    Path,
    typer.Option("--state-dir", envvar="STEER_STATE_DIR", help="Consumer checkpoint folder."),
]
ModelDirOpt = Annotated[
    Path,
    typer.Option("--model-dir", envvar="STEER_MODEL_DIR", help="Frozen models by material."),
]
IdleExitOpt = Annotated[
    float | None, typer.Option("--idle-exit", help="Exit after this many idle seconds.")
]
SegmentationOpt = Annotated[
    Segmentation,
    typer.Option("--segmentation", help="auto, bluesky (Event documents) or omega (log)."),
]
ZmqPrefixOpt = Annotated[
    str, typer.Option("--zmq-prefix", help="bluesky 0MQ prefix (Publisher/RemoteDispatcher).")
]
ZmqFormatOpt = Annotated[
    ZmqFormat,
    typer.Option(
        "--zmq-format",
        help="bluesky 0MQ document serialization: pickle (bluesky's default; read by a "
        "restricted unpickler), json, or msgpack where installed.",
    ),
]

# -- the learned inversion and the advisor -----------------------------------------------------

ModelOpt = Annotated[Path, typer.Option("--model", help="Frozen model directory.")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Latent samples per spectrum.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch threads (<= cores).")]
ScoreOpt = Annotated[
    Score,
    typer.Option(
        "--score",
        help="Sort by the spectrum's D-optimal gain (spectrum: what the learned "
        "estimator needs) or the FC posterior's (fc); both are reported.",
    ),
]
WeightingOpt = Annotated[
    Weighting,
    typer.Option(
        "--weighting",
        help="How the spectrum's gain weighs its bins: scarcity (1 / the exposure all the "
        "candidates together give the bin: the high-symmetry points' small bins weigh most) "
        "or uniform.",
    ),
]

# -- parsers of option values ------------------------------------------------------------------


def parse_range(spec: str) -> tuple[float, float, float]:
    """``start:stop[:step]`` (degrees; step 1 by default) as (start, stop, step).

    Raises
    ------
    AdvisorError
        If ``spec`` is not two or three numbers separated by colons.
    """
    try:
        parts = [float(x) for x in spec.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise AdvisorError(f"cannot read range {spec!r}: use start:stop[:step] (degrees)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 1.0


def parse_vector(spec: str, name: str) -> tuple[float, float, float]:
    """``h,k,l`` as three finite floats (``name``: the option, for the message).

    Raises
    ------
    SteeringError
        If ``spec`` is not three finite numbers separated by commas.
    """
    try:
        parts = tuple(float(x) for x in spec.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not all(np.isfinite(parts)):
        raise SteeringError(f"{name} {spec!r}: give three numbers h,k,l")
    return parts  # type: ignore[return-value]


def instrument_streams(spec: str | None, prefix: str | None) -> InstrumentConfig | None:
    """The ``--instrument-config`` (a file or a preset, ``{prefix}`` filled in from
    ``prefix`` where the file names none), or None without one."""
    if not spec:
        return None
    from consumers.streams import load_instrument_config

    return load_instrument_config(spec, prefix=prefix)


NumericThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        min=1,
        envvar="STEER_THREADS",
        help="Threads of each numeric pool of the process (BLAS, OpenMP, torch). The service's "
        "matrix products are small and run on several of its threads at once: pools wider "
        "than that oversubscribe the cores (measured: 3x slower under load).",
    ),
]


def limit_numeric_threads(threads: int) -> None:
    """Limit the process's BLAS and OpenMP pools (threadpoolctl) and torch's intra-op pool to
    ``threads``, for the rest of the process.

    The service folds, infers, refines and plans on several Python threads at once, each
    calling numpy/scipy on arrays of ~20,000 x 20: a pool per call as wide as the machine
    spins on cores the other threads are using. Measured on the 2-core development machine
    with two other single-threaded jobs running: ``steer demo`` took 722 s with the default
    pools and 216 s with one thread each (chunk close -> estimate p50 31.9 -> 11.2 s, p99
    99.2 -> 19.6 s).
    """
    import os
    import sys

    from threadpoolctl import threadpool_limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # the pools of libraries loaded later (torch's)
    threadpool_limits(limits=threads)  # and of those loaded already
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
