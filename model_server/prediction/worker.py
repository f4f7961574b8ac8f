"""One prediction, answered as bytes: what a worker process of
:class:`model_server.prediction.pool.PredictionPool` does with each job.

:func:`answer` runs :func:`model_server.prediction.predict.predict` on a job (its keyword
arguments and ``png``) and returns an :class:`Answer`: the JSON or PNG body, or a status and
a message. :func:`serve` is a worker process's main loop: jobs in, answers out, over a pipe.
The module imports only the standard library at the top, so that a worker limits BLAS,
OpenMP, torch and numba to one thread each before they start theirs.

Warm-up. A worker started with a status array warms itself with :data:`WARMUP_STEPS`
(the imports; a Ge prediction with its default FC set: setup, fold table, forward model,
phonon table, compiled kernels; one with ``raman``; the e3nn model and its first call; a
CIF without FCs: CIF parsing, the generic setup), one step at a time and only while no job
waits: a job that arrives during the warm-up waits at most for the step in progress, then
runs before the next one. The prediction steps are requests like any other, so what they
leave in the caches is what a request needs. The status array holds, per step, the time it
ended (``time.time()``; NaN while to do, :data:`STEP_FAILED` when it failed, e.g. without an
e3nn model: logged, not fatal).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass
from typing import Any

__all__ = ["STEP_FAILED", "WARMUP_STEPS", "Answer", "WarmupStep", "answer", "serve"]

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


@dataclass(frozen=True, slots=True, kw_only=True)
class WarmupStep:
    """One step of a worker's warm-up: ``run()`` does it, and raises when it fails."""

    name: str
    run: Callable[[], None]


def _import_predict() -> None:
    import model_server.prediction.predict  # noqa: F401


def _predicts(job: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    """A step that answers ``job()`` like a request (every cache it fills is one a request
    uses); an answer other than 200 is a failure."""

    def run() -> None:
        result = answer(job())
        if result.status != 200:
            raise RuntimeError(f"status {result.status}: {result.detail}")

    return run


def _load_fc_model() -> None:
    """The e3nn model loaded, and its first prediction made (Ge's primitive cell)."""
    from model_server.prediction.fc_source import predict_fcs
    from simulations.lattice.crystals import load_crystal

    predict_fcs(load_crystal("Ge"))


def _shipped_cif(name: str) -> str:
    from importlib import resources

    return (resources.files("simulations") / "data" / "structures" / f"{name}.cif").read_text()


#: What a worker does before its first job, in this order (the most asked first); each step
#: a few seconds at most, so that a request waits little for the one in progress.
WARMUP_STEPS: tuple[WarmupStep, ...] = (
    WarmupStep(name="imports", run=_import_predict),
    WarmupStep(name="Ge", run=_predicts(lambda: {"material": "Ge", "omegas": [0.0]})),
    WarmupStep(
        name="Ge raman",
        run=_predicts(lambda: {"material": "Ge", "fc": "raman", "omegas": [0.0]}),
    ),
    WarmupStep(name="e3nn model", run=_load_fc_model),
    WarmupStep(name="CIF", run=_predicts(lambda: {"cif": _shipped_cif("Ge"), "omegas": [0.0]})),
)

#: The status of a step that failed.
STEP_FAILED = -1.0


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


def _one_thread(numba_threads: int = 1) -> None:
    """BLAS, OpenMP and torch on one thread in this process; numba's parallel kernels (the
    expected S(Q, E) of the super-pixels) on ``numba_threads`` (the pool's share of the
    machine's cores per worker)."""
    for name in _THREAD_VARIABLES:
        os.environ[name] = "1"
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    import torch

    torch.set_num_threads(1)
    try:
        import numba

        limit = int(getattr(numba.config, "NUMBA_NUM_THREADS", 1))
        numba.set_num_threads(max(1, min(int(numba_threads), limit)))
    except (ImportError, ValueError):  # numba absent, or already at its own limit
        pass


def _warm(step: WarmupStep) -> float:
    """Run one warm-up step; the time it ended (``time.time()``), or :data:`STEP_FAILED`
    (logged: a worker whose warm-up failed is as it would be without one)."""
    try:
        step.run()
    except Exception as exc:
        logger.warning("prediction warm-up %r failed: %s", step.name, exc)
        return STEP_FAILED
    return time.time()


def serve(conn: Any, warmup: MutableSequence[float] | None = None, numba_threads: int = 1) -> None:
    """A worker process's main loop: receive a job from ``conn``
    (:class:`multiprocessing.connection.Connection`), send its :class:`Answer`; ``None`` or
    a closed pipe ends it.

    ``warmup`` (a shared array of ``len(WARMUP_STEPS)`` floats, NaN each): warm up with
    :data:`WARMUP_STEPS` while no job waits, writing the time each step ended
    (``time.time()``, or :data:`STEP_FAILED`) into it. Without it the worker only imports
    before its first job. ``numba_threads``: the threads of numba's parallel kernels (BLAS,
    OpenMP and torch stay on one).
    """
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    _one_thread(numba_threads)
    steps = list(range(len(WARMUP_STEPS))) if warmup is not None else []
    if warmup is None:
        import model_server.prediction.predict  # noqa: F401  (imported before the first job)

    while True:
        try:
            if steps and not conn.poll():
                k = steps.pop(0)
                assert warmup is not None
                warmup[k] = _warm(WARMUP_STEPS[k])
                continue
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            conn.send(answer(job))
        except (BrokenPipeError, OSError):
            return
