"""The fast forward model I(q, E) of the seed paper, batched in torch and differentiable.

For a batch of symmetry-reduced force-constant sets ``c`` (eV/A^2):

1. dynamical matrices on the q-path, ``D(q) = D_fixed(q) + sum_k c_k D_k(q)`` (the basis
   ``D_k`` is precomputed once, so building a batch is one matrix product);
2. eigenvalues ``lambda`` (no eigenvectors), frequencies ``nu = sqrt(lambda) * VASP_TO_THZ``
   (15.6333 THz) and energies ``E = THZ_TO_MEV * nu`` (4.135667 meV/THz), the factors of
   :mod:`simulations.units`;
3. every branch broadened by a unit-area Gaussian whose width is the instrument's energy
   resolution at the branch's energy, integrated over each energy bin; no structure factor,
   no Debye-Waller or Bose factor, no polarisation (all branches weigh the same).

So ``I(q, E)`` in each q column integrates to the number of branches that fall in the
energy window. Two broadening methods give the same numbers: ``"exact"`` (error functions at
the bin edges) and ``"table"`` (default, much faster: the bin profile of a mode is
interpolated linearly from a precomputed table over mode energy, max. deviation from exact
~1e-4 of the peak). The table is used only where no gradient is recorded; with autograd
the exact broadening runs, so Jacobians are exact. Without autograd, real dynamical matrices
go through compiled kernels (:mod:`simulations.lattice.eig`): building each matrix from the
coefficients, its eigenvalues and the table broadening in one float64 pass per set.

Dynamical stability is checked on the path and on an irreducible Gamma-centred mesh; a set
with a frequency below ``-imaginary_tol`` THz anywhere is reported unstable.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import spglib
import torch
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from simulations.exceptions import InvalidCoefficientsError
from simulations.lattice.force_constants import FCBasis
from simulations.lattice.grid import Grid
from simulations.lattice.resolution import EnergyResolution
from simulations.units import THZ_TO_MEV, VASP_TO_THZ

__all__ = ["ForwardModel", "SpectraResult", "usable_cores"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class SpectraResult:
    """Output of :meth:`ForwardModel.spectra`.

    Attributes
    ----------
    intensity
        (B, n_q, n_E) tensor, arbitrary units (unit area per branch).
    stable
        (B,) bool tensor: no frequency below ``-imaginary_tol`` THz.
    min_frequency_thz
        (B,) tensor: the lowest signed frequency (negative = imaginary), THz.
    """

    intensity: torch.Tensor
    stable: torch.Tensor
    min_frequency_thz: torch.Tensor


def _irreducible_mesh(basis: FCBasis, mesh: int) -> NDArray[np.float64]:
    """Irreducible q-points (r.l.u.) of a Gamma-centred mesh x mesh x mesh."""
    if mesh <= 0:
        return np.zeros((0, 3))
    mapping, grid = spglib.get_ir_reciprocal_mesh(
        [mesh] * 3, basis.crystal.spglib_cell(), is_shift=[0, 0, 0]
    )
    return np.asarray(grid[np.unique(mapping)], dtype=float) / mesh


def _realifying_transform(basis: FCBasis) -> NDArray[np.complex128] | None:
    """Unitary T with T^H D(q) T real for every q, for crystals with an inversion centre.

    Inversion maps atom i to P(i) and r to -r, so conj(D(q)) = D(-q) = Pi D(q) Pi^T with Pi
    the atom permutation (x identity on Cartesian indices). Pi is a symmetric involution;
    in its eigenbasis U (eigenvalues s = +-1) conj(U^T D U) = S (U^T D U) S, and multiplying
    the s = -1 columns by i makes the matrix real. Returns None without inversion symmetry.
    """
    rotations, translations = basis.crystal.symmetry_operations()
    crystal = basis.crystal
    for w, t in zip(rotations, translations, strict=True):
        if not np.array_equal(w, -np.eye(3, dtype=w.dtype)):
            continue
        image = -crystal.positions + t
        perm = np.empty(crystal.n_atoms, dtype=int)
        for i in range(crystal.n_atoms):
            diff = image[i] - crystal.positions
            dist = np.linalg.norm((diff - np.round(diff)) @ crystal.lattice, axis=1)
            perm[i] = int(np.argmin(dist))
        m = 3 * crystal.n_atoms
        pi = np.zeros((m, m))
        for i, j in enumerate(perm):
            pi[3 * j : 3 * j + 3, 3 * i : 3 * i + 3] = np.eye(3)
        signs, u = np.linalg.eigh(pi)
        return u * np.where(signs < 0, 1j, 1.0)[None, :]
    return None


class ForwardModel:
    """I(q, E) on a grid for batches of force-constant coefficients.

    Parameters
    ----------
    basis
        Symmetry-reduced force-constant basis of the crystal.
    grid
        The (q, E) grid.
    resolution
        Energy resolution sigma(E).
    free
        Names of the coefficients that the inputs give, in order (default: all of them).
    reference
        (n_coeff,) full coefficient vector; the coefficients not in ``free`` are held at
        these values. Required when ``free`` is a subset.
    stability_mesh
        Size of the Gamma-centred mesh (irreducible points only) checked for imaginary
        modes in addition to the path; 0 checks the path only.
    imaginary_tol
        THz; a frequency below ``-imaginary_tol`` marks a set unstable.
    dtype
        ``torch.float32`` (fast) or ``torch.float64`` (validation, gradcheck).
    method
        ``"table"`` (fast) or ``"exact"`` broadening.
    """

    def __init__(
        self,
        basis: FCBasis,
        grid: Grid,
        resolution: EnergyResolution,
        *,
        free: Sequence[str] | None = None,
        reference: NDArray[np.float64] | None = None,
        stability_mesh: int = 4,
        imaginary_tol: float = 0.05,
        dtype: torch.dtype = torch.float32,
        method: str = "table",
    ) -> None:
        if method not in ("table", "exact"):
            raise ValueError(f"method must be 'table' or 'exact', got {method!r}")
        if grid.energy_edges[-1] > resolution.e_max + 1e-9:
            logger.warning(
                "grid reaches %.1f meV but the resolution fit only to %.1f meV",
                grid.energy_edges[-1],
                resolution.e_max,
            )
        self.basis = basis
        self.grid = grid
        self.resolution = resolution
        self.method = method
        self.dtype = dtype
        self.imaginary_tol = float(imaginary_tol)
        self.free = tuple(free) if free is not None else basis.names
        free_idx = [basis.index(n) for n in self.free]
        if len(set(free_idx)) != len(free_idx):
            raise InvalidCoefficientsError(f"duplicate names in free coefficients {self.free}")
        if reference is None:
            if len(free_idx) != basis.n_coefficients:
                raise InvalidCoefficientsError(
                    "reference= (values of the fixed coefficients) is required when only "
                    "some coefficients are free"
                )
            reference = np.zeros(basis.n_coefficients)
        self.reference = basis.check_coefficients(reference)
        fixed_idx = [k for k in range(basis.n_coefficients) if k not in free_idx]

        self.mesh_qpoints = _irreducible_mesh(basis, stability_mesh)
        q_all = np.vstack([grid.qpath.qpoints, self.mesh_qpoints])
        dyn = basis.dynamical_basis(q_all)  # (n_coeff, n_q_all, m, m)
        if np.abs(dyn.imag).max(initial=0.0) >= 1e-12:
            transform = _realifying_transform(basis)
            if transform is not None:
                dyn = np.einsum("ai,kqab,bj->kqij", transform.conj(), dyn, transform)
        # Same eigenvalues; real symmetric matrices are much cheaper to diagonalise.
        self.is_real = bool(np.abs(dyn.imag).max(initial=0.0) < 1e-10)
        if self.is_real:
            dyn_t = torch.from_numpy(np.ascontiguousarray(dyn.real)).to(dtype)
        else:
            cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
            dyn_t = torch.from_numpy(dyn).to(cdtype)
        self._n_q_all, self._m = q_all.shape[0], dyn.shape[-1]
        flat = dyn_t.reshape(basis.n_coefficients, -1)
        self._d_free = flat[free_idx].contiguous()  # (n_free, n_q_all*m*m)
        ref_t = torch.from_numpy(self.reference[fixed_idx]).to(flat.dtype)
        self._d_fixed = (
            ref_t @ flat[fixed_idx] if fixed_idx else torch.zeros_like(flat[0])
        ).contiguous()
        if self.is_real:  # float64 lower triangles for the compiled no-gradient path
            from simulations.lattice.eig import pack_lower

            dyn_real = dyn.real
            self._packed = pack_lower(
                dyn_real[free_idx],
                np.einsum("k,kqij->qij", self.reference[fixed_idx], dyn_real[fixed_idx]),
            )
        self._edges = torch.from_numpy(grid.energy_edges).to(dtype)
        self._scale = VASP_TO_THZ * THZ_TO_MEV  # sqrt(eV/A^2/amu) -> meV
        # A set is stable when its lowest eigenvalue is at least this (eV/A^2/amu).
        self._lam_stable = -((self.imaginary_tol / VASP_TO_THZ) ** 2)
        self._poly = torch.tensor(resolution.coefficients, dtype=dtype)
        if method == "table":
            self._build_table()

    # ------------------------------------------------------------------ properties
    @property
    def n_free(self) -> int:
        """Number of coefficients the inputs give."""
        return len(self.free)

    @property
    def n_branches(self) -> int:
        """Phonon branches (3 x atoms in the primitive cell)."""
        return self._m

    # ------------------------------------------------------------------ core
    def _as_tensor(self, coefficients: NDArray[np.float64] | torch.Tensor) -> torch.Tensor:
        return self._validated(coefficients).to(self.dtype)

    def _validated(self, coefficients: NDArray[np.float64] | torch.Tensor) -> torch.Tensor:
        """The coefficients as a tensor in their own dtype, checked: (batch, n_free), finite."""
        if isinstance(coefficients, torch.Tensor):
            c = coefficients
        else:
            arr = np.asarray(coefficients, dtype=float)
            c = torch.from_numpy(arr)
        if c.shape[-1:] != (self.n_free,) or c.ndim != 2:
            raise InvalidCoefficientsError(
                f"expected a (batch, {self.n_free}) array of coefficients "
                f"({', '.join(self.free)}), got shape {tuple(c.shape)}"
            )
        if not bool(torch.isfinite(c).all()):
            bad = sorted({self.free[int(k)] for k in torch.nonzero(~torch.isfinite(c))[:, 1]})
            raise InvalidCoefficientsError(
                f"non-finite force-constant coefficients (NaN or inf) in {', '.join(bad)}"
            )
        return c

    def _compiled(self, c: torch.Tensor) -> bool:
        """Whether ``c`` goes to the compiled kernels: real matrices and no gradient wanted."""
        return self.is_real and not (c.requires_grad and torch.is_grad_enabled())

    def eigenvalues(self, coefficients: NDArray[np.float64] | torch.Tensor) -> torch.Tensor:
        """Eigenvalues of D(q), (B, n_q_path + n_q_mesh, n_branches), eV/A^2/amu, ascending.

        Without autograd, real matrices go to a compiled small-matrix solver
        (:func:`simulations.lattice.eig.eigvalsh_affine`, float64 throughout); with
        autograd, to ``torch.linalg.eigvalsh``.
        """
        c = self._validated(coefficients)
        if self._compiled(c):
            from simulations.lattice.eig import eigvalsh_affine

            lam = eigvalsh_affine(c.detach().double().numpy(), self._packed, self._m)
            return torch.from_numpy(lam).to(self.dtype)
        d = c.to(self.dtype).to(self._d_free.dtype) @ self._d_free + self._d_fixed
        d = d.reshape(c.shape[0], self._n_q_all, self._m, self._m)
        return torch.linalg.eigvalsh(d)

    def frequencies(self, coefficients: NDArray[np.float64] | torch.Tensor) -> torch.Tensor:
        """Signed frequencies on the path, (B, n_q, n_branches), THz (negative = imaginary)."""
        lam = self.eigenvalues(coefficients)[:, : self.grid.n_q]
        return torch.sign(lam) * torch.sqrt(lam.abs()) * VASP_TO_THZ

    def spectra(self, coefficients: NDArray[np.float64] | torch.Tensor) -> SpectraResult:
        """I(q, E) for a batch of coefficient sets, shape (B, n_free) -> (B, n_q, n_E).

        Without autograd, real matrices and table broadening run in one compiled pass
        (:func:`simulations.lattice.eig.spectra_table`), as :meth:`spectra_fast`.
        """
        c = self._validated(coefficients)
        if self.method == "table" and self._compiled(c):
            out = np.empty((c.shape[0], *self.grid.shape), dtype=self._np_dtype)
            lowest = self._spectra_compiled(c.detach().double().numpy(), out, stable_only=False)
            return SpectraResult(
                intensity=torch.from_numpy(out),
                stable=torch.from_numpy(lowest >= self._lam_stable),
                min_frequency_thz=torch.from_numpy(_signed_frequency(lowest)).to(self.dtype),
            )
        lam = self.eigenvalues(c)
        min_lam = lam[..., 0].amin(dim=1)
        min_freq = torch.sign(min_lam) * torch.sqrt(min_lam.abs()) * VASP_TO_THZ
        stable = min_freq >= -self.imaginary_tol
        path = lam[:, : self.grid.n_q]
        energy = torch.sqrt(path.clamp(min=1e-12)) * self._scale  # (B, n_q, m) meV
        # The table's derivative is only first-order accurate in its step: whenever a
        # gradient is being recorded, broaden exactly so that Jacobians are exact.
        if self.method == "exact" or energy.requires_grad:
            intensity = self._broaden_exact(energy)
        else:
            intensity = self._broaden_table(energy)
        return SpectraResult(intensity=intensity, stable=stable, min_frequency_thz=min_freq)

    def spectra_fast(
        self,
        coefficients: NDArray[np.float64],
        *,
        chunk: int = 256,
        workers: int | None = None,
        stable_only: bool = False,
        out: NDArray[np.float32] | None = None,
    ) -> tuple[NDArray[np.float32], NDArray[np.bool_], NDArray[np.float64]]:
        """No-gradient batched evaluation over threads, for training-set generation.

        Parameters
        ----------
        coefficients
            (B, n_free) eV/A^2.
        chunk
            Sets per task handed to a thread.
        workers
            Threads (default: the CPU cores this process may use); 1 runs in the caller.
        stable_only
            Skip the broadening (and, where the stability mesh already shows it, the path
            eigenvalues) of unstable sets: their rows of the intensity are zero and their
            ``min_freq`` is the lowest found before they were skipped (below the tolerance,
            so the verdict stands). Real dynamical matrices with table broadening only;
            otherwise every set is evaluated in full.
        out
            (B, n_q, n_E) float32 array to write the intensity into (default: a new one).

        Returns
        -------
        ``(intensity (B, n_q, n_E) float32, stable (B,) bool, min_freq (B,) THz)``.
        """
        c = np.ascontiguousarray(coefficients, dtype=np.float64)
        self._validated(c)  # shape and finiteness once, up front
        shape = (len(c), *self.grid.shape)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise ValueError(f"out must be a {shape} float32 array, got {out.shape} {out.dtype}")
        stable = np.empty(len(c), dtype=bool)
        min_freq = np.empty(len(c))
        compiled = self.is_real and self.method == "table"

        def work(start: int) -> None:
            rows = slice(start, start + chunk)
            if compiled:
                min_lam = self._spectra_compiled(c[rows], out[rows], stable_only)
                stable[rows] = min_lam >= self._lam_stable
                min_freq[rows] = _signed_frequency(min_lam)
                return
            with torch.no_grad():
                res = self.spectra(torch.from_numpy(c[rows]))
            out[rows] = res.intensity.to(torch.float32).numpy()
            stable[rows] = res.stable.numpy()
            min_freq[rows] = res.min_frequency_thz.double().numpy()

        n_workers = usable_cores() if workers is None else workers
        starts = range(0, len(c), chunk)
        # One BLAS thread per worker: the workers already use the cores.
        with threadpool_limits(limits=1 if n_workers > 1 and not compiled else None):
            self._run_chunks(work, starts, n_workers, len(c) <= chunk)
        return out, stable, min_freq

    def _spectra_compiled(
        self, c: NDArray[np.float64], out: NDArray[np.floating], stable_only: bool
    ) -> NDArray[np.float64]:
        """Intensity of ``c`` (B, n_free) into ``out``; returns the lowest eigenvalues (B,)."""
        from simulations.lattice.eig import spectra_table

        return spectra_table(
            c,
            self._packed,
            self._table,
            scale=self._scale,
            lam_stable=self._lam_stable,
            stable_only=stable_only,
            out=out,
        )

    @staticmethod
    def _run_chunks(work: Any, starts: range, workers: int, single: bool) -> None:
        if workers <= 1 or single:
            for s in starts:
                work(s)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(work, starts))

    # ------------------------------------------------------------------ broadening
    def _sigma(self, energy: torch.Tensor, poly: torch.Tensor | None = None) -> torch.Tensor:
        """Resolution width (meV) at ``energy`` (meV) from the polynomial ``poly``."""
        e = energy.clamp(0.0, self.resolution.e_max)
        s = torch.zeros_like(e)
        for coef in self._poly if poly is None else poly:
            s = s * e + coef
        return s.clamp(min=1e-3)

    def _profile(
        self,
        energy: torch.Tensor,
        edges: torch.Tensor | None = None,
        poly: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Bin profiles of every mode, (B, n_q, n_branches, n_E): a unit-area Gaussian of
        the resolution width at the mode's energy, integrated over each bin (``edges`` and
        the resolution polynomial ``poly`` in another dtype when given)."""
        edges = self._edges if edges is None else edges
        sigma = self._sigma(energy, poly).unsqueeze(-1)
        z = (edges - energy.unsqueeze(-1)) / (sigma * math.sqrt(2.0))
        cdf = 0.5 * torch.erf(z)
        return cdf[..., 1:] - cdf[..., :-1]

    def _broaden_exact(self, energy: torch.Tensor) -> torch.Tensor:
        return self._profile(energy).sum(dim=2)

    def jacobian(
        self, coefficients: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """I(q, E) and its exact derivatives with respect to the free coefficients.

        ``coefficients`` (n_free,) eV/A^2. Returns ``(I, J)``: I (n_q, n_E) with exact
        broadening and J (n_q, n_E, n_free), dI/dc per eV/A^2. By the chain rule through
        the mode energies: dE/dc from first-order perturbation theory (the eigenvectors'
        expectation of each basis matrix; within a degenerate set only the sum enters I,
        and that sum does not depend on the basis chosen in it), dI/dE from the bin
        profiles by forward-mode differentiation. Modes with E < 1e-3 meV (acoustic at
        Gamma) are held fixed. Cheaper than autograd over the n_q x n_E outputs, and
        checked against finite differences in the tests. Float64 throughout.
        """
        c = np.asarray(coefficients, dtype=float).ravel()
        if c.shape != (self.n_free,) or not np.all(np.isfinite(c)):
            raise InvalidCoefficientsError(
                f"expected {self.n_free} finite coefficients ({', '.join(self.free)})"
            )
        n_q, m = self.grid.n_q, self._m
        d_free = self._d_free.to(torch.complex128 if not self.is_real else torch.float64)
        d_fixed = self._d_fixed.to(d_free.dtype)
        basis = d_free.reshape(self.n_free, self._n_q_all, m, m)[:, :n_q]
        ct = torch.from_numpy(c).to(d_free.dtype)
        d = (ct @ d_free + d_fixed).reshape(self._n_q_all, m, m)[:n_q]
        with torch.no_grad():
            lam, vec = torch.linalg.eigh(d)  # (n_q, m), (n_q, m, m) columns
            dlam = torch.einsum("qaj,kqab,qbj->qjk", vec.conj(), basis, vec).real
            lam = lam.real.to(torch.float64)
            ok = lam > (1e-3 / self._scale) ** 2
            root = torch.sqrt(lam.clamp(min=1e-12))  # as spectra()
            energy = root * self._scale  # (n_q, m) meV
            de = torch.where(ok[..., None], self._scale * dlam / (2.0 * root[..., None]), 0.0)
            edges, poly = self._edges.double(), self._poly.double()
            out = torch.func.jvp(
                lambda x: self._profile(x, edges, poly),
                (energy[None],),
                (torch.ones_like(energy)[None],),
            )
            prof, dprof = out[0], out[1]
        intensity = prof[0].sum(dim=1)  # (n_q, n_E)
        jac = torch.einsum("qje,qjk->qek", dprof[0], de)
        return intensity.numpy(), jac.numpy()

    def _build_table(self) -> None:
        """Bin profile of a mode at energies 0, step, 2 step, ... (windowed, float64).

        Sets ``self._table = (profile, slope, start, step)`` for
        :func:`simulations.lattice.eig.spectra_table`: row ``i`` holds the profile of a mode
        at ``i * step`` meV over the ``width`` bins from ``start[i]``, and the next row's
        profile minus it on the same bins, so that interpolating is one pass over a window.
        """
        from scipy.special import erf

        edges = self.grid.energy_edges
        n_e = len(edges) - 1
        e_grid = np.linspace(0, self.resolution.e_max, 64)
        sig_grid = self.resolution.sigma(e_grid)
        sig_max, sig_min = float(sig_grid.max()), float(sig_grid.min())
        top = edges[-1] + 7.0 * sig_max
        step = min(sig_min / 25.0, 0.02)
        e_modes = np.arange(0.0, top + step, step)
        sig = self.resolution.sigma(e_modes)[:, None]
        cdf = 0.5 * erf((edges[None, :] - e_modes[:, None]) / (sig * np.sqrt(2.0)))
        full = np.diff(cdf, axis=1)  # (n_rows, n_E)
        # Keep a window of bins around each mode: beyond 5 sigma lies < 3e-7 of its area.
        # The window also holds the next row's profile (one step higher), and is moved
        # inside the grid at its ends (the bins it then gains are ones the profile covers).
        half = int(np.ceil(5.0 * sig_max / (edges[1] - edges[0]))) + 1
        width = min(2 * half + 2, n_e)
        centre = np.searchsorted(edges, e_modes) - 1
        start = np.clip(centre - half, 0, n_e - width).astype(np.int64)
        cols = start[:, None] + np.arange(width)[None, :]
        rows = np.arange(len(full))[:, None]
        profile = full[rows, cols]
        slope = np.zeros_like(profile)
        slope[:-1] = full[rows[1:], cols[:-1]] - profile[:-1]
        self._table = (profile, slope, start, float(step))

    def _broaden_table(self, energy: torch.Tensor) -> torch.Tensor:
        from simulations.lattice.eig import broaden_table

        out = np.empty((*energy.shape[:2], self.grid.n_e), dtype=self._np_dtype)
        broaden_table(energy.detach().numpy(), self._table, out)
        return torch.from_numpy(out)

    @property
    def _np_dtype(self) -> type[np.floating[Any]]:
        return np.float32 if self.dtype == torch.float32 else np.float64


def _signed_frequency(lam: NDArray[np.float64]) -> NDArray[np.float64]:
    """Signed frequencies (THz, negative = imaginary) of eigenvalues ``lam`` (eV/A^2/amu)."""
    return np.sign(lam) * np.sqrt(np.abs(lam)) * VASP_TO_THZ


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
