"""The refinement of one run: its set-up, prior and expected-counts model in one place.

:class:`RunRefiner` is what the service, ``steer estimate --refine`` and the calibration
study use: built from a run's metadata (material, instrument, Ei, temperature), it turns
the run's folded counts and per-bin moments into a :class:`~model_server.refinement.fit.Refined`
estimate, started from the VAE's estimate (its coefficients by name; the others at the
reference set) and warm-started from the previous snapshot's optimum.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.moments import BinMoments, StructureConstants, structure_constants
from consumers.reduction.table import FoldTable
from model_server.exceptions import RefinementError
from model_server.refinement.counts import GAMMA_EXCLUSION, CountsModel, ExactCorrection, ModeBases
from model_server.refinement.fit import Prior, Refined, default_prior, refine
from simulations.exceptions import SimulationError
from simulations.instrument.spectrometer import Instrument
from simulations.lattice.backgrounds import IncoherentScattering, elastic_reach
from simulations.lattice.grid import (
    Grid,
    ZoneClasses,
    make_class_grid,
    make_wedge_grid,
    zone_classes,
)
from simulations.lattice.materials import MaterialSetup, setup
from simulations.lattice.sqe import CoherentSQE, mesh_points

__all__ = [
    "RunRefiner",
    "file_binning",
    "file_inputs",
    "read_counts_file",
    "refine_file",
    "run_moments",
    "running_estimate",
]

logger = logging.getLogger(__name__)

#: Points per axis of the mesh of the multiphonon responses.
MULTIPHONON_MESH = 16
#: Points per axis of the mesh whose irreducible points bin the wedge (:meth:`RunRefiner.wedge`).
WEDGE_MESH = 16
#: Relative change of the coefficients (2-norm) that remakes the multiphonon template.
TEMPLATE_TOLERANCE = 0.01
#: The same for the live loop's fits (the template then stays within 5 % of the optimum):
#: on the demo's run a remake after a move of 1.5 % changed no coefficient by 1e-4 of its
#: std, and cost ~0.2 s and a second fit on the live path.
LIVE_TEMPLATE_TOLERANCE = 0.05


def _material_setup(material: str, given: MaterialSetup | None) -> MaterialSetup:
    """``given``, else the shipped material's set-up (a RefinementError when none)."""
    try:
        return given or setup(material)
    except SimulationError as exc:
        raise RefinementError(f"no forward model for material {material!r}: {exc}") from exc


class RunRefiner:
    """Refines the force constants of one run from its counts.

    Parameters
    ----------
    material
        Shipped material name (it needs a reference FC set: the prior's centre and the
        Debye-Waller factors).
    instrument
        The spectrometer (its energy resolution at ``ei``).
    ei
        Incident energy, meV.
    temperature
        Sample temperature, K.
    table
        The run's fold table (its alias and tolerance); built (cached) when not given.
    free
        Coefficients without a prior (default: the reference set's kept ones, which the
        VAE varies); the others get the reference ensemble's spread as a prior width.
    grid
        The binning of the counts (default: the material's q-path grid;
        :meth:`wedge` bins the whole irreducible wedge).
    exclusion
        Radius (1/A) around the zone centres left out of the fit (default:
        :data:`~model_server.refinement.counts.GAMMA_EXCLUSION` fold-tube radii).
    """

    def __init__(
        self,
        material: str,
        instrument: Instrument,
        ei: float,
        temperature: float,
        *,
        table: FoldTable | None = None,
        free: Sequence[str] | None = None,
        material_setup: MaterialSetup | None = None,
        grid: Grid | None = None,
        exclusion: float | None = None,
    ) -> None:
        from simulations.fcdb.reference import load_reference

        try:
            self.setup = material_setup or setup(material)
            ref = load_reference(material)
        except (SimulationError, FileNotFoundError, OSError) as exc:
            raise RefinementError(
                f"no forward model for material {material!r} (a shipped material with a "
                f"reference FC set is needed): {exc}"
            ) from exc
        if not (math.isfinite(ei) and ei > 0):
            raise RefinementError(f"Ei must be a positive number of meV, got {ei}")
        self.material = material
        self.instrument = instrument
        self.ei = float(ei)
        self.temperature = float(temperature)
        self.reference = np.asarray(ref.mean, dtype=float)
        self.names = tuple(self.setup.basis.names)
        self.free = tuple(ref.kept if free is None else free)
        self.prior: Prior = default_prior(
            self.names, self.reference, ref.maximum - ref.minimum, self.free
        )
        self.resolution = instrument.resolution(self.ei)
        self.grid: Grid = grid or self.setup.grid
        self.table = table or FoldTable.cached(self.setup.crystal, self.grid)
        self.exclusion = (
            GAMMA_EXCLUSION * self.table.tolerance if exclusion is None else float(exclusion)
        )
        #: "path" (the q-path's tube), "wedge" (:meth:`wedge`), "classes"
        #: (:meth:`zone_split`) or "grid" (another one)
        self.binning = "path" if grid is None else "grid"
        #: the zone classes the path's bins are split by (:meth:`zone_split`), else None
        self.classes: ZoneClasses | None = None
        #: the wedge's mesh (points per axis) when :meth:`wedge` made it, else None
        self.wedge_mesh: int | None = None
        self._constants: StructureConstants | None = None
        #: the expected-counts model of the last :meth:`refine` (the planner's cumulative)
        self.last_model: CountsModel | None = None
        self._incoherent: tuple[NDArray[np.float64], IncoherentScattering] | None = None
        #: the mode bases at the grid's q-points, shared by the snapshots' models
        self.bases = ModeBases(self.setup.basis)

    @classmethod
    def from_metadata(
        cls,
        meta: Mapping[str, Any],
        *,
        wedge_mesh: int | None = None,
        classes: bool = False,
        **kwargs: Any,
    ) -> RunRefiner:
        """From a run start's metadata (``material``, ``instrument``, ``ei_meV``,
        ``temperature_K``; 5 K when absent); on the wedge of a ``wedge_mesh^3`` mesh
        (:meth:`wedge`) when given, on the path's bins split by zone class
        (:meth:`zone_split`) with ``classes``."""
        try:
            instrument = Instrument.from_metadata(meta["instrument"])
            args = (
                str(meta["material"]),
                instrument,
                float(meta["ei_meV"]),
                float(meta.get("temperature_K", 5.0)),
            )
            if wedge_mesh is not None:
                return cls.wedge(*args, mesh=wedge_mesh, **kwargs)
            if classes:
                return cls.zone_split(*args, **kwargs)
            return cls(*args, **kwargs)
        except KeyError as exc:
            raise RefinementError(f"run metadata lacks {exc}: cannot refine") from exc

    @classmethod
    def wedge(
        cls,
        material: str,
        instrument: Instrument,
        ei: float,
        temperature: float,
        *,
        mesh: int = WEDGE_MESH,
        material_setup: MaterialSetup | None = None,
        **kwargs: Any,
    ) -> RunRefiner:
        """The refinement on the whole irreducible wedge: the counts binned by the nearest
        point of a Gamma-centred ``mesh^3`` mesh's star
        (:func:`~simulations.lattice.grid.make_wedge_grid`; every event in the energy
        window counts, about 15 times the path tube's on the README run), the path's
        energy bins, and the path's zone-centre exclusion (the same radius in 1/A)."""
        ms = _material_setup(material, material_setup)
        grid, radius = make_wedge_grid(ms.crystal, ms.grid.energy_edges, mesh)
        path_tolerance = FoldTable.cached(ms.crystal, ms.grid).tolerance
        out = cls(
            material,
            instrument,
            ei,
            temperature,
            material_setup=ms,
            grid=grid,
            table=FoldTable.cached(ms.crystal, grid, tolerance=radius),
            exclusion=GAMMA_EXCLUSION * path_tolerance,
            **kwargs,
        )
        out.binning = "wedge"
        out.wedge_mesh = int(mesh)
        return out

    @classmethod
    def zone_split(
        cls,
        material: str,
        instrument: Instrument,
        ei: float,
        temperature: float,
        *,
        material_setup: MaterialSetup | None = None,
        **kwargs: Any,
    ) -> RunRefiner:
        """The refinement on the path's bins split by the structure-factor class of each
        cell's Brillouin zone (:func:`~simulations.lattice.grid.zone_classes`; four for
        Ge): the same cells and counts as the path, but a count keeps whether its zone's
        atoms scatter in phase, out of phase or a quarter turn apart, which the plain fold
        sums away. The moments are taken with
        ``orientation_moments(..., classes=refiner.classes)`` on the path's folder; the
        grid is :func:`~simulations.lattice.grid.make_class_grid`'s."""
        ms = _material_setup(material, material_setup)
        classes = zone_classes(ms.crystal)
        out = cls(
            material,
            instrument,
            ei,
            temperature,
            material_setup=ms,
            grid=make_class_grid(ms.grid, classes),
            table=FoldTable.cached(ms.crystal, ms.grid),
            **kwargs,
        )
        out.binning = "classes"
        out.classes = classes
        return out

    @property
    def alias(self) -> NDArray[np.int64]:
        """(n_q,) rows of :attr:`grid` holding the counts of each row (the fold table's
        alias; with zone classes, each class row of an aliased point follows its own)."""
        alias = np.asarray(self.table.alias, dtype=np.int64)
        return alias if self.classes is None else self.classes.expand(alias)

    @property
    def constants(self) -> StructureConstants:
        """The crystal constants of the moments (Debye-Waller of the reference set)."""
        if self._constants is None:
            self._constants = structure_constants(
                self.setup.basis, self.reference, self.temperature
            )
        return self._constants

    @property
    def elastic_cut(self) -> float:
        """Lowest energy transfer (meV) of a fitted bin's lower edge: the elastic line's
        reach (:func:`~simulations.lattice.backgrounds.elastic_reach`)."""
        return elastic_reach(self.resolution)

    def incoherent(
        self, at: NDArray[np.float64] | None = None, tolerance: float = TEMPLATE_TOLERANCE
    ) -> IncoherentScattering:
        """The incoherent scattering (multiphonon responses) of coefficients ``at`` (default:
        the reference set); the last one is kept and reused while the coefficients stay
        within ``tolerance`` (relative, 2-norm) of those it was made for."""
        c = self.reference if at is None else np.asarray(at, dtype=float)
        if self._incoherent is not None:
            c0, inc = self._incoherent
            if np.linalg.norm(c - c0) <= tolerance * np.linalg.norm(c0):
                return inc
        model = CoherentSQE(
            self.setup.basis, c, temperature=self.temperature, resolution=self.resolution
        )
        q = mesh_points(MULTIPHONON_MESH)
        modes = model.modes(q)
        keep = modes.energies > 0
        if not np.all(keep[:, 3:]):  # an unstable set: its multiphonon is not defined
            c = self.reference
            model = CoherentSQE(
                self.setup.basis, c, temperature=self.temperature, resolution=self.resolution
            )
            modes = model.modes(q)
        inc = IncoherentScattering.from_modes(model, modes.energies, modes.eigenvectors)
        self._incoherent = (c.copy(), inc)
        return inc

    def multiphonon(
        self,
        moments: BinMoments,
        at: NDArray[np.float64] | None = None,
        tolerance: float = TEMPLATE_TOLERANCE,
    ) -> NDArray[np.float64]:
        """(n_q * n_E,) the expected multiphonon signal of every bin per unit scale, from
        the moments (in the units of the one-phonon sum): the incoherent approximation of
        :class:`~simulations.lattice.backgrounds.IncoherentScattering` at the reference
        set, with each cell's ``exp(-2W) |Q|^4`` summed by the moments' atom blocks
        (``tr T2_jj / (b_j^2 / M_j)``) and ``|Q|^6`` as ``(|Q|^4)^2 / |Q|^2`` of the bin
        (exact for the narrow tube's nearly constant |Q|); the phonons those of the
        coefficients ``at`` (default: the reference set; those of the last template while
        within ``tolerance`` of them, :meth:`incoherent`)."""
        inc = self.incoherent(at, tolerance)
        amp2 = self.constants.amplitudes**2  # (n_at,) b^2 / M
        n_at = len(amp2)
        rows = np.arange(3 * n_at)  # the diagonals, gathered (a strided view sums slowly)
        diag2 = moments.tensor.real[:, rows, rows].reshape(-1, n_at, 3).sum(axis=2)
        diag4 = moments.tensor_q2.real[:, rows, rows].reshape(-1, n_at, 3).sum(axis=2)
        m2 = diag2 / amp2[None, :]  # sum w exp(-2W) |Q|^2
        m4 = diag4 / amp2[None, :]  # sum w exp(-2W) |Q|^4
        m6 = np.where(m2 > 0, m4 * m4 / np.where(m2 > 0, m2, 1.0), 0.0)
        grid = self.grid
        broad = inc.broadened_orders(grid.energy_centres, self.resolution)  # (n, at, e)
        n_e = grid.n_e
        out = np.zeros((len(m2) // n_e, n_e))
        for j in range(n_at):
            per_atom = (m4[:, j].reshape(-1, n_e) / 2.0) * broad[0, j][None, :]
            if len(broad) > 1:
                per_atom += (m6[:, j].reshape(-1, n_e) / 6.0) * broad[1, j][None, :]
            out += inc.sigma_total[j] / (4 * math.pi) * per_atom
        return np.asarray(out.reshape(-1) / n_at)

    def warm_up(self) -> float:
        """Compile the expected-counts model's kernels (numba's, cached on disk after a
        first compile of 10-20 s) before the run's first fit needs them: the moments of one
        orientation (omega 0) and the model's expected counts and Jacobian at the
        reference set. The path's binning or its zone classes (the live service's); a
        refiner on another grid warms up the path's model of its material (the same
        kernels). Returns the seconds it took."""
        from consumers.reduction.folding import Folder
        from consumers.reduction.moments import orientation_moments
        from simulations.instrument.spectrometer import Orientation

        t0 = time.perf_counter()
        if self.binning not in ("path", "classes"):
            path = RunRefiner(
                self.material, self.instrument, self.ei, self.temperature, material_setup=self.setup
            )
            path.warm_up()
            return time.perf_counter() - t0
        frame = Orientation.from_vectors(self.setup.crystal, (1, 0, 0), (0, 1, 0))
        folder = Folder(self.table, self.setup.grid, self.instrument, frame, self.ei)
        # not cached: a run's own moments keep every slot of the cache
        moments = orientation_moments(
            folder, self.constants, 0.0, classes=self.classes, cache=False
        )
        model = self.counts_model(moments)
        model.evaluate(model.theta(self.reference), jacobian=True)
        return time.perf_counter() - t0

    def model(
        self,
        moments: BinMoments,
        *,
        exclusion: float | None = None,
        at: NDArray[np.float64] | None = None,
        tolerance: float = TEMPLATE_TOLERANCE,
        correction: ExactCorrection | None = None,
    ) -> CountsModel:
        """The expected-counts model of a run's moments (``exclusion``: the radius around
        the zone centres left out, 1/A; default the model's, a negative one keeps all):
        the bins above the elastic line (:attr:`elastic_cut`), the sample's multiphonon
        scattering a fixed part of the signal, made with the phonons of the coefficients
        ``at`` (default: the reference set; the fit makes it at its start and again at its
        optimum when that moved: :meth:`refine`; the last template is kept while ``at`` is
        within ``tolerance`` of its coefficients). ``correction``: the exact-fold
        correction's factors on the one-phonon part and its additive part in the fixed
        signal (:mod:`model_server.refinement.exact`)."""
        extra = self.multiphonon(moments, at, tolerance)
        if correction is None:
            return self.counts_model(moments, exclusion=exclusion, extra=extra)
        return self.counts_model(
            moments,
            exclusion=exclusion,
            extra=extra + correction.additive,
            correction=correction.factors,
        )

    def counts_model(
        self,
        moments: BinMoments,
        *,
        exclusion: float | None = None,
        extra: NDArray[np.float64] | None = None,
        correction: NDArray[np.float64] | None = None,
        curvature: bool = True,
    ) -> CountsModel:
        """The one-phonon expected-counts model of ``moments`` (plus the fixed signal
        ``extra``, (n_q * n_E,), when given; its one-phonon part times ``correction``,
        (n_q * n_E,), when given) on the run's grid, fold table, resolution and
        temperature, the bins above the elastic line; without ``curvature``, the
        branches taken as planes across the tube (for comparisons)."""
        return CountsModel(
            self.setup.basis,
            self.grid,
            self.resolution,
            moments,
            alias=self.alias,
            tolerance=self.table.tolerance,
            temperature=self.temperature,
            reference=self.reference,
            exclusion=self.exclusion if exclusion is None else exclusion,
            e_min=self.elastic_cut,
            extra=extra,
            correction=correction,
            bases=self.bases,
            curvature=curvature,
        )

    def start_from(self, estimate: Mapping[str, float] | None) -> NDArray[np.float64]:
        """(n_coeff,) start: the named values of ``estimate`` (e.g. the VAE's means), the
        reference set elsewhere."""
        return self._by_name(estimate or {}, self.reference.copy())

    def spread_from(self, spread: Mapping[str, float]) -> NDArray[np.float64]:
        """(n_coeff,) the named uncertainties of ``spread`` (eV/A^2), NaN elsewhere."""
        return self._by_name(spread, np.full(len(self.names), np.nan))

    def _by_name(
        self, values: Mapping[str, float], out: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """``out`` ((n_coeff,)) with the finite ones of the named ``values`` put in."""
        for name, value in values.items():
            if name in self.names and math.isfinite(float(value)):
                out[self.names.index(name)] = float(value)
        return out

    def refine(
        self,
        counts: NDArray[np.float64],
        moments: BinMoments,
        starts: Sequence[Mapping[str, float]] | Mapping[str, float] | None = None,
        *,
        warm: NDArray[np.float64] | None = None,
        model: CountsModel | None = None,
        spread: Mapping[str, float] | None = None,
        restarts: bool = True,
        template_tolerance: float = TEMPLATE_TOLERANCE,
        max_iter: int = 40,
        correction: ExactCorrection | None = None,
    ) -> Refined:
        """Fit ``counts`` ((n_q, n_E) folded counts) given the run's ``moments``.

        ``starts``: one or several starting estimates by name (the VAE's mean, posterior
        samples); ``warm``: the previous optimum's parameter vector; ``spread``: the first
        start's uncertainty by name (the VAE's std, eV/A^2), the step of the grid of starts
        tried when the fit still misfits; ``restarts``: whether a misfit tries the starts
        toward the reference set here (:func:`~model_server.refinement.fit.refine`);
        ``template_tolerance``: the relative distance of the optimum from the coefficients
        the multiphonon template was made for beyond which it is made again there and
        fitted again (the live loop allows more: :data:`LIVE_TEMPLATE_TOLERANCE`);
        ``correction``: the exact-fold correction the model is made with (:meth:`model`;
        ignored with a given ``model``).
        """
        if moments.n_orientations == 0 or not np.any(moments.weight > 0):
            raise RefinementError("no measured bins: no orientation has been folded yet")
        if isinstance(starts, Mapping) or starts is None:
            starts = [starts or {}]
        vectors = [self.start_from(s) for s in starts]
        steps = None if spread is None else self.spread_from(spread)
        given = model is not None
        k = len(self.names)
        if not vectors and warm is None:
            raise RefinementError("no starting point: give a start or a warm parameter vector")
        at = np.asarray(warm if warm is not None else vectors[0], dtype=float)[:k]
        if model is None:
            model = self.model(moments, at=at, tolerance=template_tolerance, correction=correction)
        fit = refine(
            model,
            counts,
            vectors,
            prior=self.prior,
            warm=warm,
            spread=steps,
            restarts=restarts,
            max_iter=max_iter,
        )
        if given:  # a given model keeps its template
            self.last_model = model
            return fit
        best = np.asarray(fit.theta, dtype=float)[:k]
        # the coefficients the template was made for (a kept one's may differ from ``at``)
        made = self._incoherent[0] if self._incoherent is not None else at
        if np.linalg.norm(best - made) > template_tolerance * np.linalg.norm(made):
            # the multiphonon template follows the optimum: remade there and fitted again
            # from the optimum alone (its full vector, nuisance included). The first fit
            # already tried the restarts a misfit asks for; a misfit that remains would
            # only repeat them from the optimum, which doubled the first snapshot's fit.
            model = self.model(
                moments, at=best, tolerance=template_tolerance, correction=correction
            )
            again = refine(model, counts, [], prior=self.prior, warm=fit.theta, max_iter=max_iter)
            fit = dataclasses.replace(
                again,
                iterations=fit.iterations + again.iterations,
                seconds=fit.seconds + again.seconds,
                second_minimum=again.second_minimum or fit.second_minimum,
                start=fit.start,
            )
        self.last_model = model
        return fit


def read_counts_file(
    path: str | Path, *, first: int | None = None
) -> tuple[NDArray[np.float64], dict[str, Any], list[float], list[float], BinMoments | None]:
    """The counts of a folded-run file (``steer fold --out``) for the refinement.

    Returns ``(counts, run_start, omegas, charges, moments)``: (n_q, n_E) counts of the
    whole run or of its first ``first`` orientations, the run start's metadata, the angles
    (deg) and proton charges (uC) of those orientations, and the moments the file holds
    for the whole run (None when it has none, or for ``first`` below the run's count).
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise RefinementError(f"no folded-run file at {path} (write one with steer fold --out)")
    try:
        with h5py.File(path, "r") as f:
            entry = f["entry"]
            meta = json.loads(str(entry.attrs.get("metadata", "{}")))
            run_start = meta.get("run_start")
            if not run_start:
                raise RefinementError(
                    f"{path} holds no run-start metadata: fold the run again with this "
                    "version of steer fold to refine it"
                )
            o = entry["orientations"]
            omegas = [float(w) for w in o["omega"][()]]
            charges = [float(c) for c in o["proton_charge"][()]]
            n = len(omegas)
            if first is not None and not 1 <= first <= n:
                raise RefinementError(f"{path} has {n} orientations; cannot take the first {first}")
            k = n if first is None else first
            if k == n:
                counts = np.asarray(entry["iqe/counts"][()], dtype=np.float64)
            else:
                counts = np.asarray(o["counts"][:k], dtype=np.float64).sum(axis=0)
            moments = None
            if k == n and "moments" in entry:
                g = entry["moments"]
                moments = BinMoments.from_arrays({name: g[name][()] for name in g}, prefix="")
    except (OSError, KeyError) as exc:
        raise RefinementError(f"{path} is not a folded-run file: {exc}") from exc
    return counts, dict(run_start), omegas[:k], charges[:k], moments


def file_binning(path: str | Path) -> dict[str, Any]:
    """How a folded-run file's counts are binned (``binning`` in its metadata, written by
    ``steer fold --binning``): ``{"kind": "path"}`` (also for files from before it was
    written), ``{"kind": "wedge", "mesh": m}`` or ``{"kind": "classes", "classes": n}``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            meta = json.loads(str(f["entry"].attrs.get("metadata", "{}")))
    except (OSError, KeyError, ValueError) as exc:
        raise RefinementError(f"{path} is not a folded-run file: {exc}") from exc
    binning = meta.get("binning") or {"kind": "path"}
    if binning.get("kind") not in ("path", "wedge", "classes"):
        raise RefinementError(f"{path} is binned as {binning!r}, which the refinement lacks")
    return dict(binning)


def run_moments(
    run_start: Mapping[str, Any],
    omegas: Sequence[float],
    charges: Sequence[float],
    refiner: RunRefiner,
    *,
    progress: bool = False,
) -> BinMoments:
    """The charge-weighted moments of a run's orientations, computed from its set-up at
    their angles rounded as the consumer rounds them
    (:func:`~consumers.reduction.pipeline.coverage_angle`)."""
    from tqdm import tqdm

    from consumers.reduction.folding import Folder
    from consumers.reduction.moments import orientation_moments, star_operations
    from consumers.reduction.pipeline import coverage_angle, run_folder

    if refiner.binning == "grid":
        raise RefinementError(
            "a run file's moments are made on its q-path, its wedge or its zone classes"
        )
    _, folder = run_folder(
        dict(run_start), tolerance=refiner.table.tolerance, wedge_mesh=refiner.wedge_mesh
    )
    if not isinstance(folder, Folder):
        raise RefinementError(
            "a powder run's S(|Q|, E) has no single-crystal moments: the likelihood "
            "refinement takes single-crystal runs"
        )
    ops = star_operations(folder, refiner.constants.operations)
    grid = refiner.grid
    out = BinMoments.zeros(grid.n_q * grid.n_e, refiner.constants.n_branches)
    classes = refiner.classes
    for w, c in tqdm(
        list(zip(omegas, charges, strict=True)),
        desc="moments",
        unit="orient",
        disable=not progress,
    ):
        out.add(
            orientation_moments(
                folder, refiner.constants, coverage_angle(w), inverse_ops=ops, classes=classes
            ),
            c,
        )
    return out


def refine_file(
    path: str | Path,
    start: Mapping[str, float] | None = None,
    *,
    first: int | None = None,
    spread: Mapping[str, float] | None = None,
    progress: bool = False,
) -> Refined:
    """Refine the force constants of a folded-run file (``steer fold --out``), from the
    whole run or its first ``first`` orientations, started from ``start`` (by name) whose
    uncertainty is ``spread`` (by name, eV/A^2; the step of the scan after a misfit)."""
    counts, _, _, _, moments, refiner = file_inputs(path, first, progress)
    return refiner.refine(counts, moments, start, spread=spread)


def file_inputs(
    path: str | Path, first: int | None, progress: bool
) -> tuple[NDArray[np.float64], dict[str, Any], list[float], list[float], BinMoments, RunRefiner]:
    """:func:`read_counts_file` with the moments made where the file has none, and the
    run's refiner."""
    counts, run_start, omegas, charges, moments = read_counts_file(path, first=first)
    binning = file_binning(path)
    refiner = RunRefiner.from_metadata(
        run_start,
        wedge_mesh=int(binning["mesh"]) if binning["kind"] == "wedge" else None,
        classes=binning["kind"] == "classes",
    )
    if moments is None:
        moments = run_moments(run_start, omegas, charges, refiner, progress=progress)
    return counts, run_start, omegas, charges, moments, refiner


#: (quantile level, standard-normal quantile) of a refined estimate's Gaussian quantiles.
_GAUSS_Q = (
    (0.05, -1.6448536),
    (0.16, -0.9944579),
    (0.5, 0.0),
    (0.84, 0.9944579),
    (0.95, 1.6448536),
)


def running_estimate(
    vae: dict[str, Any],
    refined: Refined | None = None,
    *,
    reason: str | None = None,
    binning: str | None = None,
) -> dict[str, Any]:
    """The running estimate of a snapshot, as the service, the replicas and the history
    keep it: the refined estimate (``source: "refined"``; every coefficient under ``fc``
    with Gaussian quantiles) when it converged, else the VAE's estimate (``source: "vae"``)
    with ``fallback`` saying why (never silently); both results under ``vae`` and
    ``refined``.

    ``vae`` is :meth:`model_server.inversion.inference.Estimate.to_dict` output;
    ``binning``, the refiner's (:attr:`RunRefiner.binning`: ``path``, ``classes``, ...), is
    kept in ``refined``.
    """
    summary = None if refined is None else refined.to_dict()
    if summary is not None and binning is not None:
        summary["binning"] = binning
    if refined is None or not refined.converged:
        out = vae | {"source": "vae", "vae": vae, "refined": summary}
        if refined is not None and not refined.converged:
            reason = reason or f"refinement did not converge in {refined.iterations} iterations"
        if reason:
            out["fallback"] = reason
        return out
    assert summary is not None
    fc = {
        n: {
            "mean": float(m),
            "std": float(sd),
            **{f"q{round(100 * q):02d}": float(m + z * sd) for q, z in _GAUSS_Q},
        }
        for n, m, sd in zip(refined.names, refined.mean, refined.std, strict=True)
    }
    return {
        "model_version": vae.get("model_version"),
        "source": "refined",
        "fc": fc,
        "units": "eV/A^2",
        "out_of_domain": vae.get("out_of_domain", False),
        "ood": vae.get("ood", {}),
        "deviance_per_dof": summary["deviance_per_dof"],
        "converged": True,
        "latency_ms": round(1e3 * refined.seconds, 3),
        "vae": vae,
        "refined": summary,
    }
