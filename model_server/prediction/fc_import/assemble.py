"""Per-pair force constants read from a file, as the prediction's :class:`CrystalFC`: the
one step every reader ends with (the non-analytic term when the file has Born charges,
then the FCs), with errors that name the file's kind."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from model_server.exceptions import FCImportError
from model_server.prediction.crystal_fc import CrystalFC, FCInputError
from simulations.exceptions import ForceConstantError
from simulations.lattice.nac import NACTerm

__all__ = ["assemble"]


def assemble(
    *,
    numbers: NDArray[np.int64],
    lattice: NDArray[np.float64],
    frac: NDArray[np.float64],
    pairs: NDArray[np.int64],
    blocks: NDArray[np.float64],
    weights: NDArray[np.float64],
    masses: NDArray[np.float64],
    born: Any = None,
    dielectric: Any = None,
    what: str,
) -> CrystalFC:
    """The FCs of ``pairs`` ((m, 5): ``i, j, n1, n2, n3``) with ``blocks`` ((m, 3, 3),
    eV/A^2) on the cell (``lattice`` rows, A; ``frac``; ``masses``, amu), and Wang's
    non-analytic term when ``born`` (Born charges, e) and ``dielectric`` are given
    (``weights``: the image pairs' shares, as :class:`NACTerm` takes them).

    Raises
    ------
    FCImportError
        Naming ``what`` (e.g. ``"the CASTEP file"``) and the problem.
    """
    nac = None
    if born is not None:
        try:
            nac = NACTerm.from_arrays(
                lattice=lattice,
                frac=frac,
                masses=masses,
                born=born,
                dielectric=dielectric,
                pairs=pairs,
                weights=weights,
            )
        except ForceConstantError as exc:
            raise FCImportError(f"{what}'s Born charges or dielectric tensor: {exc}") from exc
    try:
        return CrystalFC.from_arrays(numbers, lattice, frac, pairs, blocks, masses=masses, nac=nac)
    except FCInputError as exc:
        raise FCImportError(f"{what}'s force constants: {exc}") from exc
