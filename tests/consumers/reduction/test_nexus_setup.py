"""A run's set-up from its pl72 nexus_structure (consumers.reduction.nexus_setup).

The structures come from :func:`simulations.runs.nexus_structure.nexus_structure` on a
small ARCS-like array (32 pixels), edited piece by piece, and from the two public
examples in ``../shared/instruments/nexus_structure`` (skipped when that folder is absent).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from consumers.exceptions import NexusStructureError
from consumers.reduction.nexus_setup import read_nexus_setup
from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.materials import setup
from simulations.runs.nexus_structure import MonitorStream, StreamNames, encode, nexus_structure
from tests.paths import REPO

SHARED = REPO.parent / "shared" / "instruments" / "nexus_structure"

ESS_LIKE = StreamNames(
    events_topic="cspec_detector",
    events_source="cspec_bank_0",
    motion_topic="cspec_motion",
    omega_source="CSPEC-SE:MC-ROT-01:Mtr.RBV",
    omega_setpoint_source="CSPEC-SE:MC-ROT-01:Mtr.VAL",
    proton_charge_source="ESS-Beam:proton_charge",
    monitors=(MonitorStream(name="monitor_1", topic="cspec_beam_monitor", source="cbm1",
                            distance=-1.5),),
)  # fmt: skip


@pytest.fixture(scope="module")
def parts() -> tuple[Instrument, Orientation]:
    ms = setup("Ge")
    ins = Instrument.arcs_like(n_columns=8, n_rows=4, l1=13.6)
    return ins, Orientation.from_vectors(ms.crystal, (1.0, 1.0, 0.0), (0.0, 0.0, 1.0))


@pytest.fixture
def structure(parts: tuple[Instrument, Orientation]) -> dict[str, Any]:
    ins, orientation = parts
    return nexus_structure(
        instrument=ins,
        orientation=orientation,
        material="Ge",
        ei=80.0,
        temperature=5.0,
        streams=ESS_LIKE,
        run_id="run-1",
    )


def node(structure: dict[str, Any], path: str) -> dict[str, Any]:
    """The group or dataset module at ``path`` (``/entry/sample/ub_matrix``)."""
    here: dict[str, Any] = structure
    for name in path.strip("/").split("/"):
        for c in here.get("children", []):
            if c.get("name") == name or c.get("config", {}).get("name") == name:
                here = c
                break
        else:
            raise KeyError(path)
    return here


def remove(structure: dict[str, Any], path: str) -> None:
    parent = node(structure, path.rsplit("/", 1)[0])
    parent["children"].remove(node(structure, path))


def test_round_trip_reproduces_the_set_up(parts, structure) -> None:  # type: ignore[no-untyped-def]
    ins, orientation = parts
    nx = read_nexus_setup(encode(structure))
    assert_array_equal(nx.pixel_ids, ins.pixel_ids)
    # a translation of 0 m keeps the offsets the positions: equal, not only close
    assert_array_equal(nx.positions, ins.positions)
    assert nx.solid_angles is not None
    assert_array_equal(nx.solid_angles, ins.solid_angles)
    assert nx.l1 == 13.6
    assert nx.ei == 80.0
    assert nx.chopper_frequency == ins.chopper_frequency
    assert nx.temperature == 5.0
    assert_array_equal(nx.ub, orientation.ub)
    assert_allclose(nx.lattice_abc, [5.75] * 3, atol=0.1)  # Ge, about 5.66 Angstrom
    assert_allclose(nx.lattice_angles, [90.0] * 3, atol=1e-9)
    assert (nx.material, nx.chemical_formula, nx.space_group) == ("Ge", "Ge", "Fd-3m")
    assert nx.instrument_name == "ARCS"
    g = nx.goniometer
    assert g.vector == (0.0, 1.0, 0.0)
    assert (g.stream.topic, g.stream.source) == ("cspec_motion", "CSPEC-SE:MC-ROT-01:Mtr.RBV")
    assert g.setpoint is not None
    assert g.setpoint.source == "CSPEC-SE:MC-ROT-01:Mtr.VAL"
    assert [(d.module, d.topic, d.source) for d in nx.detectors] == [
        ("ev44", "cspec_detector", "cspec_bank_0")
    ]
    assert [(m.topic, m.source) for m in nx.monitors] == [("cspec_beam_monitor", "cbm1")]
    assert nx.proton_charge is not None
    assert nx.proton_charge.source == "ESS-Beam:proton_charge"
    rebuilt = nx.orientation(orientation.crystal)
    assert_array_equal(rebuilt.ub, orientation.ub)
    assert_allclose(rebuilt.u, (1.0, 1.0, 0.0), atol=1e-12)
    assert_allclose(rebuilt.v, (0.0, 0.0, 1.0), atol=1e-12)
    instrument = nx.instrument()
    assert_array_equal(instrument.positions, ins.positions)
    assert instrument.l1 == ins.l1


def test_the_material_is_matched_by_formula_and_space_group(structure) -> None:  # type: ignore[no-untyped-def]
    remove(structure, "/entry/sample/steer_material")
    assert read_nexus_setup(structure).material == "Ge"
    node(structure, "/entry/sample/space_group")["config"]["values"] = "Im-3m"
    with pytest.raises(NexusStructureError, match="no material"):
        read_nexus_setup(structure)


def test_depends_on_chains_with_rotations_units_and_offsets(structure) -> None:  # type: ignore[no-untyped-def]
    det = "/entry/instrument/detector"
    for a, values in zip("xyz", ([1.0, 0.0], [0.0, 0.5], [0.0, 0.0]), strict=True):
        node(structure, f"{det}/{a}_pixel_offset")["config"]["values"] = values
    node(structure, f"{det}/detector_number")["config"]["values"] = [7, 9]
    remove(structure, f"{det}/solid_angle")
    t = node(structure, f"{det}/transformations")
    t["children"] = [
        {"module": "dataset",
         "config": {"name": "turn", "values": np.pi / 2, "type": "double"},
         "attributes": {"transformation_type": "rotation", "units": "rad",
                        "vector": [0.0, 2.0, 0.0], "depends_on": "shift"}},
        {"module": "dataset",
         "config": {"name": "shift", "values": 2000.0, "type": "double"},
         "attributes": {"transformation_type": "translation", "units": "mm",
                        "vector": [0.0, 0.0, 1.0], "offset": [0.0, 100.0, 0.0],
                        "offset_units": "mm", "depends_on": "."}},
    ]  # fmt: skip
    node(structure, f"{det}/depends_on")["config"]["values"] = f"{det}/transformations/turn"
    nx = read_nexus_setup(structure)
    assert_array_equal(nx.pixel_ids, [7, 9])
    # (1, 0, 0) turned 90 deg about +y is (0, 0, -1); then 2 m along z, then 0.1 m up
    assert_allclose(nx.positions, [[0.0, 0.1, 1.0], [0.0, 0.6, 2.0]], atol=1e-9)
    assert nx.solid_angles is None
    assert nx.instrument().solid_angles.shape == (2,)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: remove(s, "/entry/instrument/detector/x_pixel_offset"), "no x_pixel_offset"),
        (lambda s: remove(s, "/entry/instrument/fermi_chopper"), "no Ei"),
        (lambda s: remove(s, "/entry/sample/ub_matrix"), "no ub_matrix"),
        (lambda s: remove(s, "/entry/sample/unit_cell_abc"), "no lattice"),
        (lambda s: remove(s, "/entry/sample/transformations"), "names /entry/sample/transf"),
        (lambda s: remove(s, "/entry/instrument/moderator"), "no L1"),
        (
            lambda s: node(s, "/entry/sample/depends_on")["config"].update(values="."),
            "no rotation of the sample driven by an f144 stream",
        ),
        (
            lambda s: node(s, "/entry/instrument/detector/depends_on")["config"].update(
                values="/entry/instrument/detector/transformations/nowhere"
            ),
            "not in the structure",
        ),
        (
            lambda s: node(s, "/entry/instrument/detector/transformations/position")[
                "attributes"
            ].append({"name": "depends_on", "values": "position"}),
            "loops back",
        ),
        (
            lambda s: node(s, "/entry/instrument/detector/y_pixel_offset")["config"].update(
                values=["a"] * 32
            ),
            "not numeric",
        ),
        (
            lambda s: node(s, "/entry/instrument/moderator/distance")["config"].update(
                values="far"
            ),
            "not numeric",
        ),
        (
            lambda s: node(s, "/entry/instrument/detector/z_pixel_offset")["attributes"][0].update(
                values="furlong"
            ),
            "units 'furlong'",
        ),
    ],
)
def test_malformed_or_missing_pieces_are_refused(structure, edit, message) -> None:  # type: ignore[no-untyped-def]
    broken = copy.deepcopy(structure)
    edit(broken)
    with pytest.raises(NexusStructureError, match=message):
        read_nexus_setup(broken)


def test_a_missing_piece_is_named_with_the_others(structure) -> None:  # type: ignore[no-untyped-def]
    remove(structure, "/entry/instrument/fermi_chopper")
    remove(structure, "/entry/sample/ub_matrix")
    with pytest.raises(NexusStructureError) as err:
        read_nexus_setup(structure)
    assert "no Ei" in str(err.value)
    assert "no ub_matrix" in str(err.value)


def test_text_that_is_not_json_is_refused() -> None:
    with pytest.raises(NexusStructureError, match="not JSON"):
        read_nexus_setup("{children: [")


def test_a_structure_nested_beyond_the_wire_limit_is_refused_before_parsing() -> None:
    # a hostile run start: 100,000 levels would overflow the C parser's stack in a process
    # whose recursion limit a library has raised; it is refused before it is parsed
    deep = '{"children": ' * 100_000 + "[]" + "}" * 100_000
    with pytest.raises(NexusStructureError, match="nested deeper than"):
        read_nexus_setup(deep)


def test_a_goniometer_about_another_axis_is_refused(structure) -> None:  # type: ignore[no-untyped-def]
    omega = node(structure, "/entry/sample/transformations/omega")
    for a in omega["attributes"]:
        if a["name"] == "vector":
            a["values"] = [0.0, 0.0, 1.0]
    with pytest.raises(NexusStructureError, match="about \\+y"):
        read_nexus_setup(structure)


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is not here")


@needs_shared
def test_ymir_is_refused_naming_what_a_spectrometer_fold_lacks() -> None:
    # the YMIR fixture: detector_number has 3 values but x/y_pixel_offset 9; no Ei, no
    # lattice or UB, no material and no streamed rotation of the sample
    text = (SHARED / "ymir_detectors.json").read_text()
    with pytest.raises(NexusStructureError) as err:
        read_nexus_setup(text)
    msg = str(err.value)
    for piece in (
        "hypothetical_detector_0/x_pixel_offset has 9 values for 3",
        "hypothetical_detector_1/x_pixel_offset has 9 values for 3",
        "no Ei",
        "no lattice in /entry/sample",
        "no ub_matrix",
        "no material",
        "no rotation of the sample",
    ):
        assert piece in msg
    assert "no NXsample" not in msg
    assert "no L1" not in msg  # the light source's translation of 2 m
    json.loads(text)  # the file itself is fine JSON


@needs_shared
def test_the_file_writers_ev44_example_is_refused() -> None:
    # one NXdetector with only an ev44 stream: no pixels, no source, no Ei, no sample
    with pytest.raises(NexusStructureError) as err:
        read_nexus_setup((SHARED / "nexus_structure_ev44.json").read_text())
    msg = str(err.value)
    for piece in ("/entry/test has no detector_number", "no L1", "no Ei", "no NXsample"):
        assert piece in msg
    assert "no ev44 stream" not in msg
