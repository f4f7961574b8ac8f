"""Per-bin moments of the folded cells: the same walk as the coverage, Hermitian
structure-factor tensors, the symmetry they rest on, and their bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.exceptions import FoldError
from consumers.reduction.moments import (
    BinMoments,
    folded_samples,
    orientation_moments,
    star_operations,
)
from simulations.lattice.grid import zone_classes
from simulations.lattice.sqe import CoherentSQE
from tests.ge_moments import TEMPERATURE, ge_moments, ge_run


def test_weights_are_the_coverage_before_alias_expansion() -> None:
    run = ge_run()
    m = ge_moments((10.0,))
    cov = run.folder.coverage(10.0)
    canonical = run.folder.table.alias == np.arange(run.folder.grid.n_q)
    w = m.weight.reshape(run.folder.grid.shape)
    np.testing.assert_allclose(w[canonical], cov[canonical], rtol=1e-10, atol=1e-14)
    assert m.n_orientations == 1


def test_folded_samples_are_the_moments_samples_one_by_one() -> None:
    """The per-sample list (for references at each sample's own Q) holds the walk's
    samples: their weights sum to the moments' weight per bin, their offsets to the first
    moment, and every Q lies within the tube of its star point."""
    run = ge_run()
    f, t, grid = run.folder, run.folder.table, run.folder.grid
    m = ge_moments((10.0,))
    rows, q, sub, w = folded_samples(f, 10.0)
    assert len(rows) == len(q) == len(sub) == len(w) > 100_000
    bins = t.star_index[rows] * grid.n_e + sub // 4
    per_bin = np.bincount(bins, weights=w, minlength=grid.n_q * grid.n_e)
    np.testing.assert_allclose(per_bin, m.weight, rtol=1e-10, atol=1e-14)
    # Q's distance from its star point (Cartesian, modulo the reciprocal lattice)
    frac = t.star_xyz[rows] @ np.linalg.inv(t.reciprocal)
    d = q - frac
    d = (d - np.rint(d)) @ t.reciprocal
    assert np.linalg.norm(d, axis=1).max() <= t.tolerance * (1 + 1e-9)
    # the same offsets the moments carry, rotated into the path point's frame
    inv = star_operations(f, run.refiner.constants.operations)
    qp = np.einsum("na,nab->nb", q, inv[rows])
    path = grid.qpath.qpoints[t.star_index[rows]]
    delta = (qp - path - np.rint(qp - path)) @ t.reciprocal
    off1 = np.stack(
        [np.bincount(bins, weights=w * delta[:, a], minlength=len(m.weight)) for a in range(3)], 1
    )
    np.testing.assert_allclose(off1, m.offset1, atol=1e-9 * np.abs(m.offset1).max())


def test_tensors_are_hermitian_and_positive() -> None:
    m = ge_moments((10.0,))
    used = m.weight > 0
    t = m.tensor[used]
    np.testing.assert_allclose(t, np.conj(np.swapaxes(t, 1, 2)), atol=1e-12 * np.abs(t).max())
    eig = np.linalg.eigvalsh(t[:200])
    assert eig.min() > -1e-9 * eig.max()
    # offsets lie within the folding tube and its path step
    mean = m.offset1[used] / m.weight[used, None]
    assert np.linalg.norm(mean, axis=1).max() < 0.2
    assert np.all(m.background[used] > 0)
    assert not np.any(m.tensor[~used])


def test_star_operations_take_star_points_back_to_their_path_point() -> None:
    run = ge_run()
    inv = star_operations(run.folder, run.refiner.constants.operations)
    t = run.folder.table
    frac = t.star_xyz @ np.linalg.inv(t.reciprocal)
    back = np.einsum("sa,sab->sb", frac, inv) - run.folder.grid.qpath.qpoints[t.star_index]
    np.testing.assert_allclose(back, np.rint(back), atol=1e-9)


def test_cross_section_is_invariant_under_the_point_group_and_time_reversal(rng) -> None:  # type: ignore[no-untyped-def]
    """What the moments rest on: S(Q, E) = S(Q R, E) for every operation of the star."""
    run = ge_run()
    model = CoherentSQE(run.refiner.setup.basis, run.truth, temperature=TEMPERATURE)
    q = rng.uniform(-3, 3, size=(5, 3))
    e0, sf0 = model.structure_factors(q)
    for op in run.refiner.constants.operations[::7]:
        e1, sf1 = model.structure_factors(q @ op)
        np.testing.assert_allclose(e1, e0, atol=1e-8)
        # degenerate modes share their weight in any basis: compare per energy
        for a, b, x, y in zip(e0, e1, sf0, sf1, strict=True):
            for level in np.unique(np.round(a, 6)):
                np.testing.assert_allclose(
                    x[np.round(a, 6) == level].sum(),
                    y[np.round(b, 6) == level].sum(),
                    rtol=1e-7,
                    atol=1e-12,
                )


def test_moments_add_by_charge_and_round_trip() -> None:
    one = ge_moments((10.0,))
    two = BinMoments.zeros(len(one.weight), one.tensor.shape[1])
    two.add(one, 2.5)
    np.testing.assert_allclose(two.weight, 2.5 * one.weight)
    back = BinMoments.from_arrays(two.arrays())
    assert back is not None
    assert back.n_orientations == 1
    np.testing.assert_array_equal(back.tensor, two.tensor)
    assert BinMoments.from_arrays({}) is None
    with pytest.raises(FoldError, match="proton charge"):
        two.add(one, float("nan"))
    with pytest.raises(FoldError, match="cannot be added"):
        two.add(BinMoments.zeros(10, 6))


def test_a_cached_orientation_is_returned_as_a_copy() -> None:
    run = ge_run()
    a = orientation_moments(run.folder, run.refiner.constants, 10.0)
    a.weight[:] = -1.0
    b = orientation_moments(run.folder, run.refiner.constants, 10.0)
    assert b.weight.min() >= 0.0
    with pytest.raises(FoldError, match="finite"):
        orientation_moments(run.folder, run.refiner.constants, float("nan"))


def test_moments_deep_copy_is_independent() -> None:
    import copy

    m = BinMoments.zeros(4, 6)
    m.weight[:] = 1.0
    c = copy.deepcopy(m)
    c.weight[0] = 5.0
    assert m.weight[0] == 1.0
    np.testing.assert_array_equal(c.tensor, m.tensor)


def test_moments_split_by_zone_class_sum_to_the_path_moments() -> None:
    """Split by the zones' structure-factor class, every array of every bin sums over the
    classes to the unsplit one (the same cells, each in one class), and each class holds
    a real share of the exposure."""
    run = ge_run()
    classes = zone_classes(run.refiner.setup.crystal)
    plain = orientation_moments(run.folder, run.refiner.constants, 20.0)
    split = orientation_moments(run.folder, run.refiner.constants, 20.0, classes=classes)
    n_q, n_e = run.folder.grid.shape
    n = classes.n_classes
    assert split.weight.shape == (n_q * n * n_e,)
    for name, a in plain.arrays(prefix="").items():
        if name == "n":
            continue
        b = split.arrays(prefix="")[name]
        summed = b.reshape(n_q, n, n_e, *b.shape[1:]).sum(axis=1).reshape(a.shape)
        np.testing.assert_allclose(summed, a, rtol=1e-9, atol=1e-12 * np.abs(a).max(), err_msg=name)
    share = split.weight.reshape(n_q, n, n_e).sum(axis=(0, 2)) / plain.weight.sum()
    assert np.all(share > 0.1), share
