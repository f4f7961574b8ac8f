"""Tests of :mod:`simulations.fcdb.mlff` (pretrained ML force fields + phonopy).

The heavy test needs the optional ``mlff`` extra (CHGNet); it is skipped when
CHGNet is not installed and carries the ``mlff`` marker so it can be selected
or deselected with ``-m mlff`` / ``-m "not mlff"``.
"""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from simulations.fcdb import mlff

GE_A = 5.658  # Å, conventional lattice constant of diamond Ge (experiment)
MODEL = "chgnet-0.3.0"


def _primitive_ge(a: float = GE_A) -> Atoms:
    cell = [[0.0, a / 2, a / 2], [a / 2, 0.0, a / 2], [a / 2, a / 2, 0.0]]
    return Atoms("Ge2", cell=cell, scaled_positions=[[0, 0, 0], [0.25, 0.25, 0.25]], pbc=True)


def test_unknown_model_is_value_error() -> None:
    with pytest.raises(ValueError, match="available"):
        mlff.make_calculator("no-such-model")


def test_available_models_are_known() -> None:
    assert set(mlff.available_models()) <= set(mlff.known_models())


@pytest.mark.mlff
def test_germanium_force_constants() -> None:
    pytest.importorskip("chgnet.model")
    if MODEL not in mlff.available_models():
        pytest.skip(f"{MODEL} weights not installed")

    result = mlff.compute_reference(_primitive_ge(), MODEL, np.diag([4, 4, 4]), num_threads=1)

    # Relaxation kept the fcc primitive cell exactly fcc.
    lengths = result.relaxed.cell.lengths()
    angles = result.relaxed.cell.angles()
    np.testing.assert_allclose(lengths, lengths[0], rtol=1e-10)
    np.testing.assert_allclose(angles, 60.0, atol=1e-8)
    assert 5.5 < result.lattice_constant_a < 6.0
    np.testing.assert_allclose(result.lattice_constant_a, np.sqrt(2) * lengths[0])

    fc = result.force_constants
    assert fc.shape == (128, 128, 3, 3)  # full, not compact
    # Acoustic sum rule (eV/Å²); after phonopy's symmetrisation it holds to
    # ~1e-14 in practice.
    assert np.abs(fc.sum(axis=1)).max() < 1e-8
    assert np.abs(fc.sum(axis=0)).max() < 1e-8
    # Index-permutation symmetry fc[i, j] == fc[j, i].T (exact in practice).
    np.testing.assert_allclose(fc, fc.transpose(1, 0, 3, 2), rtol=0, atol=1e-12)

    freqs = mlff.frequencies(result.phonopy, [0.0, 0.0, 0.0])  # THz
    np.testing.assert_allclose(freqs[:3], 0.0, atol=1e-3)
    optical = freqs[3:]
    np.testing.assert_allclose(optical, optical[0], rtol=1e-6)  # triply degenerate
    assert 3.0 < optical[0] < 10.0
