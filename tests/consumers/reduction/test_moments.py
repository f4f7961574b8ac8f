"""Per-bin moments of the folded cells: the same walk as the coverage, Hermitian
structure-factor tensors, the symmetry they rest on, and their bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.exceptions import FoldError
from consumers.reduction.moments import (
    BinMoments,
    MomentsRing,
    folded_samples,
    offset_tensors,
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


def test_offset_tensors_are_each_samples_offset_times_its_structure_factor(rng) -> None:  # type: ignore[no-untyped-def]
    """``sum w delta_a M(Q')`` against the same sum made here sample by sample from the
    per-sample list: each sample's Q rotated into its path point's frame, its offset, and
    ``c`` (amplitude, Debye-Waller factor, phase of its zone, Q') built in numpy; compared
    through a random vector ``z`` (``z^H M z = |c . z|^2``), bin by bin."""
    run = ge_run()
    f, t, grid = run.folder, run.folder.table, run.folder.grid
    constants = run.refiner.constants
    td = offset_tensors(f, constants, 10.0, pixel_stride=4)
    assert td.shape == (grid.n_q * grid.n_e, 3, 6, 6)
    np.testing.assert_allclose(td, np.conj(np.swapaxes(td, -1, -2)), atol=1e-12 * np.abs(td).max())
    rows, q, sub, w = folded_samples(f, 10.0, pixel_stride=4)
    bins = t.star_index[rows] * grid.n_e + sub // 4
    inv = star_operations(f, constants.operations)
    qp = np.einsum("na,nab->nb", q, inv[rows])  # r.l.u., in the path point's frame
    path = grid.qpath.qpoints[t.star_index[rows]]
    zone = np.floor(qp - path + 0.5)
    delta = (qp - path - zone) @ t.reciprocal  # 1/A
    qc = qp @ t.reciprocal  # Q' (1/A)
    n_at = len(constants.amplitudes)
    c = np.empty((len(q), 3 * n_at), dtype=complex)
    for j in range(n_at):
        dw = np.einsum("na,ab,nb->n", qc, constants.debye_waller[j], qc)
        phase = np.exp(-2j * np.pi * zone @ constants.positions[j])
        c[:, 3 * j : 3 * j + 3] = (constants.amplitudes[j] * np.exp(-dw) * phase)[:, None] * qc
    z = rng.standard_normal(3 * n_at) + 1j * rng.standard_normal(3 * n_at)
    mz = np.abs(c @ z) ** 2  # z^H M z per sample
    for a in range(3):
        ref = np.bincount(bins, weights=w * delta[:, a] * mz, minlength=len(td))
        got = np.einsum("x,bxy,y->b", np.conj(z), td[:, a], z)
        assert np.abs(got.imag).max() <= 1e-9 * np.abs(got).max()
        np.testing.assert_allclose(got.real, ref, atol=1e-9 * np.abs(ref).max())
    # on the moments' bins: zero where no sample folded
    m = orientation_moments(f, constants, 10.0, pixel_stride=4, cache=False)
    used = m.weight > 0
    assert np.abs(td[~used]).max() == 0.0
    assert np.abs(td[used]).max() > 0.0


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
    # the positions' tensor sum w x M, x in [-1, 1]: T + T_x and T - T_x are sums of
    # (1 +- x) w M >= 0, so both positive; not zero (the samples are not even in a bin)
    tx = m.tensor_x[used]
    np.testing.assert_allclose(tx, np.conj(np.swapaxes(tx, 1, 2)), atol=1e-12 * np.abs(t).max())
    for sign in (1.0, -1.0):
        eig = np.linalg.eigvalsh((t + sign * tx)[:200])
        assert eig.min() > -1e-9 * eig.max()
    mean_x = np.trace(tx, axis1=1, axis2=2).real / np.trace(t, axis1=1, axis2=2).real
    assert 0.01 < np.sqrt(np.mean(mean_x**2)) < 0.5


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
    np.testing.assert_array_equal(back.tensor_x, two.tensor_x)
    assert BinMoments.from_arrays({}) is None
    # moments written before the positions were kept: zeros there, the rest as written
    older = {k: v for k, v in two.arrays().items() if k != "moments_tensor_x"}
    old = BinMoments.from_arrays(older)
    assert old is not None
    assert not np.any(old.tensor_x)
    np.testing.assert_array_equal(old.tensor_q2, two.tensor_q2)
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


def _random_moments(rng: np.random.Generator, n_bins: int = 40, n_branches: int = 6) -> BinMoments:
    m = BinMoments.zeros(n_bins, n_branches)
    for a in m._fields():
        a[...] = rng.normal(size=a.shape)
    if np.iscomplexobj(m.tensor):
        m.tensor += 1j * rng.normal(size=m.tensor.shape)
    m.n_orientations = 1
    return m


def test_the_ring_sums_as_add_does_and_never_writes_over_a_held_set(rng) -> None:  # type: ignore[no-untyped-def]
    """A live run's moments as new sets (MomentsRing): bitwise the in-place sums, a set
    held by a snapshot (or a view of one of its arrays) is left as it was, and sets
    nothing holds are recycled instead of allocated."""
    ring = MomentsRing(keep=3)
    live = BinMoments.zeros(40, 6)
    ref = BinMoments.zeros(40, 6)
    held: list[tuple[BinMoments, BinMoments]] = []  # (a snapshot's set, its sums then)
    view = None
    for k in range(10):
        one = _random_moments(rng)
        charge = 0.5 + 0.37 * k
        ref.add(one, charge)
        before = live
        live = ring.plus(live, one, charge)
        assert live is not before
        for a, b in zip(live._fields(), ref._fields(), strict=True):
            assert np.array_equal(a, b)  # bitwise: base + charge * one
        assert live.n_orientations == k + 1
        if k in (2, 5):
            held.append((live, live.copy()))
        if k == 7:
            view = live.tensor_q2[3:9]  # a view keeps its set too
            view_then = view.copy()
    for kept, then in held:
        for a, b in zip(kept._fields(), then._fields(), strict=True):
            assert np.array_equal(a, b)
    assert view is not None
    assert np.array_equal(view, view_then)
    # nothing held from here on: two sets take turns
    held.clear()
    del view
    allocated = ring.allocated
    for _ in range(6):
        live = ring.plus(live, _random_moments(rng), 1.0)
    assert ring.allocated - allocated <= 1
    assert ring.recycled >= 5


def test_the_ring_refuses_a_bad_charge_or_shape(rng) -> None:  # type: ignore[no-untyped-def]
    ring = MomentsRing()
    base = BinMoments.zeros(40, 6)
    with pytest.raises(FoldError, match="proton charge"):
        ring.plus(base, _random_moments(rng), float("nan"))
    with pytest.raises(FoldError, match="cannot be added"):
        ring.plus(base, _random_moments(rng, n_bins=41), 1.0)
    with pytest.raises(ValueError, match="keep"):
        MomentsRing(keep=0)
