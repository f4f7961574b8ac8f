"""The curated public API of the physics core: every name exported exists, nothing is lost."""

from __future__ import annotations

import simulations

EXPECTED = {
    "Crystal",
    "DatasetError",
    "EnergyResolution",
    "FCBasis",
    "ForceConstantError",
    "ForwardModel",
    "Grid",
    "GridError",
    "InvalidCoefficientsError",
    "MaterialSetup",
    "QPath",
    "ReferenceEnsemble",
    "SimulationError",
    "SpectraResult",
    "StructureError",
    "UnknownFCSetError",
    "build_fc_basis",
    "full_force_constants",
    "generate_dataset",
    "instrument_resolution",
    "load_crystal",
    "load_reference",
    "make_grid",
    "make_qpath",
    "named_fc_set",
    "read_dataset",
    "resolve_fc",
    "setup",
    "to_phonopy",
    "write_phonopy_params",
    "ReferenceBinning",
    "EventBatch",
    "OrientationSimulator",
    "PhononTable",
    "InstrumentError",
    "NoiseError",
    "RecordingError",
    "Instrument",
    "Orientation",
    "add_noise",
    "counting_noise",
    "noise_grid",
    "RecordedMessage",
    "RunReader",
    "RunWriter",
    "read_run",
    "write_run",
    "RunPlan",
    "RunSummary",
    "parse_omegas",
    "simulate_run",
    "CoherentSQE",
    "PhononModes",
}


def test_exported_members() -> None:
    assert set(simulations.__all__) == EXPECTED
    for name in simulations.__all__:
        assert getattr(simulations, name) is not None


def test_errors_form_one_hierarchy() -> None:
    for name in (
        "DatasetError",
        "ForceConstantError",
        "GridError",
        "StructureError",
        "InvalidCoefficientsError",
        "UnknownFCSetError",
    ):
        assert issubclass(getattr(simulations, name), simulations.SimulationError)
