"""High-symmetry q-paths and the (q, E) grid on which I(q, E) lives.

A path is written as labelled points joined by ``-`` with ``|`` for a jump, e.g.
``"G-X-U|K-G-L-W-X"`` (``G`` is Gamma). Point coordinates are the Setyawan-Curtarolo ones
for the crystal's lattice, in r.l.u. of the standard primitive reciprocal lattice.

The path's bins can be split by the structure-factor class of the Brillouin zone a cell
lies in (:func:`zone_classes`, :func:`make_class_grid`): zones whose atoms scatter with the
same relative phases share a class, so that folding keeps what tells optic-like from
acoustic-like eigenvectors.

A powder sample's spectrum S(|Q|, E) lives on a :class:`PowderGrid` of |Q| bins instead
(:func:`make_powder_grid`).

The :class:`Grid` carries a fingerprint (a hash of the path's q-points and the energy bin
edges) that every model and every folded data set stores, so that spectra on different
grids are never mixed silently.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from simulations.exceptions import GridError
from simulations.lattice.crystals import Crystal

__all__ = [
    "Grid",
    "PowderGrid",
    "QPath",
    "ZoneClasses",
    "make_class_grid",
    "make_grid",
    "make_powder_grid",
    "make_qpath",
    "make_wedge_grid",
    "zone_classes",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class QPath:
    """Points along a high-symmetry path.

    Attributes
    ----------
    path
        Path string, e.g. ``"G-X-U|K-G-L-W-X"``.
    qpoints
        (n_q, 3) float, r.l.u. of the primitive reciprocal lattice.
    distance
        (n_q,) float, 1/Angstrom, cumulative distance along the path (jumps add nothing).
    ticks
        ``(index, label)`` of every labelled point; a jump shows as ``"U|K"``.
    """

    path: str
    qpoints: NDArray[np.float64]
    distance: NDArray[np.float64]
    ticks: tuple[tuple[int, str], ...]

    @property
    def n_q(self) -> int:
        """Number of q-points."""
        return len(self.qpoints)


def _parse_path(path: str, kpoints: dict[str, tuple[float, float, float]]) -> list[list[str]]:
    if not path or not path.strip():
        raise GridError("empty q-path; give labelled points such as 'G-X-U|K-G-L-W-X'")
    segments = [[p.strip() for p in seg.split("-")] for seg in path.split("|")]
    for seg in segments:
        if len(seg) < 2 or any(not p for p in seg):
            raise GridError(f"q-path {path!r}: every piece between '|' needs two or more points")
        unknown = [p for p in seg if p not in kpoints]
        if unknown:
            raise GridError(
                f"q-path {path!r}: unknown point(s) {unknown}; this lattice has "
                f"{', '.join(sorted(kpoints))} ('G' is Gamma)"
            )
    return segments


def make_qpath(crystal: Crystal, path: str | None = None, n_q: int = 200) -> QPath:
    """Sample a path with about ``n_q`` points spaced evenly in |q| (1/Angstrom).

    Every labelled point lies exactly on the path; each straight piece gets a number of
    intervals proportional to its length (at least one).
    """
    path = path or crystal.default_path
    if n_q < 2:
        raise GridError(f"a q-path needs at least 2 points, got n_q={n_q}")
    segments = _parse_path(path, crystal.kpoints)
    recip = crystal.reciprocal_lattice
    pieces = [
        (np.array(crystal.kpoints[a]), np.array(crystal.kpoints[b]))
        for seg in segments
        for a, b in itertools.pairwise(seg)
    ]
    lengths = np.array([np.linalg.norm((b - a) @ recip) for a, b in pieces])
    if np.any(lengths <= 0):
        raise GridError(f"q-path {path!r} has a piece of zero length")
    n_lines = len(segments)
    # Points = sum(intervals) + one closing point per continuous line.
    budget = max(n_q - n_lines, len(pieces))
    intervals = np.maximum(1, np.round(lengths / lengths.sum() * budget).astype(int))
    qs: list[NDArray[np.float64]] = []
    ticks: list[tuple[int, str]] = []
    jumps: list[int] = []  # step i -> i+1 is a jump between lines (no distance)
    k = 0
    for s, seg in enumerate(segments):
        for p, (a_label, b_label) in enumerate(itertools.pairwise(seg)):
            if p > 0:
                ticks.append((len(qs), a_label))
            elif s == 0:
                ticks.append((0, a_label))
            else:  # the end of the previous line and this start share one tick "U|K"
                _, previous = ticks.pop()
                jumps.append(len(qs) - 1)
                ticks.append((len(qs), f"{previous}|{a_label}"))
            a, b = np.array(crystal.kpoints[a_label]), np.array(crystal.kpoints[b_label])
            n = int(intervals[k])
            k += 1
            qs.extend(a + (b - a) * t / n for t in range(n))
        qs.append(np.array(crystal.kpoints[seg[-1]]))
        ticks.append((len(qs) - 1, seg[-1]))
    q = np.array(qs)
    steps = np.linalg.norm(np.diff(q @ recip, axis=0), axis=1)
    steps[jumps] = 0.0
    distance = np.concatenate([[0.0], np.cumsum(steps)])
    return QPath(path=path, qpoints=q, distance=distance, ticks=tuple(ticks))


class _EnergyBins:
    """The energy bins every grid has (``energy_edges``, meV, increasing)."""

    __slots__ = ()
    energy_edges: NDArray[np.float64]

    @property
    def n_e(self) -> int:
        """Number of energy bins."""
        return len(self.energy_edges) - 1

    @property
    def energy_centres(self) -> NDArray[np.float64]:
        """(n_E,) float, meV."""
        return 0.5 * (self.energy_edges[1:] + self.energy_edges[:-1])

    @property
    def n_q(self) -> int:
        """Number of q rows."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        """(n_q, n_E)."""
        return (self.n_q, self.n_e)

    @staticmethod
    def _digest(payload: dict[str, object]) -> str:
        """16 hex digits of the JSON of ``payload`` (a grid's fingerprint)."""
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True, slots=True, kw_only=True)
class Grid(_EnergyBins):
    """The (q, E) grid of a spectrum I(q, E).

    Attributes
    ----------
    qpath
        The q-points (rows of the spectrum).
    energy_edges
        (n_E + 1,) float, meV, increasing bin edges.
    """

    qpath: QPath
    energy_edges: NDArray[np.float64]

    #: what kind of sample's spectrum lives on this grid (a :class:`PowderGrid`'s is "powder")
    kind = "single_crystal"

    @property
    def n_q(self) -> int:
        """Number of q-points."""
        return self.qpath.n_q

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the path, its q-points and the energy bins."""
        return self._digest(
            {
                "path": self.qpath.path,
                "qpoints_rlu": np.round(self.qpath.qpoints, 9).tolist(),
                "energy_edges_meV": np.round(self.energy_edges, 9).tolist(),
            }
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description (enough to rebuild and check the grid)."""
        return {
            "path": self.qpath.path,
            "n_q": self.n_q,
            "n_e": self.n_e,
            "e_min_meV": float(self.energy_edges[0]),
            "e_max_meV": float(self.energy_edges[-1]),
            "fingerprint": self.fingerprint,
        }


def make_grid(
    crystal: Crystal,
    *,
    path: str | None = None,
    n_q: int = 200,
    e_min: float = 0.0,
    e_max: float = 70.0,
    n_e: int = 100,
) -> Grid:
    """Build a (q, E) grid.

    Parameters
    ----------
    path
        Path string; the crystal's Setyawan-Curtarolo path by default.
    n_q
        Approximate number of q-points.
    e_min, e_max
        Energy range, meV; ``e_max`` must be positive and above ``e_min``.
    n_e
        Number of energy bins.
    """
    for name, value in (("e_min", e_min), ("e_max", e_max)):
        if not np.isfinite(value):
            raise GridError(f"{name} must be a finite energy in meV, got {value}")
    if e_max <= 0:
        raise GridError(f"E max must be > 0 meV (phonon energies are positive), got {e_max}")
    if e_max <= e_min:
        raise GridError(f"E max ({e_max} meV) must be above E min ({e_min} meV)")
    if n_e < 1:
        raise GridError(f"need at least one energy bin, got n_e={n_e}")
    return Grid(
        qpath=make_qpath(crystal, path, n_q),
        energy_edges=np.linspace(e_min, e_max, n_e + 1),
    )


#: Width of the |Q| bins of a powder run's grid (:func:`make_powder_grid`), 1/Angstrom.
POWDER_Q_STEP = 0.05
#: Top of a powder run's |Q| axis, 1/Angstrom (the powder-VAE paper's crop: 0-10 1/A).
POWDER_Q_MAX = 10.0
#: Width of the energy bins of a powder run's grid, meV.
POWDER_E_STEP = 0.5


@dataclass(frozen=True, slots=True, kw_only=True)
class PowderGrid(_EnergyBins):
    """The (|Q|, E) grid of a powder spectrum S(|Q|, E).

    It answers what the fold, the accumulators and the exports ask of a :class:`Grid`
    (``n_q``, ``n_e``, ``shape``, ``energy_edges``, ``energy_centres``, ``fingerprint``,
    ``to_dict``), with |Q| bins where a :class:`Grid` has path points.

    Attributes
    ----------
    q_edges
        (n_Q + 1,) float, 1/Angstrom, increasing uniform |Q| bin edges.
    energy_edges
        (n_E + 1,) float, meV, increasing uniform bin edges.
    """

    q_edges: NDArray[np.float64]
    energy_edges: NDArray[np.float64]

    #: what kind of sample's spectrum lives on this grid
    kind = "powder"

    def __post_init__(self) -> None:
        for name, edges in (("|Q|", self.q_edges), ("energy", self.energy_edges)):
            e = np.asarray(edges, dtype=float)
            if e.ndim != 1 or len(e) < 2 or not np.all(np.isfinite(e)):
                raise GridError(f"{name} edges must be >= 2 finite numbers")
            step = np.diff(e)
            if not np.all(step > 0) or not np.allclose(step, step[0], rtol=1e-9):
                raise GridError(f"{name} edges must increase in equal steps")
        if self.q_edges[0] < 0:
            raise GridError(f"|Q| edges start at {self.q_edges[0]} 1/Angstrom: |Q| >= 0")

    @property
    def n_q(self) -> int:
        """Number of |Q| bins."""
        return len(self.q_edges) - 1

    @property
    def q_centres(self) -> NDArray[np.float64]:
        """(n_Q,) float, 1/Angstrom."""
        return 0.5 * (self.q_edges[1:] + self.q_edges[:-1])

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying the |Q| and energy bins."""
        return self._digest(
            {
                "kind": self.kind,
                "q_edges_inv_angstrom": np.round(self.q_edges, 9).tolist(),
                "energy_edges_meV": np.round(self.energy_edges, 9).tolist(),
            }
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description (enough to rebuild and check the grid)."""
        return {
            "kind": self.kind,
            "n_q": self.n_q,
            "n_e": self.n_e,
            "q_min_inv_angstrom": float(self.q_edges[0]),
            "q_max_inv_angstrom": float(self.q_edges[-1]),
            "e_min_meV": float(self.energy_edges[0]),
            "e_max_meV": float(self.energy_edges[-1]),
            "fingerprint": self.fingerprint,
        }


def make_wedge_grid(
    crystal: Crystal, energy_edges: NDArray[np.float64], mesh: int = 16
) -> tuple[Grid, float]:
    """The whole irreducible wedge as a grid: its "path" is the irreducible points of a
    Gamma-centred ``mesh^3`` mesh (r.l.u., spglib's reduction by the crystal's point group
    and time reversal), with ``energy_edges`` (meV) as the energy bins.

    Returns ``(grid, radius)``: ``radius`` (1/Angstrom) is a folding tolerance that
    reaches every Q (half the mesh cell's longest diagonal, 5 % over), so that folding to
    the nearest star point bins every event of the zone into the voxel of its mesh point.
    """
    import spglib

    if mesh < 2:
        raise GridError(f"the wedge mesh needs >= 2 points per axis, got {mesh}")
    mapping, points = spglib.get_ir_reciprocal_mesh([mesh] * 3, crystal.spglib_cell())
    ir = np.asarray(points[np.unique(mapping)], dtype=float) / mesh
    corner = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)]) / mesh
    radius = 0.5 * float(np.max(np.linalg.norm(corner @ crystal.reciprocal_lattice, axis=1)))
    qpath = QPath(
        path=f"irreducible {mesh}^3 mesh",
        qpoints=ir,
        distance=np.arange(len(ir), dtype=float),
        ticks=(),
    )
    edges = np.asarray(energy_edges, dtype=np.float64)
    return Grid(qpath=qpath, energy_edges=edges), radius * 1.05


def make_powder_grid(
    ei: float,
    *,
    e_max: float,
    e_min: float = 0.0,
    q_max: float = POWDER_Q_MAX,
    q_step: float = POWDER_Q_STEP,
    e_step: float = POWDER_E_STEP,
) -> PowderGrid:
    """The (|Q|, E) grid of a powder run at incident energy ``ei`` (meV).

    |Q| from 0 to ``q_max`` (1/Angstrom) in steps of ``q_step``; energies from ``e_min`` to
    the lower of ``e_max`` (the material's window) and 0.9 Ei (meV), in steps of ``e_step``
    (the top edge rounded down to a whole step). Bins the instrument cannot reach stay
    unmeasured (NaN in the folded spectrum).
    """
    for name, value in (("Ei", ei), ("e_max", e_max), ("q_max", q_max)):
        if not (np.isfinite(value) and value > 0):
            raise GridError(f"{name} must be a positive number, got {value}")
    if not (q_step > 0 and e_step > 0):
        raise GridError(f"bin widths must be > 0, got {q_step} 1/A and {e_step} meV")
    top = min(float(e_max), 0.9 * float(ei))
    n_e = int(np.floor((top - e_min) / e_step + 1e-9))
    if n_e < 1:
        raise GridError(f"no energy bin between {e_min} and {top:g} meV at Ei = {ei:g} meV")
    n_q = int(np.floor(q_max / q_step + 1e-9))
    return PowderGrid(
        q_edges=q_step * np.arange(n_q + 1, dtype=np.float64),
        energy_edges=e_min + e_step * np.arange(n_e + 1, dtype=np.float64),
    )


#: Largest denominator of the atoms' relative fractional coordinates that
#: :func:`zone_classes` tabulates; crystals beyond it get one class.
MAX_ZONE_PERIOD = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class ZoneClasses:
    """The structure-factor classes of the Brillouin zones of a crystal.

    The one-phonon cross-section at ``Q = q + G`` carries, for atom j, the phase
    ``exp(-2 pi i G . x_j)``; only the phases relative to atom 0 matter. Zones G with the
    same relative phases form a class: within one, S(Q, E) differs only through Q's
    direction and length. When every ``x_j - x_0`` is a multiple of ``1/period`` the
    phases repeat with G modulo ``period``, and ``table`` gives the class of every G
    modulo it.

    Attributes
    ----------
    period
        P: the classes repeat with every component of G (primitive r.l.u.) modulo P.
    table
        (P^3,) int64, the class of ``G mod P`` at index ``((g0 % P) * P + g1 % P) * P +
        g2 % P``; class 0 is the zones of G = 0 (all atoms in phase).
    n_classes
        Distinct classes (1 for a one-atom cell, 4 for diamond).
    """

    period: int
    table: NDArray[np.int64]
    n_classes: int

    def of(self, g: NDArray[np.integer]) -> NDArray[np.int64]:
        """(n,) the class of each reciprocal lattice vector of ``g`` ((n, 3) integers)."""
        m = np.mod(np.asarray(g, dtype=np.int64), self.period)
        return np.asarray(self.table[(m[:, 0] * self.period + m[:, 1]) * self.period + m[:, 2]])

    def expand(self, alias: NDArray[np.integer]) -> NDArray[np.int64]:
        """(n_q * n_classes,) a fold table's alias (:attr:`FoldTable.alias`, (n_q,)) on
        the class grid: each class row of an aliased point follows the same class row of
        its canonical point."""
        n = self.n_classes
        a = np.asarray(alias, dtype=np.int64)
        return np.asarray(np.repeat(a, n) * n + np.tile(np.arange(n, dtype=np.int64), len(a)))

    def merge(self, rows: NDArray[np.floating]) -> NDArray[np.float64]:
        """(n_q, ...) the path's rows of ``rows`` ((n_q * n_classes, ...) on the class
        grid, row ``q * n_classes + c``): summed over the classes."""
        a = np.asarray(rows)
        return np.asarray(a.reshape(-1, self.n_classes, *a.shape[1:]).sum(axis=1))

    def digest(self) -> str:
        """Hex digest (part of a cache key)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(np.int64(self.period).tobytes())
        h.update(np.ascontiguousarray(self.table, dtype=np.int64).tobytes())
        return h.hexdigest()


def zone_classes(crystal: Crystal, max_period: int = MAX_ZONE_PERIOD) -> ZoneClasses:
    """The :class:`ZoneClasses` of ``crystal``: for diamond-structure Ge (atoms at 0 and
    1/4 (1, 1, 1) of the primitive cell) the four classes of ``h + k + l`` modulo 4 in
    the primitive basis (both atoms in phase, out of phase, and the two quarter turns).
    One class (no split) for a one-atom cell, or when a relative coordinate is no
    multiple of 1/P for any P <= ``max_period``."""
    x = np.asarray(crystal.positions, dtype=float)
    rel = x[1:] - x[0]
    period = 1
    if len(rel):
        for p in range(1, max_period + 1):
            if np.allclose(rel * p, np.rint(rel * p), atol=1e-6):
                period = p
                break
        else:
            period = 1
    if period == 1:
        return ZoneClasses(period=1, table=np.zeros(1, dtype=np.int64), n_classes=1)
    g = np.array(list(itertools.product(range(period), repeat=3)), dtype=np.int64)
    steps = np.mod(np.rint(period * (g @ rel.T)).astype(np.int64), period)  # (P^3, n_at-1)
    found: dict[tuple[int, ...], int] = {}
    table = np.array(
        [found.setdefault(tuple(int(v) for v in row), len(found)) for row in steps],
        dtype=np.int64,
    )
    return ZoneClasses(period=period, table=table, n_classes=len(found))


def make_class_grid(grid: Grid, classes: ZoneClasses) -> Grid:
    """The path's grid with every q-point repeated once per zone class (row ``iq *
    n_classes + class``), the energy bins unchanged: the bins of the class-split fold."""
    n = classes.n_classes
    qp = grid.qpath
    qpath = QPath(
        path=f"{qp.path} x {n} zone classes",
        qpoints=np.repeat(qp.qpoints, n, axis=0),
        distance=np.repeat(qp.distance, n),
        ticks=tuple((i * n, label) for i, label in qp.ticks),
    )
    return Grid(qpath=qpath, energy_edges=grid.energy_edges)
