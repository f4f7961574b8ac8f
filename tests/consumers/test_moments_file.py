"""The run's moments beside the checkpoint (``moments.npz``, :mod:`consumers.service`): the
checkpoint leaves them out (they are most of its bytes and depend on the angles alone), a
background thread writes them after each checkpoint, and a restart adds again the moments
of the orientations that file lacks, bitwise what the uninterrupted run holds, whether the
file is current, behind, of another run or gone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.messages import SourceMessage
from consumers.service import MOMENTS, ConsumerService
from simulations.runs.recording import RunReader
from tests.fakes import ListSource


@pytest.fixture(scope="module")
def messages(tmp_path_factory: pytest.TempPathFactory, make_small_run: Any) -> list[SourceMessage]:
    folder = tmp_path_factory.mktemp("moments_file")
    path, _, _ = make_small_run(folder / "r.steer", (0.0, 10.0, 20.0, 30.0, 40.0), 21)
    with RunReader(path) as reader:
        return ListSource.of_recording(reader).msgs


def _consume(msgs: list[SourceMessage], state: Path, n_orientations: int | None) -> ConsumerService:
    """A consumer (zone classes, as ``steer serve`` runs) on ``state``, stepped until the run
    is done or ``n_orientations`` are checkpointed; its moments file written."""
    service = ConsumerService(ListSource(msgs), state, zone_classes="auto")
    while not service.done:
        service.step(max_records=200, timeout_s=0.0)
        # each step's orientations folded before the next (so that it stops where told)
        service._finish_step(service.pipeline.collect(block=True), False)
        acc = service.pipeline.acc
        if n_orientations is not None and acc is not None and len(acc.records) >= n_orientations:
            break
    service.pipeline.collect(block=True)
    service._finish_step([], False)
    service.flush_moments()
    service.pipeline.close()
    return service


def _saved(state: Path) -> tuple[int, int]:
    """(orientations in the checkpoint, orientations the moments file covers)."""
    with np.load(state / "checkpoint.npz") as f:
        records = len(json.loads(bytes(f["__json__"]).decode())["records"])
        assert "moments_tensor" not in f.files  # the checkpoint leaves them out
    with np.load(state / MOMENTS) as f:
        return records, int(f["records"])


def _same(a: ConsumerService, b: ConsumerService) -> None:
    ma, mb = a.pipeline.saved_moments(), b.pipeline.saved_moments()
    assert ma is not None
    assert mb is not None
    assert ma.n_orientations == mb.n_orientations == 5
    for name, want in ma.arrays(prefix="").items():
        np.testing.assert_array_equal(mb.arrays(prefix="")[name], want, err_msg=name)
    np.testing.assert_array_equal(
        b.pipeline.snapshot().fitted_counts, a.pipeline.snapshot().fitted_counts
    )


def test_a_restart_adds_the_moments_its_file_lacks(
    messages: list[SourceMessage], tmp_path: Path
) -> None:
    whole = _consume(messages, tmp_path / "whole", None)
    assert whole.done
    assert _saved(tmp_path / "whole") == (5, 5)

    state = tmp_path / "state"
    _consume(messages, state, 2)
    behind = tmp_path / "behind.npz"
    shutil.copy(state / MOMENTS, behind)
    first = _saved(state)
    assert first[0] == first[1] >= 2
    # restarted with the file current: nothing is computed again
    assert _consume(messages, state, first[0] + 2).pipeline.moments_recomputed == 0
    ckpt, covered = _saved(state)
    assert ckpt == covered > first[1]
    # the file is behind the checkpoint (a crash before it was written): the restart adds
    # the moments of the orientations it lacks, and the run ends as the uninterrupted one
    shutil.copy(behind, state / MOMENTS)
    (state / f"{MOMENTS}.123.456.tmp").write_bytes(b"a write cut off")
    keep = tmp_path / "at_restart"
    shutil.copytree(state, keep)
    resumed = _consume(messages, state, None)
    assert resumed.pipeline.moments_recomputed == ckpt - first[1]
    assert not (state / f"{MOMENTS}.123.456.tmp").exists()  # a dead write's file removed
    _same(whole, resumed)

    # without the file, with one ahead of the checkpoint, another run's (its tag), an empty
    # or a truncated one: all are computed again, and the consumer goes on
    for case in ("gone", "ahead", "another run", "empty", "truncated"):
        again = tmp_path / case
        shutil.copytree(keep, again)
        if case == "gone":
            (again / MOMENTS).unlink()
        elif case == "ahead":
            shutil.copy(tmp_path / "whole" / MOMENTS, again / MOMENTS)  # 5 > the checkpoint's
        elif case == "empty":
            (again / MOMENTS).write_bytes(b"")
        elif case == "truncated":
            data = behind.read_bytes()
            (again / MOMENTS).write_bytes(data[: len(data) // 2])
        else:
            with np.load(behind) as f:
                arrays = {k: f[k] for k in f.files}
            arrays["tag"] = np.array("0" * 32)
            with open(again / MOMENTS, "wb") as out:
                np.savez(out, **arrays)
        resumed = _consume(messages, again, None)
        assert resumed.pipeline.moments_recomputed == ckpt, case
        _same(whole, resumed)


def test_snapshots_share_the_runs_moments_and_keep_them(
    messages: list[SourceMessage], tmp_path: Path
) -> None:
    """A consumer with a snapshot sink adds each orientation's moments into a new set
    (:class:`~consumers.reduction.moments.MomentsRing`): the snapshot holds the set itself
    (no copy), every snapshot still holds its own sums when the run is done, and the run's
    moments are bitwise those of a consumer that adds them in place."""
    from consumers.reduction.moments import BinMoments

    got: list[tuple[BinMoments, BinMoments]] = []  # (the snapshot's set, a copy at hand-over)

    def on_snapshot(snap: Any, rec: Any) -> None:
        assert snap.moments is not None
        got.append((snap.moments, snap.moments.copy()))

    service = ConsumerService(
        ListSource(messages), tmp_path / "shared", zone_classes="auto", on_snapshot=on_snapshot
    )
    while not service.done:
        service.step(max_records=200, timeout_s=0.0)
    service.flush_moments()
    service.pipeline.close()
    assert [m.n_orientations for m, _ in got] == [1, 2, 3, 4, 5]
    assert len({id(m) for m, _ in got}) == 5  # a set each
    assert got[-1][0] is service.pipeline.split.moments  # the run's own, not a copy
    for held, then in got:
        for name, want in then.arrays(prefix="").items():
            np.testing.assert_array_equal(held.arrays(prefix="")[name], want, err_msg=name)
    ring = service.pipeline.split.moments_ring
    assert ring is not None
    assert ring.allocated >= 1
    _same(_consume(messages, tmp_path / "in_place", None), service)
