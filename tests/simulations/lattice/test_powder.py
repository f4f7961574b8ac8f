"""The powder average: the mesh-shell average against direction sampling, the weights of
its points, and the powder grid."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.exceptions import GridError
from simulations.fcdb.reference import resolve_fc
from simulations.instrument.spectrometer import Instrument
from simulations.lattice.grid import PowderGrid, make_powder_grid
from simulations.lattice.materials import setup
from simulations.lattice.powder import powder_shells, powder_spectrum, shell_points
from simulations.lattice.sqe import CoherentSQE


@pytest.fixture(scope="module")
def al_300k() -> CoherentSQE:
    ms = setup("Al")
    _, c = resolve_fc("Al", "mlff_mean", ms)
    return CoherentSQE(
        ms.basis, c, temperature=300.0, resolution=Instrument.arcs_like().resolution(50.0)
    )


def test_shell_average_agrees_with_many_sampled_directions(al_300k: CoherentSQE) -> None:
    """Two different averaging schemes (a 32^3 q mesh with every G, against 2,048 random
    directions per |Q|): total within 1 %, median bin within 5 % (the sampled one alone
    scatters by ~3 % at 2,048 directions)."""
    q = np.arange(2.0, 6.0001, 0.1)
    e = np.arange(4.0, 26.0, 1.0)
    shells = powder_shells(al_300k, q, e, mesh=32)
    sampled = powder_spectrum(al_300k, q, e, directions=2048, seed=1)
    use = sampled > 0.05 * sampled.max()
    assert shells[use].sum() / sampled[use].sum() == pytest.approx(1.0, abs=0.01)
    assert np.median(np.abs(shells - sampled)[use] / sampled[use]) < 0.05


def test_shell_points_weigh_reciprocal_space_uniformly(al_300k: CoherentSQE) -> None:
    """The irreducible q (weighted by their stars) plus every G fill reciprocal space with
    mesh^3 points per reciprocal cell: a shell's weight is its volume in those units."""
    _, _, points, weight = shell_points(al_300k.crystal, 6.0, 16)
    q_abs = np.linalg.norm(al_300k.cartesian(points), axis=1)
    cell = abs(np.linalg.det(al_300k.crystal.reciprocal_lattice))
    for lo, hi in ((2.0, 3.0), (4.0, 5.0), (5.0, 5.9)):
        inside = (q_abs >= lo) & (q_abs < hi)
        volume = 4.0 / 3.0 * np.pi * (hi**3 - lo**3)
        assert weight[inside].sum() / (16**3 * volume / cell) == pytest.approx(1.0, abs=0.01)


def test_powder_grid_reaches_the_material_window_below_ei() -> None:
    g = make_powder_grid(50.0, e_max=50.0)
    assert g.shape == (200, 90)
    assert g.q_edges[-1] == pytest.approx(10.0)
    assert g.energy_edges[-1] == pytest.approx(45.0)
    assert g.kind == "powder"
    assert g.to_dict()["fingerprint"] == g.fingerprint
    assert make_powder_grid(80.0, e_max=50.0).fingerprint != g.fingerprint
    assert setup("Al").powder_grid(50.0).fingerprint == g.fingerprint
    with pytest.raises(GridError, match="equal steps"):
        PowderGrid(q_edges=np.array([0.0, 1.0, 3.0]), energy_edges=np.array([0.0, 1.0]))
    with pytest.raises(GridError, match="no energy bin"):
        make_powder_grid(0.4, e_max=50.0)
