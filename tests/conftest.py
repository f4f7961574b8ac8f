"""Shared fixtures. Heavy objects are built once per session; tests get them read-only."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.materials import MaterialSetup, setup


@pytest.fixture(scope="session")
def ge() -> MaterialSetup:
    return setup("Ge")


@pytest.fixture(scope="session")
def nb() -> MaterialSetup:
    return setup("Nb")


@pytest.fixture(scope="session")
def al() -> MaterialSetup:
    return setup("Al")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)
