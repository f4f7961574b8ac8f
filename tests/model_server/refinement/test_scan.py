"""The background scan: a live fit in a wrong minimum is scanned on a thread, the lower
minimum it finds is handed over once, and a fit started from it beside the old optimum
ends there; a fit that does not misfit finds nothing; one scan at a time."""

from __future__ import annotations

import numpy as np
import pytest

import model_server.refinement.fit as fit_module
from model_server.refinement.fit import refine
from model_server.refinement.scan import BackgroundScan
from tests.ge_moments import ge_moments, ge_run, replica_counts
from tests.model_server.refinement.test_fit import OMEGAS, _start, _truth_theta


@pytest.fixture
def wrong_minimum(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """(run, model, counts, start, spread, live fit): the misfit case of ``test_fit`` with
    the restarts toward the reference set taken away and the grid's offsets of +-1 spread only
    (to keep it short); the live fit ends in a second minimum far from the truth, misfitting by
    ~15 in Pearson's chi^2 per dof (start seed found by search: one whose fit converges there)."""
    monkeypatch.setattr(fit_module, "_RESTART", ())
    monkeypatch.setattr(fit_module, "SCAN_OFFSETS", (-1.0, 1.0))
    run = ge_run()
    model = run.refiner.model(ge_moments(OMEGAS))
    theta = _truth_theta(model, run.truth, 2e6)
    _, counts = replica_counts(model, theta, np.random.default_rng(11))
    start = _start(run, np.random.default_rng(142), spread=0.35)
    names = list(model.basis.names)
    spread = np.full(len(names), np.nan)
    for n in run.refiner.free:
        spread[names.index(n)] = 0.35 * abs(run.truth[names.index(n)])
    live = refine(model, counts, [start], prior=run.refiner.prior)
    assert live.pearson_chi2_per_dof > 2.0  # the live fit (no scan) is in a wrong minimum
    return run, model, counts, start, spread, live


def test_a_scan_finds_the_lower_minimum_and_the_next_fit_takes_it(wrong_minimum) -> None:  # type: ignore[no-untyped-def]
    run, model, counts, start, spread, live = wrong_minimum
    scan = BackgroundScan(run.refiner.prior)
    assert scan.take() is None
    assert scan.submit(model, counts, live, start, spread, n_orientations=2)
    # one scan at a time: a second snapshot offered meanwhile is skipped, and counted
    assert not scan.submit(model, counts, live, start, spread, n_orientations=3)
    assert scan.skipped == 1
    assert scan.join(timeout=300)
    result = scan.take()
    assert result is not None
    assert scan.take() is None
    assert result.found
    assert result.deviance_per_dof < live.deviance_per_dof
    assert result.n_orientations == 2
    assert scan.due(3)  # found: the next recheck may scan again
    assert result.seconds > 0
    # the next snapshot's fit: the old optimum warm, the scan's coefficients a start; the
    # lower deviance wins, and it is near the truth
    names = list(model.basis.names)
    found = np.array([result.coefficients[n] for n in names])
    nxt = refine(model, counts, [found], prior=run.refiner.prior, warm=live.theta)
    assert nxt.deviance_per_dof <= result.deviance_per_dof + 1e-3
    assert np.all(np.abs(nxt.mean - run.truth)[:4] < 5 * nxt.std[:4])
    assert result.to_dict()["found"] is True


def test_a_fit_in_the_right_minimum_finds_nothing_lower(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit_module, "SCAN_OFFSETS", (1.0, 2.0))  # short: 4 starts
    run = ge_run()
    model = run.refiner.model(ge_moments(OMEGAS))
    theta = _truth_theta(model, run.truth, 2e5)
    _, counts = replica_counts(model, theta, np.random.default_rng(5))
    start = _start(run, np.random.default_rng(6))
    live = refine(model, counts, [start], prior=run.refiner.prior)
    spread = np.full(len(run.truth), 0.05)
    scan = BackgroundScan(run.refiner.prior)
    scan.submit(model, counts, live, start, spread, n_orientations=2)
    assert scan.join(timeout=300)
    result = scan.take()
    assert result is not None
    assert not result.found
    assert result.deviance_per_dof == pytest.approx(live.deviance_per_dof, rel=1e-6)
    assert scan.error is None
    # nothing lower at 2 orientations: the next scan waits for 4
    assert not scan.due(3)
    assert scan.due(4)


def test_a_failed_scan_is_kept_off_the_live_estimate() -> None:
    run = ge_run()
    model = run.refiner.model(ge_moments(OMEGAS))
    theta = _truth_theta(model, run.truth, 2e5)
    _, counts = replica_counts(model, theta, np.random.default_rng(5))
    live = refine(model, counts, [run.truth], prior=run.refiner.prior)
    scan = BackgroundScan(run.refiner.prior)
    scan.submit(model, counts, live, np.full(3, np.nan), np.ones(3), n_orientations=2)
    assert scan.join(timeout=60)
    assert scan.take() is None
    assert scan.error is not None
    assert "finite coefficients" in scan.error


class _VAE:
    """A VAE-like estimate of the free coefficients (what the loop reads of one)."""

    def __init__(self, names: list[str], mean: np.ndarray, std: np.ndarray) -> None:
        self.names, self.mean, self.std = names, mean, std
        self.model_version = "test"

    def to_dict(self) -> dict[str, object]:
        fc = {
            n: {"mean": float(m), "std": float(s)}
            for n, m, s in zip(self.names, self.mean, self.std, strict=True)
        }
        return {"model_version": self.model_version, "fc": fc}


def _vae_and_snapshots(run, start, fraction, counts, moments):  # type: ignore[no-untyped-def]
    """(a VAE-like estimate of the free coefficients at ``start`` with ``fraction`` of the
    truth as its std, a snapshot of ``n`` orientations holding ``counts``)."""
    from types import SimpleNamespace

    names = list(run.refiner.free)
    idx = [run.refiner.names.index(n) for n in names]
    vae = _VAE(names, start[idx], fraction * np.abs(run.truth[idx]))

    def snapshot(n: int) -> SimpleNamespace:
        return SimpleNamespace(
            n_orientations=n, counts=counts, moments=moments, n_classes=1, fitted_counts=counts
        )

    return vae, snapshot


def _misfit_case(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """(run, VAE-like estimate, snapshot maker) of a first fit that misfits: the counts of
    the refiner's own model at the truth (its multiphonon template made there), a start
    that ends in a wrong minimum alone, whose restarts find the truth (seed found by
    search); the scan's grid shortened to the restarts and one start."""
    monkeypatch.setattr(fit_module, "SCAN_OFFSETS", (1.0,))
    run = ge_run()
    moments = ge_moments(OMEGAS)
    model = run.refiner.model(moments, at=run.truth)
    theta = _truth_theta(model, run.truth, 2e6)
    _, counts = replica_counts(model, theta, np.random.default_rng(11))
    start = _start(run, np.random.default_rng(101), spread=0.35)
    vae, snapshot = _vae_and_snapshots(run, start, 0.35, counts, moments)
    return run, vae, snapshot


def test_the_live_loop_scans_a_misfit_and_its_next_estimate_says_so(wrong_minimum) -> None:  # type: ignore[no-untyped-def]
    """The steering loop with a real refiner: a recheck's misfitting fit goes to the
    background scan; the next snapshot's fit starts from what a scan found beside its warm
    start (or the VAE's, when the first fit did not converge), and its estimate says so
    (``scan``); with ``scan=False`` nothing is scanned."""
    from types import SimpleNamespace

    from steering.loop import SteeringLoop

    run, model, counts, start, spread, live = wrong_minimum
    names = list(run.refiner.free)
    idx = [run.refiner.names.index(n) for n in names]
    vae = _VAE(names, start[idx], spread[idx])
    loop = SteeringLoop(None, None, None, refiner=run.refiner)  # type: ignore[arg-type]
    assert loop.scan is not None
    assert SteeringLoop(None, None, None, refiner=run.refiner, scan=False).scan is None  # type: ignore[arg-type]
    moments = ge_moments(OMEGAS)
    first = SimpleNamespace(
        n_orientations=1, counts=counts, moments=moments, n_classes=1, fitted_counts=counts
    )
    est, _, _ = loop._running_estimate(first, vae)  # type: ignore[arg-type]
    assert "scan" not in est
    # a misfit this far off may not converge (then the VAE's estimate stands in, flagged,
    # and the next snapshot is a recheck again: the VAE's start, then the scan's)
    scan_start = "start 0" if est["source"] == "refined" else "start 1"
    # the fixture's counts carry the reference set's multiphonon template, the refiner's
    # follows the coefficients: a misfit, so the recheck's fit is scanned
    assert est["refined"]["pearson_chi2_per_dof"] > 2.0
    assert loop.scan.started == 1
    assert loop.scan.join(timeout=300)
    first_deviance = est["refined"]["deviance"]
    # the next snapshot (not a recheck: the warm start alone) with a scan that found a
    # lower minimum finished meanwhile (the fixture's fit, scanned)
    scan = BackgroundScan(run.refiner.prior)
    scan.submit(model, counts, live, start, spread, n_orientations=1)
    assert scan.join(timeout=300)
    loop.scan = scan
    second = SimpleNamespace(
        n_orientations=2, counts=counts, moments=moments, n_classes=1, fitted_counts=counts
    )
    est, _, _ = loop._running_estimate(second, vae)  # type: ignore[arg-type]
    assert est["scan"]["found"] is True
    assert est["scan"]["n_orientations"] == 1
    assert est["scan"]["deviance_per_dof"] < est["scan"]["live_deviance_per_dof"]
    assert est["scan"]["adopted"] == (est["refined"]["start"] == scan_start)
    assert est["source"] == "refined"
    assert est["refined"]["deviance"] <= first_deviance + 1e-6 * abs(first_deviance)
    assert scan.take() is None  # handed over once


def test_a_live_misfit_is_answered_at_once_and_its_restarts_run_in_the_scan(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first snapshot's fit misfits (a wrong minimum): the loop publishes that first
    answer without the restarts toward the reference set (several more fits on the live
    path), flags it, and hands them to the background scan, whose lower minimum the next
    snapshot takes. With the scan busy, the restarts run on the live path as before."""
    import logging
    import threading

    from steering.loop import SteeringLoop

    run, vae, snapshot = _misfit_case(monkeypatch)

    loop = SteeringLoop(None, None, None, refiner=run.refiner)  # type: ignore[arg-type]
    assert loop.scan is not None
    live_thread = threading.get_ident()
    with caplog.at_level(logging.INFO, logger="model_server.refinement.fit"):
        est, _, _ = loop._running_estimate(snapshot(1), vae)  # type: ignore[arg-type]
        # none on the live path (the scan's thread, started by now, may log its own)
        first_restarts = [
            r
            for r in caplog.records
            if "toward the reference" in r.message and r.thread == live_thread
        ]
        assert first_restarts == []
        assert est["refined"]["pearson_chi2_per_dof"] > fit_module.MISFIT_RESTART
        assert est["restarts"] == "background scan"
        assert loop.scan.started == 1
        assert loop.scan.join(timeout=300)
        # ... they ran in the scan, which found the lower minimum
        assert [
            r
            for r in caplog.records
            if "toward the reference" in r.message and r.thread != live_thread
        ]
    est2, _, _ = loop._running_estimate(snapshot(2), vae)  # type: ignore[arg-type]
    assert est2["scan"]["found"] is True
    assert est2["refined"]["pearson_chi2_per_dof"] < fit_module.MISFIT_RESTART
    mean = np.array([est2["refined"]["mean"][n] for n in run.refiner.names])
    std = np.array([est2["refined"]["std"][n] for n in run.refiner.names])
    assert np.all(np.abs(mean - run.truth)[:4] < 5 * std[:4])
    assert "restarts" not in est2

    # a scan already running: the live fit tries the restarts itself
    busy = SteeringLoop(None, None, None, refiner=run.refiner)  # type: ignore[arg-type]
    assert busy.scan is not None
    gate = __import__("threading").Event()
    busy.scan._thread = __import__("threading").Thread(target=gate.wait, daemon=True)
    busy.scan._thread.start()
    try:
        est3, _, _ = busy._running_estimate(snapshot(1), vae)  # type: ignore[arg-type]
    finally:
        gate.set()
    assert "restarts" not in est3
    assert est3["refined"]["pearson_chi2_per_dof"] < fit_module.MISFIT_RESTART


def test_a_later_recheck_fits_the_vae_start_in_the_background_not_on_the_live_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the run's first fit, a recheck's live fit starts from the warm optimum alone:
    the VAE's start goes to the background, beside the scan's grid when one is due, else
    fitted alone (which leaves the scan's schedule as it was; counted as
    ``steer_refine_scans_total{kind="start"}``, a grid scan as ``kind="grid"``); with the
    background busy the live fit tries the VAE's start itself, as before."""
    import threading

    from steering import metrics
    from steering.loop import SteeringLoop

    run = ge_run()
    moments = ge_moments(OMEGAS)
    model = run.refiner.model(moments, at=run.truth)
    theta = _truth_theta(model, run.truth, 2e5)
    _, counts = replica_counts(model, theta, np.random.default_rng(5))
    start = _start(run, np.random.default_rng(6))
    vae, snapshot = _vae_and_snapshots(run, start, 0.05, counts, moments)

    live_starts: list[int] = []  # the starts of each live fit, besides the warm one
    refine_live = run.refiner.refine

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        live_starts.append(len(args[2]))
        return refine_live(*args, **kwargs)

    monkeypatch.setattr(run.refiner, "refine", counting)
    loop = SteeringLoop(None, None, None, refiner=run.refiner, recheck_every=2)  # type: ignore[arg-type]
    scan = loop.scan
    assert scan is not None

    def started() -> dict[str, float]:  # steer_refine_scans_total{outcome="started"} by kind
        return {
            kind: metrics.REFINE_SCANS.labels(kind=kind, outcome="started")._value.get()
            for kind in ("grid", "start")
        }

    before = started()
    est, _, _ = loop._running_estimate(snapshot(1), vae)  # type: ignore[arg-type]
    assert est["source"] == "refined"
    assert started() == {"grid": before["grid"] + 1, "start": before["start"]}
    assert scan.join(timeout=300)  # the first fit's grid scan
    first = scan.take()
    assert first is not None
    assert first.grid
    assert not first.found
    assert scan.due(2)
    assert not scan.due(1)
    scan.next_at = 3  # none due at 2 (a fit from the VAE's start alone would set 4)
    # orientation 2 is a recheck: the live fit from the warm start alone
    est, _, _ = loop._running_estimate(snapshot(2), vae)  # type: ignore[arg-type]
    assert est["source"] == "refined"
    assert est["refined"]["start"] == "warm"
    assert live_starts == [1, 0]
    assert scan.started == 2
    assert started() == {"grid": before["grid"] + 1, "start": before["start"] + 1}
    assert scan.join(timeout=300)
    alone = scan.take()
    assert alone is not None
    assert not alone.grid
    assert alone.n_orientations == 2
    assert alone.to_dict()["grid"] is False
    assert scan.next_at == 3  # a fit from the VAE's start leaves the grid's schedule
    # orientation 3: no recheck, nothing handed to the background
    loop._running_estimate(snapshot(3), vae)  # type: ignore[arg-type]
    assert scan.started == 2
    assert live_starts == [1, 0, 0]
    # orientation 4 with the background busy: the VAE's start is fitted on the live path
    gate = threading.Event()
    scan._thread = threading.Thread(target=gate.wait, daemon=True)
    scan._thread.start()
    try:
        est, _, _ = loop._running_estimate(snapshot(4), vae)  # type: ignore[arg-type]
    finally:
        gate.set()
    assert live_starts == [1, 0, 0, 1]
    assert est["source"] == "refined"
    assert scan.skipped == 1


def test_the_runs_end_refits_its_last_snapshot_when_the_background_answers_late(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """The run's last snapshot misfits and hands its restarts to the background scan, but
    no later snapshot comes to take the answer: at the run's end
    (:meth:`SteeringLoop.settle_estimate`) the loop waits for the scan, refits the last
    snapshot from its lower minimum, publishes that estimate (flagged ``amended``) and
    plans with it; once only. A scan still running at the deadline leaves the published
    estimate as it is, and says so."""
    import logging
    import threading
    from types import SimpleNamespace

    from steering.loop import SteeringLoop

    run, vae, snapshot = _misfit_case(monkeypatch)

    published: list[dict] = []
    loop = SteeringLoop(None, None, None, refiner=run.refiner, estimate_sinks=[published.append])  # type: ignore[arg-type]
    assert loop.settle_estimate(1.0) is None  # nothing fitted yet
    est, _, _ = loop._running_estimate(snapshot(1), vae)  # type: ignore[arg-type]
    assert est["restarts"] == "background scan"  # the run ends here, the scan still going
    loop.history.append({"n_orientations": 1, "estimate": est})  # its advice
    loop._last_record = SimpleNamespace(omega=12.0, index=0)  # advise() keeps the record
    message = loop.settle_estimate(300.0)
    assert message is not None
    assert published == [message]
    settled = message["estimate"]
    assert message["n_orientations"] == 1
    assert message["omega"] == 12.0
    assert "amended" in settled
    assert settled["source"] == "refined"
    assert settled["scan"]["found"] is True
    assert settled["scan"]["adopted"] is True
    assert loop.history[-1]["estimate"] is settled  # a last plan goes with it
    assert settled["refined"]["deviance"] < est["refined"]["deviance"]
    assert settled["refined"]["pearson_chi2_per_dof"] < fit_module.MISFIT_RESTART
    assert loop._posterior is not None
    assert np.allclose(loop._posterior[0], loop._warm)  # the plan uses the settled fit
    assert loop.settle_estimate(1.0) is None  # once: the snapshot was let go
    assert len(published) == 1
    # the history keeps the flag: /runs/{id}/estimates tells the two estimates apart
    from steering.db import History

    history = History(f"sqlite:///{tmp_path / 'h.db'}")
    history.upsert_run("r", material="Ge")
    history.add_estimate("r", n_orientations=1, omega=0.0, estimate=settled)
    assert history.estimates("r")[-1]["amended"] == settled["amended"]

    # no background fit: the loop keeps no snapshot for the run's end
    plain = SteeringLoop(None, None, None, refiner=run.refiner, scan=False)  # type: ignore[arg-type]
    plain._running_estimate(snapshot(1), vae)  # type: ignore[arg-type]
    assert plain._last_fit is None

    # the scan outlives the wait: the estimate stands, and the log says so
    late = SteeringLoop(None, None, None, refiner=run.refiner, estimate_sinks=[published.append])  # type: ignore[arg-type]
    assert late.scan is not None
    late._running_estimate(snapshot(1), vae)  # type: ignore[arg-type]
    assert late.scan.join(timeout=300)
    late.scan.take()
    gate = threading.Event()
    late.scan._thread = threading.Thread(target=gate.wait, daemon=True)
    late.scan._thread.start()
    try:
        with caplog.at_level(logging.WARNING, logger="steering.loop"):
            assert late.settle_estimate(0.6) is None
    finally:
        gate.set()
    assert any("still running" in r.message for r in caplog.records)
    assert len(published) == 1
