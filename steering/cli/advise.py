"""``steer advise``: rank the next orientations; the beam-time benchmark and the learned
estimator's closed loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from steering.cli.options import (
    EiOpt,
    JsonOpt,
    MaterialOpt,
    Prior,
    ScoreOpt,
    TemperatureOpt,
    WeightingOpt,
    parse_range,
)
from steering.exceptions import AdvisorError

if TYPE_CHECKING:
    from simulations.instrument.spectrometer import Instrument
    from simulations.lattice.materials import MaterialSetup
    from steering.advisor.ranking import Advisor

__all__ = ["advise_app"]

advise_app = typer.Typer(
    help="The advisor: rank the next goniometer angles by the information they add on the "
    "FCs; the closed-loop benchmark of strategies.",
    no_args_is_help=True,
)


def _estimate_from(path: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) from ``steer estimate --json`` output."""
    try:
        doc = json.loads(path.read_text())
        fc = doc["fc"]
        return (
            np.array([float(fc[n]["mean"]) for n in names]),
            np.array([float(fc[n]["std"]) for n in names]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdvisorError(
            f"{path} is not an estimate (steer estimate --json) with FCs {', '.join(names)}: {exc}"
        ) from exc


@advise_app.command("rank")
def rank_cmd(
    material: MaterialOpt = "Ge",
    candidates: Annotated[
        str, typer.Option("--candidates", help="Candidate angles start:stop[:step], degrees.")
    ] = "0:120:1",
    measured: Annotated[
        str | None,
        typer.Option("--measured", help="Angles already measured, start:stop[:step]."),
    ] = None,
    estimate: Annotated[
        Path | None,
        typer.Option("--estimate", help="Current estimate: the JSON of steer estimate --json."),
    ] = None,
    fc: Annotated[
        str | None,
        typer.Option("--fc", help="Or a named FC set as the estimate's mean (e.g. raman)."),
    ] = None,
    std_fraction: Annotated[
        float,
        typer.Option("--std-fraction", help="With --fc: its std, as a fraction of the domain."),
    ] = 0.1,
    counts_scale: Annotated[
        float, typer.Option("--counts-scale", help="kappa: counts per uC sr meV per unit g I.")
    ] = 1.0,
    charge: Annotated[
        float, typer.Option("--charge", help="Proton charge of one orientation, uC.")
    ] = 23.3,
    ei: EiOpt = None,
    temperature: TemperatureOpt = 5.0,
    top: Annotated[int, typer.Option("--top", help="Candidates to print.")] = 10,
    score: ScoreOpt = "spectrum",
    weighting: WeightingOpt = "scarcity",
    as_json: JsonOpt = False,
) -> None:
    """Rank candidate angles (the instrument model's coverage of each, ARCS-like detector,
    mounting u = [1,0,0], v = [0,1,0]) by their D-optimal gain (--score), reporting the FC
    posterior each would give."""
    from simulations.instrument.spectrometer import Instrument
    from simulations.lattice.materials import setup
    from steering.advisor.ranking import Advisor, candidate_omegas

    ins = Instrument.arcs_like()
    omegas = candidate_omegas(*parse_range(candidates), ins)
    done = list(candidate_omegas(*parse_range(measured), ins)) if measured else []
    ms = setup(material)
    advisor = Advisor(material, material_setup=ms, temperature=temperature)
    kwargs: dict[str, Any] = {}
    if estimate is not None:
        kwargs["mean"], kwargs["std"] = _estimate_from(estimate, advisor.fc_names)
        kwargs["counts_scale"] = counts_scale
    elif fc is not None:
        kwargs["mean"], kwargs["std"] = _named_estimate(advisor, ms, fc, std_fraction)
        kwargs["counts_scale"] = counts_scale
    energy = float(ei if ei is not None else ms.defaults.ei)
    cover = _coverages(ms, ins, omegas, energy)
    ranking = advisor.rank(
        omegas, cover, measured=done, charge=charge, score=score, weighting=weighting, **kwargs
    )
    out = ranking.to_dict(top=top)
    if as_json:
        typer.echo(json.dumps(out))
        return
    typer.echo(f"{out['note']}")
    for c in out["candidates"]:
        mark = " (measured)" if c["measured"] else ""
        typer.echo(f"  omega {c['omega']:7.2f} deg  score {c['score']:.4g}{mark}")


def _named_estimate(
    advisor: Advisor, ms: MaterialSetup, fc: str, std_fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of the advisor's FCs: the named set ``fc`` (eV/A^2), with a std of
    ``std_fraction`` of the training domain's width."""
    from simulations.fcdb.reference import load_reference, resolve_fc

    ref = load_reference(advisor.material)
    _, full = resolve_fc(advisor.material, fc, ms)
    mean = np.array([full[ref.names.index(n)] for n in advisor.fc_names])
    return mean, std_fraction * advisor.width


def _coverages(
    ms: MaterialSetup, instrument: Instrument, omegas: np.ndarray, ei: float
) -> np.ndarray:
    """Coverage of each goniometer angle in ``omegas`` (degrees), (n_omega, n_q, n_E), for
    the mounting u = [1,0,0], v = [0,1,0] at incident energy ``ei`` (meV)."""
    from tqdm import tqdm

    from consumers.reduction.folding import Folder
    from consumers.reduction.table import FoldTable
    from simulations.instrument.spectrometer import Orientation

    orientation = Orientation.from_vectors(ms.crystal, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    folder = Folder(FoldTable.cached(ms.crystal, ms.grid), ms.grid, instrument, orientation, ei)
    return np.stack(
        [folder.coverage(w) for w in tqdm(omegas, desc="coverage", unit="angle", leave=False)]
    )


# benchmark's options with long help texts
SeedsOpt = Annotated[
    int,
    typer.Option(
        "--seeds",
        help="Simulated runs of the same crystal (--fc): each seed draws new events, "
        "readbacks and charges.",
    ),
]
PriorOpt = Annotated[
    Prior,
    typer.Option(
        "--prior",
        help="Advisor's posterior: information (prior + Fisher information measured "
        "so far) or model (the model server's std).",
    ),
]
TargetOpt = Annotated[
    float,
    typer.Option(
        "--tolerance",
        help="Target band: reached when the error stays within this fraction of the "
        "all-orientations error.",
    ),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help="Keep each seed's simulated candidates here and reuse them (keyed by the "
        "arguments and the simulation and fold code).",
    ),
]


@advise_app.command("closed-loop")
def closed_loop_cmd(
    material: MaterialOpt = "Ge",
    fc: Annotated[str, typer.Option("--fc", help="True FC set of the simulated crystal.")] = (
        "raman"
    ),
    strategies: Annotated[
        str,
        typer.Option("--strategies", help="Comma-separated: advisor,sequential,spread,random."),
    ] = "advisor,sequential,spread,random",
    budget: Annotated[
        int, typer.Option("--budget", help="Candidates (0, 1, ... deg) and picks.")
    ] = 120,
    seeds: SeedsOpt = 5,
    first_seed: Annotated[
        int, typer.Option("--first-seed", help="First seed (held-out seeds: e.g. 5).")
    ] = 0,
    events: Annotated[
        float, typer.Option("--events", help="Events per orientation of the simulation.")
    ] = 2e5,
    model: Annotated[
        Path | None, typer.Option("--model", help="Frozen model dir (default models/<material>).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="PNG of the curves.")] = Path(
        "advise_benchmark.png"
    ),
    prior: PriorOpt = "information",
    score: ScoreOpt = "spectrum",
    weighting: WeightingOpt = "scarcity",
    tolerance: TargetOpt = 0.10,
    loose_tolerance: Annotated[
        float, typer.Option("--loose-tolerance", help="A looser band, reported beside it.")
    ] = 0.25,
    cache: CacheOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Closed loop of the learned estimator: each strategy picks orientations one at a time
    from the same simulated candidates; after each pick the model server (the VAE, not the
    refinement) estimates the FCs. The beam-time benchmark is ``steer advise benchmark``."""
    from steering.advisor.closedloop import closed_loop

    result = closed_loop(
        material,
        fc,
        model=model or Path("models") / material.lower(),
        strategies=[s.strip() for s in strategies.split(",") if s.strip()],
        budget=budget,
        seeds=seeds,
        events_per_orientation=events,
        progress=True,
        plot=out,
        prior=prior,
        score=score,
        weighting=weighting,
        cache_dir=cache,
        first_seed=first_seed,
        tolerance=tolerance,
        loose_tolerance=loose_tolerance,
    )
    if as_json:
        typer.echo(json.dumps(result))
    else:
        _print_benchmark(result, loose_tolerance, out)


def _print_benchmark(result: dict[str, Any], loose_tolerance: float, plot: Path) -> None:
    """Each strategy's orientations to the target bands, and where the curves are."""
    for name, entry in result["strategies"].items():
        typer.echo(
            f"{name:>10}: orientations to target {entry['orientations_to_target']} "
            f"(within {loose_tolerance:.0%}: {entry['orientations_to_loose_target']})"
        )
    typer.echo(f"curves: {plot}")


@advise_app.command("benchmark")
def benchmark_cmd(
    truths: Annotated[
        int, typer.Option("--truths", help="True FC sets: the named sets, then domain draws.")
    ] = 30,
    seeds: Annotated[int, typer.Option("--seeds", help="Noise seeds per truth.")] = 3,
    first_seed: Annotated[
        int,
        typer.Option("--first-seed", help="First noise seed (seeds below 100 are for tuning)."),
    ] = 100,
    events: Annotated[
        float,
        typer.Option(
            "--events-per-orientation", help="Detector events of one standard count (60 s)."
        ),
    ] = 2e5,
    strategies: Annotated[
        str,
        typer.Option(
            "--strategies",
            help="Comma-separated: advisor, sequential, random, coarse-to-fine, gpcam, gp "
            "(scikit-learn), oracle.",
        ),
    ] = "advisor,sequential,random,coarse-to-fine,gpcam,gp,oracle",
    target_fraction: Annotated[
        float,
        typer.Option(
            "--target-fraction",
            help="Target std of FC0-FC3 as a fraction of each one's training-domain width.",
        ),
    ] = 0.005,
    budget: Annotated[
        int, typer.Option("--budget", help="Orientations at most per strategy and run.")
    ] = 240,
    step: Annotated[float, typer.Option("--step", help="Candidate spacing, degrees.")] = 2.0,
    span: Annotated[
        float, typer.Option("--span", help="Candidates over [0, span) degrees.")
    ] = 120.0,
    samples: Annotated[
        int, typer.Option("--samples", help="Posterior points the advisor averages over.")
    ] = 2,
    truth_seed: Annotated[
        int, typer.Option("--truth-seed", help="Seed of the domain draws among the truths.")
    ] = 100,
    first_truth: Annotated[
        int,
        typer.Option("--first-truth", help="Skip this many truths of the list (more of them)."),
    ] = 0,
    binning: Annotated[
        str,
        typer.Option(
            "--binning",
            help="What the refinement fits: classes (the path's bins split by zone class, as "
            "steer serve refines them) or path (the q-path's bins alone).",
        ),
    ] = "classes",
    detector_phi: Annotated[
        str,
        typer.Option(
            "--detector-phi",
            help="MIN:MAX in-plane scattering angles (degrees) of the ARCS-like detector "
            "array; a narrower bank keeps the columns' spacing and sees less of Q at each "
            "angle. Results of different arrays do not merge.",
        ),
    ] = "-28:135",
    merge: Annotated[
        list[Path] | None,
        typer.Option(
            "--merge",
            help="Instead of running: join these results (--json output of other runs on the "
            "same set-up: other truths or seeds, or other strategies on the same truths and "
            "seeds, matched by truth and seed) and make the ratios again over all of them.",
        ),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG of median std and RMSE against beam time.")
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            min=1,
            help="BLAS threads of this run (1: run one per core side by side; more threads "
            "than free cores make the small matrix products many times slower).",
        ),
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Beam time to a target precision: strategies of choosing orientations on many simulated
    Ge crystals and noise seeds, each refined from its counts; ratios with paired bootstrap
    95 % intervals."""
    from steering.advisor.benchmark import merge_results

    if merge:
        try:
            docs = [json.loads(p.read_text()) for p in merge]
        except (OSError, ValueError) as exc:
            raise AdvisorError(f"cannot read a result to merge: {exc}") from exc
        result = merge_results(docs)
    else:
        result = _run_benchmark(
            truths=truths,
            seeds=seeds,
            first_seed=first_seed,
            events=events,
            strategies=strategies,
            target_fraction=target_fraction,
            budget=budget,
            step=step,
            span=span,
            samples=samples,
            truth_seed=truth_seed,
            first_truth=first_truth,
            binning=binning,
            detector_phi=_phi_range(detector_phi),
            progress=not as_json,
            threads=threads,
        )
    _report_benchmark(result, plot, as_json)


def _phi_range(text: str) -> tuple[float, float]:
    """``MIN:MAX`` degrees as a pair; a clear error otherwise."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise AdvisorError(f"--detector-phi must be MIN:MAX in degrees, got {text!r}") from None
    return lo, hi


def _run_benchmark(
    *, events: float, strategies: str, progress: bool, threads: int = 1, **kwargs: Any
) -> Any:
    """The benchmark with the BLAS pools limited to ``threads``: its matrix products are
    small (bins x 16), and a pool of two threads on a core another run is using waits for
    it (10x slower, measured on the 2-core development machine)."""
    from threadpoolctl import threadpool_limits

    from steering.advisor.benchmark import beam_time_benchmark

    with threadpool_limits(limits=threads):
        return beam_time_benchmark(
            events_per_orientation=events,
            strategies=[x.strip() for x in strategies.split(",") if x.strip()],
            progress=progress,
            **kwargs,
        )


def _num(x: float | None) -> str:
    """A ratio, or "never" where a strategy never met the target."""
    return "never" if x is None else f"{x:.3f}"


def _report_benchmark(result: dict[str, Any], plot: Path | None, as_json: bool) -> None:
    from steering.advisor.benchmark import plot_benchmark

    if plot is not None:
        plot_benchmark(result, plot)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for name, med in result["median_beam_time_to_target_s"].items():
        met = sum(v is not None for v in result["strategies"][name]["beam_time_to_target_s"])
        n = len(result["strategies"][name]["beam_time_to_target_s"])
        shown = "never" if med is None else f"{med / 60:.1f} min"
        typer.echo(f"{name:>15}: median beam time to target {shown} ({met}/{n} met)")
    for key, r in result["ratios"].items():
        lo, hi = r["ci95"]
        typer.echo(f"{key:>28}: {_num(r['median'])} (95 % CI {_num(lo)}-{_num(hi)})")
    if plot is not None:
        typer.echo(f"figure: {plot}")
