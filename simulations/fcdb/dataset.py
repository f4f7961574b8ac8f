"""Training sets: force constants sampled uniformly in the training domain, their I(q, E).

Only dynamically stable sets are kept; unstable draws are counted and reported. The HDF5
layout (read by :func:`read_dataset` and by the model trainers):

* ``spectra``: (n, n_q, n_E) float32, I(q, E) of the forward model (unit area per branch),
  in lzf-compressed chunks of 64 spectra;
* ``fc``: (n, n_fc) float64, the varied coefficients (eV/A^2), columns named by the
  attribute ``fc_names``;
* ``qpoints``: (n_q, 3) r.l.u.; ``energy_edges``: (n_E + 1,) meV;
* attributes: ``material``, ``fc_names``, ``grid_fingerprint``, ``domain`` (n_fc, 2),
  ``fixed_names`` / ``fixed_values`` (coefficients held at the ensemble mean), ``seed``,
  ``n_discarded``, ``resolution`` (JSON), ``command``, ``created``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from numpy.typing import NDArray

from simulations.exceptions import DatasetError
from simulations.fcdb.reference import ReferenceEnsemble, load_reference
from simulations.lattice.materials import MaterialSetup, setup

__all__ = ["DatasetSummary", "generate_dataset", "read_dataset", "sample_domain"]

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 64  # spectra per HDF5 chunk of ``spectra``


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetSummary:
    """What :func:`generate_dataset` did (the ``--json`` output of ``steer simulate dataset``)."""

    n_requested: int
    n_stable: int
    n_discarded: int
    seconds: float
    spectra_shape: tuple[int, int, int]
    fc_names: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict with the contract's keys."""
        return {
            "n_requested": self.n_requested,
            "n_stable": self.n_stable,
            "n_discarded": self.n_discarded,
            "seconds": round(self.seconds, 3),
            "spectra_shape": list(self.spectra_shape),
            "fc_names": list(self.fc_names),
        }


def sample_domain(
    domain: NDArray[np.float64], n: int, rng: np.random.Generator
) -> NDArray[np.float64]:
    """(n, n_fc) coefficients drawn uniformly in the box ``domain`` (n_fc, 2)."""
    lo, hi = domain[:, 0], domain[:, 1]
    return lo + (hi - lo) * rng.random((n, len(lo)))


def generate_dataset(
    material: str,
    n: int,
    out: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    batch: int = 1024,
    max_draw_factor: float = 50.0,
    material_setup: MaterialSetup | None = None,
    command: str = "",
) -> DatasetSummary:
    """Generate ``n`` stable spectra of ``material`` and write them to ``out`` (HDF5).

    Draws are evaluated ``batch`` at a time and the spectra stream to disk, so memory holds
    about one batch of spectra (``batch`` x 80 kB for Ge) whatever ``n``.

    Raises
    ------
    DatasetError
        If ``n`` is not positive, the output cannot be written, or fewer than one draw in
        ``max_draw_factor`` is stable (a domain that is mostly unstable).
    """
    if n < 1:
        raise DatasetError(f"--n must be a positive number of spectra, got {n}")
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise DatasetError(f"output folder {out.parent} does not exist")
    start = time.perf_counter()
    ms = material_setup or setup(material)
    ref = load_reference(material)
    writer = _SpectraWriter(out, n, ms.grid.shape, batch)
    try:
        fcs, n_discarded = _draw_stable(
            ms,
            ref,
            n,
            writer,
            seed=seed,
            batch=batch,
            max_draw_factor=max_draw_factor,
            progress=progress,
        )
        writer.close(
            fc=fcs, extra=_contents(ms, ref, seed=seed, n_discarded=n_discarded, command=command)
        )
    except OSError as exc:
        writer.abort()
        raise DatasetError(f"could not write {out}: {exc}") from exc
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - start
    logger.info("%s: %d spectra, %d unstable discarded, %.1f s", out, n, n_discarded, seconds)
    return DatasetSummary(
        n_requested=n,
        n_stable=n,
        n_discarded=n_discarded,
        seconds=seconds,
        spectra_shape=(n, *ms.grid.shape),
        fc_names=ref.kept,
    )


def _draw_stable(
    ms: MaterialSetup,
    ref: ReferenceEnsemble,
    n: int,
    writer: _SpectraWriter,
    *,
    seed: int,
    batch: int,
    max_draw_factor: float,
    progress: bool,
) -> tuple[NDArray[np.float64], int]:
    """Draw until ``n`` sets are stable, their spectra to ``writer``; returns their
    coefficients (n, n_fc) and the number of unstable draws discarded."""
    from tqdm import tqdm

    fm = ms.forward_model(free=ref.kept, reference=ref.mean)
    rng = np.random.default_rng(seed)
    fcs = np.empty((n, len(ref.kept)))
    buffer = np.empty((batch, *ms.grid.shape), dtype=np.float32)  # one batch, reused
    got = drawn = 0
    with tqdm(total=n, desc=f"{ms.crystal.name} spectra", unit="sp", disable=not progress) as bar:
        while got < n:
            if drawn > max_draw_factor * n:
                raise DatasetError(
                    f"only {got} of {drawn} draws were dynamically stable; the training "
                    "domain is mostly unstable"
                )
            size = _next_batch(n - got, got, drawn, batch)
            c = sample_domain(ref.domain, size, rng)
            # Unstable draws are dropped, so their spectra are not computed.
            intensity, stable, _ = fm.spectra_fast(c, stable_only=True, out=buffer[:size])
            drawn += size
            keep = np.nonzero(stable)[0][: n - got]
            writer.append(intensity, keep)
            fcs[got : got + len(keep)] = c[keep]
            got += len(keep)
            bar.update(len(keep))
    # Draws after the n-th stable one in the last batch are not "discarded": they were not
    # needed. Count unstable draws up to the last kept one.
    return fcs, _count_discarded(drawn, size, stable, keep, n)


def _next_batch(needed: int, got: int, drawn: int, batch: int) -> int:
    """Draws for the next batch: enough for the ``needed`` stable sets at the acceptance
    seen so far (5 % spare), at most ``batch``; the draws' order does not depend on it."""
    acceptance = (got + 1) / (drawn + 1) if drawn else 0.8
    return int(min(batch, max(16, np.ceil(needed / max(acceptance, 0.05) * 1.05))))


def _count_discarded(
    drawn: int, size: int, stable: NDArray[np.bool_], keep: NDArray[np.int64], n: int
) -> int:
    """Unstable draws among those actually examined (up to the last kept draw)."""
    if len(keep) == 0:
        return drawn - n
    used_last = int(keep[-1]) + 1
    examined = drawn - size + used_last
    return examined - n


class _SpectraWriter:
    """A training set being written to ``<out>.partial``: the spectra stream in whole HDF5
    chunks (``_CHUNK_ROWS`` spectra, lzf); :meth:`close` adds the rest and renames the file
    to ``out``, :meth:`abort` removes it."""

    def __init__(self, out: Path, n: int, shape: tuple[int, int], batch: int) -> None:
        self.out = out
        self.tmp = out.with_suffix(out.suffix + ".partial")
        self._rows = min(_CHUNK_ROWS, n)
        self._file: h5py.File | None = None
        try:
            self._file = h5py.File(self.tmp, "w")
            self._spectra = self._file.create_dataset(
                "spectra",
                shape=(n, *shape),
                dtype=np.float32,
                chunks=(self._rows, *shape),
                compression="lzf",
            )
        except OSError as exc:
            self.abort()
            raise DatasetError(f"could not write {out}: {exc}") from exc
        # Spectra not yet written: less than a chunk, plus one batch.
        self._pending = np.empty((batch + self._rows, *shape), dtype=np.float32)
        self._filled = 0
        self._written = 0

    def append(self, source: NDArray[np.float32], rows: NDArray[np.int64]) -> None:
        """Add the spectra ``source[rows]``; the whole chunks among those pending go out."""
        end = self._filled + len(rows)
        # mode="clip": no bounds-check buffer (the rows are valid), copied straight to ``out``
        np.take(source, rows, axis=0, out=self._pending[self._filled : end], mode="clip")
        self._filled = end
        self._flush(self._filled - self._filled % self._rows)

    def _flush(self, count: int) -> None:
        """Write the first ``count`` pending spectra and move the rest to the front."""
        if count == 0:
            return
        self._spectra[self._written : self._written + count] = self._pending[:count]
        self._written += count
        rest = self._filled - count
        self._pending[:rest] = self._pending[count : self._filled]
        self._filled = rest

    def close(self, *, fc: NDArray[np.float64], extra: dict[str, object]) -> None:
        """Write what is pending, ``fc`` and ``extra`` (``/``-prefixed keys are datasets,
        the others attributes), and move the file to ``out``."""
        if self._file is None:
            raise DatasetError(f"{self.out}: the training set was already closed")
        self._flush(self._filled)
        self._file.create_dataset("fc", data=fc)
        for key, value in extra.items():
            if key.startswith("/"):
                self._file.create_dataset(key[1:], data=value)
            else:
                self._file.attrs[key] = value
        self._file.close()
        self._file = None
        self.tmp.replace(self.out)

    def abort(self) -> None:
        """Close and remove the partial file."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


def _contents(
    ms: MaterialSetup, ref: ReferenceEnsemble, *, seed: int, n_discarded: int, command: str
) -> dict[str, object]:
    """The small datasets (``/``-prefixed) and the attributes of a training set."""
    fixed = [k for k, name in enumerate(ref.names) if name not in ref.kept]
    return {
        "/qpoints": ms.grid.qpath.qpoints,
        "/energy_edges": ms.grid.energy_edges,
        "material": ms.crystal.name,
        "fc_names": list(ref.kept),
        "grid_fingerprint": ms.grid.fingerprint,
        "grid": json.dumps(ms.grid.to_dict()),
        "domain": ref.domain,
        "fixed_names": [ref.names[k] for k in fixed],
        "fixed_values": ref.mean[fixed],
        "seed": seed,
        "n_discarded": n_discarded,
        "resolution": json.dumps(ms.resolution.to_dict()),
        "command": command,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def read_dataset(path: str | Path) -> dict[str, object]:
    """Read a training set into memory: arrays and attributes as a dict."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"no training set at {path}")
    with h5py.File(path, "r") as f:
        data: dict[str, object] = {k: f[k][()] for k in f}
        data.update({k: f.attrs[k] for k in f.attrs})
    return data
