"""Independent Euphonic reference for coherent one-phonon structure factors.

Run in its own process (Euphonic's OpenMP C extension must not share a process with
torch)::

    python tests/simulations/lattice/euphonic_reference.py IN.npz OUT.npz

Only numpy and euphonic are imported here.

Input (``IN.npz``)
------------------
``phonopy_params``      0-d str: path to a ``phonopy_params.yaml`` written by
                        ``phonopy.Phonopy.save(..., settings={"force_constants": True})``
                        (primitive matrix = identity, full force constants inside).
``qpoints``             (n_q, 3) float: Q in reduced coordinates of the (primitive = unit)
                        cell's reciprocal lattice. Not folded: Q = q + G is used as given.
``dw_qpoints``          (n_dw, 3) float: full q-mesh for the Debye-Waller exponent (equal
                        weights).
``temperature``         float, K.
``scattering_lengths``  0-d str: JSON ``{"Ge": 8.185, ...}``, coherent lengths in fm.

Output (``OUT.npz``)
--------------------
``frequencies_meV`` (n_q, n_modes); ``structure_factors_mbarn`` (n_q, n_modes);
``debye_waller_A2`` (n_atoms, 3, 3); ``bose_occupation`` (n_q, n_modes);
``eigenvectors`` (n_q, n_modes, n_atoms, 3) complex; ``reciprocal_cell_invA`` (3, 3)
(rows b_i, *including* 2 pi); ``atom_r`` (n_atoms, 3) fractional; ``atom_mass_amu``
(n_atoms,); ``euphonic_version`` str; ``used_c`` bool; ``frequency_min_meV`` float
(the Debye-Waller cut-off actually used).

What Euphonic 2.1.1 computes (file:line refer to site-packages/euphonic/)
--------------------------------------------------------------------------
Internally everything is in Hartree atomic units: hbar = 1, energies in Hartree,
lengths in bohr, masses in electron masses (m_e). Only the outputs are converted.

Reading the yaml (readers/phonopy.py): ``read_interpolation_data`` (l. 653-805) reads
``primitive_cell``, ``supercell``, ``supercell_matrix`` and, if present, the
``force_constants`` block of the summary file (l. 563-566; full
(n_satom, n_satom, 3, 3) or compact shape both accepted), in the yaml's
``physical_unit`` (eV/Angstrom^2, AMU, Angstrom from phonopy). ``util.convert_fc_phases``
(util.py l. 277-) re-indexes them to Euphonic's (n_cells, 3 n_atoms, 3 n_atoms) layout,
keyed by the *cell origin* R_l of the second atom.

Dynamical matrix and eigenvectors (force_constants.py): ``_calculate_dyn_mat``
(l. 893-988) and ``_calculate_phases`` (l. 1542-1607)::

    D_{ka,k'b}(q) = 1/sqrt(M_k M_k') sum_l Phi_{ka,k'b}(0, l) exp(+2 pi i q . R_l)

with R_l the integer *cell origin* (fractional, in unit-cell vectors) of atom k' --
NOT the atom position. (The docstring at l. 312-316 writes exp(-i q.R_l); the code at
l. 1597 uses exp(+2 pi i q.R).) Supercell periodic images are summed with equal weights
1/n_images over the minimum-image (Wigner-Seitz) set, like phonopy's shortest vectors.
Masses applied at l. 596-600 / 872; ``np.linalg.eigh(dyn_mat, UPLO='U')`` at l. 874;
eigenvectors are the columns reshaped to (mode, atom, xyz) and normalised
sum_k |e_k|^2 = 1; omega = sign(lambda) sqrt|lambda| (negative = imaginary, l. 876-879).
Consequently, relative to phonopy's convention (phase from atom positions,
D^ph_{kk'} = sum_l Phi exp(+i q.(r_k'l - r_k0))), for a non-degenerate mode

    e^Euphonic_k(q) = exp(+2 pi i q . r_k) e^phonopy_k(q)   (up to one global phase)

with r_k the fractional position of atom k in the unit cell. Euphonic's D(q) is periodic
in q, so with ``reduce_qpts=True`` (default) Q is folded to q = Q - rint(Q) (l. 522-)
and the eigenvectors at Q are those at q, unchanged. Hence, with phonopy eigenvectors
computed at the *unfolded* Q, e^Euphonic* exp(+i Q.r_k) = e^phonopy*(Q) (up to the mode's
global phase): the structure-factor amplitude below is sum_k b_k/sqrt(M_k) (Q.e^ph*_k(Q))
exp(-W_k), with no explicit position phase.

ASR / NAC: ``asr=None`` (the default) so the force constants are used exactly as stored;
``dipole=False``, ``splitting=False`` (there are no Born charges anyway, l. 500-503).

Debye-Waller exponent (qpoint_phonon_modes.py ``calculate_debye_waller``, l. 322-449)::

    W^{ab}_k = 1/(4 M_k sum_q w_q) sum_{q nu} w_q  Re(e_{q nu k a} e*_{q nu k b})
               * coth(omega_{q nu} / (2 k_B T)) / omega_{q nu}

(hbar = 1; l. 407-434), only modes with omega >= frequency_min contribute (mask, l. 410-
411; default ``frequency_min = 0.01 meV``, l. 326, also excludes negative / imaginary
modes; a frequency of exactly 0 would still give nan, as 1/0 is formed before the mask
is applied); T = 0 uses coth = 1. Weights are equal here. ``symmetrise=False`` is used (no
space-group averaging, l. 435-446). The result is stored in bohr^2 (debye_waller.py
l. 65); we return it in Angstrom^2. The Debye-Waller factor is
exp(-W_k(Q)) with W_k(Q) = sum_ab W^{ab}_k Q_a Q_b, Q Cartesian in 1/Angstrom
(so with Q in 1/Angstrom and W^{ab} in Angstrom^2 it is dimensionless), i.e.
exp(-W_k) = exp(-<(Q.u_k)^2>/2) since W^{ab} = <u_a u_b>/2.

Structure factor (qpoint_phonon_modes.py ``calculate_structure_factor``, l. 191-320),
per atom of sample::

    S(Q, nu) = 1/(2 N_atom |omega_nu|)
               | sum_k b_k / sqrt(M_k) (Q . e*_{nu k}) exp(+i Q . r_k) exp(-W_k(Q)) |^2

* l. 280-281: exp(+i Q.r_k) = exp(2 pi i Q_rlu . r_frac) with the *unfolded* Q.
* l. 285-290: Q_cart = Q_rlu @ reciprocal_cell (rows include 2 pi), and the eigenvector
  is complex-conjugated: sum_a Q_a conj(e_{nu k a}).
* l. 305-307: exp(-sum_ab W^{ab}_k Q_a Q_b) (NOT exp(-W/2), NOT squared separately: it
  sits inside |...|^2, so the intensity carries exp(-2 W_k)).
* l. 313-315: divided by |omega| and by 2 N_atom (N_atom = atoms in the unit cell).
* Units: b in bohr, M in m_e, Q in 1/bohr, omega in Hartree, hbar = 1, so S is in bohr^2;
  converted to mbarn at l. 319 (1 bohr^2 = 2.8002852e10 mbarn). In SI this is
  S = hbar^2 |sum_k b_k/sqrt(M_k) (Q.e*) ...|^2 / (2 N_atom hbar omega): b in fm, M in
  kg, Q in 1/m, hbar omega in J -> m^2. No Bose factor, no 1/2 from |sum| convention, no
  4 pi, no k_f/k_i.

Bose occupation: ``StructureFactor._bose_factor`` (structure_factor.py l. 306-364, a
*private* method -- Euphonic exposes no public one) n = 1/(exp(|omega|/(k_B T)) - 1)
(absolute value of omega; 0 for T = 0). Euphonic bins (n + 1) S at +omega (neutron
energy loss) and n S at -omega (neutron energy gain), l. 276-280. We call that private
method on the returned StructureFactor (frequencies of exactly 0 would give inf).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np


def main(in_path: str, out_path: str) -> None:
    import euphonic
    from euphonic import ForceConstants, ureg

    data = np.load(in_path, allow_pickle=False)
    yaml_path = Path(str(data["phonopy_params"][()]))
    qpts = np.asarray(data["qpoints"], dtype=np.float64).reshape(-1, 3)
    dw_qpts = np.asarray(data["dw_qpoints"], dtype=np.float64).reshape(-1, 3)
    temperature = float(data["temperature"])
    lengths = json.loads(str(data["scattering_lengths"][()]))

    fc = ForceConstants.from_phonopy(path=str(yaml_path.parent), summary_name=yaml_path.name)

    def modes_at(q: np.ndarray, use_c: bool):
        kwargs = {"asr": None, "dipole": False, "splitting": False, "use_c": use_c}
        if use_c:
            kwargs["n_threads"] = 1
        return fc.calculate_qpoint_phonon_modes(q, **kwargs)

    try:
        used_c = True
        modes = modes_at(qpts, True)
        modes_dw = modes_at(dw_qpts, True)
    except Exception as err:  # C extension missing or broken: pure Python path
        print(f"euphonic C extension unavailable ({err!r}); using use_c=False", file=sys.stderr)
        used_c = False
        modes = modes_at(qpts, False)
        modes_dw = modes_at(dw_qpts, False)

    # Default frequency_min of calculate_debye_waller (qpoint_phonon_modes.py l. 326).
    frequency_min = 0.01 * ureg("meV")
    dw = modes_dw.calculate_debye_waller(
        temperature * ureg("K"), frequency_min=frequency_min, symmetrise=False
    )
    sl = {el: float(v) * ureg("fm") for el, v in lengths.items()}
    sf = modes.calculate_structure_factor(scattering_lengths=sl, dw=dw)
    with warnings.catch_warnings(), np.errstate(divide="ignore", over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        bose = sf._bose_factor(temperature * ureg("K"))  # private; see docstring

    crystal = modes.crystal
    np.savez(
        out_path,
        frequencies_meV=modes.frequencies.to("meV").magnitude,
        structure_factors_mbarn=sf.structure_factors.to("mbarn").magnitude,
        debye_waller_A2=dw.debye_waller.to("angstrom**2").magnitude,
        bose_occupation=np.asarray(bose, dtype=np.float64),
        eigenvectors=np.asarray(modes.eigenvectors, dtype=np.complex128),
        reciprocal_cell_invA=crystal.reciprocal_cell.to("1/angstrom").magnitude,
        atom_r=np.asarray(crystal.atom_r, dtype=np.float64),
        atom_mass_amu=crystal.atom_mass.to("amu").magnitude,
        euphonic_version=np.array(str(euphonic.__version__)),
        used_c=np.array(used_c),
        frequency_min_meV=np.array(frequency_min.to("meV").magnitude),
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/simulations/lattice/euphonic_reference.py IN.npz OUT.npz")
    main(sys.argv[1], sys.argv[2])
