"""A crystal with its force constants given per atom pair, whatever their source.

The spectra of :mod:`model_server.prediction.spectra` and the prediction endpoint take force
constants
in the form the FC database (``simulations.fcdb.database``) and the e3nn model
(:mod:`model_server.structure_fc.model`) give them:

* ``numbers`` (n,) atomic numbers, ``lattice`` (3, 3) Angstrom with rows the lattice
  vectors, ``frac`` (n, 3) fractional coordinates of the primitive cell;
* ``pairs`` (m, 5) int rows ``(i, j, n1, n2, n3)``: atom ``i`` of the home cell to atom
  ``j`` of the cell at lattice vector ``(n1, n2, n3)``, bond vector
  ``(frac[j] + n - frac[i]) @ lattice``;
* ``fc`` (m, 3, 3) float, eV/Angstrom^2, ``Phi_ab(i0, jn)`` (phonopy's sign convention),
  self terms ``(i, i, 0, 0, 0)`` included.

A symmetry-reduced set (:class:`simulations.lattice.force_constants.FCBasis` with coefficients)
converts with :meth:`CrystalFC.from_basis`. The other way, :meth:`CrystalFC.basis` wraps the
blocks as a one-coefficient :class:`FCBasis` (coefficient 1, the blocks as they are), so
that every physics model built on a basis (:class:`simulations.lattice.sqe.CoherentSQE`, the
forward model, the event simulator) runs on them unchanged: the *direct path*. It keeps
every bond, however long, and needs no basis construction, which grows quickly with the
cell. :func:`project_onto_basis` gives the least-squares coefficients of a basis and how
much of the FCs lies outside it (bonds beyond the basis cutoff, and the part within the
cutoff that breaks the crystal's symmetry); :meth:`CrystalFC.symmetry_residual` measures
the latter without a basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import spglib
from numpy.typing import ArrayLike, NDArray

from model_server.exceptions import ModelServerError
from simulations.lattice.crystals import Crystal, _lattice_type
from simulations.lattice.force_constants import FCBasis, _atom_permutation
from simulations.lattice.nac import NACTerm

__all__ = ["CrystalFC", "FCInputError", "ProjectionResult", "project_onto_basis"]


class FCInputError(ModelServerError, ValueError):
    """A structure or force-constant set that cannot be used (wrong shapes, NaN, atoms out
    of range, a degenerate lattice, an unknown atomic number)."""


@lru_cache(maxsize=256)
def _element(z: int) -> tuple[str, float]:
    from pymatgen.core import Element

    try:
        el = Element.from_Z(int(z))
    except ValueError as exc:
        raise FCInputError(f"atomic number {z} is not an element") from exc
    return el.symbol, float(el.atomic_mass)


_SYSTEMS = (
    (2, "triclinic"),
    (15, "monoclinic"),
    (74, "orthorhombic"),
    (142, "tetragonal"),
    (167, "trigonal"),
    (194, "hexagonal"),
    (230, "cubic"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class CrystalFC:
    """A primitive cell and its per-pair force constants (see the module docstring).

    Attributes
    ----------
    name
        Label of the crystal (a formula, a material name).
    numbers
        (n,) int, atomic numbers.
    lattice
        (3, 3) float, Angstrom, rows are the lattice vectors.
    frac
        (n, 3) float, fractional coordinates as given (not wrapped: the pairs refer to them).
    pairs
        (m, 5) int, ``(i, j, n1, n2, n3)``.
    fc
        (m, 3, 3) float, eV/Angstrom^2.
    masses
        (n,) float, amu (default: standard atomic weights).
    nac
        The non-analytic term (Born charges and dielectric tensor of a polar crystal,
        :class:`simulations.lattice.nac.NACTerm`) on this cell, or ``None``.
    """

    name: str
    numbers: NDArray[np.int64]
    lattice: NDArray[np.float64]
    frac: NDArray[np.float64]
    pairs: NDArray[np.int64]
    fc: NDArray[np.float64]
    masses: NDArray[np.float64]
    nac: NACTerm | None = None

    @classmethod
    def from_arrays(
        cls,
        numbers: ArrayLike,
        lattice: ArrayLike,
        frac: ArrayLike,
        pairs: ArrayLike,
        fc: ArrayLike,
        *,
        masses: ArrayLike | None = None,
        name: str | None = None,
        nac: NACTerm | None = None,
    ) -> CrystalFC:
        """Validate and wrap arrays (copies, float64 / int64); ``nac`` must be on the same
        cell.

        Raises
        ------
        FCInputError
            Wrong shapes, non-finite values, pairs naming atoms that do not exist, a
            degenerate lattice, non-positive masses, an unknown atomic number.
        """
        z = np.asarray(numbers, dtype=np.int64).ravel().copy()
        lat = np.asarray(lattice, dtype=np.float64).copy()
        x = np.asarray(frac, dtype=np.float64).copy()
        p = np.asarray(pairs, dtype=np.int64).copy()
        f = np.asarray(fc, dtype=np.float64).copy()
        n = len(z)
        if n == 0:
            raise FCInputError("the crystal has no atoms")
        if lat.shape != (3, 3) or x.shape != (n, 3):
            raise FCInputError(
                f"lattice must be (3, 3) and frac ({n}, 3) for {n} atoms; got {lat.shape}, "
                f"{x.shape}"
            )
        if p.ndim != 2 or p.shape[1] != 5 or f.shape != (len(p), 3, 3):
            raise FCInputError(
                f"pairs must be (m, 5) and fc (m, 3, 3); got pairs {p.shape}, fc {f.shape}"
            )
        if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(x)) and np.all(np.isfinite(f))):
            raise FCInputError("the lattice, positions or force constants contain NaN or inf")
        volume = abs(float(np.linalg.det(lat)))
        if volume < 1e-3:
            raise FCInputError(f"the lattice is degenerate (cell volume {volume:.3g} A^3)")
        if len(p) and (p[:, :2].min() < 0 or p[:, :2].max() >= n):
            raise FCInputError(f"pairs refer to atoms outside 0..{n - 1}")
        symbols = [_element(int(v))[0] for v in z]
        if masses is None:
            m = np.array([_element(int(v))[1] for v in z], dtype=np.float64)
        else:
            m = np.asarray(masses, dtype=np.float64).ravel().copy()
            if m.shape != (n,) or not np.all(np.isfinite(m)) or np.any(m <= 0):
                raise FCInputError(f"masses must be {n} positive numbers (amu)")
        if name is None:
            from collections import Counter

            name = "".join(f"{s}{c if c > 1 else ''}" for s, c in Counter(symbols).items())
        if nac is not None and not (
            nac.n_atoms == n
            and np.allclose(nac.lattice, lat, atol=1e-8)
            and np.allclose(nac.frac, x, atol=1e-8)
        ):
            raise FCInputError("the NAC term is not on the cell of the force constants")
        return cls(name=name, numbers=z, lattice=lat, frac=x, pairs=p, fc=f, masses=m, nac=nac)

    @classmethod
    def from_basis(
        cls, basis: FCBasis, coefficients: ArrayLike, *, name: str | None = None
    ) -> CrystalFC:
        """The per-pair blocks of a symmetry-reduced set (eV/A^2) on the basis' crystal."""
        cryst = basis.crystal
        return cls.from_arrays(
            cryst.numbers,
            cryst.lattice,
            cryst.positions,
            basis.pairs,
            basis.block_values(np.asarray(coefficients, dtype=float)),
            masses=cryst.masses,
            name=name or cryst.name,
            nac=basis.nac,
        )

    # -- properties ---------------------------------------------------------------------

    @property
    def n_atoms(self) -> int:
        """Atoms in the primitive cell."""
        return len(self.numbers)

    @property
    def species(self) -> tuple[str, ...]:
        """Element symbol of every atom."""
        return tuple(_element(int(z))[0] for z in self.numbers)

    @property
    def bond_vectors(self) -> NDArray[np.float64]:
        """(m, 3) float, Angstrom: ``(frac[j] + n - frac[i]) @ lattice`` of every pair."""
        p = self.pairs
        return np.asarray((self.frac[p[:, 1]] + p[:, 2:5] - self.frac[p[:, 0]]) @ self.lattice)

    @property
    def cutoff(self) -> float:
        """Longest bond with a force constant, Angstrom."""
        return float(np.linalg.norm(self.bond_vectors, axis=1).max(initial=0.0))

    def asr_residual(self) -> float:
        """Largest |sum over (j, n) of Phi(i0, jn)| over atoms and components, relative to
        the largest |Phi| (0 when the acoustic sum rule holds exactly)."""
        sums = np.zeros((self.n_atoms, 3, 3))
        np.add.at(sums, self.pairs[:, 0], self.fc)
        scale = float(np.abs(self.fc).max(initial=0.0)) or 1.0
        return float(np.abs(sums).max(initial=0.0) / scale)

    def symmetry_residual(self, symprec: float = 1e-3) -> float:
        """How far the FCs are from obeying the crystal's space group.

        For every operation ``{W|w}`` (spglib, tolerance ``symprec``) and every pair, the
        block of the image pair must be ``R Phi R^T`` with ``R`` the Cartesian rotation.
        Returns the largest deviation relative to the largest |Phi| (0: exact; ``inf`` when
        an image pair is missing, i.e. the pair set itself breaks the symmetry).
        """
        cryst = self.crystal(symprec=symprec)
        rotations, translations = cryst.symmetry_operations(symprec)
        amap, shift = _atom_permutation(cryst, rotations, translations, symprec)
        lat = self.lattice
        cart = np.einsum("ij,njk,kl->nil", lat.T, rotations, np.linalg.inv(lat.T))
        index = {tuple(int(v) for v in row): k for k, row in enumerate(self.pairs)}
        scale = float(np.abs(self.fc).max(initial=0.0)) or 1.0
        worst = 0.0
        p = self.pairs
        for op in range(len(rotations)):
            i2 = amap[op, p[:, 0]]
            j2 = amap[op, p[:, 1]]
            n2 = shift[op, p[:, 1]] + p[:, 2:5] @ rotations[op].T - shift[op, p[:, 0]]
            images = np.column_stack([i2, j2, n2])
            target = [index.get(tuple(int(v) for v in row), -1) for row in images]
            t = np.asarray(target)
            if np.any(t < 0):
                return float("inf")
            r = cart[op]
            rotated = np.einsum("ab,mbc,dc->mad", r, self.fc, r)
            worst = max(worst, float(np.abs(self.fc[t] - rotated).max(initial=0.0)))
        return worst / scale

    # -- conversions --------------------------------------------------------------------

    def crystal(self, symprec: float = 1e-3) -> Crystal:
        """The cell as a :class:`~simulations.lattice.crystals.Crystal` (positions as given, no
        reduction to a standard cell: the pairs refer to this cell). Space group and
        conventional cell from spglib; no high-symmetry k-points."""
        cell: Any = (self.lattice, self.frac, self.numbers)
        data = spglib.get_symmetry_dataset(cell, symprec=symprec)
        if data is None:  # pragma: no cover - spglib fails only on broken cells
            raise FCInputError(f"spglib cannot find the symmetry of {self.name}")
        number = int(data.number)
        system = next(s for top, s in _SYSTEMS if number <= top)
        symbol = str(data.international)
        return Crystal(
            name=self.name,
            lattice=self.lattice.copy(),
            positions=self.frac.copy(),
            species=self.species,
            masses=self.masses.copy(),
            conventional_lattice=np.asarray(data.std_lattice, dtype=float),
            spacegroup=symbol,
            spacegroup_number=number,
            lattice_type=_lattice_type(system, symbol),
        )

    def basis(self, crystal: Crystal | None = None) -> FCBasis:
        """The blocks as a one-coefficient basis (coefficient ``1.0``, named ``"scale"``).

        Every model that takes a basis and coefficients then uses exactly these FCs:
        ``CoherentSQE(fcs.basis(), [1.0])`` (with the non-analytic term, when there is one).
        ``crystal`` must hold this cell's lattice and positions (default: :meth:`crystal`).
        """
        cryst = crystal if crystal is not None else self.crystal()
        if not (
            np.allclose(cryst.lattice, self.lattice, atol=1e-8)
            and np.allclose(cryst.positions, self.frac, atol=1e-8)
        ):
            raise FCInputError(
                "the crystal's lattice and positions differ from the cell the FCs refer to"
            )
        return FCBasis(
            crystal=cryst,
            cutoff=self.cutoff,
            names=("scale",),
            orbits=(),
            pairs=self.pairs.copy(),
            blocks=self.fc[None].copy(),
            coefficient_orbit=np.zeros(1, dtype=np.int64),
            nac=self.nac,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ProjectionResult:
    """Least-squares projection of per-pair FCs onto a symmetry-reduced basis.

    Attributes
    ----------
    coefficients
        (n_coeff,) float, eV/A^2, in the order of the basis' names.
    residual
        ||fit - Phi|| / ||Phi|| over the bonds inside the basis cutoff (Frobenius norm over
        blocks; self terms excluded since both sides obey the acoustic sum rule): the part
        that breaks the crystal's symmetry.
    truncated
        ||Phi of the bonds beyond the basis cutoff|| / ||Phi of all bonds||: what the basis
        cannot hold at all.
    missing
        Bonds of the basis that the FCs do not have (taken as zero).
    """

    coefficients: NDArray[np.float64]
    residual: float
    truncated: float
    missing: int


def project_onto_basis(fcs: CrystalFC, basis: FCBasis) -> ProjectionResult:
    """Coefficients of ``basis`` closest (least squares over the bond blocks) to ``fcs``.

    ``fcs`` must be on the basis' cell (same lattice and positions, e.g. predicted from
    ``basis.crystal``'s arrays).

    Raises
    ------
    FCInputError
        If the cells differ.
    """
    cryst = basis.crystal
    if not (
        cryst.n_atoms == fcs.n_atoms
        and np.allclose(cryst.lattice, fcs.lattice, atol=1e-6)
        and np.allclose(cryst.positions, fcs.frac, atol=1e-6)
    ):
        raise FCInputError("the force constants are not on the basis' cell")
    own = {tuple(int(v) for v in row): k for k, row in enumerate(fcs.pairs)}
    is_self = (basis.pairs[:, 0] == basis.pairs[:, 1]) & ~basis.pairs[:, 2:5].any(axis=1)
    rows = np.nonzero(~is_self)[0]
    target = np.zeros((len(rows), 3, 3))
    missing = 0
    used: set[int] = set()
    for r, b in enumerate(rows):
        k = own.get(tuple(int(v) for v in basis.pairs[b]))
        if k is None:
            missing += 1
        else:
            target[r] = fcs.fc[k]
            used.add(k)
    design = basis.blocks[:, rows].reshape(basis.n_coefficients, -1).T  # (9 n_bonds, n_coeff)
    coef, *_ = np.linalg.lstsq(design, target.ravel(), rcond=None)
    fit = design @ coef
    norm = float(np.linalg.norm(target)) or 1.0
    fcs_self = (fcs.pairs[:, 0] == fcs.pairs[:, 1]) & ~fcs.pairs[:, 2:5].any(axis=1)
    beyond = [k for k in range(len(fcs.pairs)) if k not in used and not fcs_self[k]]
    all_bonds = float(np.linalg.norm(fcs.fc[~fcs_self])) or 1.0
    return ProjectionResult(
        coefficients=np.asarray(coef, dtype=np.float64),
        residual=float(np.linalg.norm(fit - target.ravel()) / norm),
        truncated=float(np.linalg.norm(fcs.fc[beyond]) / all_bonds) if beyond else 0.0,
        missing=missing,
    )
