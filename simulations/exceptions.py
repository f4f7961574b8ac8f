"""Errors raised by the physics core.

Hierarchy::

    SimulationError                 base class, never raised directly
    ├── StructureError              a crystal that cannot be used (bad CIF, partial occupancy)
    ├── ForceConstantError          force constants that cannot be built or used
    │   ├── UnknownFCSetError       a named FC set that does not exist for the material
    │   └── InvalidCoefficientsError  wrong shape, non-finite or out-of-range coefficients
    ├── GridError                   an impossible (q, E) grid or q-path
    ├── InstrumentError             an impossible instrument, orientation or run plan
    ├── DatasetError                a training set that cannot be generated or read
    ├── NoiseError                  noise parameters or spectra the noise model cannot use
    └── RecordingError              a recorded run (.steer) that cannot be written or read

Every message says what was wrong and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "DatasetError",
    "ForceConstantError",
    "GridError",
    "InstrumentError",
    "InvalidCoefficientsError",
    "NoiseError",
    "RecordingError",
    "SimulationError",
    "StructureError",
    "UnknownFCSetError",
]


class SimulationError(Exception):
    """Base class of all errors raised by :mod:`simulations`."""


class StructureError(SimulationError, ValueError):
    """A crystal structure that cannot be used."""


class ForceConstantError(SimulationError, ValueError):
    """Force constants that cannot be built or used."""


class UnknownFCSetError(ForceConstantError, KeyError):
    """A named force-constant set that does not exist for the material."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class InvalidCoefficientsError(ForceConstantError):
    """Coefficients with the wrong shape, non-finite values or outside a domain."""


class GridError(SimulationError, ValueError):
    """An impossible (q, E) grid or q-path."""


class InstrumentError(SimulationError, ValueError):
    """An instrument, orientation or run plan that cannot be used (e.g. omega outside the
    goniometer limits, Ei too small, negative counts)."""


class DatasetError(SimulationError):
    """A training set that cannot be generated or read."""


class NoiseError(SimulationError, ValueError):
    """Spectra or noise parameters (background, Poisson scale) the noise model cannot use."""


class RecordingError(SimulationError):
    """A recorded run (``.steer``) that cannot be written or read: not a recorded run,
    an unsupported format version, a truncated or corrupt file, or a message too large."""
