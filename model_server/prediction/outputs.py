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
from model_server.prediction.cache import POWDER, Material, fold_table, instrument, phonon_table
from model_server.prediction.expected import FoldSampler, GridSimulator, accessible, angle_bins
from model_server.prediction.request import PredictionError, PredictionOptions
from model_server.prediction.results import DetectorPrediction, IQEPrediction, PowderPrediction
from model_server.prediction.spectra import powder_spectrum
from simulations.exceptions import SimulationError
from simulations.instrument.spectrometer import Orientation, energy_to_k
from simulations.lattice.sqe import CoherentSQE

__all__ = ["POWDER_N_Q", "powder", "single_crystal"]

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
    cov = np.zeros(grid.shape)
    sig = np.zeros(grid.shape)
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
    iqe = detector = None
    if "iqe" in outputs:
        with np.errstate(invalid="ignore", divide="ignore"):
            intensity = np.where(cov > 0, sig / np.where(cov > 0, cov, 1.0), np.nan)
        iqe = IQEPrediction(intensity=intensity, coverage=cov, signal=sig, dispersion=dispersion)
    if "detector" in outputs:
        detector = _detector(np.stack(det_num), den, edges, ei, grid.energy_centres)
    return iqe, detector


def _detector(
    numerator: NDArray[np.float64],
    den: NDArray[np.float64],
    edges: NDArray[np.float64],
    ei: float,
    energies: NDArray[np.float64],
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
    return DetectorPrediction(angle_edges=edges, intensity=det, q_magnitude=qmag)


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
    )
