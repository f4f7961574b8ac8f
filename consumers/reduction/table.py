"""The fold table: voxels of the reciprocal cell -> the candidate q-path star points.

A fine grid of voxels over the reciprocal cell lists, for every voxel, the few star points
of the q-path (every path point under every point-group operation and time reversal, with
periodic images) that can be the nearest one for any Q inside it
(:meth:`FoldTable.build`); :class:`consumers.reduction.folding.Folder` looks events and
coverage samples up in it. Tables are cached on disk per machine (:meth:`FoldTable.cached`,
:func:`table_cache_dir`), keyed by everything they depend on including this code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from consumers.exceptions import FoldError
from consumers.reduction import kernels
from simulations.cache import cache_root
from simulations.instrument.binning import ReferenceBinning
from simulations.lattice.crystals import Crystal
from simulations.lattice.grid import Grid

__all__ = ["FoldTable", "table_cache_dir"]

logger = logging.getLogger(__name__)

#: Cap of :attr:`FoldTable.clear` (and the periodic padding that computes it), voxels.
_CLEAR_CAP = 24

#: Format of the cached tables; part of their key together with the code that builds them.
_TABLE_FORMAT = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class FoldTable:
    """Voxel -> candidate star points of the q-path, as compressed rows.

    Attributes
    ----------
    voxels
        Voxels per reciprocal axis.
    tolerance
        Largest distance (1/Angstrom) from a folded Q to its path point.
    live
        (ceil(voxels^3 / 64),) uint64: bit set of the voxels with candidates (voxel v is
        bit ``v % 64`` of word ``v // 64``); most of reciprocal space has none.
    rank
        (ceil(voxels^3 / 64),) int32: live voxels before each word, so that the live
        voxel v is number ``rank[v // 64] + popcount(live[v // 64] & (2^(v % 64) - 1))``.
    offsets
        (n_live + 1,) int32: the candidates of live voxel number r are
        ``candidates[offsets[r]:offsets[r+1]]``.
    candidates
        (n_cand,) int16 (int32 for more than 32767 star points): rows of ``star_xyz``
        and ``star_index``.
    star_xyz
        (n_star, 3) float64: the star points any voxel refers to (1/Angstrom, Cartesian,
        periodic images near the unit cell [0, 1)^3 in fractional coordinates).
    star_index
        (n_star,) int32: path index of each star point.
    reciprocal
        (3, 3) float64: rows b_i (1/Angstrom) converting fractional coordinates.
    alias
        (n_q,) int64: path points equivalent to an earlier one share its counts
        (``counts[alias]`` expands the folded array).
    clear
        (voxels^3,) uint8: Chebyshev distance (in voxels, periodic, capped at
        :data:`_CLEAR_CAP`) from each voxel to the nearest live one, 0 for live voxels:
        every voxel less than ``clear[v]`` steps away from a dead voxel v along each axis
        is dead too, so the coverage kernel skips stretches of a trajectory at once.

    The whole table is a few megabytes at most (about 1.5 MB for Ge at 96^3), so that
    the per-event lookups stay in the processor's caches.
    """

    voxels: int
    tolerance: float
    live: NDArray[np.uint64]
    rank: NDArray[np.int32]
    offsets: NDArray[np.int32]
    candidates: NDArray[np.integer]
    star_xyz: NDArray[np.float64]
    star_index: NDArray[np.int32]
    reciprocal: NDArray[np.float64]
    alias: NDArray[np.int64]
    clear: NDArray[np.uint8]

    @classmethod
    def build(
        cls, crystal: Crystal, grid: Grid, *, tolerance: float = 0.05, voxels: int = 96
    ) -> FoldTable:
        """Build the table (a few seconds for 96^3 voxels).

        A star point is a candidate of a voxel (centre c, half-diagonal r) when it lies
        within ``min(d_min(c) + 2 r, tolerance + r)`` of c (farther ones are never the
        nearest, or never within the tolerance, for any Q in the voxel) and no other
        candidate is strictly closer than it at every corner of the voxel (the squared
        distance difference is linear in Q, so the corners decide).
        """
        if voxels < 8:
            raise FoldError(f"fold table needs >= 8 voxels per axis, got {voxels}")
        if not tolerance > 0:
            raise FoldError(f"tolerance must be > 0 1/Angstrom, got {tolerance}")
        ref = ReferenceBinning(crystal, grid, tolerance)
        rec = crystal.reciprocal_lattice
        g = (np.arange(voxels) + 0.5) / voxels
        frac = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
        centres = frac @ rec
        corners = np.array([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)])
        corner_xyz = (0.5 / voxels) * corners @ rec  # (8, 3) offsets from a voxel centre
        half_diag = float(np.max(np.linalg.norm(corner_xyz, axis=1)))
        tree = cKDTree(ref.star_xyz)
        d_min, _ = tree.query(centres)
        live = np.nonzero(d_min <= tolerance + half_diag)[0]
        radius = np.minimum(d_min[live] + 2.0 * half_diag, tolerance + half_diag) + 1e-9
        lists = tree.query_ball_point(centres[live], radius)
        n_live = np.array([len(x) for x in lists], dtype=np.int64)
        flat = np.fromiter((i for x in lists for i in x), dtype=np.int64, count=int(n_live.sum()))
        starts = np.zeros(len(live) + 1, dtype=np.int64)
        np.cumsum(n_live, out=starts[1:])
        keep = kernels.undominated(starts, flat, centres[live], corner_xyz, ref.star_xyz)
        kept_per_voxel = np.add.reduceat(keep, starts[:-1]) if len(live) else n_live
        flat = flat[keep.astype(bool)]
        offsets = np.zeros(len(live) + 1, dtype=np.int64)
        np.cumsum(kept_per_voxel, out=offsets[1:])
        used, cand = np.unique(flat, return_inverse=True)
        bits = np.zeros(-(-len(centres) // 64) * 64, dtype=bool)
        bits[live] = True
        live_words = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
        per_word = bits.reshape(-1, 64).sum(1)
        rank = np.concatenate([[0], np.cumsum(per_word)[:-1]]).astype(np.int32)
        # periodic Chebyshev distance to the nearest live voxel (the grid wraps around)
        dead = np.pad(~bits[: voxels**3].reshape(voxels, voxels, voxels), _CLEAR_CAP, "wrap")
        core = (slice(_CLEAR_CAP, -_CLEAR_CAP),) * 3
        clear = ndimage.distance_transform_cdt(dead, metric="chessboard")[core]
        logger.info(
            "fold table: %d^3 voxels, %d live, %.2f candidates per live voxel, %d star points",
            voxels,
            len(live),
            kept_per_voxel.mean() if len(live) else 0.0,
            len(used),
        )
        return cls(
            voxels=voxels,
            tolerance=float(tolerance),
            live=live_words,
            rank=rank,
            offsets=offsets.astype(np.int32),
            candidates=cand.ravel().astype(np.int16 if len(used) < 2**15 else np.int32),
            star_xyz=np.ascontiguousarray(ref.star_xyz[used]),
            star_index=ref.star_index[used].astype(np.int32),
            reciprocal=np.ascontiguousarray(rec),
            alias=np.asarray(ref.alias, dtype=np.int64),
            clear=np.minimum(clear, _CLEAR_CAP).astype(np.uint8).ravel(),
        )

    @classmethod
    def cached(
        cls,
        crystal: Crystal,
        grid: Grid,
        *,
        tolerance: float = 0.05,
        voxels: int = 96,
        cache_dir: Path | None = None,
    ) -> FoldTable:
        """:meth:`build`, or load the table built before for the same inputs.

        The key hashes everything the table depends on: the reciprocal lattice, the
        point-group operations, the path's q-points, the tolerance, the voxels and the
        source of the code that builds it (so a changed algorithm never reads an old
        table). Tables live in :func:`table_cache_dir` (about 2.5 MB each); a cache that
        cannot be read is rebuilt, one that cannot be written is only logged.
        """
        directory = table_cache_dir() if cache_dir is None else Path(cache_dir)
        path = directory / f"foldtable-{_table_key(crystal, grid, tolerance, voxels)}.npz"
        try:
            with np.load(path, allow_pickle=False) as f:
                kw = {k.name: f[k.name] for k in fields(cls)}
            kw["voxels"], kw["tolerance"] = int(kw["voxels"]), float(kw["tolerance"])
            logger.info("fold table loaded from %s", path)
            return cls(**kw)
        except FileNotFoundError:
            pass
        except Exception as exc:  # a damaged file: rebuild and overwrite it
            logger.warning("fold table cache %s unreadable (%s): rebuilding", path, exc)
        table = cls.build(crystal, grid, tolerance=tolerance, voxels=voxels)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp.npz")
            np.savez(tmp, **{k.name: getattr(table, k.name) for k in fields(cls)})
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("fold table not cached in %s: %s", directory, exc)
        return table

    @property
    def n_candidates(self) -> int:
        """Candidate entries over all voxels."""
        return len(self.candidates)


def table_cache_dir() -> Path:
    """Where :meth:`FoldTable.cached` keeps tables: ``$STEER_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ins-steering`` (``~/.cache/ins-steering``)."""
    return cache_root()


def _table_key(crystal: Crystal, grid: Grid, tolerance: float, voxels: int) -> str:
    """Hash of everything a :class:`FoldTable` depends on (see :meth:`FoldTable.cached`)."""
    import simulations.instrument.binning as binning

    h = hashlib.sha256()
    rotations, _ = crystal.symmetry_operations()
    for arr in (
        np.round(np.asarray(crystal.reciprocal_lattice, dtype=float), 12),
        np.asarray(rotations, dtype=np.int64),
        np.round(np.asarray(grid.qpath.qpoints, dtype=float), 12),
        np.array([float(tolerance), float(voxels), float(_TABLE_FORMAT)]),
    ):
        h.update(np.ascontiguousarray(arr).tobytes())
    for module_file in (__file__, kernels.__file__, binning.__file__):
        h.update(Path(str(module_file)).read_bytes())
    return h.hexdigest()[:24]
