"""``steer simulate run | sqe | check-run``: JSON contracts, files, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.runs.recording import RunReader
from tests.commands import steer


def test_simulate_run_json_contract_and_check_run(tmp_path: Path) -> None:
    out = tmp_path / "ge.steer"
    proc = steer(
        "simulate", "run", "--material", "Ge", "--fc", "raman", "--omegas", "0:3:1",
        "--events-per-orientation", "60000", "--count-time", "5", "--seed", "1",
        "--out", str(out), "--quiet", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {
        "orientations", "events", "messages", "seconds", "fc_set", "path", "n_pixels",
        "super_pixels", "monitor_events",
    }  # fmt: skip
    assert result["monitor_events"] == 0  # monitors are off unless --monitors
    assert result["orientations"] == 3
    assert result["n_pixels"] == 102_400  # the default ARCS-like array
    assert result["super_pixels"] == 102_400  # every pixel evaluated on its own by default
    assert result["fc_set"] == "raman"
    assert result["path"] == str(out)
    # 60k per 5 s step, plus the events while moving (2 x (1 deg at 1 deg/s + 1 s settle))
    assert 204_000 < result["events"] < 252_000
    with RunReader(out) as reader:
        assert reader.count() == result["messages"]
        assert reader.metadata["fc_set"] == "raman"

    png = tmp_path / "check.png"
    proc = steer("simulate", "check-run", str(out), "--out", str(png), "--quiet", "--json")
    assert proc.returncode == 0, proc.stderr
    check = json.loads(proc.stdout)
    assert check["orientations"] == 3
    assert check["events"] < result["events"]  # events while moving are left out
    assert check["columns_checked"] > 0
    assert check["fraction_passing"] >= 0.9, check  # 3 short steps: a few noisy columns
    assert png.stat().st_size > 10_000


def test_simulate_sqe_draws_a_slice(tmp_path: Path) -> None:
    png = tmp_path / "slice.png"
    proc = steer(
        "simulate", "sqe", "--material", "Ge", "--fc", "raman", "--ei", "80",
        "--omega", "30", "--out", str(png), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["omega_deg"] == 30.0
    assert result["max_intensity"] > 0
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "run", "--material", "Zz"], "unknown material 'Zz'"),
        (["simulate", "run", "--omegas", "0:400:1"], "outside the goniometer limits"),
        (["simulate", "run", "--events-per-orientation", "-5"], "greater than or equal to 1"),
        # limits decided before any allocation or file (the measured cases)
        (["simulate", "run", "--events-per-orientation", "0"], "greater than or equal to 1"),
        (["simulate", "run", "--events-per-orientation", "1e12"], "at most 1e+08"),
        (["simulate", "run", "--omegas", "0:1e9:1"], "at most 3600 are accepted"),
        (["simulate", "run", "--omegas", "0:4:1e-12"], "at most 3600 are accepted"),
        (["simulate", "run", "--temperature", "10000"], "less than or equal to 2000"),
        (["simulate", "run", "--ei", "30"], "too small"),
        (["simulate", "run", "--omegas", "a:b"], "cannot read omegas"),
        (["simulate", "sqe", "--ei", "20"], "too small"),
        (["simulate", "run", "--pixel-table", "a.csv", "--instrument", "b.xml"], "one of them"),
        (["simulate", "run", "--instrument", "absent.xml"], "cannot read instrument definition"),
        (["simulate", "sqe", "--omega", "720"], "outside the goniometer limits"),
        (["simulate", "run", "--powder", "--omegas", "0:5:1"], "give --steps"),
        (["simulate", "run", "--steps", "4"], "add --powder"),
        (["simulate", "run", "--powder", "--steps", "5000"], "at most 3600 steps"),
    ],
)
def test_simulate_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    proc = steer(*args, "--out", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_refused_run_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "big.steer"
    proc = steer("simulate", "run", "--events-per-orientation", "1e12", "--out", str(out))
    assert proc.returncode == 2
    assert not out.exists()


def test_cli_limits_are_settings(tmp_path: Path) -> None:
    """The limits are options with STEER_* variables: lowered, they refuse what passed."""
    proc = steer(
        "simulate", "run", "--omegas", "0:10:1", "--max-orientations", "5",
        "--out", str(tmp_path / "a.steer"),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "at most 5 are accepted" in proc.stderr
    proc = steer(
        "simulate", "run", "--omegas", "0:2:1", "--events-per-orientation", "2000",
        "--out", str(tmp_path / "b.steer"), env={"STEER_MAX_EVENTS_PER_ORIENTATION": "1000"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "at most 1e+03" in proc.stderr
    assert "STEER_MAX_EVENTS_PER_ORIENTATION" in proc.stderr
    assert not (tmp_path / "b.steer").exists()


def test_replay_speed_must_be_a_number(tmp_path: Path) -> None:
    run = tmp_path / "x.steer"
    run.write_bytes(b"")
    proc = steer("replay", str(run), "--bootstrap", "127.0.0.1:1", "--speed", "abc")
    assert proc.returncode == 2, proc.stderr
    assert "'abc' is not a speed" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_simulate_powder_run_then_fold_detects_the_powder(tmp_path: Path) -> None:
    """`steer simulate run --powder` then `steer fold`: the run start says powder, and the
    fold makes S(|Q|, E) on the powder grid without being told."""
    out = tmp_path / "al.steer"
    proc = steer(
        "simulate", "run", "--material", "Al", "--powder", "--ei", "50", "--steps", "2",
        "--count-time", "2", "--events-per-orientation", "50000", "--temperature", "300",
        "--phonon-mesh", "16", "--out", str(out), "--quiet", "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["orientations"] == 2
    with RunReader(out) as reader:
        assert not any(dict(m.headers).get("schema") == b"f144" and b"omega" in m.payload
                       for m in reader)  # fmt: skip
    h5 = tmp_path / "al.h5"
    proc = steer("fold", str(out), "--out", str(h5), "--check", "--json")
    assert proc.returncode == 0, proc.stderr
    folded = json.loads(proc.stdout)
    assert folded["orientations"] == 2
    assert folded["segmentation"] == "bluesky"
    assert folded["dropped_by_reason"]["moving"] == 0
    # the comparison with the one-phonon powder average (its quality: test_powder_fold.py)
    assert set(folded["powder_check"]) == {
        "chi2_per_bin", "pearson", "median_relative_deviation", "bins_compared",
    }  # fmt: skip
    assert folded["powder_check"]["bins_compared"] > 0
    import h5py

    with h5py.File(h5, "r") as f:
        assert f["entry"].attrs["sample_kind"] == "powder"
        assert f["entry/iqe/intensity"].shape == (200, 90)
