"""A simulated run folds the same from its nexus_structure as from its private metadata.

One short Ge run (3 orientations, 5000 events each; the simulator's default 102,400-pixel
array) is folded three times by :class:`consumers.reduction.pipeline.RunPipeline`: as
recorded (the set-up comes from the pl72 ``nexus_structure``), with a pl72 that has only
the metadata, and with one that has only the ``nexus_structure`` (as an ESS instrument
sends it). The counts must be equal exactly: the set-up's source must not matter.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from consumers.reduction.pipeline import RunPipeline, schema_of
from simulations.runs.recording import RecordedMessage, RunReader
from simulations.runs.simulate import RunPlan, simulate_run
from tests.runstarts import pl72_with

PLAN = RunPlan(
    material="Ge",
    fc="raman",
    omegas=(0.0, 1.0, 2.0),
    events_per_orientation=8000,
    count_time=2.0,
    mesh=16,
    seed=3,
)


@pytest.fixture(scope="module")
def messages(tmp_path_factory: pytest.TempPathFactory) -> list[RecordedMessage]:
    path = tmp_path_factory.mktemp("nexus") / "ge.steer"
    simulate_run(PLAN, path, progress=False)
    with RunReader(path) as reader:
        return list(reader)


def _fold(
    messages: list[RecordedMessage], *, mode: str, metadata: bool = True, nexus: bool = True
) -> RunPipeline:
    pipe = RunPipeline(mode=mode, background=False, moments=False)
    for m in messages:
        schema = schema_of(m.headers, m.payload)
        payload = m.payload
        if schema == "pl72":
            payload = pl72_with(payload, metadata=metadata, nexus=nexus)
        pipe.handle(schema, payload, m.timestamp_ns, m.key)
    pipe.finish()
    pipe.close()
    return pipe


def test_the_fold_is_the_same_from_either_set_up(messages: list[RecordedMessage]) -> None:
    recorded = _fold(messages, mode="auto")
    from_meta = _fold(messages, mode="auto", nexus=False)
    assert recorded.nexus is not None  # the nexus_structure was used
    assert from_meta.nexus is None
    a, b = recorded.folder, from_meta.folder
    assert a is not None
    assert b is not None
    assert a.signature == b.signature  # detector, solid angles, UB, Ei and grid
    assert_array_equal(a.instrument.pixel_ids, b.instrument.pixel_ids)
    assert_array_equal(a.instrument.positions, b.instrument.positions)
    assert a.instrument.l1 == b.instrument.l1
    assert a.ei == b.ei
    assert recorded.acc is not None
    assert from_meta.acc is not None
    assert len(recorded.acc.records) == 3
    assert recorded.acc.counts.sum() > 1000
    assert_array_equal(recorded.acc.counts, from_meta.acc.counts)
    assert_array_equal(recorded.acc.exposure, from_meta.acc.exposure)
    assert recorded.summary() == from_meta.summary()
    # the stream names are exposed for the dispatch of f144 sources
    assert recorded.nexus.goniometer.stream.source == "omega"
    assert recorded.nexus.detectors[0].topic == "arcs_events"


def test_a_run_start_with_only_the_nexus_structure_folds(messages: list[RecordedMessage]) -> None:
    # no bluesky topic without the metadata: both segment by the omega log
    ess = _fold(messages, mode="omega", metadata=False)
    from_meta = _fold(messages, mode="omega", nexus=False)
    assert ess.meta is not None
    assert ess.meta["material"] == "Ge"
    assert ess.meta["run_id"] == "sim-Ge-3"  # the pl72 job id
    assert ess.acc is not None
    assert from_meta.acc is not None
    assert len(ess.acc.records) == 3
    assert_array_equal(ess.acc.counts, from_meta.acc.counts)


def test_neither_usable_set_up_refuses_the_run_start(messages: list[RecordedMessage]) -> None:
    from consumers.reduction.pipeline import MalformedMessage

    pl72 = next(m for m in messages if schema_of(m.headers, m.payload) == "pl72")
    pipe = RunPipeline(background=False, moments=False)
    broken = pl72.payload.replace(b"NXfermi_chopper", b"NXfermi_choppeR")  # no Ei
    with pytest.raises(MalformedMessage, match="no spectrometer set-up: no Ei"):
        pipe.handle("pl72", pl72_with(broken, metadata=False, nexus=True), 0)
    assert pipe.meta is None  # still waiting for a usable run start


def test_a_checkpoint_keeps_the_nexus_set_up(messages: list[RecordedMessage]) -> None:
    pipe = RunPipeline(background=False, moments=False)
    pl72 = next(m for m in messages if schema_of(m.headers, m.payload) == "pl72")
    pipe.handle("pl72", pl72_with(pl72.payload, metadata=False, nexus=True), pl72.timestamp_ns)
    js, arrays = pipe.state()
    assert "nexus_structure" in arrays
    resumed = RunPipeline(background=False, moments=False)
    resumed.restore(js, {k: np.asarray(v) for k, v in arrays.items()})
    assert resumed.nexus is not None
    assert resumed.folder is not None
    assert pipe.folder is not None
    assert resumed.folder.signature == pipe.folder.signature
