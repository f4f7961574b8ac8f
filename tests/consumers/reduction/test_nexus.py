"""The HDF5 export is a NeXus file that scippnexus reads: I(q, E) with variances equal to
the squared errors, units and coordinates; the sample, instrument and process groups; and
every field this project's own readers use."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipp as sc
import scippnexus as snx

from consumers.reduction.accumulate import RunAccumulator
from consumers.reduction.nexus import chemical_formula
from simulations.instrument.spectrometer import Instrument, Orientation


@pytest.fixture
def export(ge, tmp_path):  # type: ignore[no-untyped-def]
    """Two orientations with known counts and coverage on Ge's grid, with a run start."""
    rng = np.random.default_rng(11)
    acc = RunAccumulator(ge.grid)
    for omega in (0.0, 10.0):
        coverage = np.zeros(ge.grid.shape)
        coverage[10:70, 5:60] = rng.uniform(0.5, 2.0, size=(60, 55))
        counts = (rng.poisson(2.0, size=ge.grid.shape) * (coverage > 0)).astype(float)
        acc.add(counts, coverage, omega=omega, proton_charge=3.0, events=9, dropped={})
    run_start = {
        "run_id": "run-42",
        "material": "Ge",
        "crystal": ge.crystal.summary(),
        "orientation": Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0)).to_metadata(),
        "ei_meV": 60.0,
        "temperature_K": 5.0,
        "instrument": Instrument.arcs_like().to_metadata(),
    }
    path = acc.write_hdf5(tmp_path / "run.h5", metadata={"run": "run-42"}, run_start=run_start)
    return acc, path, run_start


def test_scippnexus_reads_the_spectrum_with_variances_units_and_coords(export, ge) -> None:  # type: ignore[no-untyped-def]
    acc, path, _ = export
    snap = acc.snapshot()
    with snx.File(path) as f:
        da: Any = f["entry/iqe"][()]
    assert isinstance(da, sc.DataArray)
    assert da.dims == ("q", "energy")
    assert da.unit == sc.Unit("1/(uC*sr*meV)")
    np.testing.assert_array_equal(da.values, snap.intensity)  # NaN where unmeasured
    errors = np.sqrt(snap.variance)
    np.testing.assert_array_equal(da.variances, errors**2)  # variances = errors^2
    np.testing.assert_allclose(da.variances[snap.mask], snap.variance[snap.mask], rtol=1e-12)
    assert da.coords["q"].unit == sc.Unit("1/angstrom")
    np.testing.assert_array_equal(da.coords["q"].values, ge.grid.qpath.distance)
    assert da.coords["energy"].unit == sc.Unit("meV")
    np.testing.assert_array_equal(da.coords["energy"].values, ge.grid.energy_centres)
    np.testing.assert_array_equal(da.coords["q_index"].values, np.arange(ge.grid.n_q))


def test_sample_instrument_and_process(export, ge) -> None:  # type: ignore[no-untyped-def]
    _, path, run_start = export
    with snx.File(path) as f:
        sample: Any = f["entry/sample"][()]
        instrument: Any = f["entry/instrument"]
        ei = instrument["fermi_chopper/energy"][()]
        name = instrument["name"][()]
        process: Any = f["entry/process"][()]
    assert sample["name"] == "Ge"
    assert sample["chemical_formula"] == "Ge"
    np.testing.assert_allclose(
        sample["ub_matrix"].values, run_start["orientation"]["ub_matrix"], rtol=0, atol=0
    )
    assert sample["ub_matrix"].unit == sc.Unit("1/angstrom")
    assert sample["unit_cell_abc"].unit == sc.Unit("angstrom")
    np.testing.assert_allclose(
        sample["unit_cell_abc"].values, run_start["orientation"]["lattice_abc_A"], rtol=1e-12
    )
    assert sample["temperature"] == sc.scalar(5.0, unit="K")
    assert ei == sc.scalar(60.0, unit="meV")
    assert name == run_start["instrument"]["name"]
    assert process["program"] == "steer"
    assert len(process["git_commit"]) in (40, len("unknown"))


def test_the_projects_readers_still_read_it(export) -> None:  # type: ignore[no-untyped-def]
    from model_server.inversion.inference import read_folded
    from steering.api.spectra import snapshot_from_export

    acc, path, _ = export
    folded = read_folded(path)
    np.testing.assert_array_equal(folded["mask"], acc.snapshot().mask)
    assert folded["n_orientations"] == 2
    first = read_folded(path, first=1)
    np.testing.assert_array_equal(first["mask"], acc.orientation_snapshot(0).mask)
    snap, _ = snapshot_from_export(path)
    np.testing.assert_array_equal(snap.counts, acc.counts)


def test_hill_formula() -> None:
    assert chemical_formula(["Ge", "Ge"]) == "Ge"
    assert chemical_formula(["O", "Si", "O"]) == "O2Si"
    assert chemical_formula(["H", "O", "C", "H"]) == "CH2O"
