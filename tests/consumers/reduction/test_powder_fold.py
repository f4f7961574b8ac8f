"""Powder runs: the fold into S(|Q|, E) against a brute-force binning and against the
simulator's powder average, the exposure, the run start's sample kind, checkpoints, bad
input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumers.offline import fold_recorded_run
from consumers.reduction.nexus_setup import read_nexus_setup
from consumers.reduction.pipeline import RunPipeline, run_folder
from consumers.reduction.powder import PowderFolder
from simulations.instrument.spectrometer import Instrument
from simulations.lattice.backgrounds import Backgrounds
from simulations.lattice.materials import setup
from simulations.runs.recording import RunReader
from simulations.runs.simulate import RunPlan, simulate_run
from simulations.units import E_PER_K2, E_PER_V2, K_PER_V

EI = 50.0


def _powder_run(path: Path, *, steps: int = 3, events: float = 3e5, **kw: Any) -> Path:
    plan = RunPlan(
        material="Al",
        powder=True,
        omegas=(0.0,) * steps,
        ei=EI,
        temperature=300.0,
        events_per_orientation=events,
        count_time=2.0,
        mesh=16,
        seed=kw.pop("seed", 5),
        **kw,
    )
    simulate_run(plan, path, progress=False)
    return path


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> tuple[Path, dict[str, Any], Any]:  # type: ignore[no-untyped-def]
    """A one-phonon Al powder run (no backgrounds) and its offline fold."""
    path = _powder_run(
        tmp_path_factory.mktemp("powder") / "al.steer",
        events=1e6,
        backgrounds=Backgrounds.none(),
        background_fraction=0.0,
    )
    summary, acc = fold_recorded_run(path, progress=False)
    return path, summary, acc


def _brute_force(folder: PowderFolder, ids: np.ndarray, tof: np.ndarray) -> np.ndarray:
    """(n_Q, n_E) histogram of events binned by |Q| and E computed here from the pixel
    positions, without the fold's kernel."""
    ins = folder.instrument
    rows = ins.pixel_rows(ids)
    pos = np.asarray(ins.positions)[rows]
    l2 = np.linalg.norm(pos, axis=1)
    v_i = np.sqrt(EI / E_PER_V2)
    t_f = tof * 1e-9 - ins.l1 / v_i
    v_f = l2 / t_f
    energy = EI - E_PER_V2 * v_f**2
    k_i, k_f = np.sqrt(EI / E_PER_K2), K_PER_V * v_f
    cos2t = pos[:, 2] / l2
    q = np.sqrt(np.maximum(k_i**2 + k_f**2 - 2 * k_i * k_f * cos2t, 0.0))
    g = folder.grid
    hist, _, _ = np.histogram2d(q, energy, bins=[g.q_edges, g.energy_edges])
    return hist


def test_powder_fold_equals_brute_force_binning(clean_run) -> None:  # type: ignore[no-untyped-def]
    path, _, acc = clean_run
    with RunReader(path) as reader:
        meta = None
        ids, tofs = [], []
        from streaming_data_types.run_start_pl72 import deserialise_pl72

        from consumers.wire import decode_ev44

        for m in reader:
            schema = dict(m.headers).get("schema", b"").decode()
            if schema == "pl72":
                meta = json.loads(deserialise_pl72(m.payload).metadata)
            elif schema == "ev44":
                _, _, tof, pix = decode_ev44(m.payload)
                ids.append(np.asarray(pix))
                tofs.append(np.asarray(tof))
    assert meta is not None
    assert meta["sample_kind"] == "powder"
    _, folder = run_folder(meta)
    assert isinstance(folder, PowderFolder)
    pix, tof = np.concatenate(ids), np.concatenate(tofs)
    counts, dropped = folder.fold(pix, tof)
    brute = _brute_force(folder, pix, tof)
    # float rounding can move an event that sits on a bin edge: none of these
    assert np.abs(counts - brute).sum() <= 2
    assert counts.sum() + dropped.sum() == len(pix)
    # every step is in the accumulator; the events between steps are none (no goniometer)
    assert acc.counts.sum() == pytest.approx(counts.sum(), abs=2)


def test_powder_coverage_is_the_detector_s_solid_angle_in_every_energy_bin(clean_run) -> None:  # type: ignore[no-untyped-def]
    """Summed over |Q|, the coverage of an energy bin is sum(dOmega) k_f/k_i dE wherever the
    whole detector's |Q| lies inside the grid (an independent sum over pixels)."""
    _, _, acc = clean_run
    ms = setup("Al")
    ins = Instrument.arcs_like()
    folder = PowderFolder(ms.powder_grid(EI), ins, EI)
    cov = folder.coverage(cache=False)
    g = folder.grid
    e = g.energy_centres
    kf_ki = np.sqrt((EI - e) / EI)
    expected = ins.solid_angles.sum() * kf_ki * (g.energy_edges[1] - g.energy_edges[0])
    np.testing.assert_allclose(cov.sum(axis=0), expected, rtol=2e-3)
    # the run's exposure is its charge times this coverage, unmeasured bins NaN
    charge = sum(r.proton_charge for r in acc.records)
    np.testing.assert_allclose(acc.exposure, charge * cov, rtol=1e-12)
    snap = acc.snapshot()
    assert np.isnan(snap.intensity[cov == 0]).all()
    assert (cov == 0).any()


def test_folded_powder_spectrum_is_the_simulated_powder_average(clean_run) -> None:  # type: ignore[no-untyped-def]
    """counts against k S(|Q|, E) x exposure with S the simulator's own powder average at
    the bin centres: chi^2 per bin near 1 between 3 and 25 meV (bins > 20 counts)."""
    from simulations.fcdb.reference import resolve_fc
    from simulations.lattice.powder import POWDER_Q_SIGMA, powder_shells
    from simulations.lattice.sqe import CoherentSQE

    _, _, acc = clean_run
    ms = setup("Al")
    _, c = resolve_fc("Al", "mlff_mean", ms)
    model = CoherentSQE(
        ms.basis, c, temperature=300.0, resolution=Instrument.arcs_like().resolution(EI)
    )
    g = acc.grid
    s = powder_shells(
        model, g.q_centres, g.energy_centres, mesh=48, q_sigma=POWDER_Q_SIGMA, bins=True
    )
    e = g.energy_centres[None, :]
    use = (acc.counts > 20) & (e > 3) & (e < 25)
    assert use.sum() > 1000
    mu = s * acc.exposure
    mu *= acc.counts[use].sum() / mu[use].sum()
    chi2 = float(((acc.counts[use] - mu[use]) ** 2 / mu[use]).mean())
    print(f"chi2 per bin {chi2:.3f} over {use.sum()} bins")
    assert chi2 < 1.3, chi2


def test_powder_run_start_says_powder_in_both_layouts(tmp_path: Path) -> None:
    """The simulator's metadata and the ESS layout's nexus_structure alone both give a
    powder folder; the folds are equal bit for bit."""
    a = _powder_run(tmp_path / "sim.steer", steps=2, events=5e4)
    b = tmp_path / "ess.steer"
    plan = RunPlan(
        material="Al", powder=True, omegas=(0.0, 0.0), ei=EI, temperature=300.0,
        events_per_orientation=5e4, count_time=2.0, mesh=16, seed=5,
    )  # fmt: skip
    simulate_run(plan, b, progress=False, stream_layout="ess")
    from consumers.streams import preset

    _, acc_a = fold_recorded_run(a, progress=False)
    _, acc_b = fold_recorded_run(b, progress=False, streams=preset("ess", "arcs"))
    np.testing.assert_array_equal(acc_a.counts, acc_b.counts)
    np.testing.assert_array_equal(acc_a.exposure, acc_b.exposure)
    assert acc_a.grid.kind == "powder"
    assert len(acc_a.records) == 2
    with RunReader(b) as reader:
        from streaming_data_types.run_start_pl72 import deserialise_pl72

        pl72 = next(m for m in reader if dict(m.headers).get("schema") == b"pl72")
        nexus = read_nexus_setup(deserialise_pl72(pl72.payload).nexus_structure)
    assert nexus.sample_kind == "powder"
    assert nexus.ub is None
    assert nexus.goniometer is None


def test_powder_pipeline_resumes_from_a_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    path = _powder_run(tmp_path / "al.steer", steps=3, events=5e4)
    _, whole = fold_recorded_run(path, progress=False)
    with RunReader(path) as reader:
        messages = list(reader)
    first = RunPipeline(background=False)
    half = len(messages) // 2
    for m in messages[:half]:
        first.handle(dict(m.headers)["schema"].decode(), m.payload, m.timestamp_ns, m.key)
    js, arrays = first.state()
    js = json.loads(json.dumps(js))  # as the checkpoint file holds it
    second = RunPipeline(background=False)
    second.restore(js, arrays)
    for m in messages[half:]:
        second.handle(dict(m.headers)["schema"].decode(), m.payload, m.timestamp_ns, m.key)
    second.finish()
    assert second.acc is not None
    assert second.segmenter is not None
    assert second.segmenter.powder
    np.testing.assert_array_equal(second.acc.counts, whole.counts)
    np.testing.assert_array_equal(second.acc.exposure, whole.exposure)


def test_powder_run_start_without_ei_is_refused_clearly() -> None:
    meta = {"material": "Al", "sample_kind": "powder", "instrument": {"name": "x"}}
    with pytest.raises(ValueError, match="powder run start without Ei"):
        run_folder(meta | {"instrument": Instrument.arcs_like().to_metadata()})
    with pytest.raises(ValueError, match="sample_kind 'glass'"):
        run_folder(meta | {"sample_kind": "glass", "ei_meV": EI})


def test_powder_plan_with_angles_is_refused() -> None:
    from simulations.exceptions import InstrumentError

    with pytest.raises(InstrumentError, match="no goniometer"):
        RunPlan(material="Al", powder=True, omegas=(0.0, 10.0)).validate()
