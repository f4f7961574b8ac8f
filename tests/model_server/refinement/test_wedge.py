"""The refinement on other binnings of a recorded run: ``steer fold --binning wedge`` folds
every event of the zone (with its moments), ``--binning classes`` splits the path's bins by
zone class; ``steer estimate --refine --wedge/--binned`` fits those counts from the VAE's
start on the path's I(q, E); what does not fit together is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from tests.commands import steer
from tests.conftest import small_ge_run
from tests.paths import MODELS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def path_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """A small simulated run, its path fold and that fold's refinement:
    ``(run, iqe.h5, steer estimate --refine --json)``."""
    tmp = tmp_path_factory.mktemp("binnings")
    path, _, _ = small_ge_run(tmp / "ge.steer", (10.0, 30.0), seed=7)
    iqe = tmp / "iqe.h5"
    done = steer("fold", str(path), "--out", str(iqe), "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    fold = json.loads(done.stdout)
    with h5py.File(iqe, "r") as f:
        fold["counts"] = f["entry/iqe/counts"][()]
    done = steer("estimate", str(iqe), "--model", str(MODELS / "ge"), "--refine", "--json")
    assert done.returncode == 0, done.stderr
    return path, iqe, json.loads(done.stdout) | {"fold": fold}


def test_a_run_folded_on_the_wedge_is_refined_from_the_path_vae(
    path_run: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, iqe, path_out = path_run
    wedge = tmp_path / "wedge.h5"
    done = steer("fold", str(path), "--out", str(wedge), "--binning", "wedge", "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    wedge_fold = json.loads(done.stdout)
    assert wedge_fold["orientations"] == 2
    # every event of the zone in the energy window, not the tube's few per cent
    assert wedge_fold["events_folded"] > 5 * path_out["fold"]["events_folded"]
    with h5py.File(wedge, "r") as f:
        assert f["entry/iqe/counts"].shape == (145, 100)
        assert json.loads(f["entry"].attrs["metadata"])["binning"] == {"kind": "wedge", "mesh": 16}
        assert "moments" in f["entry"]

    model = str(MODELS / "ge")
    done = steer(
        "estimate", str(iqe), "--model", model, "--refine", "--json", "--wedge", str(wedge)
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    # the same start: the VAE's estimate of the path's I(q, E)
    assert out["vae"]["fc"] == path_out["vae"]["fc"]
    path_fit, wedge_fit = path_out["refined"], out["refined"]
    assert (path_fit["binning"], wedge_fit["binning"]) == ("path", "wedge")
    assert wedge_fit["converged"], {k: wedge_fit[k] for k in ("iterations", "start", "deviance")}
    assert len(wedge_fit["mean"]) == 16
    for name in ("1NN_xx", "1NN_xy", "2NN_xx", "2NN_zz"):
        assert wedge_fit["std"][name] < path_fit["std"][name] / 1.5, name


def test_a_run_split_by_zone_class_keeps_its_counts_and_narrows_the_1nn_pair(
    path_run: tuple[Path, Path, dict[str, Any]], tmp_path: Path
) -> None:
    """``steer fold --binning classes``: the path's events, each in its zone's class (the
    classes' counts sum to the path's, bin by bin); ``steer estimate --refine --binned``
    fits them from the same VAE start, and the 1NN pair narrows (the contrast between
    zones whose atoms scatter in and out of phase); ``--exact`` corrects the split model
    too."""
    path, iqe, path_out = path_run
    split = tmp_path / "classes.h5"
    done = steer(
        "fold", str(path), "--out", str(split), "--binning", "classes", "--quiet", "--json"
    )
    assert done.returncode == 0, done.stderr
    with h5py.File(split, "r") as f:
        counts = f["entry/iqe/counts"][()]
        binning = json.loads(f["entry"].attrs["metadata"])["binning"]
        exposure = f["entry/iqe/exposure"][()]
        assert "moments" in f["entry"]
    assert binning == {"kind": "classes", "classes": 4}
    assert counts.shape == (800, 100)
    by_class = counts.reshape(200, 4, 100)
    np.testing.assert_array_equal(by_class.sum(axis=1), path_out["fold"]["counts"])
    assert np.all(by_class.sum(axis=(0, 2)) > 0.1 * counts.sum())  # every class counts
    assert np.all(exposure >= 0)

    model = str(MODELS / "ge")
    done = steer(
        "estimate", str(iqe), "--model", model, "--refine", "--json", "--binned", str(split)
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["vae"]["fc"] == path_out["vae"]["fc"]
    fit, path_fit = out["refined"], path_out["refined"]
    assert fit["binning"] == "classes"
    assert fit["converged"]
    for name in ("1NN_xx", "1NN_xy"):
        assert fit["std"][name] < path_fit["std"][name] / 1.3, name
    for name in ("2NN_xx", "2NN_zz"):
        assert fit["std"][name] < path_fit["std"][name] * 1.05, name
    done = steer(
        "estimate",
        str(iqe),
        "--model",
        model,
        "--refine",
        "--exact",
        "--binned",
        str(split),
        "--json",
        timeout=900,  # the exact fold of the orientation
    )
    assert done.returncode == 0, done.stderr
    exact = json.loads(done.stdout)["refined"]
    assert exact["binning"] == "classes"
    assert exact["converged"]
    assert exact["exact_correction"]["orientations"] == 2  # the run's two
    assert exact["exact_correction"]["bins_scaled"] > 0
    # at these few counts the correction moves no coefficient by more than its std
    for name, value in exact["mean"].items():
        assert abs(value - fit["mean"][name]) < fit["std"][name], name


def test_what_does_not_fit_together_is_refused(tmp_path: Path) -> None:
    path, _, _ = small_ge_run(tmp_path / "ge.steer", (10.0,), seed=8)
    iqe = tmp_path / "iqe.h5"
    assert steer("fold", str(path), "--out", str(iqe), "--quiet").returncode == 0
    model = str(MODELS / "ge")
    cases = [
        (["fold", str(path), "--binning", "cube"], "path, wedge or classes"),
        (["fold", str(path), "--binning", "classes", "--plot", "x.png"], "along the q-path"),
        (["fold", str(path), "--binning", "wedge", "--check"], "along the q-path"),
        (["estimate", str(iqe), "--model", model, "--wedge", str(iqe)], "give --refine"),
        (
            ["estimate", str(iqe), "--model", model, "--refine", "--wedge", str(iqe)],
            "folded on the q-path",
        ),
    ]
    for args, message in cases:
        done = steer(*args, "--json")
        assert done.returncode == 2, (args, done.stderr[-500:])
        assert message in " ".join(done.stderr.split()), args
        assert "Traceback" not in done.stderr
