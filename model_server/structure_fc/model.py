"""Structure -> force constants: the frozen e3nn model and its prediction API.

``load_fc_model().predict(numbers, lattice, frac)`` gives the harmonic force constants of
any ordered crystal whose elements the model knows, as per-bond 3x3 blocks (the FC
database's convention, ``simulations.fcdb.database``), with a measure of how far the crystal is from
the training set.

* The network is :class:`model_server.structure_fc.network.FCNet` (equivariant message passing with
  e3nn; bond tensors from irreps 0e + 1e + 2e; pair symmetry and the acoustic sum rule exact
  by construction, so the output carries the crystal's symmetry). The model is an ensemble
  of a few members trained with different seeds; the prediction is their mean and
  ``spread`` their standard deviation.
* Inference runs in float64 (the networks are built with float64 Clebsch-Gordan
  coefficients; trained float32 weights are loaded into them).
* **Distance from the training set**: each atom's rotation-invariant neighbourhood
  descriptor (:func:`model_server.structure_fc.graph.atom_descriptors`: Gaussian-smeared radial
  distributions of its neighbours, counted and weighted by covalent radius), standardised
  with the training atoms' mean and std; its Euclidean distance to the nearest training atom
  *of the same element*; the structure's distance is the largest over its atoms, divided by
  the 95th percentile of the same quantity for the training crystals computed
  leave-one-crystal-out (so ~1 is the edge of the training set). ``in_domain`` is
  ``distance <= max_distance`` and relative ensemble spread ``||std|| / ||mean||`` (all
  blocks) ``<= max_spread`` (thresholds in model.json).

Layout of the model directory (default ``models/fc_e3nn``)::

    model.json    format version, network hyper-parameters (NetConfig), known elements,
                  members, distance calibration and thresholds, training settings and
                  history, training-set provenance and fingerprint, evaluation metrics,
                  the rebuild command
    weights.pt    parameters of every member (float32), the training atoms' standardised
                  descriptors and elements (torch.load(weights_only=True): no pickled code)

Command line: ``steer fcmodel train|evaluate ...`` (training in
:mod:`model_server.structure_fc.train`, evaluation in :mod:`model_server.structure_fc.evaluation`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from model_server.exceptions import ArtifactError
from model_server.structure_fc.graph import (
    MAX_ATOMS,
    CellTooLargeError,
    FCModelError,
    InvalidStructureError,
    PeriodicGraph,
    UnknownElementError,
    atom_descriptors,
    build_graph,
    check_structure,
)
from model_server.structure_fc.network import FCNet, NetConfig, collate

__all__ = [
    "FORMAT_VERSION",
    "MAX_ATOMS",
    "CellTooLargeError",
    "FCModel",
    "FCModelError",
    "FCPrediction",
    "InvalidStructureError",
    "UnknownElementError",
    "build_net",
    "default_model_dir",
    "load_fc_model",
    "save_fc_model",
]

#: Version of the model directory's layout and model.json keys.
FORMAT_VERSION = 1


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return str(chemical_symbols[z]) if 0 < z < len(chemical_symbols) else f"Z={z}"


@dataclass(frozen=True, slots=True, kw_only=True)
class FCPrediction:
    """Predicted force constants of one crystal.

    Attributes
    ----------
    pairs
        (m, 5) int, ``(i, j, n1, n2, n3)``: atom ``i`` of the home cell to atom ``j`` of the
        cell at lattice vector ``n``; the self terms ``(i, i, 0, 0, 0)`` come first, then every
        bond up to the model's cutoff (both directions).
    fc
        (m, 3, 3) float, eV/A^2, ``Phi_ab(i0, jR)``; ``Phi(i0, jR) == Phi(j0, i(-R)).T`` and
        the self term is minus the sum of the atom's bonds (acoustic sum rule), exactly.
    distance
        Distance from the training set (see the module docstring): ~1 is its edge.
    spread
        (m, 3, 3) float, eV/A^2, standard deviation over the ensemble members (``None`` for a
        single-member model).
    in_domain
        ``distance`` and the relative spread are below the model's thresholds.
    message
        Empty when in domain; otherwise a sentence saying why the prediction is not to be
        trusted.
    relative_spread
        ``||spread|| / ||fc||`` over all blocks (0 for a single member).
    """

    pairs: NDArray[np.int64]
    fc: NDArray[np.float64]
    distance: float
    spread: NDArray[np.float64] | None
    in_domain: bool
    message: str
    relative_spread: float = 0.0


def build_net(config: NetConfig, dtype: torch.dtype = torch.float64) -> FCNet:
    """Build an :class:`FCNet` whose constants (Clebsch-Gordan, change of basis) are in
    ``dtype`` (e3nn computes them in the default dtype at construction)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        net = FCNet(config)
    finally:
        torch.set_default_dtype(previous)
    return net.to(dtype).eval()


def parameters_of(net: FCNet) -> dict[str, torch.Tensor]:
    """The trainable parameters of a network (float32 copies): what weights.pt stores."""
    return {k: v.detach().to(torch.float32).clone() for k, v in net.named_parameters()}


def _load_parameters(net: FCNet, params: dict[str, torch.Tensor], where: Path) -> None:
    names = {k for k, _ in net.named_parameters()}
    if set(params) != names:
        missing, extra = sorted(names - set(params)), sorted(set(params) - names)
        raise ArtifactError(
            f"{where}: weights do not match the network in model.json "
            f"(missing {missing[:5]}, unexpected {extra[:5]}); rebuild the model"
        )
    try:
        net.load_state_dict(params, strict=False)
    except RuntimeError as e:
        raise ArtifactError(f"{where}: weights do not fit the network: {e}") from e


class FCModel:
    """A loaded structure -> force-constant model (an ensemble of :class:`FCNet`).

    Use :func:`load_fc_model`; then :meth:`predict`.
    """

    def __init__(
        self,
        *,
        path: Path | None,
        meta: dict[str, Any],
        nets: Sequence[FCNet],
        bank: NDArray[np.float64],
        bank_species: NDArray[np.int64],
    ) -> None:
        self.path = path
        self.meta = meta
        self.config = NetConfig.from_json(meta["config"])
        self.nets = list(nets)
        dist = meta["distance"]
        self._mean = np.asarray(dist["descriptor_mean"], dtype=np.float64)
        self._std = np.asarray(dist["descriptor_std"], dtype=np.float64)
        self._scale = float(dist["scale"])
        self.max_distance = float(dist["max_distance"])
        self.max_spread = float(dist["max_relative_spread"])
        bank_t = torch.from_numpy(np.asarray(bank, dtype=np.float64))
        species_arr = np.asarray(bank_species, dtype=np.int64)
        self._bank = {int(z): bank_t[species_arr == z] for z in np.unique(species_arr)}
        self._index = {z: k for k, z in enumerate(self.config.species)}

    @property
    def species(self) -> tuple[int, ...]:
        """Atomic numbers the model knows."""
        return self.config.species

    @property
    def elements(self) -> list[str]:
        """Element symbols the model knows."""
        return [_symbol(z) for z in self.config.species]

    @property
    def cutoff(self) -> float:
        """Bond cutoff, Angstrom (bonds beyond it get no force constant)."""
        return self.config.cutoff

    @property
    def version(self) -> str:
        """``fc_e3nn-<12 hex digits of the weights' SHA-256>`` (or ``fc_e3nn-untrained``)."""
        return str(self.meta.get("version", "fc_e3nn-untrained"))

    def check(self, numbers: ArrayLike, lattice: ArrayLike, frac: ArrayLike) -> None:
        """Raise the errors :meth:`predict` would raise for this input, without predicting."""
        z, _, _ = check_structure(numbers, lattice, frac, max_atoms=MAX_ATOMS)
        unknown = sorted({int(v) for v in z} - set(self.config.species))
        if unknown:
            names = ", ".join(f"{_symbol(v)} (Z={v})" for v in unknown)
            raise UnknownElementError(
                f"the force-constant model has no embedding for {names}: it was trained only "
                f"on {', '.join(self.elements)}. Give force constants explicitly for this "
                "crystal, or retrain with a database that contains the element"
            )

    def predict(self, numbers: ArrayLike, lattice: ArrayLike, frac: ArrayLike) -> FCPrediction:
        """Predict the force constants of a crystal.

        Parameters
        ----------
        numbers
            (n,) int, atomic numbers of the primitive cell (n <= :data:`MAX_ATOMS`).
        lattice
            (3, 3) float, Angstrom, rows are the lattice vectors.
        frac
            (n, 3) float, fractional coordinates.

        Returns
        -------
        FCPrediction

        Raises
        ------
        UnknownElementError
            An element the model was not trained on (the message lists the known ones).
        CellTooLargeError
            More than :data:`MAX_ATOMS` atoms.
        InvalidStructureError
            NaN/inf, wrong shapes, a degenerate lattice, overlapping atoms, an atom without
            neighbours within the cutoff.
        """
        self.check(numbers, lattice, frac)
        z, lat, x = check_structure(numbers, lattice, frac)
        graph = build_graph(z, lat, x, self.config.cutoff)
        batch = collate([graph], self._index, torch.float64)
        bonds, selfs = [], []
        with torch.no_grad():
            for net in self.nets:
                bond, self_fc, _ = net(batch)
                bonds.append(bond.numpy())
                selfs.append(self_fc.numpy())
        n = graph.n_atoms
        self_pairs = np.column_stack([np.arange(n), np.arange(n), np.zeros((n, 3))])
        pairs = np.concatenate([self_pairs.astype(np.int64), graph.pairs])
        members = np.stack([np.concatenate([s, b]) for s, b in zip(selfs, bonds, strict=True)])
        fc = members.mean(axis=0)
        spread = members.std(axis=0) if len(members) > 1 else None
        rel = (
            float(np.linalg.norm(spread)) / max(float(np.linalg.norm(fc)), 1e-12)
            if spread is not None
            else 0.0
        )
        distance = self.distance(graph)
        problems = []
        if distance > self.max_distance:
            problems.append(
                f"the structure is far from the training set (distance {distance:.2f}, "
                f"edge of the training set ~1, limit {self.max_distance:g})"
            )
        if rel > self.max_spread:
            problems.append(
                f"the ensemble members disagree (relative spread {rel:.3f} > {self.max_spread:g})"
            )
        message = ""
        if problems:
            message = (
                "Out of the model's domain: "
                + "; ".join(problems)
                + ". The predicted force constants and spectra are extrapolations, not to be "
                "trusted quantitatively."
            )
        return FCPrediction(
            pairs=pairs,
            fc=fc,
            distance=distance,
            spread=spread,
            in_domain=not problems,
            message=message,
            relative_spread=rel,
        )

    def distance(self, graph: PeriodicGraph) -> float:
        """Normalised distance of a structure (its bond graph) from the training set."""
        d = torch.from_numpy((atom_descriptors(graph) - self._mean) / self._std)
        worst = 0.0
        for i, z in enumerate(graph.numbers.tolist()):
            bank = self._bank.get(int(z))
            if bank is None or len(bank) == 0:
                return math.inf
            worst = max(worst, float(torch.cdist(d[i : i + 1], bank).min()))
        return worst / self._scale


def default_model_dir() -> Path:
    """Where :func:`load_fc_model` looks by default.

    ``$STEER_FC_MODEL`` if set, else ``$STEER_MODEL_DIR/fc_e3nn`` if set, else
    ``models/fc_e3nn`` of the source tree.
    """
    if os.environ.get("STEER_FC_MODEL"):
        return Path(os.environ["STEER_FC_MODEL"])
    if os.environ.get("STEER_MODEL_DIR"):
        return Path(os.environ["STEER_MODEL_DIR"]) / "fc_e3nn"
    return Path(__file__).resolve().parents[2] / "models" / "fc_e3nn"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_fc_model(
    out: str | Path,
    *,
    nets: Sequence[FCNet],
    bank: NDArray[np.float64],
    bank_species: NDArray[np.int64],
    meta: dict[str, Any],
) -> Path:
    """Write a model directory (weights.pt, then model.json with the weights' version).

    ``meta`` must hold ``config`` (NetConfig.to_json()) and ``distance`` (descriptor mean,
    std, scale and thresholds); everything else (provenance, metrics) is stored as given.
    """
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {f"member{k}": parameters_of(net) for k, net in enumerate(nets)}
    state["bank"] = torch.from_numpy(np.asarray(bank, dtype=np.float32))
    state["bank_species"] = torch.from_numpy(np.asarray(bank_species, dtype=np.int64))
    torch.save(state, path / "weights.pt")
    full = dict(meta)
    full["format_version"] = FORMAT_VERSION
    full["members"] = len(nets)
    full["version"] = "fc_e3nn-" + _sha256(path / "weights.pt")[:12]
    (path / "model.json").write_text(json.dumps(full, indent=1) + "\n")
    _load_cached.cache_clear()
    return path


def load_fc_model(path: str | Path | None = None) -> FCModel:
    """Load a frozen structure -> force-constant model.

    Parameters
    ----------
    path
        Model directory; ``None``: :func:`default_model_dir`.

    Raises
    ------
    ArtifactError
        Missing, incomplete or damaged directory (the message says how to rebuild it).
    """
    where = Path(path) if path is not None else default_model_dir()
    return _load_cached(str(where.resolve()))


@lru_cache(maxsize=4)
def _load_cached(where_s: str) -> FCModel:
    where = Path(where_s)
    rebuild = f"rebuild it with `steer fcmodel train --out {where}` (see docs/fc_e3nn.md)"
    meta_path, weights_path = where / "model.json", where / "weights.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise ArtifactError(
            f"no structure -> force-constant model in {where} (need model.json and "
            f"weights.pt); {rebuild}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{meta_path}: format version {meta.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; {rebuild}"
            )
        config = NetConfig.from_json(meta["config"])
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        # the members share one architecture: build it once (e3nn generates and optimises
        # the code of every tensor product, most of the load time) and copy it
        template = build_net(config, torch.float64)
        members = int(meta["members"])
        nets = [template, *(copy.deepcopy(template) for _ in range(members - 1))]
        for k, net in enumerate(nets):
            _load_parameters(net, state[f"member{k}"], weights_path)
        bank = state["bank"].to(torch.float64).numpy()
        bank_species = state["bank_species"].numpy()
        return FCModel(path=where, meta=meta, nets=nets, bank=bank, bank_species=bank_species)
    except ArtifactError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ArtifactError(f"damaged model directory {where}: {e!r}; {rebuild}") from e
