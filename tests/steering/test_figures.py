"""The page's figures (steering.figures) drawn from a real folded run, without a browser
(tests/steering/api/test_web.py checks them in Chromium where one is installed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from steering.figures import coverage_figure, dispersion_figure, fc_figure, spectrum_figure


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, make_small_run):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("fig") / "run.steer"
    _, _, acc = make_small_run(path, (0.0, 30.0, 60.0), seed=5)
    return acc.snapshot()


def _image(png: bytes) -> np.ndarray:
    from PIL import Image

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    assert img.shape[0] > 200
    assert img.shape[1] > 200
    assert img.std() > 5  # something is drawn, not a blank canvas
    return img


ESTIMATE = {
    "n_orientations": 3,
    "fc": {"1NN_xx": {"mean": -2.9, "std": 0.1}, "1NN_xy": {"mean": -2.2, "std": 0.2}},
}


def test_figures_of_a_folded_run(snapshot, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _image(spectrum_figure(snapshot, "Ge", ESTIMATE, title="Ge, 3 orientations"))
    _image(spectrum_figure(snapshot, "Ge", None))  # before the first estimate
    with_model = _image(dispersion_figure(snapshot, "Ge", ESTIMATE, truth={"1NN_xx": -3.0}))
    without = _image(dispersion_figure(snapshot, "Ge", None))
    assert with_model.shape == without.shape
    assert np.abs(with_model - without).mean() > 0.1  # the branches are drawn over the data
    _image(coverage_figure(snapshot, "Ge", omegas=(0.0, 30.0, 60.0)))
    _image(fc_figure([ESTIMATE, {**ESTIMATE, "n_orientations": 4}], truth={"1NN_xx": -3.0}))
    _image(fc_figure([]))  # no estimate yet: says so
    # a superseded snapshot's VAE estimate lacks the coefficients only the refinement fits
    vae = {**ESTIMATE, "n_orientations": 2, "source": "vae", "fc": {}}
    _image(fc_figure([ESTIMATE, vae, {**ESTIMATE, "n_orientations": 4}]))
