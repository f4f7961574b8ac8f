"""The training database of force constants: small ordered crystals with finite-displacement
harmonic FCs from the universal ML force fields shipped in wheels.

Each entry (:class:`FCEntry`) is one relaxed crystal (primitive cell) with its FCs as a list of
3x3 blocks ``Phi_ab(i0, jR)`` (eV/A^2), one per bond ``(i, j, n1, n2, n3)`` up to
:data:`CUTOFF_ANGSTROM`, self terms included. The bond vector of a pair is
``(frac[j] + (n1, n2, n3) - frac[i]) @ lattice`` (A), as in
:attr:`simulations.lattice.force_constants.FCBasis.pairs`. Every entry obeys
``Phi(i0, jR) == Phi(j0, i(-R)).T`` and the acoustic sum rule (self term = minus the sum of
the others) to machine precision.

The database is built by :mod:`simulations.fcdb.build` (``steer fcdb build``) and read here
without any ML force field installed. HDF5 layout (format ``ins-steering-fcdb`` version 1;
``n_e`` entries, ``N`` atoms and ``M`` blocks in all, concatenated with offsets):

* ``entries/{name, formula, prototype, model, split}``: (n_e,) str;
  ``entries/{stable}``: (n_e,) bool; ``entries/min_freq_thz``: (n_e,) float, THz;
  ``entries/lattice``: (n_e, 3, 3) float, A (rows are the lattice vectors);
  ``entries/atom_offset``, ``entries/pair_offset``: (n_e + 1,) int;
* ``atoms/numbers``: (N,) int; ``atoms/frac``: (N, 3) float;
* ``pairs/pairs``: (M, 5) int; ``pairs/fc``: (M, 3, 3) float64, eV/A^2;
* ``meta/<key>``: (n_e, ...) per-entry build facts (supercell matrix, energy per atom, relaxation
  steps, number of displacements, seconds...), see :mod:`simulations.fcdb.build`;
* ``failures/{name, prototype, stage, message}``: (n_f,) str, crystals that could not be built;
* root attributes: ``format``, ``format_version``, ``cutoff_angstrom``, ``stability_mesh``,
  ``stability_tol_thz``, ``full_stability_tol_thz``, ``split_seed``, ``provenance`` (JSON:
  model, package versions, dates, commands, git commits, wall times of every build session).

Frequencies are signed: an imaginary frequency ``i*f`` is reported as ``-f`` (THz), as in
phonopy.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from simulations.exceptions import DatasetError
from simulations.lattice.pair_phonons import frequencies_at

__all__ = [
    "CUTOFF_ANGSTROM",
    "FORMAT",
    "FORMAT_VERSION",
    "FULL_STABILITY_TOL_THZ",
    "SPLITS",
    "STABILITY_MESH",
    "STABILITY_TOL_THZ",
    "FCDatabaseError",
    "FCEntry",
    "Failure",
    "check_entry",
    "database_info",
    "database_path",
    "load_database",
    "read_database",
    "write_database",
]

#: Format name and version written to (and required from) every database file.
FORMAT = "ins-steering-fcdb"
FORMAT_VERSION = 1
#: Every bond up to this length (A) is stored; longer ones are dropped (self terms by the ASR).
CUTOFF_ANGSTROM = 6.0
#: Gamma-centred mesh on which ``stable`` and ``min_freq_thz`` are decided.
STABILITY_MESH = (10, 10, 10)
#: A frequency below ``-STABILITY_TOL_THZ`` (imaginary) from the stored FCs makes an entry
#: unstable, THz.
STABILITY_TOL_THZ = 0.05
#: ... and so does one below ``-FULL_STABILITY_TOL_THZ`` from the force field's full supercell
#: FCs (phonopy, every pair of the finite-displacement supercell) at the q-points commensurate
#: with that supercell, where they are exact (no interpolation), THz.
FULL_STABILITY_TOL_THZ = 0.1
#: Allowed values of :attr:`FCEntry.split`.
SPLITS = ("train", "val", "test")

_DEFAULT = Path(__file__).resolve().parents[1] / "data" / "fcdb" / "fcdb.h5"


class FCDatabaseError(DatasetError):
    """A force-constant database that cannot be read, written or built (missing file, wrong
    format, inconsistent arrays, bad build options)."""


@dataclass(frozen=True)
class FCEntry:
    """One crystal of the database with its harmonic force constants.

    Attributes
    ----------
    name : str
        Unique id ``<formula>-<prototype>-<model>``, e.g. ``"NaCl-rocksalt-chgnet-0.3.0"``.
    prototype : str
        Structure prototype: ``"fcc"``, ``"bcc"``, ``"hcp"``, ``"diamond"``, ``"rocksalt"``,
        ``"zincblende"``, ``"wurtzite"``, ``"cscl"``, ``"fluorite"``, ``"perovskite"``, ...
    numbers : numpy.ndarray
        (n,) int64, atomic numbers of the primitive cell.
    lattice : numpy.ndarray
        (3, 3) float64, A; rows are the lattice vectors (relaxed by the force field).
    frac : numpy.ndarray
        (n, 3) float64, fractional coordinates of the atoms.
    model : str
        Force field that gave the FCs (a :func:`simulations.fcdb.mlff.known_models` name).
    pairs : numpy.ndarray
        (m, 5) int64, ``(i, j, n1, n2, n3)``: atom ``i`` of cell 0, atom ``j`` of cell
        ``(n1, n2, n3)``; every bond up to :data:`CUTOFF_ANGSTROM` and the ``n`` self terms.
    fc : numpy.ndarray
        (m, 3, 3) float64, eV/A^2: ``Phi_ab(i0, jR)``.
    stable : bool
        Dynamically stable: no frequency below ``-STABILITY_TOL_THZ`` from the stored FCs on
        the :data:`STABILITY_MESH` mesh, nor below ``-FULL_STABILITY_TOL_THZ`` from the force
        field's full supercell FCs at the supercell's commensurate q-points (the builder's
        ``min_freq_commensurate_thz``): a crystal that the cutoff makes look stable is not
        kept.
    min_freq_thz : float
        Lowest (signed) frequency on that mesh, THz.
    split : str
        ``"train"``, ``"val"`` or ``"test"``; decided per crystal (formula and prototype).
    """

    name: str
    prototype: str
    numbers: NDArray[np.int64]
    lattice: NDArray[np.float64]
    frac: NDArray[np.float64]
    model: str
    pairs: NDArray[np.int64]
    fc: NDArray[np.float64]
    stable: bool
    min_freq_thz: float
    split: str

    @property
    def n_atoms(self) -> int:
        """Atoms in the primitive cell."""
        return len(self.numbers)

    @property
    def formula(self) -> str:
        """Reduced-order formula of the primitive cell (element symbols in order of first
        appearance, counts > 1 appended), e.g. ``"NaCl"``, ``"CaF2"``, ``"Cu2"``."""
        from ase.data import chemical_symbols

        counts = Counter(int(z) for z in self.numbers)
        return "".join(chemical_symbols[z] + (str(c) if c > 1 else "") for z, c in counts.items())

    @property
    def crystal_id(self) -> str:
        """The crystal regardless of the force field, ``<formula>-<prototype>``: the unit of the
        train/val/test split."""
        return self.name.rsplit("-" + self.model, 1)[0]

    def bond_vectors(self) -> NDArray[np.float64]:
        """(m, 3) float, A: ``(frac[j] + (n1, n2, n3) - frac[i]) @ lattice`` of every pair."""
        i, j, shift = self.pairs[:, 0], self.pairs[:, 1], self.pairs[:, 2:]
        return np.asarray((self.frac[j] + shift - self.frac[i]) @ self.lattice, dtype=float)

    def masses(self) -> NDArray[np.float64]:
        """(n,) float, amu: standard atomic masses (ASE's table)."""
        from ase.data import atomic_masses

        return np.asarray(atomic_masses[self.numbers], dtype=float)

    def frequencies(self, qpoints: ArrayLike) -> NDArray[np.float64]:
        """Signed phonon frequencies from the stored blocks and :meth:`masses`, THz.

        Computed by :func:`simulations.lattice.pair_phonons.frequencies_at`; an imaginary
        frequency ``i*f`` is ``-f``.

        Parameters
        ----------
        qpoints : array_like
            (n_q, 3) reduced coordinates of the primitive reciprocal lattice (r.l.u.).

        Returns
        -------
        numpy.ndarray
            (n_q, 3n) float, THz, ascending per q.
        """
        return frequencies_at(
            self.numbers, self.frac, self.pairs, self.fc, qpoints, masses=self.masses()
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """A crystal the builder could not turn into an entry.

    Attributes
    ----------
    name : str
        The entry name it would have had.
    prototype : str
        Its prototype.
    stage : str
        Where it failed: ``"structure"``, ``"relax"``, ``"phonopy"``, ``"fc"``...
    message : str
        What went wrong.
    """

    name: str
    prototype: str
    stage: str
    message: str


# --------------------------------------------------------------------------------------------
# Checks


def check_entry(entry: FCEntry) -> dict[str, float]:
    """Measure how well an entry obeys the contract.

    Parameters
    ----------
    entry : FCEntry
        The entry to check.

    Returns
    -------
    dict
        ``asr``: max |sum over (j, R) of Phi(i0, jR)|, eV/A^2; ``transpose``: max
        |Phi(i0, jR) - Phi(j0, i(-R)).T|, eV/A^2 (inf when a partner bond is missing);
        ``max_bond``: the longest bond, A; ``scale``: max |Phi|, eV/A^2.
    """
    p = entry.pairs
    n = entry.n_atoms
    sums = np.zeros((n, 3, 3))
    np.add.at(sums, p[:, 0], entry.fc)
    index = {tuple(int(x) for x in row): k for k, row in enumerate(p)}
    worst = 0.0
    for k, (i, j, a, b, c) in enumerate(p):
        partner = index.get((int(j), int(i), -int(a), -int(b), -int(c)))
        if partner is None:
            worst = math.inf
            break
        worst = max(worst, float(np.abs(entry.fc[k] - entry.fc[partner].T).max()))
    return {
        "asr": float(np.abs(sums).max()),
        "transpose": worst,
        "max_bond": float(np.linalg.norm(entry.bond_vectors(), axis=1).max()),
        "scale": float(np.abs(entry.fc).max()),
    }


# --------------------------------------------------------------------------------------------
# Storage


def database_path() -> Path:
    """The committed default database file (``simulations/data/fcdb/fcdb.h5``)."""
    return _DEFAULT


def _str_array(values: Sequence[str]) -> NDArray[Any]:
    import h5py

    return np.array(list(values), dtype=h5py.string_dtype())


def _cat(arrays: Sequence[NDArray[Any]], empty: tuple[int, ...], dtype: Any) -> NDArray[Any]:
    """Concatenate along axis 0 (an empty array of shape ``empty`` when there is none)."""
    if not arrays:
        return np.zeros(empty, dtype=dtype)
    return np.concatenate(arrays).astype(dtype)


def write_database(
    path: str | Path,
    entries: Sequence[FCEntry],
    *,
    meta: Sequence[Mapping[str, Any]] | None = None,
    failures: Sequence[Failure] = (),
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write entries (and failures) to an HDF5 file, atomically (temporary file + rename).

    Parameters
    ----------
    path : str or pathlib.Path
        Output file; its folder is created.
    entries : sequence of FCEntry
        The crystals, stored in this order.
    meta : sequence of mapping, optional
        One mapping per entry with the same keys in each (numbers or arrays of one shape);
        stored as ``meta/<key>`` columns.
    failures : sequence of Failure
        Crystals that could not be built.
    attrs : mapping, optional
        Extra root attributes (numbers or strings; dicts and lists are stored as JSON).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    import h5py

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if meta is not None and len(meta) != len(entries):
        raise FCDatabaseError(f"{len(meta)} meta records for {len(entries)} entries")
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        dup = sorted(k for k, v in Counter(names).items() if v > 1)
        raise FCDatabaseError(f"duplicate entry names: {', '.join(dup[:5])}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["cutoff_angstrom"] = CUTOFF_ANGSTROM
            f.attrs["stability_mesh"] = np.array(STABILITY_MESH)
            f.attrs["stability_tol_thz"] = STABILITY_TOL_THZ
            f.attrs["full_stability_tol_thz"] = FULL_STABILITY_TOL_THZ
            for key, value in (attrs or {}).items():
                f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
            _write_entries(f, entries)
            if meta:
                mg = f.create_group("meta")
                for key in meta[0]:
                    values = [r[key] for r in meta]
                    if isinstance(values[0], str):
                        mg.create_dataset(key, data=_str_array(values))
                    else:
                        mg.create_dataset(key, data=np.array(values))
            fg = f.create_group("failures")
            for key in ("name", "prototype", "stage", "message"):
                fg.create_dataset(key, data=_str_array([getattr(x, key) for x in failures]))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_entries(f: Any, entries: Sequence[FCEntry]) -> None:
    """The ``entries``, ``atoms`` and ``pairs`` groups of an open HDF5 file (module docstring)."""
    n_at = np.array([e.n_atoms for e in entries], dtype=np.int64)
    n_pr = np.array([len(e.pairs) for e in entries], dtype=np.int64)
    g = f.create_group("entries")
    for key in ("name", "formula", "prototype", "model", "split"):
        col = [e.formula if key == "formula" else getattr(e, key) for e in entries]
        g.create_dataset(key, data=_str_array(col))
    g.create_dataset("stable", data=np.array([e.stable for e in entries], dtype=bool))
    g.create_dataset("min_freq_thz", data=np.array([e.min_freq_thz for e in entries], dtype=float))
    lat = np.array([e.lattice for e in entries], dtype=float).reshape(-1, 3, 3)
    g.create_dataset("lattice", data=lat)
    g.create_dataset("atom_offset", data=np.concatenate([[0], np.cumsum(n_at)]))
    g.create_dataset("pair_offset", data=np.concatenate([[0], np.cumsum(n_pr)]))
    a = f.create_group("atoms")
    a.create_dataset("numbers", data=_cat([e.numbers for e in entries], (0,), np.int16))
    a.create_dataset(
        "frac", data=_cat([e.frac for e in entries], (0, 3), float), compression="gzip"
    )
    p = f.create_group("pairs")
    p.create_dataset(
        "pairs",
        data=_cat([e.pairs for e in entries], (0, 5), np.int16),
        compression="gzip",
        shuffle=True,
    )
    p.create_dataset(
        "fc",
        data=_cat([e.fc for e in entries], (0, 3, 3), float),
        compression="gzip",
        shuffle=True,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class _Contents:
    entries: list[FCEntry]
    meta: list[dict[str, Any]]
    failures: list[Failure]
    attrs: dict[str, Any]


def _strings(ds: Any) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]


def read_database(path: str | Path) -> _Contents:
    """Read everything in a database file: entries (stable or not), per-entry meta, failures and
    root attributes (JSON ones decoded).

    Raises
    ------
    FCDatabaseError
        If the file is missing, not a database of this format or inconsistent.
    """
    import h5py

    src = Path(path)
    if not src.is_file():
        raise FCDatabaseError(
            f"no force-constant database at {src}: build it with "
            f"'steer fcdb build --out {src}' (needs the ML force fields: make mlff)"
        )
    try:
        with h5py.File(src, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise FCDatabaseError(f"{src} is not a force-constant database ({FORMAT})")
            version = int(f.attrs.get("format_version", -1))
            if version != FORMAT_VERSION:
                raise FCDatabaseError(
                    f"{src} has format version {version}; this code reads {FORMAT_VERSION}"
                )
            attrs: dict[str, Any] = {}
            for key, value in f.attrs.items():
                if isinstance(value, str) and value[:1] in "[{":
                    with contextlib.suppress(ValueError):
                        value = json.loads(value)
                attrs[key] = value.tolist() if isinstance(value, np.ndarray) else value
            entries = _read_entries(f, src)
            meta = _read_meta(f, len(entries))
            fg = f["failures"]
            fcols = {k: _strings(fg[k]) for k in ("name", "prototype", "stage", "message")}
    except (OSError, KeyError) as exc:
        raise FCDatabaseError(f"cannot read force-constant database {src}: {exc}") from exc
    failures = [
        Failure(
            name=fcols["name"][k],
            prototype=fcols["prototype"][k],
            stage=fcols["stage"][k],
            message=fcols["message"][k],
        )
        for k in range(len(fcols["name"]))
    ]
    return _Contents(entries=entries, meta=meta, failures=failures, attrs=attrs)


def _read_entries(f: Any, src: Path) -> list[FCEntry]:
    """The entries of an open database file ``src``, checking their offsets."""
    g = f["entries"]
    cols = {k: _strings(g[k]) for k in ("name", "prototype", "model", "split")}
    stable = g["stable"][()]
    min_freq = g["min_freq_thz"][()]
    lattice = g["lattice"][()]
    ao = g["atom_offset"][()]
    po = g["pair_offset"][()]
    numbers = f["atoms/numbers"][()].astype(np.int64)
    frac = f["atoms/frac"][()].astype(float)
    pairs = f["pairs/pairs"][()].astype(np.int64)
    fc = f["pairs/fc"][()].astype(float)
    n_e = len(cols["name"])
    if not (len(ao) == len(po) == n_e + 1 and ao[-1] == len(numbers) and po[-1] == len(pairs)):
        raise FCDatabaseError(f"{src}: inconsistent offsets (truncated or corrupt file?)")
    return [
        FCEntry(
            name=cols["name"][k],
            prototype=cols["prototype"][k],
            numbers=numbers[ao[k] : ao[k + 1]].copy(),
            lattice=lattice[k].copy(),
            frac=frac[ao[k] : ao[k + 1]].copy(),
            model=cols["model"][k],
            pairs=pairs[po[k] : po[k + 1]].copy(),
            fc=fc[po[k] : po[k + 1]].copy(),
            stable=bool(stable[k]),
            min_freq_thz=float(min_freq[k]),
            split=cols["split"][k],
        )
        for k in range(n_e)
    ]


def _read_meta(f: Any, n_e: int) -> list[dict[str, Any]]:
    """The per-entry build facts (``meta/<key>`` columns) of an open database file."""
    import h5py

    meta: list[dict[str, Any]] = [{} for _ in range(n_e)]
    if "meta" in f:
        for key, ds in f["meta"].items():
            values: Sequence[Any] = _strings(ds) if h5py.check_string_dtype(ds.dtype) else ds[()]
            for k in range(n_e):
                v = values[k]
                meta[k][key] = v.item() if isinstance(v, np.generic) else v
    return meta


def load_database(
    path: str | Path | None = None, *, include_unstable: bool = False
) -> list[FCEntry]:
    """Load the database.

    Parameters
    ----------
    path : str or pathlib.Path, optional
        A database file; None: the committed default (:func:`database_path`).
    include_unstable : bool, default False
        Also return the dynamically unstable crystals the build kept on record (for counts
        and diagnostics, not for training).

    Returns
    -------
    list of FCEntry
        In file order.

    Raises
    ------
    FCDatabaseError
        If the file is missing ("database not built"), of another format or inconsistent.
    """
    entries = read_database(database_path() if path is None else path).entries
    return entries if include_unstable else [e for e in entries if e.stable]


def database_info(path: str | Path | None = None) -> dict[str, Any]:
    """Counts of a database (the ``steer fcdb info --json`` output).

    Returns
    -------
    dict
        ``path``, ``n_entries`` (stable or not), ``n_stable``, ``n_unstable``, ``n_failed``,
        ``by_prototype`` {prototype: {"stable", "unstable", "failed"}}, ``by_split``
        {split: stable count}, ``by_split_prototype`` {split: {prototype: stable count}},
        ``models``, ``n_atoms`` and ``n_pairs`` (stable entries), ``file_bytes``,
        ``cutoff_angstrom``, ``provenance``.
    """
    src = database_path() if path is None else Path(path)
    c = read_database(src)
    by_proto: dict[str, dict[str, int]] = {}
    for e in c.entries:
        d = by_proto.setdefault(e.prototype, {"stable": 0, "unstable": 0, "failed": 0})
        d["stable" if e.stable else "unstable"] += 1
    for x in c.failures:
        by_proto.setdefault(x.prototype, {"stable": 0, "unstable": 0, "failed": 0})["failed"] += 1
    stable = [e for e in c.entries if e.stable]
    by_split = {s: sum(e.split == s for e in stable) for s in SPLITS}
    by_split_proto = {
        s: dict(sorted(Counter(e.prototype for e in stable if e.split == s).items()))
        for s in SPLITS
    }
    return {
        "path": str(src),
        "n_entries": len(c.entries),
        "n_stable": len(stable),
        "n_unstable": len(c.entries) - len(stable),
        "n_failed": len(c.failures),
        "by_prototype": dict(sorted(by_proto.items())),
        "by_split": by_split,
        "by_split_prototype": by_split_proto,
        "models": sorted({e.model for e in c.entries}),
        "n_atoms": int(sum(e.n_atoms for e in stable)),
        "n_pairs": int(sum(len(e.pairs) for e in stable)),
        "file_bytes": src.stat().st_size,
        "cutoff_angstrom": c.attrs.get("cutoff_angstrom"),
        "provenance": c.attrs.get("provenance"),
    }
