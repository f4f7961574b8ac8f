"""An FC file as sent (:class:`FCFile`), its format, and what it holds (:class:`ImportedFC`).

Formats (:data:`FORMATS`):

``phonopy``
    ``phonopy.yaml`` / ``phonopy_params.yaml`` with ``force_constants`` or a displacement
    dataset with forces inside, or with ``FORCE_CONSTANTS`` / ``FORCE_SETS`` beside it;
    Born charges from the YAML or a ``BORN`` beside it
    (:mod:`model_server.prediction.fc_import.phonopy_files`).
``castep_bin``
    A CASTEP ``.castep_bin`` / ``.check`` with force constants (and Born charges)
    (:mod:`model_server.prediction.fc_import.castep_bin`).

Without a format it is told from the content (CASTEP's Fortran records, phonopy's YAML
keys), then from the file name.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from model_server.exceptions import FCImportError
from model_server.prediction.crystal_fc import CrystalFC
from model_server.prediction.fc_import.castep_bin import is_castep_bin, read_castep_bin
from model_server.prediction.fc_import.phonopy_files import EXTRA_FILES, read_phonopy

__all__ = ["FORMATS", "MAX_FC_FILE_BYTES", "FCFile", "ImportedFC", "detect_format", "read_fc_file"]

#: The formats an FC file may have.
FORMATS = ("phonopy", "castep_bin")
#: Largest FC file (and every file beside it), bytes. The API's body limit applies first.
MAX_FC_FILE_BYTES = 32 * 1024 * 1024

_PHONOPY_KEYS = (b"unit_cell:", b"primitive_cell:", b"supercell_matrix:", b"phonopy:")


@dataclass(frozen=True, slots=True, kw_only=True)
class FCFile:
    """An FC file to import, as the API or the CLI received it.

    Attributes
    ----------
    data
        The file's bytes.
    filename
        Its name (shown in the answer; also a hint to the format), or ``None``.
    format
        One of :data:`FORMATS`, or ``None``: told from the content.
    extras
        Files beside a phonopy YAML by role: ``force_constants`` (``FORCE_CONSTANTS``),
        ``force_sets`` (``FORCE_SETS``), ``born`` (``BORN``).
    nac
        Apply the non-analytic (LO-TO) term when the file has Born charges.
    """

    data: bytes
    filename: str | None = None
    format: str | None = None
    extras: Mapping[str, bytes] = field(default_factory=dict)
    nac: bool = True

    @property
    def sha256(self) -> str:
        """SHA-256 of the file and the files beside it (hex)."""
        h = hashlib.sha256(self.data)
        for key in sorted(self.extras):
            h.update(key.encode() + b"\0" + self.extras[key])
        h.update(b"nac" if self.nac else b"no-nac")
        return h.hexdigest()

    @property
    def label(self) -> str:
        """``imported <name> (<12 hex digits>)``."""
        return f"imported {self.filename or self.format or 'file'} ({self.sha256[:12]})"


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportedFC:
    """The FCs of a file on the file's own (primitive) cell, and where they came from.

    Attributes
    ----------
    fcs
        Per-pair FCs (Angstrom, eV/Angstrom^2, amu), with the non-analytic term when the
        file has Born charges.
    format
        One of :data:`FORMATS`.
    meta
        ``filename``, ``format``, ``sha256``, ``bytes``, ``calculator``,
        ``supercell_matrix``, ``n_supercell_atoms``, ``fc_from``.
    """

    fcs: CrystalFC
    format: str
    meta: dict[str, Any]


def detect_format(data: bytes, filename: str | None = None) -> str:
    """The format of an FC file's content (then of its name).

    Raises
    ------
    FCImportError
        Neither a CASTEP binary nor a phonopy YAML.
    """
    if is_castep_bin(data):
        return "castep_bin"
    head = data[:20000]
    if any(key in head for key in _PHONOPY_KEYS):
        return "phonopy"
    name = (filename or "").lower()
    if name.endswith((".castep_bin", ".check")):
        return "castep_bin"
    if name.endswith((".yaml", ".yml")):
        return "phonopy"
    raise FCImportError(
        "cannot tell the FC file's format: it is neither a phonopy YAML (phonopy.yaml, "
        "phonopy_params.yaml with unit_cell) nor a CASTEP binary (.castep_bin); give "
        f"format as one of {', '.join(FORMATS)}"
    )


_CACHE: OrderedDict[str, tuple[CrystalFC, dict[str, Any]]] = OrderedDict()
_CACHE_SIZE = 8


def read_fc_file(spec: FCFile) -> ImportedFC:
    """Read an FC file (cached by its content).

    Raises
    ------
    FCImportError
        Too large, an unknown format, not readable, without force constants (the message
        says which and what to send instead).
    """
    for name, content in {"the FC file": spec.data, **spec.extras}.items():
        if len(content) > MAX_FC_FILE_BYTES:
            raise FCImportError(
                f"{name} has {len(content)} bytes, more than the {MAX_FC_FILE_BYTES} read"
            )
    if not spec.data:
        raise FCImportError("the FC file is empty")
    unknown = sorted(set(spec.extras) - set(EXTRA_FILES))
    if unknown:
        raise FCImportError(
            f"unknown files beside the FC file: {unknown}; known: {', '.join(EXTRA_FILES)}"
        )
    fmt = spec.format or detect_format(spec.data, spec.filename)
    if fmt not in FORMATS:
        raise FCImportError(f"unknown FC file format {fmt!r}; known: {', '.join(FORMATS)}")
    key = spec.sha256 + fmt
    if key in _CACHE:
        _CACHE.move_to_end(key)
        cached = _CACHE[key]
    else:
        cached = _read(spec, fmt)
        _CACHE[key] = cached
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    fcs, meta = cached
    return ImportedFC(
        fcs=fcs,
        format=fmt,
        meta={
            "filename": spec.filename,
            "format": fmt,
            "sha256": spec.sha256,
            "bytes": len(spec.data),
            "beside": sorted(spec.extras),
            **meta,
        },
    )


def _read(spec: FCFile, fmt: str) -> tuple[CrystalFC, dict[str, Any]]:
    """The FCs and what the reader says of them."""
    if fmt == "castep_bin":
        if spec.extras:
            raise FCImportError("files beside the FC file are read only for phonopy")
        return read_castep_bin(spec.data, nac=spec.nac)
    try:
        text = spec.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FCImportError(
            f"the phonopy file is not UTF-8 text (byte {exc.start}); send the YAML uncompressed"
        ) from exc
    return read_phonopy(text, spec.extras, nac=spec.nac)
