"""Powder training sets: force constants drawn around the reference, their S(|Q|, E).

The powder counterpart of :mod:`simulations.fcdb.dataset`, after Su & Li's powder VAE for
Al: every coefficient of the material's ``shells``-shell basis drawn uniformly in
``factor_range`` (0.5-1.5) times its reference value, the coherent one-phonon powder
spectrum of the set (:class:`~simulations.lattice.powder_forward.PowderForwardModel`) on
the powder grid of a run at ``ei`` (:meth:`MaterialSetup.powder_grid`), cropped to
``q_crop`` x ``e_crop`` (0-10 1/A x 10-45 meV). Dynamically unstable draws are redrawn
(counted in ``n_discarded``), so the set holds exactly ``n`` stable spectra.

HDF5 layout (read by :func:`read_powder_dataset` and the powder trainer):

* ``spectra``: (n, n_Q, n_E) float32, S(|Q|, E) in mbarn/meV per atom on the crop, lzf
  chunks of 64 spectra;
* ``fc``: (n, n_fc) float64, eV/A^2, columns named by the attribute ``fc_names``;
* ``q_edges`` (n_Q + 1,) 1/A and ``energy_edges`` (n_E + 1,) meV of the crop;
* ``kinematic_mask``: (n_Q, n_E) bool, the bins the instrument reaches at ``ei``
  (:func:`kinematic_mask`);
* attributes: ``sample_kind`` ("powder"), ``material``, ``fc_names``, ``domain``
  (n_fc, 2), ``factor_range``, ``seed``, ``n_discarded``, ``ei``, ``temperature``,
  ``grid`` (JSON of the full powder grid), ``grid_fingerprint`` (of the full grid), ``crop``
  (JSON: the |Q| and energy ranges and the bin slices into the full grid), ``averaging``
  (JSON), ``resolution`` (JSON), ``command``, ``created``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray

from simulations.exceptions import DatasetError
from simulations.fcdb.dataset import DatasetSummary, _SpectraWriter, sample_domain
from simulations.fcdb.reference import load_reference
from simulations.lattice.grid import PowderGrid
from simulations.lattice.materials import MaterialSetup, setup
from simulations.lattice.powder import POWDER_Q_SIGMA
from simulations.lattice.powder_forward import PowderForwardModel
from simulations.lattice.resolution import EnergyResolution, instrument_resolution
from simulations.units import E_PER_K2

__all__ = [
    "ARCS_TWO_THETA_DEG",
    "PowderSpec",
    "build_powder_forward",
    "crop_slices",
    "generate_powder_dataset",
    "kinematic_mask",
    "powder_domain",
    "read_powder_dataset",
]

logger = logging.getLogger(__name__)

#: (min, max) scattering angle, degrees, of the pixels of the default instrument
#: (``simulations.instrument.Instrument.arcs_like()``; a test checks they agree).
ARCS_TWO_THETA_DEG = (0.147, 134.796)

#: The averaging methods :class:`PowderSpec` knows ("shells" needs a PowderForwardModel
#: that has ``average="shells"``).
AVERAGING = ("directions", "shells")


@dataclass(frozen=True, slots=True, kw_only=True)
class PowderSpec:
    """What a powder training set is made of (recorded in the file and the model).

    Attributes
    ----------
    material
        Shipped material name (``Al``, ``Ge``...).
    ei
        Incident energy, meV: the powder grid and the energy resolution.
    temperature
        Sample temperature, K.
    shells
        Neighbour shells of the force-constant basis (Al: 2 gives the paper's 5).
    factor_range
        Each coefficient drawn uniformly in this range times its reference value.
    q_crop, e_crop
        |Q| (1/A) and energy (meV) ranges kept: bins whose centres lie inside.
    averaging
        ``"shells"`` (default: the mesh-shell average on a ``mesh``^3 q mesh with the
        Gaussian |Q| resolution ``q_sigma`` (1/A), averaged over each |Q| bin: what a
        simulated powder run folds to) or ``"directions"`` (``directions`` sampled
        directions per |Q|, no |Q| resolution).
    directions, mesh, direction_seed, q_sigma
        Settings of the average.
    two_theta_deg
        (min, max) scattering angle of the detectors, degrees: the kinematic limit.
    """

    material: str = "Al"
    ei: float = 50.0
    temperature: float = 300.0
    shells: int = 2
    factor_range: tuple[float, float] = (0.5, 1.5)
    q_crop: tuple[float, float] = (0.0, 10.0)
    e_crop: tuple[float, float] = (10.0, 45.0)
    averaging: str = "shells"
    directions: int = 512
    mesh: int = 32
    q_sigma: float = POWDER_Q_SIGMA
    direction_seed: int = 0
    two_theta_deg: tuple[float, float] = ARCS_TWO_THETA_DEG

    def __post_init__(self) -> None:
        if self.averaging not in AVERAGING:
            raise DatasetError(f"averaging must be one of {AVERAGING}, got {self.averaging!r}")
        lo, hi = self.factor_range
        if not 0 <= lo < hi:
            raise DatasetError(f"factor_range must be 0 <= lo < hi, got {self.factor_range}")
        if self.q_crop[0] >= self.q_crop[1] or self.e_crop[0] >= self.e_crop[1]:
            raise DatasetError(f"empty crop: |Q| {self.q_crop} 1/A, E {self.e_crop} meV")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        for k in ("factor_range", "q_crop", "e_crop", "two_theta_deg"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PowderSpec:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        for k in ("factor_range", "q_crop", "e_crop", "two_theta_deg"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)

    def material_setup(self) -> MaterialSetup:
        """The material with the ``shells``-shell basis."""
        return setup(self.material, shells=self.shells)

    def resolution(self, ms: MaterialSetup) -> EnergyResolution:
        """Energy resolution of the material's instrument at ``ei``."""
        grid = ms.powder_grid(self.ei)
        return instrument_resolution(
            ms.defaults.instrument,
            self.ei,
            ms.defaults.chopper_frequency,
            e_max=float(grid.energy_edges[-1]),
        )


def crop_slices(
    grid: PowderGrid, q_crop: tuple[float, float], e_crop: tuple[float, float]
) -> tuple[slice, slice]:
    """(|Q| slice, energy slice) of the bins of ``grid`` whose centres lie in the crop."""
    out = []
    for centres, (lo, hi), what in (
        (grid.q_centres, q_crop, "|Q|"),
        (grid.energy_centres, e_crop, "energy"),
    ):
        idx = np.nonzero((centres >= lo) & (centres <= hi))[0]
        if len(idx) == 0:
            raise DatasetError(
                f"the {what} crop {lo}..{hi} holds no bin of the grid "
                f"{float(centres[0])}..{float(centres[-1])}"
            )
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return out[0], out[1]


def kinematic_mask(
    q_edges: NDArray[np.float64],
    energy_edges: NDArray[np.float64],
    ei: float,
    two_theta_deg: tuple[float, float],
    *,
    substeps: int = 4,
) -> NDArray[np.bool_]:
    """(n_Q, n_E) bool: the bins a detector spanning scattering angles ``two_theta_deg``
    (degrees) reaches at incident energy ``ei`` (meV), for some energy inside the bin
    (``substeps`` energies per bin)."""
    de = np.diff(energy_edges)
    e = energy_edges[:-1, None] + (np.arange(substeps) + 0.5)[None, :] / substeps * de[:, None]
    ki = np.sqrt(ei / E_PER_K2)
    kf = np.sqrt(np.clip(ei - e, 0.0, None) / E_PER_K2)
    c_lo, c_hi = np.cos(np.deg2rad(two_theta_deg[0])), np.cos(np.deg2rad(two_theta_deg[1]))
    q_min = np.sqrt(np.clip(ki**2 + kf**2 - 2 * ki * kf * c_lo, 0.0, None))  # (n_E, sub)
    q_max = np.sqrt(np.clip(ki**2 + kf**2 - 2 * ki * kf * c_hi, 0.0, None))
    ok = e < ei
    lo_q, hi_q = q_edges[:-1, None, None], q_edges[1:, None, None]
    hit = (q_max[None] >= lo_q) & (q_min[None] <= hi_q) & ok[None]
    out: NDArray[np.bool_] = hit.any(axis=2)
    return out


def powder_domain(spec: PowderSpec, ms: MaterialSetup) -> tuple[list[str], NDArray[np.float64]]:
    """FC names and the (n_fc, 2) domain (eV/A^2): ``factor_range`` times the reference
    values (the first n_fc of :func:`load_reference`'s mean, by name)."""
    ref = load_reference(spec.material)
    names = list(ms.basis.names)
    try:
        values = np.array([ref.mean[list(ref.names).index(n)] for n in names])
    except ValueError as exc:
        raise DatasetError(
            f"the reference of {spec.material} lacks a coefficient of the {spec.shells}-shell "
            f"basis {names}: {exc}"
        ) from exc
    a, b = values * spec.factor_range[0], values * spec.factor_range[1]
    return names, np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)


def build_powder_forward(spec: PowderSpec) -> tuple[PowderForwardModel, dict[str, Any]]:
    """The forward model on the crop, and the facts about the grid: ``grid`` (full
    :class:`PowderGrid`), ``q_slice``, ``e_slice``, ``q_edges``, ``energy_edges`` (crop),
    ``fc_names``, ``domain``, ``setup``, ``resolution``."""
    ms = spec.material_setup()
    grid = ms.powder_grid(spec.ei)
    qs, es = crop_slices(grid, spec.q_crop, spec.e_crop)
    q_edges = grid.q_edges[qs.start : qs.stop + 1]
    e_edges = grid.energy_edges[es.start : es.stop + 1]
    res = spec.resolution(ms)
    names, domain = powder_domain(spec, ms)
    kwargs: dict[str, Any] = (
        {"directions": spec.directions, "seed": spec.direction_seed}
        if spec.averaging == "directions"
        else {"average": "shells", "mesh": spec.mesh, "q_sigma": spec.q_sigma, "bins": True}
    )
    try:
        fm = PowderForwardModel(
            ms.basis,
            0.5 * (q_edges[1:] + q_edges[:-1]),
            e_edges,
            res,
            spec.temperature,
            free=names,
            **kwargs,
        )
    except TypeError as exc:
        raise DatasetError(
            f"the powder forward model here has no averaging {spec.averaging!r}: {exc}; "
            "use averaging='directions'"
        ) from exc
    info = {
        "grid": grid,
        "q_slice": qs,
        "e_slice": es,
        "q_edges": q_edges,
        "energy_edges": e_edges,
        "fc_names": names,
        "domain": domain,
        "setup": ms,
        "resolution": res,
    }
    return fm, info


def generate_powder_dataset(
    spec: PowderSpec,
    n: int,
    out: str | Path,
    *,
    seed: int = 0,
    progress: bool = True,
    batch: int = 64,
    max_draw_factor: float = 20.0,
    command: str = "",
) -> DatasetSummary:
    """Generate ``n`` stable powder spectra of ``spec`` and write them to ``out`` (HDF5).

    Unstable draws are redrawn (the FCs of the next draws of the same generator), so the
    first ``n`` stable draws are kept; ``n_discarded`` counts the unstable ones.

    Raises
    ------
    DatasetError
        ``n`` not positive, the output not writable, or fewer than one draw in
        ``max_draw_factor`` stable.
    """
    if n < 1:
        raise DatasetError(f"--n must be a positive number of spectra, got {n}")
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise DatasetError(f"output folder {out.parent} does not exist")
    from tqdm import tqdm

    start = time.perf_counter()
    fm, info = build_powder_forward(spec)
    shape = (len(info["q_edges"]) - 1, len(info["energy_edges"]) - 1)
    rng = np.random.default_rng(seed)
    fcs = np.empty((n, len(info["fc_names"])))
    writer = _SpectraWriter(out, n, shape, batch)
    got = drawn = discarded = 0
    try:
        with tqdm(
            total=n, desc=f"{spec.material} powder spectra", unit="sp", disable=not progress
        ) as bar:
            while got < n:
                if drawn > max_draw_factor * n:
                    raise DatasetError(
                        f"only {got} of {drawn} draws were dynamically stable; the domain "
                        f"{spec.factor_range} x reference is mostly unstable"
                    )
                c = sample_domain(info["domain"], batch, rng)
                result = fm.spectra(c)
                drawn += batch
                stable = np.nonzero(result.stable)[0]
                keep = stable[: n - got]
                # unstable draws before the last kept one were examined and dropped
                last = int(keep[-1]) + 1 if len(keep) else batch
                discarded += int(np.count_nonzero(~result.stable[:last]))
                writer.append(result.intensity.astype(np.float32), keep.astype(np.int64))
                fcs[got : got + len(keep)] = c[keep]
                got += len(keep)
                bar.update(len(keep))
        tt = spec.two_theta_deg
        mask = kinematic_mask(info["q_edges"], info["energy_edges"], spec.ei, tt)
        qs, es = info["q_slice"], info["e_slice"]
        extra: dict[str, object] = {
            "/q_edges": info["q_edges"],
            "/energy_edges": info["energy_edges"],
            "/kinematic_mask": mask,
            "sample_kind": "powder",
            "material": info["setup"].crystal.name,
            "fc_names": list(info["fc_names"]),
            "domain": info["domain"],
            "factor_range": list(spec.factor_range),
            "seed": seed,
            "n_discarded": discarded,
            "ei": spec.ei,
            "temperature": spec.temperature,
            "grid": json.dumps(info["grid"].to_dict()),
            "grid_fingerprint": info["grid"].fingerprint,
            "crop": json.dumps(
                {
                    "q_inv_angstrom": list(spec.q_crop),
                    "e_meV": list(spec.e_crop),
                    "q_bins": [qs.start, qs.stop],
                    "e_bins": [es.start, es.stop],
                }
            ),
            "averaging": json.dumps(
                {
                    "method": spec.averaging,
                    "directions": spec.directions if spec.averaging == "directions" else None,
                    "mesh": spec.mesh if spec.averaging == "shells" else None,
                    "q_sigma_inv_angstrom": spec.q_sigma if spec.averaging == "shells" else None,
                    "direction_seed": spec.direction_seed,
                }
            ),
            "two_theta_deg": list(tt),
            "spec": json.dumps(spec.to_dict()),
            "resolution": json.dumps(info["resolution"].to_dict()),
            "command": command,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        writer.close(fc=fcs, extra=extra)
    except OSError as exc:
        writer.abort()
        raise DatasetError(f"could not write {out}: {exc}") from exc
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - start
    logger.info("%s: %d powder spectra, %d unstable redrawn, %.1f s", out, n, discarded, seconds)
    return DatasetSummary(
        n_requested=n,
        n_stable=n,
        n_discarded=discarded,
        seconds=seconds,
        spectra_shape=(n, *shape),
        fc_names=tuple(info["fc_names"]),
    )


def read_powder_dataset(path: str | Path) -> dict[str, Any]:
    """Read a powder training set: arrays and attributes as a dict (``crop``, ``grid``,
    ``averaging`` and ``spec`` parsed from JSON).

    Raises
    ------
    DatasetError
        No file, or not a powder training set.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no training set at {path}")
    with h5py.File(path, "r") as f:
        if str(f.attrs.get("sample_kind", "")) != "powder":
            raise DatasetError(
                f"{path} is not a powder training set (sample_kind "
                f"{f.attrs.get('sample_kind', 'single crystal')!r}); make one with "
                "`steer simulate dataset --powder`"
            )
        data: dict[str, Any] = {k: f[k][()] for k in f}
        data.update({k: f.attrs[k] for k in f.attrs})
    for key in ("crop", "grid", "averaging", "spec", "resolution"):
        data[key] = json.loads(str(data[key]))
    data["fc_names"] = [str(x) for x in data["fc_names"]]
    return data
