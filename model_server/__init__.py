"""The model server: the learned models and the predictions for planners.

Three parts (the import rules between them are import-linter contracts in pyproject.toml):

``inversion/``
    The learned inversion of a folded spectrum: the frozen VAE encoder + regressor with
    calibrated uncertainties (and the direct CNN baseline), preprocessing, augmentation with
    the instrument model's coverage, training, frozen model directories, inference
    (:class:`Estimator`) and evaluation against the seed paper's benchmark.
``structure_fc/``
    The equivariant (e3nn) structure -> force-constant model: crystal graph, network, frozen
    ensemble with a distance from its training set, training and evaluation on the FC
    database (``steer fcmodel``).
``prediction/``
    Expected spectra for planners: folded I(q, E), detector S(Q, E) per angle, powder, DOS
    and indirect-geometry S(E) of any crystal, with FCs from a named set, given coefficients
    or the e3nn model.

Beside them, ``replica.py`` is the scaled-out model-server replica (snapshots in, estimates
out), and ``exceptions.py`` holds the package's errors. ``inversion`` and ``structure_fc``
do not import each other; ``prediction`` uses the e3nn model. Torch lives in the networks,
training and inference modules; the package imports ``simulations`` and ``consumers`` and
nothing above. The layout of the whole project: docs/architecture.md.

This package re-exports the inversion's public API (below); the other parts are imported
from their modules.
"""

from model_server.exceptions import (
    ArtifactError,
    GridMismatchError,
    InputSpectrumError,
    ModelServerError,
    TrainingError,
)
from model_server.inversion.artifact import FrozenModel, load_model, save_model
from model_server.inversion.augment import AugmentConfig, Augmenter
from model_server.inversion.coverage import CoverageBank, build_coverage_bank
from model_server.inversion.evaluation import evaluate_model, r2_scores
from model_server.inversion.inference import Estimate, Estimator, read_folded
from model_server.inversion.preprocess import prepare
from model_server.inversion.training import TrainConfig, train_model

__all__ = [
    "ArtifactError",
    "AugmentConfig",
    "Augmenter",
    "CoverageBank",
    "Estimate",
    "Estimator",
    "FrozenModel",
    "GridMismatchError",
    "InputSpectrumError",
    "ModelServerError",
    "TrainConfig",
    "TrainingError",
    "build_coverage_bank",
    "evaluate_model",
    "load_model",
    "prepare",
    "r2_scores",
    "read_folded",
    "save_model",
    "train_model",
]
