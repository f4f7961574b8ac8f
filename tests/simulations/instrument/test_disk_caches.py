"""The machine's caches of derived products: a phonon table and a resolution fit read back
from disk are the ones made, another FC set or setting gets its own entry, and a damaged
file is made again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simulations.fcdb.reference import resolve_fc
from simulations.instrument.events import PhononTable, _table_key
from simulations.lattice import resolution as resolution_module
from simulations.lattice.sqe import CoherentSQE


def test_phonon_table_is_read_back_from_the_cache(
    ge, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    _, raman = resolve_fc("Ge", "raman", ge)
    model = CoherentSQE(ge.basis, raman, temperature=5.0)
    made = PhononTable.cached(model, 8)
    files = list((tmp_path / "phonon_tables").glob("*.npz"))
    assert len(files) == 1
    again = PhononTable.cached(model, 8)
    np.testing.assert_array_equal(again.energies, made.energies)
    np.testing.assert_array_equal(again.eigenvectors, made.eigenvectors)
    np.testing.assert_array_equal(made.energies, PhononTable.build(model, 8).energies)
    # the temperature does not change the phonons; other FCs or another mesh do
    warm = CoherentSQE(ge.basis, raman, temperature=300.0)
    assert _table_key(warm, 8) == _table_key(model, 8)
    assert _table_key(CoherentSQE(ge.basis, 1.01 * raman), 8) != _table_key(model, 8)
    assert _table_key(model, 10) != _table_key(model, 8)
    files[0].write_bytes(b"damaged")
    rebuilt = PhononTable.cached(model, 8)
    np.testing.assert_array_equal(rebuilt.energies, made.energies)


def test_resolution_fit_is_read_back_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEER_CACHE_DIR", str(tmp_path))
    made = resolution_module.instrument_resolution("ARCS", 63.0, 600.0)
    assert len(list((tmp_path / "resolution").glob("*.json"))) == 1
    again = resolution_module.instrument_resolution("ARCS", 63.0, 600.0)
    assert again == made
    other = resolution_module.instrument_resolution("ARCS", 64.0, 600.0)
    assert other != made
    assert len(list((tmp_path / "resolution").glob("*.json"))) == 2
