"""The caches of coverages: in memory for the process, and on disk for the machine.

A coverage (:meth:`consumers.reduction.folding.Folder.coverage`) depends only on the set-up
(its :attr:`~consumers.reduction.folding.Folder.signature`), the goniometer angle and the
sampling, which together are its :data:`CoverageKey`. The last :data:`COVERAGE_CACHE_SIZE`
are kept in memory (:func:`recall`, :func:`remember`), and every one on disk under
:func:`coverage_cache_dir`, one folder per set-up and sampling and one ``.npy`` file per
angle (:func:`read_coverage`, :func:`write_coverage`), bounded by
``$STEER_COVERAGE_CACHE_MB`` (:func:`coverage_disk_limit`; the oldest set-ups are removed
first).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.table import table_cache_dir

__all__ = [
    "COVERAGE_CACHE_SIZE",
    "COVERAGE_DISK_MB",
    "CoverageKey",
    "coverage_cache_dir",
    "coverage_disk_limit",
    "coverage_path",
    "read_coverage",
    "recall",
    "remember",
    "write_coverage",
]

logger = logging.getLogger(__name__)

#: A coverage's key in both caches: (set-up signature, omega (degrees), energy samples per
#: bin, pixel stride)
CoverageKey = tuple[str, float, int, int]

#: coverages kept in memory by :meth:`Folder.coverage` (160 kB each on the Ge grid)
COVERAGE_CACHE_SIZE = 256
#: default bound (MB) of the coverages kept on disk (``$STEER_COVERAGE_CACHE_MB``; 0 keeps
#: none): about 6,000 angles of the Ge grid, the oldest set-ups are removed first
COVERAGE_DISK_MB = 1024.0
_COVERAGE_CACHE: OrderedDict[CoverageKey, NDArray[np.float64]] = OrderedDict()
_COVERAGE_LOCK = threading.Lock()


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


def recall(key: CoverageKey) -> NDArray[np.float64] | None:
    """A copy of the coverage of ``key`` kept in memory, or None."""
    with _COVERAGE_LOCK:
        hit = _COVERAGE_CACHE.get(key)
        if hit is None:
            return None
        _COVERAGE_CACHE.move_to_end(key)
        return hit.copy()


def remember(key: CoverageKey, coverage: NDArray[np.float64]) -> None:
    """Keep a copy of a coverage in the process-wide cache."""
    with _COVERAGE_LOCK:
        _COVERAGE_CACHE[key] = coverage.copy()
        while len(_COVERAGE_CACHE) > COVERAGE_CACHE_SIZE:
            _COVERAGE_CACHE.popitem(last=False)


def coverage_path(key: CoverageKey) -> Path:
    """The disk cache's file of a coverage (the angle written exactly, as a float hex)."""
    signature, omega, e_substeps, pixel_stride = key
    return (
        coverage_cache_dir()
        / f"{signature}-e{e_substeps}-p{pixel_stride}"
        / f"omega{float(omega).hex()}.npy"
    )


def read_coverage(key: CoverageKey, shape: tuple[int, int]) -> NDArray[np.float64] | None:
    """The disk cache's coverage for ``key``, or None (absent, or unusable: logged).

    ``shape`` is the grid's (n_q, n_E): a file holding anything but a finite, non-negative
    float64 array of that shape is unusable.
    """
    if coverage_disk_limit() <= 0:
        return None
    path = coverage_path(key)
    try:
        out = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged file: recompute and overwrite it
        logger.warning("coverage cache %s unreadable (%s): recomputing", path, exc)
        return None
    if out.shape != shape or out.dtype != np.float64 or not np.all(np.isfinite(out) & (out >= 0)):
        logger.warning(
            "coverage cache %s holds a %s %s array, not a finite non-negative %s float64 "
            "one: recomputing",
            path,
            out.shape,
            out.dtype,
            shape,
        )
        return None
    return np.ascontiguousarray(out)


def write_coverage(key: CoverageKey, coverage: NDArray[np.float64]) -> None:
    """Write a coverage to the disk cache atomically (a reader sees all or nothing)."""
    global _COVERAGE_WRITES
    limit = coverage_disk_limit()
    if limit <= 0:
        return
    path = coverage_path(key)
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
