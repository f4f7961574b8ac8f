"""Closed-loop benchmark of the advisor: how many orientations each strategy needs.

For every seed, all candidate orientations are simulated once (events from the full
S(Q, E) of the true FC set, :func:`simulations.runs.simulate.simulate_run`) and folded
(:func:`consumers.offline.fold_recorded_run`), which gives each orientation's counts and
exposure. Every strategy then picks orientations one at a time from the same candidates;
after each pick the counts and exposure of the picks so far are summed into I = counts /
exposure and the model server estimates the FCs
(:class:`model_server.inversion.inference.Estimator`).
All strategies see the same events, so they differ only in the order.

Strategies:

* ``advisor``: the :class:`steering.advisor.ranking.Advisor`'s best unmeasured candidate under the
  latest estimate (by coverage alone before the first estimate);
* ``sequential``: the conventional sweep, in order of angle;
* ``spread``: coarse to fine: every 8th candidate, then the midpoints, and so on;
* ``random``: a seeded random order.

The FC error is the RMSE over the influential FCs (the first ``n_influential`` of the
model's FCs, the seed paper's FC0..FC3) of (estimate - truth) / training-domain width. The
target is the error of the estimate from all candidates; ``orientations_to_target`` is the
first count from which the error stays within ``tolerance`` (10 %) of the target. The same
count for a looser band (``loose_tolerance``, 25 %) is reported beside it: after a few dozen
orientations the estimate of the poorly determined FCs wanders by far more than 10 % of the
target error while staying well within the model's std (``docs/advisor.md``), so the 10 %
count measures that wander as much as the strategy.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.accumulate import Snapshot
from steering.advisor.ranking import Advisor, RankedCandidate, check_score, check_weighting
from steering.exceptions import AdvisorError

__all__ = [
    "STRATEGIES",
    "CandidateData",
    "closed_loop",
    "load_or_simulate",
    "simulate_candidates",
    "spread_order",
]

logger = logging.getLogger(__name__)

STRATEGIES = ("advisor", "sequential", "spread", "random")


def spread_order(n: int, coarse: int = 8) -> list[int]:
    """Coarse-to-fine order of ``n`` candidates: every ``coarse``-th, then the midpoints
    (every ``coarse/2``-th not taken), and so on down to every one.

    >>> spread_order(8, coarse=4)
    [0, 4, 2, 6, 1, 3, 5, 7]
    """
    order: list[int] = []
    taken = np.zeros(n, dtype=bool)
    stride = coarse
    while stride >= 1:
        for i in range(0, n, stride):
            if not taken[i]:
                taken[i] = True
                order.append(i)
        stride //= 2
    return order


@dataclass(frozen=True, slots=True, kw_only=True)
class CandidateData:
    """Every candidate orientation of one seed, simulated and folded.

    Attributes
    ----------
    omegas
        (n,) angles, degrees (the readback means).
    counts, exposure
        (n, n_q, n_E) per orientation (exposure in uC sr meV).
    charge
        (n,) proton charge per orientation, uC.
    truth
        {FC name: value, eV/A^2} of the simulated crystal.
    """

    omegas: NDArray[np.float64]
    counts: NDArray[np.float64]
    exposure: NDArray[np.float64]
    charge: NDArray[np.float64]
    truth: dict[str, float]

    @property
    def coverage(self) -> NDArray[np.float64]:
        """(n, n_q, n_E) coverage, sr meV (exposure per uC)."""
        return np.asarray(self.exposure / self.charge[:, None, None])


def _cache_key(
    material: str, fc: str, omegas: NDArray[np.float64], seed: int, events: float
) -> str:
    """File name of one seed's candidates.

    The digest covers the arguments (an FC set given as a file by its contents), the source
    of the ``simulations`` and ``consumers`` packages and the files under
    ``simulations/data`` (structures, reference FC sets, scattering lengths), so that a
    changed simulation, fold or reference never reads an old one's candidates.
    """
    import hashlib

    root = Path(__file__).resolve().parents[2]
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{material}|{fc}|{seed}|{float(events)!r}".encode())
    fc_path = Path(fc)
    if fc_path.is_file():
        h.update(fc_path.read_bytes())
    h.update(np.ascontiguousarray(omegas, dtype=np.float64).tobytes())
    sources = [
        *sorted((root / "simulations").rglob("*.py")),
        *sorted((root / "consumers").rglob("*.py")),
        *sorted(f for f in (root / "simulations" / "data").rglob("*") if f.is_file()),
    ]
    if not sources:
        raise AdvisorError(f"cannot key the candidate cache: no sources under {root}")
    for f in sources:
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", fc_path.stem if fc_path.is_file() else fc)
    return f"{material}-{name}-seed{seed}-{h.hexdigest()}.npz"


def _read_candidates(path: Path, n: int) -> CandidateData | None:
    """The candidates kept in ``path``, or None (logged) when it is damaged or does not
    hold ``n`` candidates."""
    try:
        with np.load(path) as z:
            names = [str(x) for x in z["truth_names"]]
            data = CandidateData(
                omegas=np.asarray(z["omegas"], dtype=float),
                counts=np.asarray(z["counts"], dtype=float),
                exposure=np.asarray(z["exposure"], dtype=float),
                charge=np.asarray(z["charge"], dtype=float),
                truth=dict(zip(names, map(float, z["truth_values"]), strict=True)),
            )
    except Exception as exc:  # a damaged zip raises BadZipFile, an empty one EOFError
        logger.warning("candidate cache %s is unreadable (%s): simulating again", path, exc)
        return None
    if not (
        data.omegas.shape == (n,)
        and data.charge.shape == (n,)
        and data.counts.ndim == 3
        and data.counts.shape[0] == n
        and data.exposure.shape == data.counts.shape
    ):
        logger.warning("candidate cache %s does not hold %d candidates: simulating again", path, n)
        return None
    return data


def load_or_simulate(
    material: str,
    fc: str,
    omegas: Sequence[float] | NDArray[np.float64],
    *,
    seed: int,
    events_per_orientation: float = 2e5,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> CandidateData:
    """:func:`simulate_candidates`, kept in ``cache_dir`` (None: not kept) as one ``.npz`` per
    material, FC set, seed, events, angles and source of the simulation (:func:`_cache_key`).

    A damaged file, or one that does not hold the candidates asked for, is simulated again
    and replaced; files are written to a temporary name, synced and renamed, so a crash
    leaves no partial file under the final name.
    """
    w = np.asarray(omegas, dtype=float)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / _cache_key(material, fc, w, seed, events_per_orientation)
        if path.exists():
            kept = _read_candidates(path, len(w))
            if kept is not None:
                return kept
    data = simulate_candidates(
        material, fc, w, seed=seed, events_per_orientation=events_per_orientation, progress=progress
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    omegas=data.omegas,
                    counts=data.counts,
                    exposure=data.exposure,
                    charge=data.charge,
                    truth_names=np.array(list(data.truth)),
                    truth_values=np.array(list(data.truth.values())),
                )
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return data


def simulate_candidates(
    material: str,
    fc: str,
    omegas: Sequence[float] | NDArray[np.float64],
    *,
    seed: int,
    events_per_orientation: float = 2e5,
    workdir: Path | None = None,
    progress: bool = False,
) -> CandidateData:
    """Simulate and fold every candidate of one seed (see the module docstring)."""
    from consumers.offline import fold_recorded_run
    from simulations.fcdb.reference import resolve_fc
    from simulations.lattice.materials import setup
    from simulations.runs.simulate import RunPlan, simulate_run

    ms = setup(material)
    _, coefficients = resolve_fc(material, fc, ms)
    truth = dict(zip(ms.basis.names, map(float, coefficients), strict=True))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        run = Path(tmp) / f"candidates-{seed}.steer"
        plan = RunPlan(
            material=material,
            fc=fc,
            omegas=tuple(float(w) for w in omegas),
            seed=seed,
            events_per_orientation=events_per_orientation,
        )
        simulate_run(plan, run, progress=progress)
        _, acc = fold_recorded_run(run, None, progress=progress)
    return CandidateData(
        omegas=np.array([r.omega for r in acc.records]),
        counts=np.stack(acc.per_orientation_counts),
        exposure=np.stack(acc.per_orientation_exposure),
        charge=np.array([r.proton_charge for r in acc.records]),
        truth=truth,
    )


def _error(
    mean: NDArray[np.float64], truth: NDArray[np.float64], width: NDArray[np.float64], k: int
) -> float:
    return float(np.sqrt(np.mean(((mean[:k] - truth[:k]) / width[:k]) ** 2)))


def _target(
    data: CandidateData,
    estimate: Callable[[NDArray[np.float64], NDArray[np.bool_]], Any],
    fc_names: Sequence[str],
    width: NDArray[np.float64],
    n_influential: int,
) -> tuple[str, float]:
    """(model version, target error): the error of the estimate from every candidate."""
    truth = np.array([data.truth[k] for k in fc_names])
    everything = Snapshot.of(data.counts.sum(0), data.exposure.sum(0), len(data.omegas))
    from_all = estimate(everything.intensity, everything.mask)
    return from_all.model_version, _error(from_all.mean, truth, width, n_influential)


def _to_target(errors: Sequence[float], target: float, tolerance: float) -> int | None:
    """First count n (1-based) from which every error is within ``tolerance`` of target
    (at most ``(1 + tolerance) target``; lower is within too); None if the last is not."""
    limit = target * (1.0 + tolerance)
    n = len(errors)
    for i in range(len(errors) - 1, -1, -1):
        if not errors[i] <= limit:  # NaN is not within
            break
        n = i
    return n + 1 if n < len(errors) else None


def _strategy_order(name: str, n: int, rng: np.random.Generator) -> list[int] | None:
    if name == "sequential":
        return list(range(n))
    if name == "spread":
        return spread_order(n)
    if name == "random":
        return [int(i) for i in rng.permutation(n)]
    if name == "advisor":
        return None
    raise AdvisorError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


def _advisor_pick(
    advisor: Advisor,
    data: CandidateData,
    picked: Sequence[int],
    last: Any,
    counts: NDArray[np.float64],
    exposure: NDArray[np.float64],
    *,
    prior: str,
    score: str,
    weighting: str,
) -> tuple[RankedCandidate, int, float]:
    """(the advisor's best candidate not picked yet, its index, seconds the ranking took)
    under the estimate ``last`` (None: by coverage alone)."""
    kwargs: dict[str, Any] = {}
    if last is not None:
        kwargs = {
            "mean": last.mean,
            "std": last.std,
            "counts": counts,
            "exposure": exposure,
        }
    t0 = time.perf_counter()
    # every candidate is ranked, those measured marked (as in the live loop, so that
    # the scarcity weights describe the whole range); each orientation's events exist
    # once here, so the best one not yet measured is taken
    ranking = advisor.rank(
        data.omegas,
        data.coverage,
        measured=[float(data.omegas[i]) for i in picked],
        charge=float(np.mean(data.charge)),
        prior=prior,
        score=score,
        weighting=weighting,
        **kwargs,
    )
    seconds = time.perf_counter() - t0
    # the best-ranked candidate not picked yet (by index: two candidates closer than
    # the measured tolerance are still two orientations)
    taken = set(picked)
    best, pick = next(
        (c, int(i))
        for c in ranking.candidates
        for i in np.flatnonzero(data.omegas == c.omega)
        if int(i) not in taken
    )
    return best, pick, seconds


def run_strategy(
    name: str,
    data: CandidateData,
    estimate: Callable[[NDArray[np.float64], NDArray[np.bool_]], Any],
    advisor: Advisor,
    *,
    fc_names: Sequence[str],
    width: NDArray[np.float64],
    budget: int,
    n_influential: int,
    seed: int,
    prior: str = "information",
    score: str = "spectrum",
    weighting: str = "scarcity",
) -> dict[str, Any]:
    """One strategy on one seed: the error and mean normalised std after each pick.

    For the advisor also the std it predicted for its pick and the std the model server
    reported after measuring it (per FC, domain-width units), and its ranking times.
    """
    n = len(data.omegas)
    order = _strategy_order(name, n, np.random.default_rng(seed))
    truth = np.array([data.truth[k] for k in fc_names])
    counts = np.zeros(data.counts.shape[1:])
    exposure = np.zeros(data.exposure.shape[1:])
    picked: list[int] = []
    errors: list[float] = []
    stds: list[float] = []
    predicted: list[list[float]] = []
    reported: list[list[float]] = []
    rank_seconds: list[float] = []
    last = None
    for step in range(min(budget, n)):
        if order is not None:
            pick = order[step]
        else:
            best, pick, seconds = _advisor_pick(
                advisor,
                data,
                picked,
                last,
                counts,
                exposure,
                prior=prior,
                score=score,
                weighting=weighting,
            )
            rank_seconds.append(seconds)
            if best.expected_std:
                exp = best.expected_std
                predicted.append([exp[k] / w for k, w in zip(fc_names, width, strict=True)])
        picked.append(pick)
        counts += data.counts[pick]
        exposure += data.exposure[pick]
        snap = Snapshot.of(counts, exposure, step + 1)
        last = estimate(snap.intensity, snap.mask)
        errors.append(_error(last.mean, truth, width, n_influential))
        stds.append(float(np.mean(last.std[:n_influential] / width[:n_influential])))
        if order is None and len(predicted) > len(reported):
            reported.append(list(last.std / width))
    out: dict[str, Any] = {
        "omegas": [float(data.omegas[i]) for i in picked],
        "error": errors,
        "std": stds,
    }
    if order is None:
        out["predicted_std"] = predicted
        out["reported_std"] = reported
        out["rank_seconds"] = rank_seconds
    return out


def _check_benchmark(
    strategies: Sequence[str],
    *,
    score: str,
    weighting: str,
    tolerance: float,
    loose_tolerance: float,
    budget: int,
    seeds: int,
    first_seed: int,
) -> None:
    """Refuse the benchmark's arguments before anything is loaded or simulated.

    Raises
    ------
    AdvisorError
        An unknown strategy, score or weighting, tolerances out of order, a budget or a
        seed count below 1, a negative first seed.
    """
    for s in strategies:
        _strategy_order(s, 1, np.random.default_rng(0))  # refuse unknown names early
    check_score(score)
    check_weighting(weighting)
    if not (0 < tolerance <= loose_tolerance):
        raise AdvisorError(
            f"tolerances must satisfy 0 < tolerance <= loose tolerance, got {tolerance} and "
            f"{loose_tolerance}"
        )
    if budget < 1 or seeds < 1:
        raise AdvisorError(f"budget and seeds must be >= 1, got {budget} and {seeds}")
    if first_seed < 0:
        raise AdvisorError(f"first seed must be >= 0, got {first_seed}")


@dataclass(slots=True)
class _AdvisorTrace:
    """The advisor's predicted and reported stds (influential FCs) and its ranking times,
    over every seed."""

    predicted: list[float] = field(default_factory=list)
    reported: list[float] = field(default_factory=list)
    rank_seconds: list[float] = field(default_factory=list)

    def add(self, run: dict[str, Any], n_influential: int) -> None:
        """Add the advisor's :func:`run_strategy` result on one seed."""
        k = n_influential
        for p, r in zip(run["predicted_std"], run["reported_std"], strict=False):
            self.predicted += p[:k]
            self.reported += r[:k]
        self.rank_seconds += run["rank_seconds"]

    def summarise(self, result: dict[str, Any]) -> None:
        """Add the correlation of the predicted and reported stds and the median ranking
        time to ``result`` (each when there is one)."""
        if len(self.predicted) > 2:
            result["advisor_std_correlation"] = float(
                np.corrcoef(self.predicted, self.reported)[0, 1]
            )
        if self.rank_seconds:
            result["advisor_rank_seconds_median"] = float(np.median(self.rank_seconds))


def _add_run(
    entry: dict[str, list[Any]],
    run: dict[str, Any],
    target: float,
    tolerance: float,
    loose_tolerance: float,
) -> None:
    """Add one strategy's run on one seed to its ``entry`` of the result."""
    entry["orientations_to_target"].append(_to_target(run["error"], target, tolerance))
    entry["orientations_to_loose_target"].append(_to_target(run["error"], target, loose_tolerance))
    entry["final_error"].append(run["error"][-1])
    entry["curve"].append({"error": run["error"], "std": run["std"]})


def _add_medians(result: dict[str, Any], strategies: Sequence[str], budget: int) -> None:
    """The median orientations to each target per strategy, and the advisor's ratios."""
    # a seed that never reached the target counts as needing more than the budget
    for key, suffix in (("orientations_to_target", ""), ("orientations_to_loose_target", "_loose")):
        med = {
            s: float(
                np.median([budget + 1 if n is None else n for n in result["strategies"][s][key]])
            )
            for s in strategies
        }
        if "advisor" in med:
            result["ratios" + suffix] = {
                f"advisor/{s}": med["advisor"] / med[s] for s in strategies if s != "advisor"
            }
        result[f"median_{key}"] = med


def closed_loop(
    material: str,
    fc: str,
    *,
    model: str | Path,
    strategies: Sequence[str] = STRATEGIES,
    budget: int = 120,
    seeds: int = 5,
    candidates: Sequence[float] | None = None,
    events_per_orientation: float = 2e5,
    n_influential: int = 4,
    tolerance: float = 0.10,
    loose_tolerance: float = 0.25,
    progress: bool = True,
    plot: Path | None = None,
    prior: str = "information",
    score: str = "spectrum",
    weighting: str = "scarcity",
    cache_dir: Path | None = None,
    first_seed: int = 0,
) -> dict[str, Any]:
    """The closed-loop benchmark (``steer advise benchmark``); returns the JSON result.

    ``candidates`` default to ``budget`` angles 0, 1, ... degrees; the seeds are
    ``first_seed, first_seed + 1, ...`` (``seeds`` of them); ``cache_dir`` keeps each seed's
    simulated candidates (:func:`load_or_simulate`).
    """
    from tqdm import tqdm

    from model_server.inversion.inference import Estimator

    t_start = time.perf_counter()
    _check_benchmark(
        strategies,
        score=score,
        weighting=weighting,
        tolerance=tolerance,
        loose_tolerance=loose_tolerance,
        budget=budget,
        seeds=seeds,
        first_seed=first_seed,
    )
    omegas = np.arange(float(budget)) if candidates is None else np.asarray(candidates, float)
    estimator = Estimator(model)
    fc_names = estimator.fc_names
    width = np.asarray(estimator.model.domain[:, 1] - estimator.model.domain[:, 0], float)
    advisor = Advisor(material)
    if tuple(advisor.fc_names) != tuple(fc_names):
        raise AdvisorError(f"model FCs {fc_names} differ from the advisor's {advisor.fc_names}")
    estimate = estimator.estimate
    options: dict[str, Any] = {
        "fc_names": fc_names,
        "width": width,
        "budget": budget,
        "n_influential": n_influential,
        "prior": prior,
        "score": score,
        "weighting": weighting,
    }
    keys = ("orientations_to_target", "orientations_to_loose_target", "final_error", "curve")
    result: dict[str, Any] = {
        "strategies": {s: {k: [] for k in keys} for s in strategies},
        "target_error": [],
    }
    trace = _AdvisorTrace()
    bar = tqdm(total=seeds * len(strategies), desc="closed loop", disable=not progress)
    for seed in range(first_seed, first_seed + seeds):
        data = load_or_simulate(
            material,
            fc,
            omegas,
            seed=seed,
            events_per_orientation=events_per_orientation,
            cache_dir=cache_dir,
        )
        result["model_version"], target = _target(data, estimate, fc_names, width, n_influential)
        result["target_error"].append(target)
        for s in strategies:
            run = run_strategy(s, data, estimate, advisor, seed=seed, **options)
            _add_run(result["strategies"][s], run, target, tolerance, loose_tolerance)
            if s == "advisor":
                trace.add(run, n_influential)
            bar.update()
    bar.close()
    _add_medians(result, strategies, budget)
    result["tolerance"] = tolerance
    result["loose_tolerance"] = loose_tolerance
    trace.summarise(result)
    result["influential_fcs"] = list(fc_names[:n_influential])
    result["events_per_orientation"] = events_per_orientation
    result["advisor_prior"] = prior
    result["advisor_score"] = score
    result["advisor_weighting"] = weighting
    result["seeds"] = list(range(first_seed, first_seed + seeds))
    result["seconds"] = time.perf_counter() - t_start
    if plot is not None:
        plot_curves(result, plot)
        result["plot"] = str(plot)
    return result


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Median FC error and posterior std against orientations measured, per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, entry in result["strategies"].items():
        for ax, key in zip(axes, ("error", "std"), strict=True):
            curves = np.array([c[key] for c in entry["curve"]])
            x = np.arange(1, curves.shape[1] + 1)
            med = np.median(curves, axis=0)
            (line,) = ax.plot(x, med, label=name)
            if len(curves) > 1:
                lo, hi = np.percentile(curves, [25, 75], axis=0)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
    target = float(np.median(result["target_error"]))
    axes[0].axhline(target, color="k", ls="--", lw=0.8, label="target (all orientations)")
    for key, ls in (("tolerance", ":"), ("loose_tolerance", "-.")):
        if key in result:
            tol = float(result[key])
            axes[0].axhline(target * (1 + tol), color="k", ls=ls, lw=0.6, label=f"+{tol:.0%}")
    axes[0].set_ylabel("FC error (RMSE / domain width)")
    axes[1].set_ylabel("posterior std / domain width")
    for ax in axes:
        ax.set_xlabel("orientations measured")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle("Closed loop: median over seeds (band: quartiles)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
