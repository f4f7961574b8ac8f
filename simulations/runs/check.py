"""Read a recorded run back, bin it simply, and compare with the dispersion it was made from.

This is a reference decoder for tests and for ``steer simulate check-run``: it trusts the
bluesky Event documents for the counting windows and needs the whole run, unlike the
streaming consumers. It shows that a recorded run carries everything needed to rebuild
the geometry (pl72 metadata) and that the simulated events show the right physics.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray
from streaming_data_types.eventdata_ev44 import deserialise_ev44
from streaming_data_types.run_start_pl72 import deserialise_pl72
from tqdm import tqdm

from simulations.exceptions import RecordingError
from simulations.instrument.binning import ReferenceBinning
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.backgrounds import elastic_reach
from simulations.lattice.materials import MaterialSetup, setup
from simulations.runs.recording import RunReader
from simulations.units import THZ_TO_MEV

__all__ = ["OrientationEvents", "check_run", "iter_orientations", "peaks_on_branches"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class OrientationEvents:
    """The events of one counting step, as read back from a recorded run.

    Attributes
    ----------
    omega
        Goniometer readback from the bluesky Event, degrees.
    pixel_id, tof_ns
        (n,) int32 each.
    proton_charge
        uC over the step.
    """

    omega: float
    pixel_id: NDArray[np.int32]
    tof_ns: NDArray[np.int32]
    proton_charge: float


def iter_orientations(path: str | Path) -> Iterator[tuple[dict[str, Any], OrientationEvents]]:
    """Yield ``(run_start_metadata, events)`` per counting step of a recorded run.

    Events between steps (goniometer moving) are left out.
    """
    meta: dict[str, Any] | None = None
    pending: list[tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.int32]]] = []
    with RunReader(path) as reader:
        for msg in reader:
            schema = dict(msg.headers).get("schema", b"").decode()
            if not schema and msg.payload[:1] == b"\x92":  # bluesky-kafka's msgpack (name, doc)
                schema = "bluesky-msgpack"
            if schema == "pl72":
                meta = json.loads(deserialise_pl72(msg.payload).metadata)
            elif schema == "ev44":
                ev = deserialise_ev44(msg.payload)
                counts = np.diff(np.append(ev.reference_time_index, len(ev.time_of_flight)))
                pulse = np.repeat(np.asarray(ev.reference_time, dtype=np.int64), counts)
                pending.append((pulse, ev.time_of_flight, ev.pixel_id))
            elif schema in ("bluesky-json", "bluesky-msgpack"):
                # plain msgpack: no msgpack_numpy hook, so nothing is ever unpickled
                pair = (
                    json.loads(msg.payload)
                    if schema == "bluesky-json"
                    else msgpack.unpackb(msg.payload, raw=False)
                )
                name, doc = pair
                if name != "event":
                    continue
                if meta is None:
                    raise RecordingError(f"{path}: bluesky Event before the pl72 run start")
                data = doc["data"]
                lo, hi = int(data["count_start_ns"]), int(data["count_stop_ns"])
                pix, tof = [], []
                for pulse, t, p in pending:
                    sel = (pulse >= lo) & (pulse < hi)
                    pix.append(p[sel])
                    tof.append(t[sel])
                pending = [x for x in pending if x[0].size and x[0][-1] >= hi]
                yield (
                    meta,
                    OrientationEvents(
                        omega=float(data["omega"]),
                        pixel_id=np.concatenate(pix) if pix else np.zeros(0, np.int32),
                        tof_ns=np.concatenate(tof) if tof else np.zeros(0, np.int32),
                        proton_charge=float(data["proton_charge"]),
                    ),
                )


@dataclass(slots=True, kw_only=True)
class _Context:
    setup: MaterialSetup
    instrument: Instrument
    orientation: Orientation
    ei: float
    binning: ReferenceBinning
    truth: dict[str, float]
    hist: NDArray[np.float64]

    @classmethod
    def from_metadata(
        cls, meta: dict[str, Any], tolerance: float, instrument_file: str | Path | None = None
    ) -> _Context:
        ms = setup(str(meta["material"]))
        o = meta["orientation"]
        return cls(
            setup=ms,
            instrument=Instrument.from_metadata(meta["instrument"], instrument_file),
            orientation=Orientation.from_vectors(ms.crystal, tuple(o["u"]), tuple(o["v"])),
            ei=float(meta["ei_meV"]),
            binning=ReferenceBinning(ms.crystal, ms.grid, tolerance),
            truth=dict(meta.get("simulation", {}).get("coefficients", {})),
            hist=np.zeros(ms.grid.shape),
        )


def peaks_on_branches(
    energy_centres: NDArray[np.float64],
    counts: NDArray[np.float64],
    branches_mev: NDArray[np.float64],
    sigma: Callable[[NDArray[np.float64]], NDArray[np.float64]],
    *,
    min_counts: int = 50,
) -> tuple[NDArray[np.bool_], NDArray[np.float64], NDArray[np.bool_]]:
    """Whether each q column's strongest bin lies on a branch.

    ``counts`` (n_q, n_E), ``branches_mev`` (n_q, n_branches) in meV, ``sigma(E)`` the
    energy resolution (meV). A column with at least ``min_counts`` counts is *checked*;
    it passes when its peak energy lies within ``max(2 sigma(E), bin width)`` of a
    branch. Returns ``(checked, distance_meV, passing)``, each (n_q,).
    """
    checked = counts.sum(axis=1) >= min_counts
    peak = energy_centres[np.argmax(counts, axis=1)]
    dist = np.min(np.abs(branches_mev - peak[:, None]), axis=1)
    tol = np.maximum(2 * sigma(peak), energy_centres[1] - energy_centres[0])
    return checked, dist, checked & (dist <= tol)


def check_run(
    path: str | Path,
    *,
    tolerance: float = 0.05,
    min_counts: int = 50,
    out: str | Path | None = None,
    progress: bool = True,
    pixel_table: str | Path | None = None,
    instrument_file: str | Path | None = None,
) -> dict[str, object]:
    """Bin a recorded run onto its material's q-path; test each q column's peak.

    A column with at least ``min_counts`` events (above the elastic line: energies over
    :func:`simulations.lattice.backgrounds.elastic_reach`) passes when the energy of its
    largest bin there lies within ``max(2 sigma(E), bin width)`` of a branch of the
    forward model for the run's true FC set (from the pl72 ``simulation`` block).

    ``pixel_table`` or ``instrument_file`` (a Mantid IDF or a pixel table): the file the
    run's instrument came from, when it is not where the run start says (see
    :meth:`Instrument.from_metadata`).

    Returns a JSON-ready dict: ``orientations``, ``events``, ``events_on_path``,
    ``columns_checked``, ``columns_passing``, ``fraction_passing``, ``max_distance_meV``
    and ``plot`` when ``out`` is given.
    """
    import torch

    n_orient = n_events = 0
    ctx: _Context | None = None
    bar = tqdm(desc="orientations", unit="orient", disable=not progress)
    for meta, chunk in iter_orientations(path):
        if ctx is None:
            ctx = _Context.from_metadata(meta, tolerance, instrument_file or pixel_table)
        q, e = ctx.instrument.event_to_qe(
            ctx.instrument.index_of(chunk.pixel_id), chunk.tof_ns, ctx.ei
        )
        ctx.hist += ctx.binning.histogram(ctx.orientation.lab_to_rlu(q, chunk.omega), e)
        n_orient += 1
        n_events += len(chunk.pixel_id)
        bar.update(1)
    bar.close()
    if ctx is None:
        raise RecordingError(f"{path} holds no counting steps")
    if not ctx.truth:
        raise RecordingError(f"{path} has no ground truth (pl72 metadata 'simulation' block)")
    ms, hist, truth = ctx.setup, ctx.hist, ctx.truth
    c = ms.basis.coefficients_from_dict(truth)
    fm = ms.forward_model(dtype=torch.float64, method="exact")
    with torch.no_grad():
        branches = fm.frequencies(c[None])[0].numpy() * THZ_TO_MEV
    resolution = ctx.instrument.resolution(
        ctx.ei, e_max=min(ms.grid.energy_edges[-1], 0.95 * ctx.ei)
    )
    # the elastic line (on by default in simulated runs) is no phonon: its bins are left out
    inelastic = ms.grid.energy_centres > elastic_reach(resolution)
    checked, dist, passing = peaks_on_branches(
        ms.grid.energy_centres[inelastic],
        hist[:, inelastic],
        branches,
        resolution.sigma,
        min_counts=min_counts,
    )
    result: dict[str, object] = {
        "orientations": n_orient,
        "events": n_events,
        "events_on_path": int(hist.sum()),
        "columns_checked": int(checked.sum()),
        "columns_passing": int(passing.sum()),
        "fraction_passing": float(passing.sum() / max(1, checked.sum())),
        "max_distance_meV": float(dist[checked].max()) if checked.any() else None,
    }
    if out is not None:
        from simulations.plotting import plot_dispersion

        shown = np.log10(1.0 + hist)
        plot_dispersion(
            ms.grid,
            shown,
            branches / THZ_TO_MEV,
            out,
            title=f"{Path(path).name}: {n_events:,} events, reference binning (log counts)",
        )
        result["plot"] = str(out)
    return result
