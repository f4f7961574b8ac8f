"""Symmetry-reduced harmonic force constants (Born-von Karman model).

A :class:`FCBasis` is built once per crystal and cutoff:

1. enumerate every bond ``(i, j, n)`` (atom ``i`` of the home cell to atom ``j`` of the cell
   at lattice vector ``n``) up to a cutoff, given as a number of neighbour shells or a distance;
2. group bonds into orbits under the space group (spglib operations) together with pair
   permutation ``(i, j, n) -> (j, i, -n)``, whose force constant is the transpose;
3. for the representative bond of each orbit, find the 3x3 tensors invariant under its
   stabiliser (site symmetry of the bond, including the operations that reverse it), as the
   null space of the stacked linear constraints, and write that basis in reduced row-echelon
   form so that every free coefficient *is* one Cartesian component of the representative
   bond's tensor (``1NN_xx``, ``1NN_xy``...);
4. generate the tensor of every other bond of the orbit with the operation that maps the
   representative onto it;
5. fill the self terms from the acoustic sum rule, ``Phi(i, i) = -sum_{(j, n) != (i, 0)}
   Phi(i, j, n)``. Where a low-symmetry site would make that sum non-symmetric, the extra
   linear constraints are solved and the dependent components are eliminated, keeping
   the names of the remaining ones.

The result is linear: the full force-constant set is ``sum_k c_k B_k`` with ``c`` the
symmetry-reduced coefficients (eV/A^2) and ``B_k`` fixed 3x3 blocks on every bond.

Sign convention: ``Phi_{i a, j b} = d^2 E / du_{i a} du_{j b}`` (phonopy's), so a stretched
nearest-neighbour spring has a negative longitudinal component.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from simulations.exceptions import ForceConstantError, InvalidCoefficientsError
from simulations.lattice.crystals import Crystal

if TYPE_CHECKING:
    from simulations.lattice.nac import NACTerm

__all__ = ["BondOrbit", "FCBasis", "build_fc_basis"]

logger = logging.getLogger(__name__)

_COMPONENTS = ("xx", "xy", "xz", "yx", "yy", "yz", "zx", "zy", "zz")
# Preferred order of pivots: diagonal first, then the upper triangle, then the lower one.
_PIVOT_ORDER = (0, 4, 8, 1, 2, 5, 3, 6, 7)
_DIST_TOL = 1e-4  # Angstrom: bonds closer than this in length belong to the same shell
_EPS = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class BondOrbit:
    """One orbit of symmetry-equivalent bonds.

    Attributes
    ----------
    label
        Shell label, ``"1NN"``, ``"2NN"``, ... (``"4NNa"``, ``"4NNb"`` where one shell holds
        several orbits).
    shell
        1-based neighbour shell (by distance, over all atom pairs).
    distance
        Bond length, Angstrom.
    species
        The element pair of the representative bond.
    representative
        ``(i, j, n1, n2, n3)`` of the representative bond.
    vector
        (3,) float, Angstrom: Cartesian vector of the representative bond.
    multiplicity
        Number of bonds of the orbit that start on the primitive cell's atoms.
    """

    label: str
    shell: int
    distance: float
    species: tuple[str, str]
    representative: tuple[int, int, int, int, int]
    vector: tuple[float, float, float]
    multiplicity: int


@dataclass(frozen=True, slots=True, kw_only=True)
class FCBasis:
    """Linear parametrisation of the harmonic force constants of one crystal.

    Attributes
    ----------
    crystal
        The crystal (primitive cell).
    cutoff
        Largest bond length included, Angstrom.
    names
        Stable name of every free coefficient, e.g. ``("1NN_xx", "1NN_xy", ...)``.
    orbits
        The bond orbits, by increasing distance.
    pairs
        (n_blocks, 5) int: ``(i, j, n1, n2, n3)`` of every block (bonds and self terms).
    blocks
        (n_coeff, n_blocks, 3, 3) float: ``Phi(block) = sum_k c_k blocks[k, block]``.
    coefficient_orbit
        (n_coeff,) int: index into ``orbits`` of the bond each coefficient belongs to.
    nac
        The non-analytic term of a polar crystal (imported FCs with Born charges), or
        ``None``. It does not scale with the coefficients: the S(Q, E) model
        (:class:`simulations.lattice.sqe.CoherentSQE`) adds it to its dynamical matrices;
        :meth:`dynamical_basis` (so the forward model's dispersion and stability check)
        leaves it out.
    """

    crystal: Crystal
    cutoff: float
    names: tuple[str, ...]
    orbits: tuple[BondOrbit, ...]
    pairs: NDArray[np.int64]
    blocks: NDArray[np.float64]
    coefficient_orbit: NDArray[np.int64]
    nac: NACTerm | None = None

    @property
    def n_coefficients(self) -> int:
        """Number of free symmetry-reduced coefficients."""
        return len(self.names)

    @property
    def n_shells(self) -> int:
        """Number of neighbour shells included."""
        return max((o.shell for o in self.orbits), default=0)

    def index(self, name: str) -> int:
        """Position of a coefficient by name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ForceConstantError(
                f"{self.crystal.name} has no force-constant coefficient {name!r}; "
                f"known: {', '.join(self.names)}"
            ) from None

    def check_coefficients(self, coefficients: NDArray[np.float64]) -> NDArray[np.float64]:
        """Validate a coefficient vector or batch, shape (..., n_coeff); return it as float64."""
        arr = np.asarray(coefficients, dtype=float)
        if arr.shape[-1:] != (self.n_coefficients,):
            raise InvalidCoefficientsError(
                f"expected {self.n_coefficients} force-constant coefficients for "
                f"{self.crystal.name} ({', '.join(self.names)}), got shape {arr.shape}"
            )
        if not np.all(np.isfinite(arr)):
            bad = sorted({self.names[k] for k in np.argwhere(~np.isfinite(arr))[:, -1]})
            raise InvalidCoefficientsError(
                f"non-finite force-constant coefficients (NaN or inf) in {', '.join(bad)}"
            )
        return arr

    def coefficients_from_dict(self, values: dict[str, float]) -> NDArray[np.float64]:
        """Coefficient vector from ``{name: value}``; every name must be given once."""
        unknown = sorted(set(values) - set(self.names))
        missing = [n for n in self.names if n not in values]
        if unknown or missing:
            raise InvalidCoefficientsError(
                f"force constants for {self.crystal.name}: "
                + (f"unknown names {unknown}; " if unknown else "")
                + (f"missing names {missing}; " if missing else "")
                + f"expected exactly {list(self.names)}"
            )
        return self.check_coefficients(np.array([float(values[n]) for n in self.names]))

    def block_values(self, coefficients: NDArray[np.float64]) -> NDArray[np.float64]:
        """Force-constant blocks for one coefficient vector.

        Returns
        -------
        (n_blocks, 3, 3) float, eV/A^2, aligned with :attr:`pairs`.
        """
        c = self.check_coefficients(coefficients)
        if c.ndim != 1:
            raise InvalidCoefficientsError("block_values takes a single coefficient vector")
        return np.einsum("k,kbxy->bxy", c, self.blocks)

    @property
    def _phase_vectors(self) -> NDArray[np.float64]:
        """(n_blocks, 3) float: n + x_j - x_i in fractional coordinates."""
        pos = self.crystal.positions
        p = self.pairs
        return p[:, 2:5] + pos[p[:, 1]] - pos[p[:, 0]]

    def dynamical_basis(self, qpoints: NDArray[np.float64]) -> NDArray[np.complex128]:
        """Mass-weighted dynamical-matrix basis at reduced wave vectors.

        ``D(q) = sum_k c_k dynamical_basis(q)[k]`` with
        ``D_{i a, j b}(q) = sum_n Phi_{i a, j b}(n) exp(2 pi i q.(n + x_j - x_i)) / sqrt(m_i m_j)``.

        Parameters
        ----------
        qpoints
            (n_q, 3) float, r.l.u. of the primitive reciprocal lattice.

        Returns
        -------
        (n_coeff, n_q, 3 n_atoms, 3 n_atoms) complex, eV/A^2/amu. Hermitian in the last two axes.
        """
        q = np.atleast_2d(np.asarray(qpoints, dtype=float))
        n_at = self.crystal.n_atoms
        phase = np.exp(2j * np.pi * q @ self._phase_vectors.T)  # (n_q, n_blocks)
        inv_sqrt_m = 1.0 / np.sqrt(self.crystal.masses)
        weight = inv_sqrt_m[self.pairs[:, 0]] * inv_sqrt_m[self.pairs[:, 1]]
        out = np.zeros((self.n_coefficients, len(q), n_at, 3, n_at, 3), dtype=complex)
        # Sum blocks pair by pair (atoms i, j); vectorised over coefficients and q.
        for i in range(n_at):
            for j in range(n_at):
                sel = np.nonzero((self.pairs[:, 0] == i) & (self.pairs[:, 1] == j))[0]
                if len(sel) == 0:
                    continue
                out[:, :, i, :, j, :] = np.einsum(
                    "qb,kbxy->kqxy", phase[:, sel] * weight[sel], self.blocks[:, sel]
                )
        return out.reshape(self.n_coefficients, len(q), 3 * n_at, 3 * n_at)

    def describe(self) -> list[dict[str, object]]:
        """JSON-ready table of the coefficients and the bonds they belong to."""
        rows = []
        for k, name in enumerate(self.names):
            orbit = self.orbits[int(self.coefficient_orbit[k])]
            rows.append(
                {
                    "name": name,
                    "shell": orbit.shell,
                    "distance_A": round(orbit.distance, 6),
                    "species": list(orbit.species),
                    "bond_vector_A": [round(x, 6) for x in orbit.vector],
                    "bonds_per_cell": orbit.multiplicity,
                }
            )
        return rows


def build_fc_basis(
    crystal: Crystal,
    *,
    shells: int | None = None,
    cutoff: float | None = None,
    symprec: float = 1e-5,
) -> FCBasis:
    """Build the symmetry-reduced force-constant basis of a crystal.

    Parameters
    ----------
    crystal
        Ordered crystal (primitive cell).
    shells
        Number of neighbour shells to include (shells counted by distinct bond length over all
        atom pairs). Exactly one of ``shells`` and ``cutoff`` must be given.
    cutoff
        Largest bond length to include, Angstrom.
    symprec
        spglib tolerance, fractional.
    """
    cutoff = _resolve_cutoff(crystal, shells, cutoff)
    bonds, vectors, lengths = _all_bonds(crystal, cutoff)
    if len(bonds) == 0:
        raise ForceConstantError(
            f"no bonds of {crystal.name} are shorter than the cutoff {cutoff:.3f} A; "
            "increase shells= or cutoff="
        )
    reps, orbit_of, transforms, rep_constraints = _bond_orbits(
        crystal, bonds, vectors, lengths, symprec
    )
    # Invariant tensor basis per orbit, in reduced row-echelon form.
    orbit_bases: list[NDArray[np.float64]] = []
    orbit_pivots: list[list[int]] = []
    for stabiliser in rep_constraints:
        basis, pivots = _invariant_basis(stabiliser)
        orbit_bases.append(basis)
        orbit_pivots.append(pivots)

    orbits, labels = _make_orbits(crystal, bonds, vectors, lengths, reps, orbit_of)

    # Raw parameters: one per pivot of every orbit.
    raw_names: list[str] = []
    raw_orbit: list[int] = []
    for oid, pivots in enumerate(orbit_pivots):
        for p in pivots:
            raw_names.append(f"{labels[oid]}_{_COMPONENTS[p]}")
            raw_orbit.append(oid)
    raw_blocks = _raw_blocks(
        bonds, crystal.n_atoms, orbit_of, transforms, orbit_bases, orbit_pivots
    )
    reduction, free = _symmetric_self_terms(raw_blocks, len(bonds), crystal.name)
    blocks = np.einsum("rf,rbxy->fbxy", reduction, raw_blocks)
    blocks[np.abs(blocks) < 1e-14] = 0.0
    pairs = np.array(
        [list(b) for b in bonds] + [[i, i, 0, 0, 0] for i in range(crystal.n_atoms)],
        dtype=np.int64,
    )
    return FCBasis(
        crystal=crystal,
        cutoff=float(cutoff),
        names=tuple(raw_names[f] for f in free),
        orbits=tuple(orbits),
        pairs=pairs,
        blocks=blocks,
        coefficient_orbit=np.array([raw_orbit[f] for f in free], dtype=np.int64),
    )


def _resolve_cutoff(crystal: Crystal, shells: int | None, cutoff: float | None) -> float:
    """The bond cutoff (Angstrom) from exactly one of ``shells`` and ``cutoff``."""
    if (shells is None) == (cutoff is None):
        raise ForceConstantError("give exactly one of shells= (a count) or cutoff= (Angstrom)")
    if shells is not None:
        if shells < 1:
            raise ForceConstantError(f"shells must be >= 1, got {shells}")
        cutoff = _shell_distances(crystal, shells)[shells - 1] + _DIST_TOL
    assert cutoff is not None
    if not np.isfinite(cutoff) or cutoff <= 0:
        raise ForceConstantError(f"cutoff must be a positive distance in Angstrom, got {cutoff}")
    return cutoff


def _bond_orbits(
    crystal: Crystal,
    bonds: list[tuple[int, ...]],
    vectors: NDArray[np.float64],
    lengths: NDArray[np.float64],
    symprec: float,
) -> tuple[
    list[int],
    NDArray[np.int64],
    list[tuple[NDArray[np.float64], bool]],
    list[list[tuple[NDArray[np.float64], bool]]],
]:
    """Group the bonds into orbits of the space group (bonds and their reverses).

    Returns
    -------
    reps
        Representative bond (index) of every orbit.
    orbit_of
        (n_bonds,) int, the orbit of every bond.
    transforms
        Per bond: (Cartesian rotation (3, 3), transposed?) that maps the representative's
        tensor onto the bond's.
    stabilisers
        Per orbit: the (rotation, transposed?) pairs that map the representative onto itself.
    """
    rotations, translations = crystal.symmetry_operations(symprec)
    lat = crystal.lattice
    # Cartesian rotations R = A^T W A^-T (A rows are lattice vectors).
    cart_rot = np.einsum("ij,njk,kl->nil", lat.T, rotations, np.linalg.inv(lat.T))
    atom_map, atom_shift = _atom_permutation(crystal, rotations, translations, symprec)

    index = {b: k for k, b in enumerate(bonds)}
    orbit_of = np.full(len(bonds), -1)
    # Per bond: (orbit id, 3x3 rotation, transposed?) that maps the representative tensor.
    transforms: list[tuple[NDArray[np.float64], bool]] = [(np.eye(3), False)] * len(bonds)
    reps: list[int] = []
    rep_constraints: list[list[tuple[NDArray[np.float64], bool]]] = []

    order = sorted(range(len(bonds)), key=lambda k: _rep_key(bonds[k], vectors[k], lengths[k]))
    for k0 in order:
        if orbit_of[k0] >= 0:
            continue
        oid = len(reps)
        reps.append(k0)
        stabiliser: list[tuple[NDArray[np.float64], bool]] = []
        i, j, n = bonds[k0][0], bonds[k0][1], np.array(bonds[k0][2:])
        for op in range(len(rotations)):
            W = rotations[op]
            i2, j2 = atom_map[op, i], atom_map[op, j]
            n2 = atom_shift[op, j] + W @ n - atom_shift[op, i]
            for transposed, image in (
                (False, (int(i2), int(j2), *map(int, n2))),
                (True, (int(j2), int(i2), *map(int, -n2))),
            ):
                kk = index.get(image)  # type: ignore[arg-type]
                if kk is None:
                    raise ForceConstantError(  # pragma: no cover - would be a symmetry bug
                        f"symmetry image {image} of bond {bonds[k0]} is missing; "
                        "loosen symprec or check the structure"
                    )
                if kk == k0:
                    stabiliser.append((cart_rot[op], transposed))
                if orbit_of[kk] < 0:
                    orbit_of[kk] = oid
                    transforms[kk] = (cart_rot[op], transposed)
        rep_constraints.append(stabiliser)
    return reps, orbit_of, transforms, rep_constraints


def _raw_blocks(
    bonds: list[tuple[int, ...]],
    n_atoms: int,
    orbit_of: NDArray[np.int64],
    transforms: list[tuple[NDArray[np.float64], bool]],
    orbit_bases: list[NDArray[np.float64]],
    orbit_pivots: list[list[int]],
) -> NDArray[np.float64]:
    """The 3x3 blocks of every raw parameter (one per pivot of every orbit) on every bond,
    then the self terms from the acoustic sum rule: (n_raw, n_bonds + n_atoms, 3, 3)."""
    n_raw = sum(len(p) for p in orbit_pivots)
    raw_blocks = np.zeros((n_raw, len(bonds) + n_atoms, 3, 3))
    offsets = np.cumsum([0] + [len(p) for p in orbit_pivots])
    for kb in range(len(bonds)):
        oid = int(orbit_of[kb])
        R, transposed = transforms[kb]
        for a, tensor in enumerate(orbit_bases[oid]):
            t = R @ tensor.reshape(3, 3) @ R.T
            raw_blocks[offsets[oid] + a, kb] = t.T if transposed else t
    # Self terms from the acoustic sum rule.
    first_atom = np.array([b[0] for b in bonds])
    for i in range(n_atoms):
        raw_blocks[:, len(bonds) + i] = -raw_blocks[:, : len(bonds)][:, first_atom == i].sum(axis=1)
    return raw_blocks


def _symmetric_self_terms(
    raw_blocks: NDArray[np.float64], n_bonds: int, name: str
) -> tuple[NDArray[np.float64], list[int]]:
    """Self terms must be symmetric; on low-symmetry sites that constrains the parameters.

    Returns the (n_raw, n_free) map from the free parameters to the raw ones and the indices
    of the raw parameters kept as free.
    """
    n_raw = raw_blocks.shape[0]
    self_blocks = raw_blocks[:, n_bonds:]
    antisym = (self_blocks - self_blocks.transpose(0, 1, 3, 2)).reshape(n_raw, -1).T
    free = list(range(n_raw))
    reduction = np.eye(n_raw)
    if np.abs(antisym).max(initial=0.0) > 1e-10:
        reduction, free = _eliminate(antisym, n_raw)
        logger.info(
            "%s: %d coefficients fixed by symmetric self terms (acoustic sum rule)",
            name,
            n_raw - len(free),
        )
    return reduction, free


# --------------------------------------------------------------------------- helpers


def _lattice_points(lattice: NDArray[np.float64], radius: float) -> NDArray[np.int64]:
    """All integer vectors n with |n . A| possibly <= radius (a safe superset)."""
    # |n_i| <= radius * |b_i| / (2 pi), with b the reciprocal vectors.
    recip = np.linalg.inv(lattice).T
    bounds = np.ceil(radius * np.linalg.norm(recip, axis=1)).astype(int) + 1
    ranges = [np.arange(-b, b + 1) for b in bounds]
    grid = np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid.astype(np.int64)


def _all_bonds(
    crystal: Crystal, cutoff: float
) -> tuple[list[tuple[int, ...]], NDArray[np.float64], NDArray[np.float64]]:
    lat = crystal.lattice
    shifts = _lattice_points(lat, cutoff + 1.0)
    bonds: list[tuple[int, ...]] = []
    vecs: list[NDArray[np.float64]] = []
    for i in range(crystal.n_atoms):
        for j in range(crystal.n_atoms):
            frac = shifts + crystal.positions[j] - crystal.positions[i]
            cart = frac @ lat
            dist = np.linalg.norm(cart, axis=1)
            keep = (dist <= cutoff) & (dist > 1e-8)
            for n, v in zip(shifts[keep], cart[keep], strict=True):
                bonds.append((i, j, int(n[0]), int(n[1]), int(n[2])))
                vecs.append(v)
    vectors = np.array(vecs).reshape(-1, 3)
    return bonds, vectors, np.linalg.norm(vectors, axis=1)


def _shell_distances(crystal: Crystal, shells: int) -> NDArray[np.float64]:
    """Distinct bond lengths (Angstrom), ascending, at least ``shells`` of them."""
    radius = float(np.max(np.linalg.norm(crystal.lattice, axis=1)))
    while True:
        _, _, lengths = _all_bonds(crystal, radius)
        distinct: list[float] = []
        for d in np.sort(lengths):
            if not distinct or d - distinct[-1] > _DIST_TOL:
                distinct.append(float(d))
        if len(distinct) > shells:
            return np.array(distinct)
        radius *= 1.5


def _atom_permutation(
    crystal: Crystal,
    rotations: NDArray[np.int64],
    translations: NDArray[np.float64],
    symprec: float,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """For every operation and atom: the image atom and the lattice shift of the image.

    ``W x_i + w = x_{map[op, i]} + shift[op, i]``.
    """
    pos = crystal.positions
    n_ops, n_at = len(rotations), crystal.n_atoms
    amap = np.zeros((n_ops, n_at), dtype=np.int64)
    shift = np.zeros((n_ops, n_at, 3), dtype=np.int64)
    tol = max(symprec * 10, 1e-4)
    for op in range(n_ops):
        image = pos @ rotations[op].T + translations[op]
        for i in range(n_at):
            diff = image[i] - pos
            nearest = np.round(diff)
            err = np.linalg.norm((diff - nearest) @ crystal.lattice, axis=1)
            matches = np.nonzero((err < tol) & [s == crystal.species[i] for s in crystal.species])[
                0
            ]
            if len(matches) != 1:
                raise ForceConstantError(  # pragma: no cover - spglib gave an inconsistent op
                    f"symmetry operation {op} does not map atom {i} onto exactly one atom"
                )
            amap[op, i] = matches[0]
            shift[op, i] = nearest[matches[0]].astype(np.int64)
    return amap, shift


def _rep_key(bond: tuple[int, ...], vector: NDArray[np.float64], length: Any) -> tuple:
    """Sort key choosing representatives: shortest, lowest first atom, 'most positive' vector."""
    v = np.round(vector, 6)
    return (round(float(length), 4), bond[0], bond[1], -v[0], -v[1], -v[2])


def _invariant_basis(
    stabiliser: list[tuple[NDArray[np.float64], bool]],
) -> tuple[NDArray[np.float64], list[int]]:
    """Basis of 3x3 tensors T with T = R T R^T (or its transpose) for every stabiliser element.

    Returns the basis in reduced row-echelon form with pivots preferring diagonal components,
    as (n_free, 9) rows, and the pivot component index of every row.
    """
    perm = np.eye(9)[:, [3 * (k % 3) + k // 3 for k in range(9)]]  # vec(T) -> vec(T^T)
    rows = []
    for R, transposed in stabiliser:
        K = np.kron(R, R)  # vec(R T R^T) = (R (x) R) vec(T) for row-major vec
        if transposed:
            K = perm @ K
        rows.append(K - np.eye(9))
    A = np.vstack(rows) if rows else np.zeros((1, 9))
    _, s, vh = np.linalg.svd(A)
    rank = int(np.sum(s > 1e-8))
    null = vh[rank:]  # (n_free, 9), orthonormal
    # RREF over the preferred column order.
    cols = list(_PIVOT_ORDER)
    M = null[:, cols].copy()
    pivots: list[int] = []
    r = 0
    for c in range(9):
        if r >= len(M):
            break
        p = r + int(np.argmax(np.abs(M[r:, c])))
        if abs(M[p, c]) < 1e-8:
            continue
        M[[r, p]] = M[[p, r]]
        M[r] /= M[r, c]
        for rr in range(len(M)):
            if rr != r:
                M[rr] -= M[rr, c] * M[r]
        pivots.append(cols[c])
        r += 1
    basis = np.zeros_like(M)
    basis[:, cols] = M
    basis[np.abs(basis) < 1e-12] = 0.0
    return basis, pivots


def _eliminate(constraints: NDArray[np.float64], n: int) -> tuple[NDArray[np.float64], list[int]]:
    """Solve ``constraints @ p = 0`` keeping a subset of the original parameters free.

    Returns ``(reduction (n, n_free), free indices)`` with ``p = reduction @ p_free`` and
    ``reduction[free] = identity``.
    """
    _, s, vh = np.linalg.svd(constraints)
    rank = int(np.sum(s > 1e-10 * max(1.0, s.max(initial=0.0))))
    null = vh[rank:].T  # (n, n_free)
    # Column-pivoted elimination: prefer the earliest (shortest-bond, diagonal) parameters.
    M = null.T.copy()
    free: list[int] = []
    r = 0
    for c in range(n):
        if r >= len(M):
            break
        p = r + int(np.argmax(np.abs(M[r:, c])))
        if abs(M[p, c]) < 1e-8:
            continue
        M[[r, p]] = M[[p, r]]
        M[r] /= M[r, c]
        for rr in range(len(M)):
            if rr != r:
                M[rr] -= M[rr, c] * M[r]
        free.append(c)
        r += 1
    return M.T, free


def _make_orbits(
    crystal: Crystal,
    bonds: list[tuple[int, ...]],
    vectors: NDArray[np.float64],
    lengths: NDArray[np.float64],
    reps: list[int],
    orbit_of: NDArray[np.int64],
) -> tuple[list[BondOrbit], list[str]]:
    distinct: list[float] = []
    for d in np.sort(lengths):
        if not distinct or d - distinct[-1] > _DIST_TOL:
            distinct.append(float(d))
    shell_of = [int(np.argmin(np.abs(np.array(distinct) - lengths[k]))) + 1 for k in reps]
    labels: list[str] = []
    orbits: list[BondOrbit] = []
    for oid, k in enumerate(reps):
        same = [o for o, s in enumerate(shell_of) if s == shell_of[oid]]
        suffix = "" if len(same) == 1 else "abcdefghijklmnopqrstuvwxyz"[same.index(oid)]
        label = f"{shell_of[oid]}NN{suffix}"
        labels.append(label)
        b = bonds[k]
        orbits.append(
            BondOrbit(
                label=label,
                shell=shell_of[oid],
                distance=float(lengths[k]),
                species=(crystal.species[b[0]], crystal.species[b[1]]),
                representative=(int(b[0]), int(b[1]), int(b[2]), int(b[3]), int(b[4])),
                vector=(float(vectors[k][0]), float(vectors[k][1]), float(vectors[k][2])),
                multiplicity=int(np.sum(orbit_of == oid)),
            )
        )
    return orbits, labels
