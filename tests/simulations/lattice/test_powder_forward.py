"""The batched powder forward model against the per-set reference (``powder_spectrum`` of a
:class:`CoherentSQE`), and its own consistency: batches, scaling, the f-sum rule, stability."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from simulations.exceptions import InvalidCoefficientsError
from simulations.fcdb.reference import load_reference
from simulations.lattice.force_constants import build_fc_basis
from simulations.lattice.materials import MaterialSetup, setup
from simulations.lattice.powder import powder_spectrum
from simulations.lattice.powder_forward import PowderForwardModel
from simulations.lattice.sqe import CoherentSQE, scattering_length
from simulations.units import FM2_TO_MBARN, HBAR2_OVER_2AMU

#: The 2-shell Al basis: 1NN xx, zz, xy and 2NN xx, yy (5 coefficients).
AL_NAMES = ("1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy")
Q = np.array([1.5, 3.0, 5.5])  # 1/Angstrom
CENTRES = np.arange(1.0, 46.0)  # meV
EDGES = np.arange(0.5, 46.0)  # bins 1 meV wide around CENTRES


@pytest.fixture(scope="module")
def al2() -> MaterialSetup:
    return setup("Al", shells=2)


@pytest.fixture(scope="module")
def al_ref(al2: MaterialSetup) -> np.ndarray:
    """Reference Al coefficients for the 2-shell basis: the shipped reference is for the
    default 4-shell basis, whose first five coefficients are the same bonds."""
    ref = load_reference("Al")
    assert ref.names[:5] == al2.basis.names == AL_NAMES
    return np.array(ref.mean[:5])


def _reference(ms: MaterialSetup, c: np.ndarray, temperature: float) -> np.ndarray:
    model = CoherentSQE(ms.basis, c, temperature=temperature, resolution=ms.resolution, dw_mesh=8)
    return powder_spectrum(model, Q, CENTRES, directions=64, seed=0)


def _assert_matches(out: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    """Relative agreement wherever the reference is above 1e-3 of its maximum."""
    mask = ref > 1e-3 * ref.max()
    assert mask.sum() > 0.5 * ref.size
    np.testing.assert_allclose(out[mask], ref[mask], rtol=rtol)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-3 * rtol * ref.max())


def test_al_matches_powder_spectrum(al2: MaterialSetup, al_ref: np.ndarray) -> None:
    """Same directions and seed: the same S(|Q|, E) (found 4e-14 relative)."""
    ref = _reference(al2, al_ref, 300.0)
    for solver in ("jacobi", "torch"):
        pf = PowderForwardModel(
            al2.basis, Q, EDGES, al2.resolution, 300.0, broadening="centre", solver=solver
        )
        _assert_matches(pf.spectra(al_ref[None]).intensity[0], ref, rtol=1e-6)


def test_ge_matches_powder_spectrum(ge: MaterialSetup) -> None:
    """Two atoms (phase factors, realified matrices): found 4e-14 relative."""
    c = load_reference("Ge").mean
    pf = PowderForwardModel(ge.basis, Q, EDGES, ge.resolution, 300.0, broadening="centre")
    assert pf.is_real
    assert pf.solver == "jacobi"
    _assert_matches(pf.spectra(c[None]).intensity[0], _reference(ge, c, 300.0), rtol=1e-6)


def test_no_inversion_centre_matches_powder_spectrum(ge: MaterialSetup) -> None:
    """Zincblende (Ge's cell with Si on the second site, F-43m): complex dynamical matrices
    and torch's complex eigensolver; found 7e-14 relative."""
    crystal = dataclasses.replace(
        ge.crystal, name="GeSi", species=("Ge", "Si"), masses=np.array([72.63, 28.085])
    )
    basis = build_fc_basis(crystal, shells=2)
    mean = dict(zip(load_reference("Ge").names, load_reference("Ge").mean, strict=True))
    c = np.array([mean[n.replace("NNa", "NN").replace("NNb", "NN")] for n in basis.names])
    pf = PowderForwardModel(basis, Q, EDGES, ge.resolution, 300.0, broadening="centre")
    assert not pf.is_real
    model = CoherentSQE(basis, c, temperature=300.0, resolution=ge.resolution, dw_mesh=8)
    ref = powder_spectrum(model, Q, CENTRES, directions=64, seed=0)
    _assert_matches(pf.spectra(c[None]).intensity[0], ref, rtol=1e-6)


def test_debye_waller_matches_coherent_sqe(ge: MaterialSetup) -> None:
    c = load_reference("Ge").mean
    pf = PowderForwardModel(ge.basis, Q, EDGES, ge.resolution, 300.0, directions=4)
    model = CoherentSQE(ge.basis, c, temperature=300.0, resolution=ge.resolution, dw_mesh=8)
    np.testing.assert_allclose(
        pf.debye_waller(c[None])[0].numpy(), model.debye_waller_tensor, rtol=1e-9, atol=1e-15
    )


def test_bins_average_the_point_spectrum(al2: MaterialSetup, al_ref: np.ndarray) -> None:
    """A 1 meV bin holds the mean of S over it: the mean of 20 points 0.05 meV apart
    (midpoint rule, error ~ h^2/24 S'' ~ 1e-3 of the peak with sigma >= 0.4 meV)."""
    binned = PowderForwardModel(al2.basis, Q, EDGES, al2.resolution, 300.0, directions=16)
    fine_edges = np.linspace(EDGES[0], EDGES[-1], 20 * len(CENTRES) + 1)
    points = PowderForwardModel(
        al2.basis, Q, fine_edges, al2.resolution, 300.0, directions=16, broadening="centre"
    )
    s_bin = binned.spectra(al_ref[None]).intensity[0]
    s_pts = points.spectra(al_ref[None]).intensity[0].reshape(len(Q), len(CENTRES), 20)
    np.testing.assert_allclose(s_bin, s_pts.mean(axis=-1), rtol=0, atol=2e-3 * s_bin.max())


def test_float32_matrices_agree(ge: MaterialSetup) -> None:
    """float32 dynamical matrices and torch's solver: within 1e-5 of the peak (found 1.3e-6)."""
    c = load_reference("Ge").mean[None]
    f64 = PowderForwardModel(ge.basis, Q, EDGES, ge.resolution, 300.0, directions=16)
    f32 = PowderForwardModel(
        ge.basis, Q, EDGES, ge.resolution, 300.0, dtype=torch.float32, directions=16
    )
    assert f32.solver == "torch"
    s64, s32 = f64.spectra(c).intensity, f32.spectra(c).intensity
    np.testing.assert_allclose(s32, s64, rtol=0, atol=1e-5 * s64.max())


def test_batch_equals_single_sets(al2: MaterialSetup, al_ref: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    batch = al_ref * rng.uniform(0.8, 1.2, size=(5, 5))
    whole = PowderForwardModel(al2.basis, Q, EDGES, al2.resolution, 300.0, directions=16)
    one_by_one = PowderForwardModel(
        al2.basis, Q, EDGES, al2.resolution, 300.0, directions=16, max_chunk_bytes=1
    )
    assert one_by_one.chunk_size == 1
    together = whole.spectra(batch).intensity
    for k in range(len(batch)):
        alone = whole.spectra(batch[k : k + 1]).intensity[0]
        np.testing.assert_allclose(together[k], alone, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        one_by_one.spectra(torch.from_numpy(batch)).intensity, together, rtol=1e-12, atol=1e-14
    )


def test_scaling_force_constants_scales_energies(al2: MaterialSetup, al_ref: np.ndarray) -> None:
    """All FCs x 1.21 -> every mode energy x 1.1; at 5 K (no gain side) the mean energy of
    S at each |Q| moves by 10 % (the 1/E and Debye-Waller factors are common to all modes
    at one Q). |Q| away from Bragg rings, so no mode sits near E = 0."""
    q = np.array([1.5, 3.7, 4.8])
    edges = np.linspace(0.0, 50.0, 201)
    pf = PowderForwardModel(al2.basis, q, edges, al2.resolution, 5.0, directions=32)
    s = pf.spectra(np.stack([al_ref, 1.21 * al_ref])).intensity
    mean_e = (s * pf.energy_centres).sum(-1) / s.sum(-1)  # (2, n_Q)
    np.testing.assert_allclose(mean_e[1] / mean_e[0], 1.1, rtol=1e-6)  # found 5e-9


def test_first_moment_sum_rule(al2: MaterialSetup, al_ref: np.ndarray) -> None:
    """f-sum rule of a Bravais lattice: int E S(Q, E) dE over loss and gain is
    10 hbar^2 Q^2 / (2 M) b^2 exp(-2 Q.B.Q) mbarn meV, whatever the force constants."""
    edges = np.linspace(-48.0, 48.0, 481)
    pf = PowderForwardModel(al2.basis, Q, edges, al2.resolution, 300.0, directions=16)
    for c in (al_ref, 0.7 * al_ref):
        s = pf.spectra(c[None]).intensity[0]
        moment = (s * pf.energy_centres * np.diff(edges)).sum(-1)
        b_iso = pf.debye_waller(c[None])[0, 0, 0, 0].item()
        mass = al2.crystal.masses[0]
        expected = (
            FM2_TO_MBARN
            * HBAR2_OVER_2AMU
            * Q**2
            / mass
            * scattering_length("Al") ** 2
            * np.exp(-2 * b_iso * Q**2)
        )
        np.testing.assert_allclose(moment, expected, rtol=1e-9)  # found 4e-16


def test_unstable_sets_are_flagged(al2: MaterialSetup, al_ref: np.ndarray) -> None:
    """1NN_xx < 0 is the stable sign here (phonopy's: a stretched spring's longitudinal
    component is negative); a positive one makes imaginary modes."""
    flipped = al_ref.copy()
    flipped[al2.basis.index("1NN_xx")] *= -1
    pf = PowderForwardModel(al2.basis, Q, EDGES, al2.resolution, 300.0, directions=8)
    res = pf.spectra(np.stack([al_ref, flipped, -al_ref]))
    np.testing.assert_array_equal(res.stable, [True, False, False])
    assert res.min_frequency_thz[0] > -pf.imaginary_tol
    assert np.all(res.min_frequency_thz[1:] < -0.5)
    intensity, stable, _ = res.tensors()
    assert intensity.shape == (3, len(Q), len(CENTRES))
    assert stable.dtype == torch.bool


def test_free_subset_and_bad_input(al2: MaterialSetup, al_ref: np.ndarray) -> None:
    with pytest.raises(InvalidCoefficientsError, match="reference="):
        PowderForwardModel(al2.basis, Q, EDGES, al2.resolution, 300.0, free=["1NN_xx"])
    pf = PowderForwardModel(
        al2.basis,
        Q,
        EDGES,
        al2.resolution,
        300.0,
        directions=8,
        free=["1NN_xx", "2NN_xx"],
        reference=al_ref,
    )
    full = PowderForwardModel(al2.basis, Q, EDGES, al2.resolution, 300.0, directions=8)
    sub = np.array([[al_ref[0], al_ref[3]]])
    np.testing.assert_allclose(
        pf.spectra(sub).intensity, full.spectra(al_ref[None]).intensity, rtol=1e-10
    )
    with pytest.raises(InvalidCoefficientsError, match="batch, 2"):
        pf.spectra(al_ref[None])
    with pytest.raises(InvalidCoefficientsError, match="non-finite"):
        pf.spectra(np.array([[np.nan, 0.1]]))


@pytest.mark.parametrize("material", ["Al", "Ge"])
def test_shell_average_matches_powder_shells(material: str) -> None:
    """The shell average (phonons at the irreducible q, carried to every q + G by the
    position phases) equals the per-set reference powder_shells, which solves at every
    Q; Ge (two atoms) tests the phases (found ~1e-14 relative)."""
    ms = setup(material, shells=2)
    c = np.array(load_reference(material).mean[: ms.basis.n_coefficients])
    q = np.arange(0.5, 6.0, 0.1)
    pf = PowderForwardModel(
        ms.basis, q, EDGES, ms.resolution, 300.0, average="shells", mesh=12,
        dw_mesh=8, broadening="centre",
    )  # fmt: skip
    out = pf.spectra(c[None]).intensity[0]
    model = CoherentSQE(ms.basis, c, temperature=300.0, resolution=ms.resolution, dw_mesh=8)
    from simulations.lattice.powder import powder_shells

    ref = powder_shells(model, q, CENTRES, mesh=12)
    used = ref > 1e-3 * ref.max()
    assert used.sum() > 300
    np.testing.assert_allclose(out[used], ref[used], rtol=1e-9)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12 * ref.max())
    with pytest.raises(ValueError, match="uniformly spaced"):
        PowderForwardModel(ms.basis, Q, EDGES, ms.resolution, 300.0, average="shells")
