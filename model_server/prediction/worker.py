"""One prediction, answered as bytes: what a worker process of
:class:`model_server.prediction.pool.PredictionPool` does with each job.

:func:`answer` runs :func:`model_server.prediction.predict.predict` on a job (its keyword
arguments and ``png``) and returns an :class:`Answer`: the JSON or PNG body, or a status and
a message. :func:`serve` is a worker process's main loop: jobs in, answers out, over a pipe.
The module imports only the standard library at the top, so that a worker limits BLAS,
OpenMP, torch and numba to one thread each before they start theirs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Answer", "answer", "serve"]

logger = logging.getLogger(__name__)

#: Thread-count variables set to 1 in a worker before the numerical libraries load (numba's
#: is left alone: its pool is limited with ``numba.set_num_threads``, and a changed
#: ``NUMBA_NUM_THREADS`` makes its next compilation fail).
_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Answer:
    """What a prediction gives: ``status`` 200 with ``body`` of ``media_type``, or an error
    status with ``detail`` (the message)."""

    status: int
    media_type: str = "application/json"
    body: bytes = b""
    detail: str = ""


def answer(job: dict[str, Any]) -> Answer:
    """Run the prediction ``job`` (:func:`~model_server.prediction.predict.predict`'s keyword
    arguments, and ``png``: answer a PNG rather than JSON) and render its answer.

    Errors are answers too: the status of a :class:`~model_server.prediction.request.
    PredictionError`, 422 for anything else the request gets wrong, 500 (logged) for a bug.
    """
    from consumers.exceptions import ConsumerError
    from model_server.exceptions import ModelServerError
    from model_server.prediction.predict import PredictionError, predict
    from simulations.exceptions import SimulationError

    kwargs = dict(job)
    png = bool(kwargs.pop("png", False))
    try:
        result = predict(**kwargs)
        if png:
            return Answer(status=200, media_type="image/png", body=result.to_png())
        body = json.dumps(
            result.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")
        return Answer(status=200, body=body)
    except PredictionError as exc:
        if exc.status >= 500:
            logger.warning("prediction unavailable: %s", exc)
        return Answer(status=exc.status, detail=_without_server_paths(str(exc)))
    except (SimulationError, ConsumerError, ModelServerError, ValueError) as exc:
        logger.info("prediction refused: %s", exc)
        return Answer(status=422, detail=str(exc))
    except MemoryError:
        logger.warning("a prediction ran out of memory")
        return Answer(status=503, detail="the prediction ran out of memory; ask for less")
    except Exception as exc:  # a bug: logged with its traceback, answered without it
        logger.exception("prediction failed")
        return Answer(status=500, detail=f"the prediction failed ({type(exc).__name__})")


def _without_server_paths(message: str) -> str:
    """``message`` with the server's folders (the e3nn model's, the working folder) named
    rather than spelled out: answers carry no absolute server paths."""
    from pathlib import Path

    from model_server.structure_fc.model import default_model_dir

    model = default_model_dir()
    for spelled in {str(model.resolve()), str(model)}:
        message = message.replace(spelled, "<the fc model folder: STEER_FC_MODEL>")
    return message.replace(str(Path.cwd()) + os.sep, "")


def _one_thread() -> None:
    """BLAS, OpenMP, torch and numba on one thread in this process."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    import torch

    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(1)
    except (ImportError, ValueError):  # numba absent, or already at its own limit
        pass


def serve(conn: Any) -> None:
    """A worker process's main loop: receive a job from ``conn``
    (:class:`multiprocessing.connection.Connection`), send its :class:`Answer`; ``None`` or
    a closed pipe ends it."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    _one_thread()
    import model_server.prediction.predict  # noqa: F401  (imported before the first job)

    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            conn.send(answer(job))
        except (BrokenPipeError, OSError):
            return
