"""Errors raised by the streaming ingestion.

Hierarchy::

    ConsumerError           base class, never raised directly
    └── FoldError           a grid, table or run the folding cannot use

Every message says what was wrong and how to fix it.
"""

from __future__ import annotations

__all__ = ["ConsumerError", "FoldError"]


class ConsumerError(Exception):
    """Base class of all errors raised by :mod:`consumers`."""


class FoldError(ConsumerError, ValueError):
    """A grid, fold table or run that the folding cannot use."""
