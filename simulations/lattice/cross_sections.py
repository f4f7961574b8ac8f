"""Neutron cross sections of the natural elements (Sears 1992), for incoherent-approximation
spectra (:mod:`model_server.prediction.spectra`).

Values: bound coherent and incoherent scattering cross sections sigma_coh, sigma_inc in
barn, natural isotopic abundance, from V. F. Sears, "Neutron scattering lengths and cross
sections", Neutron News 3(3), 26-37 (1992), as transcribed by A. J. Jackson in Euphonic's
``euphonic/isotopes/data/sears-1992.csv`` (the same transcription as the coherent
scattering lengths in ``simulations/data/scattering_lengths.json``). The rows of the natural
elements were taken; mono-isotopic elements (Be, F, Na, Al, P, Sc, Mn, Co, As, Y, Nb, I,
Cs, Pr, Tb, Ho, Tm, Au, Bi, Th) have no natural-element row there and take the row of
their only stable isotope (abundance 100 %). An incoherent cross section left blank in the
transcription (He, O, Sb, Xe, Ce, Ir, Th) is taken as 0. Elements with neither row (Tc, Pm,
Ra, Pa, Np, Am: no stable isotope) are absent; so is every element that the coherent table
lacks.

Generated once from that CSV (``symbol -> (coherent_cross_section, incoherent_cross_section)``
of the rows described above); not edited by hand.
"""

from __future__ import annotations

from simulations.exceptions import SimulationError

__all__ = ["SEARS_1992", "UnknownCrossSectionError", "cross_sections"]

#: element -> (sigma_coh, sigma_inc), barn.
SEARS_1992: dict[str, tuple[float, float]] = {
    "H": (1.7568, 80.26),
    "He": (1.34, 0.0),
    "Li": (0.454, 0.92),
    "Be": (7.63, 0.0018),
    "B": (3.54, 1.7),
    "C": (5.55, 0.001),
    "N": (11.01, 0.5),
    "O": (4.232, 0.0),
    "F": (4.017, 0.0008),
    "Ne": (2.62, 0.008),
    "Na": (1.66, 1.62),
    "Mg": (3.631, 0.08),
    "Al": (1.495, 0.0082),
    "Si": (2.1633, 0.004),
    "P": (3.307, 0.005),
    "S": (1.0186, 0.007),
    "Cl": (11.526, 5.3),
    "Ar": (0.458, 0.225),
    "K": (1.69, 0.27),
    "Ca": (2.78, 0.05),
    "Sc": (19.0, 4.5),
    "Ti": (1.485, 2.87),
    "V": (0.01838, 5.08),
    "Cr": (1.66, 1.83),
    "Mn": (1.75, 0.4),
    "Fe": (11.22, 0.4),
    "Co": (0.779, 4.8),
    "Ni": (13.3, 5.2),
    "Cu": (7.485, 0.55),
    "Zn": (4.054, 0.077),
    "Ga": (6.675, 0.16),
    "Ge": (8.42, 0.18),
    "As": (5.44, 0.06),
    "Se": (7.98, 0.32),
    "Br": (5.8, 0.1),
    "Kr": (7.67, 0.01),
    "Rb": (6.32, 0.5),
    "Sr": (6.19, 0.06),
    "Y": (7.55, 0.15),
    "Zr": (6.44, 0.02),
    "Nb": (6.253, 0.0024),
    "Mo": (5.67, 0.04),
    "Ru": (6.21, 0.4),
    "Rh": (4.34, 0.3),
    "Pd": (4.39, 0.093),
    "Ag": (4.407, 0.58),
    "Cd": (3.04, 3.46),
    "In": (2.08, 0.54),
    "Sn": (4.87, 0.022),
    "Sb": (3.9, 0.0),
    "Te": (4.23, 0.09),
    "I": (3.5, 0.31),
    "Xe": (3.04, 0.0),
    "Cs": (3.69, 0.21),
    "Ba": (3.23, 0.15),
    "La": (8.53, 1.13),
    "Ce": (2.94, 0.0),
    "Pr": (2.64, 0.015),
    "Nd": (7.43, 9.2),
    "Sm": (0.422, 39.0),
    "Eu": (6.75, 2.5),
    "Gd": (29.3, 151.0),
    "Tb": (6.84, 0.004),
    "Dy": (35.9, 54.4),
    "Ho": (8.06, 0.36),
    "Er": (7.63, 1.1),
    "Tm": (6.28, 0.1),
    "Yb": (19.42, 4.0),
    "Lu": (6.53, 0.7),
    "Hf": (7.6, 2.6),
    "Ta": (6.0, 0.01),
    "W": (2.97, 1.63),
    "Re": (10.6, 0.9),
    "Os": (14.4, 0.3),
    "Ir": (14.1, 0.0),
    "Pt": (11.58, 0.13),
    "Au": (7.32, 0.43),
    "Hg": (20.24, 6.6),
    "Tl": (9.678, 0.21),
    "Pb": (11.115, 0.003),
    "Bi": (9.148, 0.0084),
    "Th": (13.36, 0.0),
    "U": (8.903, 0.005),
}


class UnknownCrossSectionError(SimulationError, ValueError):
    """An element with no tabulated cross section (no stable isotope)."""


def cross_sections(element: str) -> tuple[float, float]:
    """Bound (coherent, incoherent) scattering cross sections of a natural element, barn.

    Raises
    ------
    UnknownCrossSectionError
        For an element missing from :data:`SEARS_1992`.
    """
    try:
        return SEARS_1992[element]
    except KeyError:
        raise UnknownCrossSectionError(
            f"no tabulated neutron cross section for element {element!r} (Sears 1992 lists "
            f"natural elements with a stable isotope: {', '.join(SEARS_1992)})"
        ) from None
