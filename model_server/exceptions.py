"""Errors of the model server.

Hierarchy::

    ModelServerError                 any failure of the learned models (exit code 2 in steer)
    +-- ArtifactError                a frozen model directory is missing, incomplete or damaged
    +-- GridMismatchError            the spectrum's grid is not the grid the model was trained on
    +-- SampleKindError              a powder spectrum given to a single-crystal model, or the
    |                                reverse
    +-- InputSpectrumError           a spectrum or mask the model cannot use (NaN, all zero,
    |                                empty mask, wrong shape)
    +-- TrainingError                a training set or training setting that cannot work
    +-- RefinementError              counts the likelihood refinement cannot fit (no measured
    |                                bins, no moments, another grid, a material without a
    |                                forward model)
    +-- FCImportError                a force-constant file that cannot be imported (unreadable,
    |                                unknown format, no force constants, too large, or for
    |                                another structure than the request's)
    +-- PredictionUnavailable        the prediction pool cannot take or finish a request now:
                                     its queue is full (429), the request ran past its time
                                     budget, its worker was lost, the service is stopping (503)

Every message says what was wrong and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "FCImportError",
    "GridMismatchError",
    "InputSpectrumError",
    "ModelServerError",
    "PredictionUnavailable",
    "RefinementError",
    "SampleKindError",
    "TrainingError",
]


class ModelServerError(Exception):
    """Base class of every model-server error."""


class ArtifactError(ModelServerError):
    """A frozen model directory is missing, incomplete or damaged."""


class GridMismatchError(ModelServerError):
    """Spectrum and model live on different (q, E) grids; never resampled silently."""


class SampleKindError(ModelServerError):
    """A powder spectrum given to a single-crystal model, or a single-crystal spectrum to a
    powder model."""


class InputSpectrumError(ModelServerError):
    """A spectrum or mask that the model cannot use."""


class TrainingError(ModelServerError):
    """A training set or setting that cannot work."""


class FCImportError(ModelServerError, ValueError):
    """A force-constant file (phonopy, CASTEP) that cannot be imported; the message names
    the file's problem and what to send instead."""


class RefinementError(ModelServerError):
    """Counts, exposure or moments that the likelihood refinement cannot fit."""


class PredictionUnavailable(ModelServerError):
    """The prediction pool cannot take or finish a request now.

    ``status`` is the HTTP status to answer (429: the queue is full; 503: the time budget ran
    out, the worker was lost, or the service is stopping); ``retry_after`` the seconds after
    which a retry may succeed (None when a retry of the same request would not); ``reason``
    a short name of what happened.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 503,
        retry_after: int | None = None,
        reason: str = "unavailable",
    ):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        #: a short name of what happened (``queue_full``, ``timed_out``, ``client_gone``,
        #: ``worker_lost``, ``stopping``), for metrics
        self.reason = reason
