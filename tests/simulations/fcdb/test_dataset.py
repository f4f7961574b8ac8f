"""Training sets written batch by batch: same contents whatever the batch size."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from simulations.exceptions import DatasetError
from simulations.fcdb.dataset import generate_dataset, read_dataset
from simulations.fcdb.reference import load_reference
from simulations.lattice.materials import MaterialSetup


def test_small_batches_stream_the_same_set(ge: MaterialSetup, tmp_path: Path) -> None:
    """130 spectra in batches of 50 draws (spectra carried over between HDF5 chunks of 64)
    hold the same draws as one batch, and each spectrum is the model's of its coefficients."""
    one = generate_dataset(
        "Ge", 130, tmp_path / "one.h5", seed=5, progress=False, material_setup=ge
    )
    many = generate_dataset(
        "Ge", 130, tmp_path / "many.h5", seed=5, progress=False, material_setup=ge, batch=50
    )
    assert many.n_discarded == one.n_discarded
    a, b = read_dataset(tmp_path / "one.h5"), read_dataset(tmp_path / "many.h5")
    fc, spectra = np.asarray(b["fc"]), np.asarray(b["spectra"])
    np.testing.assert_array_equal(np.asarray(a["fc"]), fc)
    np.testing.assert_array_equal(np.asarray(a["spectra"]), spectra)
    ref = load_reference("Ge")
    fm = ge.forward_model(free=ref.kept, reference=ref.mean)
    np.testing.assert_allclose(fm.spectra(fc).intensity.numpy(), spectra, atol=1e-6)
    with h5py.File(tmp_path / "many.h5") as f:
        assert f["spectra"].chunks == (64, *ge.grid.shape)
    assert not list(tmp_path.glob("*.partial"))


def test_failed_generation_leaves_no_partial_file(ge: MaterialSetup, tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    with pytest.raises(DatasetError, match="mostly unstable"):
        generate_dataset(
            "Ge", 50, out, progress=False, material_setup=ge, batch=16, max_draw_factor=0.1
        )
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial"))
