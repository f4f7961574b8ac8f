"""Errors raised by the streaming ingestion.

Hierarchy::

    ConsumerError           base class, never raised directly
    ├── FoldError           a grid, table or run the folding cannot use
    └── NexusStructureError a run start's nexus_structure that gives no spectrometer set-up

Every message says what was wrong and how to fix it.
"""

from __future__ import annotations

__all__ = ["ConsumerError", "FoldError", "NexusStructureError"]


class ConsumerError(Exception):
    """Base class of all errors raised by :mod:`consumers`."""


class FoldError(ConsumerError, ValueError):
    """A grid, fold table or run that the folding cannot use."""


class NexusStructureError(ConsumerError, ValueError):
    """A pl72 ``nexus_structure`` that is malformed or lacks part of a spectrometer's
    set-up (the message names every missing piece)."""
