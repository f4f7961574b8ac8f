"""Imported force constants: phonopy's and CASTEP's files as an FC source of predictions.

``files``
    :class:`FCFile` (a file as sent), :func:`detect_format`, :func:`read_fc_file` ->
    :class:`ImportedFC` (per-pair FCs on the file's primitive cell, with the non-analytic
    term when the file has Born charges).
``phonopy_files``, ``castep_bin``
    The readers (phonopy's parsers; Euphonic's CASTEP reader in a child process).
``align``
    :func:`align_to_crystal`: the FCs on a shipped material's or a CIF's cell (another
    primitive choice, orientation, origin, atom order or a lattice constant a few per cent
    off), or an error that says how the file's structure differs.

How they are used in a prediction: :mod:`model_server.prediction.fc_choice` and
docs/predict.md ("Imported force constants").
"""

from model_server.exceptions import FCImportError
from model_server.prediction.fc_import.align import Alignment, align_to_crystal
from model_server.prediction.fc_import.files import (
    FORMATS,
    MAX_FC_FILE_BYTES,
    FCFile,
    ImportedFC,
    detect_format,
    read_fc_file,
)

__all__ = [
    "FORMATS",
    "MAX_FC_FILE_BYTES",
    "Alignment",
    "FCFile",
    "FCImportError",
    "ImportedFC",
    "align_to_crystal",
    "detect_format",
    "read_fc_file",
]
