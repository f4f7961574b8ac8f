"""Expected counts of every folded (q, E) bin for given force constants, with the Jacobian.

For the bins of the path's canonical points (:class:`consumers.reduction.moments.BinMoments`
holds their geometry, summed over orientations and weighted by proton charge)::

    lambda_b = s * (sum_m [A_bm h_bm + X_bm k_bm] + f_b) + beta * bg_b

* ``A_bm = e_m^H T_b e_m``: the structure-factor moment tensor of the bin (the cells' Q,
  Debye-Waller factors and phases) contracted with the eigenvector of mode m at the bin's
  path point q (eigenvectors of ``D(q) = sum_k c_k D_k(q)``);
* ``h_bm = P / E_m [(n(E_m) + 1) g(E_b; E_m + mu_bm, sigma_bm) + n(E_m) g(E_b; -E_m - mu_bm,
  sigma_bm)]``: ``P = hbar^2/(2 amu) x 10 mbarn/fm^2 / N`` (the simulator's units, mbarn per
  atom), ``n`` the Bose occupation, ``g`` a unit-area Gaussian averaged over the energy
  bin. The centre moves by ``mu_bm = v_m . <delta>_b + W_m : (S_b + eta^2 I)``, the
  second term the branch's curvature across the tube (``S_b = <delta delta^T>_b``,
  :func:`_curvature`), and the width is
  ``sigma_bm^2 = (r sigma_res(E_m))^2 + v_m^T (Cov(delta)_b + eta^2 I) v_m``: the mode's
  group velocity ``v_m = dE_m/dQ`` (1/A -> meV A) across the folding tube (``delta``, the
  cells' offsets from the path point), the instrument's energy resolution scaled by the
  nuisance ``r``, and an isotropic Q resolution of variance ``eta^2`` (1/A^2; the
  nuisance ``q_variance``: mosaic spread, pixel size);
* ``X_bm = 3 e_m^H T^x_b e_m`` and ``k_bm``: where in its energy bin the bin's samples
  lie, as each mode sees them (``T^x_b = sum w x M(Q')``, ``x`` in [-1, 1] a sample's
  energy within the bin): the first Legendre term of that distribution, weighted by the
  mode's own structure factor at each sample, and ``k_bm`` the line ``h_bm`` weighted by
  ``x`` over the bin (closed forms in the same erfc and exp terms). A bin's cells come from
  zones of different structure factors at different energies within the bin, so the
  weight alone does not say where a mode's intensity sits; this term took the model from
  4.0 to 2.4 % per bin off the exact fold (median, ``bench_counts_model``). Its
  Debye-Waller change is left out (a few per cent of a term of a few per cent);
* ``s`` (counts per unit, fitted as ``log s``) and ``beta`` (the background's amplitude on
  the flat-in-time-of-flight shape ``bg_b``) are nuisance parameters;
* an optional fixed signal per bin, ``f_b``, is added to the sum under the scale (the
  sample's multiphonon scattering: :meth:`model_server.refinement.refiner.RunRefiner.multiphonon`),
  and the bins below ``e_min`` (the elastic line's) are not fitted.

Degenerate modes (equal eigenvalues to a relative 1e-7) share the cluster's mean energy
derivative and velocity, so that the sum over a degenerate group depends only on the
subspace (``tr(P_cluster T_b)``) and not on the eigenvectors ``eigh`` picks.

The Jacobian is exact first-order perturbation theory for the energies
(``dlambda_m/dc_k = e_m^H D_k e_m``) and eigenvectors
(``de_m/dc_k = sum_{n not in cluster(m)} e_n (e_n^H D_k e_m) / (lambda_m - lambda_n)``),
the velocities' included; the tests check it against finite differences.

The Debye-Waller factors follow the coefficients: the moments were taken with those of
the reference set (isotropic parts ``b0_j``); at ``c`` the tensor is
``T_b - (db_j + db_k) T2_b`` on the atom blocks (j, k), with ``db_j = b_j(c) - b0_j`` the
change of the isotropic exponent computed from the modes of ``c`` on a Gamma-centred
:data:`DW_MESH`^3 mesh (first order in ``db |Q|^2``, a few per cent at most; its
Jacobian keeps the mode energies' dependence on ``c``, not the eigenvectors').

Bins whose path point lies within :data:`GAMMA_EXCLUSION` tube radii of a zone centre
are left out: there the acoustic modes are a cone across the tube, not a plane.

Cost: the modes are solved once per distinct q-point (the zone classes' rows of a path
point share theirs; :class:`ModeBases` keeps the dynamical-matrix bases across a run's
snapshots), and each mode's line is evaluated only in the energy bins within
:data:`_TAIL_Z` widths of its centre (a quarter of Ge's (bin, mode) elements): the
structure factors ``e_m^H T e_m`` and the coefficients' Jacobian columns are summed
over those elements only, in compiled loops (:func:`_structure_left`,
:func:`_coefficient_columns`). The expected counts of the last parameters are kept, so
that the Jacobian at the point a fit has just evaluated adds only its own part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numba import njit
from numpy.typing import NDArray

from consumers.reduction.moments import BinMoments
from model_server.exceptions import RefinementError
from simulations.lattice.force_constants import FCBasis
from simulations.lattice.grid import Grid
from simulations.lattice.resolution import EnergyResolution
from simulations.lattice.sqe import FREQUENCY_MIN_MEV
from simulations.units import FM2_TO_MBARN, HBAR2_OVER_2AMU, K_B_MEV, THZ_TO_MEV, VASP_TO_THZ

__all__ = [
    "FLOOR",
    "GAMMA_EXCLUSION",
    "NUISANCE",
    "CountsModel",
    "Evaluation",
    "ExactCorrection",
    "ModeBases",
]

#: Path points closer than this many tube radii to a zone centre are not fitted.
GAMMA_EXCLUSION = 6.0

#: Points per axis of the mesh of the Debye-Waller factors' changes.
DW_MESH = 8

#: Names of the nuisance parameters after the coefficients, in order.
NUISANCE = ("log_scale", "background", "resolution_scale", "q_variance")

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_TO_MEV = VASP_TO_THZ * THZ_TO_MEV  # sqrt(eV/A^2/amu) -> meV
_DEGENERATE = 1e-7
#: Widths from a line's centre beyond which its Gaussian is not evaluated (the share of a
#: bin there is below 1e-17 of the peak's).
_TAIL_Z = 9.0

#: Modes closer than this (meV, in a run) at a path point are treated together across the
#: folding tube by :meth:`CountsModel.first_order` (:func:`_pair_lines`). Degenerate and
#: near-degenerate pairs are what need it; wider groups gain a little more (against the
#: exact fold, bins within 2 %: 86 % with the degenerate clusters alone, 88 % at 1 meV, 89 %
#: at 5 and 10 meV); wider still, a group's modes are seldom all near one bin.
PAIR_GAP_MEV = 5.0
#: Gauss-Legendre nodes a side of the offsets' quadrature of :func:`_pair_lines`.
_PAIR_NODES = 3


#: Below this fraction of its largest value, the model's one-phonon part of a bin is not
#: scaled (a factor of a near-zero part would be huge): the exact fold is added instead.
FLOOR = 1e-6


@dataclass(frozen=True, slots=True, kw_only=True)
class ExactCorrection:
    """Per-bin factors ``exact / model`` of the one-phonon part, made at ``at``.

    Attributes
    ----------
    factors
        (n_q * n_E,) float, > 0; 1 where either fold is empty, or where the model's part
        is below :data:`FLOOR` of its largest.
    additive
        (n_q * n_E,) float: where no factor is made, what the exact fold holds beyond the
        model's part (a mode the model does not reach there; >= 0), added as a fixed
        signal; 0 elsewhere.
    at
        (n_coeff,) the coefficients they were made at, eV/A^2.
    orientations
        Orientations summed.
    seconds
        Wall time of the exact fold.
    version
        Of a live correction (:class:`~model_server.refinement.exact.LiveExactCorrection`):
        how many folds it had kept when it was made; -1 otherwise.
    """

    factors: NDArray[np.float64]
    additive: NDArray[np.float64]
    at: NDArray[np.float64]
    orientations: int
    seconds: float
    version: int = -1

    def summary(self, model: CountsModel) -> dict[str, float | int]:
        """JSON-ready: the fitted bins given a factor and how far their factors lie from 1
        (median and 90th percentile of ``|factor - 1|``), the bins given an additive part,
        the orientations and the seconds."""
        f = self.factors[model.bins]
        made = f != 1.0
        dev = np.abs(f[made] - 1.0) if made.any() else np.zeros(1)
        return {
            "orientations": self.orientations,
            "bins_scaled": int(made.sum()),
            "median_abs_deviation": round(float(np.median(dev)), 5),
            "p90_abs_deviation": round(float(np.percentile(dev, 90)), 5),
            "bins_added": int(np.count_nonzero(self.additive[model.bins])),
            "seconds": round(self.seconds, 1),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluation:
    """The model at one parameter vector.

    Attributes
    ----------
    expected
        (n_bins,) expected counts of the fitted bins.
    jacobian
        (n_bins, n_params) d expected / d parameter, or None when not asked for.
    energies
        (n_points, n_branches) mode energies at the fitted path points, meV.
    stable
        False when a mode at a fitted path point is imaginary (the model is then
        meaningless there; the fit treats it as an infinite deviance).
    """

    expected: NDArray[np.float64]
    jacobian: NDArray[np.float64] | None
    energies: NDArray[np.float64]
    stable: bool


class ModeBases:
    """The dynamical-matrix basis of ``basis`` (eV/A^2/amu) and its gradient by Q at
    q-points, kept per q-point, and on the Debye-Waller factors' mesh: the models of a
    run's successive snapshots (their fitted points a growing subset of one grid's) share
    them rather than make them again each time."""

    def __init__(self, basis: FCBasis) -> None:
        self.basis = basis
        self._kept: dict[bytes, tuple[NDArray[np.complex128], NDArray[np.complex128]]] = {}
        self._hessians: dict[bytes, NDArray[np.complex128]] = {}
        self._mesh: (
            tuple[NDArray[np.complex128], NDArray[np.float64], NDArray[np.float64]] | None
        ) = None

    def at(
        self, qpoints: NDArray[np.float64]
    ) -> tuple[NDArray[np.complex128], NDArray[np.complex128]]:
        """``(D_k(q) (k, n, m, m), dD_k/dQ_a (k, n, 3, m, m))`` at ``qpoints`` ((n, 3),
        r.l.u.; the gradient by Cartesian Q in 1/A)."""
        q = np.ascontiguousarray(qpoints, dtype=float)
        keys = [row.tobytes() for row in q]
        new = [i for i, key in enumerate(keys) if key not in self._kept]
        if new:
            dyn = self.basis.dynamical_basis(q[new])
            grad = dynamical_gradient(self.basis, q[new])
            for j, i in enumerate(new):
                self._kept[keys[i]] = (dyn[:, j], grad[:, j])
        pairs = [self._kept[key] for key in keys]
        return (
            np.stack([d for d, _ in pairs], axis=1),
            np.stack([g for _, g in pairs], axis=1),
        )

    def hessian(self, qpoints: NDArray[np.float64]) -> NDArray[np.complex128]:
        """(k, n, 9, m, m) ``d^2 D_k / dQ_a dQ_b`` (``a b`` flattened, Cartesian, 1/A^2) at
        ``qpoints`` ((n, 3), r.l.u.; :func:`dynamical_hessian`)."""
        q = np.ascontiguousarray(qpoints, dtype=float)
        keys = [row.tobytes() for row in q]
        new = [i for i, key in enumerate(keys) if key not in self._hessians]
        if new:
            hess = dynamical_hessian(self.basis, q[new])
            for j, i in enumerate(new):
                self._hessians[keys[i]] = hess[:, j]
        return np.stack([self._hessians[key] for key in keys], axis=1)

    def mesh(self) -> tuple[NDArray[np.complex128], NDArray[np.float64], NDArray[np.float64]]:
        """``(D_k (k, n_half, m, m), weights (n_half,), rows (n_half, k, 2 m^2))``: the
        basis on one of each pair ``q, -q`` of the :data:`DW_MESH`^3 mesh
        (:func:`half_mesh`), each point's weight (2, or 1 for a point that is its own
        pair), summing to ``DW_MESH^3``, and the basis as :func:`_real_rows`; made once,
        shared by every model of the bases."""
        if self._mesh is None:
            points, weights = half_mesh(DW_MESH)
            dyn = self.basis.dynamical_basis(points)
            self._mesh = (dyn, weights, _real_rows(dyn))
        return self._mesh


def half_mesh(n: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(points (n_half, 3) r.l.u., weights (n_half,))``: one of each pair ``q, -q``
    (mod a reciprocal lattice vector) of the Gamma-centred ``n^3`` mesh
    (:func:`mesh_points`), weight 2, and the points that are their own pair, weight 1.

    With real force constants ``D(-q) = D(q)*``: the same mode energies and the same
    ``|e_j|^2``, so a mesh sum of a function of those (the Debye-Waller exponents) over
    the half mesh with these weights equals the sum over the whole mesh, at half the
    eigensolves."""
    index = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    flat = (index[:, 0] * n + index[:, 1]) * n + index[:, 2]
    neg = (-index) % n
    flat_neg = (neg[:, 0] * n + neg[:, 1]) * n + neg[:, 2]
    keep = flat <= flat_neg
    weights = np.where(flat[keep] == flat_neg[keep], 1.0, 2.0)
    return index[keep] / n, weights


def dynamical_gradient(basis: FCBasis, qpts: NDArray[np.float64]) -> NDArray[np.complex128]:
    """(k, n, 3, m, m) dD_k/dQ_a (Cartesian, 1/A) at ``qpts`` ((n, 3), r.l.u.) by central
    differences."""
    h = 1e-4  # 1/A
    inv = np.linalg.inv(basis.crystal.reciprocal_lattice)
    out = []
    for a in range(3):
        step = h * inv[a]  # r.l.u. of a Cartesian step along a
        plus = basis.dynamical_basis(qpts + step)
        minus = basis.dynamical_basis(qpts - step)
        out.append((plus - minus) / (2 * h))
    return np.stack(out, axis=2)


def dynamical_hessian(basis: FCBasis, qpts: NDArray[np.float64]) -> NDArray[np.complex128]:
    """(k, n, 9, m, m) d^2 D_k / dQ_a dQ_b (Cartesian, 1/A^2; ``a b`` flattened) at ``qpts``
    ((n, 3), r.l.u.) by central differences (step 1e-3 1/A: the truncation error is
    ``(h r)^2 / 12`` relative, about 3e-6 for the 5th neighbours of Ge)."""
    h = 1e-3  # 1/A
    inv = np.linalg.inv(basis.crystal.reciprocal_lattice)
    at = basis.dynamical_basis(qpts)
    k, n, m, _ = at.shape
    out = np.empty((k, n, 3, 3, m, m), dtype=complex)
    for a in range(3):
        sa = h * inv[a]
        out[:, :, a, a] = (
            basis.dynamical_basis(qpts + sa) - 2.0 * at + basis.dynamical_basis(qpts - sa)
        ) / (h * h)
        for b in range(a + 1, 3):
            sb = h * inv[b]
            mixed = (
                basis.dynamical_basis(qpts + sa + sb)
                - basis.dynamical_basis(qpts + sa - sb)
                - basis.dynamical_basis(qpts - sa + sb)
                + basis.dynamical_basis(qpts - sa - sb)
            ) / (4.0 * h * h)
            out[:, :, a, b] = mixed
            out[:, :, b, a] = mixed
    return out.reshape(k, n, 9, m, m)


@dataclass(frozen=True, slots=True)
class _Bend:
    """The branches' curvature across the tube at the distinct q-points (u) of a forward
    pass (:func:`_curvature`): ``w`` (u, 9, m) meV A^2, the line centre's second-order
    shift per unit second moment of the offsets, and what its derivative reuses."""

    w: NDArray[np.float64]  # (u, 9, m)
    d2e: NDArray[np.complex128]  # (u, 9, m, n): e_m^H d2D/dQ_a dQ_b e_n
    pair: NDArray[np.float64]  # (u, 9, m, n): Re(B_a,mn B_b,nm)
    inv_geff: NDArray[np.float64]  # (u, m, n): g / (g^2 + 4 X), 0 within a degenerate cluster
    d_inv_dg: NDArray[np.float64]  # (u, m, n): its derivatives by g
    d_inv_dx: NDArray[np.float64]  # and by X
    lam2: NDArray[np.float64]  # (u, 9, m): the cluster mean of d2lambda / 2
    vv: NDArray[np.float64]  # (u, 9, m): v_a v_b
    k9: NDArray[np.float64]  # (u, 9, m): the degenerate splitting K
    ok: NDArray[np.bool_]  # (u, m): modes above the frequency floor
    e_safe: NDArray[np.float64]  # (u, m): their energies (meV), 1 elsewhere


def _curvature(
    d2dyn_rows: NDArray[np.float64],
    c: NDArray[np.float64],
    vec: NDArray[np.complex128],
    vh: NDArray[np.complex128],
    lam: NDArray[np.float64],
    cluster: NDArray[np.int64],
    avg: NDArray[np.float64],
    bq: NDArray[np.complex128],
    half_inv: NDArray[np.float64],
    vel: NDArray[np.float64],
    energy: NDArray[np.float64],
    ok: NDArray[np.bool_],
    split: NDArray[np.float64],
    sbar: float,
) -> _Bend:
    """The mean second-order shift of each mode's energy across the folding tube, per unit
    second moment ``S = <delta delta^T>`` of the cells' offsets: ``<E(q + delta)> - E(q) -
    v . <delta> = W : S`` with

        W_m = dE/dlambda Lambda_m - (v_m v_m^T + (dE/dlambda)^2 K_m) / (2 E_m),
        Lambda_m = e_m^H D_ab e_m / 2 + sum_{n not in C(m)} Re(B_a,mn B_b,nm) / g_eff,mn

    (cluster-averaged over the degenerate cluster C(m); ``D_ab`` the dynamical matrix's
    second derivatives by Q (the bases' (k, u, 9, m, m) as :func:`_real_rows`,
    ``d2dyn_rows`` (u, 9 k, 2 m^2) with k the slower index, contracted with the
    coefficients ``c``), ``B_a = e^H dD/dQ_a e`` (``bq``), ``K`` the degenerate splitting of
    :meth:`CountsModel._splitting`): second-order perturbation theory for the
    eigenvalue, and the square root's own curvature. Near-degenerate pairs would make
    ``1 / g`` (``g = lambda_m - lambda_n``) blow up where the expansion no longer holds
    across the tube, and jump where two branches cross as the coefficients change:
    ``1 / g_eff = g / (g^2 + 4 X)``, with ``X = sbar sum_a |B_a,mn|^2`` the pair's coupling
    at the tube's mean square offset per direction ``sbar`` (1/A^2; averaged over the two
    modes' clusters), is ``1 / g`` for pairs far apart, smooth and odd through a crossing
    (where the pair's shifts cancel), and at most ``1 / (4 sqrt(X))``."""
    n_u, m = lam.shape
    # sum_k c_k [Re, -Im] of each q-point's bases, one product per q-point: (u, 9, 2 m^2)
    r = np.matmul(c, d2dyn_rows.reshape(n_u, len(c), -1)).reshape(n_u, 9, 2 * m * m)
    d2 = (r[..., : m * m] - 1j * r[..., m * m :]).reshape(n_u, 9, m, m)
    d2e = vh[:, None] @ d2 @ vec[:, None]  # (u, 9, m, n)
    lin = 0.5 * np.einsum("uamm->uam", d2e).real
    pair = np.einsum("uamn,ubnm->uabmn", bq, bq).real.reshape(n_u, 9, m, m)
    gap = lam[:, :, None] - lam[:, None, :]
    other = cluster[:, :, None] != cluster[:, None, :]
    # X averaged over both modes' clusters (avg X avg^T): invariant under the arbitrary
    # choice of eigenvectors within a degenerate cluster, as the cluster sums are
    x = sbar * avg @ np.sum(np.abs(bq) ** 2, axis=1) @ np.swapaxes(avg, 1, 2)
    den = np.where(other, gap * gap + 4.0 * x, 1.0)
    inv_geff = np.where(other, gap / den, 0.0)
    d_inv_dg = np.where(other, (4.0 * x - gap * gap) / (den * den), 0.0)
    d_inv_dx = np.where(other, -4.0 * gap / (den * den), 0.0)
    lam2 = np.einsum("uam,unm->uan", lin + np.einsum("uamn,umn->uam", pair, inv_geff), avg)
    vv = np.einsum("uam,ubm->uabm", vel, vel).reshape(n_u, 9, m)
    k9 = split.reshape(n_u, 9, m)
    e_safe = np.where(ok, energy, 1.0)
    hi = half_inv[:, None, :]
    w = np.where(ok[:, None, :], hi * lam2 - (vv + hi * hi * k9) / (2.0 * e_safe[:, None, :]), 0.0)
    return _Bend(
        w=np.ascontiguousarray(w),
        d2e=d2e,
        pair=pair,
        inv_geff=inv_geff,
        d_inv_dg=d_inv_dg,
        d_inv_dx=d_inv_dx,
        lam2=lam2,
        vv=vv,
        k9=k9,
        ok=ok,
        e_safe=e_safe,
    )


def _curvature_derivative(
    bend: _Bend,
    d2dyn_rows: NDArray[np.float64],
    ddyn: NDArray[np.complex128],
    vec: NDArray[np.complex128],
    vh: NDArray[np.complex128],
    y_k: NDArray[np.complex128],
    inv_gap: NDArray[np.float64],
    dlam: NDArray[np.float64],
    avg: NDArray[np.float64],
    bq: NDArray[np.complex128],
    half_inv: NDArray[np.float64],
    inv_lam: NDArray[np.float64],
    vel: NDArray[np.float64],
    dvel: NDArray[np.float64],
    de_dc: NDArray[np.float64],
    sbar: float,
) -> NDArray[np.float64]:
    """(u, m, 9, k) dW/dc_k of :func:`_curvature`'s ``W``: first-order perturbation theory
    for the eigenvectors (``e_m' = sum_{l not in C(m)} e_l Y_k,lm / (lambda_m -
    lambda_l)``, ``y_k`` (k, u, m, n) ``e_m^H D_k e_n``, ``inv_gap`` (u, m, n) ``1 /
    (lambda_m - lambda_n)``, 0 within a cluster), so that an operator's elements change
    by ``A_k + C^H A + A C``; ``dlam`` (k, u, m), ``dvel`` (k, u, 3, m) and ``de_dc``
    (u, m, k) as the Jacobian has them."""
    k, n_u = y_k.shape[0], y_k.shape[1]
    m = vec.shape[1]
    cmat = y_k * np.swapaxes(inv_gap, 1, 2)[None]  # C_k[l, m] = Y_k,lm / (lambda_m - lambda_l)
    cmat_h = np.conj(np.swapaxes(cmat, 2, 3))
    # d(e_m^H D_ab e_m) / 2: the basis's own second derivatives and the eigenvectors' change
    # (2 Re sum_l conj(C_lm) (D_ab)_lm, halved)
    dmean = 0.5 * _diagonal(d2dyn_rows, vec).reshape(k, 9, n_u, m).swapaxes(1, 2)
    # as one real product per (u, m): Re(conj(C) D) = Re C Re D + Im C Im D over l
    c_um = np.transpose(cmat, (1, 3, 0, 2))  # (u, m, k, l)
    d_um = np.transpose(bend.d2e, (0, 3, 2, 1))  # (u, m, l, 9)
    both = np.concatenate([c_um.real, c_um.imag], axis=3) @ np.concatenate(
        [d_um.real, d_um.imag], axis=2
    )  # (u, m, k, 9)
    dmean += np.transpose(both, (2, 0, 3, 1))
    # dB_a,mn = e_m^H dD_a,k e_n + (C^H B_a + B_a C)_mn
    db = vh[None, :, None] @ ddyn @ vec[None, :, None]  # (k, u, 3, m, n)
    db += cmat_h[:, :, None] @ bq[None] + bq[None] @ cmat[:, :, None]
    # d sum_n Re(B_a,mn B_b,nm) / g_eff,mn = F_ab + F_ba, F_ab = Re sum_n dB_a,mn B_b,nm /
    # g_eff,mn (B and dB Hermitian), plus sum_n pair_ab,mn d(1 / g_eff,mn)
    gb = np.swapaxes(bq, 2, 3) * bend.inv_geff[:, None]  # (u, 3, m, n): B_b,nm / g_eff,mn
    # F per (u, m) as one product: (k a, n) @ (n, b), real part
    db_um = np.transpose(db, (1, 3, 0, 2, 4)).reshape(n_u, m, 3 * k, m)  # (u, m, k a, n)
    gb_um = np.transpose(gb, (0, 2, 3, 1))  # (u, m, n, b)
    f = (db_um.real @ gb_um.real - db_um.imag @ gb_um.imag).reshape(n_u, m, k, 3, 3)
    f = np.transpose(f, (2, 0, 3, 4, 1))  # (k, u, a, b, m)
    dmean += (f + np.swapaxes(f, 2, 3)).reshape(k, n_u, 9, m)
    dx = 2.0 * sbar * np.sum(np.conj(bq)[None] * db, axis=2).real  # (k, u, m, n)
    dx = avg[None] @ dx @ np.swapaxes(avg, 1, 2)[None]
    dgap = dlam[:, :, :, None] - dlam[:, :, None, :]  # (k, u, m, n)
    z = np.moveaxis(bend.d_inv_dg * dgap + bend.d_inv_dx * dx, 0, -1)  # (u, m, n, k)
    # sum_n pair[u, ab, m, n] z[u, m, n, k] as one product per (u, m): (u, m, 9, k)
    dmean += np.moveaxis(np.swapaxes(bend.pair, 1, 2) @ z, -1, 0).swapaxes(2, 3)
    dlam2 = np.einsum("kuam,unm->kuan", dmean, avg)
    # the degenerate splitting's change: K_ab,m = (1 / g) Re tr_C(B~_a B~_b) over the
    # cluster C of m, B~ the traceless part of B within it; since B~_b is traceless there,
    # dK_ab = (1 / g) Re(tr_C(dB_a B~_b) + tr_C(dB_b B~_a)) (the projector's change is in dB)
    same = (avg > 0).astype(float)  # (u, m, n)
    size = same.sum(axis=2)  # (u, m)
    mean_b = np.einsum("uamm->uam", bq).real @ (same / size[:, :, None])  # (u, a, n)
    tl = bq * same[:, None] - np.eye(m) * mean_b[..., None]  # (u, b, l, n)
    # T_ab,n = sum_l dB_a,nl B~_b,ln, then summed over the cluster's n: (k, u, a, b, m)
    t_ab = np.einsum("kuanl,ubln->kuabn", db, tl).real @ same[None, :, None].swapaxes(-1, -2)
    dk9 = (t_ab + np.swapaxes(t_ab, 2, 3)) / size[None, :, None, None, :]
    dk9 = np.where(size[None, :, None, None, :] > 1, dk9, 0.0).reshape(k, n_u, 9, m)
    hi = half_inv[None, :, None, :]  # (1, u, 1, m)
    dhi = (-0.5 * half_inv[None] * dlam * inv_lam[None])[:, :, None, :]  # (k, u, 1, m)
    de = np.moveaxis(de_dc, 2, 0)[:, :, None, :]  # (k, u, 1, m)
    e_safe = bend.e_safe[None, :, None, :]
    dvv = (dvel[:, :, :, None] * vel[None, :, None]).reshape(k, n_u, 9, m)
    dvv = dvv + np.swapaxes(dvv.reshape(k, n_u, 3, 3, m), 2, 3).reshape(k, n_u, 9, m)
    top = bend.vv[None] + hi * hi * bend.k9[None]
    dw = (
        dhi * bend.lam2[None]
        + hi * dlam2
        - (dvv + 2.0 * hi * dhi * bend.k9[None] + hi * hi * dk9) / (2.0 * e_safe)
        + top * de / (2.0 * e_safe * e_safe)
    )
    dw = np.where(bend.ok[None, :, None, :], dw, 0.0)
    return np.ascontiguousarray(np.transpose(dw, (1, 3, 2, 0)))  # (u, m, 9, k)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Forward:
    """What :meth:`CountsModel.evaluate`'s forward pass keeps for the Jacobian: per
    distinct q-point (u) the modes, their clusters, velocities and ``e^H dD/dQ e``; per
    (bin, mode) element near a line (``near``) the line's centre shift and width and the
    products ``e_m^H T``."""

    energy: NDArray[np.float64]  # (p, m) meV, per fitted point
    stable: bool
    expected: NDArray[np.float64]  # (n_bins,)
    signal: NDArray[np.float64]  # (p, e)
    lam: NDArray[np.float64]  # (u, m)
    vec: NDArray[np.complex128]  # (u, m, m)
    ok: NDArray[np.bool_]  # (u, m)
    lam_safe: NDArray[np.float64]  # (u, m)
    cluster: NDArray[np.int64]  # (u, m)
    avg: NDArray[np.float64]  # (u, m, m)
    bq: NDArray[np.complex128]  # (u, 3, m, m)
    half_inv: NDArray[np.float64]  # (u, m)
    vel: NDArray[np.float64]  # (u, 3, m)
    near: _Near  # the (p, e, m) elements near a line
    left: NDArray[np.complex128]  # (n_near, m): e_m^H T of the elements near a line
    a: NDArray[np.float64]  # (n_near,): e_m^H T e_m
    left_x: NDArray[np.complex128]  # (n_near, m): e_m^H T_x (3 sum w x M, the positions)
    a_x: NDArray[np.float64]  # (n_near,): e_m^H T_x e_m
    base: NDArray[np.float64]  # (n_near, _BASE_TERMS): the line shapes' transcendentals
    bend: _Bend | None  # the branches' curvature across the tube (None: left out)


@dataclass(frozen=True, slots=True)
class _Near:
    """The elements of an array of ``shape`` near a line's centre (``at``, as from
    ``np.nonzero``) with their mode energy, offset mean and variance and bin edge (1-D)."""

    shape: tuple[int, ...]
    at: tuple[NDArray[np.intp], ...]
    e: NDArray[np.float64]
    mu: NDArray[np.float64]
    tau2: NDArray[np.float64]
    lo: NDArray[np.float64]
    #: the resolution's sigma, its derivative, the Bose occupation and its derivative at
    #: each element's mode energy, when taken per mode (else computed from ``e``)
    widths: tuple[NDArray[np.float64], ...] | None = None

    @classmethod
    def of(
        cls,
        shape: tuple[int, int, int],
        energy: NDArray[np.float64],
        e_lo: NDArray[np.float64],
        ip: NDArray[np.intp],
        ie: NDArray[np.intp],
        im: NDArray[np.intp],
        mu: NDArray[np.float64],
        tau2: NDArray[np.float64],
        *,
        point_q: NDArray[np.int64],
        per_mode: tuple[NDArray[np.float64], ...],
    ) -> _Near:
        """From the elements (point, energy bin, mode) :func:`_near_lines` found, with
        the mode energies ``energy`` ((n_u, m) per distinct q-point, ``point_q`` each
        point's), the bins' lower edges ``e_lo`` and ``per_mode`` (sigma_res, its
        derivative, Bose, its derivative; (n_u, m) each), gathered for each element."""
        flat = point_q[ip] * energy.shape[1] + im
        return cls(
            shape=shape,
            at=(ip, ie, im),
            e=np.take(energy, flat),
            mu=mu,
            tau2=tau2,
            lo=e_lo[ie],
            widths=tuple(np.take(x, flat) for x in per_mode),
        )

    def dense(self, parts: list[NDArray[np.float64]]) -> Any:
        """``parts`` (1-D, on these elements) as dense arrays of ``shape``, 0 elsewhere:
        one array, or a tuple of them when there are several."""
        out = []
        for part in parts:
            full = np.zeros(self.shape)
            full[self.at] = part
            out.append(full)
        return tuple(out) if len(out) > 1 else out[0]


class CountsModel:
    """Expected counts of the folded bins of a run, as a function of the parameters.

    Parameters
    ----------
    basis
        The material's symmetry-reduced FC basis (all its coefficients are parameters).
    grid
        The (q, E) grid of the counts (uniform energy bins).
    resolution
        The instrument's energy resolution sigma(E).
    moments
        The run's per-bin moments (canonical bins, ``n_q * n_E`` of them).
    alias
        (n_q,) int, :attr:`consumers.reduction.table.FoldTable.alias`: only points with
        ``alias[q] == q`` are fitted (the others hold copies of their counts).
    tolerance
        The folding tube's radius, 1/A (for the zone-centre exclusion).
    temperature
        Sample temperature, K (Bose factor, Debye-Waller factors).
    reference
        (n_coeff,) the coefficients whose Debye-Waller factors the moments were taken
        with; None holds the Debye-Waller factors at those of the moments.
    min_weight
        Bins with less exposure (uC sr meV) than this are left out.
    exclusion
        1/A: points closer than this to a zone centre are left out (default
        :data:`GAMMA_EXCLUSION` tube radii).

    The parameter vector is the ``n_coeff`` coefficients (eV/A^2) in the basis's order,
    then :data:`NUISANCE`.
    """

    def __init__(
        self,
        basis: FCBasis,
        grid: Grid,
        resolution: EnergyResolution,
        moments: BinMoments,
        *,
        alias: NDArray[np.int64],
        tolerance: float,
        temperature: float,
        reference: NDArray[np.float64] | None = None,
        min_weight: float = 0.0,
        exclusion: float | None = None,
        e_min: float | None = None,
        extra: NDArray[np.float64] | None = None,
        correction: NDArray[np.float64] | None = None,
        bases: ModeBases | None = None,
        curvature: bool = True,
    ) -> None:
        n_q, n_e = grid.shape
        if moments.weight.shape != (n_q * n_e,):
            raise RefinementError(
                f"the moments hold {moments.weight.shape[0]} bins but the grid has "
                f"{n_q} x {n_e}: they were accumulated on another grid"
            )
        m = 3 * basis.crystal.n_atoms
        if moments.tensor.shape[1:] != (m, m):
            raise RefinementError(
                f"the moments are for {moments.tensor.shape[1] // 3} atoms, the crystal has "
                f"{basis.crystal.n_atoms}"
            )
        edges = grid.energy_edges
        if not np.allclose(np.diff(edges), edges[1] - edges[0]):
            raise RefinementError("the counts model needs uniform energy bins")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise RefinementError(f"temperature must be finite and >= 0 K, got {temperature}")
        self.basis = basis
        self.grid = grid
        self.resolution = resolution
        self.temperature = float(temperature)
        self.n_coefficients = basis.n_coefficients
        self.names = tuple(basis.names) + NUISANCE
        qpts = np.asarray(grid.qpath.qpoints, dtype=float)
        rec = basis.crystal.reciprocal_lattice
        reduced = qpts - np.rint(qpts)
        radius = GAMMA_EXCLUSION * tolerance if exclusion is None else float(exclusion)
        far = np.linalg.norm(reduced @ rec, axis=1) > radius
        canonical = np.asarray(alias) == np.arange(n_q)
        weight = moments.weight.reshape(n_q, n_e)
        use = (canonical & far)[:, None] & (weight > max(min_weight, 0.0))
        if e_min is not None:  # the elastic line's bins are not fitted
            use &= (edges[:-1] >= e_min)[None, :]
        if not use.any():
            raise RefinementError(
                "no measured bins to fit: nothing was folded away from the zone centres "
                "and above the elastic line yet"
            )
        if extra is not None and np.shape(extra) != (n_q * n_e,):
            raise RefinementError(
                f"the fixed signal has {np.size(extra)} bins, the grid {n_q} x {n_e}"
            )
        if correction is not None and (
            np.shape(correction) != (n_q * n_e,)
            or not np.all(np.isfinite(correction))
            or np.any(np.asarray(correction) <= 0)
        ):
            raise RefinementError(
                f"the exact-fold correction must be {n_q * n_e} finite factors > 0"
            )
        self.points = np.nonzero(use.any(axis=1))[0]  # fitted path points
        self._use = use[self.points]  # (n_p, n_E): the fitted bins among the points' rows
        self._use_at = np.flatnonzero(self._use)  # the same, as flat indices (for np.take)
        #: (n_p * n_E,) each bin's row among the fitted bins, -1 where it is not fitted
        self._row_of = np.full(self._use.size, -1, dtype=np.int64)
        self._row_of[self._use_at] = np.arange(len(self._use_at))
        dense = (self.points[:, None] * n_e + np.arange(n_e)[None, :]).reshape(-1)
        self._dense = dense  # (p * e,) each (point, energy) element's bin in the moments
        #: (n_bins,) flat indices (q * n_E + E) of the fitted bins in the (n_q, n_E) grid.
        self.bins = dense[self._use.reshape(-1)]
        shape = (len(self.points), n_e)
        w = moments.weight[dense].reshape(shape)
        safe = np.where(w > 0, w, 1.0)
        # the bins' tensors, copied (the accumulator goes on adding) in single precision:
        # half the memory and the memory traffic of the model's largest arrays (a Ge zone
        # classes' orientation: 56 instead of 113 MB), at a relative 6e-8 of each element
        # (every product with them is in double precision)
        self._tensor = _gather_single(moments.tensor, dense, shape)
        self._tensor_q2 = _gather_single(moments.tensor_q2, dense, shape)
        # 3 sum w x M: the first Legendre term of each bin's positions (x in [-1, 1]) by mode
        self._tensor_x = _gather_single(moments.tensor_x, dense, shape, 3.0)
        mean = np.take(moments.offset1, dense, axis=0).reshape(*shape, 3) / safe[..., None]
        self._mean_offset = mean  # (p, e, 3)
        self._offset_cov = np.take(moments.offset2, dense, axis=0).reshape(*shape, 3, 3) / safe[
            ..., None, None
        ] - np.einsum("pei,pej->peij", mean, mean)
        # the offsets' second moment about the path point, (p, e, 9)
        self._second = (self._offset_cov + np.einsum("pea,peb->peab", mean, mean)).reshape(
            *shape, 9
        )
        #: (p, e, 3) per bin, bounds for :func:`_near_lines`' quick test: |<delta>|, the
        #: Frobenius norm of Cov(delta) (>= its largest |eigenvalue|) and sum |second|
        self._bin_bounds = np.ascontiguousarray(
            np.stack(
                [
                    np.linalg.norm(mean, axis=-1),
                    np.sqrt(np.sum(self._offset_cov**2, axis=(-2, -1))),
                    np.sum(np.abs(self._second), axis=-1),
                ],
                axis=-1,
            )
        )
        self._background = moments.background[dense].reshape(shape)
        self._extra = (
            np.zeros(shape)
            if extra is None
            else np.asarray(extra, dtype=float)[dense].reshape(shape)
        )
        self._correction = (
            None
            if correction is None
            else np.asarray(correction, dtype=float)[dense].reshape(shape)
        )
        self._e_lo = edges[:-1][None, :, None]  # (1, e, 1)
        self._de = float(edges[1] - edges[0])
        # the modes are solved per distinct q-point: the zone classes' rows of a path point
        # repeat its q-point
        distinct, point_q = np.unique(qpts[self.points], axis=0, return_inverse=True)
        #: (n_p,) each fitted point's row among the distinct q-points.
        self._point_q = np.asarray(point_q).reshape(-1)
        bases = ModeBases(basis) if bases is None else bases
        self._bases = bases
        #: (n_u, 3) r.l.u., the distinct q-points of the fitted points
        self._distinct = distinct
        self._dyn, self._ddyn = bases.at(distinct)  # (k, n_u, m, m), (k, n_u, 3, m, m)
        #: (n_u, 3 k, 2 m^2) the Q gradients' bases as real rows: the diagonal elements
        #: e_m^H dD_k/dQ_a e_m of all k and a in one real product per q-point (_diagonal).
        self._ddyn_rows = _real_rows(self._ddyn)
        #: the branches' curvature across the tube: d^2 D_k/dQ_a dQ_b as real rows (n_u, 9 k,
        #: 2 m^2), k-major (:func:`_real_rows`; a complex copy in the model would double its
        #: largest per-q-point array, 13.5 MB for an orientation of Ge's zone classes; the
        #: bases' own cache keeps one, shared by every model), and the tube's mean square
        #: offset per direction (1/A^2, a uniform disc of its radius)
        self._d2dyn_rows = _real_rows(bases.hessian(distinct)) if curvature else None
        self._sbar = 0.25 * float(tolerance) ** 2
        self._last: tuple[bytes, _Forward] | None = None
        self._dw_last: (
            tuple[bytes, NDArray[np.float64], NDArray[np.complex128], NDArray[np.float64]] | None
        ) = None
        self._pref = HBAR2_OVER_2AMU * FM2_TO_MBARN / basis.crystal.n_atoms
        self._dw_ref: NDArray[np.float64] | None = None
        if reference is not None:
            # (k, n_half, m, m), (n_half,), (n_half, k, 2 m^2): shared by the bases' models
            self._dw_dyn, self._dw_weights, self._dw_rows = bases.mesh()
            atom = np.arange(m) // 3
            self._atom_onehot = (atom[:, None] == np.arange(basis.crystal.n_atoms)).astype(
                float
            )  # (m, n_at)
            self._dw_pref = HBAR2_OVER_2AMU / (
                2.0 * np.asarray(basis.crystal.masses) * DW_MESH**3 * 3.0
            )
            self._dw_ref = self.debye_waller(np.asarray(reference, dtype=float))[0]

    @property
    def n_bins(self) -> int:
        """Fitted bins."""
        return len(self.bins)

    @property
    def background_shape(self) -> NDArray[np.float64]:
        """(n_bins,) the background's shape in the fitted bins (its Jacobian column)."""
        return np.asarray(self._background[self._use])

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays the model holds of its own (its moments' gathered bins and
        the modes' bases at its q-points), without the forward pass it keeps for the
        Jacobian (:meth:`release`) and without what every model of the run shares (the
        Debye-Waller mesh's bases, the bases' caches)."""
        shared = {"_dw_dyn", "_dw_weights", "_dw_rows"}
        return int(
            sum(
                v.nbytes
                for k, v in vars(self).items()
                if isinstance(v, np.ndarray) and k not in shared
            )
        )

    @property
    def n_params(self) -> int:
        """Coefficients plus nuisance parameters."""
        return self.n_coefficients + len(NUISANCE)

    def observed(self, counts: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n_bins,) the fitted bins of (n_q, n_E) counts."""
        c = np.asarray(counts, dtype=float)
        if c.shape != self.grid.shape:
            raise RefinementError(f"counts of shape {c.shape}, the grid is {self.grid.shape}")
        out = c.reshape(-1)[self.bins]
        if not np.all(np.isfinite(out)) or np.any(out < 0):
            raise RefinementError("counts must be finite and >= 0")
        return np.asarray(out)

    def theta(
        self,
        coefficients: NDArray[np.float64],
        *,
        log_scale: float = 0.0,
        background: float = 0.0,
        resolution_scale: float = 1.0,
        q_variance: float = 0.0,
    ) -> NDArray[np.float64]:
        """The parameter vector of ``coefficients`` ((n_coeff,), eV/A^2) and nuisances."""
        c = np.asarray(coefficients, dtype=float)
        if c.shape != (self.n_coefficients,):
            raise RefinementError(f"expected {self.n_coefficients} coefficients, got {c.shape}")
        return np.concatenate([c, [log_scale, background, resolution_scale, q_variance]])

    def start_nuisance(
        self, coefficients: NDArray[np.float64], counts: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """A starting parameter vector: ``coefficients`` with the scale and background
        that match the observed total and the counts' share in the bins with no signal."""
        y = self.observed(counts)
        k0 = self.n_coefficients
        theta = self.theta(coefficients)
        ev = self.evaluate(theta, jacobian=False)
        sig = ev.expected
        # least squares of y on (signal, background) over all bins, non-negative
        a = np.stack([sig, self._background[self._use]], axis=1)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        s = max(float(coef[0]), 1e-12 if sig.sum() <= 0 else 0.05 * y.sum() / sig.sum())
        beta = max(float(coef[1]), 0.0)
        theta[k0] = math.log(s)
        theta[k0 + 1] = beta
        return theta

    def debye_waller(
        self, c: NDArray[np.float64], *, jacobian: bool = False
    ) -> tuple[NDArray[np.float64], NDArray[np.float64] | None]:
        """Isotropic Debye-Waller exponents ``b_j`` (A^2, (n_atoms,)) of coefficients ``c``
        on the :data:`DW_MESH` mesh (summed over its half, :func:`half_mesh`) and, with
        ``jacobian``, ``db_j/dc_k`` ((n_atoms, n_coeff), through the mode energies)."""
        key = c.tobytes()
        last = self._dw_last  # read once: release() may drop it from another thread
        if last is not None and last[0] == key:
            _, lam, vec, weight = last  # the forward pass's, for its Jacobian
        else:
            d = np.tensordot(c, self._dw_dyn, 1)  # sum_k c_k D_k
            lam, vec = np.linalg.eigh(d)
            # |e_j|^2 per atom, times the point's weight on the half mesh: (q, m, atoms)
            weight = np.einsum(
                "qim,ia,q->qma", np.abs(vec) ** 2, self._atom_onehot, self._dw_weights
            )
            self._dw_last = (key, lam, vec, weight)
        ok = lam > (FREQUENCY_MIN_MEV / _TO_MEV) ** 2
        lam_safe = np.where(ok, lam, 1.0)
        e = _TO_MEV * np.sqrt(lam_safe)
        kt = K_B_MEV * self.temperature
        if kt > 0:
            x = e / (2.0 * kt)
            th = np.tanh(x)
            f = 1.0 / (e * th)
            df = -1.0 / (e * e * th) - 1.0 / (e * np.sinh(x) ** 2 * 2.0 * kt)
        else:
            f = 1.0 / e
            df = -1.0 / (e * e)
        f = np.where(ok, f, 0.0)
        b = self._dw_pref * np.einsum("qm,qma->a", f, weight)
        if not jacobian:
            return b, None
        dlam = _diagonal(self._dw_rows, vec)  # (k, q, m): e_m^H D_k e_m
        de = np.where(ok, _TO_MEV / (2.0 * np.sqrt(lam_safe)), 0.0)[None] * dlam  # (k,q,m)
        db = self._dw_pref[:, None] * np.einsum("qm,kqm,qma->ak", np.where(ok, df, 0.0), de, weight)
        return b, db

    def evaluate(self, theta: NDArray[np.float64], *, jacobian: bool = True) -> Evaluation:
        """Expected counts (and their Jacobian) at ``theta`` ((n_params,)).

        The modes are solved once per distinct q-point (the zone classes' rows of one
        path point share them), and the expected counts of the last ``theta`` are kept,
        so that the Jacobian at a point the fit has just evaluated (its accepted step)
        adds only its own part."""
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (self.n_params,):
            raise RefinementError(f"expected {self.n_params} parameters, got {theta.shape}")
        key = theta.tobytes()
        last = self._last
        fw = last[1] if last is not None and last[0] == key else self._forward(theta)
        self._last = (key, fw)
        if not jacobian:
            return Evaluation(
                expected=fw.expected, jacobian=None, energies=fw.energy, stable=fw.stable
            )
        return Evaluation(
            expected=fw.expected,
            jacobian=self._jacobian(theta, fw),
            energies=fw.energy,
            stable=fw.stable,
        )

    def release(self) -> None:
        """Let go of the forward pass that :meth:`evaluate` keeps for the Jacobian at the
        same point (and the Debye-Waller modes): a model kept for later, as the planner's
        nodes are, then holds only its moments (the pass of a node of Ge's zone classes is
        ~45 MB)."""
        self._last = None
        self._dw_last = None

    def first_order(
        self, theta: NDArray[np.float64], tensor_d: NDArray[np.complex128]
    ) -> NDArray[np.float64]:
        """(n_bins,) the expected counts at ``theta`` with first-order terms across
        the folding tube that :meth:`evaluate` leaves out, from the offsets' tensors
        ``tensor_d`` ((n_moment_bins, 3, 3N, 3N): ``sum w delta_a M(Q')`` on the moments'
        bins, :func:`consumers.reduction.moments.offset_tensors` summed over the run's
        orientations by charge, as the moments):

        * each (bin, mode) line centred at ``v_m . <delta>_m``, the offsets' mean weighted
          by the mode's own intensity at each cell (``e_m^H Td_a e_m / e_m^H T e_m``),
          instead of the cells' weight's ``v_m . <delta>``;
        * each mode's intensity ``e_m^H T e_m`` plus its first-order change with the
          eigenvector across the tube, ``2 Re sum_a (d_a e_m)^H Td_a e_m``, ``d_a e_m =
          sum_{n not in C(m)} e_n B_a,nm / g_eff,mn`` (``B_a = e^H dD/dQ_a e``, the damped
          inverse gaps of the curvature, :func:`_curvature`; plain ``1 / g`` without it);
        * modes closer than :data:`PAIR_GAP_MEV` at a path point (above all the degenerate
          or nearly degenerate: Ge's transverse pairs along its symmetry lines; runs of
          modes each within the gap of the next) taken together across the tube
          instead (:func:`_pair_lines`): their block diagonalised over the bin's offsets,
          each branch, in order of energy, a line at its own mean energy and spread with
          its own eigenvector's intensity (the eigenvector's change towards the other
          modes as above). Needs the curvature's bases (a model built without them keeps
          the two terms above for every mode).

        Against the exact fold of one orientation of the README's Ge run the first two
        terms take the model's per-bin error from 2.1 to 0.7 % (median; ``make bench``,
        ``bench_counts_model``), and the close modes the bins within 2 % from 81 to 89 %
        and the largest deviation from 60 to 23 %. Forward only: no Jacobian, so the fits
        use them as fixed factors made at a point
        (:func:`model_server.refinement.exact.first_order_correction`); the Debye-Waller
        change of the terms is left out. Not for a model built with a correction (its
        factors would scale the terms too); neither reads nor keeps the forward pass that
        :meth:`evaluate` keeps for its Jacobian."""
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (self.n_params,):
            raise RefinementError(f"expected {self.n_params} parameters, got {theta.shape}")
        if self._correction is not None:
            raise RefinementError(
                "the first-order terms are for the model without a correction (its factors "
                "would scale them too): build it without one"
            )
        m = self._tensor.shape[-1]
        n_moment_bins = self.grid.n_q * self.grid.n_e
        tensor_d = np.asarray(tensor_d)
        if tensor_d.shape != (n_moment_bins, 3, m, m):
            raise RefinementError(
                f"offsets' tensors of shape {tensor_d.shape} do not fit this model's moments: "
                f"expected {(n_moment_bins, 3, m, m)} (the same grid and binning)"
            )
        td = np.take(tensor_d, self._dense, axis=0).reshape(*self._use.shape, 3, m, m)
        return self._forward(theta, tensor_d=td).expected

    def _forward(
        self, theta: NDArray[np.float64], *, tensor_d: NDArray[np.complex128] | None = None
    ) -> _Forward:
        """The expected counts at ``theta`` and what their Jacobian reuses (with
        ``tensor_d``, (p, e, 3, m, m), the first-order terms of :meth:`first_order`,
        whose results no Jacobian may reuse)."""
        k = self.n_coefficients
        c = theta[:k]
        scale = math.exp(float(theta[k]))
        beta, r, eta2 = float(theta[k + 1]), float(theta[k + 2]), max(float(theta[k + 3]), 0.0)
        # per distinct q-point (u): modes, velocities and degenerate splittings
        modes = self._modes(c)
        lam, vec, ok, lam_safe, energy, cluster, avg, _vh, bq, split, half_inv, vel = modes
        stable = bool(np.all(lam > -1e-9 * max(1.0, float(np.abs(lam).max()))))
        bend = (
            None if self._d2dyn_rows is None else self._bend(self._d2dyn_rows, c, modes, self._sbar)
        )
        # the (bin, mode) elements near their line, with the line's centre shift and width
        # from the tube: mu = v.<delta>, tau2 = v^T (Cov(delta) + eta^2) v plus the
        # degenerate modes' splitting across it, E[delta^T K delta] (dE/dlambda)^2
        n_p, n_e = self._use.shape
        sres, dsres = self._sigma_res(energy)
        nb, dnb = self._bose(energy)
        near = _Near.of(
            (n_p, n_e, vec.shape[1]),
            energy,
            self._e_lo[0, :, 0],
            *_near_lines(
                self._mean_offset,
                self._offset_cov,
                self._second,
                vel,
                np.ascontiguousarray(split.reshape(len(split), 9, -1)),
                half_inv,
                energy,
                sres,
                nb > 0,
                self._e_lo[0, :, 0],
                self._de,
                r,
                eta2,
                _TAIL_Z,
                self._point_q,
                self._bin_bounds,
                np.zeros((len(lam), 9, lam.shape[1])) if bend is None else bend.w,
            ),
            point_q=self._point_q,
            per_mode=(sres, dsres, nb, dnb),
        )
        shift = np.zeros(vec.shape[1])
        if self._dw_ref is not None:
            b_now, _ = self.debye_waller(c)
            shift = self._atom_onehot @ (b_now - self._dw_ref)  # (m,) db of each row's atom
        # e_m^H T e_n (T with the Debye-Waller change) for the elements near a line only:
        # elsewhere h is 0 and they add nothing, to the counts or to the Jacobian
        ip, ie, im = near.at
        left, a = _structure_left(
            self._tensor,
            self._tensor_q2,
            shift,
            vec,
            self._point_q,
            ip,
            ie,
            im,
            self._dw_ref is not None,
        )
        # e_m^H T_x e_m: where in its bin the mode's intensity was seen (the moments'
        # first Legendre term of the positions, times 3; the Debye-Waller change of this
        # small term is left out)
        left_x, a_x = _structure_left(
            self._tensor_x, self._tensor_q2, shift, vec, self._point_q, ip, ie, im, False
        )
        if tensor_d is not None:
            inv_gap = _inverse_gaps(lam, cluster) if bend is None else bend.inv_geff
            if bend is None:
                d_mu, change = self._first_order_terms(near, vec, vel, bq, (inv_gap,), tensor_d)
            else:
                # the close groups' lines from :func:`_pair_lines` (it overwrites their
                # elements' mu, tau2, a and a_x, fresh arrays of this pass), with the
                # eigenvectors' change towards the modes outside each group only
                groups = _pair_groups(energy, ok, PAIR_GAP_MEV)
                outside = np.where(groups[:, :, None] == groups[:, None, :], 0.0, inv_gap)
                d_mu, change, change_out = self._first_order_terms(
                    near, vec, vel, bq, (inv_gap, outside), tensor_d
                )
            near = replace(near, mu=near.mu + d_mu)
            a = a + change
            if bend is not None:
                _pair_lines(
                    near,
                    a,
                    a_x,
                    left,
                    left_x,
                    change_out,
                    groups,
                    _PairModel(
                        point_q=self._point_q,
                        lam=lam,
                        vec=vec,
                        bq=bq,
                        d2e=bend.d2e,
                        inv_gap=inv_gap,
                        mean=self._mean_offset,
                        cov=self._offset_cov,
                        tensor=self._tensor,
                        tensor_d=tensor_d,
                        eta2=eta2,
                    ),
                )
        # on the elements near a line; ``base``: their Gaussians' erfc and exp terms
        base = np.empty((len(near.e), _BASE_TERMS))
        h, hx = self._profile_at(near, r, derivatives=False, base=base, positions=True)
        flat = ip * n_e + ie
        # (p, e) the one-phonon part at unit scale
        one = np.bincount(flat, weights=a * h + a_x * hx, minlength=n_p * n_e).reshape(n_p, n_e)
        if self._correction is not None:
            one = one * self._correction
        signal = scale * (one + self._extra)
        expected = np.take(signal + beta * self._background, self._use_at)
        return _Forward(
            energy=energy[self._point_q],
            stable=stable,
            expected=expected,
            signal=signal,
            lam=lam,
            vec=vec,
            ok=ok,
            lam_safe=lam_safe,
            cluster=cluster,
            avg=avg,
            bq=bq,
            half_inv=half_inv,
            vel=vel,
            near=near,
            left=left,
            a=a,
            left_x=left_x,
            a_x=a_x,
            base=base,
            bend=bend,
        )

    def _first_order_terms(
        self,
        near: _Near,
        vec: NDArray[np.complex128],
        vel: NDArray[np.float64],
        bq: NDArray[np.complex128],
        inv_gaps: tuple[NDArray[np.float64], ...],
        tensor_d: NDArray[np.complex128],
    ) -> tuple[NDArray[np.float64], ...]:
        """The two terms of :meth:`first_order` per element near a line, (n_near,) each,
        in blocks (to bound the gathered tensors, each gathered once for all):

        * meV, ``v_m . (<delta>_m - <delta>)``: the change of its line's centre when the
          offsets are weighted by the mode's own intensity (a mode with less than 1e-6 of
          its bin's trace keeps its centre; the elements near a line are those of the
          unweighted centre: the shift is ~0.01 meV against a window of several widths);
        * ``2 Re sum_a (d_a e_m)^H Td_a e_m``: the first-order change of its mode's
          intensity with the eigenvector across the tube, once for each of ``inv_gaps``
          ((u, m, n) ``1 / (lambda_m - lambda_n)``, damped, 0 within a cluster; the second,
          where given, 0 within the close groups too: :func:`_pair_lines`' change towards
          the modes outside a group).

        Returns ``(shift, change, ...)``, a change for each of ``inv_gaps``."""
        ip, ie, im = near.at
        shift = np.zeros(len(ip))
        changes = [np.zeros(len(ip)) for _ in inv_gaps]
        for sl in _blocks(len(ip)):
            p, e, mm = ip[sl], ie[sl], im[sl]
            u = self._point_q[p]
            vm = vec[u, :, mm]  # (n, i): each element's eigenvector
            t, td = self._tensor[p, e], tensor_d[p, e]
            den = np.einsum("ni,nij,nj->n", vm.conj(), t, vm).real
            num = np.einsum("ni,naij,nj->na", vm.conj(), td, vm).real
            # the tensors are single precision: below ~1e-7 of the trace den is rounding
            ok = den > 1e-6 * np.trace(t, axis1=1, axis2=2).real
            mean = num / np.where(ok, den, 1.0)[:, None] - self._mean_offset[p, e]
            shift[sl] = np.where(ok, np.sum(vel[u, :, mm] * mean, axis=1), 0.0)
            tdv = np.einsum("naij,nj->nai", td, vm)  # (n, a, i): Td_a e_m
            for change, inv_gap in zip(changes, inv_gaps, strict=True):
                coef = bq[u, :, :, mm] * inv_gap[u, mm, :][:, None, :]  # (n, a, l): B_a,lm / g
                de = np.einsum("nil,nal->nai", vec[u], coef)  # (n, a, i): d_a e_m
                change[sl] = 2.0 * np.einsum("nai,nai->n", de.conj(), tdv).real
        return (shift, *changes)

    def _modes(self, c: NDArray[np.float64]) -> tuple[Any, ...]:
        """Per distinct q-point (u) at the coefficients ``c``: ``(lam, vec, ok, lam_safe,
        energy, cluster, avg, vh, bq, split, half_inv, vel)``: eigenvalues (u, m) and
        eigenvectors (u, m, m, columns), which are above the frequency floor, the energies
        (meV), the degenerate clusters and their averaging matrices, ``e_m^H dD/dQ_a e_n``
        (u, 3, m, n), the degenerate splittings (u, 3, 3, m), dE/dlambda and the group
        velocities (u, 3, m; meV A, cluster-averaged)."""
        d = np.tensordot(c, self._dyn, 1)  # sum_k c_k D_k: (u, m, m)
        lam, vec = np.linalg.eigh(d)  # (n_u, m), (n_u, m, m) columns
        ok = lam > (FREQUENCY_MIN_MEV / _TO_MEV) ** 2
        lam_safe = np.where(ok, lam, 1.0)
        energy = np.where(ok, _TO_MEV * np.sqrt(lam_safe), 0.0)
        cluster = self._clusters(lam)
        avg = self._cluster_weights(cluster)  # (u, m, m)
        vh = np.conj(np.swapaxes(vec, 1, 2))  # (u, m, i)
        dd = np.tensordot(c, self._ddyn, 1)  # (u, 3, m, m)
        bq = vh[:, None] @ (dd @ vec[:, None])  # (u, a, m, n): e_m^H dD/dQ_a e_n
        vlam = np.einsum("qamm->qam", bq).real  # dlambda/dQ
        vlam = np.einsum("qam,qnm->qan", vlam, avg)
        same = (cluster[:, :, None] == cluster[:, None, :]).astype(float)  # (u, m, n)
        split = self._splitting(bq, same)  # (u, a, b, m)
        half_inv = np.where(ok, _TO_MEV / (2.0 * np.sqrt(lam_safe)), 0.0)  # dE/dlambda
        vel = vlam * half_inv[:, None, :]  # (u, 3, m) meV A
        return lam, vec, ok, lam_safe, energy, cluster, avg, vh, bq, split, half_inv, vel

    def curvature(
        self, coefficients: NDArray[np.float64], *, regularised: bool = True
    ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        """The branches' curvature across the tube that the model applies
        (:func:`_curvature`): ``(qpoints (u, 3) r.l.u., energies (u, m) meV, W (u, 3, 3,
        m) meV A^2)`` at the fitted points' distinct q-points, each mode's (degenerate
        cluster's mean) line centre moving by ``W : <delta delta^T>`` across the tube.
        Without ``regularised``, plain second-order perturbation theory (near-degenerate
        pairs not damped)."""
        c = np.asarray(coefficients, dtype=float)
        if c.shape != (self.n_coefficients,):
            raise RefinementError(f"expected {self.n_coefficients} coefficients, got {c.shape}")
        d2dyn = (
            _real_rows(self._bases.hessian(self._distinct))
            if self._d2dyn_rows is None
            else self._d2dyn_rows
        )
        modes = self._modes(c)
        bend = self._bend(d2dyn, c, modes, self._sbar if regularised else 0.0)
        energy = modes[4]
        return self._distinct.copy(), energy, bend.w.reshape(*energy.shape[:1], 3, 3, -1)

    @staticmethod
    def _bend(
        d2dyn_rows: NDArray[np.float64],
        c: NDArray[np.float64],
        modes: tuple[Any, ...],
        sbar: float,
    ) -> _Bend:
        """:func:`_curvature` of the modes :meth:`_modes` solved at ``c``."""
        lam, vec, ok, _, energy, cluster, avg, vh, bq, split, half_inv, vel = modes
        return _curvature(
            d2dyn_rows, c, vec, vh, lam, cluster, avg, bq, half_inv, vel, energy, ok, split, sbar
        )

    def _jacobian(self, theta: NDArray[np.float64], fw: _Forward) -> NDArray[np.float64]:
        """(n_bins, n_params) Jacobian at ``theta`` from its forward pass ``fw``."""
        k = self.n_coefficients
        c = theta[:k]
        scale = math.exp(float(theta[k]))
        r, eta2 = float(theta[k + 2]), max(float(theta[k + 3]), 0.0)
        lam, vec, avg, bq, vel = fw.lam, fw.vec, fw.avg, fw.bq, fw.vel
        half_inv = fw.half_inv
        at = self._point_q
        n_p, n_e = self._use.shape
        ip, ie, im = fw.near.at
        flat = ip * n_e + ie
        # per distinct q-point: energy derivatives per coefficient, cluster-averaged
        vh = np.conj(np.swapaxes(vec, 1, 2))  # (u, m, i)
        y_k = vh[None] @ (self._dyn @ vec[None])  # (k, u, m, m): e_m^H D_k e_n
        dlam = np.einsum("kqm,qnm->kqn", np.einsum("kqmm->kqm", y_k).real, avg)  # (k, u, m)
        # dA/dc_k = sum_{n not in cluster(m)} 2 Re(X_mn Y_k,nm) / (lambda_m - lambda_n);
        # summed with h: sum_mn Re((X h_m)_mn Z_k,mn) as one product per point
        inv_gap = _inverse_gaps(lam, fw.cluster)  # (u, m, n)
        z = 2.0 * np.transpose(y_k, (1, 0, 3, 2)) * inv_gap[:, None]  # (u, k, m, n)
        # Zt_k,ml = sum_n e_ln Z_k,mn, (u, m, l, k): sum_n (w V)_n Z_k,mn = sum_l w_l Zt_k,ml
        zt = np.einsum("uln,ukmn->umlk", vec, z)
        h, dh_de, dh_dmu, dh_dtau2, dh_dr, hx, dx_de, dx_dmu, dx_dtau2, dx_dr = self._profile_at(
            fw.near, r, derivatives=True, base=fw.base, reuse=True, positions=True
        )
        de_dc = np.ascontiguousarray(np.transpose(dlam * half_inv[None], (1, 2, 0)))  # (u, m, k)
        # velocities: dv/dc_k = dE/dlambda d(e^H dD/dQ e)/dc_k - v dlambda/dc_k / (2 lambda),
        # d(e_m^H G e_m)/dc_k = e_m^H dD_k/dQ e_m + 2 Re sum_{n not in cluster(m)}
        # conj(Y_k,nm) G_nm / (lambda_m - lambda_n) (the eigenvectors' change: it matters
        # across the wedge's wide voxels, where it was 1 % of the 1NN columns when left out)
        # (k, u, a, m): e_m^H dD_k/dQ_a e_m
        dv_lam = _diagonal(self._ddyn_rows, vec).reshape(k, 3, *vec.shape[:2]).swapaxes(1, 2)
        dv_lam += 2.0 * np.einsum("kpnm,panm,pmn->kpam", np.conj(y_k), bq, inv_gap).real
        dv_lam = np.einsum("kqam,qnm->kqan", dv_lam, avg)
        inv_lam = np.where(fw.ok, 1.0 / fw.lam_safe, 0.0)
        dvel = (
            dv_lam * half_inv[None, :, None, :]
            - vel[None] * (0.5 * dlam * inv_lam[None])[:, :, None, :]
        )  # (k, u, 3, m)
        # sum_m [h_m sum_n Re(X_mn Z_k,mn) + A_m (dE dh_de + dmu dh_dmu + dtau2 dh_dtau2)],
        # dmu = <delta>.dv, dtau2 = 2 (C v + eta^2 v).dv, over the elements near a line
        with_dw = self._dw_ref is not None
        if with_dw:
            # dT/dc_k = -sum_a db_a/dc_k (P_a T2 + T2 P_a), P_a the rows of atom a:
            # dA_m/dc_k = -2 sum_a db_a/dc_k Re(e_m^H P_a T2 e_m)
            _, ddw = self.debye_waller(c, jacobian=True)
            assert ddw is not None
        else:
            ddw = np.zeros((1, k))
        corr = self._correction
        mult = np.full((n_p, n_e), scale) if corr is None else scale * corr  # (p, e)
        jac = np.empty((self.n_bins, self.n_params))
        jac[:, :k] = 0.0
        zr, zi = np.ascontiguousarray(zt.real), np.ascontiguousarray(zt.imag)
        dvel_t = np.ascontiguousarray(np.transpose(dvel, (1, 3, 2, 0)))  # (u, m, 3, k)
        if fw.bend is None:
            dcurv = np.zeros((0, 1, 9, k))
        else:
            assert self._d2dyn_rows is not None
            dcurv = _curvature_derivative(
                fw.bend,
                self._d2dyn_rows,
                self._ddyn,
                vec,
                vh,
                y_k,
                inv_gap,
                dlam,
                avg,
                bq,
                half_inv,
                inv_lam,
                vel,
                dvel,
                de_dc,
                self._sbar,
            )
        a, ax = fw.a, fw.a_x
        _coefficient_columns(
            jac,
            self._row_of,
            mult,
            fw.left * h[:, None] + fw.left_x * hx[:, None],
            h,
            a * dh_de + ax * dx_de,
            a * dh_dmu + ax * dx_dmu,
            2.0 * (a * dh_dtau2 + ax * dx_dtau2),
            zr,
            zi,
            de_dc,
            dvel_t,
            vel,
            self._mean_offset,
            self._offset_cov,
            eta2,
            self._tensor_q2,
            vec,
            with_dw,
            np.ascontiguousarray(ddw),
            self._second,
            dcurv,
            at,
            ip,
            ie,
            im,
            n_e,
        )  # the coefficients' columns, jac[:, :k] (the positions' part without its
        # Debye-Waller change)
        v2_near = np.sum(vel * vel, axis=1)[at[ip], im]  # |v|^2 of each element's mode
        jac_r = np.bincount(flat, weights=fw.a * dh_dr + fw.a_x * dx_dr, minlength=n_p * n_e)
        eta_w = (fw.a * dh_dtau2 + fw.a_x * dx_dtau2) * v2_near
        if fw.bend is not None:  # the centre's curvature shift eta^2 tr W
            trace = fw.bend.w[:, 0] + fw.bend.w[:, 4] + fw.bend.w[:, 8]  # (u, m)
            eta_w = eta_w + (fw.a * dh_dmu + fw.a_x * dx_dmu) * trace[at[ip], im]
        jac_eta = np.bincount(flat, weights=eta_w, minlength=n_p * n_e)
        fitted = self._use_at
        mult_at = np.take(mult, fitted)
        jac[:, k] = np.take(fw.signal, fitted)
        jac[:, k + 1] = np.take(self._background, fitted)
        jac[:, k + 2] = np.take(jac_r, fitted) * mult_at
        jac[:, k + 3] = np.take(jac_eta, fitted) * mult_at
        return jac

    # -- pieces -----------------------------------------------------------------------------

    @staticmethod
    def _clusters(lam: NDArray[np.float64]) -> NDArray[np.int64]:
        """(n, m) label of each mode's degenerate cluster (ascending eigenvalues), per
        q-point."""
        tol = _DEGENERATE * np.maximum(np.abs(lam).max(axis=1, keepdims=True), 1e-12)
        jump = np.diff(lam, axis=1) > tol
        return np.concatenate(
            [np.zeros((lam.shape[0], 1), dtype=np.int64), np.cumsum(jump, axis=1)], axis=1
        )

    @staticmethod
    def _splitting(bq: NDArray[np.complex128], same: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n, 3, 3, m) K_ab of each mode: the mean square splitting of its degenerate
        cluster per unit offset, ``(1/g) Re tr(B_a B_b)`` with ``B_a`` the traceless part of
        ``dD/dQ_a`` projected on the cluster (degenerate perturbation theory); 0 for modes
        of no degenerate cluster."""
        g = same.sum(axis=2)  # (p, m) cluster sizes
        proj = bq * same[:, None]  # (p, a, m, n) within clusters
        diag = np.einsum("pamm->pam", proj).real
        mean = np.einsum("pam,pnm->pan", diag, same / g[:, :, None])  # cluster mean of diag
        eye = np.eye(same.shape[1])[None, None]
        tl = proj - eye * mean[:, :, :, None]  # traceless within each cluster
        # sum over n, l in the cluster of mode m: Re(tl_a[n, l] tl_b[l, n]) / g
        prod = np.einsum("panl,pbln->pabnl", tl, tl).real  # (p, a, b, n, l)
        k = np.einsum("pabnl,pmn,pml->pabm", prod, same, same) / g[:, None, None, :]
        return np.asarray(np.where(g[:, None, None, :] > 1, k, 0.0))

    @staticmethod
    def _cluster_weights(cluster: NDArray[np.int64]) -> NDArray[np.float64]:
        """(n, m, m) averaging matrix over each q-point's degenerate clusters."""
        onehot = (cluster[:, :, None] == cluster[:, None, :]).astype(float)
        return np.asarray(onehot / onehot.sum(axis=2, keepdims=True))

    def _profile(
        self,
        e: NDArray[np.float64],
        mu: NDArray[np.float64],
        tau2: NDArray[np.float64],
        r: float,
        *,
        derivatives: bool = False,
        positions: bool = False,
    ) -> Any:
        """``h``: the cross-section factor of a mode of energy ``e`` (meV) in each bin,
        whose cells' energies are offset by ``u`` of mean ``mu`` and variance ``tau2``
        (arrays that broadcast to one shape with the energy bins on axis 1, ``(p, n_E,
        m)``; ``e`` usually ``(p, 1, m)``).

        A cell's one-phonon weight is ``1 / (e + u)`` (times Bose, ~1 at the fitted
        temperatures' energies); to second order in ``u`` and with Gaussian ``u``
        (Stein's identities), its mean over the bin's cells with the resolution Gaussian
        ``g`` of width ``sqrt((r sigma_res(e))^2 + tau2)`` centred at ``e + mu`` is
        ``[(1 - mu/e + (mu^2 + tau2)/e^2) g + (2 mu - e) tau2/e^2 g' + tau2^2/e^2 g'']/e``
        (``'`` derivatives by the centre), for energy loss and its mirror for gain.

        Every element with ``e > 0`` is evaluated here (0 elsewhere); the forward pass
        evaluates only those within :data:`_TAIL_Z` widths of their line
        (:func:`_near_lines`), where the others' share is below 1e-17 of the peak's.

        With ``derivatives``, returns ``(h, dh/de, dh/dmu, dh/dtau2, dh/dr)`` (analytic:
        a Gaussian's derivative by its width is ``sigma`` times its second derivative by
        its centre). With ``positions``, the same of ``k``: the line weighted by the
        position ``x`` in [-1, 1] within its bin (:func:`_line_shapes`).
        """
        e, mu, tau2, lo = np.broadcast_arrays(e, mu, tau2, self._e_lo)
        at = np.nonzero(e > 0)  # no mode, no weight: h and its derivatives are 0 there
        near = _Near(shape=e.shape, at=at, e=e[at], mu=mu[at], tau2=tau2[at], lo=lo[at])
        parts = self._profile_at(near, r, derivatives=derivatives, positions=positions)
        return near.dense(parts[len(parts) // 2 :] if positions else parts)

    def _profile_at(
        self,
        near: _Near,
        r: float,
        *,
        derivatives: bool,
        base: NDArray[np.float64] | None = None,
        reuse: bool = False,
        positions: bool = False,
    ) -> list[NDArray[np.float64]]:
        """:meth:`_profile` on the elements ``near`` names (1-D): ``[h]``, or ``[h, dh/de,
        dh/dmu, dh/dtau2, dh/dr]``; with ``positions`` followed by the same of ``hx``, the
        line weighted by the position in its bin (:func:`_line_shapes`). ``base`` ((n_near,
        :data:`_BASE_TERMS`)) receives the Gaussians' erfc and exp terms, or with ``reuse``
        holds them (from the forward pass at the same parameters: the Jacobian's line
        shapes then need no transcendental function)."""
        if near.widths is not None:
            sres, dsres, nb, dnb = near.widths
        else:
            sres, dsres = self._sigma_res(near.e)
            nb, dnb = self._bose(near.e)
        if base is None:
            base = np.empty((0, _BASE_TERMS))
        out = _line_shapes(
            near.e,
            near.mu,
            near.tau2,
            near.lo,
            sres,
            dsres,
            nb,
            dnb,
            float(r),
            self._de,
            self._pref,
            derivatives,
            base,
            reuse,
            positions,
        )
        parts = list(out[:5]) if derivatives else [out[0]]
        if positions:
            parts += list(out[5:]) if derivatives else [out[5]]
        return parts

    def _sigma_res(self, e: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Resolution sigma(E) (meV) and its derivative, as the simulator evaluates it."""
        res = self.resolution
        coef = np.asarray(res.coefficients, dtype=float)
        ec = np.clip(e, 0.0, res.e_max)
        s = np.polyval(coef, ec)
        ds = np.where((e > 0) & (e < res.e_max), np.polyval(np.polyder(coef), ec), 0.0)
        floor = s < 1e-3
        return np.where(floor, 1e-3, s), np.where(floor, 0.0, ds)

    def _bose(self, e: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Bose occupation n(E) and dn/dE (zero above 40 kT and at 0 K, as the simulator)."""
        kt = K_B_MEV * self.temperature
        if kt <= 0:
            z = np.zeros_like(e)
            return z, z
        use = (e > 0) & (e < 40.0 * kt)
        x = np.where(use, e / kt, 1.0)
        n = np.where(use, 1.0 / np.expm1(x), 0.0)
        dn = np.where(use, -n * (n + 1.0) / kt, 0.0)
        return n, dn


def _inverse_gaps(lam: NDArray[np.float64], cluster: NDArray[np.int64]) -> NDArray[np.float64]:
    """(u, m, n) ``1 / (lambda_m - lambda_n)`` of the eigenvalues ``lam`` (u, m), 0 within
    a degenerate cluster (``cluster`` (u, m))."""
    gap = lam[:, :, None] - lam[:, None, :]
    same = cluster[:, :, None] == cluster[:, None, :]
    return np.where(same, 0.0, 1.0 / np.where(same, 1.0, gap))


@dataclass(frozen=True, slots=True, kw_only=True)
class _PairModel:
    """What :func:`_pair_lines` reads of a forward pass: per distinct q-point the
    eigenvalues ``lam`` (u, m), eigenvectors ``vec`` (u, m, m, columns), ``bq`` (u, 3, m,
    m) ``e^H dD/dQ_a e``, ``d2e`` (u, 9, m, m) ``e^H d2D/dQ_a dQ_b e`` (index ``3 a + b``)
    and the inverse gaps ``inv_gap`` (u, m, n) (the curvature's damped ``1 / g_eff``); per
    (point, energy) element the offsets' mean ``mean`` (p, e, 3) and covariance ``cov``
    (p, e, 3, 3) (1/A), the tensors ``tensor`` (p, e, m, m) and ``tensor_d`` (p, e, 3, m,
    m); ``point_q`` each point's q-point and the Q resolution's variance ``eta2``
    (1/A^2)."""

    point_q: NDArray[np.int64]
    lam: NDArray[np.float64]
    vec: NDArray[np.complex128]
    bq: NDArray[np.complex128]
    d2e: NDArray[np.complex128]
    inv_gap: NDArray[np.float64]
    mean: NDArray[np.float64]
    cov: NDArray[np.float64]
    tensor: NDArray[np.complex64]
    tensor_d: NDArray[np.complexfloating[Any, Any]]
    eta2: float


def _pair_groups(
    energy: NDArray[np.float64], ok: NDArray[np.bool_], gap: float
) -> NDArray[np.int64]:
    """(u, m) group of each mode at each q-point: runs of consecutive modes (by energy)
    closer than ``gap`` meV to the next; a mode below the frequency floor is a group of
    its own."""
    split = (np.diff(energy, axis=1) > gap) | ~ok[:, 1:] | ~ok[:, :-1]
    first = np.zeros((len(energy), 1), dtype=np.int64)
    return np.concatenate([first, np.cumsum(split, axis=1)], axis=1)


def _pair_nodes() -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(J, 3) nodes and (J,) weights of a product Gauss-Legendre rule for a distribution of
    zero mean and unit covariance that is uniform in a cube (:data:`_PAIR_NODES` a side)."""
    x, w = np.polynomial.legendre.leggauss(_PAIR_NODES)
    x = x * math.sqrt(3.0)
    z = np.stack(np.meshgrid(x, x, x, indexing="ij"), axis=-1).reshape(-1, 3)
    return z, np.einsum("i,j,k->ijk", w, w, w).reshape(-1) / 8.0


def _pair_lines(
    near: _Near,
    a: NDArray[np.float64],
    a_x: NDArray[np.float64],
    left: NDArray[np.complex128],
    left_x: NDArray[np.complex128],
    change: NDArray[np.float64],
    groups: NDArray[np.int64],
    pm: _PairModel,
) -> None:
    """The lines of close modes (a group of :func:`_pair_groups`) across the folding tube,
    in place of their first-order terms: ``near.mu``, ``near.tau2``, ``a`` and ``a_x`` of
    their elements are overwritten (the elements of a group missing one of its modes are
    left as they are).

    Two modes closer than the offsets' reach split across the tube not as one line per
    mode with its own velocity (``v . delta``) but as the eigenvalues of the group's own
    block: degenerate branches along a symmetry line (Ge's transverse pairs) split by
    ``+-|b . delta|`` off it, the lower branch always below, each with the intensity of its
    own eigenvector at each offset. :meth:`CountsModel.evaluate` gives a degenerate pair
    one line at the cluster's mean, its splitting as width; at the bins on the lines'
    flanks that puts half of the counts where neither branch is (the bins of Ge's
    transverse pairs were the largest deviations from the exact fold, 40-60 %). Here,
    for each (bin, group), at the nodes ``delta_j`` of a quadrature over the bin's cells'
    offsets (a product Gauss-Legendre rule, :func:`_pair_nodes`, for a distribution of
    the bin's mean and covariance; the energies' nodes with the Q resolution's ``eta^2``
    added to the covariance, the tensor's without), the group's block

        H_ik(delta) = lambda_i delta_ik + delta_a B_a,ik + delta_a delta_b (D_ab,ik / 2
                      + sum_{o not in P} B_a,io B_b,ok (1 / g_io + 1 / g_ko) / 2)

    (``B_a = e^H dD/dQ_a e``, ``D_ab`` its second derivatives, eigenvalue units; the
    coupling to the other modes to second order, Loewdin's partitioning, with the
    curvature's damped inverse gaps ``1 / g``) is diagonalised; branch ``i`` (in order of
    energy) has the energy ``E_i(delta_j)`` and eigenvector ``w_i(delta_j)``, and the intensity
    ``w_i^H M(delta_j) w_i`` with ``M(delta) = T + (delta - <delta>) . G``, the bin's
    tensor in the group's eigenvectors with its first-order change across the tube
    (``G = Cov(delta)^+ (Td - <delta> T)``, from the offsets' tensors). The branch's line
    is centred at the intensity-weighted mean of ``E_i`` over the nodes, with their
    variance as its width; its intensity is the mean of ``w_i^H M w_i`` plus the first-
    order change towards the modes outside the group (``change``, shared by ``|w_i|^2``),
    and ``X`` (where in the bin) follows ``w_i`` as ``T^x``. Against the exact fold this
    is what the bins of close pairs need (measured in ``bench_counts_model``)."""
    ip, ie, im = near.at
    if not len(ip):
        return
    n_e = near.shape[1]
    m = pm.vec.shape[1]
    u_el = pm.point_q[ip]
    # each group's size and first mode, per q-point
    sizes = np.zeros_like(groups)
    starts = np.zeros_like(groups)
    for j in range(m):
        same = groups == groups[:, j : j + 1]
        sizes[:, j] = same.sum(axis=1)
        starts[:, j] = np.argmax(same, axis=1)
    size = sizes[u_el, im]
    cand = np.flatnonzero(size > 1)
    if not len(cand):
        return
    key = (ip[cand] * n_e + ie[cand]) * m + starts[u_el[cand], im[cand]]
    order = np.lexsort((im[cand], key))
    cand, key = cand[order], key[order]
    _, first, count = np.unique(key, return_index=True, return_counts=True)
    full = count == size[cand[first]]  # every mode of the group is near this bin
    z, wz = _pair_nodes()
    for g in np.unique(count[full]):
        heads = first[full & (count == g)]
        rows = cand[heads[:, None] + np.arange(g)]  # (G, g) elements, by mode
        per = max(1, (1 << 21) // (len(z) * g * g + 4 * m * m))  # ~50 MB a block
        for sl in _blocks(len(rows), per):
            _pair_block(near, a, a_x, left, left_x, change, rows[sl], pm, z, wz)


def _pair_block(
    near: _Near,
    a: NDArray[np.float64],
    a_x: NDArray[np.float64],
    left: NDArray[np.complex128],
    left_x: NDArray[np.complex128],
    change: NDArray[np.float64],
    js: NDArray[np.intp],
    pm: _PairModel,
    z: NDArray[np.float64],
    wz: NDArray[np.float64],
) -> None:
    """:func:`_pair_lines` for the groups of one size whose elements are ``js`` (G, g)."""
    ip, ie, im = near.at
    n_g, g = js.shape
    p, e = ip[js[:, 0]], ie[js[:, 0]]
    u = pm.point_q[p]
    modes = im[js]  # (G, g)
    rows, cols = modes[:, None, :, None], modes[:, None, None, :]
    m = pm.vec.shape[1]
    uu = u[:, None, None, None]
    w_p = pm.vec[u[:, None, None], np.arange(m)[None, :, None], modes[:, None, :]]  # (G, m, g)
    lam_p = np.take_along_axis(pm.lam[u], modes, axis=1)  # (G, g)
    b_pp = pm.bq[uu, np.arange(3)[None, :, None, None], rows, cols]
    d2 = pm.d2e[uu, np.arange(9)[None, :, None, None], rows, cols]
    b_po = pm.bq[uu, np.arange(3)[None, :, None, None], rows, np.arange(m)]  # (G, 3, g, m)
    b_op = np.conj(np.swapaxes(b_po, 2, 3))  # B is Hermitian: B_a,oi = conj(B_a,io)
    inside = (np.arange(m)[None, :] == modes[:, :, None]).any(axis=1)  # (G, m)
    inv = np.where(inside[:, None, :], 0.0, pm.inv_gap[u[:, None], modes])  # (G, g, m)
    coupled = np.einsum("Gaio,Gbok,Gio->Gabik", b_po, b_op, inv)
    coupled = 0.5 * (coupled + np.einsum("Gaio,Gbok,Gko->Gabik", b_po, b_op, inv))
    second = 0.5 * d2.reshape(n_g, 3, 3, g, g) + coupled
    mean, cov = pm.mean[p, e], pm.cov[p, e]  # (G, 3), (G, 3, 3)

    wv, axes = np.linalg.eigh(cov)  # cov + eta^2 I has the same axes

    def nodes(extra: float) -> NDArray[np.float64]:
        spread = axes * np.sqrt(np.clip(wv + extra, 0.0, None))[:, None, :]
        return mean[:, None, :] + np.einsum("jb,Gab->Gja", z, spread)  # (G, J, 3)

    dl = nodes(pm.eta2)  # where the energies are taken (with the Q resolution)
    dm = dl if pm.eta2 <= 0.0 else nodes(0.0)  # and the cells' tensor (without)
    h = (
        np.einsum("Gi,ik->Gik", lam_p, np.eye(g))[:, None]
        + np.einsum("Gja,Gaik->Gjik", dl, b_pp)
        + np.einsum("Gja,Gjb,Gabik->Gjik", dl, dl, second)
    )
    h = 0.5 * (h + np.conj(np.swapaxes(h, 2, 3)))
    ev, w = np.linalg.eigh(h)  # (G, J, g), (G, J, g, g)
    eps = _TO_MEV * np.sqrt(np.clip(ev, 0.0, None))
    t_p = np.einsum("Gkm,Gml->Gkl", left[js], w_p)  # e_k^H T' e_l (T' the Debye-Waller's)
    x_p = np.einsum("Gkm,Gml->Gkl", left_x[js], w_p)
    t0 = np.einsum("Gik,Gij,Gjl->Gkl", w_p.conj(), pm.tensor[p, e].astype(complex), w_p)
    td = np.einsum("Gik,Gaij,Gjl->Gakl", w_p.conj(), pm.tensor_d[p, e].astype(complex), w_p)
    rhs = td - mean[:, :, None, None] * t0[:, None]
    # (single-precision tensors: directions of the offsets below 1e-4 of the largest
    # variance carry no slope)
    slope = np.einsum("Gab,Gbkl->Gakl", np.linalg.pinv(cov, rcond=1e-4, hermitian=True), rhs)
    m_j = t_p[:, None] + np.einsum("Gja,Gakl->Gjkl", dm - mean[:, None, :], slope)
    inten = np.einsum("Gjki,Gjkl,Gjli->Gji", w.conj(), m_j, w).real  # (G, J, g)
    inten_x = np.einsum("Gjki,Gkl,Gjli->Gji", w.conj(), x_p, w).real
    share = np.einsum("j,Gjki,Gk->Gi", wz, np.abs(w) ** 2, change[js])
    weight = wz[None, :, None] * np.clip(inten, 1e-300, None)
    centre = np.sum(weight * eps, axis=1) / np.sum(weight, axis=1)
    var = np.sum(weight * eps * eps, axis=1) / np.sum(weight, axis=1) - centre**2
    near.mu[js] = centre - near.e[js]
    near.tau2[js] = np.maximum(var, 0.0)
    a[js] = np.einsum("j,Gji->Gi", wz, inten) + share
    a_x[js] = np.einsum("j,Gji->Gi", wz, inten_x)


def _gather_single(
    tensor: NDArray[np.complex128],
    rows: NDArray[np.int64],
    shape: tuple[int, int],
    factor: float = 1.0,
) -> NDArray[np.complex64]:
    """``factor`` times the (n, m, m) ``tensor``'s ``rows`` as (*shape, m, m) single
    precision complex, gathered in blocks (no double-precision copy of the whole)."""
    m = tensor.shape[-1]
    out = np.empty((len(rows), m, m), dtype=np.complex64)
    for sl in _blocks(len(rows)):
        block = np.take(tensor, rows[sl], axis=0)
        if factor != 1.0:
            block *= factor
        out[sl] = block
    return out.reshape(*shape, m, m)


def _blocks(n: int, size: int = 32768) -> list[slice]:
    """``n`` elements in slices of at most ``size``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _real_rows(bases: NDArray[np.complex128]) -> NDArray[np.float64]:
    """(n_q, n_b, 2 m^2): complex matrices ``bases`` ((k, n_q, [3,] m, m); the leading
    and any middle axes ``b``) as real rows ``[Re B, -Im B]`` per q-point, for
    :func:`_diagonal`."""
    k, n_q, m = bases.shape[0], bases.shape[1], bases.shape[-1]
    flat = np.moveaxis(bases.reshape(k, n_q, -1, m * m), 1, 0).reshape(n_q, -1, m * m)
    return np.ascontiguousarray(np.concatenate([flat.real, -flat.imag], axis=2))


def _diagonal(rows: NDArray[np.float64], vec: NDArray[np.complex128]) -> NDArray[np.float64]:
    """(n_b, n_q, m) ``Re e_m^H B_b e_m`` of the bases ``rows`` (:func:`_real_rows`) and
    the modes ``vec`` ((n_q, m, m), columns): ``sum_ij B_ij conj(e_i) e_j`` as one real
    matrix product per q-point (``Re(B P) = Re B Re P - Im B Im P``)."""
    n_q, m = vec.shape[0], vec.shape[1]
    outer = (vec.conj()[:, :, None, :] * vec[:, None, :, :]).reshape(n_q, m * m, m)
    both = np.concatenate([outer.real, outer.imag], axis=1)  # (q, 2 m^2, m)
    return np.moveaxis(rows @ both, 0, 1)


@njit(cache=True, nogil=True)
def _structure_left(
    tensor: NDArray[np.complex64],
    tensor_q2: NDArray[np.complex64],
    shift: NDArray[np.float64],
    vec: NDArray[np.complex128],
    point_q: NDArray[np.int64],
    ip: NDArray[np.intp],
    ie: NDArray[np.intp],
    im: NDArray[np.intp],
    with_q2: bool,
) -> tuple[NDArray[np.complex128], NDArray[np.float64]]:
    """For each element ``j`` (point ``ip``, energy bin ``ie``, mode ``im``): the row
    ``w = e_m^H T'`` (n_near, m) of the bin's tensor ``T' = T - (s_i + s_l) T2`` (``s``
    the Debye-Waller change of each row's atom, with ``with_q2``) with the mode
    ``e_m = vec[point_q[p], :, m]``, and ``A_m = Re w . e_m`` (n_near,). The rows
    ``e_m^H T' e_n`` are ``w @ vec``: the Jacobian contracts ``w`` with the eigenvectors'
    change directly (:func:`_coefficient_columns`)."""
    n = len(ip)
    m = vec.shape[1]
    left = np.empty((n, m), dtype=np.complex128)
    diag = np.empty(n)
    tp = np.empty((m, m), dtype=np.complex128)  # T' of the bin at hand
    row = np.empty(m, dtype=np.complex128)
    last_p, last_e = -1, -1
    for j in range(n):
        p, e, mm = ip[j], ie[j], im[j]
        u = point_q[p]
        if p != last_p or e != last_e:  # the elements come bin by bin: T' once per bin
            for i in range(m):
                for col in range(m):
                    t = tensor[p, e, i, col]
                    if with_q2:
                        t = t - (shift[i] + shift[col]) * tensor_q2[p, e, i, col]
                    tp[i, col] = t
            last_p, last_e = p, e
        for col in range(m):
            row[col] = 0j
        for i in range(m):  # row-wise over T': contiguous
            ei = np.conj(vec[u, i, mm])
            for col in range(m):
                row[col] += ei * tp[i, col]
        d = 0.0
        for col in range(m):
            left[j, col] = row[col]
            d += (row[col] * vec[u, col, mm]).real
        diag[j] = d
    return left, diag


@njit(cache=True, nogil=True)
def _coefficient_columns(
    jac: NDArray[np.float64],
    row_of: NDArray[np.int64],
    mult: NDArray[np.float64],
    wh: NDArray[np.complex128],
    h: NDArray[np.float64],
    line_e: NDArray[np.float64],
    line_mu: NDArray[np.float64],
    line_tau: NDArray[np.float64],
    zr: NDArray[np.float64],
    zi: NDArray[np.float64],
    de_dc: NDArray[np.float64],
    dvel: NDArray[np.float64],
    vel: NDArray[np.float64],
    mean: NDArray[np.float64],
    cov: NDArray[np.float64],
    eta2: float,
    tensor_q2: NDArray[np.complex64],
    vec: NDArray[np.complex128],
    with_q2: bool,
    ddw: NDArray[np.float64],
    second: NDArray[np.float64],
    dcurv: NDArray[np.float64],
    point_q: NDArray[np.int64],
    ip: NDArray[np.intp],
    ie: NDArray[np.intp],
    im: NDArray[np.intp],
    n_e: int,
) -> None:
    """Adds ``mult[p, e]`` times d(sum_m A_m h_m + X_m k_m)/dc_k to ``jac[row_of[p n_E +
    e], k]`` (the fitted bins' rows; ``k`` the first ``ddw.shape[1]`` columns) from the
    elements ``j`` near a line (point ``ip``, bin ``ie``, mode ``im``; 1-D): ``wh`` the
    rows ``h_m e_m^H T' + k_m e_m^H T^x`` (from :func:`_structure_left`), ``h`` the line
    ``h_m``, ``line_e``, ``line_mu`` and ``line_tau`` the lines' derivatives by the mode
    energy, the centre shift and the width variance (``A dh + X dk``; ``line_tau`` times
    2). The eigenvectors' change ``sum_l Re(wh_l Zt_k,ml)`` (``zr``/``zi`` (n_u, m, m, k):
    ``Zt_k,ml = sum_n e_ln Z_k,mn``, so that the rows ``e_m^H T' e_n`` are never
    formed), the line's through its energy (``de_dc`` (n_u, m, k)), centre (``mean``
    <delta> (p, e, 3) . dv) and width (``2 (C v + eta^2 v) . dv``, ``cov`` C (p, e, 3,
    3)), with ``dvel`` (n_u, m, 3, k) and ``vel`` (n_u, 3, m) per distinct q-point, and
    with ``with_q2`` the Debye-Waller change ``-2 h_m sum_a Re(e_m^H P_a T2 e_m)
    ddw[a, k]`` (``P_a`` the rows of atom ``a``, ``ddw`` (n_atoms, k) db_a/dc_k), and the
    centre's change through the branch's curvature across the tube, ``(second + eta^2 I)
    . dW`` (``second`` (p, e, 9), ``dcurv`` (n_u, m, 9, k); empty: no curvature). The
    loops over ``k`` run on contiguous memory."""
    k = zr.shape[3]
    m = wh.shape[1]
    n_atoms = ddw.shape[0]
    bent = dcurv.shape[0] > 0
    width = np.empty(3)
    acc = np.empty(k)
    t2 = np.empty(n_atoms)
    for j in range(len(ip)):
        p, e, mm = ip[j], ie[j], im[j]
        row = row_of[p * n_e + e]
        if row < 0:
            continue
        u = point_q[p]
        hj = h[j]
        w_e, w_mu, w_tau = line_e[j], line_mu[j], line_tau[j]
        for ax in range(3):  # mean . dv and (C v + eta^2 v) . dv, C the offsets' covariance
            c_v = 0.0
            for bx in range(3):
                c_v += cov[p, e, ax, bx] * vel[u, bx, mm]
            width[ax] = w_mu * mean[p, e, ax] + w_tau * (c_v + eta2 * vel[u, ax, mm])
        for kk in range(k):
            acc[kk] = w_e * de_dc[u, mm, kk]
        for col in range(m):
            wr = wh[j, col].real
            wi = wh[j, col].imag
            for kk in range(k):
                acc[kk] += wr * zr[u, mm, col, kk] - wi * zi[u, mm, col, kk]
        for ax in range(3):
            wa = width[ax]
            for kk in range(k):
                acc[kk] += dvel[u, mm, ax, kk] * wa
        if bent:
            for ab in range(9):
                f = w_mu * second[p, e, ab]
                if ab == 0 or ab == 4 or ab == 8:
                    f += w_mu * eta2
                for kk in range(k):
                    acc[kk] += f * dcurv[u, mm, ab, kk]
        if with_q2:
            for at_ in range(n_atoms):
                t2[at_] = 0.0
            for i in range(m):
                t = 0j
                for col in range(m):
                    t += tensor_q2[p, e, i, col] * vec[u, col, mm]
                t2[i // 3] += (np.conj(vec[u, i, mm]) * t).real
            for at_ in range(n_atoms):
                f = -2.0 * hj * t2[at_]
                for kk in range(k):
                    acc[kk] += f * ddw[at_, kk]
        scale = mult[p, e]
        for kk in range(k):
            jac[row, kk] += scale * acc[kk]


@njit(cache=True, nogil=True)
def _near_lines(
    mean: NDArray[np.float64],
    cov: NDArray[np.float64],
    second: NDArray[np.float64],
    vel: NDArray[np.float64],
    split: NDArray[np.float64],
    half_inv: NDArray[np.float64],
    energy: NDArray[np.float64],
    sres: NDArray[np.float64],
    gain: NDArray[np.bool_],
    e_lo: NDArray[np.float64],
    de: float,
    r: float,
    eta2: float,
    tail_z: float,
    point_q: NDArray[np.int64],
    bounds: NDArray[np.float64],
    curv: NDArray[np.float64],
) -> tuple[
    NDArray[np.intp], NDArray[np.intp], NDArray[np.intp], NDArray[np.float64], NDArray[np.float64]
]:
    """The (point, energy bin, mode) elements within ``tail_z`` widths (and half a bin)
    of their line's centre, energy loss or (where ``gain``) gain: ``(ip, ie, im, mu,
    tau2)``, the line's centre shift ``v . <delta> + (second + eta^2 I) . W`` (``W`` =
    ``curv``, the branch's curvature across the tube: :func:`_curvature`; zeros leave
    it out) and width ``max(v^T C v, 0) + eta^2 |v|^2 + (second . K) (dE/dlambda)^2``
    there.
    Per bin: ``mean`` (p, e, 3), ``cov`` (p, e, 3, 3), ``second`` (p, e, 9); per distinct
    q-point: ``vel`` (u, 3, m), ``split`` (u, 9, m), ``curv`` (u, 9, m), ``half_inv``,
    ``energy``, ``sres`` (the resolution's sigma), ``gain`` (u, m).

    Most elements are far from their line: ``bounds`` (p, e, 3), per bin ``|<delta>|``,
    a bound on ``|Cov(delta)|`` and ``sum |second|``, bound ``|mu|`` and the width from
    above, and an element whose line is farther than those bounds allow is passed over
    without forming its ``mu`` and ``tau2`` (the same elements are kept)."""
    n_p, n_e = mean.shape[0], mean.shape[1]
    m = vel.shape[2]
    n_u = vel.shape[0]
    speed = np.empty((n_u, m))  # |v|
    split_max = np.empty((n_u, m))  # max |split| (dE/dlambda)^2
    curv_max = np.empty((n_u, m))  # max |W|
    curv_eta = np.empty((n_u, m))  # eta^2 tr W
    res2 = np.empty((n_u, m))  # (r sigma_res)^2
    for u in range(n_u):
        for mm in range(m):
            v2 = 0.0
            for ax in range(3):
                v2 += vel[u, ax, mm] ** 2
            speed[u, mm] = math.sqrt(v2)
            big = 0.0
            bend = 0.0
            for ab in range(9):
                big = max(big, abs(split[u, ab, mm]))
                bend = max(bend, abs(curv[u, ab, mm]))
            split_max[u, mm] = big * half_inv[u, mm] ** 2
            curv_max[u, mm] = bend
            curv_eta[u, mm] = eta2 * (curv[u, 0, mm] + curv[u, 4, mm] + curv[u, 8, mm])
            res2[u, mm] = (r * sres[u, mm]) ** 2
    slack = 1.0 + 1e-9  # the bound's own rounding
    cap = n_p * n_e * m
    ip = np.empty(cap, dtype=np.intp)
    ie = np.empty(cap, dtype=np.intp)
    im = np.empty(cap, dtype=np.intp)
    mu_out = np.empty(cap)
    tau_out = np.empty(cap)
    n = 0
    for p in range(n_p):
        u = point_q[p]
        for e in range(n_e):
            mid = e_lo[e] + 0.5 * de
            mean_norm, cov_norm, second_sum = bounds[p, e, 0], bounds[p, e, 1], bounds[p, e, 2]
            for mm in range(m):
                en = energy[u, mm]
                if en <= 0.0:
                    continue
                sp = speed[u, mm]
                mu_max = mean_norm * sp + (second_sum + 3.0 * eta2) * curv_max[u, mm]
                tau_max = (cov_norm + eta2) * sp * sp + second_sum * split_max[u, mm]
                far = (
                    tail_z * math.sqrt(max(res2[u, mm] + tau_max, 1e-12)) + 0.5 * de + mu_max
                ) * slack
                if abs(en - mid) >= far and (not gain[u, mm] or abs(en + mid) >= far):
                    continue
                mu = 0.0
                vcv = 0.0
                v2 = 0.0
                for ax in range(3):
                    va = vel[u, ax, mm]
                    mu += mean[p, e, ax] * va
                    v2 += va * va
                    for bx in range(3):
                        vcv += va * cov[p, e, ax, bx] * vel[u, bx, mm]
                spread = 0.0
                mu += curv_eta[u, mm]
                for ab in range(9):
                    spread += second[p, e, ab] * split[u, ab, mm]
                    mu += second[p, e, ab] * curv[u, ab, mm]
                tau2 = max(vcv, 0.0) + eta2 * v2 + spread * half_inv[u, mm] ** 2
                sigma = math.sqrt(max((r * sres[u, mm]) ** 2 + tau2, 1e-12))
                reach = tail_z * sigma + 0.5 * de
                if abs(en + mu - mid) < reach or (gain[u, mm] and abs(en + mu + mid) < reach):
                    ip[n] = p
                    ie[n] = e
                    im[n] = mm
                    mu_out[n] = mu
                    tau_out[n] = tau2
                    n += 1
    return ip[:n].copy(), ie[:n].copy(), im[:n].copy(), mu_out[:n].copy(), tau_out[:n].copy()


_SQRT1_2 = math.sqrt(0.5)


#: Per element and line (loss, gain): a Gaussian's mean over the bin and its density at
#: the bin's two edges (see :func:`_bin_gauss`).
_BASE_TERMS = 6


@njit(cache=True, nogil=True, inline="always")
def _bin_gauss(
    out: NDArray[np.float64],
    base: NDArray[np.float64],
    at: int,
    reuse: bool,
    lo: float,
    hi: float,
    centre: float,
    sigma: float,
    de: float,
    order: int,
) -> None:
    """``out[0]``: a unit-area Gaussian of ``centre`` and ``sigma`` averaged over [lo, hi]
    (1/meV, ``de = hi - lo``); ``out[n]``, n <= ``order``: its n-th derivative by the
    centre (the n-th derivative of the density is ``(-1)^n He_n(z) phi(z) / sigma^n``, so
    ``(He_{n-1}(z_lo) phi_lo - He_{n-1}(z_hi) phi_hi) / (sigma^n de)``). The erfc and exp
    terms (``out[0]``, ``phi_lo``, ``phi_hi``) are written to ``base[at:at + 3]``, or with
    ``reuse`` read from there (``base`` empty: neither)."""
    z_hi = (hi - centre) / sigma
    z_lo = (lo - centre) / sigma
    if reuse:
        out[0], p_lo, p_hi = base[at], base[at + 1], base[at + 2]
    else:
        out[0] = 0.5 * (math.erfc(-z_hi * _SQRT1_2) - math.erfc(-z_lo * _SQRT1_2)) / de
        p_hi = math.exp(-0.5 * z_hi * z_hi) / _SQRT_2PI
        p_lo = math.exp(-0.5 * z_lo * z_lo) / _SQRT_2PI
        if len(base):
            base[at], base[at + 1], base[at + 2] = out[0], p_lo, p_hi
    scale = de
    for n in range(1, order + 1):
        scale *= sigma
        if n == 1:
            he_lo, he_hi = 1.0, 1.0
        elif n == 2:
            he_lo, he_hi = z_lo, z_hi
        elif n == 3:
            he_lo, he_hi = z_lo * z_lo - 1.0, z_hi * z_hi - 1.0
        elif n == 4:
            he_lo, he_hi = z_lo * (z_lo * z_lo - 3.0), z_hi * (z_hi * z_hi - 3.0)
        else:  # n == 5, the highest order asked for
            z2_lo, z2_hi = z_lo * z_lo, z_hi * z_hi
            he_lo, he_hi = z2_lo * (z2_lo - 6.0) + 3.0, z2_hi * (z2_hi - 6.0) + 3.0
        out[n] = (he_lo * p_lo - he_hi * p_hi) / scale


@njit(cache=True, nogil=True, inline="always")
def _positioned(
    out: NDArray[np.float64],
    g: NDArray[np.float64],
    centre: float,
    mid: float,
    sigma: float,
    de: float,
    count: int,
) -> None:
    """``out[n]``, n < ``count``: the n-th derivative by the centre of ``x G`` averaged
    over the bin (``x = (E - mid) / (de / 2)`` in [-1, 1]) from ``g`` (:func:`_bin_gauss`'s
    ``out``, to order ``count``): ``(2 / de) (sigma^2 g[n+1] + (centre - mid) g[n] + n
    g[n-1])`` (``int (E - c) G = sigma^2 dG/dc``). Like ``g``, the derivative by sigma of
    ``out[n]`` is ``sigma out[n + 2]``."""
    s2 = sigma * sigma
    d = centre - mid
    for n in range(count):
        v = s2 * g[n + 1] + d * g[n]
        if n:
            v += n * g[n - 1]
        out[n] = 2.0 * v / de


@njit(cache=True, nogil=True)
def _line_shapes(
    e: NDArray[np.float64],
    mu: NDArray[np.float64],
    tau2: NDArray[np.float64],
    lo: NDArray[np.float64],
    sres: NDArray[np.float64],
    dsres: NDArray[np.float64],
    nb: NDArray[np.float64],
    dnb: NDArray[np.float64],
    r: float,
    de: float,
    pref: float,
    derivatives: bool,
    base: NDArray[np.float64],
    reuse: bool,
    positions: bool,
) -> tuple[NDArray[np.float64], ...]:
    """:meth:`CountsModel._profile` element by element (1-D arrays, ``e > 0``): the mode
    energy ``e``, its offsets' mean ``mu`` and variance ``tau2``, the bin's lower edge
    ``lo`` (width ``de``), the resolution's sigma ``sres`` and its derivative, the Bose
    occupation ``nb`` and its derivative, the resolution scale ``r`` and the prefactor
    ``pref``. Returns ``(h, dh/de, dh/dmu, dh/dtau2, dh/dr, hx, dhx/de, dhx/dmu,
    dhx/dtau2, dhx/dr)``: the derivatives empty without ``derivatives``, the ``hx`` part
    (the same line weighted by the position ``x`` in [-1, 1] within the bin, for the
    moments' ``tensor_x``) empty without ``positions``. ``base`` ((n,
    :data:`_BASE_TERMS`) or empty) receives the loss and gain Gaussians' erfc and exp
    terms, or with ``reuse`` holds them."""
    flat = base.reshape(-1)
    n = len(e)
    order = (5 if derivatives else 3) if positions else (4 if derivatives else 2)
    h = np.empty(n)
    n_d = n if derivatives else 0
    d_e, d_mu, d_t, d_r = np.empty(n_d), np.empty(n_d), np.empty(n_d), np.empty(n_d)
    n_x = n if positions else 0
    n_xd = n_x if derivatives else 0
    hx = np.empty(n_x)
    x_e, x_mu, x_t, x_r = np.empty(n_xd), np.empty(n_xd), np.empty(n_xd), np.empty(n_xd)
    gl = np.zeros(6)
    gg = np.zeros(6)
    yl = np.zeros(6)
    yg = np.zeros(6)
    parts = np.zeros(5)
    sc = np.zeros(14)  # the element's scalars, as :func:`_line` reads them
    for j in range(n):
        ej, mj, tj, nbj = e[j], mu[j], tau2[j], nb[j]
        sigma = math.sqrt(max((r * sres[j]) ** 2 + tj, 1e-12))
        inv_e = 1.0 / ej
        i2 = inv_e * inv_e
        c0 = 1.0 - mj * inv_e + (mj * mj + tj) * i2
        c1 = (2.0 * mj * inv_e - 1.0) * tj * inv_e
        c2 = tj * tj * i2
        at = j * _BASE_TERMS
        _bin_gauss(gl, flat, at, reuse, lo[j], lo[j] + de, ej + mj, sigma, de, order)
        # energy gain: only where the Bose factor is not zero (the gain peak sits at -e - mu,
        # and u enters it with the other sign)
        if nbj > 0.0:
            _bin_gauss(gg, flat, at + 3, reuse, lo[j], lo[j] + de, -ej - mj, sigma, de, order)
        else:
            gg[:] = 0.0
        sc[0], sc[1], sc[2], sc[3], sc[4], sc[5], sc[6] = ej, mj, tj, nbj, dnb[j], sres[j], dsres[j]
        sc[7], sc[8], sc[9], sc[10], sc[11], sc[12], sc[13] = r, c0, c1, c2, sigma, inv_e, pref
        h[j] = _line(parts, gl, gg, sc, derivatives)
        if derivatives:
            d_e[j], d_mu[j], d_t[j], d_r[j] = parts[1], parts[2], parts[3], parts[4]
        if not positions:
            continue
        mid = lo[j] + 0.5 * de
        _positioned(yl, gl, ej + mj, mid, sigma, de, order)
        if nbj > 0.0:
            _positioned(yg, gg, -ej - mj, mid, sigma, de, order)
        else:
            yg[:] = 0.0
        hx[j] = _line(parts, yl, yg, sc, derivatives)
        if derivatives:
            x_e[j], x_mu[j], x_t[j], x_r[j] = parts[1], parts[2], parts[3], parts[4]
    return h, d_e, d_mu, d_t, d_r, hx, x_e, x_mu, x_t, x_r


@njit(cache=True, nogil=True, inline="always")
def _line(
    parts: NDArray[np.float64],
    gl: NDArray[np.float64],
    gg: NDArray[np.float64],
    sc: NDArray[np.float64],
    derivatives: bool,
) -> float:
    """The line ``pref / e [(n + 1) loss + n gain]`` of the loss and gain brackets
    ``c0 g0 + c1 g1 + c2 g2`` and ``c0 g0 - c1 g1 + c2 g2`` of ``gl`` and ``gg`` (a
    Gaussian's bin averages and their derivatives by the centre, or the same weighted by
    the position in the bin); with ``derivatives``, ``parts[1:5]`` its derivatives by
    ``e``, ``mu``, ``tau2`` and ``r``. ``sc``: the element's ``e, mu, tau2, n, dn/de,
    sigma_res, dsigma_res/de, r, c0, c1, c2, sigma, 1/e, pref``."""
    mj, tj, nbj, dnbj, sres, dsres = sc[1], sc[2], sc[3], sc[4], sc[5], sc[6]
    r, c0, c1, c2, sigma, inv_e, pref = sc[7], sc[8], sc[9], sc[10], sc[11], sc[12], sc[13]
    loss = c0 * gl[0] + c1 * gl[1] + c2 * gl[2]
    gain = c0 * gg[0] - c1 * gg[1] + c2 * gg[2]
    prof = (nbj + 1.0) * loss + nbj * gain
    if not derivatives:
        return pref * inv_e * prof
    i2 = inv_e * inv_e
    # partials of the loss bracket by its centre and width, and by c0, c1, c2
    l_c = c0 * gl[1] + c1 * gl[2] + c2 * gl[3]
    l_s = sigma * (c0 * gl[2] + c1 * gl[3] + c2 * gl[4])
    n_c = -(c0 * gg[1] - c1 * gg[2] + c2 * gg[3])  # d gain / d(e + mu): centre -e - mu
    n_s = sigma * (c0 * gg[2] - c1 * gg[3] + c2 * gg[4])
    p_c = (nbj + 1.0) * l_c + nbj * n_c  # by the centre shift (e or mu)
    p_s = (nbj + 1.0) * l_s + nbj * n_s  # by sigma
    p_c0 = (nbj + 1.0) * gl[0] + nbj * gg[0]
    p_c1 = (nbj + 1.0) * gl[1] - nbj * gg[1]
    p_c2 = (nbj + 1.0) * gl[2] + nbj * gg[2]
    i3 = i2 * inv_e
    dc0_dmu, dc0_dt, dc0_de = -inv_e + 2 * mj * i2, i2, mj * i2 - 2 * (mj * mj + tj) * i3
    dc1_dmu, dc1_dt = 2 * tj * i2, (2 * mj * inv_e - 1.0) * inv_e
    dc1_de = -4 * mj * tj * i3 + tj * i2
    dc2_dt, dc2_de = 2 * tj * i2, -2 * tj * tj * i3
    ds_de = r * r * sres * dsres / sigma
    ds_dt = 0.5 / sigma
    ds_dr = r * sres * sres / sigma
    pe = pref * inv_e
    parts[2] = pe * (p_c + p_c0 * dc0_dmu + p_c1 * dc1_dmu)
    parts[3] = pe * (p_s * ds_dt + p_c0 * dc0_dt + p_c1 * dc1_dt + p_c2 * dc2_dt)
    parts[4] = pe * p_s * ds_dr
    parts[1] = (
        pe
        * (p_c + p_s * ds_de + p_c0 * dc0_de + p_c1 * dc1_de + p_c2 * dc2_de + (loss + gain) * dnbj)
        - pref * i2 * prof
    )
    return pe * prof
