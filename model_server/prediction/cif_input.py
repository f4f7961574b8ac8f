"""CIF text from a user -> an ordered crystal, with messages that say how to fix bad input.

:func:`crystal_from_cif` parses CIF text with pymatgen and refuses, with a
:class:`CIFError` whose message names the problem and the fix:

* text that is not a CIF with a cell and atom sites;
* a cell with more than :data:`MAX_CIF_SITES` sites once the CIF's symmetry operations are
  applied, counted by :func:`count_cif_sites` from the listed sites and the space group's
  operations *before* pymatgen builds them (a 5 kB Fm-3m CIF with 50 general sites expands
  to 9,600 sites, which took pymatgen 23 s to build); a CIF without any atom site;
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

import numpy as np
from numpy.typing import NDArray

from model_server.exceptions import ModelServerError
from simulations.exceptions import SimulationError
from simulations.lattice.crystals import Crystal, crystal_from_structure

__all__ = [
    "MAX_CIF_SITES",
    "CIFError",
    "ParsedCIF",
    "count_cif_sites",
    "crystal_from_cif",
    "supercell_multiple",
]

#: Most atom sites in the CIF's cell once its symmetry is applied (any setting, before
#: reduction to the primitive cell); a service may set a lower limit (``max_sites``).
MAX_CIF_SITES = 1000
#: Tolerance (fractional coordinates) within which two images of a site are one site.
_SITE_TOL = 1e-3


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


def _site_coordinates(block: Any) -> NDArray[np.float64]:
    """(n, 3) fractional coordinates of a CIF block's listed sites (uncertainties dropped)."""
    from pymatgen.io.cif import str2float

    columns = [block.data.get(f"_atom_site_fract_{axis}") for axis in "xyz"]
    if any(c is None for c in columns):
        return np.zeros((0, 3))
    columns = [[c] if isinstance(c, str) else list(c) for c in columns]
    if len({len(c) for c in columns}) != 1:
        raise CIFError(
            "the CIF's _atom_site_fract_x/y/z columns have different lengths; send a CIF "
            "with one x, y and z per atom site"
        )
    try:
        return np.array([[str2float(v) for v in c] for c in columns], dtype=float).T
    except (ValueError, TypeError) as exc:
        raise CIFError(
            f"the CIF has an atom site coordinate that is not a number ({exc}); send "
            "fractional coordinates such as 0.25 or 0.2500(3)"
        ) from exc


def _orbit_sizes(xyz: NDArray[np.float64], ops: list[Any]) -> NDArray[np.int64]:
    """Distinct images of each site (rows of ``xyz``) under the affine ``ops``."""
    rot = np.array([op.rotation_matrix for op in ops], dtype=float)  # (k, 3, 3)
    shift = np.array([op.translation_vector for op in ops], dtype=float)  # (k, 3)
    images = np.einsum("kij,nj->nki", rot, xyz) + shift[None]  # (n, k, 3)
    codes = np.round(np.mod(images, 1.0) / _SITE_TOL).astype(np.int64)
    codes %= round(1.0 / _SITE_TOL)  # 0.9999 and 0.0 are one position
    return np.array([len(np.unique(site, axis=0)) for site in codes], dtype=np.int64)


def count_cif_sites(text: str, *, max_sites: int = MAX_CIF_SITES) -> int:
    """Atom sites the CIF's cell has once its symmetry operations are applied, counted
    without building them: the listed sites' images under the operations, deduplicated per site
    (special positions count once per distinct image). Milliseconds to a fraction of a
    second for any CIF within the request size; pymatgen's own expansion of a CIF over the
    limit took minutes.

    Parameters
    ----------
    text
        The CIF.
    max_sites
        Most sites accepted: listed sites beyond it are refused before their images are
        counted.

    Returns
    -------
    The number of sites summed over the CIF's data blocks (pymatgen builds every block).

    Raises
    ------
    CIFError
        Unparseable text, a CIF without atom sites, or more than ``max_sites`` sites (the
        message names the limit).
    """
    from pymatgen.io.cif import CifParser

    if not text or not text.strip():
        raise CIFError("the CIF is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser = CifParser.from_str(text)
            blocks = list(parser._cif.data.values())  # type: ignore[attr-defined]
            listed = [_site_coordinates(b) for b in blocks]
            n_listed = sum(len(x) for x in listed)
            if n_listed > max_sites:
                raise _too_many(f"lists {n_listed} atom sites", max_sites)
            total = 0
            for block, xyz in zip(blocks, listed, strict=True):
                if len(xyz) == 0:
                    continue
                ops = parser.get_symops(block)
                total += int(_orbit_sizes(xyz, ops).sum())
    except CIFError:
        raise
    except ZeroDivisionError as exc:  # pymatgen's reader on a loop_ with names, no values
        raise CIFError(
            "the CIF has no atom sites: a loop_ (such as its _atom_site_ loop) has names but "
            "no values; give one row of _atom_site_label (or _atom_site_type_symbol) and "
            "_atom_site_fract_x/y/z per site"
        ) from exc
    except Exception as exc:  # pymatgen raises many kinds on bad CIFs
        raise _unreadable(exc) from exc
    if total == 0 and not any("_cell_length_a" in b.data for b in blocks):
        raise _unreadable(ValueError("no data block with a unit cell and atom sites"))
    if total == 0:
        raise CIFError(
            "the CIF has no atom sites: give them in a loop_ of _atom_site_label (or "
            "_atom_site_type_symbol) and _atom_site_fract_x/y/z"
        )
    if total > max_sites:
        raise _too_many(f"has {total} atom sites once its symmetry is applied", max_sites)
    return total


def _too_many(what: str, max_sites: int) -> CIFError:
    return CIFError(
        f"the CIF's cell {what}; at most {max_sites} are accepted (the site limit, "
        "STEER_CIF_MAX_SITES on a service); send a smaller cell (the primitive cell must "
        "also be small enough for the outputs asked for)"
    )


def _unreadable(exc: BaseException) -> CIFError:
    reason = str(exc).strip().rstrip(".!") or type(exc).__name__
    return CIFError(
        f"cannot read the CIF: {reason}. Send the text of a CIF with a unit cell "
        "(_cell_length_a/b/c, _cell_angle_alpha/beta/gamma) and atom sites "
        "(_atom_site_type_symbol or _atom_site_label, _atom_site_fract_x/y/z)"
    )


def crystal_from_cif(text: str, *, name: str, max_sites: int = MAX_CIF_SITES) -> ParsedCIF:
    """Parse, check and reduce CIF text (see the module docstring).

    Parameters
    ----------
    text
        The CIF.
    name
        Name of the crystal (e.g. a cache key).
    max_sites
        Most sites in the CIF's cell after its symmetry is applied (checked before they are
        built, :func:`count_cif_sites`).

    Raises
    ------
    CIFError
        Empty or unparseable text, no sites or too many, partial occupancy, a structure
        that pymatgen or spglib cannot analyse.
    """
    count_cif_sites(text, max_sites=max_sites)
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(text, fmt="cif")
    except Exception as exc:  # pymatgen raises many kinds on bad CIFs
        raise _unreadable(exc) from exc
    n_sites = len(structure)
    if n_sites == 0:
        raise CIFError("the CIF has no atom sites")
    if n_sites > max_sites:  # the count above is exact up to sites pymatgen merges
        raise _too_many(f"has {n_sites} atom sites", max_sites)
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
