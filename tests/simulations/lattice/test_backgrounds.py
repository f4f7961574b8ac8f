"""Background components: the sum rules the incoherent approximation obeys, detailed
balance, the elastic line's area, the time-of-flight background's shape and events, the
aluminium can's powder rings, and the components of a simulated run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from simulations.exceptions import SimulationError
from simulations.fcdb.reference import resolve_fc
from simulations.instrument.events import OrientationSimulator
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.backgrounds import (
    FINE_STEP,
    Backgrounds,
    IncoherentScattering,
    elastic_line,
    tof_shape,
)
from simulations.lattice.materials import setup
from simulations.lattice.sqe import CoherentSQE
from simulations.runs.can import aluminium_can
from simulations.units import HBAR2_OVER_2AMU, K_B_MEV

EI = 80.0


@pytest.fixture(scope="module", params=[5.0, 300.0], ids=["5K", "300K"])
def ge_sim(request, ge):  # type: ignore[no-untyped-def]
    _, c = resolve_fc("Ge", "raman", ge)
    ins = Instrument.arcs_like(n_columns=60, n_rows=16)
    model = CoherentSQE(ge.basis, c, temperature=request.param, resolution=ins.resolution(EI))
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    return OrientationSimulator(model, ins, orientation, EI, mesh=24, e_top=0.95 * EI)


def test_incoherent_response_obeys_its_sum_rules(ge_sim) -> None:  # type: ignore[no-untyped-def]
    """int T dE = <u^2> (the Debye-Waller exponent's, from its own 12^3 mesh: a few per
    cent apart at 300 K); int E T dE = hbar^2 / (2 M) at any temperature (the first-moment
    sum rule: (n + 1) - n = 1); the orders 0..3 at Q add up to ~1 per sigma / (4 pi)."""
    inc = ge_sim.incoherent()
    mass = ge_sim.model.crystal.masses
    area = inc.t1.sum(axis=1) * FINE_STEP
    np.testing.assert_allclose(area, inc.u2, rtol=0.06)
    first = (inc.t1 * inc.fine_energies[None, :]).sum(axis=1) * FINE_STEP
    np.testing.assert_allclose(first, HBAR2_OVER_2AMU / mass, rtol=0.01)
    for k, order in enumerate(inc.orders):  # the n-fold convolution keeps area^n
        np.testing.assert_allclose(order.sum(axis=1) * FINE_STEP, area ** (k + 2), rtol=1e-6)
    q2 = 5.0**2
    total = np.exp(-q2 * area) * (
        1 + q2 * area + sum(q2 ** (k + 2) / math.factorial(k + 2) * area ** (k + 2) for k in (0, 1))
    )
    assert np.all(total > 0.99)
    assert np.all(total <= 1.0 + 1e-9)


def test_multiphonon_obeys_detailed_balance(ge_sim) -> None:  # type: ignore[no-untyped-def]
    inc = ge_sim.incoherent()
    t = ge_sim.model.temperature
    e = inc.fine_energies
    two = inc.orders[0, 0]
    mid = len(e) // 2
    for energy in (10.0, 25.0, 40.0):
        i = mid + round(energy / FINE_STEP)
        j = mid - round(energy / FINE_STEP)
        if two[i] < 1e-6 * two.max():
            continue
        kt = K_B_MEV * t
        # each mode sits on the nearest point of the fine grid: exp(+-step / 2kT) apart
        expected = math.exp(-energy / kt)
        assert two[j] / two[i] == pytest.approx(expected, rel=math.expm1(FINE_STEP / kt))


def test_elastic_line_has_unit_area_and_the_tof_shape_its_x3_5() -> None:
    e = np.arange(-20.0, 20.0, 0.5) + 0.25
    assert elastic_line(e, 1.3, 0.5).sum() * 0.5 == pytest.approx(1.0, rel=1e-9)
    assert elastic_line(e, 1.3).sum() * 0.5 == pytest.approx(1.0, rel=1e-3)
    assert tof_shape(np.array([37.0]), 80.0)[0] == pytest.approx(3.46, abs=0.01)
    with pytest.raises(SimulationError, match="width"):
        elastic_line(e, 0.0)


def test_simulator_components_and_flat_background(ge_sim) -> None:  # type: ignore[no-untyped-def]
    sim = ge_sim
    parts = sim.components(Backgrounds())
    assert set(parts) == {"elastic", "multiphonon"}
    assert all(
        np.all(v >= 0) and v.shape == (sim.n_groups, len(sim.e_centres)) for v in parts.values()
    )
    sigma0 = float(sim.model.resolution.sigma(np.array(0.0)))
    el = parts["elastic"].sum(axis=0)
    assert el[np.abs(sim.e_centres) > 6 * sigma0].sum() < 1e-6 * el.sum()
    mp = parts["multiphonon"].sum(axis=0)
    top = sim.table.max_energy
    assert mp[sim.e_centres > 1.2 * top].sum() > 0.01 * mp.sum()  # two phonons reach 2 x top
    assert sim.components(Backgrounds.none()) == {}
    # every flat-background event lands within [-Ei/2, 0.95 Ei]: on such edges they all count
    edges = np.linspace(-0.5 * EI, 0.95 * EI, 300)
    assert sim.flat_background(1000.0, edges).sum() == pytest.approx(1000.0, rel=1e-9)
    with pytest.raises(SimulationError):
        Backgrounds.parse("elastic,phonons")
    assert Backgrounds.parse("none") == Backgrounds.none()
    assert Backgrounds.parse("all").can


def test_aluminium_can_rings_sit_at_the_fcc_reflections() -> None:
    al = setup("Al")
    a = float(np.linalg.norm(al.crystal.lattice[0])) * math.sqrt(2.0)  # primitive -> cubic
    ins = Instrument.arcs_like(n_columns=8, n_rows=4)
    can = aluminium_can(300.0, ins.resolution(EI), q_max=6.0, energies=np.linspace(-5, 60, 40))
    g = can.rings[:, 0]
    expected = 2 * math.pi / a * np.sqrt([3.0, 4.0, 8.0, 11.0, 12.0])
    np.testing.assert_allclose(g[:5], expected, rtol=1e-9)
    # equal |F|^2 per reflection (one atom): ring intensity ~ multiplicity / G^2
    mult = np.array([8.0, 6.0, 12.0, 24.0, 8.0])
    ratio = can.rings[:5, 1] * g[:5] ** 2 * np.exp(g[:5] ** 2 * can.u2) / mult
    np.testing.assert_allclose(ratio / ratio[0], 1.0, rtol=1e-9)
    assert np.all(can.sqe >= 0)
    assert can.sqe.max() > 0


def test_incoherent_scattering_refuses_bad_orders(ge_sim) -> None:  # type: ignore[no-untyped-def]
    table = ge_sim.table
    with pytest.raises(SimulationError, match="orders"):
        IncoherentScattering.from_modes(
            ge_sim.model, table.energies, table.eigenvectors, max_order=1
        )
