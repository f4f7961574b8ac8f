"""The beam-time benchmark on a small set-up: its JSON contract, paired ratios and the
strategies' bookkeeping (travel, revisits, the stop rule)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from steering.advisor.benchmark import (
    GPCAM_BOUNDS,
    STRATEGIES,
    BenchmarkSetup,
    _bootstrap_ratio,
    _gpcam_pick,
    _GpData,
    beam_time_benchmark,
    merge_results,
)
from steering.exceptions import AdvisorError


@pytest.fixture(scope="module")
def small() -> BenchmarkSetup:
    """Four candidates, 0-12 degrees; a 2 % target; the path's bins."""
    return BenchmarkSetup.build(step=4.0, span=13.0, target_fraction=0.02, binning="path")


def test_a_small_benchmark_keeps_its_contract(small: BenchmarkSetup) -> None:
    setup = small
    assert setup.omegas.tolist() == [0.0, 4.0, 8.0, 12.0]
    result = beam_time_benchmark(
        truths=1,
        seeds=2,
        first_seed=100,
        strategies=STRATEGIES,
        budget=6,
        setup=setup,
        events_per_orientation=2e5,
    )
    assert set(result["strategies"]) == set(STRATEGIES)
    assert result["truths"] == ["mlff_mean"]
    assert result["seeds"] == [100, 101]
    for entry in result["strategies"].values():
        assert len(entry["beam_time_to_target_s"]) == len(entry["orientations_to_target"]) == 2
        for t, k in zip(
            entry["beam_time_to_target_s"], entry["orientations_to_target"], strict=True
        ):
            if k is None:
                assert t is None
            else:  # a minute's count each and the moves (from the start at 0 degrees)
                assert 60.0 * k <= t <= 60.0 * k + (12.0 + 1.0) * k
    ratio = result["ratios"]["advisor/sequential"]
    assert set(ratio) == {"median", "ci95"}
    assert len(ratio["ci95"]) == 2
    assert set(result["target"]) == {"1NN_xx", "1NN_xy", "2NN_xx", "2NN_zz"}
    assert result["prediction"]["pairs"] >= 0
    # a 2 % target at the README's counts is met within the budget by every strategy
    assert all(v is not None for v in result["median_beam_time_to_target_s"].values())
    # runs of other seeds (rows) and of other strategies on the same runs (columns) join
    # into the one result, the ratios made again over all of it
    by_seed = [_part(result, seeds={x}) for x in (100, 101)]
    both = merge_results(by_seed)
    assert both["strategies"] == result["strategies"]
    assert both["ratios"] == result["ratios"]
    assert both["prediction"]["pairs"] == result["prediction"]["pairs"]
    cols = merge_results(
        [_part(result, names={"advisor", "sequential"}), _part(result, names={"gpcam", "gp"})]
        + [
            _part(result, names={"random", "coarse-to-fine", "oracle"}, seeds={x})
            for x in (101, 100)
        ]
    )
    assert list(cols["strategies"]) == list(STRATEGIES)
    assert cols["strategies"] == result["strategies"]
    assert cols["curves"] == result["curves"]
    assert cols["ratios"] == result["ratios"]
    with pytest.raises(AdvisorError, match="different events_per_orientation"):
        merge_results([result, {**result, "events_per_orientation": 1.0}])
    with pytest.raises(AdvisorError, match="advisor has two results for truth mlff_mean seed 100"):
        merge_results([result, by_seed[0]])
    with pytest.raises(AdvisorError, match="gpcam has no result for truth mlff_mean seed 101"):
        merge_results([by_seed[0], _part(by_seed[1], names=set(STRATEGIES) - {"gpcam"})])


def _part(result: dict, *, names: set[str] | None = None, seeds: set[int] | None = None) -> dict:
    """The result of running only ``names`` on only ``seeds`` (what a part file holds)."""
    keep = [i for i, r in enumerate(result["runs"]) if seeds is None or r["seed"] in seeds]
    chosen = [n for n in result["strategies"] if names is None or n in names]
    pr = result["prediction"]
    with_advisor = "advisor" in chosen
    per_run = len(pr["predicted"]) // len(result["runs"]) if result["runs"] else 0
    assert per_run * len(result["runs"]) == len(pr["predicted"])  # one advisor pick per run
    picks = [j for i in keep for j in range(i * per_run, (i + 1) * per_run)] if with_advisor else []
    return {
        **result,
        "runs": [result["runs"][i] for i in keep],
        "seeds": sorted({result["runs"][i]["seed"] for i in keep}),
        "strategies": {
            n: {f: [v[i] for i in keep] for f, v in result["strategies"][n].items()} for n in chosen
        },
        "curves": {n: [result["curves"][n][i] for i in keep] for n in chosen},
        "prediction": {
            "predicted": [pr["predicted"][j] for j in picks],
            "reported": [pr["reported"][j] for j in picks],
        },
    }


def test_the_benchmark_runs_on_the_services_zone_classes(small: BenchmarkSetup) -> None:
    """``binning="classes"`` (the default): the refinement fits the path's bins split by
    zone class (as ``steer serve`` does), the candidates' moments and the replicas are on
    that grid, the GP samplers still see the path's I(q, E); its results do not merge
    with the path's."""
    setup = BenchmarkSetup.build(step=4.0, span=13.0, target_fraction=0.02)
    n_classes = setup.refiner.classes.n_classes
    assert n_classes == 4  # Ge
    assert setup.refiner.grid.shape[0] == n_classes * small.refiner.grid.shape[0]
    # the same cells: each candidate's expected counts, summed over the classes, are the
    # path's (to the model's second order in the bins' offsets, which differ by class)
    ref = setup.refiner.reference
    for c in range(len(setup.omegas)):
        m, mp = setup.model_at(c), small.model_at(c)
        ev = m.evaluate(m.theta(ref), jacobian=False)
        evp = mp.evaluate(mp.theta(ref), jacobian=False)
        merged = np.zeros(setup.refiner.grid.shape).ravel()
        merged[m.bins] = ev.expected
        assert setup.refiner.classes.merge(merged.reshape(setup.refiner.grid.shape)).sum() == (
            pytest.approx(evp.expected.sum(), rel=1e-3)
        )
    # a node's model is kept; the others are made again from the candidate's compact
    # moments, which hold the dense ones' numbers (tensors in single precision)
    assert set(setup.models) == {0, 2, 3}
    kept = setup.models[0]
    again = setup.model_of(setup.moments[0].dense())
    theta = kept.theta(setup.refiner.reference)
    ev_again, ev_kept = again.evaluate(theta), kept.evaluate(theta)
    np.testing.assert_array_equal(again.bins, kept.bins)
    top = ev_kept.expected.max()  # far below a count, tails of lines cancel to ~0
    np.testing.assert_allclose(ev_again.expected, ev_kept.expected, rtol=1e-5, atol=1e-6 * top)
    scale = np.abs(ev_kept.jacobian).max(axis=0)  # per column: some entries cancel to ~0
    assert np.all(np.abs(ev_again.jacobian - ev_kept.jacobian) <= 1e-5 * scale)
    strategies = ["advisor", "sequential", "gp", "oracle"]
    small_run = partial(
        beam_time_benchmark,
        truths=1,
        seeds=1,
        strategies=strategies,
        budget=4,
        events_per_orientation=2e5,
    )
    result = small_run(setup=setup)
    assert result["binning"] == "classes"
    assert set(result["strategies"]) == set(strategies)
    for entry in result["strategies"].values():
        for t, k in zip(
            entry["beam_time_to_target_s"], entry["orientations_to_target"], strict=True
        ):
            assert (t is None) == (k is None)
    path = small_run(setup=small, first_seed=101)
    assert path["binning"] == "path"
    with pytest.raises(AdvisorError, match="different binning"):
        merge_results([result, path])
    with pytest.raises(AdvisorError, match="binning must be"):
        BenchmarkSetup.build(step=4.0, span=5.0, binning="wedge")


def test_the_gpcam_sampler_measures_every_angle_before_it_revisits(small: BenchmarkSetup) -> None:
    """gpCAM's sampler: unmeasured candidates first, then revisits; its kernel trained
    within the bounds once it has three counts, the next training started from them."""
    rng = np.random.default_rng(0)
    data, visits, pos, picks = _GpData(), np.zeros(len(small.omegas), dtype=np.int64), 0.0, []
    for k in range(7):
        c = _gpcam_pick(small, visits, data, pos) if k else 0
        picks.append(c)
        visits[c] += 1
        pos = float(small.omegas[c])
        shape = 200 + 80 * np.sin(pos / 6.0 + np.arange(32))
        data.omega.append(pos)
        data.blocks.append(rng.poisson(shape).astype(float))
    assert sorted(picks[:4]) == [0, 1, 2, 3]
    assert all(0 <= c < 4 for c in picks[4:])
    hp = data.hyperparameters
    assert hp is not None
    assert np.all((GPCAM_BOUNDS[:, 0] <= hp) & (hp <= GPCAM_BOUNDS[:, 1]))


def test_bootstrap_ratio_is_paired_and_treats_never_as_infinite() -> None:
    rng = np.random.default_rng(0)
    a = [60.0, 120.0, 180.0, 240.0]
    out = _bootstrap_ratio(a, [2 * x for x in a], rng)
    assert out["median"] == pytest.approx(0.5)
    assert out["ci95"] == pytest.approx([0.5, 0.5])  # paired: every resample halves
    never = _bootstrap_ratio([None, None, 60.0], [60.0, 60.0, 60.0], rng)
    assert never["median"] is None  # the advisor never met it on most runs


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(AdvisorError, match="unknown strategy"):
        beam_time_benchmark(strategies=["greedy"], setup=object())  # type: ignore[arg-type]
    with pytest.raises(AdvisorError, match=">= 1"):
        beam_time_benchmark(truths=0, setup=object())  # type: ignore[arg-type]
    with pytest.raises(AdvisorError, match="target fraction"):
        BenchmarkSetup.build(target_fraction=2.0)
    with pytest.raises(AdvisorError, match="min < max"):
        BenchmarkSetup.build(detector_phi=(40.0, 10.0))
    from steering.cli.advise import _phi_range

    assert _phi_range("10:50") == (10.0, 50.0)
    with pytest.raises(AdvisorError, match="MIN:MAX"):
        _phi_range("10-50")


def test_a_narrower_detector_sees_less_at_each_angle_and_does_not_merge(
    small: BenchmarkSetup,
) -> None:
    """``detector_phi``: an ARCS-like array over fewer in-plane angles (the columns'
    spacing kept) reaches fewer bins at every candidate angle; its results carry the range
    and do not merge with the full array's."""
    narrow = BenchmarkSetup.build(
        step=4.0, span=13.0, target_fraction=0.02, binning="path", detector_phi=(10.0, 60.0)
    )
    assert narrow.detector_phi == (10.0, 60.0)
    assert small.detector_phi == (-28.0, 135.0)
    for c in range(len(small.omegas)):
        full, part = small.moments[c].dense().weight, narrow.moments[c].dense().weight
        assert 0 < np.count_nonzero(part) < 0.9 * np.count_nonzero(full)  # 0.75 here
        assert 0 < part.sum() < 0.5 * full.sum()  # 0.31: 50 of 163 degrees
    one = beam_time_benchmark(truths=1, seeds=1, strategies=["sequential"], budget=4, setup=narrow)
    assert one["detector_phi_deg"] == [10.0, 60.0]
    other = dict(one, detector_phi_deg=[-28.0, 135.0], runs=[{"truth": "x", "seed": 1}])
    with pytest.raises(AdvisorError, match="detector_phi_deg"):
        merge_results([one, other])


def test_the_command_limits_the_blas_pools_to_its_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """`steer advise benchmark --threads 1` (the default) runs with one BLAS thread, so that
    runs side by side do not wait on each other's pools."""
    from threadpoolctl import threadpool_info

    import steering.advisor.benchmark as bench
    from steering.cli.advise import _run_benchmark

    seen: dict[str, object] = {}

    def fake(**kwargs: object) -> dict[str, object]:
        seen.update(kwargs)
        seen["pools"] = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        return {}

    monkeypatch.setattr(bench, "beam_time_benchmark", fake)
    _run_benchmark(events=2e4, strategies="advisor, sequential", progress=False, threads=1)
    pools = seen["pools"]
    assert isinstance(pools, list)
    assert pools
    assert set(pools) == {1}
    assert seen["strategies"] == ["advisor", "sequential"]
    assert seen["events_per_orientation"] == 2e4
