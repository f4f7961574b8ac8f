"""Deployment artefacts checked against the code they describe."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import consumers.metrics  # noqa: F401  (registers the metrics)
import steering.metrics  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def _families() -> set[str]:
    return {f.name for f in text_string_to_metric_families(generate_latest().decode())}


def test_grafana_dashboard_uses_only_metrics_the_service_exports() -> None:
    dash = json.loads((ROOT / "deploy/grafana/steer-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\bsteer_[a-z_]+", e)}
    base = {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in used}
    missing = base - _families()
    assert not missing, f"dashboard queries metrics nobody exports: {sorted(missing)}"
    # and every metric the service exports is on the dashboard
    steer = {f for f in _families() if f.startswith("steer_") and not f.endswith("_created")}
    unseen = steer - base
    assert not unseen, f"metrics missing from the dashboard: {sorted(unseen)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
