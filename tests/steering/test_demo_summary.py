"""The demo's summary for people says what the fits' background scans did."""

from __future__ import annotations

from steering.demo import format_summary


def test_the_summary_counts_the_background_scans() -> None:
    base = {"fc": {}, "chunk_to_estimate_latency": {"p50_s": 1.0, "p99_s": 2.0, "n": 3}}
    text = format_summary(base | {"scans": {"started": 3, "found": 1, "adopted": 1}})
    assert "background scans of the fits: 3 run, 1 found a lower minimum, 1 taken" in text
    assert "background scans of the fits: off" in format_summary(base | {"scans": None})
