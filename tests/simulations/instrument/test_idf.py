"""The Mantid instrument-definition reader: a hand-written fixture worked out by hand, and
the real ARCS and SEQUOIA files of ../shared/instruments (their README gives the reference
numbers; the tests skip when that folder is absent)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from consumers.exceptions import FoldError
from consumers.offline import fold_recorded_run
from simulations.exceptions import InstrumentError
from simulations.instrument import idf
from simulations.instrument.events import OrientationSimulator
from simulations.instrument.idf import IdfGeometry, read_idf
from simulations.instrument.spectrometer import Instrument
from simulations.runs.simulate import RunPlan, simulate_run
from tests.paths import DATA, REPO

TINY = DATA / "idf" / "tiny.xml"
SHARED = REPO.parent / "shared" / "instruments"
ARCS = SHARED / "ARCS_Definition_20121011-.xml"
SEQUOIA = SHARED / "SEQUOIA_Definition.xml"
needs_shared = pytest.mark.skipif(
    not (ARCS.is_file() and SEQUOIA.is_file()),
    reason=f"the public instrument definitions are not in {SHARED}",
)


@pytest.fixture(autouse=True)
def _fresh_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with empty memory and disk caches of derived geometries."""
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(idf, "_MEMORY", {})


# -- the hand-written fixture ------------------------------------------------------------------


def test_tiny_positions_follow_nested_locations_and_rotations() -> None:
    g = read_idf(TINY, cache=False)
    y = np.array([-0.01, 0.0, 0.01])
    # worked by hand: the bank sits at x = 1 turned by 90 deg about y (local z -> world x).
    # tube A at bank z = 2: world (3, y, 0). Tube B: R = Rz(90) Ry(90) (rotations compose
    # in the component's frame, as Mantid's Component::rotate), a <trans x=0.5> inside them
    # moves it along R x = (0, 0, -0.5) to bank z = 1.5 (world x = 2.5), and its pixels'
    # local y goes to R y = (-y, 0, 0) in the bank, world (0, 0, y). Sample at z = 0.1.
    # (The other order, Ry(90) Rz(90), would put tube B's pixels at world x = 3 + y.)
    want = np.concatenate(
        [
            np.column_stack([np.full(3, 3.0), y, np.full(3, -0.1)]),
            np.column_stack([np.full(3, 2.5), np.zeros(3), y - 0.1]),
        ]
    )
    np.testing.assert_allclose(g.positions, want, atol=1e-12)
    np.testing.assert_allclose(g.tube_axes[:3], [[0, 1, 0]] * 3, atol=1e-12)
    np.testing.assert_allclose(g.tube_axes[3:], [[0, 0, 1]] * 3, atol=1e-12)
    # <id start=100 end=110 step=2>, in depth-first order
    assert g.pixel_ids.tolist() == [100, 102, 104, 106, 108, 110]
    assert g.pixels_per_tube == 3
    assert g.n_tubes == 2
    # source by spherical r=10, t=180: z = -10; sample at z = 0.1
    assert g.l1 == pytest.approx(10.1, abs=1e-12)
    assert g.monitor_ids.tolist() == [-1, -2]
    np.testing.assert_allclose(g.monitor_positions, [[0, 0, -1.1], [0, 0, 1.9]], atol=1e-12)
    assert g.name == "TINY"


def test_tiny_solid_angles_are_the_cylinders_side_view() -> None:
    g = read_idf(TINY, cache=False)
    l2 = np.linalg.norm(g.positions, axis=1)
    d = g.positions / l2[:, None]
    sin_alpha = np.linalg.norm(np.cross(d, g.tube_axes), axis=1)
    # 2 r h = 2 * 0.005 m * 0.01 m
    np.testing.assert_allclose(g.solid_angles, 1e-4 * sin_alpha / l2**2, rtol=1e-12)
    # tube B's axis (z) is nearly across the line of sight (x): sin(alpha) = 2.5 / L2
    np.testing.assert_allclose(sin_alpha[3:], 2.5 / l2[3:], rtol=1e-12)


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = TINY.read_text()
    assert old in text
    path = tmp_path / "broken.xml"
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("</instrument>", "", "is not valid XML"),
        ('<component type="tube">', '<component type="tubo">', "'tubo' is not defined"),
        ('end="110"', 'end="108"', "has 5 ids for 6 detectors"),
        ('<id start="100"', '<id begin="100"', "neither val nor start/end"),
        ('<type is="Source" name="moderator"/>', '<type name="moderator"/>', "no source"),
        ('<radius val="0.005"/>', "", "lacks axis, radius or height"),
        ('x="1.0" rot="90"', 'x="one" rot="90"', "is not a number"),
    ],
)
def test_malformed_definitions_are_refused_with_a_reason(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    with pytest.raises(InstrumentError, match=message):
        read_idf(_broken(tmp_path, old, new), cache=False)


def test_missing_file_is_an_instrument_error(tmp_path: Path) -> None:
    with pytest.raises(InstrumentError, match="cannot read instrument definition"):
        read_idf(tmp_path / "absent.xml")


# -- Instrument, metadata and cache ---------------------------------------------------------------


def test_instrument_metadata_round_trip_by_cache_file_and_hash(tmp_path: Path) -> None:
    path = tmp_path / "tiny.xml"
    shutil.copy(TINY, path)
    ins = Instrument.from_idf(path, chopper_frequency=420.0)
    assert ins.layout == {"n_columns": 2, "n_rows": 3}
    assert not ins.regular
    assert ins.pixel_rows(np.array([100, 104, 110, 101])).tolist() == [0, 2, 5, -1]
    meta = ins.to_metadata()
    assert meta["layout"] == "idf"
    assert meta["idf_name"] == "tiny.xml"
    assert meta["idf_sha256"] == ins.idf_sha256
    assert len(ins.idf_sha256) == 64
    assert list(idf.idf_cache_dir().glob(f"idf-{ins.idf_sha256}-*.npz"))

    # the file gone, a fresh process: the disk cache (numbers only) rebuilds it
    path.unlink()
    idf._MEMORY.clear()
    again = Instrument.from_metadata(meta)
    np.testing.assert_array_equal(again.pixel_ids, ins.pixel_ids)
    np.testing.assert_allclose(again.positions, ins.positions, rtol=0, atol=0)
    np.testing.assert_allclose(again.solid_angles, ins.solid_angles, rtol=0, atol=0)
    assert again.l1 == ins.l1
    assert again.chopper_frequency == 420.0

    # another file under the run's name: refused; no file and no cache: refused
    other = _broken(tmp_path, 'end="110" step="2"', 'end="105" step="1"')
    with pytest.raises(InstrumentError, match="is not the one the run used"):
        Instrument.from_metadata(meta, other)
    for f in idf.idf_cache_dir().iterdir():
        f.unlink()
    idf._MEMORY.clear()
    with pytest.raises(InstrumentError, match="--instrument FILE"):
        Instrument.from_metadata(meta)


def test_grouping_runs_along_tubes_of_a_definition() -> None:
    ins = Instrument.from_idf(TINY)
    sim = OrientationSimulator.__new__(OrientationSimulator)
    sim.instrument = ins
    sim._group(1, 2)
    # 2 tubes of 3 pixels, 2 pixels a super-pixel: (0, 1), (2), (3, 4), (5)
    assert sim.n_groups == 4
    assert sim._counts.tolist() == [2, 1, 2, 1]
    assert sim._members.tolist() == [0, 1, 2, 3, 4, 5]


# -- the real instruments --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arcs() -> IdfGeometry:
    return read_idf(ARCS, cache=False)


@needs_shared
def test_arcs_pixels_ids_rows_and_tubes(arcs: IdfGeometry) -> None:
    assert arcs.name == "ARCS"
    assert len(arcs.pixel_ids) == 117_760
    assert arcs.pixel_ids.tolist() == list(range(117_760))
    assert arcs.l1 == pytest.approx(13.6, abs=1e-9)
    assert arcs.monitor_ids.tolist() == [-1, -2]
    np.testing.assert_allclose(arcs.monitor_positions[:, 2], [-1.769, 4.9], atol=1e-9)
    assert arcs.pixels_per_tube == 128
    assert arcs.n_tubes == 920
    # pack centres (mean of a pack's 1024 pixels) against the README's rows, within 1 cm;
    # ids: B 0-38911, M 38912-78847 (M32A/B are the short packs by the beam stop), T above
    packs = arcs.positions.reshape(115, 1024, 3).mean(axis=1)
    radius = np.hypot(packs[:, 0], packs[:, 2])
    rows = {"B": (slice(0, 38), 3.13086, -1.1009), "T": (slice(77, 115), 3.13086, 0.9964)}
    rows["M"] = (np.r_[38:69, 71:77], 2.99085, -0.05)
    for name, (sel, r, y) in rows.items():
        np.testing.assert_allclose(radius[sel], r, atol=0.01, err_msg=name)
        np.testing.assert_allclose(packs[sel, 1], y, atol=0.01, err_msg=name)
    # a standard tube: 128 pixels 7.86 mm apart, vertical, centred on its pack's height
    tube = arcs.positions[:128]
    np.testing.assert_allclose(np.linalg.norm(np.diff(tube, axis=0), axis=1), 7.86e-3, atol=1e-6)
    np.testing.assert_allclose(arcs.tube_axes[:128], [[0, 1, 0]] * 128, atol=1e-12)
    assert np.all(arcs.solid_angles > 0)


@needs_shared
def test_sequoia_ids_in_four_ranges() -> None:
    g = read_idf(SEQUOIA, cache=False)
    assert g.name == "SEQUOIA"
    assert len(g.pixel_ids) == 119_808
    ranges = [(22528, 26623), (37888, 75775), (75776, 115711), (115712, 153599)]
    want = np.concatenate([np.arange(a, b + 1) for a, b in ranges])
    np.testing.assert_array_equal(np.sort(g.pixel_ids), want)
    assert g.l1 == pytest.approx(20.0114, abs=1e-9)
    assert g.pixels_per_tube == 128
    ins = Instrument.from_idf(SEQUOIA)
    assert not ins.ids_consecutive
    assert ins.pixel_rows(np.array([22528, 26624, 37888])).tolist() == [0, -1, 4096]


@needs_shared
def test_arcs_run_simulates_and_folds(tmp_path: Path) -> None:
    ins = Instrument.from_idf(ARCS)
    run = tmp_path / "run.steer"
    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=(0.0, 20.0),
        events_per_orientation=2e4,
        count_time=2.0,
        mesh=12,
        seed=5,
    )
    summary = simulate_run(plan, run, instrument=ins, progress=False)
    assert summary.to_dict()["n_pixels"] == 117_760  # what `steer simulate run --json` prints
    assert summary.super_pixels == 920 * 32  # 4 pixels a super-pixel along each tube
    assert summary.events > 10_000
    # the fold rebuilds the instrument from the run start (the cache, by the file's hash)
    idf._MEMORY.clear()
    result, acc = fold_recorded_run(run, progress=False)
    assert result["orientations"] == 2
    assert int(result["events_folded"]) > 1000  # type: ignore[call-overload]
    assert acc.snapshot().counts.sum() > 1000


def test_fold_finds_a_moved_definition_only_when_given(tmp_path: Path) -> None:
    path = tmp_path / "tiny.xml"
    shutil.copy(TINY, path)
    run = tmp_path / "run.steer"
    plan = RunPlan(
        material="Ge", fc="raman", omegas=(0.0, 1.0), events_per_orientation=500,
        count_time=1.0, mesh=8, seed=2,
    )  # fmt: skip
    # six pixels; the name picks ARCS's resolution model
    simulate_run(plan, run, instrument=Instrument.from_idf(path, name="ARCS"), progress=False)
    path.unlink()
    for f in idf.idf_cache_dir().iterdir():
        f.unlink()
    idf._MEMORY.clear()
    # the run start's nexus_structure carries the pixels: the fold needs no file
    result, _ = fold_recorded_run(run, progress=False)
    assert result["orientations"] == 2
    # a run start with the private metadata alone names the file, which has moved
    legacy = tmp_path / "legacy.steer"
    _without_nexus_structure(run, legacy)
    with pytest.raises(FoldError, match=r"tiny\.xml .*pass the definition file"):
        fold_recorded_run(legacy, progress=False)
    result, _ = fold_recorded_run(legacy, progress=False, instrument_file=TINY)
    assert result["orientations"] == 2


def _without_nexus_structure(src: Path, dst: Path) -> None:
    """Copy a recorded run with its pl72 stripped of the nexus_structure."""
    import dataclasses

    from simulations.runs.recording import RunReader, write_run
    from tests.runstarts import pl72_with

    with RunReader(src) as reader:
        meta = dict(reader.metadata)
        msgs = list(reader)
    for i, m in enumerate(msgs):
        if m.payload[4:8] == b"pl72":
            msgs[i] = dataclasses.replace(m, payload=pl72_with(m.payload, nexus=False))
    meta.pop("format", None)
    meta.pop("version", None)
    write_run(dst, msgs, meta)
