"""Shared fixtures. Heavy objects are built once per session; tests get them read-only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.kafka import EmbeddedBroker
from simulations.lattice.materials import MaterialSetup, setup


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


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    """A real Kafka-protocol broker (the embedded Tansu), one per test module."""
    b = EmbeddedBroker()
    b.start()
    yield b
    b.stop()


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
    from simulations.runs.simulate import RunPlan, simulate_run

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


def consume_cmd(bootstrap: str, prefix: str, state: Path, idle_exit_s: float = 20) -> list[str]:
    """``steer consume`` of ``prefix`` into ``state`` (JSON summary on stdout)."""
    import sys

    return [
        sys.executable, "-m", "steering.cli", "consume", "--bootstrap", bootstrap,
        "--prefix", prefix, "--state-dir", str(state), "--idle-exit", str(idle_exit_s), "--json",
    ]  # fmt: skip


def kill_restart_cycles(
    bootstrap: str,
    prefix: str,
    state: Path,
    kills: int,
    rng: np.random.Generator,
    *,
    max_delay_s: float,
    sender: Any,
) -> list[dict[str, Any]]:
    """Start ``steer consume`` and ``kill -9`` it ``kills`` times, each at a random moment
    (up to ``max_delay_s``) after it has written a new checkpoint (so that a slow start on a
    loaded machine cannot make a kill moot). Returns one record per kill: seconds since the
    first start, whether ``sender`` (the replay thread) was still sending, whether a
    checkpoint existed."""
    import signal
    import subprocess
    import time

    ckpt = state / "checkpoint.npz"
    t0 = time.perf_counter()
    out: list[dict[str, Any]] = []
    for _ in range(kills):
        before = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        proc = subprocess.Popen(
            consume_cmd(bootstrap, prefix, state),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            if ckpt.exists() and ckpt.stat().st_mtime_ns != before:
                break
            time.sleep(0.02)
        time.sleep(float(rng.uniform(0.0, max_delay_s)))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            out.append(
                {
                    "at_s": round(time.perf_counter() - t0, 2),
                    "during_replay": sender.is_alive(),
                    "checkpoint_existed": ckpt.exists(),
                }
            )
    return out


@pytest.fixture(scope="session")
def make_small_run() -> Any:
    """:func:`small_ge_run`, for module-scoped fixtures."""
    return small_ge_run


def _estimate(k: int) -> dict[str, Any]:
    return {
        "model_version": "Ge-test",
        "fc": {"1NN_xx": {"mean": -3.0 + 0.01 * k, "std": 0.1 / k, "q05": -3.2, "q95": -2.8}},
        "units": "eV/A^2",
        "out_of_domain": False,
    }


@pytest.fixture
def filled(tmp_path: Path, ge) -> tuple[Any, Any, str]:  # type: ignore[no-untyped-def]
    """A run history with one run (3 estimates, one advice) and its live snapshot."""
    from consumers.reduction.accumulate import RunAccumulator
    from steering.api.app import LiveState
    from steering.db import History

    url = f"sqlite:///{tmp_path / 'steer.db'}"
    history = History(url)
    history.upsert_run("run-1", material="Ge", n_orientations=3, summary={"events_folded": 9})
    for k in (1, 2, 3):
        history.add_estimate("run-1", n_orientations=k, omega=float(k), estimate=_estimate(k))
    history.add_advice(
        "run-1", n_orientations=3, ranking={"basis": "coverage", "candidates": [{"omega": 7.0}]}
    )
    acc = RunAccumulator(ge.grid)
    counts = np.zeros(ge.grid.shape)
    counts[10, 20] = 5
    coverage = np.zeros(ge.grid.shape)
    coverage[10:20, 10:30] = 1.0
    acc.add(counts, coverage, omega=0.0, proton_charge=2.0, events=5, dropped={})
    live = LiveState(reload=lambda: "Ge-reloaded", model_version="Ge-test")
    live.snapshots["run-1"] = acc.snapshot()
    live.grids["run-1"] = {"energy": ge.grid.energy_centres.tolist()}
    return history, live, url
