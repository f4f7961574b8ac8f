"""The refinement on the whole irreducible wedge of a recorded run: ``steer fold --binning
wedge`` folds every event of the zone (with its moments), ``steer estimate --refine
--wedge`` fits those counts from the VAE's start on the path's I(q, E); what does not fit
together is refused."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from tests.commands import steer
from tests.conftest import small_ge_run
from tests.paths import MODELS

pytestmark = pytest.mark.slow


def test_a_run_folded_on_the_wedge_is_refined_from_the_path_vae(tmp_path: Path) -> None:
    path, _, _ = small_ge_run(tmp_path / "ge.steer", (10.0, 30.0), seed=7)
    iqe, wedge = tmp_path / "iqe.h5", tmp_path / "wedge.h5"
    done = steer("fold", str(path), "--out", str(iqe), "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    path_fold = json.loads(done.stdout)
    done = steer("fold", str(path), "--out", str(wedge), "--binning", "wedge", "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    wedge_fold = json.loads(done.stdout)
    assert wedge_fold["orientations"] == path_fold["orientations"] == 2
    # every event of the zone in the energy window, not the tube's few per cent
    assert wedge_fold["events_folded"] > 5 * path_fold["events_folded"]
    with h5py.File(wedge, "r") as f:
        assert f["entry/iqe/counts"].shape == (145, 100)
        assert json.loads(f["entry"].attrs["metadata"])["binning"] == {"kind": "wedge", "mesh": 16}
        assert "moments" in f["entry"]

    model = str(MODELS / "ge")
    runs = {}
    for label, extra in (("path", []), ("wedge", ["--wedge", str(wedge)])):
        done = steer("estimate", str(iqe), "--model", model, "--refine", "--json", *extra)
        assert done.returncode == 0, done.stderr
        runs[label] = json.loads(done.stdout)
    # the same start: the VAE's estimate of the path's I(q, E)
    assert runs["wedge"]["vae"]["fc"] == runs["path"]["vae"]["fc"]
    path_fit, wedge_fit = runs["path"]["refined"], runs["wedge"]["refined"]
    assert (path_fit["binning"], wedge_fit["binning"]) == ("path", "wedge")
    assert wedge_fit["converged"]
    assert len(wedge_fit["mean"]) == 16
    for name in ("1NN_xx", "1NN_xy", "2NN_xx", "2NN_zz"):
        assert wedge_fit["std"][name] < path_fit["std"][name] / 1.5, name


def test_what_does_not_fit_together_is_refused(tmp_path: Path) -> None:
    path, _, _ = small_ge_run(tmp_path / "ge.steer", (10.0,), seed=8)
    iqe = tmp_path / "iqe.h5"
    assert steer("fold", str(path), "--out", str(iqe), "--quiet").returncode == 0
    model = str(MODELS / "ge")
    cases = [
        (["fold", str(path), "--binning", "cube"], "path or wedge"),
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
