"""Read a CASTEP ``.castep_bin`` with Euphonic's reader, in a child process.

Run as a script (``python _castep_child.py IN OUT``, not as a module of the package: the
package would import torch, whose OpenMP runtime conflicts with Euphonic's in one process).
Writes the arrays to ``OUT`` (``.npz``, Angstrom, amu, eV/Angstrom^2, e) and exits 0; on a
file Euphonic cannot read, writes its message to stderr and exits 3.
"""

from __future__ import annotations

import sys


def main(source: str, target: str) -> int:
    """Read ``source`` and write its arrays to ``target``; 0, or 3 with the reason."""
    import numpy as np
    from euphonic.readers.castep import read_interpolation_data

    try:
        data = read_interpolation_data(
            source,
            cell_vectors_unit="angstrom",
            atom_mass_unit="amu",
            force_constants_unit="eV/angstrom**2",
            born_unit="e",
        )
    except Exception as exc:  # Euphonic raises RuntimeError, EOFError, ValueError, struct errors
        text = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(text)
        return 3
    crystal = data["crystal"]
    arrays = {
        "cell_vectors": crystal["cell_vectors"],
        "atom_r": crystal["atom_r"],
        "atom_type": np.asarray(crystal["atom_type"], dtype=str),
        "atom_mass": crystal["atom_mass"],
        "force_constants": data["force_constants"],
        "sc_matrix": data["sc_matrix"],
        "cell_origins": data["cell_origins"],
    }
    if "born" in data:
        arrays["born"] = data["born"]
        arrays["dielectric"] = data["dielectric"]
    np.savez(target, **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
