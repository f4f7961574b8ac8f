"""Predictions for any CIF: POST /predict without force constants (the e3nn model), the
`dos` and `indirect` outputs, the clear errors (partial occupancy, unknown element, huge
cell, unparseable CIF, no model: 503), and `steer predict` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from model_server.prediction.predict import predict
from model_server.structure_fc.model import load_fc_model
from simulations.lattice.crystals import SHIPPED_MATERIALS, load_crystal
from steering.api.app import LiveState
from steering.api.predict import predict_router
from steering.cli.app import app, main
from steering.db import History
from tests.paths import REPO

STRUCTURES = REPO / "simulations/data/structures"
GE_CIF = STRUCTURES / SHIPPED_MATERIALS["Ge"]


@pytest.fixture(scope="module")
def known() -> str:
    """A shipped material whose element the committed e3nn model knows (Ge first)."""
    elements = load_fc_model().elements
    return next(m for m in ("Ge", "Al", "Nb") if m in elements)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    path = tmp_path_factory.mktemp("predict-cif") / "steer.db"
    api = FastAPI()
    api.include_router(predict_router(LiveState(), History(f"sqlite:///{path}")))
    return TestClient(api)


def _cif(symbol: str, lattice: float, sites: list[tuple[str, tuple[float, float, float]]]) -> str:
    """A P1 cubic CIF."""
    rows = "\n".join(f"{el}{k} {el} {x} {y} {z} 1.0" for k, (el, (x, y, z)) in enumerate(sites))
    return (
        f"data_{symbol}\n_cell_length_a {lattice}\n_cell_length_b {lattice}\n"
        f"_cell_length_c {lattice}\n_cell_angle_alpha 90\n_cell_angle_beta 90\n"
        "_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\n"
        "loop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n"
        "loop_\n_atom_site_label\n_atom_site_type_symbol\n_atom_site_fract_x\n"
        f"_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n{rows}\n"
    )


def _fcc(element: str, a: float) -> str:
    return _cif(
        element,
        a,
        [(element, p) for p in ((0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0))],
    )


def _post(client: TestClient, body: dict[str, Any], **kw: Any) -> Any:
    return client.post("/predict", json=body, **kw)


def test_cif_without_fcs_uses_the_model(client: TestClient, known: str) -> None:
    """A CIF alone: the e3nn model's FCs, its verdict in the answer (the same as the model
    gives for the CIF's primitive cell), DOS and indirect outputs with axes and units."""
    path = STRUCTURES / SHIPPED_MATERIALS[known]
    text = path.read_text()
    r = _post(client, {"cif": text, "outputs": ["dos", "indirect"], "indirect_orders": 1})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["fc_source"] == "e3nn"
    cryst = load_crystal(path)
    assert out["formula"] == known
    assert out["n_atoms"] == cryst.n_atoms
    assert out["outputs"] == ["dos", "indirect"]
    assert out["fc"]["source"] == "e3nn"
    assert out["fc"]["coefficients"] == {}
    assert out["fc"]["symmetry_residual"] < 1e-6  # equivariant output on a symmetric cell
    assert out["fc"]["acoustic_sum_rule_residual"] < 1e-9
    model = load_fc_model()
    direct = model.predict(cryst.numbers, cryst.lattice, cryst.positions)
    assert out["distance"] == pytest.approx(direct.distance, rel=1e-6)
    assert out["in_domain"] == direct.in_domain
    assert out["message"] == direct.message
    assert out["fc_model"]["version"] == model.version
    assert out["fc_model"]["known_elements"] == list(model.elements)
    assert out["fc_model"]["n_pairs"] == len(direct.pairs)
    flagged = any(w.startswith("OUT OF THE MODEL'S DOMAIN") for w in out["warnings"])
    assert flagged == (not direct.in_domain)
    dos = out["dos"]
    assert dos["units"] == "states/meV per primitive cell"
    e = np.array(dos["energy_meV"])
    n_states = 3.0 * cryst.n_atoms
    assert float(np.sum(dos["total"]) * (e[1] - e[0])) == pytest.approx(n_states, rel=1e-2)
    assert set(dos["by_element"]) == {known}
    ind = out["indirect"]
    assert ind["units"] == "mbarn/(sr meV) per atom"
    assert ind["instrument"]["name"] == "VISION"
    assert len(ind["total"]) == len(ind["energy_meV"]) == len(ind["energy_edges_meV"]) - 1
    assert max(ind["total"]) > 0
    png = _post(
        client,
        {"cif": text, "outputs": ["indirect"], "indirect_orders": 1},
        headers={"Accept": "image/png"},
    )
    assert png.status_code == 200
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_domain_is_returned_but_marked(known: str) -> None:
    """A known element squeezed into a simple-cubic cell with bonds 0.77 x its shipped
    crystal's nearest-neighbour distance (Ge: 1.89 A instead of 2.45 A) is far from anything
    the model was trained on: the prediction comes back, flagged in the result, first in
    the warnings and in red in the figure's title."""
    cryst = load_crystal(known)
    d = np.linalg.norm(cryst.lattice, axis=1).min()
    if cryst.n_atoms > 1:
        d = min(d, float(np.linalg.norm((cryst.positions[1] - cryst.positions[0]) @ cryst.lattice)))
    p = predict(cif=_cif(known, round(0.77 * d, 4), [(known, (0, 0, 0))]), outputs=["dos"])
    assert p.fc_source == "e3nn"
    assert p.model is not None
    assert p.in_domain is False
    assert p.model.distance > 1.0
    assert p.warnings[0].startswith("OUT OF THE MODEL'S DOMAIN")
    assert p.model.message.removeprefix("Out of the model's domain: ") in p.warnings[0]
    d = p.to_dict()
    assert d["in_domain"] is False
    assert d["message"]
    fig = p.figure()
    title = fig._suptitle
    assert "OUT OF THE MODEL'S DOMAIN" in title.get_text()
    assert title.get_color() == "red"


def test_shipped_material_with_the_model_and_its_projection(client: TestClient, known: str) -> None:
    r = _post(client, {"material": known, "fc": "e3nn", "outputs": ["dos"]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["fc_source"] == "e3nn"
    proj = out["fc"]["projection"]
    assert "1NN_xx" in proj["coefficients"]
    # an equivariant prediction lies in the symmetry-reduced space (up to round-off);
    # what the basis cannot hold is the model's bonds beyond its shells
    assert proj["residual"] < 1e-6
    assert 0.0 <= proj["truncated"] < 1.0
    ref = _post(client, {"material": known, "outputs": ["dos"]}).json()
    assert ref["fc_source"] == "reference"
    assert ref["in_domain"] is None
    assert ref["fc_model"] is None


def test_no_model_is_503(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEER_FC_MODEL", str(tmp_path / "empty"))
    r = _post(client, {"cif": GE_CIF.read_text(), "outputs": ["dos"]})
    assert r.status_code == 503, r.text
    detail = r.json()["detail"]
    assert "force-constant model is not available" in detail
    assert "model.json" in detail
    assert str(tmp_path) not in detail  # no server paths in answers
    assert "STEER_FC_MODEL" in detail
    # given coefficients need no model
    r = _post(client, {"material": "Ge", "outputs": ["dos"]})
    assert r.status_code == 200


def test_partial_occupancy_names_the_site_and_the_supercell(client: TestClient) -> None:
    text = _cif("FeCo", 2.85, [("Fe", (0, 0, 0)), ("Fe", (0.5, 0.5, 0.5))]).replace(
        "Fe1 Fe 0.5 0.5 0.5 1.0", "Fe1 Fe 0.5 0.5 0.5 0.5\nCo2 Co 0.5 0.5 0.5 0.5"
    )
    r = _post(client, {"cif": text, "outputs": ["dos"]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "partial or mixed occupancy" in detail
    assert "site 1 (Fe:0.5, Co:0.5 at 0.5000 0.5000 0.5000)" in detail
    # one half-occupied site per cell: an ordered model needs twice the cell
    assert "at least 2 x the CIF's cell volume" in detail
    assert "OrderDisorderedStructureTransformation" in detail


def test_unknown_element_is_named_with_the_known_ones(client: TestClient) -> None:
    known = load_fc_model().elements
    element = next(e for e in ("Xe", "Rn", "Kr", "Ar", "Ne", "He", "Pu", "U") if e not in known)
    r = _post(client, {"cif": _fcc(element, 6.0), "outputs": ["dos"]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert f"no embedding for {element}" in detail
    assert ", ".join(known) in detail


def test_huge_cell_states_the_limits(client: TestClient) -> None:
    """Ge 2x2x2 conventional with one Si: a 64-atom primitive cell."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    s = Structure.from_file(GE_CIF)
    s.make_supercell([2, 2, 2])
    s.replace(0, "Si")
    text = str(CifWriter(s))
    r = _post(client, {"cif": text, "outputs": ["powder", "dos"]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "primitive cell has 64 atoms" in detail
    assert "powder output can take" in detail
    assert "powder 32" in detail
    assert "dos 64" in detail


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"cif": "this is not a CIF"}, "cannot read the CIF"),
        ({"cif": "   "}, "the CIF is empty"),
        # a cell without atoms once answered "integer modulo by zero"
        ({"cif": _cif("X", 5.0, [])}, "the CIF has no atom sites"),
        ({"cif": GE_CIF.read_text(), "fc": "raman"}, 'leave fc out (or give "e3nn")'),
        ({"cif": GE_CIF.read_text(), "indirect_orders": 7}, "less than or equal to 4"),
        ({"cif": GE_CIF.read_text(), "indirect_instrument": "iris"}, "vision"),
        ({"material": "Ge", "dos_sigma": 0}, "greater than or equal to 0.05"),
    ],
)
def test_bad_cif_requests_are_422(client: TestClient, body: dict[str, Any], message: str) -> None:
    r = _post(client, body)
    assert r.status_code == 422, r.text
    assert message in json.dumps(r.json()).replace('\\"', '"'), r.json()


def test_openapi_describes_the_new_outputs(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    assert "503" in op["responses"]
    assert "dos" in op["description"]
    assert "indirect" in op["description"]
    schemas = spec["components"]["schemas"]
    props = op["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"dos_sigma", "indirect_instrument", "indirect_orders"} <= set(props)
    outputs = json.dumps(props["outputs"])
    assert "dos" in outputs
    assert "indirect" in outputs
    answer = schemas["PredictResponse"]["properties"]
    assert {"dos", "indirect", "fc_source", "in_domain", "distance", "message"} <= set(answer)
    assert schemas["DOSOutput"]["properties"]["total"]["description"]
    assert schemas["IndirectOutput"]["properties"]["by_bank"]["description"]


def test_cli_predict_dos_json_and_png(tmp_path: Path, known: str) -> None:
    png = tmp_path / "dos.png"
    cif = STRUCTURES / SHIPPED_MATERIALS[known]
    result = CliRunner().invoke(
        app, ["predict", str(cif), "--kind", "dos", "--json", "--out", str(png)]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["kind"] == "dos"
    assert doc["fc_source"] == "e3nn"
    assert doc["formula"] == known
    assert doc["n_atoms"] == load_crystal(known).n_atoms
    assert isinstance(doc["distance"], float)
    assert isinstance(doc["in_domain"], bool)
    assert len(doc["dos"]["energy_meV"]) == len(doc["dos"]["total"])
    assert doc["out"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_predict_with_given_coefficients_and_kinds(tmp_path: Path, ge) -> None:  # type: ignore[no-untyped-def]
    """--fc overrides the model: Ge's raman coefficients on the CIF's 4-shell basis."""
    from simulations.fcdb.reference import resolve_fc
    from simulations.lattice.materials import setup

    setup_names = setup(GE_CIF).basis.names
    _, raman = resolve_fc("Ge", "raman", ge)
    by_name = dict(zip(ge.basis.names, raman, strict=True))
    names = {n: float(by_name[n]) for n in setup_names}
    fc = tmp_path / "fc.json"
    fc.write_text(json.dumps({"coefficients": names}))
    runner = CliRunner()
    result = runner.invoke(
        app, ["predict", str(GE_CIF), "--kind", "indirect", "--fc", str(fc), "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["fc_source"] == "given"
    assert doc["in_domain"] is None
    assert set(doc["indirect"]["by_bank"]) == {"forward", "back"}
    result = runner.invoke(app, ["predict", "Ge", "--kind", "powder", "--fc", "raman", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["fc_source"] == "reference"
    intensity = np.array(doc["powder"]["intensity"], dtype=float)
    assert intensity.shape == (
        len(doc["powder"]["q_inv_angstrom"]),
        len(doc["powder"]["energy_meV"]),
    )
    assert np.isnan(intensity).any()  # (|Q|, E) the detector does not reach
    assert np.nanmax(intensity) > 0


def test_cli_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.cif"
    bad.write_text("not a cif at all")
    for argv, message in (
        (["predict", str(tmp_path / "missing.cif")], "neither a CIF file nor a shipped material"),
        (["predict", str(bad), "--kind", "dos"], "cannot read the CIF"),
        (["predict", str(GE_CIF), "--fc", str(tmp_path / "nope.json")], "cannot read the FC file"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert message in err
        assert "Traceback" not in err
