"""Periodic neighbour graphs of crystals for the e3nn force-constant model (numpy only).

A crystal is given by its primitive cell: atomic numbers (n,), lattice (3, 3) Angstrom with
rows the lattice vectors, fractional coordinates (n, 3). Its graph holds every *directed*
bond ``(i, j, n1, n2, n3)`` (atom ``i`` of the home cell to atom ``j`` of the cell at lattice
vector ``n``) with length ``0 < |r| <= cutoff``, where (the FC database's convention)::

    r = (frac[j] + n - frac[i]) @ lattice      # Angstrom

The bond set is closed under reversal ``(i, j, n) -> (j, i, -n)`` (``reverse[e]`` is the
index of the reversed bond), so the force constants of a bond and of its reverse can be
made exact transposes of each other. Self terms ``(i, i, 0)`` are not edges; the model
adds them by the acoustic sum rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from model_server.exceptions import ModelServerError

__all__ = [
    "MAX_ATOMS",
    "MIN_DISTANCE",
    "CellTooLargeError",
    "FCModelError",
    "InvalidStructureError",
    "PeriodicGraph",
    "UnknownElementError",
    "atom_descriptors",
    "build_graph",
    "check_structure",
    "match_pairs",
]

#: Largest primitive cell (atoms) the model accepts; bigger cells are refused with a message.
MAX_ATOMS = 200
#: Two atoms closer than this (Angstrom) are an error (overlapping atoms, a broken CIF).
MIN_DISTANCE = 0.5


class FCModelError(ModelServerError):
    """Any error of the structure -> force-constant model (its input or its artifact)."""


class InvalidStructureError(FCModelError):
    """A structure the model cannot take: wrong shapes, NaN/inf, a degenerate lattice,
    overlapping atoms or an atom with no neighbour within the cutoff."""


class UnknownElementError(FCModelError):
    """An element that the model has no embedding for (never seen in training)."""


class CellTooLargeError(FCModelError):
    """A primitive cell with more atoms than :data:`MAX_ATOMS`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeriodicGraph:
    """Directed bonds of one crystal within a cutoff.

    Attributes
    ----------
    numbers
        (n,) int, atomic numbers.
    lattice
        (3, 3) float, Angstrom, rows are the lattice vectors.
    frac
        (n, 3) float, fractional coordinates as given (not wrapped).
    cutoff
        Largest bond length, Angstrom.
    pairs
        (m, 5) int, ``(i, j, n1, n2, n3)`` of every directed bond, sorted.
    vectors
        (m, 3) float, Angstrom, the bond vectors.
    reverse
        (m,) int, index of the bond ``(j, i, -n)``.
    component
        (n,) int, connected part of the bond graph each atom belongs to (all 0 when the
        graph is connected, as it is for any dense crystal).
    """

    numbers: NDArray[np.int64]
    lattice: NDArray[np.float64]
    frac: NDArray[np.float64]
    cutoff: float
    pairs: NDArray[np.int64]
    vectors: NDArray[np.float64]
    reverse: NDArray[np.int64]
    component: NDArray[np.int64]

    @property
    def n_atoms(self) -> int:
        """Number of atoms in the cell."""
        return len(self.numbers)

    @property
    def lengths(self) -> NDArray[np.float64]:
        """(m,) float, bond lengths, Angstrom."""
        return np.asarray(np.linalg.norm(self.vectors, axis=1))


def check_structure(
    numbers: ArrayLike, lattice: ArrayLike, frac: ArrayLike, *, max_atoms: int = MAX_ATOMS
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Validate a structure and return it as (int64, float64, float64) arrays.

    Raises
    ------
    InvalidStructureError
        Wrong shapes, non-finite values, non-integer or impossible atomic numbers, a
        degenerate lattice.
    CellTooLargeError
        More than ``max_atoms`` atoms.
    """
    try:
        z_raw = np.asarray(numbers, dtype=np.float64).ravel()
        lat = np.asarray(lattice, dtype=np.float64)
        x = np.asarray(frac, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidStructureError(f"structure arrays are not numeric: {e}") from e
    n = len(z_raw)
    if n == 0:
        raise InvalidStructureError("the structure has no atoms")
    if n > max_atoms:
        raise CellTooLargeError(
            f"the cell has {n} atoms; the force-constant model takes at most {max_atoms} "
            "atoms per primitive cell (reduce it to its primitive cell, e.g. with spglib's "
            "find_primitive, or use a smaller ordered model of the structure)"
        )
    if lat.shape != (3, 3):
        raise InvalidStructureError(f"lattice must be (3, 3) Angstrom, got shape {lat.shape}")
    if x.shape != (n, 3):
        raise InvalidStructureError(
            f"frac must be ({n}, 3) for {n} atomic numbers, got shape {x.shape}"
        )
    for name, arr in (("atomic numbers", z_raw), ("lattice", lat), ("frac", x)):
        if not np.all(np.isfinite(arr)):
            raise InvalidStructureError(f"the {name} contain NaN or inf")
    if np.any(z_raw != np.round(z_raw)) or np.any(z_raw < 1) or np.any(z_raw > 118):
        raise InvalidStructureError(f"atomic numbers must be integers 1..118, got {z_raw}")
    volume = abs(float(np.linalg.det(lat)))
    if volume < 1e-3 * max(float(np.abs(lat).max()), 1e-12) ** 3 or volume < 1e-6:
        raise InvalidStructureError(
            f"the lattice is degenerate (cell volume {volume:.3g} A^3); rows of `lattice` "
            "must be three independent lattice vectors in Angstrom"
        )
    return z_raw.astype(np.int64), lat, x


def _search_range(lattice: NDArray[np.float64], cutoff: float) -> NDArray[np.int64]:
    """(3,) int: how many cells along each axis a sphere of radius ``cutoff`` reaches."""
    recip = np.linalg.inv(lattice).T  # rows b_k / (2 pi); 1/|row| is the plane spacing
    heights = 1.0 / np.linalg.norm(recip, axis=1)
    return np.ceil(cutoff / heights).astype(np.int64) + 1


def build_graph(
    numbers: ArrayLike, lattice: ArrayLike, frac: ArrayLike, cutoff: float
) -> PeriodicGraph:
    """All directed bonds within ``cutoff`` (Angstrom) of a periodic crystal.

    Raises
    ------
    InvalidStructureError
        Invalid arrays (see :func:`check_structure`), two atoms closer than
        :data:`MIN_DISTANCE`, or an atom with no neighbour within the cutoff.
    """
    z, lat, x = check_structure(numbers, lattice, frac, max_atoms=10**9)
    n = len(z)
    reach = _search_range(lat, cutoff)
    # Nearest-image offset of every atom pair, then a box of shifts around it.
    diff = x[None, :, :] - x[:, None, :]  # (n, n, 3): frac[j] - frac[i]
    base = -np.round(diff).astype(np.int64)
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    shifts = np.stack([g.ravel() for g in grids], axis=1)  # (s, 3)
    rows: list[NDArray[np.int64]] = []
    vecs: list[NDArray[np.float64]] = []
    for i in range(n):
        cells = base[i][:, None, :] + shifts[None, :, :]  # (n, s, 3)
        r = (diff[i][:, None, :] + cells) @ lat  # (n, s, 3)
        d = np.linalg.norm(r, axis=2)
        home = (np.arange(n)[:, None] == i) & np.all(cells == 0, axis=2)  # the atom itself
        d = np.where(home, np.inf, d)
        if d.min() < MIN_DISTANCE:
            k, _ = np.unravel_index(np.argmin(d), d.shape)
            raise InvalidStructureError(
                f"atoms {i} and {int(k)} are {float(d.min()):.3f} A apart, closer than "
                f"{MIN_DISTANCE} A: overlapping sites (a partially occupied or duplicated "
                "site?)"
            )
        jj, ss = np.nonzero(d <= cutoff)
        if len(jj) == 0:
            raise InvalidStructureError(
                f"atom {i} (Z={z[i]}) has no neighbour within {cutoff} A: the structure is "
                "too dilute for the model (check the lattice units: Angstrom)"
            )
        c = cells[jj, ss]
        rows.append(np.column_stack([np.full(len(jj), i), jj, c]).astype(np.int64))
        vecs.append(r[jj, ss])
    pairs = np.concatenate(rows)
    vectors = np.concatenate(vecs)
    # Close the set under reversal (a bond at exactly the cutoff may be kept one way only).
    rev_pairs = np.column_stack([pairs[:, 1], pairs[:, 0], -pairs[:, 2:5]])
    all_pairs = np.concatenate([pairs, rev_pairs])
    all_vecs = np.concatenate([vectors, -vectors])
    uniq, first = np.unique(all_pairs, axis=0, return_index=True)
    pairs, vectors = uniq, all_vecs[first]
    rev_keys = np.column_stack([pairs[:, 1], pairs[:, 0], -pairs[:, 2:5]])
    reverse = _lookup(pairs, rev_keys)
    if np.any(reverse < 0):  # pragma: no cover - guaranteed by the union above
        raise InvalidStructureError("internal error: bond set not closed under reversal")
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    adjacency = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, component = connected_components(adjacency, directed=False)
    return PeriodicGraph(
        numbers=z,
        lattice=lat,
        frac=x,
        cutoff=float(cutoff),
        pairs=pairs,
        vectors=vectors,
        reverse=reverse,
        component=np.asarray(component, dtype=np.int64),
    )


def _lookup(table: NDArray[np.int64], keys: NDArray[np.int64]) -> NDArray[np.int64]:
    """Row index of every key in a table of unique rows (``-1`` where absent)."""
    index = {tuple(row): k for k, row in enumerate(table.tolist())}
    return np.array([index.get(tuple(row), -1) for row in keys.tolist()], dtype=np.int64)


def match_pairs(table: ArrayLike, keys: ArrayLike) -> NDArray[np.int64]:
    """Position of each ``(i, j, n1, n2, n3)`` row of ``keys`` in ``table`` (``-1``: absent).

    Parameters
    ----------
    table
        (m, 5) int, unique rows.
    keys
        (k, 5) int.

    Returns
    -------
    (k,) int.
    """
    return _lookup(
        np.asarray(table, dtype=np.int64).reshape(-1, 5),
        np.asarray(keys, dtype=np.int64).reshape(-1, 5),
    )


#: Centres (Angstrom) and width of the Gaussians of :func:`atom_descriptors`.
DESCRIPTOR_CENTRES = np.linspace(1.0, 6.0, 21)
DESCRIPTOR_WIDTH = 0.25


def atom_descriptors(graph: PeriodicGraph) -> NDArray[np.float64]:
    """Rotation-invariant description of every atom's neighbourhood (for the domain check).

    Two Gaussian-smeared radial distributions of the neighbours within the graph's cutoff
    (centres :data:`DESCRIPTOR_CENTRES`, sigma :data:`DESCRIPTOR_WIDTH`, times the smooth
    cutoff envelope): one counting neighbours, one weighting each by its covalent radius
    (Angstrom, ASE's table), so that both the geometry and the kind of neighbours count.

    Returns
    -------
    (n, 2 * len(DESCRIPTOR_CENTRES)) float.
    """
    from ase.data import covalent_radii

    r = graph.lengths
    x = np.clip(r / graph.cutoff, 0.0, 1.0)
    env = 1.0 - 28.0 * x**6 + 48.0 * x**7 - 21.0 * x**8
    g = np.exp(-0.5 * ((r[:, None] - DESCRIPTOR_CENTRES[None, :]) / DESCRIPTOR_WIDTH) ** 2)
    g = g * env[:, None]
    radius = np.asarray(covalent_radii[graph.numbers[graph.pairs[:, 1]]], dtype=np.float64)
    out = np.zeros((graph.n_atoms, 2 * len(DESCRIPTOR_CENTRES)))
    np.add.at(out, graph.pairs[:, 0], np.concatenate([g, g * radius[:, None]], axis=1))
    return out
