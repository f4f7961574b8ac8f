"""da00 messages of snapshots and estimates read back with streaming_data_types, and as
ess-livedata turns them into scipp DataArrays (signal, errors -> variances, the rest
coordinates)."""

from __future__ import annotations

import numpy as np
import pytest
import scipp as sc
from streaming_data_types.dataarray_da00 import deserialise_da00

from consumers.livedata import (
    FC_ESTIMATE_SOURCE,
    IQE_COVERAGE_SOURCE,
    IQE_SOURCE,
    estimate_da00,
    snapshot_da00,
)
from consumers.reduction.accumulate import RunAccumulator


def da00_to_scipp(variables: list) -> sc.DataArray:  # type: ignore[type-arg]
    """ess-livedata's conversion (``kafka/scipp_da00_compat.da00_to_scipp``): ``signal``
    is the data, ``errors`` their standard deviations, every other variable a coordinate."""
    by_name = {
        v.name: sc.array(dims=v.axes, values=v.data, unit=v.unit)
        if v.axes
        else sc.scalar(v.data, unit=v.unit)
        for v in variables
    }
    data = by_name.pop("signal")
    errors = by_name.pop("errors", None)
    if errors is not None:
        data.variances = (errors**2).values
    return sc.DataArray(data, coords=by_name)


@pytest.fixture
def acc(ge):  # type: ignore[no-untyped-def]
    """Two orientations with known counts and coverage on Ge's grid."""
    rng = np.random.default_rng(5)
    acc = RunAccumulator(ge.grid)
    for omega in (0.0, 10.0):
        coverage = np.zeros(ge.grid.shape)
        coverage[20:60, 5:50] = rng.uniform(0.5, 2.0, size=(40, 45))
        counts = rng.poisson(3.0, size=ge.grid.shape) * (coverage > 0)
        acc.add(
            counts.astype(float), coverage, omega=omega, proton_charge=4.0, events=9, dropped={}
        )
    return acc


def test_snapshot_da00_round_trip(acc, ge) -> None:  # type: ignore[no-untyped-def]
    snap = acc.snapshot()
    messages = snapshot_da00(snap, ge.grid, run_id="run-7", timestamp_ns=1_700_000_000 * 10**9)
    assert set(messages) == {IQE_SOURCE, IQE_COVERAGE_SOURCE}
    iqe = deserialise_da00(messages[IQE_SOURCE])
    assert iqe.source_name == "steer/iqe"
    assert iqe.timestamp_ns == 1_700_000_000 * 10**9
    by_name = {v.name: v for v in iqe.data}
    assert by_name["signal"].source == "run:run-7"
    np.testing.assert_array_equal(by_name["signal"].data, snap.intensity)  # NaN included
    np.testing.assert_array_equal(by_name["errors"].data, np.sqrt(snap.variance))
    da = da00_to_scipp(iqe.data)
    assert da.dims == ("q", "energy")
    assert da.unit == sc.Unit("1/(uC*sr*meV)")
    assert da.coords["q"].unit == sc.Unit("1/angstrom")
    assert da.coords["energy"].unit == sc.Unit("meV")
    assert da.coords.is_edges("energy")  # bin edges, one more than the bins
    np.testing.assert_array_equal(da.coords["energy"].values, ge.grid.energy_edges)
    np.testing.assert_array_equal(da.coords["q"].values, ge.grid.qpath.distance)
    assert da.coords["n_orientations"].value == 2
    measured = snap.mask
    np.testing.assert_allclose(da.variances[measured], snap.variance[measured], rtol=1e-12)
    # the exposure: counts / exposure gives back the intensity where measured
    cov = da00_to_scipp(deserialise_da00(messages[IQE_COVERAGE_SOURCE]).data)
    assert cov.unit == sc.Unit("uC*sr*meV")
    assert cov.variances is None
    np.testing.assert_allclose(
        snap.counts[measured] / cov.values[measured], snap.intensity[measured], rtol=1e-12
    )


def test_estimate_da00_round_trip() -> None:
    message = {
        "run_id": "run-7",
        "n_orientations": 5,
        "omega": 10.0,
        "estimate": {
            "units": "eV/A^2",
            "fc": {
                "1NN_xx": {"mean": -3.0, "std": 0.1, "q05": -3.2, "q95": -2.8},
                "1NN_xy": {"mean": -2.0, "std": 0.3, "q05": -2.5, "q95": -1.5},
            },
        },
    }
    msg = deserialise_da00(estimate_da00(message, timestamp_ns=12))
    assert msg.source_name == FC_ESTIMATE_SOURCE
    signal = next(v for v in msg.data if v.name == "signal")
    assert signal.label == "1NN_xx,1NN_xy"
    assert signal.source == "run:run-7"
    da = da00_to_scipp(msg.data)
    assert da.unit == sc.Unit("eV/angstrom**2")
    np.testing.assert_array_equal(da.values, [-3.0, -2.0])
    np.testing.assert_allclose(np.sqrt(da.variances), [0.1, 0.3], rtol=1e-12)
    np.testing.assert_array_equal(da.coords["q95"].values, [-2.8, -1.5])
    assert da.coords["n_orientations"].value == 5
    with pytest.raises(ValueError, match="force constants"):
        estimate_da00({"estimate": {"fc": {}}}, timestamp_ns=0)


def test_a_snapshot_of_another_grid_is_refused(ge) -> None:  # type: ignore[no-untyped-def]
    from consumers.reduction.accumulate import Snapshot

    wrong = Snapshot.of(np.zeros((3, 4)), np.ones((3, 4)), 1)
    with pytest.raises(ValueError, match="grid of shape"):
        snapshot_da00(wrong, ge.grid, run_id="x", timestamp_ns=0)
