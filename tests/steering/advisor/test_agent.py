"""The advisor as a bluesky-adaptive agent, driving an ophyd.sim goniometer in a RunEngine."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.reduction.folding import Folder
from consumers.reduction.table import FoldTable
from simulations.fcdb.reference import load_reference, resolve_fc
from simulations.instrument.spectrometer import Instrument, Orientation
from steering.advisor.agent import OrientationAgent
from steering.advisor.ranking import Advisor
from steering.exceptions import AdvisorError
from tests.paths import MODELS

MODEL = MODELS / "ge"
OMEGAS = np.arange(0.0, 60.0, 10.0)


@pytest.fixture(scope="module")
def agent_setup(ge):  # type: ignore[no-untyped-def]
    ins = Instrument.arcs_like(n_columns=160, n_rows=96)
    orientation = Orientation.from_vectors(ge.crystal, (1, 0, 0), (0, 1, 0))
    folder = Folder(FoldTable.cached(ge.crystal, ge.grid), ge.grid, ins, orientation, 80.0)
    coverage = np.stack([folder.coverage(w) for w in OMEGAS])
    advisor = Advisor("Ge", material_setup=ge)
    ref = load_reference("Ge")
    _, full = resolve_fc("Ge", "raman", ge)
    truth = np.array([full[ref.names.index(n)] for n in advisor.fc_names])
    return advisor, coverage, truth


def test_agent_drives_an_ophyd_goniometer_with_bluesky_adaptive(agent_setup) -> None:  # type: ignore[no-untyped-def]
    """bluesky_adaptive.plans.optimize asks the agent, moves ophyd.sim's omega there,
    'measures' (Poisson counts from the forward model x Bose factor x coverage) and tells
    the agent the model server's new estimate."""
    from bluesky import RunEngine
    from bluesky_adaptive.plans import optimize
    from bluesky_adaptive.protocols import OptimizationProblem, Optimizer
    from ophyd.sim import SynAxis, SynGauss

    from model_server.inversion.inference import Estimator

    advisor, coverage, truth = agent_setup
    agent = OrientationAgent(advisor, OMEGAS, coverage, motor="omega", charge=20.0)
    assert isinstance(agent, Optimizer)
    motor = SynAxis(name="omega")
    det = SynGauss("det", motor, "omega", center=0.0, Imax=1.0)
    estimator = Estimator(MODEL, n_samples=64)
    intensity, _ = advisor.fm.jacobian(truth)
    signal = 30.0 * advisor.g[None, :] * np.maximum(intensity, 0)  # counts per uC sr meV
    rng = np.random.default_rng(3)
    total = {"counts": np.zeros(signal.shape), "exposure": np.zeros(signal.shape)}

    def evaluate(uid: object, suggestions: list[dict]) -> list[dict]:  # type: ignore[type-arg]
        out = []
        for s in suggestions:
            assert motor.position == pytest.approx(s["omega"])  # the plan moved there
            exposure = 20.0 * coverage[int(np.argmin(np.abs(OMEGAS - s["omega"])))]
            total["counts"] += rng.poisson(exposure * signal)
            total["exposure"] += exposure
            mask = total["exposure"] > 0
            i = np.where(mask, total["counts"] / np.where(mask, total["exposure"], 1), np.nan)
            est = estimator.estimate(i, mask)
            out.append({"_id": s["_id"], "fc_mean": est.mean, "fc_std": est.std, **total})
        return out

    documents: list[str] = []
    engine = RunEngine({})
    engine.subscribe(lambda name, doc: documents.append(name))
    problem = OptimizationProblem(
        optimizer=agent, actuators=[motor], sensors=[det], evaluation_function=evaluate
    )
    engine(optimize(problem, iterations=3))
    assert len(agent.measured) == 3
    assert len(set(agent.measured)) == 3  # no angle twice (remeasure off)
    assert "start" in documents
    assert "stop" in documents
    report = agent.report()
    assert report["basis"] == "spectrum-d-optimal"
    assert set(report["estimate"]) == set(advisor.fc_names)
    assert report["measured"] == agent.measured
    # the classic interface: the next angle is the top of the ranking among the rest
    docs, omegas = agent.ask(2)
    assert len(omegas) == 2
    assert not set(omegas) & set(agent.measured)
    assert docs[0]["score"] >= docs[1]["score"]


def test_agent_before_any_estimate_and_bad_outcomes(agent_setup) -> None:  # type: ignore[no-untyped-def]
    advisor, coverage, truth = agent_setup
    agent = OrientationAgent(advisor, OMEGAS, coverage)
    docs, omegas = agent.ask(1)
    assert docs[0]["basis"] == "coverage"
    with pytest.raises(AdvisorError, match="fc_mean and fc_std"):
        agent.tell(omegas[0], {"fc_mean": truth})
    with pytest.raises(AdvisorError, match="names no angle"):
        agent.ingest([{"fc_mean": truth, "fc_std": truth * 0.1}])
    for w in OMEGAS:
        agent.tell(w, {"fc_mean": truth, "fc_std": 0.01 + 0 * truth})
    with pytest.raises(AdvisorError, match="every candidate"):
        agent.ask(1)
    # the sort and the bins' weights are the agent's to choose
    fc_agent = OrientationAgent(advisor, OMEGAS, coverage, score="fc", weighting="uniform")
    fc_agent.tell(OMEGAS[0], {"fc_mean": truth, "fc_std": 0.1 + 0 * truth})
    docs, _ = fc_agent.ask(1)
    assert docs[0]["basis"] == "fisher-d-optimal"
    assert docs[0]["score"] == docs[0]["fc_gain"]
    assert fc_agent.report()["weighting"] == "uniform"
    assert agent.report()["weighting"] == "scarcity"
    with pytest.raises(AdvisorError, match="weighting must be"):
        OrientationAgent(advisor, OMEGAS, coverage, weighting="bogus")
    with pytest.raises(AdvisorError, match="score must be"):
        OrientationAgent(advisor, OMEGAS, coverage, score="bogus")
