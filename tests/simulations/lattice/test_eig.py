"""The compiled kernels of the forward model against plain numpy on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.lattice.eig import eigh_small, eigvalsh_affine, pack_lower, spectra_table


def _family(rng: np.random.Generator, n_free: int = 3, n_q: int = 7, m: int = 6):  # type: ignore[no-untyped-def]
    """Random symmetric matrices F_k(q) (n_free, n_q, m, m) and a constant part (n_q, m, m)."""
    free = rng.normal(size=(n_free, n_q, m, m))
    fixed = rng.normal(size=(n_q, m, m)) + 8.0 * np.eye(m)
    return free + free.swapaxes(-1, -2), fixed + fixed.swapaxes(-1, -2)


def _assembled(c: np.ndarray, free: np.ndarray, fixed: np.ndarray) -> np.ndarray:
    """(B, n_q, m, m): sum_k c_bk F_k(q) + F_fixed(q)."""
    return np.einsum("bk,kqij->bqij", c, free) + fixed


def test_affine_eigenvalues_match_lapack(rng: np.random.Generator) -> None:
    free, fixed = _family(rng)
    c = rng.normal(size=(20, 3))
    lam = eigvalsh_affine(c, pack_lower(free, fixed), 6)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(_assembled(c, free, fixed)), atol=1e-11)


def _one_bin_table(n_e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A table that puts a mode of energy E (meV) wholly in bin floor(E), bins 1 meV wide."""
    step = 0.25
    rows = np.arange(4 * n_e + 8)
    start = np.clip(rows * step, 0, n_e - 1).astype(np.int64)
    profile = np.ones((len(rows), 1))
    profile[rows * step >= n_e] = 0.0
    slope = np.zeros_like(profile)
    return profile, slope, start, step


@pytest.mark.parametrize("stable_only", [False, True])
def test_spectra_table_counts_modes_and_skips_unstable_sets(
    rng: np.random.Generator, stable_only: bool
) -> None:
    """Each mode lands in the bin of its energy; with ``stable_only`` the unstable sets come
    back as zero rows and a lowest eigenvalue below the threshold, the stable ones unchanged."""
    free, fixed = _family(rng, n_q=9)
    n_path, n_e, scale = 6, 40, 3.0  # q-points 6..8 are the "stability mesh"
    c = rng.normal(scale=0.6, size=(40, 3))
    lam = np.linalg.eigvalsh(_assembled(c, free, fixed))  # (B, n_q, m)
    threshold = float(np.median(lam.min(axis=(1, 2))))  # half the sets count as unstable
    out = np.full((len(c), n_path, n_e), np.nan, dtype=np.float32)
    lowest = spectra_table(
        c,
        pack_lower(free, fixed),
        _one_bin_table(n_e),
        scale=scale,
        lam_stable=threshold,
        stable_only=stable_only,
        out=out,
    )
    truly_stable = lam.min(axis=(1, 2)) >= threshold
    assert 0 < truly_stable.sum() < len(c)  # both kinds are exercised
    np.testing.assert_array_equal(lowest >= threshold, truly_stable)
    expected = np.zeros(out.shape)
    energy = np.sqrt(np.clip(lam[:, :n_path], 1e-12, None)) * scale
    for b, q, k in np.ndindex(energy.shape):
        if energy[b, q, k] < n_e:
            expected[b, q, int(energy[b, q, k])] += 1.0
    if stable_only:
        expected[~truly_stable] = 0.0
        np.testing.assert_allclose(lowest[truly_stable], lam.min(axis=(1, 2))[truly_stable])
    else:
        np.testing.assert_allclose(lowest, lam.min(axis=(1, 2)), atol=1e-12)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("m", [3, 6])
def test_jacobi_eigenpairs_match_lapack(rng: np.random.Generator, m: int) -> None:
    """Eigenvalues as LAPACK's; eigenvectors orthonormal and reproducing the matrix (also
    for exactly degenerate matrices, where the basis inside a degenerate set is free)."""
    a = rng.normal(size=(3000, m, m))
    a = a + a.swapaxes(-1, -2)
    a[:5] = np.diag(np.r_[1.0, 1.0, np.arange(2.0, m)])  # degenerate pair
    a[5:10] = 0.0
    for workers in (1, 2):
        w, v = eigh_small(a.reshape(2, 1500, m, m), workers=workers)
        w, v = w.reshape(-1, m), v.reshape(-1, m, m)
        np.testing.assert_allclose(w, np.linalg.eigvalsh(a), rtol=0, atol=1e-12)
        np.testing.assert_allclose(
            np.einsum("bji,bjk->bik", v, v), np.broadcast_to(np.eye(m), a.shape), atol=1e-12
        )
        np.testing.assert_allclose(np.einsum("bij,bj,bkj->bik", v, w, v), a, atol=1e-12)
