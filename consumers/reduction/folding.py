"""Folding neutron events into the symmetrized spectrum I(q, E) with a lookup table.

Per event: (pixel, time of flight) -> (Q_lab, E) -> Q in primitive r.l.u. at the
orientation's omega -> fractional coordinates modulo 1 (exact by periodicity) -> a voxel of
a fine grid of the reciprocal cell -> the few q-path *star* points (every path point under
every point-group operation and time reversal, with periodic images) that can be the
nearest one for any Q inside that voxel -> the exact nearest of them; kept if it lies
within ``tolerance`` (1/Angstrom) -> (q, E) bin.

Mapping into the first zone and the irreducible wedge and then taking the nearest path
point is the same as taking the nearest point of the path's star over all periodic
images: point-group operations and lattice translations preserve distances. The voxel
candidate lists make this O(1) per event and *exact*: for a voxel with centre c and
half-diagonal r, the nearest star point of any Q in the voxel lies within
``d_min(c) + 2 r`` of c, so those star points are its candidates; voxels farther than
``tolerance + r`` from every star point have none. The result therefore equals the
brute-force :class:`simulations.instrument.binning.ReferenceBinning` up to floating-point ties and
the float32 rounding of the per-pixel constants (:meth:`Folder.pixel_table`), which can
move only events within about 1e-6 r.l.u. or 5e-6 meV of a boundary (none of the 1e6
events of the test against the brute force).

The fused per-event loop is compiled with numba (see the benchmark in
``tests/benchmarks/bench_fold.py``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import numba
import numpy as np
from numpy.typing import NDArray
from scipy import constants as sc
from scipy import ndimage
from scipy.spatial import cKDTree

from consumers.exceptions import FoldError
from simulations.instrument.binning import ReferenceBinning
from simulations.instrument.spectrometer import E_PER_K2, Instrument, Orientation, energy_to_speed
from simulations.lattice.crystals import Crystal
from simulations.lattice.grid import Grid

__all__ = [
    "COVERAGE_CACHE_SIZE",
    "COVERAGE_DISK_MB",
    "DROP_REASONS",
    "FoldTable",
    "Folder",
    "coverage_cache_dir",
    "coverage_disk_limit",
    "table_cache_dir",
]

#: coverages kept in memory by :meth:`Folder.coverage` (160 kB each on the Ge grid)
COVERAGE_CACHE_SIZE = 256
#: default bound (MB) of the coverages kept on disk (``$STEER_COVERAGE_CACHE_MB``; 0 keeps
#: none): about 6,000 angles of the Ge grid, the oldest set-ups are removed first
COVERAGE_DISK_MB = 1024.0
_COVERAGE_CACHE: OrderedDict[tuple[str, float, int, int], NDArray[np.float64]] = OrderedDict()
_COVERAGE_LOCK = threading.Lock()

logger = logging.getLogger(__name__)

#: Reasons an event is not folded, in the order of :attr:`Folder.dropped`.
DROP_REASONS = ("energy_out_of_range", "off_path", "bad_time_of_flight", "unknown_pixel")

#: Cap of :attr:`FoldTable.clear` (and the periodic padding that computes it), voxels.
_CLEAR_CAP = 24

#: Format of the cached tables; part of their key together with the code that builds them.
_TABLE_FORMAT = 1

_NO_ASSIGN = np.zeros(0, dtype=np.int64)
_NO_LUT = np.zeros(0, dtype=np.int32)

# Same constants as simulations.instrument.spectrometer (scipy's CODATA): E (meV) = _E_PER_V2 v^2
# (m/s),
# k (1/Angstrom) = _K_PER_V v (m/s).
_E_PER_V2 = 0.5 * sc.neutron_mass / (sc.milli * sc.electron_volt)
_K_PER_V = sc.neutron_mass / sc.hbar * 1e-10


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
        keep = _undominated(starts, flat, centres[live], corner_xyz, ref.star_xyz)
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
    env = os.environ.get("STEER_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ins-steering"


_MODULE_DIGEST: bytes | None = None


def _module_digest() -> bytes:
    """Digest of this module's source: a changed coverage or fold algorithm never reads
    the coverages an old one wrote."""
    global _MODULE_DIGEST
    if _MODULE_DIGEST is None:
        _MODULE_DIGEST = hashlib.blake2b(Path(__file__).read_bytes(), digest_size=16).digest()
    return _MODULE_DIGEST


def coverage_cache_dir() -> Path:
    """Where :meth:`Folder.coverage` keeps coverages on disk: ``coverage/`` under
    :func:`table_cache_dir`, one folder per set-up (signature and sampling), one ``.npy`` file
    per goniometer angle."""
    return table_cache_dir() / "coverage"


def coverage_disk_limit() -> float:
    """The disk bound of the coverage cache, MB (``$STEER_COVERAGE_CACHE_MB``)."""
    raw = os.environ.get("STEER_COVERAGE_CACHE_MB")
    if raw is None or not raw.strip():
        return COVERAGE_DISK_MB
    try:
        value = float(raw)
    except ValueError:
        logger.warning(
            "STEER_COVERAGE_CACHE_MB=%r is not a number: using %s", raw, COVERAGE_DISK_MB
        )
        return COVERAGE_DISK_MB
    return max(value, 0.0)


_COVERAGE_WRITES = 0


def _prune_coverage_disk(root: Path, limit_mb: float) -> None:
    """Remove the least recently written set-up folders until ``root`` holds at most
    ``limit_mb`` (the newest folder is kept whole)."""
    try:
        setups = []
        for d in root.iterdir():
            if d.is_dir():
                files = [f.stat() for f in d.iterdir()]
                newest = max((f.st_mtime for f in files), default=d.stat().st_mtime)
                setups.append((newest, sum(f.st_size for f in files), d))
        total = sum(size for _, size, _ in setups)
        for _, size, d in sorted(setups, key=lambda x: x[0])[:-1]:
            if total <= limit_mb * 1e6:
                break
            for f in d.iterdir():
                f.unlink(missing_ok=True)
            d.rmdir()
            total -= size
            logger.info(
                "coverage cache: removed %s (%.1f MB) to stay under %s MB", d, size / 1e6, limit_mb
            )
    except OSError as exc:  # another process pruning at the same time, a read-only disk
        logger.warning("coverage cache %s not pruned: %s", root, exc)


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
    for module_file in (__file__, binning.__file__):
        h.update(Path(str(module_file)).read_bytes())
    return h.hexdigest()[:24]


@numba.njit(cache=True)
def _undominated(
    starts: np.ndarray,  # (n_live + 1,) int64
    flat: np.ndarray,  # (n,) int64 star ids, voxel by voxel
    centres: np.ndarray,  # (n_live, 3)
    corner_xyz: np.ndarray,  # (8, 3)
    star_xyz: np.ndarray,
) -> np.ndarray:
    """1 for the candidates that are the nearest somewhere in their voxel, else 0.

    Candidate s is dropped when another candidate t is closer at all 8 corners by a margin
    (|Q-s|^2 - |Q-t|^2 is linear in Q, so then t is closer everywhere in the voxel).
    """
    keep = np.ones(flat.shape[0], dtype=np.int64)
    for v in range(starts.shape[0] - 1):
        a, b = starts[v], starts[v + 1]
        for i in range(a, b):
            s = flat[i]
            for j in range(a, b):
                if j == i:
                    continue
                t = flat[j]
                dominated = True
                for c in range(8):
                    qx = centres[v, 0] + corner_xyz[c, 0]
                    qy = centres[v, 1] + corner_xyz[c, 1]
                    qz = centres[v, 2] + corner_xyz[c, 2]
                    ds = (
                        (qx - star_xyz[s, 0]) ** 2
                        + (qy - star_xyz[s, 1]) ** 2
                        + (qz - star_xyz[s, 2]) ** 2
                    )
                    dt = (
                        (qx - star_xyz[t, 0]) ** 2
                        + (qy - star_xyz[t, 1]) ** 2
                        + (qz - star_xyz[t, 2]) ** 2
                    )
                    if not ds - dt > 1e-9:
                        dominated = False
                        break
                if dominated:
                    keep[i] = 0
                    break
    return keep


@numba.njit(inline="always")
def _popcount(x: np.uint64) -> int:
    """Set bits of a 64-bit word (LLVM turns this into one instruction where there is one)."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return int((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


#: Events per block of the fold kernel: the first pass over a block computes every event's
#: voxel and energy bin without data-dependent branches, the second searches the candidates
#: of the few events in live voxels, the third adds to the histogram.
_BLOCK = 256


@numba.njit(cache=True, nogil=True)
def _fold_kernel(
    ids: np.ndarray,  # (n,) detector ids
    tof_ns: np.ndarray,  # (n,) int or float, ns
    id0: int,
    n_ids: int,
    lut: np.ndarray,  # (n_ids,) int32 id - id0 -> pixel row or -1, used when ``use_lut``
    use_lut: bool,
    pix: np.ndarray,  # (n_pix, 4) float32: E_PER_V2 l2^2 (meV s^2), K_PER_V l2 M d (r.l.u. s)
    t_i: float,
    ei: float,
    h_inf: np.ndarray,  # (3,) M k_i: Q (r.l.u.) of an infinitely slow final neutron
    voxels: int,
    live: np.ndarray,  # (ceil(voxels^3 / 64),) uint64 bit set of voxels with candidates
    rank: np.ndarray,  # (ceil(voxels^3 / 64),) int32 live voxels before each word
    offsets: np.ndarray,
    candidates: np.ndarray,
    star_xyz: np.ndarray,
    star_index: np.ndarray,
    rec: np.ndarray,  # (3, 3) rows b_i
    tol2: float,
    e0: float,
    inv_de: float,
    n_q: int,
    n_e: int,
    hist: np.ndarray,  # ((n_q + 1) * (n_e + 1),) float64; last row/column collect drops
    dropped: np.ndarray,  # (4,) int64
    assigned: np.ndarray,  # (n,) int64 bin iq * n_E + ie or -1 - reason, when ``record``
    record: bool,
) -> int:
    w_row = n_e + 1
    off_lo = n_q * w_row
    off_hi = off_lo + n_e
    cell = np.empty(_BLOCK, dtype=np.int64)
    frac = np.empty((_BLOCK, 3))
    vox = np.empty(_BLOCK, dtype=np.int64)
    todo = np.empty(_BLOCK, dtype=np.int64)
    lo = np.empty(_BLOCK, dtype=np.int64)
    keep = np.empty(_BLOCK, dtype=np.uint8)
    hi = np.empty(_BLOCK, dtype=np.int64)
    sink = 0
    d_energy = 0
    d_path = 0
    d_tof = 0
    d_pixel = 0
    n = ids.shape[0]
    for s in range(0, n, _BLOCK):
        m = min(_BLOCK, n - s)
        n_live = 0
        for j in range(m):
            i = s + j
            k = ids[i] - id0
            p = -1
            if k >= 0 and k < n_ids:
                p = lut[k] if use_lut else k
            t_f = tof_ns[i] * 1e-9 - t_i
            if p < 0 or not t_f > 0.0:
                if p < 0:
                    d_pixel += 1
                    cell[j] = -4
                else:
                    d_tof += 1
                    cell[j] = -3
                vox[j] = 0
                keep[j] = 0
                continue
            inv = 1.0 / t_f
            x = (ei - pix[p, 0] * inv * inv - e0) * inv_de
            ok = x >= 0.0 and x < n_e
            col = int(x) if ok else n_e
            d_energy += not ok
            h0 = h_inf[0] - inv * pix[p, 1]
            h1 = h_inf[1] - inv * pix[p, 2]
            h2 = h_inf[2] - inv * pix[p, 3]
            f0 = h0 - math.floor(h0)
            f1 = h1 - math.floor(h1)
            f2 = h2 - math.floor(h2)
            v = (
                min(int(f0 * voxels), voxels - 1) * voxels + min(int(f1 * voxels), voxels - 1)
            ) * voxels + min(int(f2 * voxels), voxels - 1)
            frac[j, 0] = f0
            frac[j, 1] = f1
            frac[j, 2] = f2
            vox[j] = v
            cell[j] = off_lo + col
            keep[j] = ok
        # the events in live voxels (most are not), compacted without branches; a loop of
        # its own so that the bit-set loads run ahead of the dependent stores
        for j in range(m):
            v = vox[j]
            todo[n_live] = j
            n_live += int((live[v >> 6] >> np.uint64(v & 63)) & np.uint64(1)) & keep[j]
        # the candidate lists are scattered over megabytes: load every live event's bounds
        # and first candidate in independent loads (the memory system overlaps them)
        # before the searches, which then hit the cache
        touch = 0
        for t in range(n_live):
            v = vox[todo[t]]
            w = v >> 6
            below = live[w] & ((np.uint64(1) << np.uint64(v & 63)) - np.uint64(1))
            r = rank[w] + _popcount(below)
            a = offsets[r]
            lo[t] = a
            hi[t] = offsets[r + 1]
            touch += candidates[a]
        for t in range(n_live):
            j = todo[t]
            f0 = frac[j, 0]
            f1 = frac[j, 1]
            f2 = frac[j, 2]
            cx = f0 * rec[0, 0] + f1 * rec[1, 0] + f2 * rec[2, 0]
            cy = f0 * rec[0, 1] + f1 * rec[1, 1] + f2 * rec[2, 1]
            cz = f0 * rec[0, 2] + f1 * rec[1, 2] + f2 * rec[2, 2]
            best = 1e300
            iq = n_q
            for c in range(lo[t], hi[t]):
                q = candidates[c]
                dx = star_xyz[q, 0] - cx
                dy = star_xyz[q, 1] - cy
                dz = star_xyz[q, 2] - cz
                d2 = dx * dx + dy * dy + dz * dz
                closer = d2 < best
                iq = star_index[q] if closer else iq
                best = d2 if closer else best
            if best <= tol2:
                cell[j] += (iq - n_q) * w_row
        sink += touch
        for j in range(m):
            c = cell[j]
            if c >= 0:
                hist[c] += 1.0
                d_path += (c >= off_lo) & (c < off_hi)
            if record:
                if c < 0:
                    assigned[s + j] = c
                elif c % w_row == n_e:
                    assigned[s + j] = -1
                elif c >= off_lo:
                    assigned[s + j] = -2
                else:
                    assigned[s + j] = (c // w_row) * n_e + c % w_row
    dropped[0] += d_energy
    dropped[1] += d_path
    dropped[2] += d_tof
    dropped[3] += d_pixel
    return sink


_NO_GROUP = np.zeros(0, dtype=np.int64)
_NO_SIGNAL = np.zeros((0, 0))
_NO_HIST = np.zeros(0)


@numba.njit(cache=True, nogil=True)
def _coverage_kernel(
    dm: np.ndarray,  # (n_pix, 3) K_PER_V M d (r.l.u. per m/s) of the sampled pixels
    solid: np.ndarray,  # (n_pix,) weight of each sampled pixel (sr)
    v_f: np.ndarray,  # (n_sub,) final speeds (m/s) of the energy samples
    w_e: np.ndarray,  # (n_sub,) k_f/k_i dE (meV) of each energy sample
    col: np.ndarray,  # (n_sub,) int64 energy bin of each sample
    h_inf: np.ndarray,  # (3,) M k_i (r.l.u.)
    voxels: int,
    live: np.ndarray,
    rank: np.ndarray,
    offsets: np.ndarray,
    candidates: np.ndarray,
    star_xyz: np.ndarray,
    star_index: np.ndarray,
    rec: np.ndarray,
    tol2: float,
    n_q: int,
    n_e: int,
    clear: np.ndarray,  # (voxels^3,) uint8, FoldTable.clear
    hist: np.ndarray,  # (n_q * n_e,) float64, added to
    with_signal: bool = False,
    group: np.ndarray = _NO_GROUP,  # (n_pix,) int64 row of ``s_group`` of each pixel
    s_group: np.ndarray = _NO_SIGNAL,  # (n_groups, n_e) a signal per pixel group and bin
    sig: np.ndarray = _NO_HIST,  # (n_q * n_e,) float64, added to
) -> int:
    """Coverage of one orientation: every (pixel, energy sample) folded with its weight.

    With ``with_signal``, each sample's weight times ``s_group[group[pixel], bin]`` is added
    to ``sig`` as well (the prediction endpoint's expected signal, folded exactly as the
    coverage; :mod:`model_server.prediction.expected`).

    The same chain as :func:`_fold_kernel` (Q = h_inf - v_f M d K_PER_V, fractional
    coordinates, voxel, candidates, nearest star point within the tolerance) without
    times of flight: the samples are made on the energy axis directly. Consecutive
    samples walk along one pixel's trajectory, so the table lookups stay in the caches.

    The trajectory is a straight line in r.l.u. (Q is linear in v_f, and ``v_f`` falls
    monotonically with the sample number): from a dead voxel v, every point less than
    ``clear[v] - 1`` voxels away along each axis lies in a dead voxel, so the samples up to
    that distance are skipped without being computed (exactly: they would have folded
    nowhere). Returns the number of samples computed.
    """
    n_sub = v_f.shape[0]
    computed = 0
    for p in range(dm.shape[0]):
        d0 = dm[p, 0]
        d1 = dm[p, 1]
        d2 = dm[p, 2]
        wp = solid[p]
        # speed change that moves the point by one voxel along its fastest axis
        g = 1.0 / (voxels * max(abs(d0), abs(d1), abs(d2), 1e-300))
        s = 0
        while s < n_sub:
            v = v_f[s]
            computed += 1
            h0 = h_inf[0] - v * d0
            h1 = h_inf[1] - v * d1
            h2 = h_inf[2] - v * d2
            f0 = h0 - math.floor(h0)
            f1 = h1 - math.floor(h1)
            f2 = h2 - math.floor(h2)
            vx = (
                min(int(f0 * voxels), voxels - 1) * voxels + min(int(f1 * voxels), voxels - 1)
            ) * voxels + min(int(f2 * voxels), voxels - 1)
            word = live[vx >> 6]
            bit = np.uint64(vx & 63)
            if not (word >> bit) & np.uint64(1):
                s += 1
                reach = int(clear[vx]) - 1
                if reach > 0:  # skip the samples that stay within reach of this voxel
                    v_stop = v - (reach - 1e-6) * g
                    while s < n_sub and v_f[s] > v_stop:
                        s += 1
                continue
            r = rank[vx >> 6] + _popcount(word & ((np.uint64(1) << bit) - np.uint64(1)))
            cx = f0 * rec[0, 0] + f1 * rec[1, 0] + f2 * rec[2, 0]
            cy = f0 * rec[0, 1] + f1 * rec[1, 1] + f2 * rec[2, 1]
            cz = f0 * rec[0, 2] + f1 * rec[1, 2] + f2 * rec[2, 2]
            best = 1e300
            iq = n_q
            for c in range(offsets[r], offsets[r + 1]):
                q = candidates[c]
                dx = star_xyz[q, 0] - cx
                dy = star_xyz[q, 1] - cy
                dz = star_xyz[q, 2] - cz
                dd = dx * dx + dy * dy + dz * dz
                closer = dd < best
                iq = star_index[q] if closer else iq
                best = dd if closer else best
            if best <= tol2:
                w = wp * w_e[s]
                b = iq * n_e + col[s]
                hist[b] += w
                if with_signal:
                    sig[b] += w * s_group[group[p], col[s]]
            s += 1
    return computed


class Folder:
    """Folds events of one run (one instrument, crystal mounting and Ei) into I(q, E).

    Parameters
    ----------
    table
        The lookup table for the material's grid.
    grid
        The (q, E) grid (uniform energy bins).
    instrument, orientation
        Geometry and UB of the run.
    ei
        Incident energy, meV.
    """

    def __init__(
        self,
        table: FoldTable,
        grid: Grid,
        instrument: Instrument,
        orientation: Orientation,
        ei: float,
    ) -> None:
        edges = grid.energy_edges
        if not np.allclose(np.diff(edges), edges[1] - edges[0]):
            raise FoldError("the fold kernel needs uniform energy bins")
        if not ei > edges[-1]:
            raise FoldError(f"Ei = {ei} meV is below the grid's top energy {edges[-1]} meV")
        self.table = table
        self.grid = grid
        self.instrument = instrument
        self.orientation = orientation
        self.ei = float(ei)
        self._l2 = np.ascontiguousarray(instrument.l2)
        self._dirs = np.ascontiguousarray(instrument.directions)
        self._t_i = instrument.l1 / float(energy_to_speed(ei))
        self._ki = math.sqrt(ei / E_PER_K2)
        self._e0 = float(edges[0])
        self._de = float(edges[1] - edges[0])
        # detector id -> pixel row inside the kernel: an offset for a regular array, else a
        # dense table over the id range (ids spread too widely are looked up beforehand)
        ids = np.asarray(instrument.pixel_ids, dtype=np.int64)
        self._id0 = int(ids.min()) if len(ids) else 0
        span = int(ids.max()) - self._id0 + 1 if len(ids) else 0
        self._lut: NDArray[np.int32] | None = None
        self._dense_ids = bool(instrument.layout) or span <= max(4 * len(ids), 1 << 20)
        if not instrument.layout and self._dense_ids:
            self._lut = np.full(span, -1, dtype=np.int32)
            self._lut[ids - self._id0] = np.arange(len(ids), dtype=np.int32)
        self._n_ids = span
        self._pixel_tables: dict[float, tuple[NDArray[np.float32], NDArray[np.float64]]] = {}
        self._signature: str | None = None

    @property
    def signature(self) -> str:
        """Digest of everything a coverage depends on (the table, the grid's energy bins,
        the detector, the UB, Ei, and this module's code): equal signatures give equal
        coverages."""
        if self._signature is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(_module_digest())
            for f in fields(self.table):
                h.update(f.name.encode())
                h.update(np.ascontiguousarray(getattr(self.table, f.name)).tobytes())
            for a in (
                self.grid.energy_edges,
                self._dirs,
                self.instrument.solid_angles,
                np.asarray(self.orientation.lab_to_rlu_matrix(0.0)),
                np.array([self.ei, self.grid.n_q, self.grid.n_e], dtype=float),
            ):
                h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
            self._signature = h.hexdigest()
        return self._signature

    def pixel_index(self, pixel_id: NDArray[np.integer]) -> NDArray[np.int64]:
        """Row index of detector ids; -1 for ids the instrument does not have."""
        return self.instrument.pixel_rows(pixel_id)

    def pixel_table(self, omega: float) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
        """Per-pixel constants of the kernel at goniometer angle ``omega`` (degrees).

        Returns ``(pix, h_inf)``: pix (n_pixels, 4) holds ``E_PER_V2 l2^2`` (meV s^2) and
        ``K_PER_V l2 M d`` (r.l.u. s) for the unit direction d of each pixel and the lab ->
        r.l.u. matrix M, so that an event with final flight time t_f has
        ``E = Ei - pix[:, 0] / t_f^2`` and ``Q = h_inf - pix[:, 1:] / t_f`` (r.l.u.), with
        ``h_inf = M k_i``. Cached for the last few angles.

        ``pix`` is float32 (the kernel computes in float64): 16 bytes a pixel keep the
        table of an ARCS-sized detector (1.6 MB) in the caches, which makes the kernel
        faster by a tenth to a half here. Its rounding (relative 6e-8: 5e-6 meV in E,
        about 1e-6 r.l.u. in Q) moves only events that close to a bin or tolerance
        boundary; the test against the brute force bounds them.
        """
        key = float(omega)
        hit = self._pixel_tables.get(key)
        if hit is not None:
            return hit
        m = np.asarray(self.orientation.lab_to_rlu_matrix(omega), dtype=np.float64)
        pix = np.empty((self.instrument.n_pixels, 4), dtype=np.float32)
        pix[:, 0] = _E_PER_V2 * self._l2**2
        pix[:, 1:] = (_K_PER_V * self._l2)[:, None] * (self._dirs @ m.T)
        h_inf = np.ascontiguousarray(m @ np.array([0.0, 0.0, self._ki]))
        if len(self._pixel_tables) >= 4:
            self._pixel_tables.pop(next(iter(self._pixel_tables)))
        self._pixel_tables[key] = (pix, h_inf)
        return pix, h_inf

    def _kernel(
        self,
        ids: NDArray[np.integer],
        tof_ns: NDArray[np.number],
        omega: float,
        hist: NDArray[np.float64],
        *,
        dropped: NDArray[np.int64] | None = None,
        assigned: NDArray[np.int64] | None = None,
    ) -> NDArray[np.int64]:
        """Run the fold kernel; ``hist`` is the padded ((n_q + 1) * (n_E + 1),) histogram.

        ``ids`` are detector ids. Returns the drop counts.
        """
        if dropped is None:
            dropped = np.zeros(len(DROP_REASONS), dtype=np.int64)
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise FoldError(f"pixel ids must be integers, got {ids.dtype}")
        if ids.dtype == np.uint64:  # numba would mix it with int64 into float64
            ids = np.where(ids < 2**63, ids, np.uint64(2**63 - 1)).astype(np.int64)
        if self._dense_ids:
            id0, n_ids, lut = self._id0, self._n_ids, self._lut
        else:  # ids spread too widely for a dense table: look them up beforehand
            ids, id0, n_ids, lut = self.pixel_index(ids), 0, self.instrument.n_pixels, None
        tof = np.asarray(tof_ns)
        if tof.dtype.kind not in "iuf":
            raise FoldError(f"times of flight must be numbers, got {tof.dtype}")
        pix, h_inf = self.pixel_table(omega)
        t = self.table
        _fold_kernel(
            ids,
            tof,
            id0,
            n_ids,
            _NO_LUT if lut is None else lut,
            lut is not None,
            pix,
            self._t_i,
            self.ei,
            h_inf,
            t.voxels,
            t.live,
            t.rank,
            t.offsets,
            t.candidates,
            t.star_xyz,
            t.star_index,
            t.reciprocal,
            t.tolerance**2,
            self._e0,
            1.0 / self._de,
            self.grid.n_q,
            self.grid.n_e,
            hist,
            dropped,
            _NO_ASSIGN if assigned is None else assigned,
            assigned is not None,
        )
        return dropped

    def _hist(self) -> NDArray[np.float64]:
        """A zeroed padded histogram for :meth:`_kernel`."""
        return np.zeros((self.grid.n_q + 1) * (self.grid.n_e + 1))

    def _unpad(self, hist: NDArray[np.float64]) -> NDArray[np.float64]:
        """(n_q, n_E) view of a padded histogram, without the drop row and column."""
        return hist.reshape(self.grid.n_q + 1, self.grid.n_e + 1)[:-1, :-1]

    def fold(
        self,
        pixel_id: NDArray[np.integer],
        tof_ns: NDArray[np.number],
        omega: float,
        counts: NDArray[np.float64] | None = None,
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Fold events taken at goniometer angle ``omega`` (degrees).

        ``pixel_id`` (n,) integer detector ids, ``tof_ns`` (n,) times of flight in ns
        (integer or float). Returns ``(counts, dropped)``: (n_q, n_E) float64 counts
        (``counts`` is added to in place when given) and (4,) int64 dropped events per
        :data:`DROP_REASONS`.
        """
        if not np.isfinite(omega):
            raise FoldError(f"goniometer angle must be finite, got {omega}")
        out = np.zeros(self.grid.shape) if counts is None else counts
        hist = self._hist()
        dropped = self._kernel(pixel_id, tof_ns, omega, hist)
        out += self._unpad(hist)
        out[:] = out[self.table.alias]
        return out, dropped

    def assign(
        self, pixel_id: NDArray[np.integer], tof_ns: NDArray[np.number], omega: float
    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Per-event (q index, E index) as folded; -1 for events not folded.

        The q index is the canonical one (see :attr:`FoldTable.alias`).
        """
        assigned = np.empty(len(tof_ns), dtype=np.int64)
        self._kernel(pixel_id, tof_ns, omega, self._hist(), assigned=assigned)
        ok = assigned >= 0
        return (
            np.where(ok, assigned // self.grid.n_e, -1),
            np.where(ok, assigned % self.grid.n_e, -1),
        )

    def coverage(
        self, omega: float, *, e_substeps: int = 4, pixel_stride: int = 2, cache: bool = True
    ) -> NDArray[np.float64]:
        """(n_q, n_E) float: sum of k_f/k_i dOmega dE over detector cells folded into each bin.

        Units sr meV. Exposure = proton charge x coverage, so that counts / exposure
        estimates S(q, E) up to a constant for any orientation. Every ``pixel_stride``-th
        pixel (weighted by the stride) is sampled at ``e_substeps`` energies per bin
        (midpoint rule) by a fused kernel. Against every pixel at 16
        energies per bin, the default is off by a median 1.8 % per bin (90th percentile
        5 %) for one orientation; the error is in the energy sampling of the tube crossings
        and averages down over orientations. Thread-safe (it holds no state), and the
        kernel releases the GIL, so that it runs beside the consumer's Python work.

        Coverages are cached, keyed by :attr:`signature` (which includes this module's
        code), angle and sampling: in memory for the process (the last
        :data:`COVERAGE_CACHE_SIZE`), so that the service computes each angle once for the
        advisor's candidates and the consumer's exposure, and on disk under
        :func:`coverage_cache_dir` (bounded by ``$STEER_COVERAGE_CACHE_MB``, default
        :data:`COVERAGE_DISK_MB`), so that a coverage depends only on the set-up and is
        computed once per machine, like the fold table: the next run of a set-up, a
        restarted consumer, ``steer fold`` of a recorded run, or every run after
        ``steer coverage`` read it (1 ms against 0.3 s). The files hold the float64 values
        as computed, so a read gives bitwise the same exposure. A file that cannot be read
        or does not fit is recomputed and rewritten; one that cannot be written is only
        logged. ``cache=False`` computes afresh and touches neither (benchmarks). A copy
        is returned.
        """
        omega = float(omega)
        if not np.isfinite(omega):
            raise FoldError(f"goniometer angle must be finite, got {omega}")
        key = self._coverage_key(omega, e_substeps, pixel_stride)
        if cache:
            with _COVERAGE_LOCK:
                hit = _COVERAGE_CACHE.get(key)
                if hit is not None:
                    _COVERAGE_CACHE.move_to_end(key)
                    return hit.copy()
            stored = self._read_coverage(key)
            if stored is not None:
                self._remember(key, stored)
                return stored
        n_sub = self.grid.n_e * e_substeps
        de = self._de / e_substeps
        energies = self._e0 + (np.arange(n_sub) + 0.5) * de
        v_f = np.asarray(energy_to_speed(np.asarray(self.ei - energies, dtype=np.float64)))
        w_e = np.sqrt((self.ei - energies) / self.ei) * de
        col = np.arange(n_sub, dtype=np.int64) // e_substeps
        pix = np.arange(0, self.instrument.n_pixels, pixel_stride)
        solid = np.ascontiguousarray(self.instrument.solid_angles[pix] * pixel_stride)
        m = np.asarray(self.orientation.lab_to_rlu_matrix(omega), dtype=np.float64)
        dm = np.ascontiguousarray(_K_PER_V * (self._dirs[pix] @ m.T))
        h_inf = np.ascontiguousarray(m @ np.array([0.0, 0.0, self._ki]))
        t = self.table
        hist = np.zeros(self.grid.n_q * self.grid.n_e)
        _coverage_kernel(
            dm,
            solid,
            v_f,
            w_e,
            col,
            h_inf,
            t.voxels,
            t.live,
            t.rank,
            t.offsets,
            t.candidates,
            t.star_xyz,
            t.star_index,
            t.reciprocal,
            t.tolerance**2,
            self.grid.n_q,
            self.grid.n_e,
            t.clear,
            hist,
        )
        out = np.asarray(hist.reshape(self.grid.shape)[self.table.alias])
        if cache:
            self._remember(key, out)
            self._write_coverage(key, out)
        return out

    def on_disk(self, omega: float, *, e_substeps: int = 4, pixel_stride: int = 2) -> bool:
        """Whether the disk cache holds a usable coverage of this set-up at ``omega``."""
        return self._read_coverage(self._coverage_key(omega, e_substeps, pixel_stride)) is not None

    def _coverage_key(
        self, omega: float, e_substeps: int, pixel_stride: int
    ) -> tuple[str, float, int, int]:
        """Key of a coverage in both caches: set-up, angle and sampling."""
        return (self.signature, float(omega), int(e_substeps), int(pixel_stride))

    @staticmethod
    def _remember(key: tuple[str, float, int, int], coverage: NDArray[np.float64]) -> None:
        """Keep a copy of a coverage in the process-wide cache."""
        with _COVERAGE_LOCK:
            _COVERAGE_CACHE[key] = coverage.copy()
            while len(_COVERAGE_CACHE) > COVERAGE_CACHE_SIZE:
                _COVERAGE_CACHE.popitem(last=False)

    @staticmethod
    def _coverage_path(key: tuple[str, float, int, int]) -> Path:
        """The disk cache's file of a coverage (the angle written exactly, as a float hex)."""
        signature, omega, e_substeps, pixel_stride = key
        return (
            coverage_cache_dir()
            / f"{signature}-e{e_substeps}-p{pixel_stride}"
            / f"omega{float(omega).hex()}.npy"
        )

    def _read_coverage(self, key: tuple[str, float, int, int]) -> NDArray[np.float64] | None:
        """The disk cache's coverage for ``key``, or None (absent, or unusable: logged)."""
        if coverage_disk_limit() <= 0:
            return None
        path = self._coverage_path(key)
        try:
            out = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged file: recompute and overwrite it
            logger.warning("coverage cache %s unreadable (%s): recomputing", path, exc)
            return None
        if (
            out.shape != self.grid.shape
            or out.dtype != np.float64
            or not np.all(np.isfinite(out) & (out >= 0))
        ):
            logger.warning(
                "coverage cache %s holds a %s %s array, not a finite non-negative %s float64 "
                "one: recomputing",
                path,
                out.shape,
                out.dtype,
                self.grid.shape,
            )
            return None
        return np.ascontiguousarray(out)

    def _write_coverage(
        self, key: tuple[str, float, int, int], coverage: NDArray[np.float64]
    ) -> None:
        """Write a coverage to the disk cache atomically (a reader sees all or nothing)."""
        global _COVERAGE_WRITES
        limit = coverage_disk_limit()
        if limit <= 0:
            return
        path = self._coverage_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.npy")
            np.save(tmp, coverage, allow_pickle=False)
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("coverage not cached in %s: %s", path.parent, exc)
            return
        with _COVERAGE_LOCK:
            _COVERAGE_WRITES += 1
            check = _COVERAGE_WRITES % 64 == 1
        if check:
            _prune_coverage_disk(path.parent.parent, limit)
