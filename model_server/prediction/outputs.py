"""The single-crystal and powder outputs of a prediction (``iqe``, ``detector``, ``powder``;
see :mod:`model_server.prediction.predict` for the physics and units). The ``dos`` and
``indirect`` outputs are :func:`model_server.prediction.spectra.phonon_dos` and
:func:`model_server.prediction.indirect.indirect_spectrum`.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
from numpy.typing import NDArray

from consumers.reduction.folding import Folder
from model_server.prediction.cache import (
    CAN,
    COMPONENT_SQE,
    FULL_SIMULATORS,
    POWDER,
    SAMPLE_TOTALS,
    Material,
    fold_table,
    instrument,
    phonon_table,
)
from model_server.prediction.expected import FoldSampler, GridSimulator, accessible, angle_bins
from model_server.prediction.request import PredictionError, PredictionOptions
from model_server.prediction.results import DetectorPrediction, IQEPrediction, PowderPrediction
from model_server.prediction.spectra import powder_spectrum
from simulations.exceptions import SimulationError
from simulations.instrument.events import OrientationSimulator
from simulations.instrument.spectrometer import Orientation, energy_to_k
from simulations.lattice.backgrounds import (
    COMPONENTS,
    Backgrounds,
    IncoherentScattering,
    elastic_line,
)
from simulations.lattice.sqe import CoherentSQE
from simulations.runs.can import aluminium_can
from simulations.runs.simulate import calibration_angles

__all__ = ["LEVEL_GROUP_ROWS", "POWDER_N_Q", "powder", "single_crystal"]

#: Super-pixel rows of the simulator that sets the time-of-flight background's level.
LEVEL_GROUP_ROWS = 16

#: Powder |Q| points.
POWDER_N_Q = 100


def single_crystal(
    mat: Material,
    model: CoherentSQE,
    ei: float,
    dispersion: NDArray[np.float64],
    options: PredictionOptions,
    seconds: dict[str, float],
) -> tuple[IQEPrediction | None, DetectorPrediction | None]:
    """The ``iqe`` and ``detector`` outputs (those asked for) of the orientations.

    Parameters
    ----------
    mat, model
        The crystal and its S(Q, E).
    ei
        Incident energy, meV.
    dispersion
        (n_q, n_branches) path energies, meV (stored with ``iqe``).
    options
        The request's settings (omegas, orientation vectors, outputs, angle step).
    seconds
        Timings to add to (``phonon_table``, ``fold_setup``, ``sqe``, ``fold``).
    """
    grid = mat.setup.grid
    outputs = options.outputs
    try:
        orientation = Orientation.from_vectors(mat.setup.crystal, options.u, options.v)
    except SimulationError as exc:
        raise PredictionError(str(exc)) from exc
    t = time.perf_counter()
    table = phonon_table(mat, model)
    seconds["phonon_table"] = time.perf_counter() - t
    ins = instrument()
    sim = GridSimulator(model, ins, orientation, ei, energy_edges=grid.energy_edges, table=table)
    t = time.perf_counter()
    sampler = None
    if "iqe" in outputs:
        folder = Folder(fold_table(mat), grid, ins, orientation, ei)
        sampler = FoldSampler(folder, sim.group_of_pixel, threads=min(4, os.cpu_count() or 1))
    seconds["fold_setup"] = time.perf_counter() - t
    t = time.perf_counter()
    comp_s = component_sqe(mat, sim, grid.energy_edges, options)
    weight = sim.cell_weights(grid.energy_edges)
    w_all = np.asarray(options.omegas, dtype=float)
    cal = set(calibration_angles(w_all).tolist())
    window_totals: list[float] = []  # the one-phonon signal on the grid, calibration angles
    seconds["components"] = time.perf_counter() - t
    cov = np.zeros(grid.shape)
    sig = np.zeros(grid.shape)
    comp_sig = {name: np.zeros(grid.shape) for name in comp_s}
    det_num: list[NDArray[np.float64]] = []
    if "detector" in outputs:
        edges, bin_of = angle_bins(sim.group_directions, options.detector_angle_step)
        n_bins = len(edges) - 1
        onehot = np.zeros((n_bins, sim.n_groups))
        onehot[bin_of, np.arange(sim.n_groups)] = sim.group_solid_angles
        den = onehot.sum(axis=1)[:, None] * sim.kf_over_ki[None, :]
    t_s = t_f = 0.0
    for omega in options.omegas:
        t = time.perf_counter()
        s_group = sim.sqe(float(omega))
        if float(omega) in cal:
            window_totals.append(float((s_group * weight).sum()))
        t_s += time.perf_counter() - t
        t = time.perf_counter()
        if sampler is not None:
            # the signal and every component in one walk over the fold's samples
            stack = np.stack([s_group, *comp_s.values()], axis=-1)
            c_w, s_w = sampler.fold(float(omega), stack)
            cov += c_w
            sig += s_w[0]
            for k, name in enumerate(comp_s):
                comp_sig[name] += s_w[k + 1]
        if "detector" in outputs:
            det_num.append(onehot @ (s_group * sim.kf_over_ki[None, :]))
        t_f += time.perf_counter() - t
    seconds["sqe"] = t_s
    seconds["fold"] = t_f
    if "tof_background" in comp_s:  # folded at one event: scaled now the signal is known
        t = time.perf_counter()
        level = tof_level(mat, sim, options, float(np.mean(window_totals)))
        comp_s = {**comp_s, "tof_background": comp_s["tof_background"] * level}
        comp_sig["tof_background"] = comp_sig["tof_background"] * level
        seconds["components"] += time.perf_counter() - t
    iqe = detector = None
    if "iqe" in outputs:
        iqe = IQEPrediction(
            intensity=_per_coverage(sig, cov),
            coverage=cov,
            signal=sig,
            dispersion=dispersion,
            components={k: _per_coverage(v, cov) for k, v in comp_sig.items()},
        )
    if "detector" in outputs:
        comp_det = {
            k: onehot @ (v * sim.kf_over_ki[None, :]) / np.where(den > 0, den, np.nan)
            for k, v in comp_s.items()
        }
        detector = _detector(np.stack(det_num), den, edges, ei, grid.energy_centres, comp_det)
    return iqe, detector


def _per_coverage(signal: NDArray[np.float64], cov: NDArray[np.float64]) -> NDArray[np.float64]:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cov > 0, signal / np.where(cov > 0, cov, 1.0), np.nan)


def component_sqe(
    mat: Material, sim: GridSimulator, edges: NDArray[np.float64], options: PredictionOptions
) -> dict[str, NDArray[np.float64]]:
    """The request's background components on the super-pixels, each (n_groups, n_E) in
    S units (mbarn/(sr meV) per atom), the same at every angle; cached.

    ``tof_background`` comes at the level of one event in all per orientation (the caller
    scales it: :func:`tof_level`).
    """
    wanted = options.backgrounds
    if not wanted:
        return {}
    key = (*_model_key(mat, sim), wanted, options.can_atoms, np.asarray(edges).tobytes())
    return COMPONENT_SQE.get(key, lambda: _component_sqe(sim, edges, options))


def _model_key(mat: Material, sim: GridSimulator) -> tuple[object, ...]:
    """What the components of a request's simulator depend on besides the request's own
    settings: the material, FCs, temperature, Ei and the crystal's mounting."""
    return (
        mat.key,
        np.asarray(sim.model.coefficients).tobytes(),
        sim.model.temperature,
        sim.ei,
        sim.orientation.lab_to_rlu_matrix(0.0).tobytes(),
    )


def _component_sqe(
    sim: GridSimulator, edges: NDArray[np.float64], options: PredictionOptions
) -> dict[str, NDArray[np.float64]]:
    wanted = options.backgrounds
    bg = _sample_backgrounds(options)
    centres = 0.5 * (edges[1:] + edges[:-1])
    can = None
    if bg.can:
        q_max = float(sim.q_magnitude(centres).max())
        can = CAN.get(
            (sim.model.temperature, sim.ei, np.asarray(edges).tobytes(), round(q_max, 3)),
            lambda: aluminium_can(
                sim.model.temperature, sim.model.resolution, q_max=q_max, energies=centres
            ),
        )
    parts = sim.components(bg, can=can, edges=edges)
    weight = sim.cell_weights(edges)
    out = {k: v / weight for k, v in parts.items()}
    if "tof_background" in wanted:
        out["tof_background"] = sim.flat_background(1.0, edges) / weight
    return {k: out[k] for k in COMPONENTS if k in out}


def _sample_backgrounds(options: PredictionOptions) -> Backgrounds:
    """The sample's components a request asks for (the time-of-flight background is the
    detector's, handled apart)."""
    wanted = options.backgrounds
    return Backgrounds(
        elastic="elastic" in wanted,
        multiphonon="multiphonon" in wanted,
        can="can" in wanted,
        can_atoms=options.can_atoms,
    )


def tof_level(
    mat: Material, sim: GridSimulator, options: PredictionOptions, window_signal: float
) -> float:
    """Events per orientation of the time-of-flight background, in the units of the expected
    counts (S x ``k_f/k_i dOmega dE``), as ``steer simulate run --background-fraction f``
    makes them: ``f / (1 - f)`` times the sample's events (one-phonon plus the sample's
    components over the simulator's whole energy window, energy gain included), averaged
    over the calibration angles of the request
    (:func:`simulations.runs.simulate.calibration_angles`) as the
    simulator calibrates a run.

    ``window_signal``: the mean one-phonon signal of those angles on the grid's energies.
    The whole window's is that times the ratio of the two at the first angle a set of FCs
    was asked for, and the components' totals, both from an event simulator with
    super-pixels of :data:`LEVEL_GROUP_ROWS` pixels (totals, not shapes: computed once per
    FCs, T and Ei and cached; the ratio changes by a few per cent between angles)."""
    bg = _sample_backgrounds(options)
    reach = bg.multiphonon or bg.can
    base = _model_key(mat, sim)
    full = FULL_SIMULATORS.get(
        (*base, reach),
        lambda: OrientationSimulator(
            sim.model,
            sim.instrument,
            sim.orientation,
            sim.ei,
            table=sim.table,
            e_top=0.95 * sim.ei if reach else None,
            group_rows=LEVEL_GROUP_ROWS,
        ),
    )

    def parts_total() -> float:
        can = None
        if bg.can:
            q_max = float(full.q_magnitude().max())
            can = aluminium_can(
                full.model.temperature, full.model.resolution, q_max=q_max, energies=full.e_centres
            )
        return float(sum(v.sum() for v in full.components(bg, can=can).values()))

    components = SAMPLE_TOTALS.get((*base, "components", bg), parts_total)
    omega = float(options.omegas[0])

    def window_ratio() -> float:
        lam = full.expected(omega)
        edges = np.asarray(mat.setup.grid.energy_edges)
        on_grid = (full.e_centres >= edges[0]) & (full.e_centres < edges[-1])
        inside = float(lam[:, on_grid].sum())
        return float(lam.sum()) / inside if inside > 0 else 1.0

    ratio = SAMPLE_TOTALS.get((*base, reach, "ratio"), window_ratio)
    f = options.background_fraction
    return float(f / (1.0 - f) * (ratio * window_signal + components))


def _detector(
    numerator: NDArray[np.float64],
    den: NDArray[np.float64],
    edges: NDArray[np.float64],
    ei: float,
    energies: NDArray[np.float64],
    components: dict[str, NDArray[np.float64]] | None = None,
) -> DetectorPrediction:
    """The ``detector`` output from its per-omega numerators (n_omega, n_angle, n_E) and
    denominators (n_angle, n_E), with the in-plane |Q| of every (angle, E) bin centre."""
    with np.errstate(invalid="ignore", divide="ignore"):
        det = numerator / np.where(den > 0, den, np.nan)[None]
    centres = 0.5 * (edges[1:] + edges[:-1])
    ki = float(energy_to_k(ei))
    kf = np.asarray(energy_to_k(ei - energies))
    qmag = np.sqrt(
        np.maximum(
            ki * ki
            + kf[None, :] ** 2
            - 2 * ki * kf[None, :] * np.cos(np.radians(centres))[:, None],
            0.0,
        )
    )
    return DetectorPrediction(
        angle_edges=edges, intensity=det, q_magnitude=qmag, components=components or {}
    )


def powder(
    mat: Material,
    model: CoherentSQE,
    c: NDArray[np.float64],
    ei: float,
    options: PredictionOptions,
) -> PowderPrediction:
    """The ``powder`` output: |Q| up to what the detector reaches at the grid's lowest E."""
    grid = mat.setup.grid
    ins = instrument()
    energies = grid.energy_centres
    cos_max = float(ins.directions[:, 2].min())
    ki = float(energy_to_k(ei))
    kf0 = float(energy_to_k(ei - float(grid.energy_edges[0])))
    q_top = math.sqrt(ki * ki + kf0 * kf0 - 2 * ki * kf0 * cos_max)
    q = (np.arange(POWDER_N_Q) + 0.5) * q_top / POWDER_N_Q
    key = (
        mat.key,
        np.asarray(c).tobytes(),
        options.temperature,
        ei,
        options.powder_directions,
        options.seed,
    )
    spectrum = POWDER.get(
        key,
        lambda: powder_spectrum(
            model, q, energies, directions=options.powder_directions, seed=options.seed
        ),
    )
    return PowderPrediction(
        q=q,
        intensity=spectrum,
        accessible=accessible(q, energies, ei, ins),
        directions=options.powder_directions,
        seed=options.seed,
        components=POWDER.get(
            (*key, "components", options.backgrounds, options.can_atoms),
            lambda: _powder_components(mat, model, q, grid.energy_edges, options),
        ),
    )


def _powder_components(
    mat: Material,
    model: CoherentSQE,
    q: NDArray[np.float64],
    edges: NDArray[np.float64],
    options: PredictionOptions,
) -> dict[str, NDArray[np.float64]]:
    """The sample's components of the powder output, (n_Q, n_E) each."""
    wanted = options.backgrounds
    energies = 0.5 * (edges[1:] + edges[:-1])
    step = float(edges[1] - edges[0])
    out: dict[str, NDArray[np.float64]] = {}
    line = elastic_line(energies, float(model.resolution.sigma(np.array(0.0))), step)
    if "elastic" in wanted or "multiphonon" in wanted:
        table = phonon_table(mat, model)
        inc = IncoherentScattering.from_modes(model, table.energies, table.eigenvectors)
        if "elastic" in wanted:
            out["elastic"] = inc.elastic(q[:, None], line[None, :])
        if "multiphonon" in wanted:
            out["multiphonon"] = inc.multiphonon(
                q[:, None], inc.broadened_orders(energies, model.resolution)
            )
    if "can" in wanted:
        key = (model.temperature, float(model.resolution.ei), edges.tobytes(), float(q[-1]))
        can = CAN.get(
            key,
            lambda: aluminium_can(
                model.temperature, model.resolution, q_max=float(q[-1]) + 0.1, energies=energies
            ),
        )
        s_can = can.inelastic(q[:, None] * np.ones((1, len(energies))))
        s_can = s_can + can.elastic(q[:, None], line[None, :], Backgrounds().ring_width)
        out["can"] = options.can_atoms * s_can
    return out
