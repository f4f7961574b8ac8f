"""The prediction endpoint's computation: the spectra a crystal is expected to give.

For a material (or a CIF with its force constants), a set of FCs, Ei, the temperature and a
list of goniometer angles, :func:`predict` returns up to three outputs (all on the
material's (q, E) grid energies, meV):

``iqe``
    The folded I(q, E) that those orientations would give: the expected spectrum of a
    measurement, ``I = sum(signal) / sum(coverage)`` over the orientations, null where no
    orientation covers a bin. It is computed from the event simulator's expected-count
    machinery and folded with the service's own fold table, so it is what a simulated run
    (:func:`simulations.run.simulate_run`) folds to on average, without counting noise:

    * the full coherent one-phonon S(Q, E) (:class:`~simulations.sqe.CoherentSQE`:
      eigenvectors, Debye-Waller and Bose factors, the instrument's energy resolution at
      Ei) is evaluated by :meth:`OrientationSimulator.expected` on the super-pixels of the
      ARCS-like detector (1 x 4 pixels, as in simulated runs) at the grid's energy centres
      (phonon table on a 40^3 mesh, as simulated runs use);
    * every detector pixel's trajectory is folded exactly as :meth:`Folder.coverage` folds
      it (every 2nd pixel, 4 energy samples per bin, the fold table of
      :meth:`FoldTable.cached`), each sample weighted by ``k_f/k_i dOmega dE`` (the coverage)
      and by that weight times the S of its super-pixel (the signal). ``coverage`` is
      therefore the service's exposure per unit proton charge (sr meV), and ``intensity``
      the coverage-weighted mean S(Q, E) over the Q that fold into each bin, in
      mbarn / (sr meV) per atom: what the service's ``counts / exposure`` estimates, up to
      the flux x sample-size factor.

    This is cheaper than sampling events and physically the right target: the structure
    factor changes from zone to zone, so a path spectrum times a coverage mask (the
    training forward model) would not give the intensities a measurement sees.
``detector``
    The expected S(Q, E) on the detector for each omega (the phonon background that a
    magnetic measurement at that angle would sit on): the solid-angle (``k_f/k_i dOmega
    dE``) weighted mean S over the super-pixels of each in-plane scattering-angle bin
    (detector tube angle, degrees, summed over the tube height), mbarn / (sr meV) per atom,
    with |Q| (1/Angstrom) of each (angle, E) in the horizontal plane.
``powder``
    The coherent one-phonon powder spectrum S(|Q|, E): CoherentSQE averaged over
    ``powder_directions`` directions at every |Q| (a Fibonacci sphere under a random rotation
    per |Q|, seeded), mbarn / meV per atom (per steradian omitted, as for S), with the mask
    of the (|Q|, E) that the detector's scattering angles reach at Ei.

Materials are the shipped ones (``Ge``, ``Nb``, ``Al``) with their named FC sets
(:func:`simulations.reference.named_fc_set`) or coefficients by name (the others held at
``mlff_mean``). A CIF is supported too, with every coefficient of its basis given by name
(``{"coefficients": {...}}``; a request without them is answered with the names it needs):
its crystal, FC basis (4 shells), q-path and grid follow the generic defaults of
:func:`simulations.materials.setup`, and its fold table is built on first use (seconds).

Everything that does not change between requests is cached: material setups, fold tables,
forward models (the dispersion and stability check), phonon tables per FC set, S(Q, E)
models per (FCs, T, Ei) and powder spectra. Predictions run one at a time (a lock): the
kernels use every core already.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numba
import numpy as np
from numpy.typing import NDArray
from scipy import constants as sc

from consumers.exceptions import ConsumerError
from consumers.folding import Folder, FoldTable, _popcount, table_cache_dir
from simulations.crystals import SHIPPED_MATERIALS, load_crystal
from simulations.events import OrientationSimulator, PhononTable
from simulations.exceptions import SimulationError
from simulations.instrument import E_PER_K2, Instrument, Orientation, energy_to_k, energy_to_speed
from simulations.materials import MaterialSetup, setup
from simulations.reference import resolve_fc
from simulations.sqe import CoherentSQE, bose_occupation

from .exceptions import ModelServerError

__all__ = [
    "MAX_CIF_ATOMS",
    "MAX_OMEGAS",
    "OUTPUTS",
    "DetectorPrediction",
    "IQEPrediction",
    "PowderPrediction",
    "Prediction",
    "PredictionError",
    "predict",
]

#: The outputs a prediction can return.
OUTPUTS = ("iqe", "detector", "powder")
#: Most goniometer angles in one prediction.
MAX_OMEGAS = 360
#: Most atoms in the primitive cell of a CIF (the FC basis and S(Q, E) grow quickly).
MAX_CIF_ATOMS = 8
#: Phonon-table mesh (points per axis), the one simulated runs use.
TABLE_MESH = 40
#: Powder |Q| points.
POWDER_N_Q = 100
#: Fold sampling: the defaults of :meth:`Folder.coverage`.
PIXEL_STRIDE = 2
E_SUBSTEPS = 4

# k (1/Angstrom) = _K_PER_V v (m/s), as in consumers.folding
_K_PER_V = sc.neutron_mass / sc.hbar * 1e-10


class PredictionError(ModelServerError, ValueError):
    """A prediction request that cannot be answered; ``status`` is the HTTP status to give
    (404 for an unknown run, else 422)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IQEPrediction:
    """Folded I(q, E) of the requested orientations together.

    Attributes
    ----------
    intensity
        (n_q, n_E) coverage-weighted mean S(Q, E) per bin, mbarn/(sr meV) per atom; NaN
        where no orientation covers the bin.
    coverage
        (n_q, n_E) sum of k_f/k_i dOmega dE folded into each bin, sr meV (the service's
        exposure per uC).
    signal
        (n_q, n_E) ``intensity x coverage``, mbarn per atom (expected counts = flux x atoms x
        signal).
    dispersion
        (n_q, n_branches) phonon energies on the path (the forward model's), meV.
    """

    intensity: NDArray[np.float64]
    coverage: NDArray[np.float64]
    signal: NDArray[np.float64]
    dispersion: NDArray[np.float64]


@dataclass(frozen=True, slots=True, kw_only=True)
class DetectorPrediction:
    """Expected S(Q, E) on the detector for each orientation.

    Attributes
    ----------
    angle_edges
        (n_angle + 1,) in-plane scattering angle bin edges, degrees (+ towards +x).
    intensity
        (n_omega, n_angle, n_E) weighted mean S per bin, mbarn/(sr meV) per atom; NaN where
        no detector lies in an angle bin.
    q_magnitude
        (n_angle, n_E) |Q| at each bin centre in the horizontal plane, 1/Angstrom.
    """

    angle_edges: NDArray[np.float64]
    intensity: NDArray[np.float64]
    q_magnitude: NDArray[np.float64]

    @property
    def angles(self) -> NDArray[np.float64]:
        """(n_angle,) bin centres, degrees."""
        return 0.5 * (self.angle_edges[1:] + self.angle_edges[:-1])


@dataclass(frozen=True, slots=True, kw_only=True)
class PowderPrediction:
    """Coherent one-phonon powder spectrum.

    Attributes
    ----------
    q
        (n_Q,) |Q| bin centres, 1/Angstrom.
    intensity
        (n_Q, n_E) spherical average of S(Q, E), mbarn/meV per atom.
    accessible
        (n_Q, n_E) bool: reached by the detector's scattering angles at Ei.
    directions, seed
        Directions averaged at every |Q| and the seed of their random rotations.
    """

    q: NDArray[np.float64]
    intensity: NDArray[np.float64]
    accessible: NDArray[np.bool_]
    directions: int
    seed: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """What :func:`predict` returns; :meth:`to_dict` is the endpoint's JSON, :meth:`to_png`
    its image."""

    material: str
    fc_label: str
    fc_names: tuple[str, ...]
    coefficients: NDArray[np.float64]
    ei: float
    temperature: float
    omegas: NDArray[np.float64]
    u: tuple[float, float, float]
    v: tuple[float, float, float]
    instrument: dict[str, Any]
    resolution: dict[str, Any]
    energy_edges: NDArray[np.float64]
    qpoints: NDArray[np.float64]
    q_distance: NDArray[np.float64]
    ticks: tuple[tuple[int, str], ...]
    stable: bool
    min_frequency_thz: float
    warnings: tuple[str, ...] = ()
    iqe: IQEPrediction | None = None
    detector: DetectorPrediction | None = None
    powder: PowderPrediction | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def energies(self) -> NDArray[np.float64]:
        """(n_E,) energy bin centres, meV."""
        return 0.5 * (self.energy_edges[1:] + self.energy_edges[:-1])

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs computed."""
        return tuple(o for o in OUTPUTS if getattr(self, o) is not None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and inf as None)."""
        out: dict[str, Any] = {
            "material": self.material,
            "fc": {
                "label": self.fc_label,
                "units": "eV/A^2",
                "coefficients": {
                    n: float(c) for n, c in zip(self.fc_names, self.coefficients, strict=True)
                },
            },
            "ei_meV": self.ei,
            "temperature_K": self.temperature,
            "omegas_deg": self.omegas.tolist(),
            "orientation": {"u": list(self.u), "v": list(self.v)},
            "instrument": self.instrument,
            "resolution": self.resolution,
            "stable": self.stable,
            "min_frequency_thz": self.min_frequency_thz,
            "warnings": list(self.warnings),
            "outputs": list(self.outputs),
            "energy_meV": self.energies.tolist(),
            "energy_edges_meV": self.energy_edges.tolist(),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }
        if self.iqe is not None:
            out["iqe"] = {
                "description": "folded I(q, E) of the orientations together: coverage-weighted "
                "mean S(Q, E) of the Q folded into each bin (null: not covered)",
                "axes": ["q_index", "energy_meV"],
                "units": "mbarn/(sr meV) per atom",
                "q_index": list(range(len(self.qpoints))),
                "qpoints_rlu": self.qpoints.tolist(),
                "q_distance_inv_angstrom": self.q_distance.tolist(),
                "ticks": [[int(i), str(label)] for i, label in self.ticks],
                "energy_meV": self.energies.tolist(),
                "intensity": json_array(self.iqe.intensity),
                "coverage": json_array(self.iqe.coverage),
                "coverage_units": "sr meV",
                "signal": json_array(self.iqe.signal),
                "signal_units": "mbarn per atom",
                "dispersion_meV": json_array(self.iqe.dispersion),
            }
        if self.detector is not None:
            d = self.detector
            out["detector"] = {
                "description": "expected S(Q, E) on the detector per omega: weighted mean over "
                "the pixels of each in-plane scattering-angle bin (tube angle, summed over "
                "the tube height)",
                "axes": ["omega_deg", "angle_deg", "energy_meV"],
                "units": "mbarn/(sr meV) per atom",
                "omega_deg": self.omegas.tolist(),
                "angle_deg": d.angles.tolist(),
                "angle_edges_deg": d.angle_edges.tolist(),
                "energy_meV": self.energies.tolist(),
                "intensity": json_array(d.intensity),
                "q_magnitude_inv_angstrom": json_array(d.q_magnitude),
            }
        if self.powder is not None:
            p = self.powder
            out["powder"] = {
                "description": "coherent one-phonon S(|Q|, E), spherical average over "
                f"{p.directions} directions per |Q| (seed {p.seed})",
                "axes": ["q_inv_angstrom", "energy_meV"],
                "units": "mbarn/meV per atom",
                "q_inv_angstrom": p.q.tolist(),
                "energy_meV": self.energies.tolist(),
                "intensity": json_array(p.intensity),
                "accessible": p.accessible.tolist(),
                "directions": p.directions,
                "seed": p.seed,
            }
        return out

    def to_png(self, dpi: int = 90) -> bytes:
        """PNG with one panel per output (the detector panel: the mean over the omegas)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = self.outputs
        fig = Figure(figsize=(5.0 * len(panels), 4.2))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        e = self.energy_edges
        for ax, name in zip(axes, panels, strict=True):
            if name == "iqe" and self.iqe is not None:
                img = np.ma.masked_invalid(self.iqe.intensity.T)
                x = np.arange(len(self.qpoints) + 1) - 0.5
                m = _image(ax, img, (x[0], x[-1], e[0], e[-1]), _norm(self.iqe.intensity))
                for k in range(self.iqe.dispersion.shape[1]):
                    ax.plot(np.arange(len(self.qpoints)), self.iqe.dispersion[:, k], "w-", lw=0.4)
                ax.set_xticks([i for i, _ in self.ticks])
                ax.set_xticklabels([label.replace("G", "Γ") for _, label in self.ticks])
                ax.set_ylim(e[0], e[-1])
                ax.set_xlabel("q-path")
                ax.set_title(f"I(q,E), {len(self.omegas)} orientation(s)")
                fig.colorbar(m, ax=ax, label="mbarn/(sr meV)/atom")
            elif name == "detector" and self.detector is not None:
                d = self.detector
                with warnings.catch_warnings():  # an angle bin without detector: NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(d.intensity, axis=0)
                extent = (d.angle_edges[0], d.angle_edges[-1], e[0], e[-1])
                m = _image(ax, np.ma.masked_invalid(mean.T), extent, _norm(mean))
                ax.set_xlabel("scattering angle (deg)")
                label = f"omega {self.omegas[0]:g}" if len(self.omegas) == 1 else "mean of omegas"
                ax.set_title(f"detector S, {label}")
                fig.colorbar(m, ax=ax, label="mbarn/(sr meV)/atom")
            elif name == "powder" and self.powder is not None:
                p = self.powder
                dq = p.q[1] - p.q[0] if len(p.q) > 1 else 1.0
                q_edges = np.concatenate([p.q - dq / 2, [p.q[-1] + dq / 2]])
                img = np.ma.masked_where(~p.accessible.T, p.intensity.T)
                m = _image(ax, img, (q_edges[0], q_edges[-1], e[0], e[-1]), _norm(p.intensity))
                ax.set_xlabel("|Q| (1/Å)")
                ax.set_title("powder S(|Q|,E)")
                fig.colorbar(m, ax=ax, label="mbarn/meV/atom")
            ax.set_ylabel("E (meV)")
        fig.suptitle(
            f"{self.material}, FC {self.fc_label}, Ei {self.ei:g} meV, T {self.temperature:g} K",
            fontsize=10,
        )
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()


def _image(ax: Any, img: Any, extent: tuple[float, ...], norm: Any) -> Any:
    """An image on uniform bins (all axes here are uniform)."""
    return ax.imshow(
        img,
        origin="lower",
        aspect="auto",
        extent=extent,
        cmap="viridis",
        norm=norm,
        interpolation="nearest",
    )


def _norm(a: NDArray[np.float64]) -> Any:
    """Square-root colour scale up to the 99.5th percentile (weak branches stay visible)."""
    from matplotlib.colors import PowerNorm

    finite = a[np.isfinite(a) & (a > 0)]
    top = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    return PowerNorm(0.5, vmin=0.0, vmax=top)


def json_array(a: NDArray[Any]) -> list[Any]:
    """Nested lists with NaN and inf as None."""
    arr = np.asarray(a, dtype=float)
    bad = ~np.isfinite(arr)
    if not bad.any():
        out: list[Any] = arr.tolist()
        return out
    obj = arr.astype(object)
    obj[bad] = None
    result: list[Any] = obj.tolist()
    return result


# -- caches -------------------------------------------------------------------------------

_V = TypeVar("_V")


class _LRU:
    """A small least-recently-used cache (callers hold :data:`_LOCK`)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, make: Callable[[], _V]) -> _V:
        if key in self._items:
            self._items.move_to_end(key)
            value: _V = self._items[key]
            return value
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


_LOCK = threading.Lock()
_SETUPS = _LRU(8)
_FORWARD = _LRU(8)
_FOLD_TABLES = _LRU(8)
_PHONON_TABLES = _LRU(4)  # up to ~40 MB each (Ge, 40^3 mesh)
_MODELS = _LRU(16)
_POWDER = _LRU(16)


def clear_caches() -> None:
    """Forget every cached setup, table and spectrum (tests, memory)."""
    with _LOCK:
        for c in (_SETUPS, _FORWARD, _FOLD_TABLES, _PHONON_TABLES, _MODELS, _POWDER):
            c.clear()


@lru_cache(maxsize=1)
def _instrument() -> Instrument:
    return Instrument.arcs_like()


@dataclass(frozen=True, slots=True)
class _Material:
    key: str  # cache key: the shipped name or "cif-<sha>"
    name: str
    setup: MaterialSetup
    shipped: bool


def _material(material: str | None, cif: str | None) -> _Material:
    if (material is None) == (cif is None):
        raise PredictionError(
            "give either a shipped material "
            f"({', '.join(sorted(SHIPPED_MATERIALS))}) or a CIF, not "
            + ("both" if material is not None else "neither")
        )
    if material is not None:
        if material not in SHIPPED_MATERIALS:
            raise PredictionError(
                f"unknown material {material!r}; shipped materials: "
                f"{', '.join(sorted(SHIPPED_MATERIALS))} (or send a CIF as 'cif')"
            )
        ms = _SETUPS.get(material, lambda: setup(material))
        return _Material(key=material, name=material, setup=ms, shipped=True)
    assert cif is not None
    digest = hashlib.sha256(cif.encode()).hexdigest()[:16]
    key = f"cif-{digest}"
    return _Material(
        key=key, name=key, setup=_SETUPS.get(key, lambda: _cif_setup(cif, key)), shipped=False
    )


def _cif_setup(cif: str, key: str) -> MaterialSetup:
    """MaterialSetup of a CIF's crystal (generic defaults), via a file in the cache folder."""
    if not cif.strip():
        raise PredictionError("the CIF is empty")
    folder = table_cache_dir() / "cif"
    path = folder / f"{key}.cif"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(cif)
            os.replace(tmp, path)
    except OSError as exc:
        raise PredictionError(f"cannot store the CIF for parsing: {exc}") from exc
    try:
        crystal = load_crystal(path)
    except SimulationError as exc:
        raise PredictionError(f"cannot read the CIF: {exc}") from exc
    except Exception as exc:  # pymatgen / spglib raise many kinds on odd structures
        raise PredictionError(f"cannot use the CIF's structure: {exc}") from exc
    if crystal.n_atoms > MAX_CIF_ATOMS:
        raise PredictionError(
            f"the CIF's primitive cell has {crystal.n_atoms} atoms; predictions support at "
            f"most {MAX_CIF_ATOMS}"
        )
    try:
        return setup(Path(path))
    except SimulationError as exc:
        raise PredictionError(f"cannot build the model of the CIF's crystal: {exc}") from exc
    except Exception as exc:
        raise PredictionError(f"cannot build the model of the CIF's crystal: {exc}") from exc


def _coefficients(
    mat: _Material, fc: str | Mapping[str, Any] | NDArray[np.float64]
) -> tuple[str, NDArray[np.float64]]:
    """(label, full coefficient vector) of an FC specification."""
    ms = mat.setup
    basis = ms.basis
    if isinstance(fc, np.ndarray):
        return "custom", basis.check_coefficients(np.asarray(fc, dtype=float))
    if isinstance(fc, Mapping):
        values = fc.get("coefficients", fc)
        if not isinstance(values, Mapping):
            raise PredictionError('FC coefficients must be {"coefficients": {name: value}}')
        if not mat.shipped:
            try:
                return "custom", basis.coefficients_from_dict(dict(values))
            except (SimulationError, TypeError, ValueError) as exc:
                raise PredictionError(f"a CIF needs every FC coefficient by name: {exc}") from exc
        try:
            return resolve_fc(mat.name, {str(k): v for k, v in values.items()}, ms)
        except SimulationError as exc:
            raise PredictionError(str(exc)) from exc
    if not isinstance(fc, str):
        raise PredictionError(f"cannot read FC specification {fc!r}")
    if not mat.shipped:
        raise PredictionError(
            f"a CIF has no named FC sets (got {fc!r}): give its FCs as "
            '{"coefficients": {name: value}} (eV/A^2) with every one of '
            f"{', '.join(basis.names)}"
        )
    if fc.endswith(".json") or "/" in fc or "\\" in fc:
        raise PredictionError(f"unknown FC set {fc!r}: give a named set or coefficients")
    try:
        return resolve_fc(mat.name, fc, ms)
    except SimulationError as exc:
        raise PredictionError(str(exc)) from exc


def _forward(mat: _Material) -> Any:
    import torch

    return _FORWARD.get(
        mat.key, lambda: mat.setup.forward_model(dtype=torch.float64, method="exact")
    )


def _dispersion(mat: _Material, c: NDArray[np.float64]) -> tuple[NDArray[np.float64], float]:
    """Path energies (n_q, n_branches) meV and the lowest signed frequency (THz, path+mesh)."""
    import torch

    from simulations.forward import THZ_TO_MEV, VASP_TO_THZ

    fm = _forward(mat)
    with torch.no_grad():
        lam = fm.eigenvalues(c[None])[0].numpy()
    freq = np.sign(lam) * np.sqrt(np.abs(lam)) * VASP_TO_THZ
    return freq[: mat.setup.grid.n_q] * THZ_TO_MEV, float(freq.min())


def _fold_table(mat: _Material) -> FoldTable:
    ms = mat.setup
    return _FOLD_TABLES.get(mat.key, lambda: FoldTable.cached(ms.crystal, ms.grid))


def _model(mat: _Material, c: NDArray[np.float64], temperature: float, ei: float) -> CoherentSQE:
    key = (mat.key, np.asarray(c, dtype=np.float64).tobytes(), float(temperature), float(ei))
    return _MODELS.get(
        key,
        lambda: CoherentSQE(
            mat.setup.basis,
            c,
            temperature=temperature,
            resolution=_instrument().resolution(ei),
        ),
    )


def _phonon_table(mat: _Material, model: CoherentSQE) -> PhononTable:
    """The phonon table of the model's FCs (it depends on nothing else)."""
    key = (mat.key, np.asarray(model.coefficients, dtype=np.float64).tobytes())
    return _PHONON_TABLES.get(key, lambda: PhononTable.build(model, TABLE_MESH))


# -- the expected folded spectrum ---------------------------------------------------------


class _GridSimulator(OrientationSimulator):
    """:class:`OrientationSimulator` whose energy grid is the centres of given bin edges
    (uniform), so that its expected counts line up with the (q, E) grid."""

    def __init__(
        self,
        model: CoherentSQE,
        instrument: Instrument,
        orientation: Orientation,
        ei: float,
        *,
        energy_edges: NDArray[np.float64],
        table: PhononTable,
    ) -> None:
        super().__init__(model, instrument, orientation, ei, table=table)
        edges = np.asarray(energy_edges, dtype=float)
        centres = 0.5 * (edges[1:] + edges[:-1])
        self.n_e = len(centres)
        self.kf_over_ki = np.asarray(energy_to_k(self.ei - centres)) / self._ki
        # The kernel gives exactly 0 more than 6 sigma_max above the highest mode (its own
        # skip): those energies are left out and padded with zeros.
        res = model.resolution
        cap = float(np.max(res.sigma(np.linspace(0.0, res.e_max, 64))))
        reach = table.max_energy + 6.0 * cap
        self.n_eval = int(np.searchsorted(centres, reach, side="right"))
        self.e_edges = edges[: self.n_eval + 1]
        self.e_centres = centres[: self.n_eval]
        self.e_step = float(edges[1] - edges[0])
        self._kf = np.asarray(energy_to_k(self.ei - self.e_centres))

    @property
    def group_of_pixel(self) -> NDArray[np.int64]:
        """(n_pixels,) super-pixel of every pixel."""
        group = np.empty(self.instrument.n_pixels, dtype=np.int64)
        group[self._members] = np.repeat(np.arange(self.n_groups), self._counts)
        return group

    @property
    def group_directions(self) -> NDArray[np.float64]:
        """(n_groups, 3) unit vectors of the super-pixel centres."""
        return np.asarray(self._group_dir)

    @property
    def group_solid_angles(self) -> NDArray[np.float64]:
        """(n_groups,) solid angles, sr."""
        return np.asarray(self._group_solid)

    def sqe(self, omega: float) -> NDArray[np.float64]:
        """(n_groups, n_E) S(Q, E) at the super-pixel centres, mbarn/(sr meV) per atom."""
        out = np.zeros((self.n_groups, self.n_e))
        if self.n_eval:
            k = self.kf_over_ki[None, : self.n_eval]
            weight = k * self.group_solid_angles[:, None] * self.e_step
            out[:, : self.n_eval] = self.expected(omega) / weight
        return out


@numba.njit(cache=True, nogil=True)
def _fold_signal_kernel(
    dm: np.ndarray,  # (n_pix, 3) K_PER_V M d (r.l.u. per m/s) of the sampled pixels
    solid: np.ndarray,  # (n_pix,) weight of each sampled pixel (sr)
    group: np.ndarray,  # (n_pix,) int64 row of ``s_group`` of each sampled pixel
    s_group: np.ndarray,  # (n_groups, n_e) S at the super-pixel centres
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
    clear: np.ndarray,
    cov: np.ndarray,  # (n_q * n_e,) float64, added to
    sig: np.ndarray,  # (n_q * n_e,) float64, added to
) -> int:
    """``consumers.folding._coverage_kernel`` (the same trajectory walk, dead-voxel skips and
    nearest-star search) that adds each sample's weight to ``cov`` and its weight times the
    S of its pixel's super-pixel to ``sig``. The test holds ``cov`` equal to
    :meth:`Folder.coverage`."""
    n_sub = v_f.shape[0]
    computed = 0
    for p in range(dm.shape[0]):
        d0 = dm[p, 0]
        d1 = dm[p, 1]
        d2 = dm[p, 2]
        wp = solid[p]
        gp = group[p]
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
                if reach > 0:
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
                cov[b] += w
                sig[b] += w * s_group[gp, col[s]]
            s += 1
    return computed


class _FoldSampler:
    """The samples of :meth:`Folder.coverage` for one (instrument, Ei, grid)."""

    def __init__(
        self, folder: Folder, group_of_pixel: NDArray[np.int64], *, threads: int = 2
    ) -> None:
        grid = folder.grid
        self.folder = folder
        ins = folder.instrument
        de = float(grid.energy_edges[1] - grid.energy_edges[0]) / E_SUBSTEPS
        n_sub = grid.n_e * E_SUBSTEPS
        energies = float(grid.energy_edges[0]) + (np.arange(n_sub) + 0.5) * de
        self.v_f = np.asarray(energy_to_speed(np.asarray(folder.ei - energies)), dtype=float)
        self.w_e = np.sqrt((folder.ei - energies) / folder.ei) * de
        self.col = np.arange(n_sub, dtype=np.int64) // E_SUBSTEPS
        pix = np.arange(0, ins.n_pixels, PIXEL_STRIDE)
        self.solid = np.ascontiguousarray(ins.solid_angles[pix] * PIXEL_STRIDE)
        self.dirs = np.ascontiguousarray(ins.directions[pix])
        self.group = np.ascontiguousarray(group_of_pixel[pix])
        self.ki = math.sqrt(folder.ei / E_PER_K2)
        self.threads = max(1, threads)

    def fold(
        self, omega: float, s_group: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(coverage, signal), each (n_q, n_E), of one orientation (alias-expanded)."""
        f = self.folder
        grid, t = f.grid, f.table
        m = np.asarray(f.orientation.lab_to_rlu_matrix(omega), dtype=np.float64)
        dm = np.ascontiguousarray(_K_PER_V * (self.dirs @ m.T))
        h_inf = np.ascontiguousarray(m @ np.array([0.0, 0.0, self.ki]))
        s_group = np.ascontiguousarray(s_group, dtype=np.float64)
        bounds = np.linspace(0, len(dm), self.threads + 1).astype(int)

        def work(k: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
            cov = np.zeros(grid.n_q * grid.n_e)
            sig = np.zeros(grid.n_q * grid.n_e)
            sl = slice(bounds[k], bounds[k + 1])
            _fold_signal_kernel(
                dm[sl],
                self.solid[sl],
                self.group[sl],
                s_group,
                self.v_f,
                self.w_e,
                self.col,
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
                grid.n_q,
                grid.n_e,
                t.clear,
                cov,
                sig,
            )
            return cov, sig

        if self.threads == 1:
            parts = [work(0)]
        else:
            with ThreadPoolExecutor(self.threads) as pool:
                parts = list(pool.map(work, range(self.threads)))
        cov = np.sum([p[0] for p in parts], axis=0).reshape(grid.shape)
        sig = np.sum([p[1] for p in parts], axis=0).reshape(grid.shape)
        return cov[t.alias], sig[t.alias]


# -- powder -------------------------------------------------------------------------------


def _fibonacci_sphere(n: int) -> NDArray[np.float64]:
    """(n, 3) quasi-uniform unit vectors."""
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = math.pi * (3.0 - math.sqrt(5.0)) * k
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def _broadening_matrix(
    model: CoherentSQE, energies: NDArray[np.float64], fine: NDArray[np.float64]
) -> NDArray[np.float64]:
    """(n_fine, n_E): unit-area Gaussians of width sigma(|e_fine|) centred at each fine
    energy, evaluated at ``energies`` (as :meth:`CoherentSQE.sqe_from_modes` does)."""
    sigma = model.resolution.sigma(np.abs(fine))[:, None]
    z = (energies[None, :] - fine[:, None]) / sigma
    out: NDArray[np.float64] = np.exp(-0.5 * z * z) / (math.sqrt(2 * math.pi) * sigma)
    return out


def powder_spectrum(
    model: CoherentSQE,
    q: NDArray[np.float64],
    energies: NDArray[np.float64],
    *,
    directions: int = 128,
    seed: int = 0,
) -> NDArray[np.float64]:
    """(n_Q, n_E) spherical average of ``model``'s S(Q, E) at |Q| = ``q`` (1/Angstrom).

    At every |Q| the Fibonacci sphere of ``directions`` points is turned by a random rotation
    (seeded). Mode energies go onto a fine energy grid (1/10 of the narrowest resolution
    width, each mode split linearly between its two nearest points, which keeps its weight
    and mean energy) that one matrix broadens with sigma(E) of the mode: the same
    Gaussians as :meth:`CoherentSQE.sqe_from_modes`, loss and gain.
    """
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    base = _fibonacci_sphere(directions)
    rot = Rotation.random(len(q), random_state=rng).as_matrix()  # (n_Q, 3, 3)
    dirs = np.einsum("qij,dj->qdi", rot, base)
    q_cart = (np.asarray(q, dtype=float)[:, None, None] * dirs).reshape(-1, 3)
    q_rlu = q_cart @ np.linalg.inv(model.crystal.reciprocal_lattice)
    e_mode, sf = model.structure_factors(q_rlu)  # (n_Q * n_dir, n_m)
    n = bose_occupation(e_mode, model.temperature)
    keep = sf > 0
    energies = np.asarray(energies, dtype=float)
    sig_min = float(np.min(model.resolution.sigma(np.linspace(0, model.resolution.e_max, 64))))
    step = max(sig_min / 10.0, 1e-3)
    top = max(float(np.abs(energies).max()), float(e_mode.max(initial=0.0))) + 1.0
    n_half = math.ceil(top / step)
    fine = np.asarray(step * np.arange(-n_half, n_half + 1), dtype=np.float64)
    row = np.repeat(np.arange(len(q)), directions * e_mode.shape[1]).reshape(e_mode.shape)
    centres = np.concatenate([e_mode[keep], -e_mode[keep]])
    weights = np.concatenate([(sf * (n + 1.0))[keep], (sf * n)[keep]])
    rows = np.concatenate([row[keep], row[keep]])
    x = (centres - fine[0]) / step
    lo = np.clip(np.floor(x).astype(np.int64), 0, len(fine) - 2)
    frac = np.clip(x - lo, 0.0, 1.0)
    hist = np.bincount(
        rows * len(fine) + lo, weights * (1 - frac), minlength=len(q) * len(fine)
    ) + np.bincount(rows * len(fine) + lo + 1, weights * frac, minlength=len(q) * len(fine))
    hist = hist.reshape(len(q), len(fine))
    used = np.nonzero(hist.any(axis=0))[0]
    kernel = _broadening_matrix(model, energies, fine[used])
    out: NDArray[np.float64] = hist[:, used] @ kernel / directions
    return out


def _accessible(
    q: NDArray[np.float64], energies: NDArray[np.float64], ei: float, ins: Instrument
) -> NDArray[np.bool_]:
    """(n_Q, n_E): |Q| reachable at E by some scattering angle the detector covers."""
    cos_tt = ins.directions[:, 2]
    lo, hi = float(cos_tt.min()), float(cos_tt.max())
    ki = float(energy_to_k(ei))
    kf = np.asarray(energy_to_k(np.maximum(ei - energies, 0.0)))[None, :]
    qq = np.asarray(q, dtype=float)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (ki * ki + kf * kf - qq * qq) / (2 * ki * kf)
    return np.asarray((c >= lo) & (c <= hi) & (kf > 0))


# -- detector -----------------------------------------------------------------------------


def _angle_bins(
    directions: NDArray[np.float64], step: float
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """In-plane angle bin edges (degrees) and the bin of every direction."""
    phi = np.degrees(np.arctan2(directions[:, 0], directions[:, 2]))
    lo = math.floor(float(phi.min()) / step) * step
    n = max(1, math.ceil((float(phi.max()) - lo) / step))
    if lo + n * step <= float(phi.max()):
        n += 1
    edges = np.asarray(lo + step * np.arange(n + 1), dtype=np.float64)
    idx = np.clip(((phi - lo) / step).astype(np.int64), 0, n - 1)
    return edges, idx


# -- the entry point ----------------------------------------------------------------------


def predict(
    material: str | None = None,
    *,
    cif: str | None = None,
    fc: str | Mapping[str, Any] | NDArray[np.float64] = "mlff_mean",
    fc_label: str | None = None,
    ei: float | None = None,
    temperature: float = 5.0,
    omegas: Sequence[float] = (0.0,),
    outputs: Sequence[str] = OUTPUTS,
    u: Sequence[float] = (1.0, 0.0, 0.0),
    v: Sequence[float] = (0.0, 1.0, 0.0),
    powder_directions: int = 128,
    seed: int = 0,
    detector_angle_step: float = 2.0,
) -> Prediction:
    """Expected spectra of a crystal on the ARCS-like spectrometer (see the module docstring).

    Parameters
    ----------
    material
        A shipped material (``"Ge"``, ``"Nb"``, ``"Al"``); or give ``cif`` instead.
    cif
        CIF text; its FCs must be given as every coefficient by name.
    fc
        A named set (``"mlff_mean"``, a force-field name, ``"raman"`` for Ge), a mapping
        ``{name: value}`` or ``{"coefficients": {name: value}}`` (eV/A^2; for a shipped
        material the coefficients left out are ``mlff_mean``'s), or a full vector.
    fc_label
        Label of the FCs in the result (default: the set's name, or ``custom``).
    ei
        Incident energy, meV (default: the material's); must exceed the grid's top energy.
    temperature
        Sample temperature, K.
    omegas
        Goniometer angles, degrees (within the goniometer limits), for ``iqe`` and
        ``detector``.
    outputs
        Any of ``"iqe"``, ``"detector"``, ``"powder"``.
    u, v
        Orientation vectors (conventional hkl) along the beam / in the horizontal plane at
        omega = 0 (those of simulated runs by default).
    powder_directions, seed
        Directions averaged per |Q| and the seed of their rotations.
    detector_angle_step
        Width of the detector output's angle bins, degrees.

    Raises
    ------
    PredictionError
        For anything the request gets wrong (the message says what).
    """
    t_start = time.perf_counter()
    wanted = tuple(dict.fromkeys(str(o) for o in outputs))
    unknown = [o for o in wanted if o not in OUTPUTS]
    if unknown:
        raise PredictionError(f"unknown outputs {unknown}; choose from {', '.join(OUTPUTS)}")
    if not wanted:
        raise PredictionError(f"no outputs requested; choose from {', '.join(OUTPUTS)}")
    _check_number("temperature", temperature, lo=0.0, hi=1e4)
    _check_number("detector_angle_step", detector_angle_step, lo=0.05, hi=90.0, open_lo=True)
    if not 1 <= int(powder_directions) <= 100_000:
        raise PredictionError(f"powder_directions must be 1..100000, got {powder_directions}")
    w = np.atleast_1d(np.asarray(omegas, dtype=float))
    if w.ndim != 1:
        raise PredictionError("omegas must be a flat list of angles in degrees")
    if len(w) > MAX_OMEGAS:
        raise PredictionError(f"at most {MAX_OMEGAS} omegas per prediction, got {len(w)}")
    uu, vv = _check_vector("u", u), _check_vector("v", v)
    ins = _instrument()
    if "iqe" in wanted or "detector" in wanted:
        if len(w) == 0:
            raise PredictionError("iqe and detector outputs need at least one omega")
        try:
            w = ins.check_omegas(w)
        except SimulationError as exc:
            raise PredictionError(str(exc)) from exc
    with _LOCK:
        try:
            return _predict_locked(
                material=material,
                cif=cif,
                fc=fc,
                fc_label=fc_label,
                ei=ei,
                temperature=float(temperature),
                omegas=w,
                outputs=wanted,
                u=uu,
                v=vv,
                powder_directions=int(powder_directions),
                seed=int(seed),
                detector_angle_step=float(detector_angle_step),
                t_start=t_start,
            )
        except PredictionError:
            raise
        except (SimulationError, ConsumerError, ModelServerError) as exc:
            raise PredictionError(str(exc)) from exc


def _check_number(name: str, value: float, *, lo: float, hi: float, open_lo: bool = False) -> None:
    x = float(value)
    if not math.isfinite(x) or x < lo or x > hi or (open_lo and x == lo):
        raise PredictionError(f"{name} must be a number in {lo:g}..{hi:g}, got {value!r}")


def _check_vector(name: str, vec: Sequence[float]) -> tuple[float, float, float]:
    a = np.asarray(vec, dtype=float)
    if a.shape != (3,) or not np.all(np.isfinite(a)) or np.abs(a).max() > 1e3:
        raise PredictionError(f"{name} must be three finite Miller indices, got {list(vec)!r}")
    if np.linalg.norm(a) < 1e-6:
        raise PredictionError(f"{name} must not be the zero vector")
    return (float(a[0]), float(a[1]), float(a[2]))


def _predict_locked(
    *,
    material: str | None,
    cif: str | None,
    fc: str | Mapping[str, Any] | NDArray[np.float64],
    fc_label: str | None,
    ei: float | None,
    temperature: float,
    omegas: NDArray[np.float64],
    outputs: tuple[str, ...],
    u: tuple[float, float, float],
    v: tuple[float, float, float],
    powder_directions: int,
    seed: int,
    detector_angle_step: float,
    t_start: float,
) -> Prediction:
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    mat = _material(material, cif)
    ms = mat.setup
    grid = ms.grid
    label, c = _coefficients(mat, fc)
    e_top = float(grid.energy_edges[-1])
    ei_value = float(ms.defaults.ei if ei is None else ei)
    if not math.isfinite(ei_value) or not ei_value > e_top:
        raise PredictionError(
            f"Ei = {ei_value:g} meV is too small: it must exceed the top of {mat.name}'s "
            f"energy grid, {e_top:g} meV (a neutron cannot lose more energy than it has)"
        )
    ins = _instrument()
    dispersion, min_freq = _dispersion(mat, c)
    fm = _forward(mat)
    stable = bool(min_freq >= -fm.imaginary_tol)
    notes: list[str] = []
    if not stable:
        notes.append(
            f"the FC set is dynamically unstable (lowest frequency {min_freq:.3f} THz): "
            "imaginary modes are left out of S(Q, E)"
        )
    model = _model(mat, c, temperature, ei_value)
    seconds["setup"] = time.perf_counter() - t
    energies = grid.energy_centres
    iqe = detector = powder = None
    if "iqe" in outputs or "detector" in outputs:
        try:
            orientation = Orientation.from_vectors(ms.crystal, u, v)
        except SimulationError as exc:
            raise PredictionError(str(exc)) from exc
        t = time.perf_counter()
        table = _phonon_table(mat, model)
        seconds["phonon_table"] = time.perf_counter() - t
        sim = _GridSimulator(
            model, ins, orientation, ei_value, energy_edges=grid.energy_edges, table=table
        )
        t = time.perf_counter()
        sampler = None
        if "iqe" in outputs:
            folder = Folder(_fold_table(mat), grid, ins, orientation, ei_value)
            sampler = _FoldSampler(folder, sim.group_of_pixel, threads=min(4, os.cpu_count() or 1))
        seconds["fold_setup"] = time.perf_counter() - t
        cov = np.zeros(grid.shape)
        sig = np.zeros(grid.shape)
        det_num: list[NDArray[np.float64]] = []
        if "detector" in outputs:
            edges, bin_of = _angle_bins(sim.group_directions, detector_angle_step)
            n_bins = len(edges) - 1
            onehot = np.zeros((n_bins, sim.n_groups))
            onehot[bin_of, np.arange(sim.n_groups)] = sim.group_solid_angles
            den = onehot.sum(axis=1)[:, None] * sim.kf_over_ki[None, :]
        t_s = t_f = 0.0
        for omega in omegas:
            t = time.perf_counter()
            s_group = sim.sqe(float(omega))
            t_s += time.perf_counter() - t
            t = time.perf_counter()
            if sampler is not None:
                c_w, s_w = sampler.fold(float(omega), s_group)
                cov += c_w
                sig += s_w
            if "detector" in outputs:
                det_num.append(onehot @ (s_group * sim.kf_over_ki[None, :]))
            t_f += time.perf_counter() - t
        seconds["sqe"] = t_s
        seconds["fold"] = t_f
        if "iqe" in outputs:
            with np.errstate(invalid="ignore", divide="ignore"):
                intensity = np.where(cov > 0, sig / np.where(cov > 0, cov, 1.0), np.nan)
            iqe = IQEPrediction(
                intensity=intensity, coverage=cov, signal=sig, dispersion=dispersion
            )
        if "detector" in outputs:
            with np.errstate(invalid="ignore", divide="ignore"):
                det = np.stack(det_num) / np.where(den > 0, den, np.nan)[None]
            centres = 0.5 * (edges[1:] + edges[:-1])
            ki = float(energy_to_k(ei_value))
            kf = np.asarray(energy_to_k(ei_value - energies))
            qmag = np.sqrt(
                np.maximum(
                    ki * ki
                    + kf[None, :] ** 2
                    - 2 * ki * kf[None, :] * np.cos(np.radians(centres))[:, None],
                    0.0,
                )
            )
            detector = DetectorPrediction(angle_edges=edges, intensity=det, q_magnitude=qmag)
    if "powder" in outputs:
        t = time.perf_counter()
        cos_max = float(ins.directions[:, 2].min())
        ki = float(energy_to_k(ei_value))
        kf0 = float(energy_to_k(ei_value - float(grid.energy_edges[0])))
        q_top = math.sqrt(ki * ki + kf0 * kf0 - 2 * ki * kf0 * cos_max)
        q = (np.arange(POWDER_N_Q) + 0.5) * q_top / POWDER_N_Q
        key = (
            mat.key,
            np.asarray(c).tobytes(),
            temperature,
            ei_value,
            powder_directions,
            seed,
        )
        spectrum = _POWDER.get(
            key,
            lambda: powder_spectrum(model, q, energies, directions=powder_directions, seed=seed),
        )
        powder = PowderPrediction(
            q=q,
            intensity=spectrum,
            accessible=_accessible(q, energies, ei_value, ins),
            directions=powder_directions,
            seed=seed,
        )
        seconds["powder"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    qp = grid.qpath
    return Prediction(
        material=mat.name,
        fc_label=fc_label or label,
        fc_names=tuple(ms.basis.names),
        coefficients=np.asarray(c, dtype=float),
        ei=ei_value,
        temperature=temperature,
        omegas=np.asarray(omegas, dtype=float),
        u=u,
        v=v,
        instrument=ins.to_metadata(),
        resolution=model.resolution.to_dict(),
        energy_edges=np.asarray(grid.energy_edges, dtype=float),
        qpoints=np.asarray(qp.qpoints, dtype=float),
        q_distance=np.asarray(qp.distance, dtype=float),
        ticks=qp.ticks,
        stable=stable,
        min_frequency_thz=min_freq,
        warnings=tuple(notes),
        iqe=iqe,
        detector=detector,
        powder=powder,
        seconds=seconds,
    )
