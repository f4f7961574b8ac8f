"""The demo's summary for people says what the fits' background scans did; the demo waits
for a run at real time as long as it takes."""

from __future__ import annotations

from steering.demo import default_timeout, format_summary


def test_the_summary_counts_the_background_scans() -> None:
    base = {"fc": {}, "chunk_to_estimate_latency": {"p50_s": 1.0, "p99_s": 2.0, "n": 3}}
    text = format_summary(base | {"scans": {"started": 3, "found": 1, "adopted": 1}})
    assert "background scans of the fits: 3 run, 1 found a lower minimum, 1 taken" in text
    assert "background scans of the fits: off" in format_summary(base | {"scans": None})
    assert "exact-fold correction of the counts model: off" in text
    made = {"corrected": 120, "orientations": 120, "folds": 127, "refreshed": 7}
    text = format_summary(base | {"exact_correction": made | {"fold_seconds": 36.9}})
    assert "120 of 120 orientations corrected for the last estimate, 127 folds (7 made" in text
    assert "36.9 s a fold" in text
    # nothing folded yet, one fold failed: no fold time, the failure said
    text = format_summary(base | {"exact_correction": made | {"fold_seconds": None, "failed": 1}})
    assert "None" not in text.split("exact-fold correction")[1].splitlines()[0]
    assert "1 failed" in text


def test_the_demo_waits_for_a_run_at_real_time() -> None:
    # 120 orientations at 1x count two hours: the wait must outlast them
    assert default_timeout(120, 1.0) > 120 * 60.0
    # a fast replay keeps the half-hour floor; the wait falls with the speed
    assert default_timeout(60, 60.0) == 1800.0
    assert default_timeout(120, 2.0) < default_timeout(120, 1.0)
