"""Training sets: force constants sampled uniformly in the training domain, their I(q, E).

Only dynamically stable sets are kept; unstable draws are counted and reported. The HDF5
layout (read by :func:`read_dataset` and by the model trainers):

* ``spectra``: (n, n_q, n_E) float32, I(q, E) of the forward model (unit area per branch);
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
    fm = ms.forward_model(free=ref.kept, reference=ref.mean)
    rng = np.random.default_rng(seed)
    spectra = np.empty((n, *ms.grid.shape), dtype=np.float32)
    fcs = np.empty((n, len(ref.kept)))
    got = drawn = 0
    from tqdm import tqdm

    bar = tqdm(total=n, desc=f"{material} spectra", unit="sp", disable=not progress)
    try:
        while got < n:
            if drawn > max_draw_factor * n:
                raise DatasetError(
                    f"only {got} of {drawn} draws were dynamically stable; the training "
                    "domain is mostly unstable"
                )
            acceptance = (got + 1) / (drawn + 1) if drawn else 0.8
            size = int(min(batch * 8, max(batch, (n - got) / max(acceptance, 0.05) * 1.05)))
            c = sample_domain(ref.domain, size, rng)
            intensity, stable, _ = fm.spectra_fast(c)
            drawn += size
            keep = np.nonzero(stable)[0][: n - got]
            spectra[got : got + len(keep)] = intensity[keep]
            fcs[got : got + len(keep)] = c[keep]
            got += len(keep)
            bar.update(len(keep))
    finally:
        bar.close()
    # Draws after the n-th stable one in the last batch are not "discarded": they were not
    # needed. Count unstable draws up to the last kept one.
    n_discarded = _count_discarded(drawn, size, stable, keep, n)
    _write(out, ms, ref, spectra, fcs, seed=seed, n_discarded=n_discarded, command=command)
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


def _count_discarded(
    drawn: int, size: int, stable: NDArray[np.bool_], keep: NDArray[np.int64], n: int
) -> int:
    """Unstable draws among those actually examined (up to the last kept draw)."""
    if len(keep) == 0:
        return drawn - n
    used_last = int(keep[-1]) + 1
    examined = drawn - size + used_last
    return examined - n


def _write(
    out: Path,
    ms: MaterialSetup,
    ref: ReferenceEnsemble,
    spectra: NDArray[np.float32],
    fcs: NDArray[np.float64],
    *,
    seed: int,
    n_discarded: int,
    command: str,
) -> None:
    fixed = [k for k, name in enumerate(ref.names) if name not in ref.kept]
    tmp = out.with_suffix(out.suffix + ".partial")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(
                "spectra",
                data=spectra,
                chunks=(min(64, len(spectra)), *spectra.shape[1:]),
                compression="lzf",
                shuffle=True,
            )
            f.create_dataset("fc", data=fcs)
            f.create_dataset("qpoints", data=ms.grid.qpath.qpoints)
            f.create_dataset("energy_edges", data=ms.grid.energy_edges)
            f.attrs["material"] = ms.crystal.name
            f.attrs["fc_names"] = list(ref.kept)
            f.attrs["grid_fingerprint"] = ms.grid.fingerprint
            f.attrs["grid"] = json.dumps(ms.grid.to_dict())
            f.attrs["domain"] = ref.domain
            f.attrs["fixed_names"] = [ref.names[k] for k in fixed]
            f.attrs["fixed_values"] = ref.mean[fixed]
            f.attrs["seed"] = seed
            f.attrs["n_discarded"] = n_discarded
            f.attrs["resolution"] = json.dumps(ms.resolution.to_dict())
            f.attrs["command"] = command
            f.attrs["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"could not write {out}: {exc}") from exc


def read_dataset(path: str | Path) -> dict[str, object]:
    """Read a training set into memory: arrays and attributes as a dict."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"no training set at {path}")
    with h5py.File(path, "r") as f:
        data: dict[str, object] = {k: f[k][()] for k in f}
        data.update({k: f.attrs[k] for k in f.attrs})
    return data
