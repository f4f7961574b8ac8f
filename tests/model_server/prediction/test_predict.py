"""POST /predict on a real FastAPI app (TestClient) over a SQLite history, and the Python
helper behind it (model_server.prediction.predict)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from consumers.reduction.folding import Folder
from consumers.reduction.table import FoldTable
from model_server.prediction.predict import MAX_OMEGAS, predict
from simulations.fcdb.reference import resolve_fc
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.crystals import SHIPPED_MATERIALS
from simulations.lattice.sqe import CoherentSQE, scattering_length
from simulations.units import HBAR2_OVER_2AMU, THZ_TO_MEV
from steering.api.app import LiveState
from steering.api.predict import predict_router
from steering.db import History
from tests.paths import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    path = tmp_path_factory.mktemp("predict") / "steer.db"
    return History(f"sqlite:///{path}")


@pytest.fixture(scope="module")
def client(history: History) -> TestClient:
    app = FastAPI()
    app.include_router(predict_router(LiveState(), history))
    return TestClient(app)


@pytest.fixture(scope="module")
def raman(ge) -> np.ndarray:  # type: ignore[no-untyped-def]
    return resolve_fc("Ge", "raman", ge)[1]


def _array(x: Any) -> np.ndarray:
    """JSON nested lists (null = not covered) as a float array with NaN."""
    return np.array(x, dtype=float)


def _post(client: TestClient, body: dict[str, Any], **kw: Any) -> Any:
    return client.post("/predict", json=body, **kw)


def test_iqe_peaks_lie_on_the_forward_model_branches(client, ge, raman) -> None:  # type: ignore[no-untyped-def]
    r = _post(
        client,
        {"material": "Ge", "fc": "raman", "ei": 80, "omegas": [0, 30, 60, 90], "outputs": ["iqe"]},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["outputs"] == ["iqe"]
    assert "detector" not in out
    assert "powder" not in out
    iqe = out["iqe"]
    n_q, n_e = ge.grid.shape
    energy = np.array(iqe["energy_meV"])
    np.testing.assert_allclose(energy, ge.grid.energy_centres)
    assert len(out["energy_edges_meV"]) == n_e + 1
    assert iqe["axes"] == ["q_index", "energy_meV"]
    assert iqe["units"] == "mbarn/(sr meV) per atom"
    assert np.array(iqe["qpoints_rlu"]).shape == (n_q, 3)
    assert len(iqe["q_distance_inv_angstrom"]) == n_q
    intensity, coverage = _array(iqe["intensity"]), _array(iqe["coverage"])
    signal = _array(iqe["signal"])
    assert intensity.shape == coverage.shape == signal.shape == (n_q, n_e)
    assert np.all(coverage >= 0)
    assert np.all(signal >= 0)
    # null exactly where no orientation covers a bin; elsewhere I = signal / coverage >= 0
    assert np.array_equal(np.isnan(intensity), coverage == 0)
    covered = coverage > 0
    assert covered.mean() > 0.5
    np.testing.assert_allclose(intensity[covered] * coverage[covered], signal[covered])
    assert np.all(intensity[covered] >= 0)
    # the branches it reports are the forward model's
    fm = ge.forward_model(dtype=torch.float64, method="exact")
    with torch.no_grad():
        branches = fm.frequencies(raman[None])[0].numpy() * THZ_TO_MEV
    np.testing.assert_allclose(_array(iqe["dispersion_meV"]), branches, atol=1e-6)
    # every strong local maximum of a well-covered q column lies on a branch
    de = energy[1] - energy[0]
    peaks = 0
    for iq in range(n_q):
        col = intensity[iq]
        ok = np.isfinite(col)
        if ok.sum() < n_e // 2:
            continue
        top = np.nanmax(col)
        for k in range(1, n_e - 1):
            if not (ok[k - 1] and ok[k] and ok[k + 1]):
                continue
            if col[k] > col[k - 1] and col[k] >= col[k + 1] and col[k] > 0.2 * top:
                peaks += 1
                dist = np.min(np.abs(branches[iq] - energy[k]))
                assert dist <= max(2 * float(ge.resolution.sigma(energy[k])), de), (iq, energy[k])
    assert peaks >= 300


def test_coverage_is_the_services_exposure(ge) -> None:  # type: ignore[no-untyped-def]
    """The Python helper: its coverage is Folder.coverage (the consumer's exposure per uC)."""
    p = predict("Ge", fc="raman", omegas=[37.0], outputs=["iqe"])
    assert p.outputs == ("iqe",)
    assert p.iqe is not None
    assert p.stable
    ins = Instrument.arcs_like()
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(FoldTable.cached(ge.crystal, ge.grid), ge.grid, ins, orientation, 80.0)
    np.testing.assert_allclose(p.iqe.coverage, folder.coverage(37.0), rtol=1e-9, atol=1e-15)
    assert p.to_dict()["iqe"]["coverage_units"] == "sr meV"


def test_detector_and_powder(client, ge, raman) -> None:  # type: ignore[no-untyped-def]
    r = _post(
        client,
        {
            "material": "Ge",
            "fc": "raman",
            "omegas": [10.0, 55.0],
            "outputs": ["detector", "powder"],
            "temperature": 5,
            "seed": 3,
        },
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["ei_meV"] == 80.0  # Ge's default
    n_e = ge.grid.n_e
    det = out["detector"]
    assert det["axes"] == ["omega_deg", "angle_deg", "energy_meV"]
    angles = np.array(det["angle_deg"])
    assert len(det["angle_edges_deg"]) == len(angles) + 1
    assert angles.min() < -20
    assert angles.max() > 130
    s = _array(det["intensity"])
    assert s.shape == (2, len(angles), n_e)
    assert np.all(s[np.isfinite(s)] >= 0)
    assert np.isfinite(s).mean() > 0.9
    assert not np.allclose(s[0], s[1], equal_nan=True)  # another omega, another Q surface
    # phonons only below the top mode (37 meV) plus the resolution
    assert np.nanmax(s[:, :, ge.grid.energy_centres > 50]) == 0.0
    qmag = _array(det["q_magnitude_inv_angstrom"])
    assert qmag.shape == (len(angles), n_e)
    assert np.all(qmag >= 0)

    pw = out["powder"]
    q, e = np.array(pw["q_inv_angstrom"]), np.array(pw["energy_meV"])
    sq = _array(pw["intensity"])
    assert sq.shape == (len(q), n_e)
    assert np.all(np.isfinite(sq))
    assert np.all(sq >= 0)
    access = np.array(pw["accessible"])
    assert access.shape == sq.shape
    assert access.dtype == bool
    assert access[len(q) // 2, 0]
    assert not access[-1, -1]
    # First-moment sum rule of coherent one-phonon scattering (any direction, so also the
    # powder average): int E S dE = 10 (hbar^2 Q^2 / 2M) b^2 exp(-2W) mbarn meV per atom
    model = CoherentSQE(
        ge.basis, raman, temperature=5.0, resolution=Instrument.arcs_like().resolution(80.0)
    )
    dw = np.trace(model.debye_waller_tensor[0]) / 3  # cubic site: isotropic
    b, mass = scattering_length("Ge"), ge.crystal.masses[0]
    expected = 10 * HBAR2_OVER_2AMU * q**2 / mass * b**2 * np.exp(-2 * dw * q**2)
    first = (sq * e[None, :]).sum(axis=1) * (e[1] - e[0])
    sel = q > 1.0
    np.testing.assert_allclose(first[sel], expected[sel], rtol=0.01)


def test_background_components(client, ge) -> None:  # type: ignore[no-untyped-def]
    """Each component by itself in every output, in the signal's units: the elastic line
    at E = 0 only, the time-of-flight background growing as (Ei / (Ei - E))^2 in every
    bin, the multiphonon reaching past the top mode; the total is the signal plus their
    sum; none when asked for none."""
    body = {
        "material": "Ge",
        "fc": "raman",
        "omegas": [20.0],
        "temperature": 300,
        "backgrounds": ["elastic", "multiphonon", "tof_background", "can"],
    }
    r = _post(client, body)
    assert r.status_code == 200, r.text
    out = r.json()
    e = ge.grid.energy_centres
    iqe = out["iqe"]
    assert list(iqe["components"]) == ["elastic", "multiphonon", "tof_background", "can"]
    assert set(iqe["components_description"]) == set(iqe["components"])
    comp = {k: _array(v) for k, v in iqe["components"].items()}
    one = _array(iqe["intensity"])
    covered = np.isfinite(one)
    total = _array(iqe["total_intensity"])
    np.testing.assert_allclose(total[covered], (one + sum(comp.values()))[covered], rtol=1e-12)
    sigma0 = float(Instrument.arcs_like().resolution(80.0).sigma(np.array(0.0)))
    el = np.nan_to_num(comp["elastic"])
    assert el[:, e < 2 * sigma0].sum() > 0
    assert el[:, e > 6 * sigma0].max() < 1e-6 * el.max()
    tof = comp["tof_background"]
    lo, hi = np.argmin(np.abs(e - 10.0)), np.argmin(np.abs(e - 60.0))
    both = covered[:, lo] & covered[:, hi]
    ratio = tof[both, hi] / tof[both, lo]
    expected = ((80.0 - e[lo]) / (80.0 - e[hi])) ** 2
    np.testing.assert_allclose(ratio, expected, rtol=0.02)
    assert np.nanmax(comp["multiphonon"][:, e > 45.0]) > 0  # two phonons: past the top mode
    det = out["detector"]
    assert set(det["components"]) == set(comp)
    assert (
        _array(det["components"]["tof_background"]).shape
        == _array(det["q_magnitude_inv_angstrom"]).shape
    )
    pw = out["powder"]
    assert list(pw["components"]) == ["elastic", "multiphonon", "can"]  # no detector background
    assert np.all(_array(pw["components"]["multiphonon"]) >= 0)

    r = _post(client, {**body, "backgrounds": [], "outputs": ["iqe", "powder"]})
    assert r.status_code == 200, r.text
    bare = r.json()
    assert bare["iqe"]["components"] == {}
    assert bare["powder"]["components"] == {}
    np.testing.assert_array_equal(
        _array(bare["iqe"]["total_intensity"]), _array(bare["iqe"]["intensity"])
    )
    r = _post(client, {**body, "backgrounds": ["elastic", "phonons"]})
    assert r.status_code == 422
    assert "tof_background" in r.text  # the choices are named


def test_background_choices_are_the_physics_components() -> None:
    import inspect
    import typing

    from model_server.prediction.request import DEFAULT_BACKGROUNDS
    from simulations.lattice.backgrounds import COMPONENTS
    from steering.api.schemas import Background, PredictRequest
    from steering.cli.predict import predict_cmd

    assert typing.get_args(Background) == COMPONENTS
    assert tuple(PredictRequest.model_fields["backgrounds"].default) == DEFAULT_BACKGROUNDS
    default = inspect.signature(predict_cmd).parameters["backgrounds"].default
    assert tuple(default.split(",")) == DEFAULT_BACKGROUNDS


def test_png(client) -> None:  # type: ignore[no-untyped-def]
    r = _post(
        client,
        {"material": "Ge", "fc": "raman", "omegas": [20.0]},
        headers={"Accept": "image/png"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.content.startswith(PNG_MAGIC)
    assert len(r.content) > 10_000


def test_current_run_uses_the_latest_estimate(client, history, raman, ge) -> None:  # type: ignore[no-untyped-def]
    history.upsert_run("ge-run", material="Ge", state="running")
    k = ge.basis.index("1NN_xx")
    for n, scale in ((1, 0.9), (2, 1.05)):
        estimate = {
            "model_version": "Ge-test",
            "fc": {"1NN_xx": {"mean": scale * raman[k], "std": 0.1, "q05": 0.0, "q95": 1.0}},
            "units": "eV/A^2",
            "out_of_domain": False,
        }  # as steering.service records Estimate.to_dict()
        history.add_estimate("ge-run", n_orientations=n, omega=float(n), estimate=estimate)
    r = _post(client, {"fc": "current:ge-run", "outputs": ["powder"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["material"] == "Ge"
    assert out["fc"]["label"].startswith("current:ge-run (estimate after 2 orientations")
    coeffs = out["fc"]["coefficients"]
    assert coeffs["1NN_xx"] == pytest.approx(1.05 * raman[k])
    mean = resolve_fc("Ge", "mlff_mean", ge)[1]  # the names the estimate leaves out
    for j, name in enumerate(ge.basis.names):
        if name != "1NN_xx":
            assert coeffs[name] == pytest.approx(mean[j])
    # the same as giving those coefficients directly
    r2 = _post(client, {"material": "Ge", "fc": {"coefficients": coeffs}, "outputs": ["powder"]})
    assert r2.status_code == 200
    np.testing.assert_allclose(
        _array(r2.json()["powder"]["intensity"]), _array(out["powder"]["intensity"])
    )
    # errors
    r = _post(client, {"fc": "current:nope", "outputs": ["powder"]})
    assert r.status_code == 404
    assert "no run 'nope'" in r.json()["detail"]
    history.upsert_run("empty-run", material="Ge")
    r = _post(client, {"fc": "current:empty-run", "outputs": ["powder"]})
    assert r.status_code == 404
    assert "no FC estimate" in r.json()["detail"]
    r = _post(client, {"material": "Nb", "fc": "current:ge-run", "outputs": ["powder"]})
    assert r.status_code == 422
    assert "measures Ge" in r.json()["detail"]


_GE = {"material": "Ge", "fc": "raman"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"material": "Xx"}, "unknown material 'Xx'"),
        ({"material": "/etc/passwd"}, "unknown material"),
        ({"material": "Ge", "fc": "nonsense"}, "unknown FC set 'nonsense'"),
        ({"material": "Nb", "fc": "raman"}, "unknown FC set 'raman' for Nb"),
        ({"material": "Ge", "fc": "/tmp/x.json"}, "unknown FC set"),
        ({"material": "Ge", "fc": {"coefficients": {"9NN_zz": 1.0}}}, "unknown force-constant"),
        ({**_GE, "ei": 60.0}, "must exceed the top of Ge's energy grid, 70 meV"),
        ({**_GE, "ei": -1.0}, "greater than 0"),
        ({**_GE, "omegas": [10.0, 200.0]}, "outside the goniometer limits"),
        ({**_GE, "omegas": [0.0] * (MAX_OMEGAS + 1)}, f"at most {MAX_OMEGAS} items"),
        ({**_GE, "omegas": [], "outputs": ["iqe"]}, "need at least one omega"),
        ({**_GE, "outputs": []}, "outputs is empty"),
        ({**_GE, "outputs": ["sqw"]}, "'powder', 'dos' or 'indirect'"),
        ({**_GE, "temperature": -3.0}, "greater than or equal to 0"),
        ({**_GE, "u": [1, 0, 0], "v": [2, 0, 0]}, "parallel"),
        ({**_GE, "u": [0, 0, 0]}, "zero vector"),
        ({"fc": "raman"}, "not neither"),
        ({**_GE, "cif": "data_x"}, "not both"),
        ({"cif": "this is not a CIF", "fc": {"coefficients": {}}}, "CIF"),
        ({**_GE, "extra": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_are_4xx_with_a_message(client, body, message) -> None:  # type: ignore[no-untyped-def]
    r = _post(client, body)
    assert r.status_code == 422, r.text
    assert message in json.dumps(r.json()), r.json()


def test_non_finite_numbers_are_refused(client) -> None:  # type: ignore[no-untyped-def]
    for raw in (
        '{"material": "Ge", "omegas": [NaN]}',
        '{"material": "Ge", "ei": Infinity}',
        '{"material": "Ge", "fc": {"coefficients": {"1NN_xx": NaN}}}',
    ):
        r = client.post("/predict", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, raw
        assert "finite number" in r.text


def test_cif_needs_coefficients_and_then_matches_the_material(client, ge, raman) -> None:  # type: ignore[no-untyped-def]
    cif = REPO / "simulations/data/structures" / SHIPPED_MATERIALS["Ge"]
    text = cif.read_text()
    r = _post(client, {"cif": text, "fc": "raman", "outputs": ["powder"]})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "a CIF has no named FC sets" in detail
    assert "1NN_xx" in detail
    # The CIF's basis has 4 shells (generic default), Ge's 5: with the fifth shell at zero
    # both describe the same crystal and give the same powder spectrum.
    names = detail.split("every one of ")[1].split(", ")
    assert set(names) < set(ge.basis.names)
    by_name = dict(zip(ge.basis.names, raman, strict=True))
    coeffs = {n: float(by_name[n]) for n in names}
    r = _post(client, {"cif": text, "fc": {"coefficients": dict(list(coeffs.items())[:-1])}})
    assert r.status_code == 422
    assert "missing names" in r.json()["detail"]
    body = {"fc": {"coefficients": coeffs}, "outputs": ["powder"], "ei": 80.0}
    r_cif = _post(client, {"cif": text, **body})
    assert r_cif.status_code == 200, r_cif.text
    assert r_cif.json()["material"].startswith("cif-")
    full = {n: coeffs.get(n, 0.0) for n in ge.basis.names}
    r_ge = _post(client, {"material": "Ge", **body, "fc": {"coefficients": full}})
    assert r_ge.status_code == 200
    np.testing.assert_allclose(
        _array(r_cif.json()["powder"]["intensity"]),
        _array(r_ge.json()["powder"]["intensity"]),
        rtol=1e-6,
        atol=1e-9,
    )


def test_openapi_documents_the_request(client) -> None:  # type: ignore[no-untyped-def]
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    assert set(op["responses"]["200"]["content"]) == {"application/json", "image/png"}
    assert {"404", "422"} <= set(op["responses"])
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body["title"] == "PredictRequest"
    props = body["properties"]
    assert {"material", "cif", "fc", "ei", "temperature", "omegas", "outputs"} <= set(props)
    assert all(p.get("description") for p in props.values())
    assert props["omegas"]["maxItems"] == MAX_OMEGAS


def test_openapi_examples_are_answered(client) -> None:  # type: ignore[no-untyped-def]
    """Every example of the request schema is a request the server answers with 200."""
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    examples = body["schema"]["examples"]
    assert len(examples) >= 3
    for example in examples:
        r = _post(client, example)
        assert r.status_code == 200, (example, r.text[:300])
