"""The training hyper-parameters of the structure -> force-constant model.

Kept apart from :mod:`model_server.structure_fc.train` so that the command line can show
their defaults without importing torch and e3nn.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainSettings:
    """Training hyper-parameters (stored in model.json).

    Attributes
    ----------
    epochs, seed, members, batch_size
        Epochs per member; seed of member 0 (member ``k`` uses ``seed + k``); ensemble
        members; crystals per batch.
    lr, lr_final, weight_decay, clip
        AdamW's learning rate at the start and at the end of the cosine decay, its
        decoupled weight decay, and the gradient-norm clipping.
    w_dyn
        Weight of the dynamical-matrix term of the loss.
    cutoff, n_layers, n_scalar, n_pseudo, n_vector, n_tensor, lmax, n_radial, radial_hidden
        The network's (:class:`model_server.structure_fc.network.NetConfig`); cutoff in
        Angstrom.
    element_features
        Element features (:func:`model_server.structure_fc.network.element_features`) beside
        the free embedding of each species.
    max_distance, max_relative_spread
        The model's in-domain thresholds (``max_relative_spread`` 0: calibrated on the
        validation split).
    max_steps
        Most optimiser steps per epoch (0: no limit; tests use a few).
    threads
        torch threads (process-wide); 1 is fastest on a shared machine.
    """

    epochs: int = 30
    seed: int = 0
    members: int = 3
    batch_size: int = 8
    lr: float = 3e-3
    lr_final: float = 1e-4
    w_dyn: float = 1.0
    clip: float = 10.0
    cutoff: float = 6.0
    n_layers: int = 3
    n_scalar: int = 32
    n_pseudo: int = 8
    n_vector: int = 8
    n_tensor: int = 6
    lmax: int = 2
    n_radial: int = 8
    radial_hidden: int = 32
    element_features: bool = True
    weight_decay: float = 0.05
    max_distance: float = 1.0
    max_relative_spread: float = 0.0  # 0: calibrated on the validation split
    max_steps: int = 0  # 0: no limit (tests: a few steps)
    threads: int = 1  # torch threads (process-wide); 1 is fastest on a shared machine
