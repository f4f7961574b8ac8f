"""The close modes' lines across the folding tube (``counts._pair_lines``) against a brute
force on a small made-up dynamical matrix: the full matrix diagonalised at every node of the
same quadrature over the offsets."""

from __future__ import annotations

import numpy as np

from model_server.refinement import counts


def _hermitian(rng: np.random.Generator, m: int, scale: float) -> np.ndarray:
    a = rng.standard_normal((m, m)) + 1j * rng.standard_normal((m, m))
    return scale * (a + a.conj().T) / 2.0


def _pair_against_full(scale: float, *, rich: bool = False) -> dict[str, np.ndarray]:
    """The pair's lines and the full matrix's at the same nodes, the offsets scaled by
    ``scale`` (see the tests below). With ``rich``: the cells' tensor changes across the
    tube (``M(delta) = T + (delta - <delta>) . G``, its offsets' tensors made to match), a
    Q resolution, a tensor of positions in the bin and a first-order change per mode."""
    rng = np.random.default_rng(7)
    m = 6
    basis, _ = np.linalg.qr(rng.standard_normal((m, m)) + 1j * rng.standard_normal((m, m)))
    lam0 = np.array([1.0, 2.0, 3.0, 3.003, 5.0, 6.0])
    d0 = basis @ np.diag(lam0) @ basis.conj().T
    d1 = [_hermitian(rng, m, 0.5) for _ in range(3)]
    d2 = np.empty((3, 3, m, m), dtype=complex)
    for a in range(3):
        for b in range(a, 3):
            d2[a, b] = d2[b, a] = _hermitian(rng, m, 0.2)
    lam, vec = np.linalg.eigh(d0)
    vh = vec.conj().T
    bq = np.stack([vh @ d1[a] @ vec for a in range(3)])  # (3, m, m)
    d2e = np.stack([vh @ d2[a, b] @ vec for a in range(3) for b in range(3)])  # (9, m, m)
    energy = counts._TO_MEV * np.sqrt(lam)
    gap = lam[:, None] - lam[None, :]
    inv_gap = np.where(np.eye(m, dtype=bool), 0.0, 1.0 / np.where(np.eye(m) > 0, 1.0, gap))
    t = rng.standard_normal((m, m)) + 1j * rng.standard_normal((m, m))
    tensor = t @ t.conj().T  # the bin's structure-factor tensor, positive
    mean = scale * np.array([0.004, -0.006, 0.002])
    spread = np.array([[0.02, 0.004, 0.0], [0.004, 0.015, 0.002], [0.0, 0.002, 0.01]])
    cov = scale**2 * spread @ spread.T
    slope = np.zeros((3, m, m), dtype=complex)  # dM/d delta_a
    positions = np.zeros((m, m), dtype=complex)
    change = np.zeros(m)
    eta2 = 0.0
    if rich:
        slope = np.stack([_hermitian(rng, m, 0.5 * np.abs(tensor).max() / 0.02) for _ in range(3)])
        positions = _hermitian(rng, m, 0.3)
        change = rng.normal(0.0, 0.2 * np.abs(tensor).max(), m)
        change[2:4] = [2.5, -1.5]  # ~10 % of the pair's intensities
        eta2 = 0.5 * float(np.linalg.eigvalsh(cov).min())
    # the offsets' tensors sum w delta_a M: <delta> T + Cov . G
    tensor_d = mean[:, None, None] * tensor + np.einsum("ab,bij->aij", cov, slope)
    # one bin, an element for every mode; M constant across the tube (Td = <delta> T)
    ip, ie, im = np.zeros(m, dtype=np.intp), np.zeros(m, dtype=np.intp), np.arange(m)
    near = counts._Near(
        shape=(1, 1, m),
        at=(ip, ie, im),
        e=energy.copy(),
        mu=np.zeros(m),
        tau2=np.zeros(m),
        lo=np.zeros(m),
    )
    left = vh @ tensor  # row j: e_j^H T
    left_x = vh @ positions
    a = np.einsum("ji,ji->j", left, vec.T).real
    a_x = np.einsum("ji,ji->j", left_x, vec.T).real
    before = a.copy()
    groups = counts._pair_groups(energy[None], np.ones((1, m), dtype=bool), counts.PAIR_GAP_MEV)
    assert list(groups[0]) == [0, 1, 2, 2, 3, 4]
    pm = counts._PairModel(
        point_q=np.zeros(1, dtype=np.int64),
        lam=lam[None],
        vec=vec[None],
        bq=bq[None],
        d2e=d2e[None],
        inv_gap=inv_gap[None],
        mean=mean[None, None],
        cov=cov[None, None],
        tensor=tensor[None, None].astype(np.complex64),
        tensor_d=tensor_d[None, None],
        eta2=eta2,
    )
    counts._pair_lines(near, a, a_x, left, left_x, change, groups, pm)

    # brute force at the same nodes
    z, wz = counts._pair_nodes()
    wv, axes = np.linalg.eigh(cov)
    nodes = mean + z @ (axes * np.sqrt(wv + eta2)).T  # the energies' (Q resolution in)
    cells = mean + z @ (axes * np.sqrt(wv)).T  # the tensor's
    eps, inten, inten_x, shares = [], [], [], []
    for delta, cell in zip(nodes, cells, strict=True):
        full = (
            d0
            + np.einsum("a,aij->ij", delta, d1)
            + 0.5 * np.einsum("a,b,abij->ij", delta, delta, d2)
        )
        ev, v = np.linalg.eigh(full)
        branch = v[:, 2:4]
        eps.append(counts._TO_MEV * np.sqrt(ev[2:4]))
        here = tensor + np.einsum("a,aij->ij", cell - mean, slope)
        inten.append(np.einsum("im,ij,jm->m", branch.conj(), here, branch).real)
        inten_x.append(np.einsum("im,ij,jm->m", branch.conj(), positions, branch).real)
        mix = np.abs(vh[2:4] @ branch) ** 2  # (k, i): the pair's path-point modes in each
        shares.append(change[2:4] @ mix)
    eps_a, inten_a = np.array(eps), np.array(inten)  # (J, 2)
    w = wz[:, None] * inten_a
    centre = np.sum(w * eps_a, axis=0) / w.sum(axis=0)
    width = np.sqrt(np.sum(w * eps_a**2, axis=0) / w.sum(axis=0) - centre**2)
    return {
        "centre": energy[2:4] + near.mu[2:4],
        "centre_full": centre,
        "width": np.sqrt(near.tau2[2:4]),
        "width_full": width,
        "intensity": a[2:4],
        "intensity_full": wz @ inten_a + wz @ np.array(shares),
        "positions": a_x[2:4],
        "positions_full": wz @ np.array(inten_x),
        "gap": energy[3] - energy[2],
        "others_kept": np.array(
            [
                np.array_equal(a[[0, 1, 4, 5]], before[[0, 1, 4, 5]]),
                not near.mu[[0, 1, 4, 5]].any(),
                not near.tau2[[0, 1, 4, 5]].any(),
            ]
        ),
    }


def test_a_near_degenerate_pair_splits_as_the_full_matrix_does() -> None:
    """Six modes, two of them 0.06 meV apart at the path point, split across the tube by
    couplings ten times their gap (the full matrix D(delta) = D0 + delta . D1 + delta delta
    : D2 / 2). The pair's two lines (in order of energy: centres, widths, intensities from
    each branch's own eigenvector) against the full matrix's two middle eigenvalues and
    eigenvectors at the same nodes: the split to 0.2 %, the widths and the intensities to
    1 % (what is left is the eigenvectors' admixture of the other modes, which the
    first-order change, zero here, carries), the centres to 1 % of the widths, and their
    error second order in the offsets (it falls by 3-4 when they halve: it comes from the
    intensities' weights, the admixture again); the other modes' elements untouched."""
    out = _pair_against_full(1.0)
    split = out["centre_full"][1] - out["centre_full"][0]
    assert split > 5 * out["gap"]  # the couplings, not the gap, split the pair
    np.testing.assert_allclose(out["centre"][1] - out["centre"][0], split, rtol=2e-3)
    np.testing.assert_allclose(out["width"], out["width_full"], rtol=1e-2)
    np.testing.assert_allclose(out["intensity"], out["intensity_full"], rtol=1e-2)
    assert not out["positions"].any()
    err = np.abs(out["centre"] - out["centre_full"])
    assert np.all(err < 1e-2 * out["width_full"])
    half = _pair_against_full(0.5)
    assert np.all(np.abs(half["centre"] - half["centre_full"]) < 0.35 * err)
    assert out["others_kept"].all()


def test_the_pair_follows_the_cells_tensor_and_the_q_resolution() -> None:
    """The same pair with the cells' tensor changing across the tube (``M`` linear in the
    offsets, recovered from the offsets' tensors), a Q resolution (the energies' nodes wider
    than the tensor's), a tensor of positions in the bin and a first-order change per mode,
    which move the intensities by 7-12 % and widen the lines by 3-10 %: against the full
    matrix the intensities to 3 % (what is left is the other modes' admixture, which meets
    the tensor's change outside the pair's block), the positions' term and the widths to
    1 %, the split to 1.5 %."""
    out = _pair_against_full(1.0, rich=True)
    plain = _pair_against_full(1.0)
    split = out["centre_full"][1] - out["centre_full"][0]
    np.testing.assert_allclose(out["centre"][1] - out["centre"][0], split, rtol=1.5e-2)
    np.testing.assert_allclose(out["width"], out["width_full"], rtol=1e-2)
    assert np.all(out["width"] > 1.02 * plain["width"])  # the Q resolution widens the lines
    np.testing.assert_allclose(out["intensity"], out["intensity_full"], rtol=3e-2)
    assert np.all(np.abs(out["intensity"] / plain["intensity"] - 1.0) > 0.05)
    np.testing.assert_allclose(out["positions"], out["positions_full"], rtol=1e-2)
    assert np.all(np.abs(out["positions"]) > 0.1)


def test_a_group_missing_a_mode_in_a_bin_is_left_alone() -> None:
    """Where only one mode of a close pair is near a bin's energies, the bin keeps that
    mode's own first-order line (nothing to split)."""
    m = 3
    lam = np.array([[1.0, 3.0, 3.001]])
    vec = np.eye(m, dtype=complex)[None]
    energy = counts._TO_MEV * np.sqrt(lam)
    groups = counts._pair_groups(energy, np.ones((1, m), dtype=bool), counts.PAIR_GAP_MEV)
    assert list(groups[0]) == [0, 1, 1]
    ip, ie, im = np.zeros(2, dtype=np.intp), np.zeros(2, dtype=np.intp), np.array([0, 1])
    near = counts._Near(
        shape=(1, 1, m),
        at=(ip, ie, im),
        e=energy[0, :2],
        mu=np.zeros(2),
        tau2=np.zeros(2),
        lo=np.zeros(2),
    )
    a, a_x = np.array([1.0, 2.0]), np.zeros(2)
    pm = counts._PairModel(
        point_q=np.zeros(1, dtype=np.int64),
        lam=lam,
        vec=vec,
        bq=np.ones((1, 3, m, m), dtype=complex),
        d2e=np.ones((1, 9, m, m), dtype=complex),
        inv_gap=np.zeros((1, m, m)),
        mean=np.zeros((1, 1, 3)),
        cov=np.eye(3)[None, None] * 1e-4,
        tensor=np.eye(m, dtype=np.complex64)[None, None],
        tensor_d=np.zeros((1, 1, 3, m, m), dtype=complex),
        eta2=0.0,
    )
    rows = np.eye(m, dtype=complex)[:2]
    counts._pair_lines(near, a, a_x, rows, rows, np.zeros(2), groups, pm)
    np.testing.assert_array_equal(a, [1.0, 2.0])
    np.testing.assert_array_equal(near.mu, 0.0)


def test_the_groups_are_runs_of_close_modes_and_skip_modes_below_the_floor() -> None:
    """Runs of modes each within the gap of the next form a group (chained: 0.5 + 4 meV
    apart is one group at a 5 meV gap); a mode below the frequency floor (acoustic at a
    zone centre) is a group of its own even where it is close to another."""
    energy = np.array([[0.0, 0.0, 3.0, 3.5, 7.5, 30.0], [1.0, 1.0, 1.0, 40.0, 40.2, 60.0]])
    ok = np.array([[False, False, True, True, True, True], [True] * 6])
    groups = counts._pair_groups(energy, ok, 5.0)
    assert groups[0].tolist() == [0, 1, 2, 2, 2, 3]
    assert groups[1].tolist() == [0, 0, 0, 1, 1, 2]
