"""The advisor: candidate ranges, Fisher-information ranking, coverage-only ranking."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.reduction.folding import Folder
from consumers.reduction.table import FoldTable
from simulations.fcdb.reference import load_reference
from simulations.instrument.spectrometer import Instrument, Orientation
from steering.advisor.ranking import Advisor, candidate_omegas, scarcity_weights
from steering.exceptions import AdvisorError

OMEGAS = (0.0, 30.0, 60.0, 90.0)


@pytest.fixture(scope="module")
def setup_ge(ge):  # type: ignore[no-untyped-def]
    ins = Instrument.arcs_like(n_columns=160, n_rows=96)
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(FoldTable.cached(ge.crystal, ge.grid), ge.grid, ins, orientation, 80.0)
    coverage = np.stack([folder.coverage(w) for w in OMEGAS])
    ref = load_reference("Ge")
    theta = ref.mean[[ref.names.index(n) for n in ref.kept]]
    return Advisor("Ge", material_setup=ge), coverage, theta


def test_candidate_ranges_and_their_errors() -> None:
    np.testing.assert_array_equal(candidate_omegas(0, 3, 1), [0.0, 1.0, 2.0])
    with pytest.raises(AdvisorError, match="empty"):
        candidate_omegas(10, 10, 1)
    with pytest.raises(AdvisorError, match="step"):
        candidate_omegas(0, 10, 0)
    ins = Instrument.arcs_like()
    lo, _ = ins.goniometer_limits
    with pytest.raises(AdvisorError, match="goniometer limits"):
        candidate_omegas(lo - 10, lo + 10, 1, ins)


def test_fisher_ranking_is_the_d_optimal_gain(setup_ge) -> None:  # type: ignore[no-untyped-def]
    """Score, expected std and counts recomputed independently for every candidate."""
    adv, coverage, theta = setup_ge
    std = 0.2 * adv.width
    r = adv.rank(OMEGAS, coverage, mean=theta, std=std, counts_scale=50.0, charge=2.0, score="fc")
    assert r.basis == "fisher-d-optimal"
    scores = [c.score for c in r.candidates]
    assert scores == sorted(scores, reverse=True)
    intensity, jac = adv.fm.jacobian(theta)
    g = np.broadcast_to(adv.g, intensity.shape)
    p0 = np.diag(1.0 / (std / adv.width) ** 2)
    for cand in r.candidates:
        c = coverage[OMEGAS.index(cand.omega)] * 2.0
        lam = c * 50.0 * g * np.maximum(intensity, 0)
        ok = (lam > 0) & (g > 0)
        jw = (c * 50.0 * g)[ok][:, None] * jac[ok] * adv.width[None, :]
        fisher = jw.T @ (jw / lam[ok][:, None])
        post = p0 + fisher
        expect = np.linalg.slogdet(post)[1] - np.linalg.slogdet(p0)[1]
        assert cand.score == pytest.approx(expect, rel=1e-9)
        assert cand.fc_gain == cand.score
        assert cand.expected_counts == pytest.approx(lam[ok].sum(), rel=1e-9)
        after = np.sqrt(np.diag(np.linalg.inv(post))) * adv.width
        np.testing.assert_allclose(list(cand.expected_std.values()), after, rtol=1e-9)
        assert all(a < b for a, b in zip(after, std, strict=True))  # measuring always narrows
    # more charge (counts) is more information; a blind angle is worth nothing
    more = adv.rank(
        OMEGAS, coverage, mean=theta, std=std, counts_scale=50.0, charge=4.0, score="fc"
    )
    assert more.best.score > r.best.score
    blind = adv.rank((5.0,), np.zeros((1, *coverage.shape[1:])), mean=theta, std=std, score="fc")
    assert blind.best.score == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(list(blind.best.expected_std.values()), std, rtol=1e-9)


def test_counts_scale_is_fitted_to_the_measured_counts(setup_ge) -> None:  # type: ignore[no-untyped-def]
    adv, coverage, theta = setup_ge
    intensity, _ = adv.fm.jacobian(theta)
    exposure = coverage[0] * 3.0
    counts = 7.0 * exposure * adv.g[None, :] * np.maximum(intensity, 0)
    r = adv.rank(
        OMEGAS, coverage, mean=theta, std=0.1 * adv.width, counts=counts, exposure=exposure
    )
    assert r.counts_scale == pytest.approx(7.0, rel=1e-9)


def test_without_an_estimate_the_coverage_decides_and_says_so(setup_ge) -> None:  # type: ignore[no-untyped-def]
    adv, coverage, _ = setup_ge
    r = adv.rank(OMEGAS, coverage, measured=[0.0])
    assert r.basis == "coverage"
    assert "coverage alone" in r.note
    assert [c.measured for c in r.candidates if c.omega == 0.0] == [True]
    assert all(c.expected_std == {} for c in r.candidates)
    # where an angle has been measured a lot, the same angle gains least
    r2 = adv.rank(OMEGAS, coverage, exposure=100.0 * coverage[1])
    assert r2.candidates[-1].omega == 30.0
    assert r2.best.new_bins >= 0


def test_bad_input_is_refused_clearly(setup_ge) -> None:  # type: ignore[no-untyped-def]
    adv, coverage, theta = setup_ge
    with pytest.raises(AdvisorError, match="empty"):
        adv.rank((), coverage[:0])
    with pytest.raises(AdvisorError, match="shape"):
        adv.rank(OMEGAS, coverage[:, :10])
    with pytest.raises(AdvisorError, match="8 finite FCs"):
        adv.rank(OMEGAS, coverage, mean=theta[:3], std=np.ones(3))
    with pytest.raises(AdvisorError, match="std"):
        adv.rank(OMEGAS, coverage, mean=theta, std=np.zeros(8))
    with pytest.raises(AdvisorError, match="std or covariance"):
        adv.rank(OMEGAS, coverage, mean=theta)
    with pytest.raises(AdvisorError, match="finite"):
        adv.rank(OMEGAS, np.full_like(coverage, np.nan))


def test_information_prior_gives_diminishing_returns(setup_ge) -> None:  # type: ignore[no-untyped-def]
    """With the information prior, what was measured counts: the angle measured most gains
    least, and its gain falls as its exposure grows."""
    adv, coverage, theta = setup_ge
    kw = {
        "mean": theta,
        "std": 0.1 * adv.width,
        "counts_scale": 50.0,
        "prior": "information",
        "score": "fc",
    }
    fresh = adv.rank(OMEGAS, coverage, **kw)
    gains = {c.omega: c.score for c in fresh.candidates}
    seen = adv.rank(OMEGAS, coverage, exposure=5.0 * coverage[1], **kw)
    again = {c.omega: c.score for c in seen.candidates}
    assert again[30.0] < gains[30.0]
    assert seen.candidates[-1].omega == 30.0 or again[30.0] < min(again.values()) * 1.5
    more = adv.rank(OMEGAS, coverage, exposure=50.0 * coverage[1], **kw)
    assert {c.omega: c.score for c in more.candidates}[30.0] < again[30.0]
    with pytest.raises(AdvisorError, match="prior"):
        adv.rank(OMEGAS, coverage, mean=theta, std=0.1 * adv.width, prior="bogus")


def test_spectrum_score_is_the_per_bin_d_optimal_gain(setup_ge) -> None:  # type: ignore[no-untyped-def]
    """The default sort: sum_b log(1 + c_b / max(C_b, floor)) over the bins with E > 0,
    recomputed here; the FC gain and expected std are still reported; it prefers what was
    measured least, whatever the FCs' sensitivity."""
    adv, coverage, theta = setup_ge
    have = 5.0 * coverage[1]
    estimate = {"mean": theta, "std": 0.1 * adv.width, "counts_scale": 50.0, "exposure": have}
    r = adv.rank(OMEGAS, coverage, weighting="uniform", **estimate)
    fc = adv.rank(OMEGAS, coverage, score="fc", **estimate)
    assert r.basis == "spectrum-d-optimal"
    assert "spectrum" in r.note
    useful = np.broadcast_to(adv.g > 0, coverage.shape[1:])
    add = coverage[:, useful]
    floor = 1e-3 * np.median(add[add > 0])
    per_bin = np.log1p(add / np.maximum(have[useful], floor)[None, :])
    expect = per_bin.sum(1)
    fc_gain = {c.omega: c.score for c in fc.candidates}
    for cand in r.candidates:
        assert cand.score == pytest.approx(expect[OMEGAS.index(cand.omega)], rel=1e-9)
        assert cand.spectrum_gain == cand.score
        assert cand.fc_gain == pytest.approx(fc_gain[cand.omega], rel=1e-12)
        assert len(cand.expected_std) == 8
    assert [c.score for c in r.candidates] == sorted((c.score for c in r.candidates), reverse=True)
    assert r.candidates[-1].omega == 30.0  # the angle measured already
    assert r.to_dict()["candidates"][0]["spectrum_gain"] == r.best.score
    assert r.to_dict()["weighting"] == "uniform"
    # the default weighs every bin by 1 / (coverage of all candidates): recomputed here
    scarce = adv.rank(OMEGAS, coverage, **estimate)
    total = add.sum(0)
    w = np.where(total > 0, 1.0 / np.where(total > 0, total, 1.0), 0.0)
    w /= w[total > 0].mean()
    expect_w = per_bin @ w
    assert scarce.weighting == "scarcity"
    assert "least exposure weighing most" in scarce.note
    for cand in scarce.candidates:
        assert cand.score == pytest.approx(expect_w[OMEGAS.index(cand.omega)], rel=1e-9)
    with pytest.raises(AdvisorError, match="score"):
        adv.rank(OMEGAS, coverage, mean=theta, std=0.1 * adv.width, score="bogus")
    with pytest.raises(AdvisorError, match="weighting must be 'scarcity' or 'uniform'"):
        adv.rank(OMEGAS, coverage, weighting="bogus")


def test_scarcity_weighting_measures_the_rare_bins_first(setup_ge) -> None:  # type: ignore[no-untyped-def]
    """Two made-up candidates on the Ge grid: one reaches many bins that every other
    candidate reaches too, the other a few bins that only it reaches. Uniform weights
    prefer the first (more bins), scarcity weights the second (its bins are only to be had
    there)."""
    adv, _, _ = setup_ge
    n_q, n_e = adv.grid_shape
    useful = np.broadcast_to(adv.g > 0, (n_q, n_e))
    common = np.zeros((n_q, n_e))
    common[:10][useful[:10]] = 1.0  # 10 q rows, against 3 rare ones
    rare = np.zeros((n_q, n_e))
    rare[-3:][useful[-3:]] = 1.0
    others = [common.copy() for _ in range(6)]
    cov = np.stack([common, rare, *others])
    omegas = [float(i) for i in range(len(cov))]
    uniform = adv.rank(omegas, cov, weighting="uniform")
    scarce = adv.rank(omegas, cov)
    assert uniform.best.omega != 1.0
    assert scarce.best.omega == 1.0
    w = scarcity_weights(cov.reshape(len(cov), -1))
    assert w.shape == (n_q * n_e,)
    reached = cov.reshape(len(cov), -1).sum(0) > 0
    assert np.all(w[~reached] == 0)
    assert w[reached].mean() == pytest.approx(1.0)
    # a rare bin weighs as much more as it is reached less (7 candidates against 1)
    assert w[np.ravel_multi_index((n_q - 1, int(np.argmax(useful[-1]))), (n_q, n_e))] == (
        pytest.approx(7.0 * w[np.ravel_multi_index((0, int(np.argmax(useful[0]))), (n_q, n_e))])
    )
