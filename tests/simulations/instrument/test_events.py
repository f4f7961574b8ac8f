"""Event generation: the fast phonon-table S(Q, E) against the exact one, Poisson sampling,
and the physics a long run shows when binned simply (peaks on the true dispersion)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulations.exceptions import InstrumentError
from simulations.fcdb.reference import resolve_fc
from simulations.instrument.binning import ReferenceBinning
from simulations.instrument.events import OrientationSimulator, PhononTable
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.sqe import CoherentSQE, bose_occupation
from simulations.units import THZ_TO_MEV

EI = 80.0


@pytest.fixture(scope="module")
def ge_sim(ge):  # type: ignore[no-untyped-def]
    _, c = resolve_fc("Ge", "raman", ge)
    ins = Instrument.arcs_like(n_columns=100, n_rows=32)
    model = CoherentSQE(ge.basis, c, temperature=5.0, resolution=ins.resolution(EI))
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    return OrientationSimulator(model, ins, orientation, EI, mesh=40, group_rows=1)


def test_table_intensities_match_exact_sqe_along_detector_trajectories(ge_sim) -> None:  # type: ignore[no-untyped-def]
    """Reference: CoherentSQE.structure_factors (exact eigenproblem at every Q)."""
    sim, m, omega = ge_sim, ge_sim.model, 17.0
    lam = sim.expected(omega)
    g = np.random.default_rng(0).choice(sim.n_groups, 150, replace=False)
    q_lab = -sim._kf[None, :, None] * sim._group_dir[g][:, None, :]
    q_lab[..., 2] += sim._ki
    q = sim.orientation.lab_to_rlu(q_lab.reshape(-1, 3), omega)
    em, sf = m.structure_factors(q)
    e = np.tile(sim.e_centres, len(g))[:, None]
    sig = m.resolution.sigma(np.abs(em))
    n = bose_occupation(em, m.temperature)
    gauss = lambda x: np.exp(-0.5 * (x / sig) ** 2) / (np.sqrt(2 * np.pi) * sig)  # noqa: E731
    s = (sf * ((n + 1) * gauss(e - em) + n * gauss(e + em))).sum(1).reshape(len(g), -1)
    exact = s * (sim._kf / sim._ki)[None, :] * sim._group_solid[g][:, None] * sim.e_step
    fast = lam[g]
    assert abs(fast.sum() / exact.sum() - 1) < 0.01
    per_trajectory = np.abs(fast.sum(1) - exact.sum(1)) / exact.sum(1)
    assert np.median(per_trajectory) < 0.01
    assert np.percentile(per_trajectory, 90) < 0.03
    assert np.abs(fast - exact).sum() / exact.sum() < 0.06


def test_poisson_sampling_mean_and_background(ge_sim) -> None:  # type: ignore[no-untyped-def]
    sim = ge_sim
    lam = sim.expected(40.0)
    rng = np.random.default_rng(5)
    scale = 3000.0 / lam.sum()
    counts = [sim.sample(lam, scale, 500.0, 60, rng) for _ in range(40)]
    n_sig = np.array([b.n_signal for b in counts])
    n_bg = np.array([b.n_background for b in counts])
    # Poisson: mean 3000 +- sqrt(3000/40) ~ 8.7; 5 sigma
    assert abs(n_sig.mean() - 3000) < 5 * np.sqrt(3000 / 40)
    assert abs(n_bg.mean() - 500) < 5 * np.sqrt(500 / 40)
    b = counts[0]
    assert np.all(np.diff(b.pulse_index) >= 0)
    assert b.pulse_index.min() >= 0
    assert b.pulse_index.max() < 60
    assert set(np.unique(b.pixel_id)) <= set(sim.instrument.pixel_ids.tolist())
    # signal events come back at energies within the simulated window
    _, e = sim.instrument.event_to_qe(sim.instrument.index_of(b.pixel_id), b.tof_ns, EI)
    assert np.nanmax(e) < EI
    with pytest.raises(InstrumentError, match="must be finite and >= 0"):
        sim.sample(lam, -1.0, 0.0, 10, rng)
    with pytest.raises(InstrumentError, match="mesh"):
        PhononTable.build(sim.model, 2)


def test_binned_run_shows_the_true_dispersion(ge) -> None:  # type: ignore[no-untyped-def]
    """Peak of every covered q column lies on a forward-model branch within the resolution."""
    _, c = resolve_fc("Ge", "raman", ge)
    ins = Instrument.arcs_like()
    model = CoherentSQE(ge.basis, c, temperature=5.0, resolution=ins.resolution(EI))
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    sim = OrientationSimulator(model, ins, orientation, EI, mesh=24, group_rows=8)
    binning = ReferenceBinning(ge.crystal, ge.grid, tolerance=0.05)
    rng = np.random.default_rng(0)
    hist = np.zeros(ge.grid.shape)
    for omega in np.arange(0.0, 120.0, 10.0):
        lam = sim.expected(omega)
        b = sim.sample(lam, 1.5e5 / lam.sum(), 1.0e4, 10, rng)
        q, e = ins.event_to_qe(ins.index_of(b.pixel_id), b.tof_ns, EI)
        hist += binning.histogram(orientation.lab_to_rlu(q, omega), e)
    fm = ge.forward_model(dtype=torch.float64, method="exact")
    with torch.no_grad():
        branches = fm.frequencies(c[None])[0].numpy() * THZ_TO_MEV
    ec = ge.grid.energy_centres
    checked = hist.sum(1) >= 50
    peak = ec[np.argmax(hist, 1)]
    dist = np.min(np.abs(branches - peak[:, None]), 1)
    tol = np.maximum(2 * ge.resolution.sigma(peak), ec[1] - ec[0])
    assert checked.sum() >= 150
    assert np.all(dist[checked] <= tol[checked]), dist[checked].max()


def test_super_pixels_against_single_pixels(ge) -> None:  # type: ignore[no-untyped-def]
    """The default 1 x 4 super-pixels against the same pixels evaluated one by one."""
    _, c = resolve_fc("Ge", "raman", ge)
    # default pixel size (256 rows over +-28 deg), fewer columns to keep it quick
    ins = Instrument.arcs_like(n_columns=40, n_rows=256)
    model = CoherentSQE(ge.basis, c, temperature=5.0, resolution=ins.resolution(EI))
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    table = PhononTable.build(model, 24)
    fine = OrientationSimulator(model, ins, orientation, EI, table=table, group_rows=1)
    coarse = OrientationSimulator(model, ins, orientation, EI, table=table, group_rows=4)
    a = coarse.expected(25.0)
    b = fine.expected(25.0).reshape(40, 64, 4, -1).sum(axis=2).reshape(a.shape)
    assert abs(a.sum() / b.sum() - 1) < 0.02
    # cell by cell the 4 pixels smear Q by ~1 degree (measured 6 %)
    assert np.abs(a - b).sum() / b.sum() < 0.10
    # integrated over energy, per super-pixel
    per_group = np.abs(a.sum(1) - b.sum(1)) / b.sum(1)
    assert np.median(per_group) < 0.02


def test_powder_simulator_is_the_orientation_average_of_the_single_crystal() -> None:
    """A powder's expected counts equal those of the same crystal averaged over random
    orientations (48 here), |Q| band by band within 4 %: the two share units and
    kinematics, and the powder average is the orientation average."""
    from simulations.fcdb.reference import resolve_fc
    from simulations.instrument.events import OrientationSimulator, PowderSimulator
    from simulations.instrument.spectrometer import Instrument, Orientation
    from simulations.lattice.materials import setup
    from simulations.lattice.sqe import CoherentSQE

    ms = setup("Al")
    ins = Instrument.arcs_like()
    _, c = resolve_fc("Al", "mlff_mean", ms)
    model = CoherentSQE(ms.basis, c, temperature=300.0, resolution=ins.resolution(50.0))
    powder = PowderSimulator(model, ins, 50.0, group_rows=16)
    lam = powder.expected()
    np.testing.assert_array_equal(powder.expected(37.0), lam)  # no goniometer
    rng = np.random.default_rng(1)
    mean = np.zeros_like(lam)
    for _ in range(16):
        mount = Orientation.from_vectors(
            ms.crystal, tuple(rng.normal(size=3)), tuple(rng.normal(size=3))
        )
        sim = OrientationSimulator(model, ins, mount, 50.0, group_rows=16, table=powder.table)
        for w in rng.uniform(0.0, 360.0, 3):
            mean += sim.expected(float(w)) / 48
    q = powder.q_magnitude()
    for lo, hi in ((1.0, 3.0), (3.0, 5.0), (5.0, 7.0), (7.0, 9.0)):
        band = (q >= lo) & (q < hi)
        assert lam[band].sum() / mean[band].sum() == pytest.approx(1.0, abs=0.04)
