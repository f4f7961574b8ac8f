"""Force constants predicted from the structure alone, for the prediction endpoint.

:func:`predict_fcs` runs the frozen e3nn structure -> force-constant model
(:func:`model_server.structure_fc.model.load_fc_model`, directory ``$STEER_FC_MODEL`` or
``models/fc_e3nn``) on a crystal's primitive cell and wraps the result as a
:class:`~model_server.prediction.crystal_fc.CrystalFC` on exactly that cell, with what the model
says
about its own reliability: the distance from the training set, ``in_domain`` and a message.

When the model cannot be loaded (not installed, no trained artifact, a damaged one),
:class:`FCModelUnavailableError` says what is missing; no force constants are ever made up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_server.exceptions import ArtifactError, ModelServerError
from model_server.prediction.crystal_fc import CrystalFC
from simulations.lattice.crystals import Crystal

__all__ = [
    "FC_MODEL_NAME",
    "FCModelUnavailableError",
    "FCPredictionError",
    "ModelFCs",
    "fc_model",
    "model_version",
    "predict_fcs",
]

#: Name of the FC source in predictions.
FC_MODEL_NAME = "e3nn"


class FCModelUnavailableError(ModelServerError):
    """The structure -> force-constant model cannot be used here (HTTP 503)."""


class FCPredictionError(ModelServerError, ValueError):
    """The model failed on a structure in a way its own checks did not catch (HTTP 422)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFCs:
    """The model's force constants for one crystal.

    Attributes
    ----------
    fcs
        Structure and predicted FCs (eV/A^2) on the crystal's primitive cell.
    version
        The model's version (``fc_e3nn-<hash of its weights>``).
    distance
        Distance from the training set (~1: its edge).
    in_domain
        Whether the model trusts the prediction (distance and ensemble spread under its
        thresholds).
    message
        Why not, when not in domain (else empty).
    relative_spread
        ||ensemble std|| / ||mean|| over all blocks.
    cutoff
        The model's bond cutoff, Angstrom.
    elements
        The elements the model knows.
    """

    fcs: CrystalFC
    version: str
    distance: float
    in_domain: bool
    message: str
    relative_spread: float
    cutoff: float
    elements: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no arrays)."""
        return {
            "name": FC_MODEL_NAME,
            "version": self.version,
            "distance": self.distance,
            "in_domain": self.in_domain,
            "message": self.message,
            "relative_spread": self.relative_spread,
            "cutoff_A": self.cutoff,
            "n_pairs": len(self.fcs.pairs),
            "known_elements": list(self.elements),
        }


def fc_model() -> Any:
    """The loaded e3nn model (:class:`model_server.structure_fc.model.FCModel`; cached by its
    loader).

    Raises
    ------
    FCModelUnavailableError
        The module or its artifact is missing or damaged (the message says which).
    """
    try:
        from model_server.structure_fc.model import load_fc_model
    except ImportError as exc:
        raise FCModelUnavailableError(
            f"the structure -> force-constant model (model_server.structure_fc.model) cannot be "
            f"imported "
            f"here ({exc}); give the force constants as coefficients instead"
        ) from exc
    try:
        return load_fc_model()
    except ArtifactError as exc:
        raise FCModelUnavailableError(
            f"the structure -> force-constant model is not available: {exc}. Until it is, "
            "give the force constants as coefficients"
        ) from exc


def predict_fcs(crystal: Crystal, *, name: str | None = None) -> ModelFCs:
    """Predict the FCs of ``crystal``'s cell with the e3nn model.

    Raises
    ------
    FCModelUnavailableError
        No usable model.
    model_server.structure_fc.model.FCModelError
        Input the model refuses: an element it does not know (named, with the known ones),
        a cell above its atom limit, overlapping atoms (a :class:`ModelServerError`).
    """
    model = fc_model()
    try:
        pred = model.predict(crystal.numbers, crystal.lattice, crystal.positions)
    except ModelServerError:
        raise
    except (ValueError, RuntimeError, IndexError, FloatingPointError) as exc:
        raise FCPredictionError(
            f"the e3nn model cannot predict the force constants of {name or crystal.name}: {exc}"
        ) from exc
    fcs = CrystalFC.from_arrays(
        crystal.numbers,
        crystal.lattice,
        crystal.positions,
        pred.pairs,
        pred.fc,
        masses=crystal.masses,
        name=name or crystal.name,
    )
    return ModelFCs(
        fcs=fcs,
        version=str(model.version),
        distance=float(pred.distance),
        in_domain=bool(pred.in_domain),
        message=str(pred.message),
        relative_spread=float(getattr(pred, "relative_spread", 0.0)),
        cutoff=float(model.cutoff),
        elements=tuple(str(e) for e in model.elements),
    )


def model_version() -> str:
    """The loaded model's version (raises :class:`FCModelUnavailableError` without one)."""
    return str(fc_model().version)
