"""Is the powder refinement's posterior honest? Simulated powder runs of many true force
constants, each refined after its first few steps and after more, with the coverage of the
mean +- 1 and 2 std intervals and how the std shrinks as counts arrive.

Each truth draws the 5 Al coefficients to the 2nd neighbour (the refinement's model; the
3rd and 4th neighbours 0, so the truth is in the fitted family) uniformly within
``spread`` of the reference set, keeping only stable lattices; each run is simulated with
the default background components (incoherent elastic line and multiphonon) and a flat
time-of-flight background, folded, and refined from a start drawn within +-15 % of the
truth (the VAE's typical error) after each of ``steps`` counting steps. The seeds of the
truths and runs derive from ``seed``; the seeds a study reports must not be those the
refinement was tuned on.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from model_server.exceptions import RefinementError
from model_server.refinement.powder import PowderRefiner, powder_run_from_file

__all__ = ["powder_calibration_study"]

logger = logging.getLogger(__name__)


def _draw_truths(
    n: int, spread: float, rng: np.random.Generator
) -> tuple[tuple[str, ...], list[dict[str, float]]]:
    """``n`` stable 2-shell Al sets within ``spread`` of the reference, as full mappings
    of the shipped basis (farther shells 0), and the 5 names."""
    from simulations.fcdb.reference import load_reference
    from simulations.lattice.materials import setup
    from simulations.lattice.sqe import CoherentSQE, mesh_points

    ref = load_reference("Al")
    ms = setup("Al", shells=2)
    names = ms.basis.names
    centre = np.array([ref.mean[ref.names.index(x)] for x in names])
    out: list[dict[str, float]] = []
    while len(out) < n:
        c = centre * rng.uniform(1 - spread, 1 + spread, len(centre))
        model = CoherentSQE(ms.basis, c, temperature=5.0, resolution=ms.resolution)
        if np.all(model.modes(mesh_points(8)).energies[:, 3:] > 0.05):
            full = dict.fromkeys(ref.names, 0.0)
            full.update(zip(names, map(float, c), strict=True))
            out.append(full)
    return names, out


def powder_calibration_study(
    *,
    truths: int = 20,
    seed: int = 100,
    steps: Sequence[int] = (1, 4, 16),
    events_per_step: float = 2e5,
    temperature: float = 300.0,
    spread: float = 0.2,
    progress: bool = True,
    work_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the study (module docstring); JSON-ready result.

    Returns per step count: the coverage of mean +- 1 std and +- 2 std over every truth
    and coefficient (``coverage_1sigma``, ``coverage_2sigma``), the median |z|, the
    median std per coefficient, and per coefficient the median over truths of
    std(n steps) / std(first step) (``std_ratio``: 1/sqrt(n) for an honest posterior of
    counts that add up); the Pearson chi^2 per dof of the fits; failures with reasons.
    """
    rng = np.random.default_rng(seed)
    names, sets = _draw_truths(truths, spread, rng)
    n_steps = max(steps)
    z: dict[int, list[NDArray[np.float64]]] = {s: [] for s in steps}
    sd: dict[int, list[NDArray[np.float64]]] = {s: [] for s in steps}
    pearson: dict[int, list[float]] = {s: [] for s in steps}
    failures: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for i, truth in enumerate(tqdm(sets, desc="truths", disable=not progress)):
            run_seed = int(rng.integers(2**31))
            path = Path(tmp) / f"run{i}.steer"
            h5 = Path(tmp) / f"run{i}.h5"
            try:
                _simulate(truth, path, n_steps, events_per_step, temperature, run_seed)
                from consumers.offline import fold_recorded_run

                fold_recorded_run(path, h5, progress=False)
                c_true = np.array([truth[n] for n in names])
                start = c_true * rng.uniform(0.85, 1.15, len(names))
                for s in steps:
                    run = powder_run_from_file(h5, first=s)
                    refined = PowderRefiner(run).refine(start)
                    z[s].append((refined.mean - c_true) / refined.std)
                    sd[s].append(refined.std)
                    pearson[s].append(refined.pearson_chi2_per_dof)
            except RefinementError as exc:
                failures.append({"truth": i, "error": str(exc)})
                logger.warning("truth %d: %s", i, exc)
            finally:
                path.unlink(missing_ok=True)
    per_step: dict[str, Any] = {}
    first = min(steps)
    for s in steps:
        if not z[s]:
            continue
        zz = np.abs(np.array(z[s]))
        ratio = np.array(sd[s]) / np.array(sd[first])[: len(sd[s])]
        per_step[str(s)] = {
            "fits": len(z[s]),
            "coverage_1sigma": float(np.mean(zz <= 1.0)),
            "coverage_2sigma": float(np.mean(zz <= 2.0)),
            "coverage_1sigma_per_fc": dict(
                zip(names, map(float, np.mean(zz <= 1.0, axis=0)), strict=True)
            ),
            "median_abs_z": float(np.median(zz)),
            "median_std": dict(zip(names, map(float, np.median(sd[s], axis=0)), strict=True)),
            "std_ratio_to_first": dict(
                zip(names, map(float, np.median(ratio, axis=0)), strict=True)
            ),
            "expected_std_ratio": float(np.sqrt(first / s)),
            "median_pearson_chi2_per_dof": float(np.median(pearson[s])),
        }
    return {
        "study": "powder_refinement_calibration",
        "material": "Al",
        "coefficients": list(names),
        "truths": truths,
        "seed": seed,
        "spread": spread,
        "steps": list(steps),
        "events_per_step": events_per_step,
        "temperature_K": temperature,
        "per_steps": per_step,
        "failures": failures,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _simulate(
    truth: dict[str, float],
    path: Path,
    steps: int,
    events: float,
    temperature: float,
    seed: int,
) -> None:
    from simulations.runs.simulate import RunPlan, simulate_run

    plan = RunPlan(
        material="Al",
        fc=truth,
        powder=True,
        omegas=(0.0,) * steps,
        ei=50.0,
        temperature=temperature,
        events_per_orientation=events,
        count_time=10.0,
        mesh=16,
        seed=seed,
    )
    simulate_run(plan, path, progress=False)
