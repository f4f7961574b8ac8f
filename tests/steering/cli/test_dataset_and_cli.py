"""Training-set generation and the ``steer simulate`` commands, run as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from simulations.exceptions import DatasetError
from simulations.fcdb.dataset import generate_dataset, read_dataset
from simulations.fcdb.reference import load_reference
from simulations.lattice.materials import MaterialSetup
from tests.commands import steer
from tests.paths import DATA

PARTIAL_CIF = str(DATA / "partial_occupancy.cif")


def test_dataset_contents(ge: MaterialSetup, tmp_path: Path) -> None:
    out = tmp_path / "ge.h5"
    summary = generate_dataset("Ge", 120, out, seed=3, progress=False, material_setup=ge)
    assert summary.n_stable == 120
    data = read_dataset(out)
    ref = load_reference("Ge")
    assert data["spectra"].shape == (120, 200, 100)
    assert data["spectra"].dtype == np.float32
    assert data["fc"].shape == (120, 8)
    assert list(data["fc_names"]) == list(ref.kept)
    assert data["grid_fingerprint"] == ge.grid.fingerprint
    assert data["n_discarded"] == summary.n_discarded
    lo, hi = ref.domain[:, 0], ref.domain[:, 1]
    assert np.all((data["fc"] >= lo) & (data["fc"] <= hi))
    # every stored spectrum is the forward model of its stored coefficients
    fm = ge.forward_model(free=ref.kept, reference=ref.mean)
    again = fm.spectra(data["fc"][:5]).intensity.numpy()
    # float32: batch composition changes rounding at the 1e-5 level (peaks are ~1)
    np.testing.assert_allclose(again, data["spectra"][:5], atol=1e-4)
    assert fm.spectra(data["fc"]).stable.all()


def test_dataset_is_deterministic_by_seed(ge: MaterialSetup, tmp_path: Path) -> None:
    a = generate_dataset("Ge", 30, tmp_path / "a.h5", seed=7, progress=False, material_setup=ge)
    b = generate_dataset("Ge", 30, tmp_path / "b.h5", seed=7, progress=False, material_setup=ge)
    assert a.n_discarded == b.n_discarded
    with h5py.File(tmp_path / "a.h5") as fa, h5py.File(tmp_path / "b.h5") as fb:
        np.testing.assert_array_equal(fa["fc"][()], fb["fc"][()])


def test_dataset_bad_requests(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="positive"):
        generate_dataset("Ge", 0, tmp_path / "x.h5", progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        generate_dataset("Ge", 5, tmp_path / "missing" / "x.h5", progress=False)


def test_cli_dataset_json_contract(tmp_path: Path) -> None:
    out = tmp_path / "ge.h5"
    proc = steer(
        "simulate",
        "dataset",
        "--material",
        "Ge",
        "--n",
        "40",
        "--seed",
        "0",
        "--out",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert set(payload) == {
        "n_requested",
        "n_stable",
        "n_discarded",
        "seconds",
        "spectra_shape",
        "fc_names",
    }
    assert payload["n_requested"] == payload["n_stable"] == 40
    assert payload["spectra_shape"] == [40, 200, 100]
    assert out.exists()


def test_cli_dispersion_json_and_png(tmp_path: Path) -> None:
    png = tmp_path / "ge.png"
    proc = steer(
        "simulate", "dispersion", "--material", "Ge", "--fc", "raman", "--out", str(png), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    for key in (
        "material",
        "fc_set",
        "fc_names",
        "fc_values",
        "qpoints_rlu",
        "frequencies_thz",
        "gamma_optical_thz",
    ):
        assert key in payload
    assert payload["fc_set"] == "raman"
    assert payload["gamma_optical_thz"] == pytest.approx(9.0, rel=0.01)
    assert np.array(payload["frequencies_thz"]).shape == (200, 6)
    assert np.array(payload["qpoints_rlu"]).shape == (200, 3)
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_fc_export_loads_in_phonopy(tmp_path: Path) -> None:
    import phonopy

    proc = steer(
        "simulate", "fc", "--material", "Ge", "--fc", "raman", "--out", str(tmp_path), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    ph = phonopy.load(str(tmp_path / "phonopy_params.yaml"), produce_fc=False, log_level=0)
    ph.run_qpoints([[0, 0, 0]])
    assert ph.get_qpoints_dict()["frequencies"][0].max() == pytest.approx(9.0, rel=0.01)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "dispersion", "--material", "Ge", "--fc", "nope"], "unknown FC set 'nope'"),
        (["simulate", "dispersion", "--material", "Zz"], "unknown material 'Zz'"),
        (["simulate", "dispersion", "--material", PARTIAL_CIF], "fractional"),
    ],
)
def test_cli_errors_are_one_clear_line(args: list[str], message: str) -> None:
    proc = steer(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_commands() -> None:
    proc = steer("--help")
    assert proc.returncode == 0
    for command in ("demo", "simulate"):
        assert command in proc.stdout
