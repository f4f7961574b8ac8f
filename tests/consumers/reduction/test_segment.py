"""Orientation windows from the goniometer log (omega mode): the same windows whatever order
the topics are read in, and across a checkpoint."""

from __future__ import annotations

import numpy as np

from consumers.reduction.segment import Chunk, Segmenter


def _messages() -> dict[str, list[tuple[str, tuple[object, ...]]]]:
    """One run of two steps, per topic in time order: set-points, readbacks (settled at 10
    and 110 ns), a pulse of 3 events and its charge every 10 ns, the stop at 200 ns."""
    motion = [
        ("omega", ("omega_setpoint", 0.0, 0)),
        ("omega", ("omega", 0.004, 10)),
        ("omega", ("omega_setpoint", 5.0, 100)),
        ("omega", ("omega", 3.0, 105)),
        ("omega", ("omega", 5.002, 110)),
    ]
    events, charge = [], []
    for t in range(0, 200, 10):
        pix = np.array([t, t + 1, t + 2], dtype=np.int32)
        events.append(("events", (np.array([t]), np.array([0]), pix * 7, pix)))
        charge.append(("charge", (t, 1.0 + t / 1000)))
    return {"motion": motion, "events": events, "charge": charge, "stop": [("stop", (200,))]}


def _feed(seg: Segmenter, msg: tuple[str, tuple[object, ...]]) -> list[Chunk]:
    kind, args = msg
    if kind == "omega":
        return seg.on_omega(*args)  # type: ignore[arg-type]
    if kind == "events":
        return seg.on_events(*args)  # type: ignore[arg-type]
    if kind == "charge":
        return seg.on_charge(*args)  # type: ignore[arg-type]
    seg.on_stop(*args)  # type: ignore[arg-type]
    return []


def _run(order: list[str], *, checkpoint_after: int | None = None) -> list[Chunk]:
    topics = _messages()
    seg = Segmenter("omega", tolerance=0.01)
    out: list[Chunk] = []
    sequence = [m for name in order for m in topics[name]]
    for i, msg in enumerate(sequence):
        out += _feed(seg, msg)
        if checkpoint_after == i:
            seg = Segmenter.from_state(seg.state())
    return out + seg.flush()


def _summary(chunks: list[Chunk]) -> list[tuple[float, int, int, list[int], float]]:
    return [
        (c.omega, c.start_ns, c.stop_ns, sorted(c.pixel_id.tolist()), round(c.proton_charge, 9))
        for c in chunks
    ]


def test_the_last_step_is_kept_when_the_stop_is_read_before_the_motion_log() -> None:
    in_time = _run(["motion", "events", "charge", "stop"])
    assert [(c.omega, c.start_ns, c.stop_ns) for c in in_time] == [(0.0, 10, 100), (5.0, 110, 201)]
    # a consumer may read the run-control topic first (Kafka orders only within a topic)
    for order in (
        ["stop", "motion", "events", "charge"],
        ["events", "stop", "charge", "motion"],
        ["charge", "events", "stop", "motion"],
    ):
        assert _summary(_run(order)) == _summary(in_time), order


def test_a_checkpoint_between_the_stop_and_the_settling_readback_resumes_exactly() -> None:
    want = _summary(_run(["stop", "events", "charge", "motion"]))
    n_before_motion = 1 + 20 + 20
    for at in (0, n_before_motion - 1, n_before_motion + 2):
        got = _run(["stop", "events", "charge", "motion"], checkpoint_after=at)
        assert _summary(got) == want, at


def test_a_readback_after_the_stop_does_not_open_a_step() -> None:
    seg = Segmenter("omega", tolerance=0.01)
    seg.on_omega("omega_setpoint", 1.0, 0)
    seg.on_stop(50)
    seg.on_omega("omega", 1.0, 60)  # settles only after the run stopped: nothing counted
    assert seg.flush() == []
