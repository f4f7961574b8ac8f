"""Closed-loop benchmark: strategy orders, the target rule, and a small real loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulations.fcdb.reference import resolve_fc
from steering.advisor.closedloop import (
    CandidateData,
    _cache_key,
    _to_target,
    load_or_simulate,
    spread_order,
)
from steering.exceptions import AdvisorError
from tests.paths import MODELS

MODEL = MODELS / "ge"


def test_spread_order_is_coarse_to_fine_and_complete() -> None:
    order = spread_order(120)
    assert sorted(order) == list(range(120))
    assert order[:15] == list(range(0, 120, 8))
    assert order[15:30] == list(range(4, 120, 8))
    assert spread_order(8, coarse=4) == [0, 4, 2, 6, 1, 3, 5, 7]


def test_orientations_to_target_needs_the_error_to_stay_within_the_band() -> None:
    # within 10 % of 1.0 from the 3rd on, though the 2nd dipped in and out
    assert _to_target([3.0, 1.05, 2.0, 1.08, 0.9, 1.0], 1.0, 0.1) == 4
    assert _to_target([1.0, 1.0], 1.0, 0.1) == 1
    assert _to_target([5.0, 4.0, 1.0], 1.0, 0.1) == 3
    assert _to_target([1.0, float("nan"), 1.0], 1.0, 0.1) == 3  # NaN is not within
    assert _to_target([1.0, float("nan")], 1.0, 0.1) is None


def test_candidate_cache_key(tmp_path: Path) -> None:
    """One flat file name per material, FC set, seed, events and angles; an FC file is keyed
    by its contents."""
    w = np.arange(3.0)
    key = _cache_key("Ge", "chgnet-0.3.0", w, 0, 2e5)
    assert key.startswith("Ge-chgnet-0.3.0-seed0-")
    assert key.endswith(".npz")
    assert key == _cache_key("Ge", "chgnet-0.3.0", w, 0, 200000)
    assert key != _cache_key("Ge", "chgnet-0.3.0", w, 1, 2e5)
    assert key != _cache_key("Ge", "chgnet-0.3.0", w + 0.5, 0, 2e5)
    fc = tmp_path / "my fc.json"
    fc.write_text('{"1NN_xx": 1.0}')
    first = _cache_key("Ge", str(fc), w, 0, 2e5)
    assert "/" not in first
    assert first.startswith("Ge-my_fc-seed0-")
    fc.write_text('{"1NN_xx": 2.0}')
    assert _cache_key("Ge", str(fc), w, 0, 2e5) != first


def test_closed_loop_on_the_committed_ge_model(tmp_path: Path, ge) -> None:  # type: ignore[no-untyped-def]
    """Six candidates, two strategies, small runs: every strategy measures every
    candidate once, and after all of them all reach the same (target) error."""
    from steering.advisor.closedloop import closed_loop

    r = closed_loop(
        "Ge",
        "raman",
        model=MODEL,
        strategies=["advisor", "sequential"],
        budget=6,
        seeds=1,
        candidates=np.arange(0.0, 60.0, 10.0),
        events_per_orientation=2e4,
        progress=False,
        plot=tmp_path / "curves.png",
        cache_dir=tmp_path / "cache",
    )
    target = r["target_error"][0]
    for name in ("advisor", "sequential"):
        entry = r["strategies"][name]
        curve = entry["curve"][0]
        assert len(curve["error"]) == len(curve["std"]) == 6
        # (sums in another order: float rounding only)
        assert entry["final_error"][0] == pytest.approx(target, rel=1e-4)
        assert 1 <= entry["orientations_to_target"][0] <= 6
        # a looser band is reached no later
        assert 1 <= entry["orientations_to_loose_target"][0] <= entry["orientations_to_target"][0]
    assert "advisor/sequential" in r["ratios"]
    assert "advisor/sequential" in r["ratios_loose"]
    assert (r["tolerance"], r["loose_tolerance"]) == (0.10, 0.25)
    assert r["advisor_rank_seconds_median"] < 5
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    assert r["advisor_weighting"] == "scarcity"
    assert r["seeds"] == [0]
    # the simulated candidates were kept: the same arguments read them back, bit for bit
    (kept,) = (tmp_path / "cache").glob("Ge-raman-seed0-*.npz")

    def load() -> CandidateData:
        return load_or_simulate(
            "Ge",
            "raman",
            np.arange(0.0, 60.0, 10.0),
            seed=0,
            events_per_orientation=2e4,
            cache_dir=tmp_path / "cache",
        )

    again = load()
    with np.load(kept) as z:
        np.testing.assert_array_equal(again.counts, z["counts"])
        np.testing.assert_array_equal(again.exposure, z["exposure"])
    # a damaged file is simulated again (the same seed gives the same events) and replaced
    kept.write_bytes(kept.read_bytes()[:1000])
    redone = load()
    np.testing.assert_array_equal(redone.counts, again.counts)
    with np.load(kept) as z:
        np.testing.assert_array_equal(z["counts"], again.counts)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [kept.name]
    _, coefficients = resolve_fc("Ge", "raman", ge)
    assert again.truth == dict(zip(ge.basis.names, map(float, coefficients), strict=True))
    with pytest.raises(AdvisorError, match="tolerance"):
        closed_loop("Ge", "raman", model=MODEL, budget=2, seeds=1, loose_tolerance=0.05)
    with pytest.raises(AdvisorError, match="first seed"):
        closed_loop("Ge", "raman", model=MODEL, budget=2, seeds=1, first_seed=-1)
    with pytest.raises(AdvisorError, match="unknown strategy"):
        closed_loop("Ge", "raman", model=MODEL, strategies=["bogus"], budget=2, seeds=1)


def test_advise_rank_cli_errors_and_coverage_mode() -> None:
    def steer(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "steering.cli", "advise", "rank", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    empty = steer("--candidates", "10:10")
    assert empty.returncode == 2
    assert "empty" in empty.stderr
    bogus = steer("--score", "bogus")
    assert bogus.returncode == 2
    assert all(s in bogus.stderr for s in ("--score", "'bogus'", "'spectrum'", "'fc'"))
    unweighted = steer("--weighting", "bogus")
    assert unweighted.returncode == 2
    assert all(
        s in unweighted.stderr for s in ("--weighting", "'bogus'", "'scarcity'", "'uniform'")
    )
    far = steer("--candidates", "400:420")
    assert far.returncode == 2
    assert "goniometer limits" in far.stderr
    ok = steer("--candidates", "0:30:10", "--json")
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["basis"] == "coverage"
    assert out["weighting"] == "scarcity"
    assert "coverage alone" in out["note"]
    assert [c["omega"] for c in out["candidates"]] != []
