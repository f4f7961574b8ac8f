"""The learned models: VAE + regressor with calibrated uncertainties, the direct CNN baseline,
training with augmentation from the instrument model, frozen model directories, inference,
evaluation against the seed paper's benchmark (see DESIGN.md, Learned models).

Torch lives in the networks, training and inference modules; the package imports
``simulations`` and ``consumers`` (coverage from the instrument model) and nothing above.
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
