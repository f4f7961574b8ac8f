"""The crystals of the force-constant database: prototypes, element choices, starting cells.

A :class:`Candidate` is a small ordered crystal named by formula and prototype, with a
starting lattice parameter from tabulated radii (the force field relaxes it afterwards):
elemental fcc / bcc / hcp over metals, group-14 diamond, binary rock-salt, zinc-blende,
wurtzite, CsCl and fluorite (and anti-fluorite) compounds, cubic perovskites ABX3, L1_2
A3B, full-Heusler X2YZ and half-Heusler XYZ intermetallics, tetragonal L1_0 AB, hexagonal
WC-type MX, cubic ReO3-type BX3, D0_3 X3Z, rutile MX2, A15 A3B and NiAs-type MX.

Metastable polymorphs are included on purpose (every metal in all of fcc, bcc and hcp): the
builder keeps only the dynamically stable ones.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

from simulations.exceptions import StructureError

if TYPE_CHECKING:
    from ase import Atoms

__all__ = [
    "PROTOTYPES",
    "Candidate",
    "assign_splits",
    "catalogue",
    "reduced_formula",
]


def _words(text: str) -> list[str]:
    """Whitespace-separated words of a string."""
    return text.split()


#: Metals tried in each of fcc, bcc and hcp.
METALS = _words(
    "Li Na K Rb Cs Be Mg Ca Sr Ba Sc Y La Ti Zr Hf V Nb Ta Cr Mo W Mn Fe Co Ni Ru Rh Pd "
    "Os Ir Pt Cu Ag Au Zn Cd Al Ga In Tl Pb"
)
DIAMOND = ("C", "Si", "Ge", "Sn")
ROCKSALT = (
    [a + x for a in ("Li", "Na", "K", "Rb", "Cs") for x in ("F", "Cl", "Br", "I")]
    + [a + x for a in ("Mg", "Ca", "Sr", "Ba") for x in ("O", "S", "Se", "Te")]
    + [a + x for a in ("Sc", "Y", "Ti", "Zr", "Hf", "V", "Nb", "Ta") for x in ("C", "N")]
    + _words("LaN CrN PbS PbSe PbTe SnTe GeTe AgF AgCl AgBr NiO MnO CoO FeO CdO LiH NaH")
)
ZINCBLENDE = (
    [a + x for a in ("B", "Al", "Ga", "In") for x in ("N", "P", "As", "Sb")]
    + [a + x for a in ("Zn", "Cd", "Hg") for x in ("S", "Se", "Te")]
    + _words("BeS BeSe BeTe ZnO MgTe SiC CuCl CuBr CuI AgI")
)
WURTZITE = _words("ZnO ZnS ZnSe CdS CdSe AlN GaN InN BeO SiC AgI MgTe")
CSCL = _words("CsCl CsBr CsI TlCl TlBr NiAl CoAl FeAl CuZn AgMg AuZn CuPd RuAl NiTi AgZn ScAg")
#: (cation, anion) of fluorites AX2 and (anion, cation) of anti-fluorites X A2.
FLUORITE = [
    tuple(s.split("-"))
    for s in _words(
        "Ca-F Sr-F Ba-F Cd-F Pb-F Sr-Cl Ce-O Th-O U-O Zr-O Hf-O Co-Si Ni-Si Pt-Al Au-Al"
    )
]
ANTIFLUORITE = [
    tuple(s.split("-")) for s in _words("O-Li O-Na O-K S-Li S-Na S-K Se-Li Se-Na Si-Mg Ge-Mg Sn-Mg")
]
PEROVSKITE = [
    tuple(s.split("-"))
    for s in _words(
        "Sr-Ti-O Ba-Ti-O Ca-Ti-O Pb-Ti-O K-Nb-O Na-Nb-O K-Ta-O Na-Ta-O Ba-Zr-O Sr-Zr-O "
        "Ca-Zr-O Ba-Hf-O Sr-Hf-O Ba-Sn-O Sr-Sn-O La-Al-O Sr-V-O Sr-Ru-O Ba-Mo-O "
        "K-Mg-F K-Zn-F K-Ni-F K-Co-F K-Mn-F K-Fe-F Rb-Mg-F Rb-Ca-F Cs-Ca-F Cs-Cd-F "
        "Na-Mg-F K-Ca-F Cs-Pb-Br Cs-Pb-Cl Cs-Pb-I Cs-Sn-I Cs-Sn-Br"
    )
]
#: (A, B) of L1_2 A3B.
L12 = [
    tuple(s.split("-"))
    for s in _words(
        "Cu-Au Ni-Al Ni-Ga Ni-Mn Ni-Fe Pt-Ti Pt-Al Pd-Fe Au-Cu Al-Sc Al-Li Ni-Si Co-Ti Pd-Y Ir-Nb"
    )
]
#: (X, Y, Z) of full Heuslers X2YZ.
HEUSLER = [
    tuple(s.split("-"))
    for s in _words(
        "Cu-Mn-Al Ni-Mn-Ga Co-Mn-Si Co-Mn-Ge Co-Fe-Si Fe-V-Al Ni-Ti-Al Co-Ti-Al Ni-Mn-In "
        "Pd-Mn-Sn Rh-Mn-Ge Cu-Mn-In"
    )
]
#: (X, Y, Z) of half-Heuslers XYZ (X on 4b, Y on 4c, Z on 4a).
HALF_HEUSLER = [
    tuple(s.split("-"))
    for s in _words(
        "Ti-Ni-Sn Zr-Ni-Sn Hf-Ni-Sn Ti-Co-Sb Zr-Co-Sb Mn-Ni-Sb Mn-Pt-Sb Sc-Ni-Sb Nb-Co-Sn "
        "Zn-Li-As Ag-Mg-As Mg-Li-N Ti-Co-Bi"
    )
]
#: (A, B) of L1_0 AB (tetragonal CuAu type).
L10 = [
    tuple(s.split("-"))
    for s in _words("Cu-Au Fe-Pt Co-Pt Fe-Pd Ni-Pt Mn-Al Ti-Al Mn-Pt Mn-Ni Mg-In")
]
#: (M, X) of hexagonal WC-type MX.
WC = [tuple(s.split("-")) for s in _words("W-C Mo-C W-N Mo-N Ta-N Nb-N")]
#: (B, X) of cubic ReO3-type BX3.
REO3 = [tuple(s.split("-")) for s in _words("Re-O W-O Sc-F Al-F Nb-F Ti-F In-F")]
#: (X, Z) of D0_3 X3Z (Fe3Al type).
D03 = [tuple(s.split("-")) for s in _words("Fe-Al Fe-Si Fe-Ga Li-Bi Li-Sb Li-As Na-Bi Cu-Al")]
#: (M, X) of rutile MX2.
RUTILE = [
    tuple(s.split("-"))
    for s in _words("Ti-O Sn-O Ge-O Pb-O Ru-O Ir-O Cr-O Mn-O Mg-F Zn-F Ni-F Co-F Fe-F Mn-F")
]
#: (A, B) of A15 A3B.
A15 = [tuple(s.split("-")) for s in _words("Nb-Sn V-Si Nb-Al Cr-Si V-Ga Mo-Si Nb-Ge Nb-Ga")]
#: (M, X) of hexagonal NiAs-type MX.
NIAS = [
    tuple(s.split("-")) for s in _words("Ni-As Fe-S Co-S Ni-S Cr-Sb Mn-Bi Mn-Sb Co-Sb Ni-Sb Fe-Se")
]

#: Every prototype of the catalogue, in build order.
PROTOTYPES = (
    "fcc",
    "bcc",
    "hcp",
    "diamond",
    "rocksalt",
    "zincblende",
    "wurtzite",
    "cscl",
    "fluorite",
    "perovskite",
    "l12",
    "heusler",
    "halfheusler",
    "l10",
    "wc",
    "reo3",
    "d03",
    "rutile",
    "a15",
    "nias",
)

_SQRT3 = math.sqrt(3.0)
_N_SITES = {
    "fcc": 1,
    "bcc": 1,
    "hcp": 2,
    "diamond": 2,
    "rocksalt": 2,
    "zincblende": 2,
    "wurtzite": 4,
    "cscl": 2,
    "fluorite": 3,
    "perovskite": 5,
    "l12": 4,
    "heusler": 4,
    "halfheusler": 3,
    "l10": 2,
    "wc": 2,
    "reo3": 4,
    "d03": 4,
    "rutile": 6,
    "a15": 8,
    "nias": 4,
}


@cache
def reduced_formula(symbols: tuple[str, ...]) -> str:
    """Reduced formula in pymatgen's order (electronegativity), e.g. ``"Li2O"``, ``"Cu"``."""
    from pymatgen.core import Composition

    return str(Composition("".join(symbols)).reduced_formula)


def _covalent(symbol: str) -> float:
    from ase.data import atomic_numbers, covalent_radii

    return float(covalent_radii[atomic_numbers[symbol]])


def _ionic(symbol: str) -> float:
    """Shannon crystal radius (pymatgen's table) of the most common oxidation state, A."""
    from pymatgen.core import Element

    el = Element(symbol)
    radii = {int(k): float(v) for k, v in el.ionic_radii.items()}
    for ox in el.common_oxidation_states:
        if int(ox) in radii:
            return radii[int(ox)]
    return _covalent(symbol)


def _metallic(symbol: str) -> float:
    from pymatgen.core import Element

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No data available for metallic_radius"
        r = Element(symbol).metallic_radius
    return float(r) if r and float(r) > 0 else _covalent(symbol)


def _volume_per_atom(symbol: str) -> float:
    """Volume per atom, A^3, of the element's reference state (ASE's table) or from its
    metallic radius (74 % packing)."""
    from ase.data import atomic_numbers, reference_states

    ref: dict[str, Any] = reference_states[atomic_numbers[symbol]] or {}
    sym, a = ref.get("symmetry"), float(ref.get("a") or 0.0)
    if sym == "fcc":
        return a**3 / 4
    if sym == "bcc":
        return a**3 / 2
    if sym == "hcp":
        return _SQRT3 / 4 * a**3 * float(ref["c/a"])
    if sym == "diamond":
        return a**3 / 8
    return 4 / 3 * math.pi * _metallic(symbol) ** 3 / 0.74


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """A crystal to compute.

    Attributes
    ----------
    prototype : str
        One of :data:`PROTOTYPES`.
    symbols : tuple of str
        Chemical symbols of the primitive cell's sites, in the prototype's site order.
    a : float
        Starting conventional lattice parameter, A (a for hexagonal cells).
    c_over_a : float
        Starting c/a of hexagonal cells (ignored otherwise).
    u : float
        Starting internal parameter of wurtzite and rutile (ignored otherwise).
    """

    prototype: str
    symbols: tuple[str, ...]
    a: float
    c_over_a: float = math.sqrt(8 / 3)
    u: float = 0.375

    @property
    def formula(self) -> str:
        """Reduced formula, e.g. ``"NaCl"``."""
        return reduced_formula(self.symbols)

    @property
    def crystal_id(self) -> str:
        """``<formula>-<prototype>``: the unit of the train/val/test split."""
        return f"{self.formula}-{self.prototype}"

    def name(self, model: str) -> str:
        """Entry name for a force field, ``<formula>-<prototype>-<model>``."""
        return f"{self.crystal_id}-{model}"

    def atoms(self, scale: float = 1.0) -> Atoms:
        """The primitive cell with lattice parameters multiplied by ``scale``.

        Returns
        -------
        ase.Atoms
            Periodic primitive cell, A.

        Raises
        ------
        StructureError
            For an unknown prototype or symbols that do not fit it.
        """
        from ase import Atoms
        from ase.build import bulk

        a = self.a * scale
        p, s = self.prototype, self.symbols
        need = _N_SITES.get(p)
        if need is None:
            raise StructureError(f"unknown prototype {p!r}; known: {', '.join(PROTOTYPES)}")
        if len(s) != need:
            raise StructureError(f"{p} needs {need} sites, got {s}")
        if p in ("fcc", "bcc"):
            return bulk(s[0], p, a=a)
        if p == "hcp":
            return bulk(s[0], "hcp", a=a, c=a * self.c_over_a)
        if p == "diamond":
            return bulk(s[0], "diamond", a=a)
        if p in ("rocksalt", "zincblende"):
            return bulk("".join(s), p, a=a)
        if p == "cscl":
            return bulk("".join(s), "cesiumchloride", a=a)
        if p == "wurtzite":
            return bulk("".join(s[:2]), "wurtzite", a=a, c=a * self.c_over_a, u=self.u)
        if p in ("l10", "wc"):
            c = a * self.c_over_a
            if p == "l10":  # primitive tetragonal cell of the CuAu structure
                cell = np.diag([a, a, c])
                frac = [(0.0, 0.0, 0.0), (0.5, 0.5, 0.5)]
            else:
                cell = np.array([[a, 0, 0], [-a / 2, a * _SQRT3 / 2, 0], [0, 0, c]])
                frac = [(0.0, 0.0, 0.0), (1 / 3, 2 / 3, 0.5)]
            return Atoms(list(s), scaled_positions=frac, cell=cell, pbc=True)
        if p == "rutile":
            x = self.u
            frac = [
                (0.0, 0.0, 0.0),
                (0.5, 0.5, 0.5),
                (x, x, 0.0),
                (-x, -x, 0.0),
                (0.5 + x, 0.5 - x, 0.5),
                (0.5 - x, 0.5 + x, 0.5),
            ]
            cell = np.diag([a, a, a * self.c_over_a])
            return Atoms(list(s), scaled_positions=frac, cell=cell, pbc=True)
        if p == "nias":
            cell = np.array([[a, 0, 0], [-a / 2, a * _SQRT3 / 2, 0], [0, 0, a * self.c_over_a]])
            frac = [(0.0, 0.0, 0.0), (0.0, 0.0, 0.5), (1 / 3, 2 / 3, 0.25), (2 / 3, 1 / 3, 0.75)]
            return Atoms(list(s), scaled_positions=frac, cell=cell, pbc=True)
        return _cubic_atoms(p, s, a)


#: The cubic prototypes given by their conventional cube: the cell they are built in
#: (``"fcc"``: the primitive cell of the fcc lattice, ``"cubic"``: the cube) and the sites'
#: fractional positions in the cube, in the order of :attr:`Candidate.symbols`.
_CUBIC_SITES: dict[str, tuple[str, list[tuple[float, float, float]]]] = {
    "fluorite": ("fcc", [(0, 0, 0), (0.25, 0.25, 0.25), (0.75, 0.75, 0.75)]),
    "halfheusler": ("fcc", [(0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0, 0, 0)]),
    "heusler": ("fcc", [(0.25, 0.25, 0.25), (0.75, 0.75, 0.75), (0.5, 0.5, 0.5), (0, 0, 0)]),
    "d03": ("fcc", [(0.25, 0.25, 0.25), (0.75, 0.75, 0.75), (0.5, 0.5, 0.5), (0, 0, 0)]),
    "perovskite": (
        "cubic",
        [(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
    ),
    "l12": ("cubic", [(0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5), (0, 0, 0)]),
    "reo3": ("cubic", [(0, 0, 0), (0.5, 0, 0), (0, 0.5, 0), (0, 0, 0.5)]),
    "a15": (
        "cubic",
        [
            *[(0.25, 0, 0.5), (0.75, 0, 0.5), (0.5, 0.25, 0), (0.5, 0.75, 0)],
            *[(0, 0.5, 0.25), (0, 0.5, 0.75), (0, 0, 0), (0.5, 0.5, 0.5)],
        ],
    ),
}


def _cubic_atoms(prototype: str, symbols: tuple[str, ...], a: float) -> Atoms:
    """A prototype of :data:`_CUBIC_SITES` with cube edge ``a`` (A)."""
    from ase import Atoms

    kind, sites = _CUBIC_SITES[prototype]
    fcc = a / 2 * np.array([[0.0, 1, 1], [1, 0, 1], [1, 1, 0]])
    cell = fcc if kind == "fcc" else a * np.eye(3)
    cart = np.array(sites, dtype=float) * a
    return Atoms(list(symbols), positions=cart, cell=cell, pbc=True)


def _elemental(symbol: str, prototype: str) -> Candidate:
    v = _volume_per_atom(symbol)
    if prototype == "fcc":
        return Candidate(prototype="fcc", symbols=(symbol,), a=(4 * v) ** (1 / 3))
    if prototype == "bcc":
        return Candidate(prototype="bcc", symbols=(symbol,), a=(2 * v) ** (1 / 3))
    if prototype == "hcp":
        c_a = math.sqrt(8 / 3)
        a = (4 * v / (_SQRT3 * c_a)) ** (1 / 3)
        return Candidate(prototype="hcp", symbols=(symbol, symbol), a=a, c_over_a=c_a)
    # diamond: the covalent bond, a = 4 d / sqrt(3)
    return Candidate(
        prototype="diamond", symbols=(symbol, symbol), a=4 * 2 * _covalent(symbol) / _SQRT3
    )


def _split_formula(pair: str) -> tuple[str, str]:
    """``"NaCl"`` -> ("Na", "Cl")."""
    from ase.symbols import string2symbols

    symbols = string2symbols(pair)
    if len(symbols) != 2:
        raise StructureError(f"{pair!r} is not a binary AB formula")
    return symbols[0], symbols[1]


def _rocksalt() -> list[Candidate]:
    out = []
    for f in ROCKSALT:
        a, x = _split_formula(f)
        # carbides, nitrides and hydrides of metals are metallic-covalent, the rest ionic
        d = _metallic(a) + _covalent(x) if x in ("C", "N", "H") else _ionic(a) + _ionic(x)
        out.append(Candidate(prototype="rocksalt", symbols=(a, x), a=2 * d))
    return out


def _zincblende() -> list[Candidate]:
    out = []
    for f in ZINCBLENDE:
        a, x = _split_formula(f)
        d = _covalent(a) + _covalent(x)
        out.append(Candidate(prototype="zincblende", symbols=(a, x), a=4 * d / _SQRT3))
    return out


def _wurtzite() -> list[Candidate]:
    out = []
    for f in WURTZITE:
        a, x = _split_formula(f)
        d = _covalent(a) + _covalent(x)
        out.append(
            Candidate(
                prototype="wurtzite",
                symbols=(a, x, a, x),
                a=d * math.sqrt(8 / 3),
                c_over_a=math.sqrt(8 / 3),
            )
        )
    return out


def _cscl() -> list[Candidate]:
    out = []
    for f in CSCL:
        a, x = _split_formula(f)
        ionic = x in ("Cl", "Br", "I")
        d = _ionic(a) + _ionic(x) if ionic else _metallic(a) + _metallic(x)
        out.append(Candidate(prototype="cscl", symbols=(a, x), a=2 * d / _SQRT3))
    return out


def _fluorite() -> list[Candidate]:
    """Fluorite MX2, then anti-fluorite X2M (the same prototype)."""
    out = []
    for cat, an in FLUORITE:
        d = _ionic(cat) + _ionic(an) if an in ("F", "Cl", "O") else _metallic(cat) + _metallic(an)
        out.append(Candidate(prototype="fluorite", symbols=(cat, an, an), a=4 * d / _SQRT3))
    for an, cat in ANTIFLUORITE:
        d = _ionic(cat) + _ionic(an)
        out.append(Candidate(prototype="fluorite", symbols=(an, cat, cat), a=4 * d / _SQRT3))
    return out


def _perovskite() -> list[Candidate]:
    return [
        Candidate(prototype="perovskite", symbols=(a_, b_, x, x, x), a=2 * (_ionic(b_) + _ionic(x)))
        for a_, b_, x in PEROVSKITE
    ]


def _l12() -> list[Candidate]:
    return [
        Candidate(
            prototype="l12",
            symbols=(a_, a_, a_, b_),
            a=(_metallic(a_) + _metallic(b_)) * math.sqrt(2),
        )
        for a_, b_ in L12
    ]


def _heusler() -> list[Candidate]:
    out = []
    for x, y, z in HEUSLER:
        d = _metallic(x) + 0.5 * (_metallic(y) + _metallic(z))
        out.append(Candidate(prototype="heusler", symbols=(x, x, y, z), a=4 * d / _SQRT3))
    return out


def _half_heusler() -> list[Candidate]:
    out = []
    for x, y, z in HALF_HEUSLER:
        d = _metallic(y) + 0.5 * (_metallic(x) + _metallic(z))
        out.append(Candidate(prototype="halfheusler", symbols=(x, y, z), a=4 * d / _SQRT3))
    return out


def _l10() -> list[Candidate]:
    # tetragonal a_t = a_fcc / sqrt(2) ~ the bond length; c / a_t a little below sqrt(2)
    return [
        Candidate(prototype="l10", symbols=(a_, b_), a=_metallic(a_) + _metallic(b_), c_over_a=1.35)
        for a_, b_ in L10
    ]


def _wc() -> list[Candidate]:
    out = []
    for m, x in WC:
        d = _metallic(m) + _covalent(x)  # M-X bond: sqrt(a^2 / 3 + c^2 / 4), c = a
        a_wc = d / math.sqrt(1 / 3 + 1 / 4)
        out.append(Candidate(prototype="wc", symbols=(m, x), a=a_wc, c_over_a=1.0))
    return out


def _reo3() -> list[Candidate]:
    return [
        Candidate(prototype="reo3", symbols=(b_, x, x, x), a=2 * (_ionic(b_) + _ionic(x)))
        for b_, x in REO3
    ]


def _d03() -> list[Candidate]:
    out = []
    for x, z in D03:
        d = _metallic(x) + _metallic(z)  # X(1/4)-Z(0) bond, a sqrt(3) / 4
        out.append(Candidate(prototype="d03", symbols=(x, x, x, z), a=4 * d / _SQRT3))
    return out


def _rutile() -> list[Candidate]:
    out = []
    for m, x in RUTILE:
        d = _ionic(m) + _ionic(x)  # apical M-X bond: sqrt(2) u a, u = 0.305
        out.append(
            Candidate(
                prototype="rutile",
                symbols=(m, m, x, x, x, x),
                a=d / (math.sqrt(2) * 0.305),
                c_over_a=0.65,
                u=0.305,
            )
        )
    return out


def _a15() -> list[Candidate]:
    # A-A chains along the cube edges at a / 2
    return [
        Candidate(prototype="a15", symbols=(a_,) * 6 + (b_, b_), a=4 * _metallic(a_))
        for a_, b_ in A15
    ]


def _nias() -> list[Candidate]:
    out = []
    for m, x in NIAS:
        d = _metallic(m) + _covalent(x)  # M-X bond: sqrt(a^2 / 3 + c^2 / 16), c = 1.39 a
        a_n = d / math.sqrt(1 / 3 + 1.39**2 / 16)
        out.append(Candidate(prototype="nias", symbols=(m, m, x, x), a=a_n, c_over_a=1.39))
    return out


#: How the candidates of each prototype are made (in the order of the element tables).
_BUILDERS: dict[str, Callable[[], list[Candidate]]] = {
    "fcc": lambda: [_elemental(m, "fcc") for m in METALS],
    "bcc": lambda: [_elemental(m, "bcc") for m in METALS],
    "hcp": lambda: [_elemental(m, "hcp") for m in METALS],
    "diamond": lambda: [_elemental(x, "diamond") for x in DIAMOND],
    "rocksalt": _rocksalt,
    "zincblende": _zincblende,
    "wurtzite": _wurtzite,
    "cscl": _cscl,
    "fluorite": _fluorite,
    "perovskite": _perovskite,
    "l12": _l12,
    "heusler": _heusler,
    "halfheusler": _half_heusler,
    "l10": _l10,
    "wc": _wc,
    "reo3": _reo3,
    "d03": _d03,
    "rutile": _rutile,
    "a15": _a15,
    "nias": _nias,
}


def catalogue(prototypes: Iterable[str] | None = None) -> list[Candidate]:
    """Every candidate crystal, interleaved over prototypes (so that the first N are diverse).

    Parameters
    ----------
    prototypes : iterable of str, optional
        Keep only these prototypes (default: all of :data:`PROTOTYPES`).

    Returns
    -------
    list of Candidate
        Unique by :attr:`Candidate.crystal_id`, deterministic order.

    Raises
    ------
    StructureError
        For an unknown prototype.
    """
    wanted = tuple(PROTOTYPES if prototypes is None else prototypes)
    unknown = sorted(set(wanted) - set(PROTOTYPES))
    if unknown:
        raise StructureError(
            f"unknown prototype(s) {', '.join(unknown)}; known: {', '.join(PROTOTYPES)}"
        )
    chosen = [_BUILDERS[p]() for p in PROTOTYPES if p in wanted]
    out: list[Candidate] = []
    seen: set[str] = set()
    for k in range(max((len(g) for g in chosen), default=0)):
        for g in chosen:
            if k < len(g) and g[k].crystal_id not in seen:
                seen.add(g[k].crystal_id)
                out.append(g[k])
    return out


def assign_splits(
    candidates: Sequence[Candidate], seed: int = 0, fractions: tuple[float, float] = (0.1, 0.1)
) -> dict[str, str]:
    """Seeded train/val/test split over crystals, stratified by prototype.

    Within each prototype the crystals are ordered by a seeded hash of their id; the first
    ``fractions[0]`` of them go to ``"test"``, the next ``fractions[1]`` to ``"val"``, the rest
    to ``"train"``. The result depends only on the crystal ids and the seed (not on which
    crystals were built, nor in what order).

    Parameters
    ----------
    candidates : sequence of Candidate
        The full catalogue.
    seed : int, default 0
        Split seed.
    fractions : (float, float), default (0.1, 0.1)
        Test and validation fractions.

    Returns
    -------
    dict
        crystal_id -> ``"train"`` | ``"val"`` | ``"test"``.
    """
    by_proto: dict[str, list[str]] = {}
    for c in candidates:
        by_proto.setdefault(c.prototype, []).append(c.crystal_id)
    split: dict[str, str] = {}
    for ids in by_proto.values():
        order = sorted(set(ids), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
        n = len(order)
        for k, cid in enumerate(order):
            pos = (k + 0.5) / n
            split[cid] = (
                "test"
                if pos < fractions[0]
                else "val"
                if pos < fractions[0] + fractions[1]
                else "train"
            )
    return split
