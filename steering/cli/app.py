"""``steer``: the command line of the steering service.

This module only builds the root command and registers the command groups, one module each:
:mod:`~steering.cli.simulate` (``steer simulate``), :mod:`~steering.cli.stream` (fold,
coverage, replay, record, consume, zmq-proxy), :mod:`~steering.cli.serve` (serve, model-serve,
demo), :mod:`~steering.cli.model` (train, evaluate, estimate, evaluate-posterior),
:mod:`~steering.cli.predict`, :mod:`~steering.cli.advise` and :mod:`~steering.cli.fcdb`; the
options they share are in :mod:`~steering.cli.options`. The physics lives in
:mod:`simulations`. Every command that computes results prints them as JSON with ``--json``
(on stdout; progress bars and logs go to stderr).
"""

from __future__ import annotations

import logging
import sys

import typer

from consumers.exceptions import ConsumerError
from model_server.exceptions import ModelServerError
from simulations.exceptions import SimulationError
from steering.cli.advise import advise_app
from steering.cli.fcdb import fcdb_app
from steering.cli.fcmodel import fcmodel_app
from steering.cli.model import (
    estimate_cmd,
    evaluate_cmd,
    evaluate_posterior_cmd,
    finetune_cmd,
    train_cmd,
)
from steering.cli.predict import predict_cmd
from steering.cli.serve import demo_cmd, model_serve_cmd, serve_cmd
from steering.cli.simulate import simulate_app
from steering.cli.stream import (
    consume_cmd,
    coverage_cmd,
    fold_cmd,
    record_cmd,
    replay_cmd,
    zmq_proxy_cmd,
)
from steering.exceptions import SteeringError

__all__ = ["app", "main"]

app = typer.Typer(
    name="steer",
    help="Streaming steering service for single-crystal inelastic neutron scattering.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# `steer --help` lists the commands in this order, then the groups
app.command("predict")(predict_cmd)
app.command("fold")(fold_cmd)
app.command("coverage")(coverage_cmd)
app.command("replay")(replay_cmd)
app.command("record")(record_cmd)
app.command("consume")(consume_cmd)
app.command("model-serve")(model_serve_cmd)
app.command("zmq-proxy")(zmq_proxy_cmd)
app.command("serve")(serve_cmd)
app.command("demo")(demo_cmd)
app.command("train")(train_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("estimate")(estimate_cmd)
app.command("evaluate-posterior")(evaluate_posterior_cmd)
app.command("finetune")(finetune_cmd)
app.add_typer(simulate_app, name="simulate")
app.add_typer(advise_app, name="advise")
app.add_typer(fcdb_app, name="fcdb")
app.add_typer(fcmodel_app, name="fcmodel")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``steer`` console script.

    Exit status: 0 on success, 2 for an error the user can fix (the one-line message of a
    project exception, a usage error, no Kafka broker), 130 when interrupted.
    """
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("matplotlib", "h5py", "PIL", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python warns whenever another thread holds the GIL for 0.1 s (a fold): noise
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    try:
        code = app(args=argv, standalone_mode=False)
    except (SimulationError, ConsumerError, ModelServerError, SteeringError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        raise SystemExit(130) from None
    except typer.TyperException as exc:  # typer's usage errors: bad option or value, exit 2
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"Error: {exc.format_message()}", err=True)
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:
        from kafka.errors import KafkaError

        if isinstance(exc, KafkaError):  # e.g. no broker at the bootstrap address
            typer.echo(f"error: Kafka: {exc}", err=True)
            raise SystemExit(2) from None
        raise
    if isinstance(code, int) and code:  # typer.Exit(code) from a command
        raise SystemExit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
