"""The ``steer`` command line: its commands, the choices of the shared options (the same as
the library's), and a bad choice refused as a usage error (exit 2) that names the choices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest
import typer

from consumers.zmq import DESERIALIZERS
from model_server.prediction.indirect import INDIRECT_INSTRUMENTS
from steering.advisor.ranking import SCORES, WEIGHTINGS
from steering.cli import options
from steering.cli.app import app, main


def test_commands_and_groups_are_registered() -> None:
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert {
        "predict", "fold", "coverage", "replay", "record", "consume", "model-serve",
        "zmq-proxy", "serve", "demo", "train", "evaluate", "estimate",
        "simulate", "advise", "fcdb",
    } <= set(commands)  # fmt: skip
    assert set(commands["simulate"].commands) == {
        "fc", "dispersion", "dataset", "info", "reference", "run", "sqe", "check-run",
    }  # fmt: skip
    assert set(commands["advise"].commands) == {"rank", "benchmark", "closed-loop"}
    assert set(commands["fcdb"].commands) == {"build", "info"}


def test_choices_are_the_library_ones() -> None:
    assert get_args(options.Score) == SCORES
    assert get_args(options.Weighting) == WEIGHTINGS
    assert set(get_args(options.IndirectInstrument)) == set(INDIRECT_INSTRUMENTS)
    assert set(DESERIALIZERS) <= set(get_args(options.ZmqFormat))  # msgpack where installed


@pytest.mark.parametrize(
    ("args", "choices"),
    [
        (["advise", "rank", "--score", "bogus"], ("spectrum", "fc")),
        (["advise", "closed-loop", "--weighting", "bogus"], ("scarcity", "uniform")),
        (["advise", "closed-loop", "--prior", "bogus"], ("information", "model")),
        (["serve", "--advisor-score", "bogus"], ("spectrum", "fc")),
        (["fold", "run.steer", "--segmentation", "bogus"], ("auto", "bluesky", "omega")),
        (["consume", "--bootstrap", "h:1", "--prefix", "p", "--state-dir", "s",
          "--zmq-format", "bogus"], ("pickle", "json")),
        (["predict", "Ge", "--instrument", "bogus"], ("vision", "tosca")),
    ],
)  # fmt: skip
def test_a_bad_choice_is_a_usage_error(
    args: list[str], choices: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'bogus'" in err
    assert all(f"'{c}'" in err for c in choices)
    assert "Traceback" not in err


def test_choices_ignore_case_where_the_library_does(capsys: pytest.CaptureFixture[str]) -> None:
    main(["predict", "Ge", "--kind", "indirect", "--instrument", "TOSCA", "--json"])
    assert json.loads(capsys.readouterr().out)["indirect"]["instrument"]["name"] == "TOSCA"


def test_serve_refuses_a_bad_target() -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "steering.cli", "serve", "--target-std", "1NN_xx=-1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--target-std" in out.stderr
    assert "NAME=eV/A^2" in out.stderr


def test_the_service_limits_its_numeric_pools() -> None:
    """`steer serve/demo --threads 1`: the BLAS pools loaded already and torch, loaded after,
    run one thread each (a fresh interpreter: the limit is process-wide)."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, numpy\n"
        "from steering.cli.options import limit_numeric_threads\n"
        "limit_numeric_threads(1)\n"
        "import torch\n"
        "from threadpoolctl import threadpool_info\n"
        "print(json.dumps({'blas': [p['num_threads'] for p in threadpool_info()"
        " if p['user_api'] == 'blas'], 'torch': torch.get_num_threads()}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["blas"]
    assert set(seen["blas"]) == {1}
    assert seen["torch"] == 1


def test_exact_correction_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--exact-correction``: on and off as given (any case), auto on with 3 or more
    usable cores only, anything else a usage error that names the choices."""
    import simulations.lattice.forward as forward
    from steering.cli.serve import _exact_correction

    assert _exact_correction("ON") is True
    assert _exact_correction(" off ") is False
    monkeypatch.setattr(forward, "usable_cores", lambda: 2)
    assert _exact_correction("auto") is False
    monkeypatch.setattr(forward, "usable_cores", lambda: 3)
    assert _exact_correction("auto") is True
    with pytest.raises(typer.BadParameter, match="auto, on or off"):
        _exact_correction("sometimes")


def test_serve_final_wait_reaches_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``steer serve --final-wait S`` is the service's wait at a run's end (for its last
    background fit, the rest of the exact-fold correction and the last plan); a negative
    one is a usage error."""
    from steering.api.app import LiveState
    from steering.cli.serve import _start_service
    from steering.db import History
    from steering.service import SteeringService

    monkeypatch.setattr(SteeringService, "start", lambda self: None)  # no broker here
    service = _start_service(
        "127.0.0.1:9",
        "arcs",
        state_dir=tmp_path / "state",
        history=History(f"sqlite:///{tmp_path / 'history.db'}"),
        live=LiveState(),
        model_dir=tmp_path,
        advisor_score="fc",
        advisor_weighting="uniform",
        final_wait_s=240.0,
    )
    assert service.final_plan_wait_s == 240.0
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--final-wait", "-1"])
    assert exc.value.code == 2
    assert "--final-wait" in capsys.readouterr().err
