"""The exact-fold correction: at the point it was made, the corrected model is the exact
expected fold; and ``steer estimate --refine --exact`` on a folded run file."""

from __future__ import annotations

import json
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.reduction.moments import BinMoments, offset_tensors, orientation_moments
from model_server.exceptions import RefinementError
from model_server.refinement import counts
from model_server.refinement.exact import (
    ExactCorrection,
    LiveExactCorrection,
    corrected_model,
    exact_correction,
    exact_one_phonon_fold,
    exact_run_fold,
    first_order_correction,
)
from model_server.refinement.refiner import RunRefiner
from simulations.lattice.sqe import CoherentSQE
from tests.commands import steer
from tests.conftest import small_ge_run
from tests.ge_moments import EI, TEMPERATURE, ge_moments, ge_run, replica_counts
from tests.paths import MODELS

pytestmark = pytest.mark.slow


def test_the_corrected_model_is_the_exact_fold_where_it_was_made() -> None:
    run = ge_run()
    omega = 47.0
    moments = ge_moments((omega,))
    at = run.truth * 1.01
    corr = exact_correction(run.refiner, moments, run.folder, [omega], [1.0], at)
    plain = run.refiner.counts_model(moments)
    model = corrected_model(run.refiner, moments, corr)
    # the one-phonon part: the corrected model without its multiphonon part
    bare = run.refiner.counts_model(moments, extra=corr.additive, correction=corr.factors)
    lam = bare.evaluate(bare.theta(at), jacobian=False).expected
    sqe = CoherentSQE(
        run.refiner.setup.basis, at, temperature=TEMPERATURE, resolution=plain.resolution
    )
    exact = exact_one_phonon_fold(run.folder, sqe, omega).reshape(-1)[plain.bins]
    scaled = corr.factors[plain.bins] != 1.0
    assert scaled.mean() > 0.3  # (one orientation leaves many fitted bins empty)
    np.testing.assert_allclose(lam[scaled], exact[scaled], rtol=1e-9)
    # elsewhere (below the floor) the additive part brings it to the exact fold or above
    np.testing.assert_array_less(exact[~scaled] - 1e-12 * exact.max(), lam[~scaled])
    assert np.abs(lam - exact)[~scaled].max() < 1e-5 * exact.max()
    summary = corr.summary(model)
    assert summary["orientations"] == 1
    # the model is a few per cent off per bin: the factors say so
    assert 0.005 < summary["median_abs_deviation"] < 0.15  # (weak bins included)
    assert model.evaluate(model.theta(at), jacobian=False).expected.sum() > lam.sum()


def test_the_exact_fold_split_by_zone_class_sums_to_the_path_fold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each sample of the exact fold goes to its zone's class row, as the moments put it:
    summed over the classes it is the path's exact fold, and with a cross-section of 1
    everywhere each class bin holds the moments' weight of that bin (the same samples and
    weights; every 8th pixel, to be quick)."""
    run = ge_run()
    omega, stride = 47.0, 8
    refiner = run.refiner
    split = RunRefiner.zone_split(
        "Ge", run.folder.instrument, EI, TEMPERATURE, material_setup=refiner.setup
    )
    classes = split.classes
    assert classes is not None
    assert classes.n_classes == 4
    sqe = CoherentSQE(refiner.setup.basis, run.truth, temperature=TEMPERATURE)
    path = exact_one_phonon_fold(run.folder, sqe, omega, pixel_stride=stride)
    by_class = exact_one_phonon_fold(run.folder, sqe, omega, classes=classes, pixel_stride=stride)
    n_q, n_e = path.shape
    assert by_class.shape == (n_q * 4, n_e)
    np.testing.assert_allclose(by_class.reshape(n_q, 4, n_e).sum(axis=1), path, rtol=1e-12)
    assert np.all(by_class.reshape(n_q, 4, n_e).sum(axis=(0, 2)) > 0.02 * path.sum())
    moments = orientation_moments(
        run.folder, split.constants, omega, pixel_stride=stride, classes=classes
    )
    monkeypatch.setattr(sqe, "sqe_at", lambda e_mode, sf, energies: np.ones(len(energies)))
    weights = exact_one_phonon_fold(run.folder, sqe, omega, classes=classes, pixel_stride=stride)
    canonical = split.alias == np.arange(n_q * 4)
    expected = moments.weight.reshape(n_q * 4, n_e)[canonical]
    assert np.count_nonzero(expected) > 1000
    np.testing.assert_allclose(weights[canonical], expected, rtol=1e-9, atol=1e-12 * expected.max())


def test_the_exact_run_fold_on_threads_is_the_serial_one() -> None:
    """Orientations folded on threads sum, in their order, to exactly the serial fold
    (every 8th pixel, to be quick); a charge scales its orientation."""
    run = ge_run()
    sqe = CoherentSQE(run.refiner.setup.basis, run.truth, temperature=TEMPERATURE)
    omegas, charges = [10.0, 47.0, 80.0], [1.0, 2.5, 0.5]
    serial = exact_run_fold(run.folder, sqe, omegas, charges, pixel_stride=8)
    threaded = exact_run_fold(run.folder, sqe, omegas, charges, pixel_stride=8, workers=3)
    np.testing.assert_array_equal(threaded, serial)
    one = exact_one_phonon_fold(run.folder, sqe, 47.0, pixel_stride=8)
    alone = exact_run_fold(run.folder, sqe, [47.0], [2.5], pixel_stride=8, workers=2)
    np.testing.assert_allclose(alone, 2.5 * one, rtol=1e-12)
    assert serial.sum() > alone.sum() > 0
    with pytest.raises(RefinementError, match="at least one worker"):
        exact_run_fold(run.folder, sqe, omegas, charges, workers=0)


def _folded_small_run(tmp_path: Path, flag: str) -> tuple[Path, str]:
    """A one-orientation Ge run folded on the path (its file and the model's folder);
    ``flag`` without --refine is refused."""
    path, _, _ = small_ge_run(tmp_path / "ge.steer", (10.0,), seed=5)
    iqe = tmp_path / "iqe.h5"
    done = steer("fold", str(path), "--out", str(iqe), "--quiet")
    assert done.returncode == 0, done.stderr
    model = str(MODELS / "ge")
    bad = steer("estimate", str(iqe), "--model", model, flag, "--json")
    assert bad.returncode != 0
    assert "--refine" in bad.stderr
    return iqe, model


def _corrected_fits(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The corrected fit of ``steer estimate --refine --exact`` or ``--first-order``, after
    the checks both share: both fits converged, all 16 coefficients, and at these few counts
    the correction moves no coefficient by more than its std."""
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out) == {"vae", "refined", "refined_model_only"}
    refined, first = out["refined"], out["refined_model_only"]
    assert refined["converged"]
    assert first["converged"]
    assert set(refined["mean"]) == set(first["mean"])
    assert len(refined["mean"]) == 16
    for name, value in refined["mean"].items():
        assert abs(value - first["mean"][name]) < first["std"][name]
    return dict(refined)


def test_estimate_refine_exact_on_a_folded_run(tmp_path: Path) -> None:
    iqe, model = _folded_small_run(tmp_path, "--exact")
    bad = steer("estimate", str(iqe), "--model", model, "--refine", "--exact-passes", "2")
    assert bad.returncode != 0
    assert "give --exact or --first-order too" in bad.stderr
    bad = steer("estimate", str(iqe), "--model", model, "--refine", "--exact", "--jobs", "0")
    assert bad.returncode != 0
    assert "--jobs" in bad.stderr
    done = steer(
        "estimate",
        str(iqe),
        "--model",
        model,
        "--refine",
        "--exact",
        "--exact-passes",
        "2",
        "--jobs",
        "2",
        "--json",
        timeout=900,  # two exact folds of the orientation
    )
    refined = _corrected_fits(done)
    assert refined["exact_correction"]["orientations"] == 1
    assert refined["exact_correction"]["seconds"] > 0
    # two corrections: the second made at the first corrected optimum
    assert refined["exact_correction"]["passes"] == 2
    moved = refined["exact_correction"]["moved_std"]
    assert len(moved) == 2
    assert all(np.isfinite(m) and m >= 0 for m in moved)
    assert "exact-fold pass 1:" in done.stderr  # each pass's fit as it comes
    assert "exact-fold pass 2:" in done.stderr


@lru_cache(maxsize=1)
def _first_order_case() -> tuple[BinMoments, np.ndarray, np.ndarray]:
    """One orientation of the README's Ge run (omega 10, every 8th pixel, to be quick): its
    moments, its offsets' tensors and the exact fold at the truth, (n_q * n_E,) flat, all
    from the same samples."""
    run = ge_run()
    refiner, omega, stride = run.refiner, 10.0, 8
    moments = orientation_moments(
        run.folder, refiner.constants, omega, pixel_stride=stride, cache=False
    )
    tensor_d = offset_tensors(run.folder, refiner.constants, omega, pixel_stride=stride)
    sqe = CoherentSQE(
        refiner.setup.basis, run.truth, temperature=TEMPERATURE, resolution=refiner.resolution
    )
    exact = exact_one_phonon_fold(run.folder, sqe, omega, pixel_stride=stride).reshape(-1)
    return moments, tensor_d, exact


def test_the_first_order_terms_bring_the_model_near_the_exact_fold() -> None:
    """The counts model's first-order terms across the tube (each mode's intensity-weighted
    offsets and its eigenvector's change, from the orientation's offsets' tensors) against
    the exact fold of one orientation at the truth, all three from the same samples (every
    8th pixel, to be quick), over the bins above 10 counts at the README run's scale: the
    median per-bin error less than half the model's (bench: 2.1 -> 0.5 %); the correction's
    factors made there carry the model to them; a tensor of another shape is refused."""
    run = ge_run()
    refiner = run.refiner
    moments, tensor_d, exact = _first_order_case()
    model = refiner.counts_model(moments)
    theta = model.theta(run.truth)
    plain = model.evaluate(theta, jacobian=False).expected
    first = model.first_order(theta, tensor_d)
    exact = exact[model.bins]
    keep = exact * 12600.0 * 120.0 / exact.sum() > 10.0
    assert keep.sum() > 1000
    off_plain = np.median(np.abs(plain[keep] / exact[keep] - 1.0))
    off_first = np.median(np.abs(first[keep] / exact[keep] - 1.0))
    assert off_first < 0.5 * off_plain
    assert off_first < 0.012
    corr = first_order_correction(refiner, moments, tensor_d, run.truth, orientations=1)
    assert not np.any(corr.additive)
    fixed = refiner.counts_model(moments, correction=corr.factors)
    lam = fixed.evaluate(theta, jacobian=False).expected
    np.testing.assert_allclose(lam[keep], first[keep], rtol=1e-9)
    # the plain model's forward pass, which its Jacobian reuses, is not the terms'
    np.testing.assert_array_equal(model.evaluate(theta, jacobian=False).expected, plain)
    with pytest.raises(RefinementError, match="offsets' tensors of shape"):
        model.first_order(theta, tensor_d[:, :2])
    with pytest.raises(RefinementError, match="offsets' tensors of shape"):  # zone classes'
        model.first_order(theta, np.concatenate([tensor_d] * 4))
    with pytest.raises(RefinementError, match="without a correction"):
        fixed.first_order(theta, tensor_d)


def test_close_pairs_split_across_the_tube_as_the_exact_fold_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Close modes (Ge's transverse pairs, degenerate along the path's symmetry lines)
    treated together across the tube (``counts._pair_lines``: the group's block diagonalised
    over the bin's offsets, each branch with its own eigenvector's intensity) against the
    same terms with every mode on its own, both against the exact fold of one orientation
    (every 8th pixel): the far tail of the per-bin errors, where the pairs' flank bins
    sat, comes down (99th percentile 0.25 -> 0.11 here, largest 1.06 -> 0.53; the bench,
    every 2nd pixel: largest 0.60 -> 0.23) and more bins lie within 2 %, the median no
    worse."""
    run = ge_run()
    moments, tensor_d, exact = _first_order_case()
    model = run.refiner.counts_model(moments)
    theta = model.theta(run.truth)
    exact = exact[model.bins]
    keep = exact * 12600.0 * 120.0 / exact.sum() > 10.0
    paired = np.abs(model.first_order(theta, tensor_d)[keep] / exact[keep] - 1.0)
    monkeypatch.setattr(counts, "PAIR_GAP_MEV", -1.0)  # every mode a group of its own
    single = np.abs(model.first_order(theta, tensor_d)[keep] / exact[keep] - 1.0)
    assert np.percentile(paired, 99) < 0.6 * np.percentile(single, 99)
    assert paired.max() < 0.7 * single.max()
    assert np.mean(paired <= 0.02) > np.mean(single <= 0.02) + 0.04
    assert np.median(paired) <= np.median(single)


def test_estimate_refine_first_order_on_a_folded_run(tmp_path: Path) -> None:
    iqe, model = _folded_small_run(tmp_path, "--first-order")
    bad = steer("estimate", str(iqe), "--model", model, "--refine", "--exact", "--first-order")
    assert bad.returncode != 0
    assert "not both" in bad.stderr
    done = steer(
        "estimate", str(iqe), "--model", model, "--refine", "--first-order", "--json", timeout=600
    )
    summary = _corrected_fits(done)["first_order_correction"]
    assert summary["orientations"] == 1
    assert summary["passes"] == 1
    assert summary["bins_scaled"] > 0
    assert 0.0 < summary["median_abs_deviation"] < 0.1


def test_the_live_correction_is_the_exact_fold_of_the_orientations_it_folded() -> None:
    """The live correction, one orientation at a time: of one orientation, the corrected
    model is its exact fold; with one of two folded, that orientation's exact fold plus
    the other's model; with both, the exact fold of both (their weights applied; the
    model of the summed moments is not quite the sum of the orientations' models, so to
    a small fraction of the model's own error). Once the running estimate moves more
    than ``refresh_std`` std away, both are folded again there. Every 8th pixel."""
    run = ge_run()
    refiner, stride = run.refiner, 8
    omegas, weights = (10.0, 47.0), (1.0, 2.5)
    parts = [
        orientation_moments(run.folder, refiner.constants, w, pixel_stride=stride) for w in omegas
    ]
    first = BinMoments.zeros(parts[0].weight.shape[0], refiner.constants.n_branches)
    first.add(parts[0], weights[0])
    both = first.copy()
    both.add(parts[1], weights[1])
    at = run.truth * 1.01
    sqe = CoherentSQE(
        refiner.setup.basis, at, temperature=TEMPERATURE, resolution=refiner.resolution
    )
    exact = [
        c * exact_one_phonon_fold(run.folder, sqe, w, pixel_stride=stride).reshape(-1)
        for w, c in zip(omegas, weights, strict=True)
    ]

    def one_phonon(m: BinMoments, corr: ExactCorrection | None = None) -> np.ndarray:
        model = refiner.counts_model(
            m,
            extra=None if corr is None else corr.additive,
            correction=None if corr is None else corr.factors,
        )
        out = np.zeros(m.weight.shape[0])
        out[model.bins] = model.evaluate(model.theta(at), jacobian=False).expected
        return out

    def off(lam: np.ndarray, want: np.ndarray) -> float:
        strong = want > 1e-3 * want.max()
        return float(np.median(np.abs(lam[strong] / want[strong] - 1)))

    live = LiveExactCorrection(refiner, run.folder, pixel_stride=stride, refresh_std=1.0)
    try:
        assert live.correction(first) is None  # nothing folded yet
        std = np.abs(at) * 1e-3
        live.update(at, std)
        live.add(omegas[0], weights[0])
        assert live.wait(120)
        corr = live.correction(first)
        assert corr is not None
        assert corr.orientations == 1
        fitted = refiner.counts_model(first).bins
        lam, want = one_phonon(first, corr)[fitted], exact[0][fitted]
        scaled = corr.factors[fitted] != 1.0
        assert scaled.mean() > 0.3
        np.testing.assert_allclose(lam[scaled], want[scaled], rtol=1e-9)
        assert np.abs(lam - want)[~scaled].max() < 1e-5 * want.max()
        # two in the snapshot, one folded: the other keeps its model
        corr = live.correction(both)
        assert corr is not None
        fitted = refiner.counts_model(both).bins
        lam = one_phonon(both, corr)[fitted]
        assert off(lam, (exact[0] + weights[1] * one_phonon(parts[1]))[fitted]) < 0.003
        live.add(omegas[1], weights[1])
        assert live.wait(120)
        corr = live.correction(both)
        assert corr is not None
        assert corr.orientations == 2
        want = (exact[0] + exact[1])[fitted]
        assert off(one_phonon(both)[fitted], want) > 0.02  # the model as it is
        assert off(one_phonon(both, corr)[fitted], want) < 0.003
        summary = live.summary()
        assert summary["corrected"] == 2
        assert summary["refreshed"] == 0
        assert summary["made_within_std"] == 0.0
        # the estimate moves 3 std: both are folded again where it now is
        assert live._excess is not None
        before = live._excess.copy()
        live.update(at + 3 * std, std)
        assert live.summary()["made_within_std"] == pytest.approx(3.0)
        assert live.wait(120)
        summary = live.summary()
        assert summary["refreshed"] == 2
        assert summary["made_within_std"] == 0.0
        assert summary["waiting"] == 0
        assert summary["failed"] == 0
        # the running sum the fits use holds the new folds, the first ones taken out
        kept = np.zeros(both.weight.shape[0])
        for part in live._parts.values():
            kept[part.bins] += part.excess
        assert live._excess is not None
        np.testing.assert_allclose(live._excess, kept, rtol=0, atol=1e-9 * np.abs(kept).max())
        assert np.abs(kept - before).max() > 1e-6 * np.abs(before).max()  # made anew
    finally:
        live.close()
    with pytest.raises(RefinementError, match="finite angle"):
        live.add(float("nan"), 1.0)
    with pytest.raises(RefinementError, match="refresh_std"):
        LiveExactCorrection(refiner, run.folder, refresh_std=0.0, start=False)


def test_a_live_fold_that_fails_is_counted_and_not_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refresh whose exact fold is not finite fails: counted, its orientation keeps its
    earlier fold, and it is not folded again (the worker goes idle instead of folding it
    over and over); an orientation with no exposure is not folded; once stopped, the
    correction lets its folds go and its summary stays. Every 8th pixel."""
    import model_server.refinement.exact as exact_module

    run = ge_run()
    calls: list[float] = []
    real = exact_module.exact_one_phonon_fold

    def flaky(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(float(args[2]))  # type: ignore[arg-type]
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        return out if len(calls) == 1 else out * np.nan

    monkeypatch.setattr(exact_module, "exact_one_phonon_fold", flaky)
    moments = orientation_moments(run.folder, run.refiner.constants, 10.0, pixel_stride=8)
    live = LiveExactCorrection(run.refiner, run.folder, pixel_stride=8, refresh_std=1.0)
    try:
        at = run.truth * 1.01
        std = np.abs(at) * 1e-3
        live.update(at, std)
        live.add(10.0, 1.0)
        live.add(20.0, 0.0)  # no exposure: nothing to correct
        assert live.wait(120)
        assert live.summary()["corrected"] == 1
        assert live.summary()["orientations"] == 1
        assert live._excess is not None
        before = live._excess.copy()
        live.update(at + 3 * std, std)  # its refresh is due, and fails
        assert live.wait(120)  # idle: the failed refresh is not tried again
        summary = live.summary()
        assert summary["failed"] == 1
        assert summary["refreshed"] == 0
        assert "not finite" in summary["error"]
        assert calls == [10.0, 10.0]
        np.testing.assert_array_equal(live._excess, before)  # the earlier fold stands
        assert live.correction(moments) is not None
    finally:
        live.close()
    assert live.summary()["corrected"] == 1  # what was made, after the stop
    assert live.correction(moments) is None  # the folds are let go
    live.update(at, std)  # stopped: nothing more is folded
    assert calls == [10.0, 10.0]


def test_the_runs_end_waits_for_first_folds_and_stops_the_refreshes() -> None:
    """At the run's end (``wait(refreshes=False)``) a fold that is due again because the
    estimate moved is not waited for, and none is started from then on."""
    from model_server.refinement.exact import _Part

    run = ge_run()
    live = LiveExactCorrection(run.refiner, run.folder, refresh_std=1.0, start=False)
    at = run.truth.copy()
    std = np.abs(at) * 1e-3
    live.update(at, std)
    live._keep(0, _Part(10.0, 1.0, at, np.arange(3), np.ones(3), 0.0))
    assert live.idle()
    live.update(at + 3 * std, std)  # moved 3 std: its fold is due again
    assert not live.idle()
    assert not live.wait(0.0)  # a wait for everything would wait for it
    assert live.wait(0.0, refreshes=False)
    assert live.idle()  # and none is due any more
    live.close()


def test_the_live_loop_fits_with_the_correction_and_refits_at_the_runs_end(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The steering loop with a live correction: the orientations handed over are queued,
    the first fit (nothing folded yet) says so, and at the run's end the last snapshot is
    refitted with the correction of both orientations: closer to counts drawn from the
    exact fold (deviance per dof down to about 1), published flagged ``amended``; the
    correction's thread stops. Every 8th pixel."""
    import logging
    from types import SimpleNamespace

    from steering.loop import SteeringLoop
    from tests.model_server.refinement.test_fit import _truth_theta
    from tests.model_server.refinement.test_scan import _vae_and_snapshots

    run = ge_run()
    refiner, stride = run.refiner, 8
    omegas = (10.0, 47.0)
    moments = BinMoments.zeros(
        run.folder.grid.n_q * run.folder.grid.n_e, refiner.constants.n_branches
    )
    for w in omegas:
        moments.add(orientation_moments(run.folder, refiner.constants, w, pixel_stride=stride), 1.0)
    # counts drawn from the exact fold at the truth (the correction made there)
    truth_corr = LiveExactCorrection(refiner, run.folder, pixel_stride=stride)
    truth_corr.update(run.truth, np.abs(run.truth) * 1e-3)
    for w in omegas:
        truth_corr.add(w, 1.0)
    assert truth_corr.wait(120)
    exact_model = refiner.model(moments, at=run.truth, correction=truth_corr.correction(moments))
    truth_corr.close()
    theta = _truth_theta(exact_model, run.truth, 2e6)
    _, counts = replica_counts(exact_model, theta, np.random.default_rng(5))
    vae, snapshot = _vae_and_snapshots(run, run.truth * 1.01, 0.03, counts, moments)

    published: list[dict] = []
    loop = SteeringLoop(
        None, None, None, refiner=refiner, scan=False, estimate_sinks=[published.append]
    )  # type: ignore[arg-type]
    assert loop.exact is None
    loop.exact = LiveExactCorrection(refiner, run.folder, pixel_stride=stride)
    # the first as a completed orientation, both as a restored run's records (steer serve
    # restarted): the second is queued, the first not again
    records = [
        SimpleNamespace(index=i, omega=w, weight=1.0, proton_charge=1.0, normalised=True)
        for i, w in enumerate(omegas)
    ]
    loop._note_orientation(records[0])  # type: ignore[arg-type]
    assert loop.note_folded(records) == 1  # type: ignore[arg-type]
    loop._note_orientation(
        SimpleNamespace(index=2, omega=80.0, weight=None, proton_charge=1.0, normalised=False)  # type: ignore[arg-type]
    )  # not normalised: not in the moments, not queued
    est, _, _ = loop._running_estimate(snapshot(2), vae)  # type: ignore[arg-type]
    assert est["source"] == "refined"
    assert est["exact_correction"]["orientations"] == 2
    assert est["exact_correction"]["corrected"] == 0
    loop.history.append({"n_orientations": 2, "estimate": est})
    loop._last_record = SimpleNamespace(omega=47.0, index=1)  # type: ignore[assignment]
    with caplog.at_level(logging.INFO, logger="steering.loop"):
        message = loop.settle_estimate(300.0)
    assert message is not None
    assert published == [message]
    settled = message["estimate"]
    assert "exact-fold correction had made 2 of 2" in settled["amended"]
    assert settled["exact_correction"]["corrected"] == 2
    before = est["refined"]["deviance_per_dof"]
    after = settled["refined"]["deviance_per_dof"]
    assert after < before
    assert after < 1.2
    assert loop.history[-1]["estimate"] is settled
    assert loop.exact._closed  # the thread was told to stop
    assert loop.settle_estimate(1.0) is None  # once
    # the history keeps it: /runs/{id}/estimates and steer demo's summary show it
    from steering.db import History

    history = History(f"sqlite:///{tmp_path / 'h.db'}")
    history.upsert_run("r", material="Ge")
    history.add_estimate("r", n_orientations=2, omega=47.0, estimate=settled)
    assert history.estimates("r")[-1]["exact_correction"] == settled["exact_correction"]
    # a loop that cannot make one (no candidates' detector) runs without, and says so
    with caplog.at_level(logging.WARNING, logger="steering.loop"):
        bare = SteeringLoop(None, None, None, refiner=refiner, scan=False, exact_correction=True)  # type: ignore[arg-type]
    assert bare.exact is None
    assert any("no live exact-fold correction" in r.message for r in caplog.records)
