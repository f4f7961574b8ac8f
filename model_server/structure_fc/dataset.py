"""The training data of the structure -> force-constant model: FC database entries, the
shipped reference FCs, and the identity of a training set.

**Data.** Entries of the FC database (``simulations.fcdb.database.load_database``): primitive
cell, per-pair 3x3 force constants (eV/A^2, self terms included) and a train/val/test split
by crystal; :func:`load_entries` keeps the dynamically stable ones. Without the database,
:func:`reference_samples` gives the shipped crystals' reference force constants.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "MIN_FC",
    "FCSample",
    "FCSampleLike",
    "crystal_key",
    "fingerprint",
    "load_entries",
    "reference_samples",
]

#: Entries whose largest force constant is below this (eV/A^2) carry no information (a force
#: field that gave no forces at all): left out of training and evaluation, and listed.
MIN_FC = 1e-3


class FCSampleLike(Protocol):
    """What training needs of a database entry (``simulations.fcdb.database.FCEntry`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def prototype(self) -> str: ...
    @property
    def numbers(self) -> NDArray[np.int64]: ...
    @property
    def lattice(self) -> NDArray[np.float64]: ...
    @property
    def frac(self) -> NDArray[np.float64]: ...
    @property
    def pairs(self) -> NDArray[np.int64]: ...
    @property
    def fc(self) -> NDArray[np.float64]: ...
    @property
    def split(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class FCSample:
    """One crystal's force constants in the database's convention (see FCSampleLike)."""

    name: str
    prototype: str
    numbers: NDArray[np.int64]
    lattice: NDArray[np.float64]
    frac: NDArray[np.float64]
    pairs: NDArray[np.int64]
    fc: NDArray[np.float64]
    split: str
    model: str = ""


def reference_samples() -> list[FCSample]:
    """The shipped crystals' reference force constants (Ge, Nb, Al; one sample per force
    field of ``simulations/data/reference_fc``), all with split ``"train"``.

    Real force-field FCs projected on each crystal's symmetry-reduced basis (4-5 shells);
    for development and tests when the FC database is not at hand.
    """
    from simulations.fcdb.reference import load_reference
    from simulations.lattice.materials import setup

    out = []
    for material, proto in (("Ge", "diamond"), ("Nb", "bcc"), ("Al", "fcc")):
        ms = setup(material)
        ref = load_reference(material)
        for model in sorted(ref.models):
            fc = ms.basis.block_values(ref.models[model])
            out.append(
                FCSample(
                    name=f"{material}-{proto}-{model}",
                    prototype=proto,
                    numbers=ms.crystal.numbers,
                    lattice=ms.crystal.lattice,
                    frac=ms.crystal.positions,
                    pairs=ms.basis.pairs,
                    fc=fc,
                    split="train",
                    model=model,
                )
            )
    return out


def crystal_key(entry: FCSampleLike) -> str:
    """Identity of a crystal across force fields: prototype and sorted atomic numbers."""
    z = "-".join(str(int(v)) for v in sorted(np.asarray(entry.numbers).tolist()))
    return f"{entry.prototype}:{z}"


def fingerprint(entries: Sequence[FCSampleLike]) -> str:
    """SHA-256 (16 hex digits) of the entries' names, structures and force constants."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.name):
        h.update(e.name.encode())
        for a in (e.numbers, e.lattice, e.frac, e.pairs, e.fc):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def load_entries(
    db: str | Path | None, reference: bool = False
) -> tuple[list[Any], dict[str, Any]]:
    """The entries to train or evaluate on, and where they came from.

    Parameters
    ----------
    db
        FC database file (HDF5); ``None``: the committed one
        (:func:`simulations.fcdb.database.database_path`).
    reference
        Use the shipped reference FCs (:func:`reference_samples`) instead of a database.

    Returns
    -------
    The entries (the database's dynamically stable ones, every split) and the provenance
    of the training set (path, SHA-256 of the file, counts per split) for model.json.

    Raises
    ------
    simulations.exceptions.SimulationError
        A missing or unreadable database (the message says how to build it).
    """
    if reference:
        return list(reference_samples()), {"training_set": "shipped reference FCs (Ge, Nb, Al)"}
    from simulations.fcdb import database as fcdb

    path = Path(db) if db else fcdb.database_path()
    everything = fcdb.load_database(path)
    entries = [e for e in everything if getattr(e, "stable", True)]
    info = {
        "training_set": str(path),
        "training_set_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "n_entries_in_file": len(everything),
        "n_entries": len(entries),
        "selection": "dynamically stable entries only (FCEntry.stable)",
        "n_per_split": {s: sum(e.split == s for e in entries) for s in ("train", "val", "test")},
    }
    return list(entries), info
