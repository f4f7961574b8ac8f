"""Shared fixtures. Heavy objects are built once per session; tests get them read-only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simulations.materials import MaterialSetup, setup


@pytest.fixture(scope="session", autouse=True)
def _table_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Fold tables cached for this session only (the CLI subprocesses inherit it)."""
    path = tmp_path_factory.mktemp("table-cache")
    old = os.environ.get("STEER_CACHE_DIR")
    os.environ["STEER_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("STEER_CACHE_DIR", None)
    else:
        os.environ["STEER_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def ge() -> MaterialSetup:
    return setup("Ge")


@pytest.fixture(scope="session")
def nb() -> MaterialSetup:
    return setup("Nb")


@pytest.fixture(scope="session")
def al() -> MaterialSetup:
    return setup("Al")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)


def small_ge_run(path: Path, omegas: tuple[float, ...], seed: int) -> tuple[Path, Any, Any]:
    """A short simulated Ge ``raman`` run (5e4 events, 5 s per orientation, 16^3 phonon
    mesh) written to ``path``, with its offline fold: ``(path, summary, accumulator)``."""
    from consumers.offline import fold_recorded_run
    from simulations.run import RunPlan, simulate_run

    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=omegas,
        events_per_orientation=5e4,
        count_time=5.0,
        mesh=16,
        seed=seed,
    )
    simulate_run(plan, path, progress=False)
    summary, acc = fold_recorded_run(path, progress=False)
    return path, summary, acc


@pytest.fixture(scope="session")
def make_small_run() -> Any:
    """:func:`small_ge_run`, for module-scoped fixtures."""
    return small_ge_run
