"""JSON encoding of numpy values, shared by every package that writes JSON."""

from __future__ import annotations

import numpy as np

__all__ = ["json_default"]


def json_default(obj: object) -> object:
    """``default=`` hook for :func:`json.dumps`: numpy scalars and arrays as plain Python."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
