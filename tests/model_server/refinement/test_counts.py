"""The expected counts of the folded bins: against the brute-force expected fold (the
prediction endpoint's per-pixel cross-section folded sample by sample), the Jacobian
against finite differences, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.reduction.folding import Folder
from consumers.reduction.moments import BinMoments, orientation_moments
from model_server.exceptions import RefinementError
from model_server.prediction.expected import GridSimulator
from model_server.refinement.counts import CountsModel, half_mesh
from model_server.refinement.exact import exact_one_phonon_fold
from model_server.refinement.refiner import RunRefiner
from simulations.lattice.backgrounds import Backgrounds
from simulations.lattice.sqe import CoherentSQE, mesh_points
from simulations.units import THZ_TO_MEV, VASP_TO_THZ
from tests.ge_moments import EI, TEMPERATURE, ge_moments, ge_run, ge_simulator


def _theta(model: CountsModel, coefficients: np.ndarray) -> np.ndarray:
    return model.theta(coefficients)


def test_expected_counts_match_the_brute_force_fold() -> None:
    run = ge_run()
    omega = 10.0
    model = run.refiner.model(ge_moments((omega,)), at=run.truth)
    lam = model.evaluate(_theta(model, run.truth), jacobian=False).expected
    sqe = CoherentSQE(
        run.refiner.setup.basis, run.truth, temperature=TEMPERATURE, resolution=model.resolution
    )
    sim, sampler = ge_simulator(run, sqe)
    _, signal = sampler.fold(omega, sim.sqe(omega))
    # the model's fixed multiphonon part, against its own brute-force fold
    mp_s = _multiphonon_sqe(sim)
    _, mp_signal = sampler.fold(omega, mp_s)
    mp_brute = mp_signal.reshape(-1)[model.bins]
    mp_model = run.refiner.multiphonon(ge_moments((omega,)), run.truth)[model.bins]
    # (the moments carry the reference set's Debye-Waller factors, the template's DOS comes
    # from a 16^3 mesh: a few per cent low, most at low energy)
    assert mp_model.sum() == pytest.approx(mp_brute.sum(), rel=0.08)
    strong_mp = mp_brute > 0.2 * mp_brute.max()
    assert np.median(np.abs(mp_model[strong_mp] / mp_brute[strong_mp] - 1.0)) < 0.1
    brute = signal.reshape(-1)[model.bins] + mp_brute
    assert lam.sum() == pytest.approx(brute.sum(), rel=0.03)
    strong = brute > 0.05 * brute.max()
    ratio = lam[strong] / brute[strong]
    # (the simulator's shortcuts put S at each bin's energy centre, so it is blind to
    # where in its bin a mode's intensity sits, which the model keeps: ~3.4 % apart)
    assert np.median(np.abs(ratio - 1.0)) < 0.04
    assert np.mean(np.abs(ratio - 1.0) < 0.1) > 0.8


def test_expected_counts_against_the_exact_fold_at_every_sample() -> None:
    """The independent reference: the cross-section (Euphonic-checked) diagonalised at
    every folded sample's own Q and energy, no phonon table, no super-pixels. The model
    takes the modes at the path point, the tube's offsets to first order in the
    eigenvectors and to second order in the energies (about 2 % per strong bin,
    docs/refinement.md); this guards that level and its lack of bias, and that where in
    their bins the modes' intensity was seen (the moments' ``tensor_x``) and the
    branches' curvature across the tube each bring the model closer."""
    run = ge_run()
    omega = 47.0
    stride = 8  # every 8th pixel for both: a quarter of the walk's samples
    moments = orientation_moments(run.folder, run.refiner.constants, omega, pixel_stride=stride)
    model = run.refiner.counts_model(moments)
    lam = model.evaluate(_theta(model, run.truth), jacobian=False).expected
    sqe = CoherentSQE(
        run.refiner.setup.basis, run.truth, temperature=TEMPERATURE, resolution=model.resolution
    )
    ref = exact_one_phonon_fold(run.folder, sqe, omega, pixel_stride=stride).reshape(-1)
    ref = ref[model.bins]
    assert lam.sum() == pytest.approx(ref.sum(), rel=0.01)
    strong = ref > 0.05 * ref.max()
    assert strong.sum() > 1000
    ratio = lam[strong] / ref[strong] - 1.0
    assert np.median(np.abs(ratio)) < 0.025
    assert np.mean(np.abs(ratio) < 0.1) > 0.9
    assert abs(np.median(ratio)) < 0.01
    evenly = moments.copy()
    evenly.tensor_x[:] = 0.0  # every bin's samples spread evenly over the bin
    flat = run.refiner.counts_model(evenly)
    lam_flat = flat.evaluate(_theta(flat, run.truth), jacobian=False).expected
    ratio_flat = lam_flat[strong] / ref[strong] - 1.0
    assert np.median(np.abs(ratio_flat)) > np.median(np.abs(ratio)) + 0.008
    # and the branches' curvature across the tube (on these strong bins, every 8th pixel:
    # 1.8 % with it, 2.0 % with planes across the tube)
    planes = run.refiner.counts_model(moments, curvature=False)
    lam_planes = planes.evaluate(_theta(planes, run.truth), jacobian=False).expected
    ratio_planes = lam_planes[strong] / ref[strong] - 1.0
    assert np.median(np.abs(ratio_planes)) > np.median(np.abs(ratio)) + 0.001


def _multiphonon_sqe(sim: GridSimulator) -> np.ndarray:
    """(n_groups, n_E) the multiphonon S of the super-pixels on the grid's energies."""
    edges = np.asarray(ge_run().folder.grid.energy_edges)
    parts = sim.components(Backgrounds(elastic=False), edges=edges)
    return np.asarray(parts["multiphonon"] / sim.cell_weights(edges))


def test_elastic_bins_are_not_fitted() -> None:
    run = ge_run()
    model = run.refiner.model(ge_moments((10.0,)))
    n_e = run.folder.grid.n_e
    lower = run.folder.grid.energy_edges[:-1][model.bins % n_e]
    assert lower.min() >= run.refiner.elastic_cut
    assert run.refiner.elastic_cut == pytest.approx(
        4.0 * float(model.resolution.sigma(np.array(0.0)))
    )


def test_jacobian_matches_finite_differences() -> None:
    run = ge_run()
    model = run.refiner.model(ge_moments((10.0, 40.0)))
    theta = _theta(model, run.truth)
    theta[-3] = 0.01
    theta[-1] = 4e-4
    jac = model.evaluate(theta).jacobian
    assert jac is not None
    assert jac.shape == (model.n_bins, model.n_params)
    _assert_jacobian(model, theta, jac, (0, 1, 2, 3, 6, 13, 16, 17, 18, 19))


def test_the_model_keeps_its_tensors_in_single_precision_and_lets_its_pass_go() -> None:
    """The bins' tensors are kept as complex64 (half the model's memory) and give the
    expected counts of the double-precision moments to 1e-6; release() drops the forward
    pass kept for the Jacobian, and the next evaluation is the same."""
    run = ge_run()
    m = ge_moments((10.0,))
    model = run.refiner.model(m)
    assert model._tensor.dtype == np.complex64
    assert model._tensor_q2.dtype == np.complex64
    assert model._tensor_x.dtype == np.complex64
    theta = _theta(model, run.truth)
    ev = model.evaluate(theta)
    assert model._last is not None
    held = model.nbytes
    model.release()
    assert model._last is None
    assert model._dw_last is None
    assert model.nbytes == held
    again = model.evaluate(theta)
    assert np.allclose(again.expected, ev.expected, rtol=1e-12, atol=0.0)
    # the same model with the tensors in double precision (the moments as they are)
    m_ = m.tensor.shape[1]
    shape = model._use.shape
    double = run.refiner.model(m)
    double._tensor = np.take(m.tensor, double._dense, axis=0).reshape(*shape, m_, m_)
    double._tensor_q2 = np.take(m.tensor_q2, double._dense, axis=0).reshape(*shape, m_, m_)
    double._tensor_x = 3.0 * np.take(m.tensor_x, double._dense, axis=0).reshape(*shape, m_, m_)
    ref = double.evaluate(theta)
    big = ref.expected > 1e-3 * ref.expected.max()
    assert np.allclose(ev.expected[big], ref.expected[big], rtol=1e-6, atol=0.0)
    assert ref.jacobian is not None
    assert ev.jacobian is not None
    scale = np.abs(ref.jacobian).max(axis=0)
    assert np.all(np.abs(ev.jacobian - ref.jacobian) <= 1e-5 * scale + 1e-300)


def test_the_jacobian_holds_across_the_wedges_wide_voxels() -> None:
    """On the wedge's voxels (radius 0.12 1/A against the tube's 0.05) the velocities'
    change with the eigenvectors matters: without it the 1NN columns were 0.9-1.4 % off
    (weighted by 1 / sqrt(lambda), as the Fisher information weighs them), which
    overstated the information along the 1NN_xx/1NN_xy valley; with it, 0.03-0.06 %."""
    run = ge_run()
    refiner = RunRefiner.wedge("Ge", run.refiner.instrument, EI, TEMPERATURE)
    folder = Folder(refiner.table, refiner.grid, run.refiner.instrument, run.folder.orientation, EI)
    moments = orientation_moments(folder, refiner.constants, 10.0)
    model = refiner.model(moments)
    theta = _theta(model, run.truth)
    ev = model.evaluate(theta)
    assert ev.jacobian is not None
    weight = 1.0 / np.sqrt(ev.expected)
    for k in (0, 1, 2, 3):
        fd = _central_difference(model, theta, k)
        off = np.linalg.norm((ev.jacobian[:, k] - fd) * weight) / np.linalg.norm(fd * weight)
        assert off < 0.003, (model.names[k], off)


def test_a_per_bin_correction_scales_the_one_phonon_part_and_its_jacobian() -> None:
    """The exact-fold correction (a fixed factor per bin on the one-phonon part): ones
    change nothing, and with factors 0.8-1.2 the Jacobian still matches finite differences
    (the multiphonon part and the background are not scaled)."""
    run = ge_run()
    m = ge_moments((10.0,))
    n = run.folder.grid.n_q * run.folder.grid.n_e
    extra = np.full(n, 1e-4)
    plain = run.refiner.counts_model(m, extra=extra)
    theta = _theta(plain, run.truth)
    theta[-3] = 0.01
    same = run.refiner.counts_model(m, extra=extra, correction=np.ones(n))
    np.testing.assert_allclose(
        same.evaluate(theta, jacobian=False).expected,
        plain.evaluate(theta, jacobian=False).expected,
        rtol=1e-12,
    )
    factor = np.random.default_rng(5).uniform(0.8, 1.2, n)
    model = run.refiner.counts_model(m, extra=extra, correction=factor)
    ev = model.evaluate(theta)
    base = plain.evaluate(theta, jacobian=False).expected
    one = base - extra[model.bins] - theta[-3] * model.background_shape  # scale 1
    expect = one * factor[model.bins] + extra[model.bins] + theta[-3] * model.background_shape
    np.testing.assert_allclose(ev.expected, expect, rtol=1e-9, atol=1e-12 * expect.max())
    assert ev.jacobian is not None
    _assert_jacobian(model, theta, ev.jacobian, (0, 3, 16, 17, 18))
    for bad in (np.zeros(n), np.full(n, np.nan), np.ones(3)):
        with pytest.raises(RefinementError, match="correction"):
            run.refiner.counts_model(m, correction=bad)


def _central_difference(model: CountsModel, theta: np.ndarray, k: int) -> np.ndarray:
    """d expected / d theta_k by central differences (step 1e-5 of max(1, |theta_k|))."""
    h = 1e-5 * max(1.0, abs(theta[k]))
    up, down = theta.copy(), theta.copy()
    up[k] += h
    down[k] -= h
    plus = model.evaluate(up, jacobian=False).expected
    return (plus - model.evaluate(down, jacobian=False).expected) / (2 * h)


def _assert_jacobian(
    model: CountsModel, theta: np.ndarray, jac: np.ndarray, params: tuple[int, ...]
) -> None:
    """The Jacobian's columns ``params`` against central differences (2 % of each
    column's largest)."""
    for k in params:
        fd = _central_difference(model, theta, k)
        assert np.abs(jac[:, k] - fd).max() < 0.02 * np.abs(fd).max(), model.names[k]


@pytest.mark.parametrize("n", [4, 5, 8])
def test_the_half_mesh_sums_like_the_whole_mesh(n: int) -> None:
    """One of each pair q, -q with weight 2 (1 for the points that are their own pair):
    the Debye-Waller sums of |e_j|^2 / E over the modes come out as on the whole mesh."""
    points, weights = half_mesh(n)
    assert weights.sum() == n**3
    assert len(points) == (n**3 + (8 if n % 2 == 0 else 1)) // 2
    whole = mesh_points(n)
    as_index = {tuple(np.rint(q * n).astype(int) % n) for q in points}
    assert len(as_index) == len(points)
    for q in whole:  # every point of the mesh is kept, or its negative is
        i = tuple(np.rint(q * n).astype(int) % n)
        assert i in as_index or tuple((-np.array(i)) % n) in as_index
    run = ge_run()
    basis = run.refiner.setup.basis

    def per_atom(q: np.ndarray, w: np.ndarray) -> np.ndarray:
        d = np.tensordot(run.truth, basis.dynamical_basis(q), 1)
        lam, vec = np.linalg.eigh(d)
        ok = lam > 1e-6
        f = np.where(ok, 1.0 / np.sqrt(np.where(ok, lam, 1.0)), 0.0)
        e2 = (np.abs(vec) ** 2).reshape(len(q), -1, 3, vec.shape[-1]).sum(axis=2)
        return np.einsum("q,qam,qm->a", w, e2, f)

    full = per_atom(whole, np.ones(len(whole)))
    assert np.allclose(per_atom(points, weights), full, rtol=1e-10, atol=0.0)


def test_clear_errors() -> None:
    run = ge_run()
    m = ge_moments((10.0,))
    with pytest.raises(RefinementError, match="another grid"):
        run.refiner.model(BinMoments.zeros(100, 6))
    with pytest.raises(RefinementError, match="no measured bins"):
        run.refiner.model(BinMoments.zeros(len(m.weight), 6))
    model = run.refiner.model(m)
    with pytest.raises(RefinementError, match="finite"):
        model.observed(np.full(run.folder.grid.shape, np.nan))
    with pytest.raises(RefinementError, match="shape"):
        model.observed(np.zeros((3, 3)))
    with pytest.raises(RefinementError, match="parameters"):
        model.evaluate(np.zeros(3))


@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("temperature", [5.0, 300.0])
def test_profile_derivatives_are_analytic_and_right(temperature: float, positions: bool) -> None:
    """The line and (``positions``) the line weighted by the position in its bin: their
    analytic derivatives against central differences."""
    run = ge_run()
    model = run.refiner.model(ge_moments((10.0,)))
    model.temperature = temperature
    rng = np.random.default_rng(3)
    shape = (4, model.grid.n_e, 6)
    e = rng.uniform(2.0, 40.0, shape)
    mu = rng.normal(0.0, 0.5, shape)
    tau2 = rng.uniform(0.0, 1.5, shape)
    r = 1.1
    value, *analytic = model._profile(e, mu, tau2, r, derivatives=True, positions=positions)
    assert np.abs(value).max() > 0
    for i, name in enumerate(("e", "mu", "tau2", "r")):
        args = {"e": e, "mu": mu, "tau2": tau2, "r": r}
        step = 1e-5 * (1.0 if name != "tau2" else 0.1)
        args[name] = args[name] + step
        up = model._profile(**args, positions=positions)
        args[name] = args[name] - 2 * step
        down = model._profile(**args, positions=positions)
        fd = (up - down) / (2 * step)
        scale = np.abs(fd).max()
        assert np.abs(analytic[i] - fd).max() < 1e-4 * scale, name


_WARM_UP_CHECK = """
import numpy as np
from numba.core.registry import CPUDispatcher

import model_server.refinement.counts as counts_module
from consumers.reduction.moments import orientation_moments
from model_server.refinement.refiner import RunRefiner
from tests.ge_moments import EI, TEMPERATURE, ge_run, replica_counts

kernels = {n: k for n, k in vars(counts_module).items() if isinstance(k, CPUDispatcher)}
assert not any(k.signatures for k in kernels.values()), "compiled before the warm-up"
run = ge_run()
split = RunRefiner.zone_split(
    "Ge", run.folder.instrument, EI, TEMPERATURE, material_setup=run.refiner.setup
)
from consumers.reduction import moments as moments_module

for refiner in (run.refiner, split):
    cached = list(moments_module._CACHE)
    refiner.warm_up()
    assert list(moments_module._CACHE) == cached  # the run's moments keep every slot
    before = {n: set(k.signatures) for n, k in kernels.items()}
    assert sum(bool(v) for v in before.values()) >= 4, before  # the inlined ones live in them
    moments = orientation_moments(run.folder, refiner.constants, 10.0, classes=refiner.classes)
    model = refiner.model(moments, at=run.truth)
    _, counts = replica_counts(model, model.theta(run.truth), np.random.default_rng(3))
    fit = refiner.refine(counts, moments, [dict(zip(refiner.names, run.truth, strict=True))])
    assert fit.iterations >= 1
    after = {n: set(k.signatures) for n, k in kernels.items()}
    assert after == before, (refiner.binning, after, before)
print("compiled nothing new")
"""


def test_the_warm_up_compiles_every_kernel_a_fit_then_uses() -> None:
    """``RunRefiner.warm_up`` (the service's, at a run's start) compiles the counts
    model's kernels for the argument types a live fit passes them, on the path and on its
    zone classes: a fit after it compiles nothing new; the warm-up's moments take no
    slot of the moment cache. In a process of its own, where
    nothing has called the kernels before (numba's disk cache may hold them: loading from
    it adds the signatures too)."""
    import subprocess
    import sys

    from tests.paths import REPO

    done = subprocess.run(
        [sys.executable, "-c", _WARM_UP_CHECK],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled nothing new" in done.stdout


def _cluster_mean_energies(
    model: CountsModel, coefficients: np.ndarray, q_cart: np.ndarray, cluster: np.ndarray
) -> np.ndarray:
    """(n, m) exact mode energies (meV) at Cartesian Q ``q_cart`` ((n, 3), 1/A), each
    replaced by the mean over its degenerate cluster ``cluster`` ((n, m) labels)."""
    basis = model.basis
    rlu = q_cart @ np.linalg.inv(basis.crystal.reciprocal_lattice)
    lam = np.linalg.eigvalsh(np.tensordot(coefficients, basis.dynamical_basis(rlu), 1))
    energy = VASP_TO_THZ * THZ_TO_MEV * np.sqrt(np.clip(lam, 0.0, None))
    same = (cluster[:, :, None] == cluster[:, None, :]).astype(float)
    return np.asarray(np.einsum("pmn,pn->pm", same, energy) / same.sum(axis=2))


def test_the_line_curvature_is_the_branches_second_order_energy() -> None:
    """The curvature the model applies across the tube (``W : <delta delta^T>``, from
    second-order perturbation theory on the dynamical matrix's second Q derivatives)
    against the Hessian of the exact energies by central differences (each degenerate
    cluster's mean, which is smooth where its members split linearly)."""
    run = ge_run()
    model = run.refiner.model(ge_moments((10.0,)))
    q, energy, w = model.curvature(run.truth, regularised=False)
    rec = model.basis.crystal.reciprocal_lattice
    pick = np.arange(0, len(q), 7)
    q0 = q[pick] @ rec  # Cartesian, 1/A
    lam = np.linalg.eigvalsh(np.tensordot(run.truth, model.basis.dynamical_basis(q[pick]), 1))
    cluster = CountsModel._clusters(lam)
    h = 2e-3  # 1/A
    base = _cluster_mean_energies(model, run.truth, q0, cluster)
    hess = np.empty((len(pick), 3, 3, energy.shape[1]))
    eye = np.eye(3) * h
    for a in range(3):
        for b in range(3):
            pp = _cluster_mean_energies(model, run.truth, q0 + eye[a] + eye[b], cluster)
            pm = _cluster_mean_energies(model, run.truth, q0 + eye[a] - eye[b], cluster)
            mp = _cluster_mean_energies(model, run.truth, q0 - eye[a] + eye[b], cluster)
            mm = _cluster_mean_energies(model, run.truth, q0 - eye[a] - eye[b], cluster)
            hess[:, a, b] = (pp - pm - mp + mm) / (4 * h * h)
    assert np.allclose(base, energy[pick], rtol=1e-9, atol=1e-9)
    # tolerance: the differences' truncation, (h |q-range|)^2, at the sharpest bends
    got = w[pick]
    scale = np.abs(hess).max(axis=(1, 2))[:, None, None, :] + 1.0  # meV A^2
    off = np.abs(got - 0.5 * hess) / scale
    assert np.median(off) < 2e-5
    assert np.percentile(off, 95) < 1e-3
    # the regularised curvature the model uses differs only where two branches come
    # within the tube's reach of each other
    _, _, damped = model.curvature(run.truth)
    gap = np.min(
        np.where(
            cluster[:, :, None] != cluster[:, None, :],
            np.abs(lam[:, :, None] - lam[:, None, :]),
            np.inf,
        ),
        axis=2,
    )  # (n, m) eigenvalue gap to the nearest other cluster
    apart = gap > 0.02 * lam.max()
    rel = np.abs(damped[pick] - got) / scale
    assert np.median(rel.transpose(0, 3, 1, 2)[apart]) < 2e-3
    # and it is what turns the model's line centres: ~0.1 meV at the tube's offsets
    tube = 0.25 * run.refiner.table.tolerance**2
    shift = tube * np.abs(np.trace(damped, axis1=1, axis2=2))
    assert 0.005 < np.median(shift[energy > 0]) < 0.5


def test_the_curvature_part_of_the_jacobian_matches_finite_differences() -> None:
    """The curvature's own share of each coefficient column (3-6 % of it) against central
    differences of the model with and without it (0.1-0.8 % apart: the differences' own
    error)."""
    run = ge_run()
    moments = ge_moments((10.0, 40.0))
    bent = run.refiner.model(moments)
    flat = run.refiner.counts_model(moments, curvature=False)
    theta = _theta(bent, run.truth)
    theta[-1] = 4e-4  # a Q resolution (the curvature moves the centres by eta^2 tr W)
    assert np.array_equal(flat.bins, bent.bins)
    with_, without = bent.evaluate(theta), flat.evaluate(theta)
    assert with_.jacobian is not None
    assert without.jacobian is not None
    weight = 1.0 / np.sqrt(with_.expected)
    for k in (0, 1, 2, 3, 9, 15, bent.n_params - 1):
        part = _central_difference(bent, theta, k) - _central_difference(flat, theta, k)
        got = with_.jacobian[:, k] - without.jacobian[:, k]
        # the curvature's share: 3-6 % of a coefficient column, a third of q_variance's
        share = np.linalg.norm(part * weight) / np.linalg.norm(
            _central_difference(bent, theta, k) * weight
        )
        assert share > 0.01, (bent.names[k], share)
        off = np.linalg.norm((got - part) * weight) / np.linalg.norm(part * weight)
        assert off < 0.015, (bent.names[k], off)  # without dK/dc: up to 0.028
