"""``steer advise``: rank the next orientations; the closed-loop benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from steering.exceptions import AdvisorError

__all__ = ["advise_app"]

advise_app = typer.Typer(
    help="The advisor: rank the next goniometer angles by the information they add on the "
    "FCs; the closed-loop benchmark of strategies.",
    no_args_is_help=True,
)


#: ``--score`` of ``advise rank`` and ``advise benchmark``
ScoreOption = Annotated[
    str,
    typer.Option(
        "--score",
        help="Sort by the spectrum's D-optimal gain (spectrum: what the learned "
        "estimator needs) or the FC posterior's (fc); both are reported.",
    ),
]


#: ``--weighting`` of ``advise rank`` and ``advise benchmark``
WeightingOption = Annotated[
    str,
    typer.Option(
        "--weighting",
        help="How the spectrum's gain weighs its bins: scarcity (1 / the exposure all the "
        "candidates together give the bin: the high-symmetry points' small bins weigh most) "
        "or uniform.",
    ),
]


def _range(spec: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in spec.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3):
        raise AdvisorError(f"cannot read range {spec!r}: use start:stop[:step] (degrees)")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else 1.0


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
    material: Annotated[str, typer.Option("--material", "-m", help="Shipped material.")] = "Ge",
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
    ei: Annotated[float | None, typer.Option("--ei", help="Incident energy, meV.")] = None,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Sample temperature, K (Bose factor).")
    ] = 5.0,
    top: Annotated[int, typer.Option("--top", help="Candidates to print.")] = 10,
    score: ScoreOption = "spectrum",
    weighting: WeightingOption = "scarcity",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Rank candidate angles (the instrument model's coverage of each, ARCS-like detector,
    mounting u = [1,0,0], v = [0,1,0]) by their D-optimal gain (--score), reporting the FC
    posterior each would give."""
    from tqdm import tqdm

    from consumers.reduction.folding import Folder, FoldTable
    from simulations.fcdb.reference import load_reference, resolve_fc
    from simulations.instrument.spectrometer import Instrument, Orientation
    from simulations.lattice.materials import setup
    from steering.advisor.ranking import Advisor, candidate_omegas, check_score, check_weighting

    check_score(score, "--score")
    check_weighting(weighting, "--weighting")
    ins = Instrument.arcs_like()
    omegas = candidate_omegas(*_range(candidates), ins)
    done = list(candidate_omegas(*_range(measured), ins)) if measured else []
    ms = setup(material)
    advisor = Advisor(material, material_setup=ms, temperature=temperature)
    kwargs: dict[str, Any] = {}
    if estimate is not None:
        kwargs["mean"], kwargs["std"] = _estimate_from(estimate, advisor.fc_names)
        kwargs["counts_scale"] = counts_scale
    elif fc is not None:
        ref = load_reference(material)
        _, full = resolve_fc(material, fc, ms)
        kwargs["mean"] = np.array([full[ref.names.index(n)] for n in advisor.fc_names])
        kwargs["std"] = std_fraction * advisor.width
        kwargs["counts_scale"] = counts_scale
    energy = float(ei if ei is not None else ms.defaults.ei)
    orientation = Orientation.from_vectors(ms.crystal, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    folder = Folder(FoldTable.cached(ms.crystal, ms.grid), ms.grid, ins, orientation, energy)
    cover = np.stack(
        [folder.coverage(w) for w in tqdm(omegas, desc="coverage", unit="angle", leave=False)]
    )
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


@advise_app.command("benchmark")
def benchmark_cmd(
    material: Annotated[str, typer.Option("--material", "-m", help="Shipped material.")] = "Ge",
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
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            help="Simulated runs of the same crystal (--fc): each seed draws new events, "
            "readbacks and charges.",
        ),
    ] = 5,
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
    prior: Annotated[
        str,
        typer.Option(
            "--prior",
            help="Advisor's posterior: information (prior + Fisher information measured "
            "so far) or model (the model server's std).",
        ),
    ] = "information",
    score: ScoreOption = "spectrum",
    weighting: WeightingOption = "scarcity",
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            help="Target band: reached when the error stays within this fraction of the "
            "all-orientations error.",
        ),
    ] = 0.10,
    loose_tolerance: Annotated[
        float, typer.Option("--loose-tolerance", help="A looser band, reported beside it.")
    ] = 0.25,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Keep each seed's simulated candidates here and reuse them (keyed by the "
            "arguments and the simulation and fold code).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Closed loop: each strategy picks orientations one at a time from the same simulated
    candidates; after each pick the model server estimates the FCs."""
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
        return
    for name, entry in result["strategies"].items():
        typer.echo(
            f"{name:>10}: orientations to target {entry['orientations_to_target']} "
            f"(within {loose_tolerance:.0%}: {entry['orientations_to_loose_target']})"
        )
    typer.echo(f"curves: {out}")
