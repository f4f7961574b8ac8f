"""The compiled loops of the reduction (numba): fold events, fold coverage samples, and
prune the fold table's candidates.

:func:`fold_kernel` folds events (pixel, time of flight) into a padded (q, E) histogram;
:func:`coverage_kernel` folds (pixel, energy) samples with their weights, the coverage of
an orientation (and the prediction endpoint's expected signal); :func:`undominated` keeps
the candidates of a voxel that are the nearest somewhere in it
(:meth:`consumers.reduction.table.FoldTable.build`). They read the arrays of a
:class:`~consumers.reduction.table.FoldTable`; :class:`consumers.reduction.folding.Folder`
calls them. Compiled on first use and cached on disk by numba.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["coverage_kernel", "fold_kernel", "undominated"]


@numba.njit(cache=True)
def undominated(
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
def fold_kernel(
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
    """Fold events (detector id, time of flight) into the padded histogram ``hist``.

    Each block of :data:`_BLOCK` events goes in three passes (voxel and energy bin of every
    event; nearest candidate of the events in live voxels; histogram). Dropped events are
    counted in ``dropped`` in the order of
    :data:`consumers.reduction.folding.DROP_REASONS`; with ``record``, ``assigned`` gets
    every event's bin ``iq * n_e + ie``, or ``-1 - reason`` for a dropped one. Returns a
    sum of the candidates loaded ahead of the searches (so that those loads are kept).
    """
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
_NO_SIGNAL = np.zeros((0, 0, 0))
_NO_HIST = np.zeros((0, 0))


@numba.njit(cache=True, nogil=True)
def coverage_kernel(
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
    s_group: np.ndarray = _NO_SIGNAL,  # (n_groups, n_e, n_ch) signals per pixel group and bin
    sig: np.ndarray = _NO_HIST,  # (n_ch, n_q * n_e) float64, added to
) -> int:
    """Coverage of one orientation: every (pixel, energy sample) folded with its weight.

    With ``with_signal``, each sample's weight times ``s_group[group[pixel], bin, ch]`` is
    added to ``sig[ch]`` as well, for every channel ``ch`` (the prediction endpoint's
    expected signal and its background components, folded exactly as the coverage in one
    walk; :mod:`model_server.prediction.expected`).

    The same chain as :func:`fold_kernel` (Q = h_inf - v_f M d K_PER_V, fractional
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
                    gp = group[p]
                    cs = col[s]
                    for ch in range(s_group.shape[2]):
                        sig[ch, b] += w * s_group[gp, cs, ch]
            s += 1
    return computed


@numba.njit(cache=True, nogil=True)
def star_rows_kernel(
    h: np.ndarray,  # (n, 3) Q, r.l.u.
    voxels: int,
    live: np.ndarray,
    rank: np.ndarray,
    offsets: np.ndarray,
    candidates: np.ndarray,
    star_xyz: np.ndarray,
    rec: np.ndarray,  # (3, 3) rows b_i
    tol2: float,
    rows: np.ndarray,  # (n,) int64, written
) -> None:
    """The fold table's star point (row) each Q folds to, by the search of
    :func:`fold_kernel` (the nearest candidate of its voxel within the tolerance), or -1."""
    for i in range(h.shape[0]):
        rows[i] = -1
        f0 = h[i, 0] - math.floor(h[i, 0])
        f1 = h[i, 1] - math.floor(h[i, 1])
        f2 = h[i, 2] - math.floor(h[i, 2])
        vx = (
            min(int(f0 * voxels), voxels - 1) * voxels + min(int(f1 * voxels), voxels - 1)
        ) * voxels + min(int(f2 * voxels), voxels - 1)
        word = live[vx >> 6]
        bit = np.uint64(vx & 63)
        if not (word >> bit) & np.uint64(1):
            continue
        r = rank[vx >> 6] + _popcount(word & ((np.uint64(1) << bit) - np.uint64(1)))
        cx = f0 * rec[0, 0] + f1 * rec[1, 0] + f2 * rec[2, 0]
        cy = f0 * rec[0, 1] + f1 * rec[1, 1] + f2 * rec[2, 1]
        cz = f0 * rec[0, 2] + f1 * rec[1, 2] + f2 * rec[2, 2]
        best = 1e300
        row = -1
        for k in range(offsets[r], offsets[r + 1]):
            q = candidates[k]
            dx = star_xyz[q, 0] - cx
            dy = star_xyz[q, 1] - cy
            dz = star_xyz[q, 2] - cz
            dd = dx * dx + dy * dy + dz * dz
            if dd < best:
                best = dd
                row = q
        if best <= tol2:
            rows[i] = row
