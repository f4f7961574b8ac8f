"""The powder temperature series through the whole service (``steer demo --powder-series``),
two temperatures of two short steps each: every run folded and refined step by step by the
service, run after run on the same topics, the final estimates near the stated truth."""

from __future__ import annotations

import json
import math
from pathlib import Path

from steering.demo import run_powder_series_demo


def test_powder_series_through_the_service(tmp_path: Path) -> None:
    result = run_powder_series_demo(
        tmp_path, temperatures=(50.0, 640.0), steps=2, events_per_step=5e4, speed=600.0
    )
    runs = result["runs"]
    assert [r["run_id"] for r in runs] == ["al-powder-50K", "al-powder-640K"]
    for r in runs:
        assert r["estimates"] >= 2
        assert r["source"] == "refined"  # the counts, not a model
        assert set(r["fc"]) == {"1NN_xx", "1NN_zz", "1NN_xy", "2NN_xx", "2NN_yy"}
        for v in r["fc"].values():
            assert math.isfinite(v["mean"])
            assert v["std"] > 0
            assert abs(v["error_over_std"]) < 4  # the truth in reach of the counts' std
    # the truth softens by 14.75 % from 50 to 640 K; the service sees it in 1NN_xx
    a, b = (r["fc"]["1NN_xx"] for r in runs)
    assert b["mean"] > a["mean"] + 3 * math.hypot(a["std"], b["std"])  # less negative
    assert result["live_equals_offline"] is True
    assert json.loads((tmp_path / "powder_series_summary.json").read_text())["steps"] == 2
    assert Path(result["figure"]).stat().st_size > 10_000
