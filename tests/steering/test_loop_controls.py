"""The steering loop applies the people's controls to its advice: pause, excluded angles, a
forced angle used once (a fake advisor and candidates: no model, no broker)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from steering.advisor.controls import AdvisorControls
from steering.loop import SteeringLoop

OMEGAS = np.array([0.0, 10.0, 20.0, 30.0, 40.0])


class _Ranking:
    """Candidates ranked by descending angle (a stand-in for the advisor's ranking)."""

    def __init__(self, omegas: np.ndarray) -> None:
        self.omegas = sorted(map(float, omegas), reverse=True)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        cands = [{"omega": w, "score": 1.0 / (1 + k)} for k, w in enumerate(self.omegas)]
        return {"basis": "coverage", "n_candidates": len(cands), "candidates": cands[:top]}


class _Advisor:
    def rank(self, omegas: np.ndarray, coverage: np.ndarray, **kw: Any) -> _Ranking:
        return _Ranking(omegas)


class _Candidates:
    def __init__(self, ready: int) -> None:
        self.omegas = OMEGAS
        self.n_ready = ready

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def ready(self) -> tuple[np.ndarray, np.ndarray]:
        return self.omegas[: self.n_ready], np.zeros((self.n_ready, 2, 2))


def _loop(ready: int = 5, controls: AdvisorControls | None = None) -> SteeringLoop:
    got: list[dict[str, Any]] = []
    loop = SteeringLoop(
        None,
        _Advisor(),  # type: ignore[arg-type]
        _Candidates(ready),  # type: ignore[arg-type]
        sinks=[got.append],
        run_id="run-c",
        controls=controls,
    )
    loop.got = got  # type: ignore[attr-defined]
    return loop


def _measure(loop: SteeringLoop, omega: float) -> dict[str, Any]:
    n = len(loop.history) + 1
    snap = SimpleNamespace(n_orientations=n, counts=None, exposure=None)
    rec = SimpleNamespace(omega=omega, index=n - 1, proton_charge=1.0)
    loop.advise(snap, rec, {"fc": {}}, np.zeros(1), np.ones(1))  # type: ignore[arg-type]
    return loop.history[-1]


def test_the_loop_applies_pause_exclusions_and_a_forced_angle() -> None:
    loop = _loop()
    a = _measure(loop, 0.0)
    assert a["state"] == "measuring"
    assert a["next"] == {"omega": 40.0, "source": "advisor", "by": None}
    assert a["controls"]["paused"] is False
    assert loop.got == loop.history  # type: ignore[attr-defined]

    loop.controls.exclude(35.0, 45.0, "alice", (0.0, 40.0))
    a = _measure(loop, 10.0)
    assert [c["omega"] for c in a["ranking"]["candidates"]] == [30.0, 20.0, 10.0, 0.0]
    assert a["ranking"]["excluded"] == 1
    assert a["next"] == {"omega": 30.0, "source": "advisor", "by": None}

    loop.controls.force(20.0, "bob", (0.0, 40.0))
    a = _measure(loop, 30.0)
    assert a["next"] == {"omega": 20.0, "source": "forced", "by": "bob"}
    a = _measure(loop, 20.0)  # the forced angle was measured: used up
    assert a["next"] == {"omega": 30.0, "source": "advisor", "by": None}
    assert loop.controls.forced_next is None
    assert [o["action"] for o in a["controls"]["overrides"]] == ["exclude", "force", "forced_used"]

    loop.controls.pause("alice")
    a = _measure(loop, 40.0)
    assert a["state"] == "paused"
    assert a["next"] is None
    assert a["ranking"] is not None  # still ranked, for the record
    loop.controls.resume("alice")
    assert _measure(loop, 0.0)["state"] == "measuring"


def test_waiting_without_a_ranking_and_a_short_override_log_in_the_advice() -> None:
    controls = AdvisorControls()
    for _ in range(30):
        controls.pause("alice")
    loop = _loop(ready=0, controls=controls)
    controls.resume("alice")
    a = _measure(loop, 0.0)
    assert a["ranking"] is None
    assert a["state"] == "waiting"
    assert a["next"] is None
    assert len(a["controls"]["overrides"]) == SteeringLoop.ADVICE_OVERRIDES
    assert a["controls"]["n_overrides"] == 31
    assert {"run_id", "n_orientations", "omega", "estimate", "seconds"} <= set(a)
