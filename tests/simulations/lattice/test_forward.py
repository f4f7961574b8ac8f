"""The torch forward model: correctness, differentiability, stability reporting, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulations.exceptions import GridError, InvalidCoefficientsError
from simulations.fcdb.reference import load_reference, named_fc_set
from simulations.lattice.forward import ForwardModel
from simulations.lattice.grid import make_grid
from simulations.lattice.materials import MaterialSetup
from simulations.lattice.resolution import EnergyResolution, instrument_resolution
from simulations.units import THZ_TO_MEV


@pytest.fixture(scope="module")
def ge_small(ge: MaterialSetup) -> ForwardModel:
    """A small float64 Ge model (30 q x 40 E) for gradcheck and exact checks."""
    grid = make_grid(ge.crystal, path="G-X-U|K-G-L", n_q=30, e_max=60.0, n_e=40)
    ref = load_reference("Ge")
    return ForwardModel(
        ge.basis,
        grid,
        ge.resolution,
        free=ref.kept[:4],
        reference=ref.mean,
        dtype=torch.float64,
        method="exact",
    )


def test_gradcheck_wrt_coefficients(ge_small: ForwardModel) -> None:
    ref = load_reference("Ge")
    c = torch.tensor(ref.mean[ref.kept_index[:4]][None], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: ge_small.spectra(x).intensity, (c,), eps=1e-6, atol=1e-6, rtol=1e-4
    )


def test_table_model_records_exact_gradients(ge: MaterialSetup, ge_small: ForwardModel) -> None:
    """With autograd on, the table model broadens exactly, so its Jacobian is the exact one."""
    ref = load_reference("Ge")
    fm = ForwardModel(
        ge.basis,
        ge_small.grid,
        ge.resolution,
        free=ref.kept[:4],
        reference=ref.mean,
        dtype=torch.float64,
        method="table",
    )
    c = torch.tensor(ref.mean[ref.kept_index[:4]][None], dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda x: fm.spectra(x).intensity, c)
    exact = torch.autograd.functional.jacobian(lambda x: ge_small.spectra(x).intensity, c)
    torch.testing.assert_close(jac, exact)


def test_table_broadening_matches_exact(ge: MaterialSetup) -> None:
    c = named_fc_set("Ge", "raman", ge)[None]
    exact = ge.forward_model(dtype=torch.float64, method="exact").spectra(c).intensity
    table = ge.forward_model(dtype=torch.float64, method="table").spectra(c).intensity
    assert float((exact - table).abs().max() / exact.max()) < 2e-4
    fast32 = ge.forward_model().spectra(c).intensity.double()
    assert float((exact - fast32).abs().max() / exact.max()) < 2e-3


def test_each_branch_has_unit_area(ge: MaterialSetup) -> None:
    """With a narrow constant resolution every branch inside the window integrates to 1."""
    c = named_fc_set("Ge", "raman", ge)
    fm = ForwardModel(ge.basis, ge.grid, EnergyResolution.constant(0.5), dtype=torch.float64)
    intensity = fm.spectra(c[None]).intensity[0].numpy()
    energies = fm.frequencies(c[None])[0].numpy() * THZ_TO_MEV
    inside = ((energies > 3.0) & (energies < 65.0)).sum(axis=1)
    columns = inside == 6  # q-points whose six branches are all well inside the window
    np.testing.assert_allclose(intensity.sum(axis=1)[columns], 6.0, rtol=1e-6)


def test_peak_sits_at_the_branch_energy(ge: MaterialSetup) -> None:
    c = named_fc_set("Ge", "raman", ge)
    fm = ge.forward_model(dtype=torch.float64, method="exact")
    intensity = fm.spectra(c[None]).intensity[0].numpy()
    # At Gamma the top of the spectrum is the triply degenerate optical mode at 9.0 THz.
    top = ge.grid.energy_centres[np.argmax(intensity[0, 20:]) + 20]
    assert top == pytest.approx(9.0 * THZ_TO_MEV, abs=0.7)  # within one 0.7 meV bin


def test_unstable_sets_are_reported_per_sample(ge: MaterialSetup) -> None:
    ref = load_reference("Ge")
    fm = ge.forward_model(free=ref.kept, reference=ref.mean)
    good = ref.mean[ref.kept_index]
    bad = -good  # all springs reversed: imaginary everywhere
    result = fm.spectra(np.vstack([good, bad]))
    assert result.stable.tolist() == [True, False]
    assert float(result.min_frequency_thz[1]) < -1.0


def test_non_finite_and_misshaped_input(ge: MaterialSetup) -> None:
    ref = load_reference("Ge")
    fm = ge.forward_model(free=ref.kept, reference=ref.mean)
    c = ref.mean[ref.kept_index][None].copy()
    c[0, 2] = np.inf
    with pytest.raises(InvalidCoefficientsError, match=f"non-finite.*{ref.kept[2]}"):
        fm.spectra(c)
    with pytest.raises(InvalidCoefficientsError, match=r"expected a \(batch, 8\)"):
        fm.spectra(np.zeros((2, 5)))
    with pytest.raises(InvalidCoefficientsError, match="reference="):
        ForwardModel(ge.basis, ge.grid, ge.resolution, free=ref.kept)


def test_spectra_fast_equals_spectra(ge: MaterialSetup, rng: np.random.Generator) -> None:
    ref = load_reference("Ge")
    fm = ge.forward_model(free=ref.kept, reference=ref.mean)
    c = ref.domain[:, 0] + (ref.domain[:, 1] - ref.domain[:, 0]) * rng.random((300, 8))
    fast, stable, _ = fm.spectra_fast(c, chunk=64, workers=2)
    slow = fm.spectra(c)
    np.testing.assert_allclose(fast, slow.intensity.numpy(), atol=1e-6)
    assert stable.tolist() == slow.stable.tolist()


def test_spectra_fast_stable_only_into_a_given_array(
    ge: MaterialSetup, rng: np.random.Generator
) -> None:
    """``stable_only`` leaves the unstable rows zero and the stable ones as in full."""
    ref = load_reference("Ge")
    fm = ge.forward_model(free=ref.kept, reference=ref.mean)
    c = ref.domain[:, 0] + (ref.domain[:, 1] - ref.domain[:, 0]) * rng.random((200, 8))
    full, stable, min_freq = fm.spectra_fast(c, workers=1)
    buffer = np.full((len(c), *ge.grid.shape), np.nan, dtype=np.float32)
    out, stable_2, min_freq_2 = fm.spectra_fast(c, chunk=64, stable_only=True, out=buffer)
    assert out is buffer
    assert 0 < stable.sum() < len(c)
    assert stable_2.tolist() == stable.tolist()
    np.testing.assert_allclose(out[stable], full[stable], atol=1e-6)
    assert not out[~stable].any()
    np.testing.assert_allclose(min_freq_2[stable], min_freq[stable], atol=1e-9)
    assert np.all(min_freq_2[~stable] < -fm.imaginary_tol)
    float64 = np.empty((len(c), *ge.grid.shape))
    with pytest.raises(ValueError, match="float32"):
        fm.spectra_fast(c, out=float64)  # type: ignore[arg-type]


@pytest.mark.parametrize("n_e", [60, 4])
def test_table_broadening_at_the_top_of_a_short_grid(ge: MaterialSetup, n_e: int) -> None:
    """Modes near the grid's top edge (table windows moved inside the grid), and a grid
    narrower than a window, broaden as the exact model does."""
    grid = make_grid(ge.crystal, path="G-X-U|K-G-L", n_q=30, e_max=40.0, n_e=n_e)
    c = named_fc_set("Ge", "raman", ge)[None]
    models = {
        method: ForwardModel(ge.basis, grid, ge.resolution, dtype=torch.float64, method=method)
        for method in ("exact", "table")
    }
    exact = models["exact"].spectra(c).intensity
    table = models["table"].spectra(c).intensity
    assert float((exact - table).abs().max() / exact.max()) < 2e-4


def test_resolution_from_resins_matches_the_documented_arcs_values() -> None:
    # DESIGN.md: ARCS, Ei = 80 meV, 600 Hz: sigma 1.30 meV elastic, 0.71 meV at 60 meV.
    res = instrument_resolution("ARCS", 80.0, 600.0)
    np.testing.assert_allclose(res.sigma(np.array([0.0, 60.0])), [1.30, 0.71], atol=0.02)
    with pytest.raises(GridError, match="too small"):
        instrument_resolution("ARCS", 60.0, 600.0, e_max=70.0)
    with pytest.raises(GridError, match="positive"):
        instrument_resolution("ARCS", -5.0)


def test_compiled_small_eigensolver_matches_lapack(rng: np.random.Generator) -> None:
    from simulations.lattice.eig import eigvalsh_small

    a = rng.normal(size=(500, 6, 6))
    a = a + a.transpose(0, 2, 1)
    degenerate = np.stack([np.zeros((6, 6)), np.eye(6), np.diag([1.0, 1, 1, 2, 2, 2])])
    mats = np.concatenate([a, degenerate])
    np.testing.assert_allclose(eigvalsh_small(mats), np.linalg.eigvalsh(mats), atol=1e-12)


def test_centrosymmetric_crystal_is_made_real_with_unchanged_frequencies(
    ge: MaterialSetup,
) -> None:
    """Ge (inversion centre between the two atoms): the unitary transform makes D(q) real."""
    fm = ge.forward_model(dtype=torch.float64)
    assert fm.is_real
    c = named_fc_set("Ge", "raman", ge)
    q = ge.grid.qpath.qpoints
    d = np.einsum("k,kqij->qij", c, ge.basis.dynamical_basis(q))  # complex, untransformed
    np.testing.assert_allclose(
        fm.eigenvalues(c[None])[0, : len(q)].numpy(), np.linalg.eigvalsh(d), atol=1e-10
    )


@pytest.mark.parametrize("material", ["Ge", "Nb"])
def test_jacobian_matches_central_differences(material: str) -> None:
    """ForwardModel.jacobian (perturbation theory x forward-mode bin profiles) against
    central differences of spectra(); Nb's dynamical matrices are complex."""
    from simulations.lattice.materials import setup

    ms = setup(material)
    ref = load_reference(material)
    fm = ms.forward_model(free=ref.kept, reference=ref.mean, dtype=torch.float64, method="exact")
    theta = ref.mean[[ref.names.index(n) for n in ref.kept]]
    intensity, jac = fm.jacobian(theta)
    np.testing.assert_allclose(intensity, fm.spectra(theta[None]).intensity[0].numpy(), atol=1e-12)
    width = ref.domain[:, 1] - ref.domain[:, 0]
    for k in range(len(theta)):
        h = 1e-4 * width[k]
        up, down = theta.copy(), theta.copy()
        up[k] += h
        down[k] -= h
        fd = (fm.spectra(up[None]).intensity - fm.spectra(down[None]).intensity)[0].numpy()
        fd /= 2 * h
        scale = np.abs(fd).max()
        assert scale > 0.1  # every kept FC moves the spectrum
        assert np.abs(jac[..., k] - fd).max() < 1e-4 * scale
    with pytest.raises(InvalidCoefficientsError, match="finite"):
        fm.jacobian(np.full(len(theta), np.nan))
