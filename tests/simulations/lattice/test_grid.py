"""q-paths and the (q, E) grid."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.exceptions import GridError
from simulations.instrument.binning import ReferenceBinning
from simulations.lattice.grid import make_class_grid, make_grid, make_wedge_grid, zone_classes
from simulations.lattice.materials import MaterialSetup, setup


def test_ge_path_and_grid_size(ge: MaterialSetup) -> None:
    grid = ge.grid
    assert grid.qpath.path == "G-X-U|K-G-L-W-X"
    assert grid.shape == (200, 100)  # 20,000 pixels like the seed paper
    labels = [label for _, label in grid.qpath.ticks]
    assert labels == ["G", "X", "U|K", "G", "L", "W", "X"]
    q = grid.qpath.qpoints
    for index, label in grid.qpath.ticks:
        name = label.split("|")[-1]
        np.testing.assert_allclose(q[index], ge.crystal.kpoints[name], atol=1e-12)
    # X of the fcc primitive reciprocal lattice is 2 pi / a from Gamma.
    x_index = grid.qpath.ticks[1][0]
    assert grid.qpath.distance[x_index] == pytest.approx(2 * np.pi / 5.658, rel=1e-9)
    # the U|K jump adds no distance
    k_index = grid.qpath.ticks[2][0]
    assert grid.qpath.distance[k_index] == grid.qpath.distance[k_index - 1]
    assert grid.energy_edges[0] == 0.0
    assert grid.energy_edges[-1] == 70.0


def test_fingerprint_is_stable_and_sensitive(ge: MaterialSetup) -> None:
    same = make_grid(ge.crystal, path="G-X-U|K-G-L-W-X", n_q=200, e_max=70.0, n_e=100)
    assert same.fingerprint == ge.grid.fingerprint
    assert len(same.fingerprint) == 16
    other = make_grid(ge.crystal, path="G-X-U|K-G-L-W-X", n_q=200, e_max=71.0, n_e=100)
    assert other.fingerprint != ge.grid.fingerprint


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"e_max": 0.0}, "E max must be > 0"),
        ({"e_max": -5.0}, "E max must be > 0"),
        ({"e_max": float("nan")}, "finite"),
        ({"e_min": 10.0, "e_max": 5.0}, "above E min"),
        ({"n_e": 0}, "at least one energy bin"),
        ({"path": "G-Q"}, "unknown point"),
        ({"path": "G"}, "two or more points"),
    ],
)
def test_bad_grids_are_clear_errors(ge: MaterialSetup, kwargs: dict, message: str) -> None:
    with pytest.raises(GridError, match=message):
        make_grid(ge.crystal, **kwargs)


def test_the_wedge_grid_bins_every_q_of_the_zone(ge: MaterialSetup) -> None:
    """The irreducible points of a 16^3 mesh (145 for Ge's point group with time
    reversal) and a radius within which every Q has a star point: nothing is dropped, and
    the mesh's own points reach every irreducible point."""
    grid, radius = make_wedge_grid(ge.crystal, ge.grid.energy_edges, 16)
    assert grid.n_q == 145
    np.testing.assert_array_equal(grid.energy_edges, ge.grid.energy_edges)
    assert grid.fingerprint != ge.grid.fingerprint
    binning = ReferenceBinning(ge.crystal, grid, radius)
    q = np.random.default_rng(0).uniform(-2.0, 2.0, (4000, 3))
    assert (binning.q_index(q) >= 0).all()
    steps = np.arange(16) / 16
    mesh = np.stack(np.meshgrid(steps, steps, steps, indexing="ij"), -1).reshape(-1, 3)
    assert set(binning.q_index(mesh).tolist()) == set(range(145))
    with pytest.raises(GridError, match=">= 2 points"):
        make_wedge_grid(ge.crystal, ge.grid.energy_edges, 1)


def test_zone_classes_follow_the_atoms_relative_phases(ge: MaterialSetup) -> None:
    """Diamond Ge: the atoms' relative phase exp(-2 pi i G.(x_1 - x_0)) is a power of i
    set by h + k + l modulo 4 (primitive basis), so four classes; one atom, one class."""
    z = zone_classes(ge.crystal)
    assert (z.period, z.n_classes) == (4, 4)
    g = np.random.default_rng(0).integers(-9, 10, (500, 3))
    cls = z.of(g)
    rel = ge.crystal.positions[1] - ge.crystal.positions[0]
    phase = np.exp(-2j * np.pi * (g @ rel))
    for c in range(4):  # one relative phase per class, a different one for each
        assert np.ptp(phase[cls == c].real) < 1e-9
        assert np.ptp(phase[cls == c].imag) < 1e-9
    assert len({complex(np.round(phase[cls == c][0], 6)) for c in range(4)}) == 4
    assert z.of(np.zeros((1, 3), dtype=int))[0] == 0
    al = zone_classes(setup("Al").crystal)
    assert al.n_classes == 1
    assert z.digest() != al.digest()
    grid = make_class_grid(ge.grid, z)
    assert grid.shape == (4 * ge.grid.n_q, ge.grid.n_e)
    np.testing.assert_array_equal(grid.qpath.qpoints[4 * 7 + 3], ge.grid.qpath.qpoints[7])
    assert grid.fingerprint != ge.grid.fingerprint
