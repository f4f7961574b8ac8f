"""The refinement's calibration study: its count calibration against folded simulated
events, its truths, its cached moments, its result's shape, and ``steer
evaluate-posterior`` (bad values refused with exit 2, a tiny real run with the VAE)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import model_server.refinement.study as study
from consumers.reduction.table import table_cache_dir
from model_server.exceptions import RefinementError
from model_server.refinement.posterior_stats import FitRecord
from model_server.refinement.study import (
    README_ANGLES,
    StudySettings,
    Truth,
    count_calibration,
    cumulative_moments,
    is_stable,
    posterior_study,
    study_truths,
)
from simulations.fcdb.reference import load_reference, named_fc_set
from simulations.instrument.events import OrientationSimulator
from simulations.lattice.backgrounds import Backgrounds
from simulations.lattice.sqe import CoherentSQE
from steering.cli.app import main
from tests.commands import steer
from tests.ge_moments import ge_moments, ge_run
from tests.paths import MODELS

#: The contract's keys of a level and of the result.
LEVEL_KEYS = {
    "orientations", "count_scale", "coverage_1sigma", "coverage_2sigma", "rmse_over_crb",
    "bias_over_std", "mean_std",
}  # fmt: skip
RESULT_KEYS = {"levels", "std_count_slope", "sbc_chi2"}


def test_count_calibration_matches_folded_simulated_events() -> None:
    """Count scale 1 against the event simulator folded by the real folder, one
    orientation: the signal in the fitted bins (one-phonon and multiphonon; the model's
    exact modes against the simulator's phonon table and super-pixels: 2 % allowed beyond
    the counting error) and the flat background (counting error only)."""
    run = ge_run()
    omega = 30.0
    model = run.refiner.model(ge_moments((omega,)), at=run.truth)
    cal = count_calibration(
        run.refiner,
        run.folder.orientation,
        run.truth,
        README_ANGLES,
        events_per_orientation=2e5,
        background_fraction=0.1,
    )
    sqe = CoherentSQE(
        run.refiner.setup.basis, run.truth, temperature=5.0, resolution=run.refiner.resolution
    )
    sim = OrientationSimulator(
        sqe, run.refiner.instrument, run.folder.orientation, 80.0, e_top=0.95 * 80.0
    )
    expected = sim.expected(omega) + sim.components(Backgrounds(elastic=False))["multiphonon"]
    rng = np.random.default_rng(11)
    grid = run.folder.grid

    def folded(scale: float, background: float, repeats: int) -> float:
        counts = np.zeros(grid.shape)
        for _ in range(repeats):
            batch = sim.sample(expected, scale, background, 60, rng)
            run.folder.fold(batch.pixel_id, batch.tof_ns, omega, counts)
        return float(model.observed(counts).sum()) / repeats

    signal_model = float(
        model.evaluate(
            model.theta(run.truth, log_scale=cal.log_scale), jacobian=False
        ).expected.sum()
    )
    signal = folded(math.exp(cal.log_scale), 0.0, 1)
    assert abs(signal / signal_model - 1) < 0.02 + 4 / math.sqrt(signal_model)
    background_model = cal.background * float(model.background_shape.sum())
    repeats = 10
    background = folded(0.0, 2e4, repeats)
    assert abs(background / background_model - 1) < 4 / math.sqrt(repeats * background_model)
    # the signal scale is simulate_run's: 180,000 events over the whole detector on average
    assert math.exp(cal.log_scale) * cal.signal_per_scale == pytest.approx(1.8e5)


def test_truths_are_the_named_sets_then_stable_domain_draws() -> None:
    ref = load_reference("Ge")
    ms = ge_run().refiner.setup
    named = ref.fc_set_names()
    truths, skipped = study_truths(ref, ms.basis, ms.grid, len(named) + 3, np.random.default_rng(4))
    assert [t.name for t in truths[:2]] == ["mlff_mean", "raman"]
    assert {t.name for t in truths[: len(named)]} == set(named)
    assert skipped >= 0
    kept = ref.kept_index
    others = np.setdiff1d(np.arange(len(ref.names)), kept)
    for t in truths[len(named) :]:
        assert t.name.startswith("domain-")
        assert ref.in_domain(t.coefficients).all()
        np.testing.assert_array_equal(t.coefficients[others], ref.mean[others])
    assert all(is_stable(ms.basis, ms.grid, t.coefficients) for t in truths)
    assert not is_stable(ms.basis, ms.grid, -ref.mean)
    two, _ = study_truths(ref, ms.basis, ms.grid, 2, np.random.default_rng(4))
    assert [t.name for t in two] == ["mlff_mean", "raman"]


def test_cumulative_moments_are_the_sums_and_come_back_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    run = ge_run()
    angles = (0.0, 1.0, 2.0)
    first = dict(
        cumulative_moments(
            run.folder, run.refiner.constants, angles, [1, 3], cache_dir=tmp_path / "m"
        )
    )
    assert [m.n_orientations for m in first.values()] == [1, 3]
    total = ge_moments(angles)
    np.testing.assert_allclose(first[3].weight, total.weight, rtol=1e-12)

    def no_compute(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("computed although cached")

    monkeypatch.setattr(study, "orientation_moments", no_compute)
    again = dict(
        cumulative_moments(
            run.folder, run.refiner.constants, angles, [3, 1], cache_dir=tmp_path / "m"
        )
    )
    for k in (1, 3):
        np.testing.assert_array_equal(again[k].tensor, first[k].tensor)
        np.testing.assert_array_equal(again[k].background, first[k].background)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"orientations": (0,)}, "outside 1..120"),
        ({"orientations": (1, 121)}, "outside 1..120"),
        ({"count_scales": (-1.0,)}, "finite and > 0"),
        ({"count_scales": (math.nan,)}, "finite and > 0"),
        ({"n_truths": 0}, "--truths"),
        ({"binning": "cube"}, "binning must be one of path, wedge, classes"),
        ({"binning": "wedge", "wedge_mesh": 1}, "wedge mesh"),
    ],
)
def test_settings_it_cannot_run_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RefinementError, match=message):
        StudySettings(**kwargs).validate()


class _FakeVae:
    """A start near the reference set (the study's start function is injected; the VAE
    is not what these tests test): its kept coefficients off by 2 %, a 5 % std."""

    def __init__(self) -> None:
        ref = load_reference("Ge")
        self.mean = {n: float(ref.mean[ref.names.index(n)]) * 1.02 for n in ref.kept}
        self.calls = 0
        self.records: list[FitRecord] = []  # the study's fits, kept by the fixture

    def __call__(
        self, intensity: np.ndarray, mask: np.ndarray
    ) -> tuple[Mapping[str, float], Mapping[str, float]]:
        self.calls += 1
        assert intensity.shape == mask.shape == (200, 100)
        assert np.isnan(intensity[~mask]).all()
        assert np.isfinite(intensity[mask]).all()
        return self.mean, {n: abs(v) * 0.05 for n, v in self.mean.items()}


@pytest.fixture(scope="module")
def small_study() -> tuple[dict[str, Any], _FakeVae]:
    """Two truths near the reference set, the first 1 and 2 orientations, count scale 1."""
    ms = ge_run().refiner.setup
    mean = named_fc_set("Ge", "mlff_mean", ms)
    near = mean * (1.0 + 0.03 * np.random.default_rng(2).standard_normal(len(mean)))
    truths = [Truth(name="mlff_mean", coefficients=mean), Truth(name="near", coefficients=near)]
    fake = _FakeVae()
    settings = StudySettings(n_truths=2, seed=5, orientations=(2, 1), count_scales=(1.0,))
    records: list[FitRecord] = []
    result = posterior_study(settings, fake, truths=truths, records=records)
    fake.records = records
    return result, fake


def test_small_study_reports_every_level_with_sensible_numbers(
    small_study: tuple[dict[str, Any], _FakeVae],
) -> None:
    result, fake = small_study
    assert fake.calls == 4
    assert set(result) >= RESULT_KEYS
    json.dumps(result, allow_nan=False)  # strict JSON: None where nothing was computable
    names = result["names"]
    assert names[:4] == ["1NN_xx", "1NN_xy", "2NN_xx", "2NN_zz"]
    assert [(lv["orientations"], lv["count_scale"]) for lv in result["levels"]] == [
        (1, 1.0),
        (2, 1.0),
    ]
    for lv in result["levels"]:
        assert set(lv) >= LEVEL_KEYS
        assert lv["n_fits"] == 2
        assert lv["converged_fraction"] == 1.0, lv["failures"]
        for key in ("coverage_1sigma", "coverage_2sigma", "coverage_1sigma_all"):
            assert 0.0 <= lv[key] <= 1.0
        assert lv["coverage_1sigma"] <= lv["coverage_2sigma"]
        for key in ("rmse_over_crb", "mean_std", "crb_std", "rmse"):
            assert set(lv[key]) == set(names)
            assert all(math.isfinite(v) and v > 0 for v in lv[key].values()), key
        assert all(math.isfinite(v) for v in lv["bias_over_std"].values())
        assert set(lv["vae_rmse"]) == set(lv["vae_mean_std"]) == set(fake.mean)
        # the fit's own std and the Cramer-Rao bound at the truth agree to tens of per cent
        for n in names[:4]:
            assert 0.5 < lv["mean_std"][n] / lv["crb_std"][n] < 2.0
        assert lv["mean_total_counts"] > 1000
    two, one = result["levels"][1], result["levels"][0]
    assert 1.5 < two["mean_total_counts"] / one["mean_total_counts"] < 2.5
    assert all(math.isfinite(v) for v in result["std_count_slope"].values())
    assert all(v >= 0 for v in result["sbc_chi2"].values())
    assert "std_ratio_120_over_1" not in result
    t = result["targets"]
    assert t["coefficients"] == names[:4]
    assert isinstance(t["all_pass"], bool)
    assert all(isinstance(v["pass"], bool) for v in t.values() if isinstance(v, dict))
    assert result["truths"] == ["mlff_mean", "near"]
    # every fit's record, in level order, agrees with the level summaries
    records = fake.records
    assert [(r.orientations, r.truth) for r in records] == [
        (1, "mlff_mean"),
        (1, "near"),
        (2, "mlff_mean"),
        (2, "near"),
    ]
    rows = [r.to_dict(names) for r in records]
    json.dumps(rows, allow_nan=False)
    for lv, pair in zip(result["levels"], (rows[:2], rows[2:]), strict=True):
        z = np.array([[row["z"][n] for n in names[:4]] for row in pair])
        assert lv["bias_over_std"][names[0]] == pytest.approx(z[:, 0].mean())
        assert lv["coverage_1sigma"] == pytest.approx((np.abs(z) < 1).mean())
        assert all(row["converged"] and row["crb_std"][names[0]] > 0 for row in pair)


def test_a_wedge_study_fits_the_whole_zone_and_starts_from_the_path(
    small_study: tuple[dict[str, Any], _FakeVae],
) -> None:
    """``binning="wedge"``: the same truth and orientation binned on the whole irreducible
    wedge holds many times the path tube's counts and gives a tighter, still honest std;
    the VAE (the fake asserts the path's (200, 100) grid) sees the path's I(q, E)."""
    path_result, path_fake = small_study
    ms = ge_run().refiner.setup
    truth = Truth(name="mlff_mean", coefficients=named_fc_set("Ge", "mlff_mean", ms))
    fake = _FakeVae()
    settings = StudySettings(
        n_truths=1, seed=5, orientations=(1,), count_scales=(1.0,), binning="wedge"
    )
    records: list[FitRecord] = []
    result = posterior_study(settings, fake, truths=[truth], records=records)
    assert fake.calls == 1
    assert result["settings"]["binning"] == "wedge"
    assert result["settings"]["wedge_mesh"] == 16
    (level,) = result["levels"]
    assert level["converged_fraction"] == 1.0, level["failures"]
    (fit,) = records
    (path_fit,) = [r for r in path_fake.records if (r.orientations, r.truth) == (1, "mlff_mean")]
    assert fit.counts > 5 * path_fit.counts
    names = result["names"]
    for n in names[:4]:
        assert 0.7 < level["mean_std"][n] / level["crb_std"][n] < 1.4
        path_std = path_result["levels"][0]["mean_std"][n]  # two truths' mean: near enough
        assert level["mean_std"][n] < path_std / 1.5, n


def test_a_study_on_zone_classes_narrows_the_1nn_pair_from_the_same_counts(
    small_study: tuple[dict[str, Any], _FakeVae],
) -> None:
    """``binning="classes"``: the path's cells, split by the structure-factor class of
    their zone, hold the path's counts but pin the 1NN pair much tighter (Cramer-Rao 1.9x
    at one orientation), with an honest std; the VAE (the fake asserts the path's
    (200, 100) grid) sees the classes' sum."""
    path_result, path_fake = small_study
    ms = ge_run().refiner.setup
    truth = Truth(name="mlff_mean", coefficients=named_fc_set("Ge", "mlff_mean", ms))
    fake = _FakeVae()
    settings = StudySettings(
        n_truths=1, seed=5, orientations=(1,), count_scales=(1.0,), binning="classes"
    )
    records: list[FitRecord] = []
    result = posterior_study(settings, fake, truths=[truth], records=records)
    assert fake.calls == 1
    assert result["settings"]["binning"] == "classes"
    (level,) = result["levels"]
    assert level["converged_fraction"] == 1.0, level["failures"]
    (fit,) = records
    (path_fit,) = [r for r in path_fake.records if (r.orientations, r.truth) == (1, "mlff_mean")]
    assert 0.95 < fit.counts / path_fit.counts < 1.05  # the same cells
    names = result["names"]
    for n in names[:4]:
        assert 0.7 < level["mean_std"][n] / level["crb_std"][n] < 1.4
    for n in names[:2]:
        path_std = path_result["levels"][0]["mean_std"][n]  # two truths' mean: near enough
        assert level["mean_std"][n] < path_std / 1.4, n


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--orientations", "0"], "orientation count 0"),
        (["--orientations", "1,200"], "orientation count 200"),
        (["--orientations", "a,b"], "comma-separated list of integers"),
        (["--count-scales", "-1"], "count scales must be finite and > 0"),
        (["--truths", "0"], "--truths must be >= 1"),
    ],
)
def test_cli_refuses_bad_values_with_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate-posterior", *args, "--json"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_cli_runs_a_tiny_study_with_the_vae(tmp_path: Path) -> None:
    out, png = tmp_path / "study.json", tmp_path / "study.png"
    proc = steer(
        "evaluate-posterior", "--material", "Ge", "--model", str(MODELS / "ge"),
        "--truths", "1", "--seed", "3", "--orientations", "1", "--count-scales", "1",
        "--samples", "32", "--threads", "1", "--quiet", "--json",
        "--out", str(out), "--plot", str(png), "--records", str(tmp_path / "fits.jsonl"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert set(result) >= RESULT_KEYS
    assert json.loads(out.read_text())["levels"] == result["levels"]
    (level,) = result["levels"]
    assert set(level) >= LEVEL_KEYS
    assert level["n_fits"] == 1
    assert result["truths"] == ["mlff_mean"]
    assert set(level["vae_rmse"]) == set(load_reference("Ge").kept)
    assert result["model_version"].startswith("Ge-")
    assert png.stat().st_size > 1000
    (fit,) = [json.loads(line) for line in (tmp_path / "fits.jsonl").read_text().splitlines()]
    assert (fit["truth"], fit["orientations"], fit["count_scale"]) == ("mlff_mean", 1, 1.0)
    assert set(fit["z"]) == set(result["names"])
    assert (table_cache_dir() / "moments").is_dir()


def test_runs_of_one_study_at_other_levels_merge_into_one() -> None:
    """``steer evaluate-posterior --merge``: the committed seed-4 runs (20 and 120, then 60
    orientations) make one study of six levels, judged over all of them; runs of another
    study or with a level twice are refused."""
    from model_server.refinement.posterior_stats import merge_results, std_count_slopes

    docs = Path(__file__).resolve().parents[3] / "docs"
    a = json.loads((docs / "refinement_study_seed4_scan.json").read_text())
    b = json.loads((docs / "refinement_study_seed4_scan_60.json").read_text())
    merged = merge_results([a, b])
    assert [(lv["orientations"], lv["count_scale"]) for lv in merged["levels"]] == [
        (20, 1.0), (20, 4.0), (60, 1.0), (60, 4.0), (120, 1.0), (120, 4.0),
    ]  # fmt: skip
    assert merged["n_fits"] == a["n_fits"] + b["n_fits"]
    assert merged["settings"]["orientations"] == [20, 60, 120]
    names = merged["names"]
    assert merged["std_count_slope"] == pytest.approx(std_count_slopes(merged["levels"], names))
    worst = max(lv["rmse_over_crb"][n] for lv in merged["levels"] for n in names[:4])
    assert merged["targets"]["rmse_over_crb_max"]["value"] == pytest.approx(worst)
    assert "std_ratio_120_over_1" not in merged  # no one-orientation level
    assert [p["sbc_p_value"] for p in merged["parts"]] == [a["sbc_p_value"], b["sbc_p_value"]]
    with pytest.raises(ValueError, match="two runs"):
        merge_results([a, a])
    other = json.loads((docs / "refinement_study_seed3.json").read_text())
    with pytest.raises(ValueError, match="seed"):
        merge_results([a, other])
    with pytest.raises(ValueError, match="two or more"):
        merge_results([a])
    wedge = json.loads(json.dumps(b))
    wedge["settings"]["binning"] = "wedge"
    with pytest.raises(ValueError, match="binning"):
        merge_results([a, wedge])
