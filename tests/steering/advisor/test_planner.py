"""The information planner: expected gain of the refined posterior per beam time, checked
against the Fisher information of the folded counts computed directly, and the stop state."""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import numpy as np
import pytest

from steering.advisor.controls import allowed, check_target
from steering.advisor.planner import BeamCost, InformationPlanner, check_ranges
from steering.exceptions import AdvisorError
from tests.ge_moments import ge_moments, ge_run, replica_counts

#: the first orientation's angle and the candidates (nodes every 4 degrees)
FIRST = 0.0
OMEGAS = np.arange(0.0, 9.0)


@lru_cache(maxsize=1)
def _posterior() -> tuple[Any, Any, Any]:
    """A refined posterior after one Ge orientation (README count level) and its model."""
    run = ge_run()
    r = run.refiner
    m = ge_moments((FIRST,))
    model = r.model(m)
    theta = model.theta(run.truth)
    signal = model.evaluate(theta, jacobian=False).expected.sum()
    theta[-4] = np.log(12600.0 / signal)
    theta[-3] = 1260.0 / model.background_shape.sum()
    _, counts = replica_counts(model, theta, np.random.default_rng(7))
    fit = r.refine(counts, m, [dict(zip(r.names, run.truth, strict=True))])
    assert fit.converged
    return fit, r.last_model, theta


@lru_cache(maxsize=1)
def _planner() -> InformationPlanner:
    run = ge_run()
    fit, model, _ = _posterior()
    p = InformationPlanner(
        run.refiner, run.folder, OMEGAS, node_step=4.0, samples=2, pixel_stride=2, e_substeps=4
    )
    p.prepare()
    p.refresh(fit.theta, fit.covariance, model, charge=1.0, inflation=fit.inflation)
    return p


def test_ranges_targets_and_costs_are_checked() -> None:
    assert check_ranges([(10, 20)], 0, 119) == [(10.0, 20.0)]
    with pytest.raises(AdvisorError, match="empty"):
        check_ranges([(20, 10)], 0, 119)
    with pytest.raises(AdvisorError, match="outside the goniometer"):
        check_ranges([(150, 160)], 0, 119)
    with pytest.raises(AdvisorError, match="not finite"):
        check_ranges([(float("nan"), 3)], 0, 119)
    assert allowed([0, 5, 10, 15], [(4, 10)]).tolist() == [True, False, False, True]
    names = ("1NN_xx", "1NN_xy")
    assert check_target({"std": {"1NN_xx": 0.01}}, names) == {"std": {"1NN_xx": 0.01}}
    with pytest.raises(AdvisorError, match="not a coefficient"):
        check_target({"std": {"9NN_xx": 0.01}}, names)
    with pytest.raises(AdvisorError, match="> 0"):
        check_target({"std": {"1NN_xx": -1}}, names)
    with pytest.raises(AdvisorError, match="d_criterion"):
        check_target({"d_criterion": 0}, names)
    with pytest.raises(AdvisorError, match="a target is"):
        check_target({"precision": 1}, names)
    with pytest.raises(AdvisorError, match="speed"):
        BeamCost(0.0)
    cost = BeamCost(2.0, 3.0)
    assert cost.travel_s(10.0, np.array([10.0, 30.0])).tolist() == [0.0, 13.0]


def test_the_gain_is_the_folded_counts_information() -> None:
    """The predicted std after a count at a node equals the std from the Fisher information
    of the folded sum (the run's counts plus the node's) computed on the summed moments."""
    run = ge_run()
    r = run.refiner
    p = _planner()
    fit, _, _theta = _posterior()
    ranked = {c.omega: c for c in p.rank(fit.covariance, current=None)}
    for w in (0.0, 8.0):
        m = ge_moments((FIRST,)).copy()
        m.add(ge_moments((w,)), 1.0)
        model = r.model(m)
        ev = model.evaluate(fit.theta)
        jac = ev.jacobian
        fisher = jac.T @ (jac / ev.expected[:, None])
        # the coefficients' block with the nuisances profiled as the refinement does
        k = len(r.names)
        prec = np.concatenate([r.prior.precision, np.zeros(fisher.shape[0] - k)])
        cov = np.linalg.inv(fisher + np.diag(prec))[:k, :k] * fit.inflation
        direct = np.sqrt(np.diag(cov))
        predicted = np.array([ranked[w].predicted_std[n] for n in r.names])
        assert np.allclose(predicted[:4], direct[:4], rtol=0.1), (w, predicted[:4], direct[:4])
    # a revisit of the measured angle adds more than an angle whose Q differ (the fold's
    # loss), and every gain is positive
    assert ranked[0.0].gain > ranked[8.0].gain > 0


def test_the_nodes_hold_their_moments_and_single_precision_jacobians_only() -> None:
    """After a refresh the nodes' models keep no forward pass, and their information terms
    are the coefficients' Jacobian columns in single precision, not views of the whole."""
    p = _planner()
    k = len(p.names)
    models = [m for m in p._models.values() if m is not None]
    assert models
    assert all(m._last is None for m in models)
    assert p._node_cache is not None
    for per in p._node_cache[2]:
        for term in per:
            if term is None:
                continue
            bins, _expected, jac = term
            assert jac.dtype == np.float32
            assert jac.shape == (len(bins), k)
            assert jac.base is None
    held = p.held_bytes()
    assert held["models"] == sum(m.nbytes for m in models)
    assert 0 < held["terms"] < held["models"]


def test_ranking_respects_travel_forbidden_ranges_and_count_times() -> None:
    p = _planner()
    fit, _, _ = _posterior()
    near = p.rank(fit.covariance, current=8.0)
    free = p.rank(fit.covariance, current=None)
    by = {c.omega: c for c in near}
    assert by[8.0].travel_s == 0.0
    assert by[0.0].travel_s == pytest.approx(8.0 + 1.0)
    assert by[0.0].gain == pytest.approx({c.omega: c for c in free}[0.0].gain)
    scores = [c.gain_per_minute for c in near]
    assert scores == sorted(scores, reverse=True)
    assert all(c.gain_per_minute == pytest.approx(60 * c.gain / c.beam_time_s) for c in near)
    kept = p.rank(fit.covariance, forbidden=[(0.0, 3.5)])
    assert min(c.omega for c in kept) == 4.0
    with pytest.raises(AdvisorError, match="forbidden"):
        p.rank(fit.covariance, forbidden=[(0.0, 8.0)])
    with pytest.raises(AdvisorError, match="covariance"):
        p.rank(np.eye(3))


def test_stop_state() -> None:
    p = _planner()
    fit, _, _ = _posterior()
    names = p.names
    std = np.sqrt(np.diag(fit.covariance))
    done = p.stop(fit.covariance, {"std": {names[0]: 1.01 * std[0]}})
    assert done.state == "done"
    assert done.met
    assert done.expected_beam_time_s == 0.0
    half = p.stop(fit.covariance, {"std": {names[0]: 0.7 * std[0]}}, current=FIRST)
    assert half.state == "measuring"
    assert not half.met
    assert half.expected_orientations is not None
    assert half.expected_orientations >= 1
    assert half.expected_beam_time_s >= 60.0 * half.expected_orientations
    never = p.stop(
        fit.covariance, {"std": {names[0]: 1e-4 * std[0]}}, current=FIRST, max_beam_time_s=600
    )
    assert never.state == "unreachable"
    assert never.expected_beam_time_s is None
    assert never.best_reachable_std is not None
    assert 1e-4 * std[0] < never.best_reachable_std[names[0]] < std[0]
    assert p.stop(fit.covariance, None).state == "no target"
    out = half.to_dict()
    assert set(out) >= {"state", "met", "target", "expected_beam_time_s", "std"}


def test_background_refresh_never_holds_the_estimate_back() -> None:
    """The service's refresh: the nodes' Jacobians are made on a thread; until the first
    ones exist the plan says it is not ready, then it ranks with the last ones."""
    from steering.advisor.planner import PlanNotReady

    run = ge_run()
    fit, model, _ = _posterior()
    p = InformationPlanner(
        run.refiner, run.folder, OMEGAS, node_step=8.0, samples=1, pixel_stride=4
    )
    p.prepare()
    with pytest.raises(PlanNotReady, match="being computed"):
        p.refresh(fit.theta, fit.covariance, model, charge=1.0, background=True)
    assert p._node_thread is not None
    p._node_thread.join(120)
    p.refresh(fit.theta, fit.covariance, model, charge=1.0, background=True, reuse_within=1.0)
    assert p.rank(fit.covariance)[0].gain > 0


def test_a_run_that_ends_before_the_plan_is_ready_gets_its_last_advice_planned() -> None:
    """A run shorter than the nodes' information (a fast replay): its last advice has no
    plan when it is made; the run's end plans it (the loop's ``finish``), once, with the
    controls applied again without using anything up."""
    from types import SimpleNamespace

    from steering.loop import SteeringLoop
    from tests.steering.test_loop_controls import _Advisor, _Candidates

    run = ge_run()
    fit, model, _ = _posterior()
    p = InformationPlanner(
        run.refiner, run.folder, OMEGAS, node_step=8.0, samples=1, pixel_stride=4
    )
    p.prepare()
    got: list[dict[str, Any]] = []
    loop = SteeringLoop(None, _Advisor(), _Candidates(5), sinks=[got.append], planner=p)  # type: ignore[arg-type]
    assert loop.finish(1.0) is None  # nothing advised yet
    loop._posterior = (fit.theta, fit.covariance, fit.inflation, model)
    snap = SimpleNamespace(n_orientations=1, counts=None, exposure=None)
    rec = SimpleNamespace(omega=FIRST, index=0, proton_charge=1.0)
    loop.advise(snap, rec, {"fc": {}}, np.zeros(1), np.ones(1))  # type: ignore[arg-type]
    last = got[-1]
    assert last["plan"] is None
    assert "being computed" in last["plan_error"]
    assert last["next"]["source"] == "advisor"  # the ranking's best meanwhile

    t0 = time.monotonic()
    assert loop.finish(120.0, cancelled=lambda: True) is None  # a stop: no wait, no plan
    assert time.monotonic() - t0 < 60.0  # not the 120 s wait
    assert loop.history[-1]["plan"] is None
    amended = loop.finish(120.0)
    assert amended is not None
    assert "run's end" in amended["amended"]
    assert loop.history[-1] is amended
    assert "plan_error" not in amended
    plan = amended["plan"]
    assert plan["basis"] == "information-per-beam-time"
    assert amended["next"]["omega"] == plan["candidates"][0]["omega"]
    assert amended["state"] in ("measuring", "done")
    assert len(got) == 1  # the sinks are the caller's to choose (the service: history, topic)
    assert loop.finish(1.0) is None  # planned once
