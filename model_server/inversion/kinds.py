"""The sample kind (``"powder"`` or ``"single_crystal"``) of a model directory and of a
folded spectrum file, so that each is sent to the inversion that can read it."""

from __future__ import annotations

import json
from pathlib import Path

from model_server.exceptions import InputSpectrumError

__all__ = ["file_sample_kind", "model_kind"]


def model_kind(path: str | Path) -> str:
    """``"powder"`` or ``"single_crystal"``: the sample kind of the model directory ``path``
    (its model.json's ``sample_kind``; single-crystal models have none). A directory
    without a readable model.json counts as single crystal (its loader says what is
    missing)."""
    try:
        meta = json.loads((Path(path) / "model.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "single_crystal"
    return "powder" if meta.get("sample_kind") == "powder" else "single_crystal"


def file_sample_kind(path: str | Path) -> str:
    """``"powder"`` or ``"single_crystal"``: the ``sample_kind`` attribute of a folded
    file's ``entry`` (absent on single-crystal files)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            kind = f["entry"].attrs.get("sample_kind", "single_crystal")
    except (OSError, KeyError) as exc:
        raise InputSpectrumError(
            f"{path} is not a folded spectrum file (steer fold --out): {exc}"
        ) from exc
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    return "powder" if kind == "powder" else "single_crystal"
