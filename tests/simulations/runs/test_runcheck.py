"""A recorded run read back end to end: pl72 geometry -> ev44 -> binning -> dispersion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulations.exceptions import InstrumentError
from simulations.instrument.spectrometer import Instrument
from simulations.lattice.backgrounds import Backgrounds
from simulations.runs.check import check_run, iter_orientations
from simulations.runs.simulate import RunPlan, simulate_run


def test_run_with_a_loaded_pixel_table_reads_back_and_checks(tmp_path: Path) -> None:
    table = tmp_path / "pixels.csv"
    Instrument.arcs_like(n_columns=120, n_rows=24).write_pixel_table(table)
    ins = Instrument.from_pixel_table(table)
    run = tmp_path / "run.steer"
    plan = RunPlan(
        material="Ge",
        fc="raman",
        omegas=(0.0, 20.0, 40.0, 60.0),
        events_per_orientation=1.5e5,
        count_time=5.0,
        mesh=16,
        seed=3,
    )
    simulate_run(plan, run, instrument=ins, progress=False)
    steps = [chunk for _, chunk in iter_orientations(run)]
    assert [s.omega for s in steps] == pytest.approx([0, 20, 40, 60], abs=0.01)
    assert all(np.isin(s.pixel_id, ins.pixel_ids).all() for s in steps)
    result = check_run(run, progress=False)
    assert result["orientations"] == 4
    assert result["columns_checked"] >= 40
    assert result["fraction_passing"] >= 0.98  # 4 short steps: a few noisy columns

    # the recorded table path is used; another table with a different hash is refused
    other = tmp_path / "other.csv"
    Instrument.arcs_like(n_columns=60, n_rows=24).write_pixel_table(other)
    with pytest.raises(InstrumentError, match="is not the one the run used"):
        check_run(run, progress=False, pixel_table=other)
    table.unlink()
    with pytest.raises(InstrumentError, match="pass the table file"):
        check_run(run, progress=False)


def test_background_components_add_their_events_where_they_belong(tmp_path: Path) -> None:
    """The same plan with and without the sample's components: the elastic line adds
    events at |E| < 2 sigma(0), multiphonon above the top mode; the run start names them."""
    table = tmp_path / "pixels.csv"
    Instrument.arcs_like(n_columns=120, n_rows=24).write_pixel_table(table)
    ins = Instrument.from_pixel_table(table)
    energies = {}
    for label, bg in (("none", Backgrounds.none()), ("default", Backgrounds())):
        run = tmp_path / f"{label}.steer"
        plan = RunPlan(
            material="Ge",
            fc="raman",
            omegas=(10.0,),
            events_per_orientation=1e5,
            count_time=5.0,
            temperature=300.0,
            mesh=16,
            backgrounds=bg,
            seed=4,
        )
        simulate_run(plan, run, instrument=ins, progress=False)
        (meta, step), *_ = list(iter_orientations(run))
        assert meta["simulation"]["backgrounds"]["components"] == list(bg.names)
        _, e = ins.event_to_qe(ins.index_of(step.pixel_id), step.tof_ns, 80.0)
        energies[label] = e
    sigma0 = float(ins.resolution(80.0).sigma(np.array(0.0)))
    near = {k: np.mean(np.abs(e) < 2 * sigma0) for k, e in energies.items()}
    high = {k: np.mean(e > 45.0) for k, e in energies.items()}
    assert near["default"] > near["none"] + 0.05, near
    assert high["default"] > high["none"], high
