"""The nexus_structure of a simulated run (simulations.runs.nexus_structure): its size on
the wire for the default array, and the form kafka-to-nexus reads."""

from __future__ import annotations

import json

from streaming_data_types.run_start_pl72 import deserialise_pl72, serialise_pl72

from simulations.instrument.spectrometer import Instrument, Orientation
from simulations.lattice.materials import setup
from simulations.runs.nexus_structure import (
    StreamNames,
    encode,
    nexus_structure,
    reduced_formula,
)

#: The limits the project sets (consumers/kafka/source.py max_partition_fetch_bytes, the
#: replay producer's max_request_size is twice that): the run start must fit the smaller.
FETCH_LIMIT = 16 << 20


def test_the_default_array_fits_the_clients_limits() -> None:
    ms = setup("Ge")
    ins = Instrument.arcs_like()  # 102,400 pixels
    text = encode(
        nexus_structure(
            instrument=ins,
            orientation=Orientation.from_vectors(ms.crystal),
            material="Ge",
            ei=80.0,
            temperature=5.0,
            streams=StreamNames.simulator("arcs"),
        )
    )
    payload = serialise_pl72(job_id="r", filename="r.nxs", start_time=0, nexus_structure=text)
    # measured 8.8 MB: five numbers a pixel at up to 17 significant digits
    assert 5e6 < len(payload) < 10e6 < FETCH_LIMIT
    assert deserialise_pl72(payload).nexus_structure == text
    assert " " not in text[:1000]  # no spaces between items


def test_groups_carry_their_nx_class_and_streams_their_topics() -> None:
    ms = setup("Ge")
    s = nexus_structure(
        instrument=Instrument.arcs_like(n_columns=2, n_rows=2),
        orientation=Orientation.from_vectors(ms.crystal),
        material="Ge",
        ei=80.0,
        temperature=5.0,
        streams=StreamNames.simulator("x"),
    )
    text = json.dumps(s)
    entry = s["children"][0]
    assert entry["attributes"][0] == {"name": "NX_class", "dtype": "string", "values": "NXentry"}
    assert '"module": "ev44", "config": {"topic": "x_events", "source": "x_detector"}' in text
    assert '"topic": "x_motion", "source": "omega"' in text
    assert '"topic": "x_motion", "source": "proton_charge"' in text


def test_reduced_formula_in_hill_order() -> None:
    assert reduced_formula(("Ge", "Ge")) == "Ge"
    assert reduced_formula(("Se", "Nb", "Se", "Se", "Nb", "Se")) == "NbSe2"
    assert reduced_formula(("H", "O", "C", "H")) == "CH2O"
