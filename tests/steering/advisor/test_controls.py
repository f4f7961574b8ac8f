"""The advisor's controls: validation, what they allow, the log and the round trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from steering.advisor.controls import MAX_EXCLUDED, AdvisorControls, check_target
from steering.exceptions import AdvisorError, ControlsConflict

RANGE = (0.0, 90.0)  # the goniometer's range: the run's candidate angles' min..max, deg


def test_excluded_ranges_are_closed_and_checked() -> None:
    c = AdvisorControls()
    c.exclude(10.0, 20.0, "alice", RANGE)
    c.exclude(80.0, 120.0, "bob", RANGE)  # partly outside: still excludes 80..90
    np.testing.assert_array_equal(
        c.allowed([9.9, 10.0, 15.0, 20.0, 20.1, 85.0]), [True, False, False, False, True, False]
    )
    for lo, hi, why in [
        (20.0, 20.0, "empty or reversed"),
        (30.0, 20.0, "empty or reversed"),
        (95.0, 120.0, "outside the goniometer"),
        (-50.0, -1.0, "outside the goniometer"),
        (float("nan"), 10.0, "finite"),
        (0.0, float("inf"), "finite"),
    ]:
        with pytest.raises(AdvisorError, match=why):
            c.exclude(lo, hi, "alice", RANGE)
    assert len(c.excluded) == 2
    c.clear_excluded("alice")
    assert c.excluded == []
    assert c.allowed([15.0]).all()
    for k in range(MAX_EXCLUDED):
        c.exclude(float(k) / 2, float(k) / 2 + 0.1, None)
    with pytest.raises(AdvisorError, match="at most"):
        c.exclude(50.0, 51.0, None)


def test_forced_angle_is_checked_against_the_range_and_the_exclusions() -> None:
    c = AdvisorControls()
    c.exclude(10.0, 20.0, "alice", RANGE)
    with pytest.raises(AdvisorError, match="outside the goniometer"):
        c.force(100.0, "bob", RANGE)
    with pytest.raises(AdvisorError, match="finite"):
        c.force(float("nan"), "bob", RANGE)
    with pytest.raises(ControlsConflict, match="excluded range"):
        c.force(15.0, "bob", RANGE)
    c.force(45.0, "bob", RANGE)
    with pytest.raises(ControlsConflict, match="forced next angle"):
        c.exclude(40.0, 50.0, "alice", RANGE)
    assert (c.forced_next, c.forced_by) == (45.0, "bob")
    c.force(200.0, "bob")  # no range known: only finiteness is checked
    assert c.forced_next == 200.0


def test_next_angle_pause_and_the_forced_angle_used_once() -> None:
    ranked = [{"omega": 12.0}, {"omega": 30.0}, {"omega": 60.0}]
    c = AdvisorControls()
    assert c.next_angle(ranked) == {"omega": 12.0, "source": "advisor", "by": None}
    c.exclude(10.0, 20.0, "alice", RANGE)
    assert c.next_angle(ranked) == {"omega": 30.0, "source": "advisor", "by": None}
    c.force(60.0, "bob", RANGE)
    assert c.measured(30.0) is None  # not offered yet: kept
    assert c.next_angle(ranked, offer=True) == {"omega": 60.0, "source": "forced", "by": "bob"}
    used = c.measured(33.0)  # the next orientation after it was offered uses it up
    assert used is not None
    assert used["action"] == "forced_used"
    assert c.forced_next is None
    assert c.next_angle(ranked)["source"] == "advisor"  # type: ignore[index]
    c.pause("alice")
    assert c.next_angle(ranked) is None
    assert c.state_name(ranked=True) == "paused"
    c.resume("alice")
    assert c.state_name(ranked=True) == "measuring"
    assert c.state_name(ranked=False) == "waiting"
    assert c.next_angle([{"omega": 15.0}]) is None  # everything listed is excluded


def test_target_is_validated_and_stored() -> None:
    assert check_target({"std": {"1NN_xx": 0.05}, "d_criterion": 1e-3}) == {
        "std": {"1NN_xx": 0.05},
        "d_criterion": 1e-3,
    }
    bad: list[Any] = [
        {},
        {"std": {}},
        {"std": {"1NN_xx": -0.1}},
        {"std": {"1NN_xx": float("nan")}},
        {"std": {"1NN_xx": True}},
        {"d_criterion": 0.0},
        {"d_criterion": float("inf")},
        {"precision": 1.0},
        [1, 2],
    ]
    for target in bad:
        with pytest.raises(AdvisorError):
            check_target(target)
    c = AdvisorControls()
    c.set_target({"d_criterion": 2e-3}, "alice")
    assert c.target == {"d_criterion": 2e-3}
    c.clear_target("alice")
    assert c.target is None


def test_every_change_is_logged_stored_and_read_back() -> None:
    stored: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
    c = AdvisorControls(store=lambda state, rec: stored.append((state, rec)))
    c.pause("alice")
    c.exclude(10.0, 20.0, "bob", RANGE)
    c.force(45.0, "bob", RANGE)
    c.set_target({"std": {"1NN_xx": 0.05}}, "alice")
    assert [(o["action"], o["who"]) for o in c.overrides] == [
        ("pause", "alice"),
        ("exclude", "bob"),
        ("force", "bob"),
        ("target", "alice"),
    ]
    assert all(o["at"].endswith("+00:00") for o in c.overrides)  # ISO 8601, UTC
    assert [rec for _, rec in stored] == c.overrides
    assert stored[-1][0]["excluded"] == [[10.0, 20.0]]
    back = AdvisorControls.from_dict(c.to_dict())
    assert back == c
    assert back.to_dict(last=2)["overrides"] == c.overrides[-2:]
    assert back.to_dict(last=2)["n_overrides"] == 4
    with pytest.raises(AdvisorError, match="empty or reversed"):
        AdvisorControls.from_dict({"excluded": [[5.0, 1.0]]})
