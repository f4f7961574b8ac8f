"""Force constants from a CASTEP ``.castep_bin`` (or ``.check``) file.

The file is read by Euphonic's reader (``euphonic.readers.castep.read_interpolation_data``)
in a child process (:mod:`._castep_child`, run as a script): Euphonic's OpenMP runtime and
torch's do not share one process. CASTEP writes the force constants ``Phi(kappa 0,
kappa' l)`` of the cells ``l`` of a supercell (``PHONON_WRITE_FORCE_CONSTANTS: true`` with a
``PHONON_FINE_METHOD``), and the Born charges and dielectric tensor of a polar crystal.

Each block goes to the shortest images of its bond under the supercell's translations
(within 1e-4 Angstrom of the shortest, shared equally), as phonopy and Euphonic do.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_server.exceptions import FCImportError
from model_server.prediction.crystal_fc import CrystalFC
from model_server.prediction.fc_import.assemble import assemble

__all__ = ["is_castep_bin", "read_castep_bin", "supercell_images"]

#: Seconds the child process may take.
_TIMEOUT_S = 60.0
#: Bonds within this of the shortest image (Angstrom) share a block.
_IMAGE_TOL = 1e-4


def is_castep_bin(data: bytes) -> bool:
    """Whether ``data`` starts like a CASTEP binary: Fortran records (big-endian 4-byte
    markers) whose first one names CASTEP."""
    if len(data) < 12:
        return False
    size = int.from_bytes(data[:4], "big", signed=True)
    if not 0 < size <= 256 or len(data) < 8 + size:
        return False
    return data[4 + size : 8 + size] == data[:4] and b"CASTEP" in data[4 : 4 + size].upper()


def read_castep_bin(data: bytes, *, nac: bool = True) -> tuple[CrystalFC, dict[str, Any]]:
    """Per-pair FCs of a ``.castep_bin`` file's content.

    Returns
    -------
    fcs
        On the file's cell (Angstrom, eV/Angstrom^2, amu), with the non-analytic term when
        the file has Born charges (and ``nac``).
    meta
        ``supercell_matrix``, ``n_supercell_atoms``.

    Raises
    ------
    FCImportError
        A file Euphonic cannot read (the reason), one without force constants, a child
        process that fails or runs over its time.
    """
    arrays = _read_in_child(data)
    lattice = np.asarray(arrays["cell_vectors"], dtype=np.float64)
    frac = np.asarray(arrays["atom_r"], dtype=np.float64)
    numbers = _atomic_numbers([str(s) for s in arrays["atom_type"]])
    masses = np.asarray(arrays["atom_mass"], dtype=np.float64)
    sc = np.asarray(arrays["sc_matrix"], dtype=np.int64)
    origins = np.asarray(arrays["cell_origins"], dtype=np.int64)
    n = len(frac)
    fc = np.asarray(arrays["force_constants"], dtype=np.float64).reshape(len(origins), n, 3, n, 3)
    pairs, blocks, weights = supercell_images(
        lattice, frac, sc, origins, fc.transpose(1, 0, 3, 2, 4)
    )
    with_nac = nac and "born" in arrays
    fcs = assemble(
        numbers=numbers,
        lattice=lattice,
        frac=frac,
        pairs=pairs,
        blocks=blocks,
        weights=weights,
        masses=masses,
        born=arrays["born"] if with_nac else None,
        dielectric=arrays["dielectric"] if with_nac else None,
        what="the CASTEP file",
    )
    return fcs, {
        "calculator": "castep",
        "supercell_matrix": sc.tolist(),
        "n_supercell_atoms": int(len(origins) * n),
        "fc_from": "castep_bin",
    }


def supercell_images(
    lattice: NDArray[np.float64],
    frac: NDArray[np.float64],
    sc_matrix: NDArray[np.int64],
    origins: NDArray[np.int64],
    fc: NDArray[np.float64],
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """Pairs of supercell force constants, each bond at its shortest images.

    Parameters
    ----------
    lattice
        (3, 3) Angstrom, rows the primitive lattice vectors.
    frac
        (n, 3) fractional coordinates.
    sc_matrix
        (3, 3) int, rows the supercell's vectors in primitive lattice vectors.
    origins
        (n_cells, 3) int: the primitive cells of the supercell.
    fc
        (n, n_cells, n, 3, 3), eV/Angstrom^2: ``Phi(i 0, j l)``.

    Returns
    -------
    pairs
        (m, 5) int ``(i, j, n1, n2, n3)``.
    blocks
        (m, 3, 3) ``Phi / k`` for the ``k`` images of each bond.
    weights
        (m,) ``1 / (n_cells k)`` (the non-analytic term's shares).
    """
    n, n_cells = fc.shape[0], fc.shape[1]
    shifts = np.array(list(itertools.product(range(-2, 3), repeat=3)), dtype=np.int64) @ sc_matrix
    pairs, blocks, weights = [], [], []
    for i in range(n):
        for j in range(n):
            base = origins + frac[j] - frac[i]  # (n_cells, 3)
            cand = base[:, None, :] + shifts[None]  # (n_cells, n_shift, 3)
            length = np.linalg.norm(cand @ lattice, axis=-1)
            near = length <= length.min(axis=1, keepdims=True) + _IMAGE_TOL
            count = near.sum(axis=1)
            cell_index, shift_index = np.nonzero(near)
            cells = origins[cell_index] + shifts[shift_index]
            pairs.append(np.column_stack([np.full(len(cells), i), np.full(len(cells), j), cells]))
            share = 1.0 / count[cell_index]
            blocks.append(fc[i, cell_index, j] * share[:, None, None])
            weights.append(share / n_cells)
    return (
        np.concatenate(pairs).astype(np.int64),
        np.concatenate(blocks),
        np.concatenate(weights),
    )


def _atomic_numbers(symbols: list[str]) -> NDArray[np.int64]:
    from ase.data import atomic_numbers

    out = []
    for s in symbols:
        element = s.split(":")[0].strip().rstrip("0123456789")
        if element not in atomic_numbers:
            raise FCImportError(f"the CASTEP file names an unknown species {s!r}")
        out.append(atomic_numbers[element])
    return np.asarray(out, dtype=np.int64)


def _read_in_child(data: bytes) -> dict[str, Any]:
    """The arrays of the file, read by Euphonic in a child process."""
    script = Path(__file__).with_name("_castep_child.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="steer-castep-") as folder:
        source = Path(folder) / "input.castep_bin"
        target = Path(folder) / "arrays.npz"
        source.write_bytes(data)
        try:
            done = subprocess.run(  # our own script; the arguments are our paths
                [sys.executable, str(script), str(source), str(target)],
                capture_output=True,
                timeout=_TIMEOUT_S,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise FCImportError(f"reading the CASTEP file took more than {_TIMEOUT_S:g} s") from exc
        if done.returncode == 3:
            reason = done.stderr.decode(errors="replace").strip()[-600:]
            raise FCImportError(f"cannot read the CASTEP file: {reason}")
        if done.returncode != 0 or not target.exists():
            tail = done.stderr.decode(errors="replace").strip()[-600:]
            raise FCImportError(f"the CASTEP reader failed (exit {done.returncode}): {tail}")
        with np.load(target, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
