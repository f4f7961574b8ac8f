"""Fold a recorded run offline: the same pipeline as the live consumer, reading a ``.steer``
file instead of Kafka (``steer fold``)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from consumers.exceptions import FoldError
from consumers.reduction.accumulate import RunAccumulator
from consumers.reduction.coverage_cache import coverage_cache_dir, coverage_disk_limit
from consumers.reduction.folding import Folder
from consumers.reduction.pipeline import (
    BLUESKY_SCHEMAS,
    MalformedMessage,
    RunPipeline,
    schema_of,
)
from consumers.reduction.powder import PowderFolder
from consumers.streams import InstrumentConfig
from consumers.wire import decode_bluesky, decode_f144
from simulations.instrument.spectrometer import Instrument
from simulations.runs.recording import RunReader
from simulations.units import K_B_MEV, THZ_TO_MEV

if TYPE_CHECKING:
    from simulations.lattice.materials import MaterialSetup

__all__ = ["fold_recorded_run", "precompute_coverages", "run_setup"]

logger = logging.getLogger(__name__)


def fold_recorded_run(
    path: str | Path,
    out: str | Path | None = None,
    *,
    mode: str = "auto",
    tolerance: float = 0.05,
    voxels: int = 96,
    progress: bool = True,
    check: bool = False,
    streams: InstrumentConfig | None = None,
    instrument_file: str | Path | None = None,
    wedge_mesh: int | None = None,
    zone_classes: bool = False,
) -> tuple[dict[str, object], RunAccumulator]:
    """Fold every counting step of a recorded run into I(q, E); optionally write HDF5.

    Parameters
    ----------
    mode
        Segmentation: ``"bluesky"`` (Event documents), ``"omega"`` (the omega log), or
        ``"auto"`` (bluesky when the run start names a bluesky topic).
    check
        Compare with the forward model of the run's true FC set (a simulated run):
        adds ``dispersion`` (see :func:`dispersion_check`).
    streams
        Which (topic, source) is which (:class:`consumers.streams.InstrumentConfig`); None
        tells streams apart by source name, as the simulator names them.
    instrument_file
        The pixel table or instrument definition (IDF) the run's instrument came from,
        when it is not where the run start says (nor, for an IDF, in the cache).
    wedge_mesh
        Bin on the whole irreducible wedge (the irreducible points of a Gamma-centred mesh
        of this many points per axis) instead of the q-path; the file records it
        (``binning`` in its metadata) for ``steer estimate --refine --wedge``.
    zone_classes
        Split the q-path's bins by the structure-factor class of each event's zone
        (:meth:`~consumers.reduction.folding.Folder.fold_classes`; ``binning`` kind
        ``classes``), for ``steer estimate --refine --binned``.

    Returns
    -------
    summary
        ``{"orientations", "events_folded", "events_dropped", "seconds",
        "events_per_second"}`` plus ``dropped_by_reason``, ``malformed``, ``segmentation``,
        ``grid_fingerprint``, ``path`` (when ``out`` is given) and ``dispersion`` (with
        ``check``).
    accumulator
        The run's counts and exposure (split by zone class with ``zone_classes``).
    """
    t0 = time.perf_counter()
    pipe = RunPipeline(
        mode=mode,
        tolerance=tolerance,
        voxels=voxels,
        streams=streams,
        instrument_file=instrument_file,
        wedge_mesh=wedge_mesh,
        zone_classes=zone_classes,
    )
    pipe.split_orientations = True  # the file keeps every orientation's split counts
    malformed: Counter[str] = Counter()
    refused_start = ""  # why the last run start could not be used
    bar = tqdm(desc="orientations", unit="orient", disable=not progress)
    with RunReader(path) as reader:
        for i, msg in enumerate(reader):
            try:
                done = pipe.handle(
                    schema_of(msg.headers, msg.payload),
                    msg.payload,
                    msg.timestamp_ns,
                    topic=msg.topic,
                )
            except MalformedMessage as exc:
                logger.warning("%s: message %d on %s skipped: %s", path, i, msg.topic, exc)
                malformed[exc.reason] += 1
                if exc.reason == "malformed_pl72":
                    refused_start = str(exc)
                continue
            bar.update(len(done))
    bar.update(len(pipe.finish()))
    bar.close()
    pipe.close()
    if pipe.acc is None:
        if refused_start:
            raise FoldError(f"{path}: the run start (pl72) cannot be used: {refused_start}")
        raise FoldError(f"{path}: no run start (pl72) found")
    seconds = time.perf_counter() - t0
    result = pipe.summary()
    result.update(
        {
            "seconds": round(seconds, 3),
            "events_per_second": pipe.n_events / seconds if seconds > 0 else 0.0,
            "malformed": dict(malformed),
            "run": _run_facts(pipe.meta or {}),
        }
    )
    order = ["orientations", "events_folded", "events_dropped", "seconds", "events_per_second"]
    result = {k: result[k] for k in order} | {k: v for k, v in result.items() if k not in order}
    if out is not None:
        meta = pipe.meta or {}
        binning: dict[str, object] = {"kind": "path"}
        if wedge_mesh is not None:
            binning = {"kind": "wedge", "mesh": wedge_mesh}
        elif pipe.classes is not None:
            binning = {"kind": "classes", "classes": pipe.classes.n_classes}
        (pipe.acc if pipe.split is None else pipe.split).write_hdf5(
            out,
            metadata={
                "source": str(path),
                "run": meta.get("run_id"),
                "run_start": meta,
                "binning": binning,
            },
        )
        result["path"] = str(out)
    if check and getattr(pipe.acc.grid, "kind", "") == "powder":
        assert pipe.folder is not None
        result["powder_check"] = powder_check(
            pipe.acc, pipe.meta or {}, instrument=pipe.folder.instrument
        )
    elif check:
        assert pipe.folder is not None
        result["dispersion"] = dispersion_check(
            pipe.acc, pipe.meta or {}, instrument=pipe.folder.instrument
        )
    return result, (pipe.acc if pipe.split is None else pipe.split)


def _run_facts(meta: dict[str, Any]) -> dict[str, Any]:
    """The run's id, material and temperature, and for a simulated run the true FC
    coefficients (eV/A^2, the pl72 ``simulation`` block)."""
    sim = meta.get("simulation")
    truth = sim.get("coefficients") if isinstance(sim, dict) else None
    return {
        "run_id": meta.get("run_id"),
        "material": meta.get("material"),
        "temperature_K": meta.get("temperature_K"),
        "truth": dict(truth) if isinstance(truth, dict) else None,
    }


def dispersion_check(
    acc: RunAccumulator,
    meta: dict[str, object],
    *,
    min_counts: int = 50,
    instrument: Instrument | None = None,
) -> dict[str, object]:
    """Compare a folded run with the forward model of the FC set it was simulated from.

    ``instrument``: the run's (default: rebuilt from ``meta``; only its resolution is used).

    Needs the ground truth of a simulated run (pl72 metadata ``simulation.coefficients``).
    Two figures:

    * ``pearson``: Pearson correlation of the folded I(q, E) with the forward-model
      I(q, E) (:meth:`simulations.lattice.forward.ForwardModel.spectra`, exact broadening) over
      the measured bins; ``pearson_column_normalised`` after scaling every q column of
      both to unit sum. The forward model has no eigenvectors, Debye-Waller or Bose
      factor (the seed paper's training model), while the data do, so the raw figure is
      lowered by the intensity weights and the normalised one shows the dispersion;
      ``pearson_per_column_median`` is the median over q columns with at least
      ``min_counts`` counts, and ``pearson_column_normalised_1_over_e`` weights the
      model by 1/E (the one-phonon cross-section's 1/omega, the largest of the factors
      the training model leaves out); ``pearson_bose_corrected`` multiplies the data by
      E (1 - exp(-E / kT)) (the thermal and 1/omega factors divided out: a standard,
      model-independent conversion that needs only E and the sample temperature) and
      compares with the raw forward model over the measured bins with E > 0;
    * ``fraction_on_branch``: q columns with at least ``min_counts`` counts whose
      strongest bin lies within ``max(2 sigma(E), bin width)`` of a forward-model branch.

    Both leave out the elastic line's bins (energies up to
    :func:`simulations.lattice.backgrounds.elastic_reach`).

    Raises
    ------
    FoldError
        When the run carries no ground truth.
    """
    from simulations.lattice.backgrounds import elastic_reach
    from simulations.runs.check import peaks_on_branches

    ms, model, branches = _ground_truth(meta)
    snap = acc.snapshot()
    ec = ms.grid.energy_centres
    ins = instrument or Instrument.from_metadata(dict(meta["instrument"]))  # type: ignore[call-overload]
    ei = float(meta["ei_meV"])  # type: ignore[arg-type]
    resolution = ins.resolution(ei, e_max=min(float(ms.grid.energy_edges[-1]), 0.95 * ei))
    sigma = resolution.sigma
    # the elastic line (simulated runs have it by default) is no phonon: its bins are out
    inelastic = ec > elastic_reach(resolution)
    mask = snap.mask & inelastic[None, :]
    data = np.where(mask, snap.intensity, np.nan)
    model = np.where(mask, model, np.nan)
    # (unmeasured bins hold no counts, so the peak of a checked column is a measured bin)
    checked, _, on_branch = peaks_on_branches(
        ec[inelastic], snap.counts[:, inelastic], branches, sigma, min_counts=min_counts
    )
    per_column = [
        r
        for i in np.nonzero(checked)[0]
        if (r := _pearson(data[i][mask[i]], model[i][mask[i]])) is not None
    ]
    weighted = model / np.maximum(np.abs(ec), ec[1] - ec[0])[None, :]
    # E (1 - exp(-E / kT)) = E / (n(E) + 1): divides out the one-phonon cross-section's
    # Bose and 1/omega factors, from E and the sample temperature alone (E > 0 only)
    kt = K_B_MEV * float(meta.get("temperature_K", 5.0))  # type: ignore[arg-type]
    positive = ec > 0
    bose = np.where(positive, ec * -np.expm1(-np.where(positive, ec, 1.0) / kt), np.nan)
    corrected = data * bose[None, :]
    return {
        "pearson": _pearson(data, model),
        "pearson_bose_corrected": _pearson(corrected, model),
        "pearson_column_normalised": _pearson(_unit_columns(data), _unit_columns(model)),
        "pearson_per_column_median": float(np.median(per_column)) if per_column else None,
        "pearson_column_normalised_1_over_e": _pearson(
            _unit_columns(data), _unit_columns(weighted)
        ),
        "bins_measured": int(mask.sum()),
        "columns_checked": int(checked.sum()),
        "columns_on_branch": int(on_branch.sum()),
        "fraction_on_branch": float(on_branch.sum() / max(1, checked.sum())),
    }


def powder_check(
    acc: RunAccumulator,
    meta: dict[str, object],
    *,
    min_counts: int = 20,
    instrument: Instrument | None = None,
) -> dict[str, object]:
    """Compare a folded powder run with the coherent one-phonon powder average of the FC
    set it was simulated from (:func:`simulations.lattice.powder.powder_shells` averaged
    over each |Q| bin with the run's |Q| resolution, times the exposure, scaled to the
    counts of the compared bins).

    Compared: bins with at least ``min_counts`` counts above the elastic line
    (:func:`~simulations.lattice.backgrounds.elastic_reach`). Returns ``chi2_per_bin``
    (Poisson, against the scaled model), ``pearson`` of the intensity with S(|Q|, E),
    ``median_relative_deviation`` and ``bins_compared``. A run with background
    components (multiphonon, can, the flat background) departs from the one-phonon model
    by them: its chi^2 says how much.

    Raises
    ------
    FoldError
        When the run carries no ground truth.
    """
    from simulations.lattice.backgrounds import elastic_reach
    from simulations.lattice.materials import setup
    from simulations.lattice.powder import POWDER_Q_SIGMA, powder_shells
    from simulations.lattice.sqe import CoherentSQE

    sim = meta.get("simulation")
    truth = sim.get("coefficients") if isinstance(sim, dict) else None
    if not truth:
        raise FoldError("the run has no ground truth (pl72 metadata 'simulation' block)")
    ms = setup(str(meta["material"]))
    ins = instrument or Instrument.from_metadata(dict(meta["instrument"]))  # type: ignore[call-overload]
    ei = float(meta["ei_meV"])  # type: ignore[arg-type]
    model = CoherentSQE(
        ms.basis,
        ms.basis.coefficients_from_dict(dict(truth)),
        temperature=float(meta.get("temperature_K", 5.0)),  # type: ignore[arg-type]
        resolution=ins.resolution(ei),
    )
    grid = acc.grid
    assert isinstance(sim, dict)
    q_sigma = float(sim.get("powder_q_sigma_inv_angstrom", POWDER_Q_SIGMA))
    s = powder_shells(
        model,
        grid.q_centres,  # type: ignore[union-attr]
        grid.energy_centres,
        q_sigma=q_sigma,
        bins=True,
    )
    inelastic = grid.energy_centres > elastic_reach(model.resolution)
    mu = s * acc.exposure
    use = (acc.counts >= min_counts) & inelastic[None, :] & (mu > 1e-9 * mu.max())
    if use.sum() < 3:
        return {"bins_compared": int(use.sum()), "chi2_per_bin": None, "pearson": None}
    mu = mu * acc.counts[use].sum() / mu[use].sum()
    snap = acc.snapshot()
    return {
        "chi2_per_bin": float(((acc.counts[use] - mu[use]) ** 2 / mu[use]).mean()),
        "pearson": _pearson(snap.intensity[use], s[use]),
        "median_relative_deviation": float(np.median(np.abs(acc.counts[use] - mu[use]) / mu[use])),
        "bins_compared": int(use.sum()),
    }


def _ground_truth(meta: dict[str, object]) -> tuple[MaterialSetup, np.ndarray, np.ndarray]:
    """The material set-up of a simulated run and the forward model of the FC set it was
    simulated from: (set-up, (n_q, n_E) I(q, E) with exact broadening, (n_q, n_branches)
    branch energies in meV). Raises :class:`FoldError` when the run has no ground truth."""
    import torch

    from simulations.lattice.materials import setup

    sim = meta.get("simulation")
    truth = sim.get("coefficients") if isinstance(sim, dict) else None
    if not truth:
        raise FoldError("the run has no ground truth (pl72 metadata 'simulation' block)")
    ms = setup(str(meta["material"]))
    coefficients = ms.basis.coefficients_from_dict(dict(truth))
    fm = ms.forward_model(dtype=torch.float64, method="exact")
    with torch.no_grad():
        model = fm.spectra(coefficients[None]).intensity[0].numpy()
        branches = fm.frequencies(coefficients[None])[0].numpy() * THZ_TO_MEV
    return ms, model, branches


def _unit_columns(a: np.ndarray) -> np.ndarray:
    """``a`` with every q column (row) scaled to unit sum (NaN ignored; zero sums kept)."""
    s = np.nansum(a, axis=1, keepdims=True)
    return np.asarray(a / np.where(s > 0, s, 1.0))


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation over the bins finite in both; None for fewer than 3 such bins or
    a constant side."""
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return None
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def run_setup(
    path: str | Path,
    *,
    mode: str = "auto",
    tolerance: float = 0.05,
    voxels: int = 96,
    streams: InstrumentConfig | None = None,
) -> tuple[Folder | PowderFolder, list[float]]:
    """The folder of a recorded run's set-up (its run start: material, instrument, UB, Ei)
    and the goniometer angles it counted at, in order (the omega log's setpoints and the
    bluesky Event documents' omegas, by the segmentation ``mode`` as the consumer chooses
    it; each once). Event data are not read. A powder run has no angles: its folder and
    ``[0.0]`` (its one coverage)."""
    pipe = RunPipeline(mode=mode, tolerance=tolerance, voxels=voxels, streams=streams)
    setpoints: dict[float, None] = {}
    events: dict[float, None] = {}
    with RunReader(path) as reader:
        for msg in reader:
            schema = schema_of(msg.headers, msg.payload)
            try:
                if schema == "pl72" and pipe.folder is None:
                    pipe.handle(schema, msg.payload, msg.timestamp_ns)
                elif schema == "f144":
                    source, value, _ = decode_f144(msg.payload)
                    role = pipe.role(msg.topic, source)
                    if role == "goniometer_setpoint" and np.isfinite(float(value)):  # type: ignore[arg-type]
                        setpoints[float(value)] = None  # type: ignore[arg-type]
                elif schema in BLUESKY_SCHEMAS and not isinstance(pipe.folder, PowderFolder):
                    name, doc = decode_bluesky(schema, msg.payload)
                    if name == "event" and np.isfinite(float(doc["data"]["omega"])):
                        events[float(doc["data"]["omega"])] = None
            except Exception as exc:  # the consumer would dead-letter it: so do we
                logger.warning("%s: message on %s skipped: %s", path, msg.topic, exc)
    pipe.close()
    if pipe.folder is None:
        raise FoldError(f"{path}: no usable run start (pl72) found")
    assert pipe.segmenter is not None
    if isinstance(pipe.folder, PowderFolder):
        return pipe.folder, [0.0]
    return pipe.folder, list(events if pipe.segmenter.mode == "bluesky" else setpoints)


def precompute_coverages(
    folder: Folder | PowderFolder, angles: list[float], *, progress: bool = True
) -> dict[str, object]:
    """Put the coverage of every angle of ``folder``'s set-up into the disk cache (see
    :meth:`Folder.coverage`), so that the consumers of its runs read them and compute
    none. Returns ``{"angles", "computed", "already_cached", "seconds", "cache_dir",
    "signature"}``."""
    if coverage_disk_limit() <= 0:
        raise FoldError(
            "the disk cache of coverages is off (STEER_COVERAGE_CACHE_MB=0): nothing to fill"
        )
    t0 = time.perf_counter()
    computed = 0
    for omega in tqdm(angles, desc="coverage", unit="angle", disable=not progress):
        if folder.on_disk(omega):  # Folder.coverage refuses a non-finite angle
            continue
        folder.coverage(float(omega))
        computed += 1
    return {
        "angles": len(angles),
        "computed": computed,
        "already_cached": len(angles) - computed,
        "seconds": round(time.perf_counter() - t0, 3),
        "cache_dir": str(coverage_cache_dir()),
        "signature": folder.signature,
    }
