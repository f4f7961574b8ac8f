"""Lookup-table folding against the brute-force reference; offline folding of recorded runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from streaming_data_types.eventdata_ev44 import deserialise_ev44

from consumers.offline import fold_recorded_run
from consumers.reduction.folding import Folder
from consumers.reduction.table import FoldTable
from simulations.instrument.binning import ReferenceBinning
from simulations.instrument.spectrometer import Instrument, Orientation, energy_to_speed
from simulations.lattice.backgrounds import Backgrounds
from simulations.runs.recording import RecordedMessage, RunReader, RunWriter
from simulations.runs.simulate import RunPlan, simulate_run
from simulations.units import THZ_TO_MEV

EI = 80.0


@pytest.fixture(scope="module")
def ge_table(ge):  # type: ignore[no-untyped-def]
    return FoldTable.build(ge.crystal, ge.grid, tolerance=0.05, voxels=96)


def test_lookup_table_equals_brute_force_for_1e6_events(ge, ge_table) -> None:  # type: ignore[no-untyped-def]
    """Reference: ReferenceBinning (all point-group operations, k-d tree over the star)."""
    ins = Instrument.arcs_like()
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(ge_table, ge.grid, ins, orientation, EI)
    rng = np.random.default_rng(7)
    n = 1_000_000
    pix = rng.integers(0, ins.n_pixels, n)
    energy = rng.uniform(-5.0, 75.0, n)
    tof = (ins.l1 / energy_to_speed(EI) + ins.l2[pix] / energy_to_speed(EI - energy)) * 1e9
    omega = 33.3
    iq, ie = folder.assign(pix, tof, omega)
    ref = ReferenceBinning(ge.crystal, ge.grid, tolerance=0.05)
    q_lab, e = ins.event_to_qe(pix, tof, EI)
    iq_ref = ref.q_index(orientation.lab_to_rlu(q_lab, omega))
    ie_ref = np.searchsorted(ge.grid.energy_edges, e, side="right") - 1
    ok_ref = (iq_ref >= 0) & (ie_ref >= 0) & (ie_ref < ge.grid.n_e)
    iq_ref = np.where(ok_ref, iq_ref, -1)
    ie_ref = np.where(ok_ref, ie_ref, -1)
    same = (iq == iq_ref) & (ie == ie_ref)
    assert same.mean() >= 0.999
    assert (iq >= 0).sum() > 50_000  # a meaningful number of events lands on the path
    # the histogram (aliases expanded) equals the reference histogram
    counts, dropped = folder.fold(pix, tof, omega)
    np.testing.assert_array_equal(counts, ref.histogram(orientation.lab_to_rlu(q_lab, omega), e))
    canonical = ge_table.alias == np.arange(ge.grid.n_q)  # aliases hold copies
    assert counts[canonical].sum() + dropped.sum() == n


@pytest.fixture(scope="module")
def ge_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("fold") / "ge.steer"
    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=tuple(np.arange(0.0, 120.0, 10.0)),
        events_per_orientation=1.5e5,
        count_time=10.0,
        mesh=24,
        seed=4,
        # the one-phonon signal alone: the test compares with the one-phonon forward model
        backgrounds=Backgrounds.none(),
    )
    simulate_run(plan, path, progress=False)
    return path


def _file_events(path: Path) -> int:
    n = 0
    with RunReader(path) as reader:
        for msg in reader:
            if dict(msg.headers).get("schema") == b"ev44":
                n += len(deserialise_ev44(msg.payload).time_of_flight)
    return n


def test_offline_fold_loses_nothing_and_shows_the_dispersion(ge, ge_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "iqe.h5"
    summary, acc = fold_recorded_run(ge_run, out, mode="bluesky", progress=False, check=True)
    assert summary["orientations"] == 12
    # the built-in comparison with the forward model of the true FC set (12 short
    # orientations: 0.51 raw, 0.67 column-normalised; a long run gives more, see README)
    disp = summary["dispersion"]
    assert disp["fraction_on_branch"] >= 0.97
    assert disp["columns_checked"] >= 150
    assert disp["pearson_column_normalised"] >= 0.6
    assert disp["pearson"] >= 0.4
    # every event of the file is either folded or dropped with a reason
    assert summary["events_folded"] + summary["events_dropped"] == _file_events(ge_run)
    assert summary["malformed"] == {}
    # per-orientation events equal what the bluesky Event documents announce
    announced = []
    with RunReader(ge_run) as reader:
        for msg in reader:
            if dict(msg.headers).get("document") == b"event":
                announced.append(json.loads(msg.payload)[1]["data"]["events"])
    assert [r.events for r in acc.records] == announced

    snap = acc.snapshot()
    fm = ge.forward_model(dtype=torch.float64, method="exact")
    from simulations.fcdb.reference import resolve_fc

    _, c = resolve_fc("Ge", "raman", ge)
    with torch.no_grad():
        branches = fm.frequencies(c[None])[0].numpy() * THZ_TO_MEV
    ec = ge.grid.energy_centres
    checked = snap.counts.sum(1) >= 50
    peak = ec[np.nanargmax(np.where(snap.mask, snap.counts, -1), 1)]
    dist = np.min(np.abs(branches - peak[:, None]), 1)
    tol = np.maximum(2 * ge.resolution.sigma(peak), ec[1] - ec[0])
    assert checked.sum() >= 150
    assert (dist[checked] <= tol[checked]).mean() >= 0.97

    with h5py.File(out) as f:
        data = f["entry/iqe"]
        assert data.attrs["NX_class"] == "NXdata"
        assert data.attrs["signal"] == "intensity"
        assert f["entry"].attrs["grid_fingerprint"] == ge.grid.fingerprint
        np.testing.assert_array_equal(data["counts"][()], snap.counts)
        assert data["energy"].attrs["units"] == "meV"
        assert f["entry/orientations/counts"].shape == (12, *ge.grid.shape)
        # unmeasured bins are NaN, not zero
        intensity = data["intensity"][()]
        assert np.isnan(intensity[~data["mask"][()]]).all()


def test_omega_log_segmentation_agrees_with_bluesky(ge_run) -> None:  # type: ignore[no-untyped-def]
    s_bs, acc_bs = fold_recorded_run(ge_run, mode="bluesky", progress=False)
    s_om, acc_om = fold_recorded_run(ge_run, mode="omega", progress=False)
    assert s_om["orientations"] == s_bs["orientations"]
    np.testing.assert_allclose(
        [r.omega for r in acc_om.records], [r.omega for r in acc_bs.records], atol=0.01
    )
    # the omega log also keeps the settling second (goniometer at the angle, not counting)
    for a, b in zip(acc_om.records, acc_bs.records, strict=True):
        assert a.events >= b.events
        assert a.events < 1.2 * b.events
    assert (
        s_om["events_folded"] + s_om["events_dropped"]
        == s_bs["events_folded"] + s_bs["events_dropped"]
    )


def test_malformed_messages_are_counted_and_skipped(ge_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.steer"
    with RunReader(ge_run) as reader, RunWriter(bad, metadata=reader.metadata) as writer:
        for i, msg in enumerate(reader):
            writer.write(msg)
            if i == 50:
                writer.write(
                    RecordedMessage(
                        topic=msg.topic,
                        key=msg.key,
                        timestamp_ns=msg.timestamp_ns,
                        headers=(("schema", b"ev44"),),
                        payload=b"\x00garbage-not-a-flatbuffer",
                    )
                )
                writer.write(
                    RecordedMessage(
                        topic=msg.topic, key=None, timestamp_ns=msg.timestamp_ns, payload=b"????"
                    )
                )
    summary, _ = fold_recorded_run(bad, mode="bluesky", progress=False)
    good, _ = fold_recorded_run(ge_run, mode="bluesky", progress=False)
    assert summary["malformed"] == {"malformed_ev44": 1, "unknown_schema": 1}
    assert summary["events_folded"] == good["events_folded"]


def test_ev44_with_inconsistent_pulse_index_is_refused_not_poisonous(ge_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """ev44 whose pulse-start index does not start at 0, or has no pulses for its events,
    decodes, but would corrupt the segmenter: refused as malformed_ev44, the run unharmed."""
    from streaming_data_types.eventdata_ev44 import serialise_ev44

    bad = tmp_path / "bad_index.steer"
    with RunReader(ge_run) as reader, RunWriter(bad, metadata=reader.metadata) as writer:
        for i, msg in enumerate(reader):
            writer.write(msg)
            if i == 60:
                for ref, idx in (([1_700_000_000_000_000_000], [2]), ([], [])):
                    payload = serialise_ev44(
                        "bad",
                        1,
                        ref,
                        idx,
                        np.array([5000000, 6000000, 7000000]),
                        np.array([1, 2, 3]),
                    )
                    writer.write(
                        RecordedMessage(
                            topic=msg.topic,
                            key=msg.key,
                            timestamp_ns=msg.timestamp_ns,
                            headers=(("schema", b"ev44"),),
                            payload=bytes(payload),
                        )
                    )
    summary, acc = fold_recorded_run(bad, mode="bluesky", progress=False)
    good, good_acc = fold_recorded_run(ge_run, mode="bluesky", progress=False)
    assert summary["malformed"] == {"malformed_ev44": 2}
    assert summary["orientations"] == good["orientations"]
    np.testing.assert_array_equal(acc.counts, good_acc.counts)


def test_a_failing_fold_loses_one_orientation_loudly_not_the_run(ge_run, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A bug in the fold of one orientation (simulated) must not stop the consumer: that
    orientation is logged, listed and counted as dropped; the others are folded."""
    good, good_acc = fold_recorded_run(ge_run, mode="bluesky", progress=False)
    original = Folder.fold
    victim = good_acc.records[1].omega

    def fold(self, pixel_id, tof_ns, omega, counts=None):  # type: ignore[no-untyped-def]
        if omega == victim:
            raise RuntimeError("simulated bug")
        return original(self, pixel_id, tof_ns, omega, counts)

    monkeypatch.setattr(Folder, "fold", fold)
    summary, acc = fold_recorded_run(ge_run, mode="bluesky", progress=False)
    assert summary["orientations"] == good["orientations"] - 1
    assert summary["dropped_by_reason"]["fold_failed"] == good_acc.records[1].events
    assert victim not in [r.omega for r in acc.records]


def test_steer_fold_json_contract(ge_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "iqe.h5"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "steering.cli.app",
            "fold",
            str(ge_run),
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "fold.png"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("orientations", "events_folded", "events_dropped", "seconds", "events_per_second"):
        assert key in result
    assert result["orientations"] == 12
    assert out.exists()
    # the run's facts, with a simulated run's truth; the PNG drawn
    assert result["run"]["material"] == "Ge"
    assert set(result["run"]["truth"]) >= {"1NN_xx", "1NN_xy"}
    assert (tmp_path / "fold.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coverage_converges_to_a_finely_sampled_reference(ge, ge_table) -> None:  # type: ignore[no-untyped-def]
    """Default sampling against every pixel at 16 energies per bin (same kernel, finer)."""
    ins = Instrument.arcs_like(n_columns=160, n_rows=96)
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(ge_table, ge.grid, ins, orientation, EI)
    fine = folder.coverage(30.0, e_substeps=16, pixel_stride=1)
    default = folder.coverage(30.0)
    assert abs(default.sum() / fine.sum() - 1) < 0.01
    big = fine > np.percentile(fine[fine > 0], 10)
    rel = np.abs(default[big] - fine[big]) / fine[big]
    assert np.median(rel) < 0.06  # coarse test array (1.0 x 0.6 deg pixels); 1.8 % on ARCS
    # coverage is where the detector sees the path: no coverage, no counts
    counts = np.zeros(ge.grid.shape)
    rng = np.random.default_rng(1)
    pix = rng.integers(0, ins.n_pixels, 200_000)
    energy = rng.uniform(0.0, 70.0, len(pix))
    tof = (ins.l1 / energy_to_speed(EI) + ins.l2[pix] / energy_to_speed(EI - energy)) * 1e9
    folder.fold(pix, tof, 30.0, counts)
    # (a sliver of a tube crossing can fall between even 16 samples per bin)
    assert counts[fine == 0].sum() <= 1e-3 * counts.sum()


def test_coverage_skipping_is_exact(ge, ge_table) -> None:  # type: ignore[no-untyped-def]
    """Skipping dead stretches of a trajectory (FoldTable.clear) changes nothing."""
    import dataclasses

    ins = Instrument.arcs_like(n_columns=160, n_rows=96)
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(ge_table, ge.grid, ins, orientation, EI)
    no_skip = dataclasses.replace(ge_table, clear=np.zeros_like(ge_table.clear))
    plain = Folder(no_skip, ge.grid, ins, orientation, EI)
    assert (ge_table.clear > 1).mean() > 0.3  # most dead voxels let the kernel skip
    for omega in (12.5, 47.0):
        skipping = folder.coverage(omega)
        np.testing.assert_array_equal(skipping, plain.coverage(omega))
        assert skipping.sum() > 0


def test_background_fold_equals_inline_fold(tmp_path: Path, make_small_run) -> None:  # type: ignore[no-untyped-def]
    """Orientations folded on the worker thread are added in order: bitwise the same."""
    from consumers.reduction.pipeline import RunPipeline, schema_of

    path, _, _ = make_small_run(tmp_path / "run.steer", (0.0, 3.0, 6.0, 9.0, 12.0), seed=4)
    results = []
    for background in (True, False):
        pipe = RunPipeline(background=background)
        records = []
        with RunReader(path) as reader:
            for msg in reader:
                records += pipe.handle(schema_of(msg.headers, msg.payload), msg.payload, 0)
                if background and pipe.in_flight:
                    with pytest.raises(Exception, match="still folding"):
                        pipe.state()
        records += pipe.finish()
        assert [r.index for r in records] == list(range(5))
        assert pipe.in_flight == 0
        assert len(pipe.fold_seconds) == 5
        results.append((pipe.acc.counts.copy(), pipe.acc.exposure.copy(), records))
        pipe.close()
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    assert [r.omega for r in results[0][2]] == [r.omega for r in results[1][2]]


def test_an_orientations_coverage_and_moments_are_prepared_while_it_counts(  # type: ignore[no-untyped-def]
    tmp_path: Path, make_small_run, monkeypatch
) -> None:
    """The goniometer's setpoint starts its orientation's coverage and moments on the
    preparing thread, so that the close folds only the events; the spectrum, exposure and
    moments are bitwise those computed at the close (background off), and those of a
    reader that runs ahead of the preparations (one kept, the rest cancelled or done at the
    close). Both are at the orientation's angle (the readbacks' mean, from the bluesky
    Event) rounded to ANGLE_DECIMALS, which is the setpoint's here."""
    import threading

    from consumers.reduction import coverage_cache, moments, pipeline
    from consumers.reduction.pipeline import ANGLE_DECIMALS, RunPipeline, schema_of

    omegas = (0.0, 3.0, 6.0)
    path, _, _ = make_small_run(tmp_path / "run.steer", omegas, seed=5)
    monkeypatch.setenv("STEER_COVERAGE_CACHE_MB", "0")  # every pass computes its own
    calls: list[tuple[str, float]] = []
    angle_parts = RunPipeline._angle_parts

    def spy(self, omega: float, run=None):  # type: ignore[no-untyped-def]
        calls.append((threading.current_thread().name, omega))
        return angle_parts(self, omega, run)

    monkeypatch.setattr(RunPipeline, "_angle_parts", spy)
    results = []
    for background, waits in ((True, True), (False, False), (True, False)):
        calls.clear()
        moments._CACHE.clear()
        coverage_cache._COVERAGE_CACHE.clear()
        monkeypatch.setattr(pipeline, "RECENT_SETPOINTS", 3 if waits else 1)
        pipe = RunPipeline(background=background, zone_classes="auto")
        records = []
        with RunReader(path) as reader:
            for msg in reader:
                records += pipe.handle(schema_of(msg.headers, msg.payload), msg.payload, 0)
                for job in list(pipe._prepared.values()) if waits else []:
                    job.result()  # a count outlasts its preparation
        records += pipe.finish()
        assert pipe.split is not None
        assert pipe.split.moments is not None
        if waits:  # once per orientation, at the setpoint, on the preparing thread
            assert calls == [("prepare_0", w) for w in omegas]
        elif not background:  # at each close, here
            assert calls == [(threading.current_thread().name, w) for w in omegas]
        else:  # each angle prepared or done at its close, maybe both
            assert {w for _, w in calls} == set(omegas)
        for rec, w in zip(records, omegas, strict=True):  # the readbacks' mean, near it
            assert rec.omega != w
            assert round(rec.omega, ANGLE_DECIMALS) == w
        results.append(
            (pipe.acc.counts.copy(), pipe.acc.exposure.copy(), pipe.split.moments.arrays())
        )
        pipe.close()
    for other in results[1:]:
        np.testing.assert_array_equal(results[0][0], other[0])
        np.testing.assert_array_equal(results[0][1], other[1])
        for name, value in results[0][2].items():
            np.testing.assert_array_equal(value, other[2][name])


def test_fold_table_cache_round_trip(ge, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A cached table loads equal to a built one; a damaged file is rebuilt; another
    tolerance is another table."""
    built = FoldTable.cached(ge.crystal, ge.grid, tolerance=0.05, voxels=24, cache_dir=tmp_path)
    files = list(tmp_path.glob("foldtable-*.npz"))
    assert len(files) == 1
    loaded = FoldTable.cached(ge.crystal, ge.grid, tolerance=0.05, voxels=24, cache_dir=tmp_path)
    for name in ("live", "rank", "offsets", "candidates", "star_xyz", "star_index", "clear"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(built, name))
    assert (loaded.voxels, loaded.tolerance) == (24, 0.05)
    files[0].write_bytes(b"not an npz")
    again = FoldTable.cached(ge.crystal, ge.grid, tolerance=0.05, voxels=24, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.candidates, built.candidates)
    FoldTable.cached(ge.crystal, ge.grid, tolerance=0.06, voxels=24, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("foldtable-*.npz"))) == 2
    # an unwritable cache is only logged
    blocker = tmp_path / "file"
    blocker.write_text("x")
    FoldTable.cached(ge.crystal, ge.grid, tolerance=0.05, voxels=24, cache_dir=blocker / "sub")


def test_fold_matches_an_independent_brute_force(ge, ge_table) -> None:  # type: ignore[no-untyped-def]
    """Independent of ReferenceBinning: every point-group operation (and time reversal) is
    applied to Q itself, and the nearest path point (27 periodic images, k-d tree over the
    path only) is found; ties go to the lowest path index."""
    from scipy.spatial import cKDTree

    ins = Instrument.arcs_like()
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(ge_table, ge.grid, ins, orientation, EI)
    rng = np.random.default_rng(21)
    n = 20_000
    pix = rng.integers(0, ins.n_pixels, n)
    energy = rng.uniform(0.5, 69.5, n)
    tof = (ins.l1 / energy_to_speed(EI) + ins.l2[pix] / energy_to_speed(EI - energy)) * 1e9
    omega = 71.0
    iq, _ = folder.assign(pix, tof, omega)

    rec = ge.crystal.reciprocal_lattice
    path = ge.grid.qpath.qpoints
    shifts = np.array([[i, j, k] for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    images = (path[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    image_index = np.tile(np.arange(len(path)), len(shifts))
    tree = cKDTree(images @ rec)
    q_lab, _ = ins.event_to_qe(pix, tof, EI)
    q = orientation.lab_to_rlu(q_lab, omega)
    rotations, _ = ge.crystal.symmetry_operations()
    ops = np.concatenate([rotations, -rotations]).astype(float)
    best_d = np.full(n, np.inf)
    best_i = np.full(n, -1)
    for op in ops:
        # q -> q W^T^-1 is the action on reciprocal (row) vectors; the set of all of them
        # is the same as {q W} over the group, used here
        qq = q @ op
        frac = qq - np.floor(qq)
        d, j = tree.query(frac @ rec, k=4)
        for col in range(4):
            dc, ic = d[:, col], image_index[j[:, col]]
            better = (dc < best_d - 1e-9) | ((np.abs(dc - best_d) <= 1e-9) & (ic < best_i))
            best_d = np.where(better, dc, best_d)
            best_i = np.where(better, ic, best_i)
    brute = np.where(best_d <= 0.05, best_i, -1)
    same = iq == brute
    assert (brute >= 0).sum() > 1000
    assert same.mean() >= 0.999, same.mean()
    # disagreements only within float tolerance of the 0.05 1/A tube boundary
    assert np.all(np.abs(best_d[~same] - 0.05) < 1e-6)


@pytest.mark.parametrize("spread", [7, 100_000])
def test_pixel_table_ids_fold_like_their_rows(ge, ge_table, tmp_path, spread) -> None:  # type: ignore[no-untyped-def]
    """A loaded pixel table with shuffled, sparse ids (a dense id table inside the kernel,
    or, for ids spread too widely, a lookup beforehand) folds exactly as the pixel rows do;
    ids the instrument lacks are dropped as ``unknown_pixel``."""
    arcs = Instrument.arcs_like(n_columns=40, n_rows=64)
    rng = np.random.default_rng(5)
    ids = rng.permutation(arcs.n_pixels) * spread + 1000
    path = tmp_path / "pixels.csv"
    pos = arcs.directions * arcs.l2[:, None]
    solid = arcs.solid_angles.tolist()
    rows = "\n".join(
        f"{i},{x:.17g},{y:.17g},{z:.17g},{s:.17g}"
        for i, (x, y, z), s in zip(ids.tolist(), pos.tolist(), solid, strict=True)
    )
    path.write_text("id,x,y,z,solid_angle\n" + rows + "\n")
    table = Instrument.from_pixel_table(path)
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(ge_table, ge.grid, table, orientation, EI)
    n = 50_000
    row = rng.integers(0, table.n_pixels, n)
    energy = rng.uniform(0.5, 69.5, n)
    tof = (table.l1 / energy_to_speed(EI) + table.l2[row] / energy_to_speed(EI - energy)) * 1e9
    pixel_id = table.pixel_ids[row].astype(np.int32)
    unknown = rng.random(n) < 0.01
    pixel_id[unknown] = -5  # not an id of the table
    counts, dropped = folder.fold(pixel_id, tof, 40.0)
    q_lab, e = table.event_to_qe(row[~unknown], tof[~unknown], EI)
    ref = ReferenceBinning(ge.crystal, ge.grid, 0.05)
    np.testing.assert_array_equal(counts, ref.histogram(orientation.lab_to_rlu(q_lab, 40.0), e))
    assert dropped[3] == unknown.sum()


def test_coverage_disk_cache(ge, ge_table, tmp_path, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    """Coverages are kept on disk per set-up: a new process (here: an empty memory cache)
    reads bitwise the values computed; a damaged file is recomputed and rewritten; a cache
    bound of 0 keeps nothing on disk; the folder is pruned to its bound."""
    import consumers.reduction.coverage_cache as coverage_cache

    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    ins = Instrument.arcs_like(n_columns=80, n_rows=48)
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(ge_table, ge.grid, ins, orientation, EI)
    fresh = folder.coverage(33.0, cache=False)
    assert not folder.on_disk(33.0)
    first = folder.coverage(33.0)
    files = list((tmp_path / "coverage").rglob("*.npy"))
    assert len(files) == 1
    assert folder.on_disk(33.0)
    coverage_cache._COVERAGE_CACHE.clear()
    np.testing.assert_array_equal(
        Folder(ge_table, ge.grid, ins, orientation, EI).coverage(33.0), fresh
    )
    np.testing.assert_array_equal(first, fresh)
    # damaged: garbage, then the wrong shape: recomputed, said, rewritten
    for damage in (b"not a numpy file", None):
        if damage is None:
            np.save(files[0], np.ones((3, 3)))
        else:
            files[0].write_bytes(damage)
        coverage_cache._COVERAGE_CACHE.clear()
        caplog.clear()
        np.testing.assert_array_equal(folder.coverage(33.0), fresh)
        assert "recomputing" in caplog.text
        np.testing.assert_array_equal(np.load(files[0]), fresh)
    # off
    monkeypatch.setenv("STEER_COVERAGE_CACHE_MB", "0")
    folder.coverage(34.0)
    assert not folder.on_disk(34.0)
    assert len(list((tmp_path / "coverage").rglob("*.npy"))) == 1
    # pruned: a second set-up pushes the first out under a bound smaller than both
    monkeypatch.setenv("STEER_COVERAGE_CACHE_MB", "0.2")
    other = Folder(ge_table, ge.grid, ins, orientation, EI + 5.0)
    other.coverage(33.0)
    other.coverage(34.0)
    coverage_cache._prune_coverage_disk(tmp_path / "coverage", 0.2)
    assert not folder.on_disk(33.0)
    assert other.on_disk(34.0)


def test_steer_coverage_precomputes_a_runs_angles(make_small_run, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`steer coverage --run` fills the disk cache with the run's angles, which the
    offline fold then reads (same exposure as computed afresh)."""
    import consumers.reduction.coverage_cache as coverage_cache
    from consumers.offline import run_setup

    run, _, _ = make_small_run(tmp_path / "run.steer", (0.0, 5.0, 10.0), seed=2)
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    env = dict(os.environ)
    cmd = [
        sys.executable,
        "-m",
        "steering.cli.app",
        "coverage",
        "--run",
        str(run),
        "--json",
        "--quiet",
    ]
    out = json.loads(
        subprocess.run(cmd, env=env, capture_output=True, check=True, text=True).stdout
    )
    folder, angles = run_setup(run)
    assert out["angles"] == len(angles) > 0
    assert out["computed"] == len(angles)
    assert out["signature"] == folder.signature
    again = json.loads(
        subprocess.run(cmd, env=env, capture_output=True, check=True, text=True).stdout
    )
    assert again["computed"] == 0
    assert again["already_cached"] == len(angles)
    bad = subprocess.run(
        [sys.executable, "-m", "steering.cli", "coverage", "--angles", "0:400:1", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "goniometer limits" in bad.stderr
    coverage_cache._COVERAGE_CACHE.clear()
    for omega in angles:
        on_disk = np.load(coverage_cache.coverage_path((folder.signature, omega, 4, 2)))
        np.testing.assert_array_equal(on_disk, folder.coverage(omega, cache=False))


def test_coverage_cache(ge, ge_table) -> None:  # type: ignore[no-untyped-def]
    """Coverages are cached per folder signature and angle: equal to a fresh computation,
    returned as copies, and kept apart for different set-ups."""
    ins = Instrument.arcs_like(n_columns=80, n_rows=48)
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(ge_table, ge.grid, ins, orientation, EI)
    twin = Folder(ge_table, ge.grid, ins, orientation, EI)
    other = Folder(ge_table, ge.grid, ins, orientation, EI + 5.0)
    assert folder.signature == twin.signature != other.signature
    first = folder.coverage(21.5)
    first[:] = -1.0  # the caller's copy: the cache keeps its own
    again = twin.coverage(21.5)
    np.testing.assert_array_equal(again, folder.coverage(21.5, cache=False))
    assert again.min() >= 0
    assert not np.array_equal(other.coverage(21.5), again)


def test_a_held_preparation_waits_until_it_is_let_go(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A setpoint's preparation waits while the pipeline's hold says so (the service
    holds it while a closed orientation's snapshot has not been handed over), and starts
    when the hold lets go, when its own orientation closes, or after PREPARE_HOLD_S; a
    hold that raises never stops it."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from consumers.reduction import pipeline
    from consumers.reduction.pipeline import RunPipeline

    started: list[float] = []
    monkeypatch.setattr(
        RunPipeline, "_angle_parts", lambda self, omega, run=None: started.append(omega) or omega
    )
    pipe = RunPipeline(background=True)
    holding = threading.Event()
    pipe.hold_preparation = holding.is_set
    with ThreadPoolExecutor(max_workers=1) as pool:
        holding.set()
        job = pool.submit(pipe._prepare_when_free, 1.0, (), threading.Event())
        time.sleep(0.4)
        assert not job.done()  # held
        assert started == []
        holding.clear()
        assert job.result(timeout=30) == 1.0  # let go
        # its own orientation closed: it starts, hold or not
        needed = threading.Event()
        holding.set()
        job = pool.submit(pipe._prepare_when_free, 2.0, (), needed)
        time.sleep(0.4)
        assert not job.done()
        needed.set()
        assert job.result(timeout=30) == 2.0
        # never longer than PREPARE_HOLD_S
        monkeypatch.setattr(pipeline, "PREPARE_HOLD_S", 0.3)
        assert pool.submit(pipe._prepare_when_free, 3.0, (), threading.Event()).result(30) == 3.0

        def broken() -> bool:
            raise RuntimeError("hold failed")

        pipe.hold_preparation = broken
        assert pool.submit(pipe._prepare_when_free, 4.0, (), threading.Event()).result(30) == 4.0
    assert started == [1.0, 2.0, 3.0, 4.0]


def test_closed_orientations_await_their_hand_over(tmp_path: Path, make_small_run) -> None:  # type: ignore[no-untyped-def]
    """Each close counts an orientation awaiting its hand-over: without snapshots kept the
    collection hands it over; with them the caller does (``handed_over``)."""
    from consumers.reduction.pipeline import RunPipeline, schema_of

    path, _, _ = make_small_run(tmp_path / "run.steer", (0.0, 3.0, 6.0), seed=4)
    for keep in (False, True):
        pipe = RunPipeline(background=True)
        pipe.keep_snapshots = keep
        records = []
        with RunReader(path) as reader:
            for msg in reader:
                records += pipe.handle(schema_of(msg.headers, msg.payload), msg.payload, 0)
        records += pipe.finish()
        assert len(records) == 3
        assert pipe.awaiting_handover == (3 if keep else 0)
        pipe.handed_over(len(pipe.snapshots))
        assert pipe.awaiting_handover == 0
        pipe.handed_over()
        assert pipe.awaiting_handover == 0  # never below zero
        pipe.close()
