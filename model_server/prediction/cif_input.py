"""CIF text from a user -> an ordered crystal, with messages that say how to fix bad input.

:func:`crystal_from_cif` parses CIF text with pymatgen and refuses, with a
:class:`CIFError` whose message names the problem and the fix:

* text that is not a CIF with a cell and atom sites;
* a cell with more than :data:`MAX_CIF_SITES` sites (before reduction to the primitive
  cell: the symmetry search itself would take too long);
* partial or mixed occupancy: the message names the sites and the smallest supercell (as a
  multiple of the CIF's cell volume) in which an ordered arrangement with the same
  composition exists, and how to enumerate the orderings with pymatgen.

The crystal is then reduced to its standard primitive cell
(:func:`simulations.lattice.crystals.crystal_from_structure`), like every crystal of the project.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from model_server.exceptions import ModelServerError
from simulations.exceptions import SimulationError
from simulations.lattice.crystals import Crystal, crystal_from_structure

__all__ = ["MAX_CIF_SITES", "CIFError", "ParsedCIF", "crystal_from_cif", "supercell_multiple"]

#: Most atom sites in the CIF's cell (any setting, before reduction to the primitive cell).
MAX_CIF_SITES = 1000


class CIFError(ModelServerError, ValueError):
    """CIF text that cannot be turned into an ordered crystal (the message says why and
    what to do)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedCIF:
    """An ordered crystal read from CIF text.

    Attributes
    ----------
    crystal
        The standard primitive cell.
    formula
        Reduced formula, e.g. ``"NaCl"``.
    n_sites
        Sites in the CIF's own cell.
    """

    crystal: Crystal
    formula: str
    n_sites: int


def supercell_multiple(occupancies: list[tuple[int, dict[str, float]]]) -> int:
    """Smallest multiple of the cell volume in which partially occupied sites can be
    ordered with the same composition.

    Parameters
    ----------
    occupancies
        One ``(count, {species: occupancy})`` per kind of disordered site: ``count`` sites
        of the cell carry that mixture (a vacancy fills the rest up to 1).

    Returns
    -------
    The least ``m`` such that ``m x count x occupancy`` is a whole number of atoms for
    every species and the vacancy (occupancies rounded to fractions with denominators up to
    96).
    """
    m = 1
    for count, occ in occupancies:
        parts = list(occ.values())
        parts.append(max(0.0, 1.0 - sum(parts)))
        for x in parts:
            frac = Fraction(count * x).limit_denominator(96)
            m = m * frac.denominator // math.gcd(m, frac.denominator)
    return m


def _site_label(index: int, site: Any) -> str:
    occ = ", ".join(f"{el}:{amt:.3g}" for el, amt in site.species.items())
    xyz = " ".join(f"{x:.4f}" for x in site.frac_coords)
    return f"site {index} ({occ} at {xyz})"


def _check_ordered(structure: Any) -> None:
    bad = [
        k
        for k, site in enumerate(structure)
        if not site.is_ordered or abs(sum(site.species.values()) - 1.0) > 1e-6
    ]
    if not bad:
        return
    kinds = Counter(
        tuple(sorted((str(el), round(float(x), 6)) for el, x in structure[k].species.items()))
        for k in bad
    )
    m = supercell_multiple([(count, dict(kind)) for kind, count in kinds.items()])
    shown = "; ".join(_site_label(k, structure[k]) for k in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    if m == 1:
        size = "fits in the CIF's own cell (order its sites: make_supercell([1, 1, 1]))"
    else:
        size = (
            f"needs a supercell of at least {m} x the CIF's cell volume "
            f"(e.g. make_supercell([{m}, 1, 1]))"
        )
    raise CIFError(
        f"the CIF has partial or mixed occupancy at {len(bad)} of its {len(structure)} sites: "
        f"{shown}{more}. Predictions need an ordered crystal (one species per site, "
        f"occupancy 1). An ordered arrangement with this composition {size}; with pymatgen: "
        "s = Structure.from_file('x.cif'); s.make_supercell([...]); "
        "s.add_oxidation_state_by_guess(); "
        "OrderDisorderedStructureTransformation().apply_transformation(s, "
        "return_ranked_list=5) (or EnumerateStructureTransformation), then send one of the "
        "ordered structures as a CIF (its primitive cell counts against the atom limits)."
    )


def crystal_from_cif(text: str, *, name: str) -> ParsedCIF:
    """Parse, check and reduce CIF text (see the module docstring).

    Parameters
    ----------
    text
        The CIF.
    name
        Name of the crystal (e.g. a cache key).

    Raises
    ------
    CIFError
        Empty or unparseable text, too many sites, partial occupancy, a structure that
        pymatgen or spglib cannot analyse.
    """
    if not text or not text.strip():
        raise CIFError("the CIF is empty")
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(text, fmt="cif")
    except Exception as exc:  # pymatgen raises many kinds on bad CIFs
        reason = str(exc).strip().rstrip(".!") or type(exc).__name__
        raise CIFError(
            f"cannot read the CIF: {reason}. Send the text of a CIF with a unit cell "
            "(_cell_length_a/b/c, _cell_angle_alpha/beta/gamma) and atom sites "
            "(_atom_site_type_symbol or _atom_site_label, _atom_site_fract_x/y/z)"
        ) from exc
    n_sites = len(structure)
    if n_sites == 0:
        raise CIFError("the CIF has no atom sites")
    if n_sites > MAX_CIF_SITES:
        raise CIFError(
            f"the CIF's cell has {n_sites} atom sites; at most {MAX_CIF_SITES} are accepted "
            "(and the primitive cell must be small enough for the outputs asked for)"
        )
    _check_ordered(structure)
    try:
        crystal = crystal_from_structure(structure, name=name)
    except SimulationError as exc:
        raise CIFError(f"cannot use the CIF's structure: {exc}") from exc
    except Exception as exc:  # spglib / pymatgen symmetry analysis
        raise CIFError(f"cannot analyse the CIF's structure (symmetry): {exc}") from exc
    return ParsedCIF(
        crystal=crystal,
        formula=str(structure.composition.reduced_formula),
        n_sites=n_sites,
    )
