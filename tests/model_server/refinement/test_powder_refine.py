"""The powder refinement: force constants from a folded powder run's counts, their std
shrinking as 1/sqrt(counts), the flat background's shape, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from consumers.offline import fold_recorded_run
from consumers.reduction.powder import PowderFolder
from model_server.exceptions import RefinementError
from model_server.refinement.powder import PowderRefiner, powder_run_from_file
from simulations.fcdb.reference import load_reference
from simulations.instrument.spectrometer import Instrument, energy_to_speed
from simulations.lattice.materials import setup
from simulations.runs.simulate import RunPlan, simulate_run

NAMES = ("1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy")


@pytest.fixture(scope="module")
def folded(tmp_path_factory) -> tuple[Path, dict[str, float]]:  # type: ignore[no-untyped-def]
    """A 4-step Al powder run at 300 K (2-shell truth; elastic, multiphonon and a flat
    background in the data), folded."""
    ref = load_reference("Al")
    truth = {n: (float(v) if n in NAMES else 0.0) for n, v in zip(ref.names, ref.mean, strict=True)}
    d = tmp_path_factory.mktemp("powder_refine")
    plan = RunPlan(
        material="Al", fc=truth, powder=True, omegas=(0.0,) * 4, ei=50.0, temperature=300.0,
        events_per_orientation=1e5, count_time=5.0, mesh=16, seed=31,
    )  # fmt: skip
    simulate_run(plan, d / "al.steer", progress=False)
    fold_recorded_run(d / "al.steer", d / "al.h5", progress=False)
    return d / "al.h5", truth


def test_refined_powder_estimate_covers_the_truth_and_shrinks_with_counts(folded) -> None:  # type: ignore[no-untyped-def]
    path, truth = folded
    c_true = np.array([truth[n] for n in NAMES])
    start = c_true * np.array([1.1, 0.9, 0.92, 1.12, 0.88])
    fits = {}
    for steps in (1, 4):
        refiner = PowderRefiner(powder_run_from_file(path, first=steps))
        assert refiner.names == NAMES
        fits[steps] = refiner.refine(start)
    full = fits[4]
    assert full.converged
    assert full.pearson_chi2_per_dof < 1.3  # the counts model describes the data
    z = (full.mean - c_true) / full.std
    assert np.all(np.abs(z) < 4.0), z
    # four times the counts: half the std (an honest posterior of counts that add up)
    ratio = fits[4].std / fits[1].std
    np.testing.assert_allclose(ratio, 0.5, rtol=0.2)
    assert full.std[0] < 0.01 * abs(c_true[0])  # 1NN_xx to better than 1 %


def test_flat_background_share_is_the_time_window_s() -> None:
    """Summed over the grid, the flat background's share is the fraction of its flight-time
    window that maps to 0..45 meV: (1/v(Ei-45) - 1/v(Ei)) / (1/v(0.05 Ei) - 1/v(1.5 Ei))."""
    ei = 50.0
    folder = PowderFolder(setup("Al").powder_grid(ei), Instrument.arcs_like(), ei)
    share = folder.flat_background().sum()

    def inv_v(e: float) -> float:
        return 1.0 / float(energy_to_speed(e))

    expected = (inv_v(ei - 45.0) - inv_v(ei)) / (inv_v(0.05 * ei) - inv_v(1.5 * ei))
    assert share == pytest.approx(expected, rel=1e-3)


def test_powder_refinement_refuses_bad_input(folded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _ = folded
    with pytest.raises(RefinementError, match="no folded-run file"):
        powder_run_from_file(tmp_path / "absent.h5")
    with pytest.raises(RefinementError, match="cannot take the first 9"):
        powder_run_from_file(path, first=9)
    import h5py

    crystal = tmp_path / "crystal.h5"
    with h5py.File(crystal, "w") as f:
        f.create_group("entry").attrs["sample_kind"] = "single_crystal"
    with pytest.raises(RefinementError, match="single-crystal run, not a powder"):
        powder_run_from_file(crystal)
    refiner = PowderRefiner(powder_run_from_file(path))
    with pytest.raises(RefinementError, match="5 finite coefficients"):
        refiner.refine(np.zeros(3))
    with pytest.raises(RefinementError, match="lacks 2NN_yy"):
        refiner.refine(dict.fromkeys(NAMES[:4], -0.1))
