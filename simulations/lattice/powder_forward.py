"""Batched forward model of the coherent one-phonon powder spectrum S(|Q|, E), in torch.

The fast counterpart of :func:`simulations.lattice.powder.powder_spectrum` (one
:class:`~simulations.lattice.sqe.CoherentSQE` per force-constant set) for training sets of
many thousand spectra. For a batch of symmetry-reduced coefficient sets ``c`` (eV/A^2):

1. Q points, by one of two averages (``average``):

   * ``"directions"``: at each |Q| the Fibonacci sphere of ``directions`` unit vectors
     turned by a seeded random rotation, exactly those of :func:`powder_spectrum` with the
     same ``directions`` and ``seed``; Cartesian Q -> primitive r.l.u. Its error is the
     sampling's: ~13 % per bin at 256 directions (Al, 300 K);
   * ``"shells"``: every Q = q + G of a Gamma-centred ``mesh``^3 q mesh (its irreducible
     q, weighted by their stars) and every G, each shared between its two nearest |Q|
     nodes, as :func:`~simulations.lattice.powder.powder_shells`; the phonons are solved
     at the irreducible q only (eigenvectors carried to q + G by the phases
     exp(-2 pi i G.x_j) of the position convention), so a 32^3 mesh costs ~900
     eigenproblems for Al, whatever the number of points.
2. Dynamical matrices ``D(q) = D_fixed(q) + sum_k c_k D_k(q)`` at every (|Q|, direction)
   point and on a Gamma-centred ``dw_mesh``^3 mesh: the basis ``D_k`` (and ``D_fixed``: the
   coefficients held at ``reference`` plus the non-analytic term of a polar crystal) is
   built once, so a batch is one matrix product. With an inversion centre the matrices are
   made real by one constant unitary transform T (:func:`_realifying_transform` of the
   forward model); eigenvectors are mapped back with T where they enter.
3. Eigenvalues and eigenvectors batched over sets and points, sets in chunks that keep the
   work arrays of one chunk near ``max_chunk_bytes``: real float64 matrices (every crystal
   with an inversion centre) go to a compiled cyclic-Jacobi solver
   (:func:`simulations.lattice.eig.eigh_small`, ~3x faster than LAPACK's per-call cost for
   3x3 matrices, on ``torch.get_num_threads()`` threads); complex ones (no inversion
   centre) and float32 to ``torch.linalg.eigh``.
4. Debye-Waller tensors of each set from its own phonons on the mesh, and one-phonon
   structure factors with :class:`CoherentSQE`'s conventions and units::

       sf_nu(Q) = 10 (hbar^2 / 2 amu) |sum_j b_j / sqrt(M_j) exp(-Q.B_j.Q) (Q . e_j,nu)|^2
                  / (N_atom E_nu)                                     (mbarn per atom)

   modes at or below 0.01 meV left out; Bose factors n + 1 (loss, +E) and n (gain, -E).
5. Broadening as :func:`powder_spectrum` does it: each mode split linearly between the two
   nearest points of a fine energy grid (step 1/10 of the narrowest resolution width; keeps
   weight and mean energy; a compiled loop, the sets split among ``torch.get_num_threads()``
   threads), then one matrix maps the fine grid to the output with unit-area
   Gaussians of width sigma(|E|) of the mode: averaged over each energy bin
   (``broadening="bin"``, error functions at the edges) or evaluated at the bin centres
   (``broadening="centre"``, what :func:`powder_spectrum` gives at those energies).
   Divided by ``directions``: the spherical average.

Output: (B, n_Q, n_E) float64, mbarn/meV per atom, the units of :func:`powder_spectrum`.

Agreement: with the same ``directions``, ``seed`` and Debye-Waller mesh (``CoherentSQE``'s
default ``dw_mesh`` is 12, this model's 8) and ``broadening="centre"``, the spectra equal
:func:`powder_spectrum`'s to ~1e-13 relative (Al, Ge, and a crystal without inversion
centre; tests). The linear split onto the fine grid is the reference's approximation too
(~1e-3 of a peak against exact Gaussians). Speed (``tests/benchmarks/bench_powder_forward.py``,
Al, 100 |Q| x 70 E, 64 directions, batches of 64, best runs on 2 shared cores): ~450
spectra/s on 2 threads, ~310 on one, against ~16 ms per spectrum for the reference (5-7x);
Ge ~100 and ~58 spectra/s against ~60 ms (3.5-6x). The eigensolver takes most of the time.
The shell average on a run's powder grid (200 |Q| x 90 E, Debye-Waller mesh 12^3, 300 K)
equals :func:`~simulations.lattice.powder.powder_shells` to 1e-13 relative: Al on a 48^3
mesh 53 ms per spectrum against 4.9 s (x91), Ge on 24^3 54 ms against 5.3 s (x98), 2 busy
shared cores.

Included: coherent one-phonon scattering, Debye-Waller factor, Bose factor (loss and
gain), energy resolution (Gaussian, sigma of the mode energy). Left out: resolution in
|Q| (each |Q| is a sharp shell), multiphonon, incoherent, elastic (Bragg) and multiple
scattering, absorption, backgrounds, the kf/ki factor and any instrument coverage mask.
No autograd (eigenvectors of degenerate modes have no useful derivative).

Sets with a frequency below ``-imaginary_tol`` THz at any powder or mesh point are flagged
unstable (:attr:`PowderSpectra.stable`): their spectra are still computed as
:class:`CoherentSQE` would (imaginary modes left out of S and of the Debye-Waller sum) and are
not physical.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit
from numpy.typing import NDArray

from simulations.exceptions import GridError, InvalidCoefficientsError
from simulations.lattice.eig import eigh_small
from simulations.lattice.force_constants import FCBasis
from simulations.lattice.forward import _realifying_transform
from simulations.lattice.powder import _fibonacci_sphere, q_smoothing, shell_nodes, shell_points
from simulations.lattice.resolution import EnergyResolution
from simulations.lattice.sqe import FREQUENCY_MIN_MEV, mesh_points, scattering_length
from simulations.units import FM2_TO_MBARN, HBAR2_OVER_2AMU, K_B_MEV, THZ_TO_MEV, VASP_TO_THZ

__all__ = ["PowderForwardModel", "PowderSpectra", "powder_directions"]

logger = logging.getLogger(__name__)

#: Mesh size checked for imaginary modes when the Debye-Waller factor is off.
_STABILITY_MESH = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class PowderSpectra:
    """Output of :meth:`PowderForwardModel.spectra`.

    Attributes
    ----------
    intensity
        (B, n_Q, n_E) float64, mbarn/meV per atom.
    stable
        (B,) bool: no frequency below ``-imaginary_tol`` THz at any powder or mesh point.
    min_frequency_thz
        (B,) float64, THz: the lowest signed frequency (negative = imaginary).
    """

    intensity: NDArray[np.float64]
    stable: NDArray[np.bool_]
    min_frequency_thz: NDArray[np.float64]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(intensity, stable, min_frequency_thz)`` as torch tensors sharing the memory."""
        return (
            torch.from_numpy(self.intensity),
            torch.from_numpy(self.stable),
            torch.from_numpy(self.min_frequency_thz),
        )


def powder_directions(n_q: int, directions: int, seed: int) -> NDArray[np.float64]:
    """(n_q, directions, 3) unit vectors: at every |Q| the Fibonacci sphere turned by a
    random rotation drawn from ``seed``, the same as :func:`powder_spectrum`'s."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    rot = Rotation.random(n_q, random_state=rng).as_matrix().reshape(n_q, 3, 3)
    return np.asarray(np.einsum("qij,dj->qdi", rot, _fibonacci_sphere(directions)))


class PowderForwardModel:
    """Coherent one-phonon powder S(|Q|, E) for batches of force-constant coefficients.

    Parameters
    ----------
    basis
        Symmetry-reduced force-constant basis of the crystal.
    q
        (n_Q,) float, |Q| of the powder rings, 1/Angstrom.
    energy_edges
        (n_E + 1,) float, meV, increasing: the energy bins (negative = energy gain).
    resolution
        Energy resolution sigma(E).
    temperature
        Sample temperature, K (Bose and Debye-Waller factors).
    directions
        Q directions per |Q| (``average="directions"``).
    average
        ``"directions"`` or ``"shells"`` (the module docstring); with ``"shells"`` the
        |Q| values ``q`` must be uniformly spaced nodes.
    mesh
        q mesh points per axis of the ``"shells"`` average.
    q_sigma
        Gaussian |Q| resolution of the shell average, 1/A (0: none).
    bins
        With the shell average: each value the average over its |Q| bin of width
        ``q[1] - q[0]`` (as a folded |Q| bin holds it) instead of the value at ``q``
        (:func:`~simulations.lattice.powder.q_smoothing`).
    seed
        Seed of the random rotation of the directions at each |Q|.
    dw_mesh
        Points per axis of the Gamma-centred mesh of the Debye-Waller sum; 0 switches the
        Debye-Waller factor off.
    free
        Names of the coefficients that the inputs give, in order (default: all of them).
    reference
        (n_coeff,) full coefficient vector, eV/A^2: the coefficients not in ``free`` are
        held at these values. Required when ``free`` is a subset.
    broadening
        ``"bin"``: S averaged over each energy bin; ``"centre"``: S at the bin centres.
    scattering_lengths
        Element -> b_c in fm; default from the shipped Sears (1992) table.
    imaginary_tol
        THz; a frequency below ``-imaginary_tol`` marks a set unstable.
    dtype
        Dtype of the dynamical matrices and their eigendecomposition (``torch.float64``
        or ``torch.float32``); everything after it is float64.
    solver
        Eigensolver: ``"jacobi"`` (:func:`simulations.lattice.eig.eigh_small`, compiled,
        real float64 matrices only, on ``torch.get_num_threads()`` threads), ``"torch"``
        (``torch.linalg.eigh``) or ``"auto"`` (Jacobi where it applies).
    max_chunk_bytes
        Approximate bound on the work arrays of one chunk of sets (256 MiB: 30 Al sets of
        100 |Q| x 64 directions, 14 Ge sets).
    """

    def __init__(
        self,
        basis: FCBasis,
        q: NDArray[np.float64],
        energy_edges: NDArray[np.float64],
        resolution: EnergyResolution,
        temperature: float,
        *,
        directions: int = 64,
        average: str = "directions",
        mesh: int = 32,
        q_sigma: float = 0.0,
        bins: bool = False,
        seed: int = 0,
        dw_mesh: int = 8,
        free: Sequence[str] | None = None,
        reference: NDArray[np.float64] | None = None,
        broadening: str = "bin",
        scattering_lengths: dict[str, float] | None = None,
        imaginary_tol: float = 0.05,
        dtype: torch.dtype = torch.float64,
        solver: str = "auto",
        max_chunk_bytes: int = 256 * 2**20,
    ) -> None:
        self.q = np.asarray(q, dtype=float).ravel()
        self.energy_edges = np.asarray(energy_edges, dtype=float).ravel()
        _check_grid(self.q, self.energy_edges)
        if average not in ("directions", "shells"):
            raise ValueError(f"average must be 'directions' or 'shells', got {average!r}")
        self.q_sigma = float(q_sigma)
        self.bins = bool(bins)
        if average == "shells" and mesh < 2:
            raise ValueError(f"the shell average needs a q mesh >= 2, got {mesh}")
        if broadening not in ("bin", "centre"):
            raise ValueError(f"broadening must be 'bin' or 'centre', got {broadening!r}")
        if not np.isfinite(temperature) or temperature < 0:
            raise InvalidCoefficientsError(f"temperature must be >= 0 K, got {temperature}")
        if directions < 1 or dw_mesh < 0:
            raise ValueError(f"need directions >= 1 and dw_mesh >= 0, got {directions}, {dw_mesh}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if np.abs(self.energy_edges).max() > resolution.e_max + 1e-9:
            logger.warning(
                "energy bins reach %.1f meV but the resolution fit only to %.1f meV",
                np.abs(self.energy_edges).max(),
                resolution.e_max,
            )
        self.basis = basis
        self.crystal = basis.crystal
        self.resolution = resolution
        self.temperature = float(temperature)
        self.directions = int(directions)
        self.average = average
        self.mesh = int(mesh)
        self.seed = int(seed)
        self.dw_mesh = int(dw_mesh)
        self.broadening = broadening
        self.dtype = dtype
        self.imaginary_tol = float(imaginary_tol)
        self.max_chunk_bytes = int(max_chunk_bytes)
        self.free, fixed_idx = self._free_coefficients(free)
        if reference is None and fixed_idx:
            raise InvalidCoefficientsError(
                "reference= (values of the fixed coefficients) is required when only "
                "some coefficients are free"
            )
        self.reference = (
            basis.check_coefficients(reference)
            if reference is not None
            else np.zeros(basis.n_coefficients)
        )
        free_idx = [basis.index(n) for n in self.free]

        crystal = self.crystal
        lengths = scattering_lengths or {}
        b = np.array(
            [lengths[s] if s in lengths else scattering_length(s) for s in crystal.species]
        )
        self._n_atoms = crystal.n_atoms
        self._m = 3 * crystal.n_atoms
        self._amp0 = torch.from_numpy(b / np.sqrt(crystal.masses))  # fm / sqrt(amu)

        # Powder points (n_Q * directions, 3) and the Debye-Waller / stability mesh.
        if average == "shells":
            q_rlu = self._shells()
        else:
            dirs = powder_directions(len(self.q), self.directions, self.seed)
            q_cart = (self.q[:, None, None] * dirs).reshape(-1, 3)
            q_rlu = q_cart @ np.linalg.inv(crystal.reciprocal_lattice)
            self._q_cart = torch.from_numpy(q_cart)  # (P, 3) 1/Angstrom
            self._q_row_np = np.repeat(np.arange(len(self.q)), self.directions)  # (P,) int
        dw_points = mesh_points(self.dw_mesh if self.dw_mesh > 0 else _STABILITY_MESH)
        self._n_points = len(q_rlu)
        self._n_mesh = len(dw_points)
        self._dw_pref = torch.from_numpy(HBAR2_OVER_2AMU / (2.0 * crystal.masses * len(dw_points)))
        self._build_matrices(np.vstack([q_rlu, dw_points]), free_idx, fixed_idx)
        if solver not in ("auto", "jacobi", "torch"):
            raise ValueError(f"solver must be 'auto', 'jacobi' or 'torch', got {solver!r}")
        jacobi_ok = self.is_real and dtype == torch.float64
        if solver == "jacobi" and not jacobi_ok:
            raise ValueError("solver='jacobi' needs real dynamical matrices and float64")
        self.solver = "jacobi" if solver == "auto" and jacobi_ok else solver
        if self.solver == "auto":
            self.solver = "torch"
        self._build_kernel()
        self._scale = VASP_TO_THZ * THZ_TO_MEV  # sqrt(eV/A^2/amu) -> meV
        self._lam_stable = -((self.imaginary_tol / VASP_TO_THZ) ** 2)

    # ------------------------------------------------------------------ set-up
    def _shells(self) -> NDArray[np.float64]:
        """Set up the shell average; returns the irreducible q (n_irr, 3) r.l.u. whose
        phonons are solved (its points, weights, nodes and phases are kept)."""
        nodes, self._sh_map = q_smoothing(self.q, self.q_sigma, self.bins)
        self._sh_nodes = nodes
        step = float(nodes[1] - nodes[0])
        q_irr, q_index, points, weight = shell_points(
            self.crystal, float(nodes[-1]) + step, self.mesh
        )
        rec = np.asarray(self.crystal.reciprocal_lattice, dtype=float)
        q_cart = points @ rec
        inside, lower, frac = shell_nodes(np.linalg.norm(q_cart, axis=1), nodes)
        g = np.rint(points[inside] - q_irr[q_index[inside]])  # integer G, r.l.u.
        self._sh_q_cart = np.ascontiguousarray(q_cart[inside])
        self._sh_index = np.ascontiguousarray(q_index[inside])
        self._sh_lower = np.ascontiguousarray(lower)
        self._sh_frac = np.ascontiguousarray(frac)
        self._sh_weight = np.ascontiguousarray(weight[inside])
        # e_j(q + G) = exp(-2 pi i G.x_j) e_j(q) in the position convention of the basis
        self._sh_phase = np.ascontiguousarray(
            np.exp(-2j * np.pi * g @ np.asarray(self.crystal.positions, dtype=float).T)
        )
        norm = np.bincount(lower, weight[inside] * (1 - frac), minlength=len(nodes))
        norm += np.bincount(lower + 1, weight[inside] * frac, minlength=len(nodes))
        if self._sh_map is None:
            self._sh_norm = np.where(norm > 0, norm, 1.0)
        else:
            den = self._sh_map @ norm
            self._sh_norm = np.where(den > 0, den, 1.0)
        logger.info(
            "powder shells: %d points from %d irreducible q (mesh %d)",
            len(lower),
            len(q_irr),
            self.mesh,
        )
        return q_irr

    def _free_coefficients(self, free: Sequence[str] | None) -> tuple[tuple[str, ...], list[int]]:
        names = tuple(free) if free is not None else self.basis.names
        idx = [self.basis.index(n) for n in names]
        if len(set(idx)) != len(idx):
            raise InvalidCoefficientsError(f"duplicate names in free coefficients {names}")
        fixed = [k for k in range(self.basis.n_coefficients) if k not in idx]
        return names, fixed

    def _build_matrices(
        self, qpoints: NDArray[np.float64], free_idx: list[int], fixed_idx: list[int]
    ) -> None:
        """Basis of the dynamical matrices at every powder and mesh point (flat tensors)."""
        dyn = self.basis.dynamical_basis(qpoints)  # (n_coeff, n_pts, m, m)
        fixed = np.einsum("k,kqij->qij", self.reference[fixed_idx], dyn[fixed_idx])
        if self.basis.nac is not None:  # LO-TO splitting, as CoherentSQE adds it
            fixed = fixed + self.basis.nac.matrices(qpoints)
        dyn = dyn[free_idx]
        self._transform: torch.Tensor | None = None
        if max(np.abs(dyn.imag).max(initial=0.0), np.abs(fixed.imag).max(initial=0.0)) >= 1e-12:
            t = _realifying_transform(self.basis)
            if t is not None:
                dyn = np.einsum("ai,kqab,bj->kqij", t.conj(), dyn, t)
                fixed = np.einsum("ai,qab,bj->qij", t.conj(), fixed, t)
                self._transform = torch.from_numpy(np.ascontiguousarray(t))
        imag = max(np.abs(dyn.imag).max(initial=0.0), np.abs(fixed.imag).max(initial=0.0))
        self.is_real = bool(imag < 1e-10)
        if self.is_real:
            d_free = torch.from_numpy(np.ascontiguousarray(dyn.real)).to(self.dtype)
            d_fixed = torch.from_numpy(np.ascontiguousarray(fixed.real)).to(self.dtype)
        else:  # no inversion centre: complex Hermitian matrices
            self._transform = None
            cdtype = torch.complex64 if self.dtype == torch.float32 else torch.complex128
            d_free = torch.from_numpy(np.ascontiguousarray(dyn)).to(cdtype)
            d_fixed = torch.from_numpy(np.ascontiguousarray(fixed)).to(cdtype)
        self._d_free = d_free.reshape(len(free_idx), -1)
        self._d_fixed = d_fixed.reshape(-1)

    def _build_kernel(self) -> None:
        """The fine energy grid of :func:`powder_spectrum` and the matrix that broadens it
        onto the output bins (trimmed to the fine points that reach a bin)."""
        from scipy.special import erf

        res = self.resolution
        sig_grid = res.sigma(np.linspace(0, res.e_max, 64))
        sig_min, sig_max = float(np.min(sig_grid)), float(np.max(sig_grid))
        step = max(sig_min / 10.0, 1e-3)
        edges = self.energy_edges
        centres = 0.5 * (edges[1:] + edges[:-1])
        out_e = centres if self.broadening == "centre" else edges
        # Modes more than 8 sigma_max away from every output energy add < 1e-14 of a peak.
        reach = 8.0 * sig_max + 1.0
        top = float(np.abs(out_e).max()) + reach
        n_half = math.ceil(top / step)
        fine = step * np.arange(-n_half, n_half + 1)
        used = np.nonzero(
            (fine >= out_e.min() - reach - step) & (fine <= out_e.max() + reach + step)
        )[0]
        self._top = top
        self._step = step
        self._fine0 = float(fine[0])
        self._first = int(used[0])
        self._n_fine = len(used)
        f = fine[used]
        sigma = res.sigma(np.abs(f))[:, None]
        if self.broadening == "centre":
            z = (centres[None, :] - f[:, None]) / sigma
            kernel = np.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * sigma)
        else:
            cdf = 0.5 * erf((edges[None, :] - f[:, None]) / (sigma * math.sqrt(2.0)))
            kernel = np.diff(cdf, axis=1) / np.diff(edges)[None, :]
        scale = 1.0 if self.average == "shells" else 1.0 / self.directions
        self._kernel = torch.from_numpy(kernel * scale)  # (n_fine, n_E)

    # ------------------------------------------------------------------ properties
    @property
    def n_free(self) -> int:
        """Number of coefficients the inputs give."""
        return len(self.free)

    @property
    def energy_centres(self) -> NDArray[np.float64]:
        """(n_E,) float, meV: centres of the energy bins."""
        return 0.5 * (self.energy_edges[1:] + self.energy_edges[:-1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_Q, n_E)`` of one spectrum."""
        return len(self.q), len(self.energy_edges) - 1

    # ------------------------------------------------------------------ public
    def spectra(self, coefficients: NDArray[np.float64] | torch.Tensor) -> PowderSpectra:
        """S(|Q|, E) of a batch of coefficient sets.

        Parameters
        ----------
        coefficients
            (B, n_free) float, eV/A^2, in the order of :attr:`free`.

        Returns
        -------
        :class:`PowderSpectra` with intensity (B, n_Q, n_E) float64, mbarn/meV per atom.
        """
        c = self._validated(coefficients)
        n_q, n_e = self.shape
        out = np.empty((c.shape[0], n_q, n_e))
        min_lam = np.empty(c.shape[0])
        chunk = self.chunk_size
        with torch.no_grad():
            for start in range(0, c.shape[0], chunk):
                rows = slice(start, start + chunk)
                spec, lowest = self._chunk(c[rows])
                out[rows] = spec.numpy()
                min_lam[rows] = lowest.numpy()
        return PowderSpectra(
            intensity=out,
            stable=min_lam >= self._lam_stable,
            min_frequency_thz=np.sign(min_lam) * np.sqrt(np.abs(min_lam)) * VASP_TO_THZ,
        )

    def debye_waller(self, coefficients: NDArray[np.float64] | torch.Tensor) -> torch.Tensor:
        """(B, n_atoms, 3, 3) float64, Angstrom^2: the Debye-Waller tensors B_j of each set
        (``W_j(Q) = Q.B_j.Q``), as :attr:`CoherentSQE.debye_waller_tensor` with
        ``dw_mesh`` points per axis."""
        c = self._validated(coefficients)
        with torch.no_grad():
            lam, vec = self._eigh(c, mesh_only=True)
            return self._dw_tensors(lam, vec)

    @property
    def chunk_size(self) -> int:
        """Sets per chunk: their work arrays stay under ``max_chunk_bytes``."""
        m, p, n_pts = self._m, self._n_points, self._n_points + self._n_mesh
        item = 16 if not self.is_real else 8
        per_set = 3 * n_pts * m * m * item + 40 * p * m * 8 + self.shape[0] * self._n_fine * 8
        if self.average == "shells":
            per_set += 2 * p * m * m * 16 + 2 * len(self._sh_nodes) * self._n_fine * 8
        return max(1, self.max_chunk_bytes // per_set)

    # ------------------------------------------------------------------ core
    def _validated(self, coefficients: NDArray[np.float64] | torch.Tensor) -> torch.Tensor:
        """The coefficients as a float64 tensor, checked: (B, n_free), finite."""
        if isinstance(coefficients, torch.Tensor):
            c = coefficients.detach().to(torch.float64)
        else:
            c = torch.from_numpy(np.asarray(coefficients, dtype=np.float64))
        if c.ndim != 2 or c.shape[1] != self.n_free:
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

    def _eigh(self, c: torch.Tensor, mesh_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (Bc, n, m) eV/A^2/amu and eigenvectors (Bc, n, m, m) (columns, in the
        realified basis where there is one) at the powder then mesh points, or the mesh only."""
        m = self._m
        d_free, d_fixed = self._d_free, self._d_fixed
        if mesh_only:
            cut = self._n_points * m * m
            d_free, d_fixed = d_free[:, cut:], d_fixed[cut:]
        d = (c.to(d_free.dtype) @ d_free + d_fixed).reshape(c.shape[0], -1, m, m)
        if self.solver == "jacobi":
            w, v = eigh_small(d.numpy(), workers=torch.get_num_threads())
            return torch.from_numpy(w), torch.from_numpy(v)
        lam, vec = torch.linalg.eigh(d)
        if self.dtype != torch.float64:
            lam = lam.to(torch.float64)
            vec = vec.to(torch.complex128 if vec.is_complex() else torch.float64)
        return lam, vec

    def _cartesian_vectors(self, vec: torch.Tensor) -> torch.Tensor:
        """Eigenvectors in the position-phase convention of :meth:`FCBasis.dynamical_basis`."""
        if self._transform is None:
            return vec
        return self._transform @ vec.to(torch.complex128)

    def _dw_tensors(self, lam: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """(Bc, n_atoms, 3, 3) Debye-Waller tensors from the mesh modes (Bc, n_mesh, m[, m])."""
        n_at = self._n_atoms
        if self.dw_mesh == 0:
            return torch.zeros((lam.shape[0], n_at, 3, 3), dtype=torch.float64)
        e = torch.sign(lam) * torch.sqrt(lam.abs()) * self._scale
        keep = e > FREQUENCY_MIN_MEV
        safe = torch.where(keep, e, torch.ones_like(e))
        if self.temperature > 0:
            inv = 1.0 / (safe * torch.tanh(safe / (2 * K_B_MEV * self.temperature)))
        else:
            inv = 1.0 / safe
        factor = torch.where(keep, inv, torch.zeros_like(inv))  # (Bc, n_mesh, m)
        v = self._cartesian_vectors(vec).reshape(*vec.shape[:2], n_at, 3, self._m)
        parts = (v.real, v.imag) if v.is_complex() else (v,)
        outer = sum(torch.einsum("bqjan,bqn,bqjcn->bjac", x, factor, x) for x in parts)
        return torch.as_tensor(outer) * self._dw_pref[None, :, None, None]

    def _chunk(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectra (Bc, n_Q, n_E) and lowest eigenvalues (Bc,) of one chunk of sets."""
        if self.average == "shells":
            return self._chunk_shells(c)
        bc, p, m, n_at = c.shape[0], self._n_points, self._m, self._n_atoms
        lam, vec = self._eigh(c)
        min_lam = lam[..., 0].amin(dim=1)
        dw = self._dw_tensors(lam[:, p:], vec[:, p:])
        lam, vec = lam[:, :p], vec[:, :p]
        energy = torch.sign(lam) * torch.sqrt(lam.abs()) * self._scale  # (Bc, P, m) meV

        qc = self._q_cart
        w_exp = torch.einsum("px,bjxy,py->bpj", qc, dw, qc)
        amp = self._amp0 * torch.exp(-w_exp)  # (Bc, P, n_at)
        w = (amp[..., :, None] * qc[None, :, None, :]).reshape(bc, p, m)  # b_j/sqrt(M_j) Q_x
        if self._transform is not None:  # e = T v: sum_r w_r (T v)_r = (w T) . v
            u = w.to(torch.complex128) @ self._transform
            amp2 = (u.real.unsqueeze(-2) @ vec).squeeze(-2) ** 2
            amp2 = amp2 + (u.imag.unsqueeze(-2) @ vec).squeeze(-2) ** 2
        elif vec.is_complex():
            amp2 = (w.to(vec.dtype).unsqueeze(-2) @ vec).squeeze(-2).abs() ** 2
        else:
            amp2 = (w.unsqueeze(-2) @ vec).squeeze(-2) ** 2
        n_q, n_fine = len(self.q), self._n_fine
        e_np = np.ascontiguousarray(energy.numpy())
        a_np = np.ascontiguousarray(amp2.numpy())
        hist = np.zeros((bc, n_q, n_fine))
        pref = HBAR2_OVER_2AMU * FM2_TO_MBARN / n_at

        def deposit(rows: slice) -> None:
            _deposit(
                e_np[rows],
                a_np[rows],
                self._q_row_np,
                pref,
                K_B_MEV * self.temperature,
                self._top,
                self._fine0,
                self._step,
                self._first,
                hist[rows],
            )

        _by_sets(deposit, bc)
        hist_t = torch.from_numpy(hist)
        spec = hist_t.reshape(bc * n_q, n_fine) @ self._kernel
        return spec.reshape(bc, n_q, -1), min_lam

    def _chunk_shells(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_chunk` of the shell average: phonons at the irreducible q, structure
        factors at every q + G (a compiled loop), shared between |Q| nodes."""
        bc, p, n_at = c.shape[0], self._n_points, self._n_atoms
        lam, vec = self._eigh(c)
        min_lam = lam[..., 0].amin(dim=1)
        dw = self._dw_tensors(lam[:, p:], vec[:, p:]).numpy()
        lam, vec = lam[:, :p], vec[:, :p]
        energy = np.ascontiguousarray(
            (torch.sign(lam) * torch.sqrt(lam.abs()) * self._scale).numpy()
        )
        evec = np.ascontiguousarray(self._cartesian_vectors(vec).to(torch.complex128).numpy())
        n_fine, n_nodes = self._n_fine, len(self._sh_nodes)
        hist = np.zeros((bc, n_nodes, n_fine))
        pref = HBAR2_OVER_2AMU * FM2_TO_MBARN / n_at
        amp0 = np.ascontiguousarray(self._amp0.numpy())

        def deposit(rows: slice) -> None:
            _deposit_shells(
                energy[rows],
                evec[rows],
                dw[rows],
                amp0,
                self._sh_q_cart,
                self._sh_index,
                self._sh_phase,
                self._sh_lower,
                self._sh_frac,
                self._sh_weight,
                pref,
                K_B_MEV * self.temperature,
                self._top,
                self._fine0,
                self._step,
                self._first,
                hist[rows],
            )

        _by_sets(deposit, bc)
        spec = torch.from_numpy(hist).reshape(bc * n_nodes, n_fine) @ self._kernel
        spec = spec.reshape(bc, n_nodes, -1)
        if self._sh_map is not None:  # the nodes into the values (resolution, bins)
            spec = torch.einsum("qk,bke->bqe", torch.from_numpy(self._sh_map), spec)
        return spec / torch.from_numpy(self._sh_norm)[None, :, None], min_lam


def _by_sets(deposit: Callable[[slice], None], n_sets: int) -> None:
    """Run ``deposit`` over the rows of ``n_sets`` sets, split among
    ``torch.get_num_threads()`` threads (each writes only its own rows; the compiled
    deposits release the GIL)."""
    workers = min(torch.get_num_threads(), n_sets)
    if workers <= 1:
        deposit(slice(None))
        return
    bounds = np.linspace(0, n_sets, workers + 1).astype(int)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(deposit, [slice(bounds[k], bounds[k + 1]) for k in range(workers)]))


@njit(cache=True, nogil=True)
def _deposit_shells(
    energy: NDArray[np.float64],
    evec: NDArray[np.complex128],
    dw: NDArray[np.float64],
    amp0: NDArray[np.float64],
    q_cart: NDArray[np.float64],
    q_index: NDArray[np.int64],
    phase: NDArray[np.complex128],
    lower: NDArray[np.int64],
    frac: NDArray[np.float64],
    weight: NDArray[np.float64],
    pref: float,
    kt: float,
    top: float,
    fine0: float,
    step: float,
    first: int,
    hist: NDArray[np.float64],
) -> None:
    """The shell average's modes onto the fine energy grid.

    ``energy`` (Bc, n_irr, m) meV and ``evec`` (Bc, n_irr, m, m) Cartesian eigenvectors
    (columns) at the irreducible q; ``dw`` (Bc, n_atoms, 3, 3) Debye-Waller tensors (A^2);
    ``amp0`` (n_atoms,) b_j / sqrt(M_j); per point: ``q_cart`` (P, 3) Q in 1/A, its q
    (``q_index``), ``phase`` (P, n_atoms) exp(-2 pi i G.x_j), its lower |Q| node and
    fraction and its star ``weight``. Structure factor
    ``pref |sum_j a_j exp(-Q.B_j.Q) phase_j (Q . e_j)|^2 / E``, Bose factors as
    :func:`_deposit`; each weight goes to the two nodes (``weight (1 - frac)`` and
    ``weight frac``) and to the two nearest fine energies.
    """
    n_b = energy.shape[0]
    n_m = energy.shape[2]
    n_at = amp0.shape[0]
    n_p = q_cart.shape[0]
    n_fine = hist.shape[2]
    a = np.empty(n_at, dtype=np.complex128)
    for b in range(n_b):
        for p in range(n_p):
            r = q_index[p]
            qx, qy, qz = q_cart[p, 0], q_cart[p, 1], q_cart[p, 2]
            for j in range(n_at):
                w_j = (
                    qx * (dw[b, j, 0, 0] * qx + dw[b, j, 0, 1] * qy + dw[b, j, 0, 2] * qz)
                    + qy * (dw[b, j, 1, 0] * qx + dw[b, j, 1, 1] * qy + dw[b, j, 1, 2] * qz)
                    + qz * (dw[b, j, 2, 0] * qx + dw[b, j, 2, 1] * qy + dw[b, j, 2, 2] * qz)
                )
                a[j] = amp0[j] * math.exp(-w_j) * phase[p, j]
            lo_node = lower[p]
            f_node = frac[p]
            for n in range(n_m):
                e = energy[b, r, n]
                if not (e > FREQUENCY_MIN_MEV and e < top):
                    continue
                amp = 0j
                for j in range(n_at):
                    k = 3 * j
                    amp += a[j] * (
                        qx * evec[b, r, k, n]
                        + qy * evec[b, r, k + 1, n]
                        + qz * evec[b, r, k + 2, n]
                    )
                sf = weight[p] * pref * (amp.real * amp.real + amp.imag * amp.imag) / e
                bose = 1.0 / np.expm1(e / kt) if kt > 0 else 0.0
                for sign in (1.0, -1.0):
                    wgt = sf * (bose + 1.0) if sign > 0 else sf * bose
                    x = (sign * e - fine0) / step
                    lo = math.floor(x)
                    fe = x - lo
                    k = int(lo) - first
                    if 0 <= k <= n_fine - 2:
                        hist[b, lo_node, k] += wgt * (1.0 - f_node) * (1.0 - fe)
                        hist[b, lo_node, k + 1] += wgt * (1.0 - f_node) * fe
                        hist[b, lo_node + 1, k] += wgt * f_node * (1.0 - fe)
                        hist[b, lo_node + 1, k + 1] += wgt * f_node * fe


@njit(cache=True, nogil=True)
def _deposit(
    energy: NDArray[np.float64],
    amp2: NDArray[np.float64],
    q_row: NDArray[np.int64],
    pref: float,
    kt: float,
    top: float,
    fine0: float,
    step: float,
    first: int,
    hist: NDArray[np.float64],
) -> None:
    """Modes onto the fine energy grid, as :func:`powder_spectrum` puts them there.

    ``energy`` and ``amp2`` (Bc, P, m): mode energies (meV) and ``|sum_j a_j Q.e_j|^2``;
    ``q_row`` (P,) the |Q| of each point. Structure factor ``pref * amp2 / E`` (modes at or
    below 0.01 meV or at/above ``top`` left out), Bose factor at ``kt`` (meV); weight
    ``sf (n + 1)`` at +E and ``sf n`` at -E, each split linearly between its two nearest fine
    points ``fine0 + k step``; ``hist`` (Bc, n_Q, n_fine) holds fine points from ``first`` on.
    """
    n_b, n_p, n_m = energy.shape
    n_fine = hist.shape[2]
    for b in range(n_b):
        for p in range(n_p):
            r = q_row[p]
            for n in range(n_m):
                e = energy[b, p, n]
                if not (e > FREQUENCY_MIN_MEV and e < top):
                    continue
                sf = amp2[b, p, n] * pref / e
                bose = 1.0 / np.expm1(e / kt) if kt > 0 else 0.0
                for sign in (1.0, -1.0):
                    weight = sf * (bose + 1.0) if sign > 0 else sf * bose
                    x = (sign * e - fine0) / step
                    lo = math.floor(x)
                    frac = x - lo
                    k = int(lo) - first
                    if 0 <= k <= n_fine - 2:
                        hist[b, r, k] += weight * (1.0 - frac)
                        hist[b, r, k + 1] += weight * frac


def _check_grid(q: NDArray[np.float64], edges: NDArray[np.float64]) -> None:
    if len(q) == 0 or not np.all(np.isfinite(q)) or np.any(q <= 0):
        raise GridError(f"|Q| values must be finite and > 0 1/Angstrom, got {q}")
    if len(edges) < 2 or not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise GridError("energy_edges must be at least two finite, increasing energies (meV)")
