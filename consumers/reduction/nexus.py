"""The folded run as a NeXus file (HDF5) that facility readers (scippnexus, Mantid) accept.

Layout (``docs/outputs.md``)::

    entry                 NXentry   attrs grid_fingerprint, metadata (JSON), default = "iqe"
      title, start_time?  run id; program_name
      iqe                 NXdata    signal = "intensity", axes = ["q", "energy"],
                                    q_indices = 0, energy_indices = 1, q_index_indices = 0
        intensity         (n_q, n_E) 1/(uC*sr*meV), NaN where unmeasured
        intensity_errors  (n_q, n_E) its Poisson standard deviation, same unit
        variance          (n_q, n_E) (1/(uC*sr*meV))**2 (kept for this project's readers)
        counts, exposure  (n_q, n_E) counts, uC*sr*meV
        mask              (n_q, n_E) bool, True where measured
        q                 (n_q,) distance along the q-path, 1/angstrom; for a powder
                          (entry attribute sample_kind = "powder") the (n_q + 1,) |Q|
                          bin edges, 1/angstrom
        q_index           (n_q,) index of the q-path point (not for a powder)
        energy            (n_E,) bin centres, meV
      sample              NXsample  name, chemical_formula, unit_cell_abc (angstrom),
                                    unit_cell_alphabetagamma (deg), unit_cell (1, 6),
                                    ub_matrix, orientation_matrix (3, 3), space_group,
                                    temperature (K)
      instrument          NXinstrument  name; fermi_chopper (NXfermi_chopper) energy = Ei
                                    (meV); detector (NXdetector) description, n_pixels,
                                    distance = L1 (m)
        <monitor source>  NXmonitor  per beam monitor: integral (counts over the folded
                                    orientations), orientation_counts (n_orient,) counts,
                                    orientation_incomplete (n_orient,) bool (its stream
                                    stopped before the orientation's end)
      process             NXprocess program, version, date, git_commit
      grid, orientations, moments   NXcollection (this project's own, as before);
                          orientations holds proton_charge (uC), monitor_counts
                          (n_orient, n_mon) with attribute sources, monitor_total, weight
                          (the exposure weight, uC or counts) and normalised

``entry`` carries the attribute ``normalisation`` (``proton_charge`` or ``monitor``, with
``normalisation_monitor``); normalised by a monitor, intensity is in counts per monitor
count, ``1/(sr*meV)`` (:data:`IQE_UNIT_MONITOR`), and exposure in ``counts*sr*meV``.

The sample and instrument groups are written from the run start (pl72 metadata) when it
is given; without it they hold what the accumulator knows.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["IQE_UNIT", "IQE_UNIT_MONITOR", "chemical_formula", "write_nexus"]

#: Unit of I(q, E) = counts / exposure, as scipp and udunits read it.
IQE_UNIT = "1/(uC*sr*meV)"
#: Unit of I(q, E) normalised by a beam monitor: counts per monitor count per sr meV.
IQE_UNIT_MONITOR = "1/(sr*meV)"


def chemical_formula(species: list[str]) -> str:
    """The Hill formula of a cell's species (``["Ge", "Ge"]`` -> ``"Ge"``), reduced."""
    counts = Counter(str(s) for s in species)
    if not counts:
        return ""
    divisor = math.gcd(*counts.values())
    order = sorted(counts, key=lambda e: (e != "C", e != "H" or "C" not in counts, e))
    return "".join(f"{e}{counts[e] // divisor if counts[e] // divisor > 1 else ''}" for e in order)


def _text(group: Any, name: str, value: str) -> None:
    group.create_dataset(name, data=str(value))


def _sample(entry: Any, run_start: dict[str, Any]) -> None:
    s = entry.create_group("sample")
    s.attrs["NX_class"] = "NXsample"
    crystal = run_start.get("crystal") or {}
    orientation = run_start.get("orientation") or {}
    _text(s, "name", str(run_start.get("material") or crystal.get("name") or "unknown"))
    if crystal.get("species"):
        _text(s, "chemical_formula", chemical_formula(list(crystal["species"])))
    if crystal.get("spacegroup"):
        _text(s, "space_group", str(crystal["spacegroup"]))
    abc = orientation.get("lattice_abc_A")
    angles = orientation.get("lattice_angles_deg")
    if abc is not None and angles is not None:
        s.create_dataset("unit_cell_abc", data=np.asarray(abc, float)).attrs["units"] = "angstrom"
        s.create_dataset("unit_cell_alphabetagamma", data=np.asarray(angles, float)).attrs[
            "units"
        ] = "deg"
        s.create_dataset("unit_cell", data=np.asarray([[*abc, *angles]], float))
    ub = orientation.get("ub_matrix")
    if ub is not None:
        ub = np.asarray(ub, float)
        s.create_dataset("ub_matrix", data=ub).attrs["units"] = "1/angstrom"
        # NXsample's orientation_matrix is U; without B apart we record UB and say so
        om = s.create_dataset("orientation_matrix", data=ub)
        om.attrs["description"] = "UB (Busing-Levy, no 2 pi), as ub_matrix"
        for name in ("u", "v"):
            if orientation.get(name) is not None:
                s.create_dataset(f"{name}_vector", data=np.asarray(orientation[name], float))
    kind = str(run_start.get("sample_kind", "single_crystal"))
    _text(s, "physical_form", "powder" if kind == "powder" else "single crystal")
    if abc is None and crystal.get("conventional_abc_A") is not None:  # a powder: no UB
        s.create_dataset(
            "unit_cell_abc", data=np.asarray(crystal["conventional_abc_A"], float)
        ).attrs["units"] = "angstrom"
    if run_start.get("temperature_K") is not None:
        t = s.create_dataset("temperature", data=float(run_start["temperature_K"]))
        t.attrs["units"] = "K"


def _instrument(entry: Any, run_start: dict[str, Any]) -> None:
    ins_meta = run_start.get("instrument") or {}
    ins = entry.create_group("instrument")
    ins.attrs["NX_class"] = "NXinstrument"
    _text(ins, "name", str(ins_meta.get("name", "unknown")))
    if run_start.get("ei_meV") is not None:
        chopper = ins.create_group("fermi_chopper")
        chopper.attrs["NX_class"] = "NXfermi_chopper"
        chopper.create_dataset("energy", data=float(run_start["ei_meV"])).attrs["units"] = "meV"
        if ins_meta.get("chopper_frequency_Hz") is not None:
            chopper.create_dataset(
                "rotation_speed", data=float(ins_meta["chopper_frequency_Hz"])
            ).attrs["units"] = "Hz"
    det = ins.create_group("detector")
    det.attrs["NX_class"] = "NXdetector"
    layout = ins_meta.get("layout")
    _text(det, "description", json.dumps(layout) if isinstance(layout, dict) else str(layout))
    if ins_meta.get("n_pixels") is not None:
        det.create_dataset("n_pixels", data=int(ins_meta["n_pixels"]))
    if ins_meta.get("l1_m") is not None:
        det.create_dataset("distance", data=float(ins_meta["l1_m"])).attrs["units"] = "m"


def _monitors(entry: Any, records: list[Any]) -> None:
    """An NXmonitor per beam-monitor source of the records, in the instrument group."""
    ins = entry["instrument"]
    sources = sorted({m for r in records for m in getattr(r, "monitor_counts", {})})
    for source in sources:
        name = "".join(c if c.isalnum() or c in "_-." else "_" for c in source)
        g = ins.create_group(name if name not in ins else f"monitor_{name}")
        g.attrs["NX_class"] = "NXmonitor"
        _text(g, "source_name", source)
        counts = np.asarray([r.monitor_counts.get(source, 0) for r in records], np.int64)
        g.create_dataset("integral", data=int(counts.sum())).attrs["units"] = "counts"
        g.create_dataset("orientation_counts", data=counts).attrs["units"] = "counts"
        g.create_dataset(
            "orientation_incomplete",
            data=np.asarray([source in r.monitor_incomplete for r in records], bool),
        )


def _process(entry: Any) -> None:
    from simulations.provenance import git_commit, package_version

    p = entry.create_group("process")
    p.attrs["NX_class"] = "NXprocess"
    _text(p, "program", "steer")
    _text(p, "version", package_version("ins-steering"))
    _text(p, "date", datetime.now(UTC).isoformat(timespec="seconds"))
    _text(p, "git_commit", git_commit())


def write_nexus(
    acc: Any,
    path: str | Path,
    *,
    metadata: dict[str, object] | None = None,
    run_start: dict[str, Any] | None = None,
) -> Path:
    """Write the run of ``acc`` to ``path`` (layout in the module docstring).

    Parameters
    ----------
    acc
        A :class:`consumers.reduction.accumulate.RunAccumulator` (typed loosely: it
        imports this module).
    metadata
        Stored as JSON in ``entry.attrs["metadata"]``.
    run_start
        The run's pl72 metadata (material, crystal, orientation, Ei, instrument); default
        ``metadata["run_start"]`` when there is one.
    """
    import h5py

    given = (metadata or {}).get("run_start")
    if run_start is None and isinstance(given, dict):
        run_start = given
    run_start = run_start or {}
    snap = acc.snapshot()
    grid = acc.grid
    by_monitor = getattr(acc, "normalisation", "proton_charge") == "monitor"
    iqe_unit = IQE_UNIT_MONITOR if by_monitor else IQE_UNIT
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.attrs["default"] = "entry"
        f.attrs["creator"] = "steer"
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "iqe"
        entry.attrs["grid_fingerprint"] = grid.fingerprint
        entry.attrs["normalisation"] = "monitor" if by_monitor else "proton_charge"
        if by_monitor:
            entry.attrs["normalisation_monitor"] = str(acc.monitor)
        entry.attrs["metadata"] = json.dumps(metadata or {}, default=str)
        _text(entry, "title", str(run_start.get("run_id") or (metadata or {}).get("run") or ""))
        _text(entry, "program_name", "steer")
        data = entry.create_group("iqe")
        data.attrs["NX_class"] = "NXdata"
        data.attrs["signal"] = "intensity"
        data.attrs["axes"] = ["q", "energy"]
        data.attrs["q_indices"] = 0
        data.attrs["energy_indices"] = 1
        powder = getattr(grid, "kind", "single_crystal") == "powder"
        entry.attrs["sample_kind"] = "powder" if powder else "single_crystal"
        if not powder:
            data.attrs["q_index_indices"] = 0
        for name, arr, units in (
            ("intensity", snap.intensity, iqe_unit),
            ("intensity_errors", np.sqrt(snap.variance), iqe_unit),
            ("variance", snap.variance, f"({iqe_unit})**2"),
            ("counts", snap.counts, "counts"),
            ("exposure", snap.exposure, "counts*sr*meV" if by_monitor else "uC*sr*meV"),
        ):
            ds = data.create_dataset(name, data=arr, compression="gzip")
            ds.attrs["units"] = units
        data.create_dataset("mask", data=snap.mask)
        if powder:
            q = data.create_dataset("q", data=grid.q_edges)  # bin edges: (n_Q + 1,)
            q.attrs["long_name"] = "|Q|"
        else:
            q = data.create_dataset("q", data=grid.qpath.distance)
            q.attrs["long_name"] = "distance along the q-path"
            data.create_dataset("q_index", data=np.arange(grid.n_q))
        q.attrs["units"] = "1/angstrom"
        data.create_dataset("energy", data=grid.energy_centres).attrs["units"] = "meV"
        _sample(entry, run_start)
        _instrument(entry, run_start)
        _monitors(entry, acc.records)
        _process(entry)
        g = entry.create_group("grid")
        g.attrs["NX_class"] = "NXcollection"
        g.attrs["kind"] = "powder" if powder else "single_crystal"
        if powder:
            g.create_dataset("q_edges", data=grid.q_edges).attrs["units"] = "1/angstrom"
        else:
            g.create_dataset("qpoints_rlu", data=grid.qpath.qpoints)
            g.create_dataset("distance", data=grid.qpath.distance).attrs["units"] = "1/angstrom"
            g.attrs["path"] = grid.qpath.path
            g.attrs["ticks"] = json.dumps(list(grid.qpath.ticks))
        g.create_dataset("energy_edges", data=grid.energy_edges).attrs["units"] = "meV"
        o = entry.create_group("orientations")
        o.attrs["NX_class"] = "NXcollection"
        o.create_dataset("omega", data=[r.omega for r in acc.records]).attrs["units"] = "deg"
        o.create_dataset("proton_charge", data=[r.proton_charge for r in acc.records]).attrs[
            "units"
        ] = "uC"
        sources = sorted({m for r in acc.records for m in getattr(r, "monitor_counts", {})})
        mc = o.create_dataset(
            "monitor_counts",
            data=np.asarray(
                [[r.monitor_counts.get(m, 0) for m in sources] for r in acc.records], np.int64
            ).reshape(len(acc.records), len(sources)),
        )
        mc.attrs["units"] = "counts"
        mc.attrs["sources"] = json.dumps(sources)
        o.create_dataset(
            "monitor_total", data=np.asarray([r.monitor_total for r in acc.records], np.int64)
        ).attrs["units"] = "counts"
        w = o.create_dataset(
            "weight",
            data=np.asarray([np.nan if r.weight is None else r.weight for r in acc.records], float),
        )
        w.attrs["units"] = "counts" if by_monitor else "uC"
        o.create_dataset("normalised", data=np.asarray([r.normalised for r in acc.records], bool))
        o.create_dataset("events", data=[r.events for r in acc.records])
        o.create_dataset("folded", data=[r.folded for r in acc.records])
        if acc.moments is not None:
            m = entry.create_group("moments")
            m.attrs["NX_class"] = "NXcollection"
            m.attrs["note"] = "per-bin moments of the folded cells, for the refinement"
            for name, values in acc.moments.arrays(prefix="").items():
                m.create_dataset(name, data=values, compression="gzip" if values.ndim else None)
        if acc.records:
            o.create_dataset(
                "counts", data=np.stack(acc.per_orientation_counts), compression="gzip"
            )
            o.create_dataset(
                "exposure", data=np.stack(acc.per_orientation_exposure), compression="gzip"
            )
    return path
