"""Training and evaluation of the structure -> force-constant e3nn model.

Command line (``python -m model_server.structure_fc.model ...``)::

    train     --db PATH --out DIR --epochs N --seed S [--members K] [--resume] ...
    evaluate  --db PATH --model DIR [--split test] [--json]

**Data.** Entries of the FC database (``simulations.fcdb.database.load_database``): primitive cell,
per-pair 3x3 force constants (eV/A^2, self terms included) and a train/val/test split by
crystal. For each entry the model's bond graph (cutoff ``NetConfig.cutoff``) is built and the
database's blocks are matched to its bonds by ``(i, j, n1, n2, n3)``; a model bond that the
database does not list is a zero target when it is shorter than the entry's longest
listed bond, and unweighted otherwise (beyond the database's cutoff: unknown).

**Loss** (per crystal, then averaged over the batch), relative so that soft and stiff
crystals count alike::

    L_c = sum |Phi_pred - Phi_db|^2 / sum |Phi_db|^2                  (bonds and self terms)
        + w_dyn * sum_q |D_pred(q) - D_db(q)|^2 / sum_q |D_db(q)|^2

with ``D(q)`` the mass-weighted dynamical matrix (:mod:`simulations.lattice.pair_phonons`) on the
2x2x2 Gamma-centred mesh plus 4 seeded random q-points; ``D_db`` uses every database pair.

**Optimiser.** AdamW (decoupled weight decay 0.05), cosine learning-rate decay over the
epochs, gradient-norm clipping at 10; each member has its own seed (``seed + k``); the
weights kept are those of the epoch with the lowest validation loss. A checkpoint
(``<out>/checkpoint.pt``: member, epoch, parameters, optimiser, best so far) is written
after every epoch; ``--resume`` continues from it.

**Distance calibration** (after training): see :mod:`model_server.structure_fc.model`.

**Evaluation** (:func:`evaluate`): for every entry of a split, the DOS from the predicted
force constants against the DOS from the database's, both from
:func:`simulations.lattice.pair_phonons.mesh_frequencies` on a 10x10x10 Gamma-centred mesh, the same
energy points (every 0.1 meV from -20 meV to 1.2 x the highest frequency of either plus
5 meV) and the same Gaussian broadening (sigma 1 meV): cosine similarity, the mean
frequency over all modes of the mesh (imaginary ones negative), and whether the predicted
set is dynamically stable (lowest frequency on the mesh >= -:data:`STABILITY_TOL_THZ`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.exceptions import ModelServerError, TrainingError
from model_server.structure_fc.graph import (
    PeriodicGraph,
    atom_descriptors,
    build_graph,
    match_pairs,
)
from model_server.structure_fc.model import (
    FCModel,
    build_net,
    load_fc_model,
    parameters_of,
    save_fc_model,
)
from model_server.structure_fc.network import (
    FCNet,
    GraphBatch,
    NetConfig,
    collate,
    element_features,
)
from simulations.exceptions import SimulationError
from simulations.lattice.pair_phonons import (
    dos_histogram,
    dynamical_matrices,
    mesh_frequencies,
)
from simulations.provenance import git_commit, host
from simulations.units import THZ_TO_MEV

__all__ = [
    "STABILITY_TOL_THZ",
    "FCSample",
    "TrainSettings",
    "cli",
    "dos_metrics",
    "evaluate",
    "reference_samples",
    "train",
]

logger = logging.getLogger(__name__)

#: A predicted FC set is "dynamically stable" when no frequency on the evaluation mesh is
#: below -STABILITY_TOL_THZ (THz): numerical noise of the acoustic branches near Gamma.
STABILITY_TOL_THZ = 0.05
#: DOS comparison: Gaussian sigma (meV), energy step (meV), lowest energy (meV), mesh.
DOS_SIGMA_MEV = 1.0
DOS_STEP_MEV = 0.1
DOS_EMIN_MEV = -20.0
EVAL_MESH = (10, 10, 10)
#: Entries whose largest force constant is below this (eV/A^2) carry no information (a force
#: field that gave no forces at all): left out of training and evaluation, and listed.
MIN_FC = 1e-3
#: Floor of the per-crystal loss normalisation, eV/A^2 per tensor component.
LOSS_FLOOR = 0.02


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


# --------------------------------------------------------------------------------------
# Prepared data


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """An entry with its graph and its targets aligned to the graph's bonds."""

    name: str
    key: str
    split: str
    graph: PeriodicGraph
    target_bond: NDArray[np.float64]  # (E, 3, 3) eV/A^2
    weight_bond: NDArray[np.float64]  # (E,) 1 or 0
    target_self: NDArray[np.float64]  # (n, 3, 3)
    cos: NDArray[np.float64]  # (Q, E) phases of the graph's bonds
    sin: NDArray[np.float64]
    mass_bond: NDArray[np.float64]  # (E,) 1/sqrt(m_i m_j)
    mass_self: NDArray[np.float64]  # (n,) 1/m_i
    target_dyn: NDArray[np.float64]  # (2, Q, n*n, 9) real, imag of D_db(q) by atom pair


def _qpoints(seed: int = 12345) -> NDArray[np.float64]:
    mesh = np.stack(np.meshgrid([0.0, 0.5], [0.0, 0.5], [0.0, 0.5], indexing="ij"), -1)
    rand = np.random.default_rng(seed).random((4, 3)) - 0.5
    return np.concatenate([mesh.reshape(-1, 3), rand])


def prepare(entry: FCSampleLike, cutoff: float) -> Prepared:
    """Build the graph of an entry and align its force constants to the graph's bonds."""
    from simulations.lattice.pair_phonons import atomic_masses

    g = build_graph(entry.numbers, entry.lattice, entry.frac, cutoff)
    pairs = np.asarray(entry.pairs, dtype=np.int64)
    fc = np.asarray(entry.fc, dtype=np.float64)
    is_self = (pairs[:, 0] == pairs[:, 1]) & np.all(pairs[:, 2:5] == 0, axis=1)
    n = g.n_atoms
    target_self = np.zeros((n, 3, 3))
    target_self[pairs[is_self, 0]] = fc[is_self]
    bonds, bond_fc = pairs[~is_self], fc[~is_self]
    where = match_pairs(g.pairs, bonds)
    target = np.zeros((len(g.pairs), 3, 3))
    target[where[where >= 0]] = bond_fc[where >= 0]
    vec = (entry.frac[bonds[:, 1]] + bonds[:, 2:5] - entry.frac[bonds[:, 0]]) @ entry.lattice
    longest = float(np.linalg.norm(vec, axis=1).max()) if len(vec) else 0.0
    listed = np.zeros(len(g.pairs), dtype=bool)
    listed[where[where >= 0]] = True
    weight = np.where(listed | (g.lengths < longest - 1e-3), 1.0, 0.0)
    q = _qpoints()
    shift = g.pairs[:, 2:5] + g.frac[g.pairs[:, 1]] - g.frac[g.pairs[:, 0]]
    arg = 2 * np.pi * q @ shift.T
    m = atomic_masses(g.numbers)
    d = dynamical_matrices(g.numbers, g.frac, pairs, fc, q, masses=m)  # (Q, 3n, 3n)
    d = d.reshape(len(q), n, 3, n, 3).transpose(0, 1, 3, 2, 4).reshape(len(q), n * n, 9)
    return Prepared(
        name=entry.name,
        key=crystal_key(entry),
        split=entry.split,
        graph=g,
        target_bond=target,
        weight_bond=weight,
        target_self=target_self,
        cos=np.cos(arg),
        sin=np.sin(arg),
        mass_bond=1.0 / np.sqrt(m[g.pairs[:, 0]] * m[g.pairs[:, 1]]),
        mass_self=1.0 / m,
        target_dyn=np.stack([d.real, d.imag]),
    )


@dataclass(frozen=True, slots=True)
class _Targets:
    bond: torch.Tensor
    weight: torch.Tensor
    self_fc: torch.Tensor
    per_crystal: list[dict[str, torch.Tensor]]


def _targets(items: Sequence[Prepared], dtype: torch.dtype) -> _Targets:
    def t(a: NDArray[np.float64]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    per = []
    for p in items:
        n = p.graph.n_atoms
        per.append(
            {
                "cos": t(p.cos),
                "sin": t(p.sin),
                "flat": torch.from_numpy(p.graph.pairs[:, 0] * n + p.graph.pairs[:, 1]),
                "mass_bond": t(p.mass_bond),
                "mass_self": t(p.mass_self),
                "dyn": t(p.target_dyn),
            }
        )
    return _Targets(
        bond=t(np.concatenate([p.target_bond for p in items])),
        weight=t(np.concatenate([p.weight_bond for p in items])),
        self_fc=t(np.concatenate([p.target_self for p in items])),
        per_crystal=per,
    )


def batch_loss(
    net: FCNet,
    batch: GraphBatch,
    targets: _Targets,
    w_dyn: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the batch of the per-crystal relative losses; returns (loss, per-crystal)."""
    bond, self_fc, _ = net(batch)
    losses = []
    for c in range(batch.n_crystals):
        e0, e1 = int(batch.edge_offsets[c]), int(batch.edge_offsets[c + 1])
        a0, a1 = int(batch.atom_offsets[c]), int(batch.atom_offsets[c + 1])
        w = targets.weight[e0:e1, None, None]
        tb, ts = targets.bond[e0:e1], targets.self_fc[a0:a1]
        num = (w * (bond[e0:e1] - tb) ** 2).sum() + ((self_fc[a0:a1] - ts) ** 2).sum()
        # Floor: (LOSS_FLOOR eV/A^2)^2 per component, so a very soft crystal cannot dominate.
        den = (w * tb**2).sum() + (ts**2).sum() + LOSS_FLOOR**2 * 9 * (a1 - a0)
        loss = num / den
        if w_dyn > 0:
            pc = targets.per_crystal[c]
            n = a1 - a0
            wb = (bond[e0:e1] * pc["mass_bond"][:, None, None]).reshape(-1, 9)
            ws = (self_fc[a0:a1] * pc["mass_self"][:, None, None]).reshape(-1, 9)
            diag = torch.arange(n) * (n + 1)
            parts = []
            for trig in (pc["cos"], pc["sin"]):
                contrib = trig[:, :, None] * wb[None]  # (Q, E, 9)
                d = torch.zeros(trig.shape[0], n * n, 9, dtype=wb.dtype)
                d = d.index_add(1, pc["flat"], contrib)
                parts.append(d)
            parts[0] = parts[0].index_add(1, diag, ws[None].expand(parts[0].shape[0], -1, -1))
            pred = torch.stack(parts)
            loss = loss + w_dyn * ((pred - pc["dyn"]) ** 2).sum() / ((pc["dyn"] ** 2).sum() + 1e-12)
        losses.append(loss)
    per = torch.stack(losses)
    return per.mean(), per


# --------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainSettings:
    """Training hyper-parameters (stored in model.json)."""

    epochs: int = 30
    seed: int = 0
    members: int = 3
    batch_size: int = 8
    lr: float = 3e-3
    lr_final: float = 1e-4
    w_dyn: float = 1.0
    clip: float = 10.0
    cutoff: float = 6.0
    n_layers: int = 3
    n_scalar: int = 32
    n_pseudo: int = 8
    n_vector: int = 8
    n_tensor: int = 6
    lmax: int = 2
    n_radial: int = 8
    radial_hidden: int = 32
    element_features: bool = True
    weight_decay: float = 0.05
    max_distance: float = 1.0
    max_relative_spread: float = 0.0  # 0: calibrated on the validation split
    max_steps: int = 0  # 0: no limit (tests: a few steps)
    threads: int = 1  # torch threads (process-wide); 1 is fastest on a shared machine


@dataclass
class _Progress:
    member: int = 0
    epoch: int = 0
    best: float = math.inf
    best_epoch: int = -1
    history: list[list[dict[str, float]]] = field(default_factory=list)
    seconds: float = 0.0


def _net_config(settings: TrainSettings, train: Sequence[Prepared]) -> NetConfig:
    species = sorted({int(z) for p in train for z in p.graph.numbers})
    n_atoms = sum(p.graph.n_atoms for p in train)
    n_bonds = sum(len(p.graph.pairs) for p in train)
    rms = math.sqrt(
        sum(float((p.target_bond**2).sum()) for p in train)
        / max(sum(9 * int((p.weight_bond > 0).sum()) for p in train), 1)
    )
    return NetConfig(
        species=tuple(species),
        cutoff=settings.cutoff,
        n_layers=settings.n_layers,
        n_scalar=settings.n_scalar,
        n_pseudo=settings.n_pseudo,
        n_vector=settings.n_vector,
        n_tensor=settings.n_tensor,
        lmax=settings.lmax,
        n_radial=settings.n_radial,
        radial_hidden=settings.radial_hidden,
        avg_neighbours=round(n_bonds / max(n_atoms, 1), 3),
        fc_scale=round(rms, 6),
        species_features=(
            tuple(element_features(z) for z in species) if settings.element_features else ()
        ),
    )


def _evaluate_loss(
    net: FCNet, items: Sequence[Prepared], index: dict[int, int], w_dyn: float, bs: int
) -> float:
    if not items:
        return math.nan
    net.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(items), bs):
            chunk = items[start : start + bs]
            batch = collate([p.graph for p in chunk], index)
            _, per = batch_loss(net, batch, _targets(chunk, torch.float32), w_dyn)
            total += float(per.sum())
    return total / len(items)


def train(
    entries: Sequence[FCSampleLike],
    out: str | Path,
    settings: TrainSettings,
    *,
    resume: bool = False,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the ensemble on the ``train`` split, calibrate the distance, save the model.

    Parameters
    ----------
    entries
        Database entries (every split; ``train`` for fitting, ``val`` for model selection
        and the spread threshold).
    out
        Model directory to write (``checkpoint.pt`` is kept there while training).
    settings
        Hyper-parameters.
    resume
        Continue from ``<out>/checkpoint.pt``.
    progress
        Show a tqdm progress bar on stderr.
    provenance
        Extra facts to store (database path, command...).
    stop_after
        Stop after this many epochs in all (counting every member), leaving only the
        checkpoint, as a crash would (for tests of ``resume``).

    Returns
    -------
    The model.json contents written (empty when stopped by ``stop_after``).
    """
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, settings.threads))
    t_start = time.perf_counter()
    empty = sorted(e.name for e in entries if float(np.abs(e.fc).max()) < MIN_FC)
    if empty:
        logger.warning("left out %d entries without force constants: %s", len(empty), empty)
    entries = [e for e in entries if e.name not in set(empty)]
    train_e = [e for e in entries if e.split == "train"]
    val_e = [e for e in entries if e.split == "val"]
    if not train_e:
        raise TrainingError("no entries with split 'train' to fit the model on")
    train_p = [prepare(e, settings.cutoff) for e in train_e]
    config = _net_config(settings, train_p)
    index = {z: k for k, z in enumerate(config.species)}
    val_p = [prepare(e, settings.cutoff) for e in val_e if set(e.numbers.tolist()) <= set(index)]
    logger.info(
        "prepared %d train / %d val crystals in %.1f s; %d elements, %.1f bonds per atom",
        len(train_p),
        len(val_p),
        time.perf_counter() - t_start,
        len(config.species),
        config.avg_neighbours,
    )
    ckpt_path = out / "checkpoint.pt"
    state = _Progress()
    members: list[dict[str, torch.Tensor]] = []
    resumed: dict[str, Any] | None = None
    if resume and ckpt_path.is_file():
        resumed = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if resumed.get("config") != json.dumps(config.to_json(), sort_keys=True):
            raise TrainingError(
                f"{ckpt_path} was written for other data or settings; remove it or train "
                "without --resume"
            )
        members = list(resumed["members"])
        state = _Progress(
            member=int(resumed["member"]),
            epoch=int(resumed["epoch"]),
            best=float(resumed["best"]),
            best_epoch=int(resumed["best_epoch"]),
            history=json.loads(resumed["history"]),
            seconds=float(resumed["seconds"]),
        )
    steps_per_epoch = math.ceil(len(train_p) / settings.batch_size)
    if settings.max_steps:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps)
    total = settings.members * settings.epochs
    bar = tqdm(
        total=total,
        initial=state.member * settings.epochs + state.epoch,
        desc="fc_e3nn",
        unit="epoch",
        disable=not progress,
        file=sys.stderr,
    )
    t_run = time.perf_counter() - state.seconds
    while state.member < settings.members:
        k = state.member
        torch.manual_seed(settings.seed + k)
        net = build_net(config, torch.float32).train()
        opt = torch.optim.AdamW(
            net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(settings.epochs, 1), eta_min=settings.lr_final
        )
        best_params = parameters_of(net)
        if resumed is not None and int(resumed["member"]) == k and state.epoch > 0:
            net.load_state_dict(resumed["net"], strict=False)
            opt.load_state_dict(resumed["opt"])
            sched.load_state_dict(resumed["sched"])
            best_params = dict(resumed["best_params"])
        else:
            state.epoch, state.best, state.best_epoch = 0, math.inf, -1
            state.history.append([])
        resumed = None
        while state.epoch < settings.epochs:
            net.train()
            # One generator per (member, epoch): a resumed run draws the same batches.
            rng = np.random.default_rng([settings.seed, k, state.epoch])
            order = rng.permutation(len(train_p))
            running = 0.0
            for s in range(steps_per_epoch):
                chunk = [
                    train_p[i] for i in order[s * settings.batch_size :][: settings.batch_size]
                ]
                batch = collate([p.graph for p in chunk], index)
                loss, _ = batch_loss(net, batch, _targets(chunk, torch.float32), settings.w_dyn)
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip)
                opt.step()
                running += float(loss.detach())
            sched.step()
            train_loss = running / steps_per_epoch
            val_loss = _evaluate_loss(net, val_p, index, settings.w_dyn, 16)
            select = val_loss if val_p else train_loss
            if select < state.best:
                state.best, state.best_epoch = select, state.epoch
                best_params = parameters_of(net)
            state.history[k].append(
                {"epoch": state.epoch, "train": round(train_loss, 6), "val": round(val_loss, 6)}
            )
            state.epoch += 1
            state.seconds = time.perf_counter() - t_run
            bar.set_postfix(member=k, train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
            bar.update(1)
            done_epochs = k * settings.epochs + state.epoch
            torch.save(
                {
                    "config": json.dumps(config.to_json(), sort_keys=True),
                    "member": k,
                    "epoch": state.epoch,
                    "best": state.best,
                    "best_epoch": state.best_epoch,
                    "history": json.dumps(state.history),
                    "seconds": state.seconds,
                    "members": members,
                    "net": parameters_of(net),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "best_params": best_params,
                },
                ckpt_path,
            )
            if stop_after is not None and done_epochs >= stop_after:
                bar.close()
                return {}
        members.append(best_params)
        logger.info("member %d: best loss %.4f at epoch %d", k, state.best, state.best_epoch)
        state.member += 1
        state.epoch = 0
    bar.close()
    train_seconds = time.perf_counter() - t_run
    nets = []
    for params in members:
        net = build_net(config, torch.float64)
        net.load_state_dict(params, strict=False)
        nets.append(net)
    calibration, bank, bank_species = _calibrate(nets, config, train_p, val_p, settings)
    meta: dict[str, Any] = {
        "kind": "structure -> force constants (e3nn)",
        "units": {"fc": "eV/A^2", "lengths": "Angstrom", "frequencies": "THz"},
        "config": config.to_json(),
        "elements": [_sym(z) for z in config.species],
        "distance": calibration,
        "training": {
            "settings": asdict(settings),
            "n_train": len(train_p),
            "n_val": len(val_p),
            "left_out_without_fcs": empty,
            "train_seconds": round(train_seconds, 1),
            "history": state.history,
            "best_epochs": [
                int(np.argmin([h["val"] if val_p else h["train"] for h in hist]))
                for hist in state.history
            ],
            "loss": "per crystal: |dPhi|^2/|Phi|^2 (bonds + self) + w_dyn |dD(q)|^2/|D(q)|^2",
        },
        "provenance": {
            "training_set_fingerprint": fingerprint(train_e),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "python": host()["python"],
            **(provenance or {}),
        },
    }
    save_fc_model(out, nets=nets, bank=bank, bank_species=bank_species, meta=meta)
    ckpt_path.unlink(missing_ok=True)
    return json.loads((out / "model.json").read_text())


def _sym(z: int) -> str:
    from ase.data import chemical_symbols

    return str(chemical_symbols[z])


def _calibrate(
    nets: Sequence[FCNet],
    config: NetConfig,
    train_p: Sequence[Prepared],
    val_p: Sequence[Prepared],
    settings: TrainSettings,
) -> tuple[dict[str, Any], NDArray[np.float64], NDArray[np.int64]]:
    """Descriptor standardisation, leave-one-crystal-out distance scale, spread threshold."""
    index = {z: k for k, z in enumerate(config.species)}
    descs = [atom_descriptors(p.graph) for p in train_p]
    species = np.concatenate([p.graph.numbers for p in train_p])
    keys = np.concatenate([[p.key] * p.graph.n_atoms for p in train_p])
    allx = np.concatenate(descs)
    mean = allx.mean(axis=0)
    std = allx.std(axis=0)
    std = std + 0.1 * float(std.mean()) + 1e-9  # floor: features that barely vary in training
    bank = (allx - mean) / std
    loco = []
    for p, d in zip(train_p, descs, strict=True):
        found = []
        for i, z in enumerate(p.graph.numbers.tolist()):
            others = bank[(species == z) & (keys != p.key)]
            if len(others):  # elements of this crystal only are skipped
                found.append(float(np.linalg.norm(others - (d[i] - mean) / std, axis=1).min()))
        if found:
            loco.append(max(found))
    # Without any element shared between crystals there is nothing to calibrate on: scale 1.
    scale = float(np.percentile(loco, 95)) if loco else 1.0
    scale = scale if scale > 1e-6 else 1.0
    # Relative ensemble spread on the validation crystals (or training ones without val).
    spreads = []
    for p in val_p or train_p:
        batch = collate([p.graph], index, torch.float64)
        with torch.no_grad():
            outs = [torch.cat([net(batch)[1], net(batch)[0]]).numpy() for net in nets]
        m = np.stack(outs)
        norm = max(float(np.linalg.norm(m.mean(axis=0))), 1e-12)
        spreads.append(float(np.linalg.norm(m.std(axis=0))) / norm)
    if settings.max_relative_spread > 0:
        max_spread = settings.max_relative_spread
    elif len(nets) > 1 and spreads:
        max_spread = round(2.0 * float(np.percentile(spreads, 95)), 4)
    else:
        max_spread = math.inf
    calibration = {
        "descriptor": "model_server.structure_fc.graph.atom_descriptors (radial distributions of "
        "the "
        "neighbours, counted and covalent-radius weighted); nearest training atom of the "
        "same element",
        "descriptor_mean": mean.tolist(),
        "descriptor_std": std.tolist(),
        "scale": scale,
        "scale_rule": "95th percentile over training crystals of the leave-one-crystal-out "
        "max-over-atoms nearest-neighbour distance (standardised descriptors)",
        "max_distance": settings.max_distance,
        "max_relative_spread": max_spread if math.isfinite(max_spread) else 1e9,
        "spread_rule": "2 x the 95th percentile of the relative ensemble spread on the "
        "validation crystals",
        "n_bank_atoms": len(bank),
    }
    return calibration, bank, species


# --------------------------------------------------------------------------------------
# Evaluation


def dos_metrics(
    numbers: NDArray[np.int64],
    frac: NDArray[np.float64],
    pairs_ref: NDArray[np.int64],
    fc_ref: NDArray[np.float64],
    pairs_pred: NDArray[np.int64],
    fc_pred: NDArray[np.float64],
    mesh: tuple[int, int, int] = EVAL_MESH,
) -> dict[str, float]:
    """DOS comparison of two force-constant sets of one crystal (see the module docstring).

    Returns
    -------
    ``cosine`` (DOS cosine similarity), ``mean_ref_meV``, ``mean_pred_meV`` (mean frequency
    over all modes of the mesh), ``min_pred_thz``, ``min_ref_thz`` (lowest frequency),
    ``stable_pred`` (1.0 or 0.0).
    """
    ref = mesh_frequencies(numbers, frac, pairs_ref, fc_ref, mesh).frequencies * THZ_TO_MEV
    pred = mesh_frequencies(numbers, frac, pairs_pred, fc_pred, mesh).frequencies * THZ_TO_MEV
    top = 1.2 * max(float(np.abs(ref).max()), float(np.abs(pred).max())) + 5.0
    energies = np.arange(DOS_EMIN_MEV, top, DOS_STEP_MEV)
    g_ref = dos_histogram(ref, energies, DOS_SIGMA_MEV)
    g_pred = dos_histogram(pred, energies, DOS_SIGMA_MEV)
    cosine = float(g_ref @ g_pred / (np.linalg.norm(g_ref) * np.linalg.norm(g_pred)))
    return {
        "cosine": cosine,
        "mean_ref_meV": float(ref.mean()),
        "mean_pred_meV": float(pred.mean()),
        "min_ref_thz": float(ref.min() / THZ_TO_MEV),
        "min_pred_thz": float(pred.min() / THZ_TO_MEV),
        "stable_pred": float(pred.min() / THZ_TO_MEV >= -STABILITY_TOL_THZ),
    }


def evaluate(
    model: FCModel, entries: Sequence[FCSampleLike], split: str = "test"
) -> dict[str, Any]:
    """DOS metrics of the model on one split of the database.

    Returns
    -------
    A JSON-ready report: per-crystal rows and the summary (mean cosine similarity, mean
    absolute and relative error of the mean frequency, fraction predicted stable, how many
    were in domain and the same figures for those, entries skipped for unknown elements).
    """
    from model_server.structure_fc.graph import FCModelError

    rows = []
    skipped = []
    t0 = time.perf_counter()
    for e in entries:
        if e.split != split:
            continue
        if float(np.abs(e.fc).max()) < MIN_FC:
            skipped.append(
                {"name": e.name, "reason": "the database's force constants are all zero"}
            )
            continue
        try:
            pred = model.predict(e.numbers, e.lattice, e.frac)
        except FCModelError as err:
            skipped.append({"name": e.name, "reason": str(err).split(":")[0]})
            continue
        m = dos_metrics(e.numbers, e.frac, e.pairs, e.fc, pred.pairs, pred.fc)
        rows.append(
            {
                "name": e.name,
                "prototype": e.prototype,
                **{k: round(v, 5) for k, v in m.items()},
                "distance": round(pred.distance, 4),
                "relative_spread": round(pred.relative_spread, 5),
                "in_domain": pred.in_domain,
            }
        )

    def summary(sel: list[dict[str, Any]]) -> dict[str, Any]:
        if not sel:
            return {"n": 0}
        ref = np.array([r["mean_ref_meV"] for r in sel])
        pred = np.array([r["mean_pred_meV"] for r in sel])
        return {
            "n": len(sel),
            "dos_cosine_mean": round(float(np.mean([r["cosine"] for r in sel])), 4),
            "dos_cosine_median": round(float(np.median([r["cosine"] for r in sel])), 4),
            "dos_cosine_min": round(float(np.min([r["cosine"] for r in sel])), 4),
            "mean_freq_abs_error_meV": round(float(np.mean(np.abs(pred - ref))), 3),
            "mean_freq_rel_error": round(float(np.mean(np.abs(pred - ref) / np.abs(ref))), 4),
            "fraction_stable": round(float(np.mean([r["stable_pred"] for r in sel])), 4),
        }

    return {
        "split": split,
        "dos": {
            "mesh": list(EVAL_MESH),
            "sigma_meV": DOS_SIGMA_MEV,
            "step_meV": DOS_STEP_MEV,
            "energies": f"{DOS_EMIN_MEV} meV to 1.2 x max |frequency| of both + 5 meV",
            "stability_tolerance_thz": STABILITY_TOL_THZ,
        },
        "summary": summary(rows),
        "summary_in_domain": summary([r for r in rows if r["in_domain"]]),
        "summary_out_of_domain": summary([r for r in rows if not r["in_domain"]]),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------
# Command line


def _load_entries(db: str | None, reference: bool) -> tuple[list[Any], dict[str, Any]]:
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


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m model_server.structure_fc.model {train,evaluate}``; exit 0, or 2 with a
    message."""
    parser = argparse.ArgumentParser(prog="python -m model_server.structure_fc.model")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train the ensemble and write the model directory")
    tr.add_argument("--db", default=None, help="FC database (default: the committed one)")
    tr.add_argument("--reference", action="store_true", help="train on the shipped reference FCs")
    tr.add_argument("--out", default="models/fc_e3nn")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--quiet", action="store_true")
    tr.add_argument("--no-evaluate", action="store_true", help="skip the test-split evaluation")
    defaults = TrainSettings()
    for f in TrainSettings.__dataclass_fields__:
        val = getattr(defaults, f)
        flag = "--" + f.replace("_", "-")
        if isinstance(val, bool):
            tr.add_argument(flag, action=argparse.BooleanOptionalAction, default=val, dest=f)
        else:
            tr.add_argument(flag, type=type(val), default=val, dest=f)
    ev = sub.add_parser("evaluate", help="DOS metrics on a split of the database")
    ev.add_argument("--db", default=None)
    ev.add_argument("--model", default=None)
    ev.add_argument("--split", default="test")
    ev.add_argument("--json", action="store_true", help="print the whole report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            settings = TrainSettings(
                **{f: getattr(args, f) for f in TrainSettings.__dataclass_fields__}
            )
            entries, info = _load_entries(args.db, args.reference)
            info["command"] = "python -m model_server.structure_fc.model " + " ".join(
                sys.argv[1:] if argv is None else list(argv)
            )
            meta = train(
                entries,
                args.out,
                settings,
                resume=args.resume,
                progress=not args.quiet,
                provenance=info,
            )
            if not args.no_evaluate and any(e.split == "test" for e in entries):
                model = load_fc_model(args.out)
                report = evaluate(model, entries, "test")
                _store_evaluation(Path(args.out), report)
                print(json.dumps(report["summary"], indent=1))
            else:
                print(json.dumps(meta["training"]["best_epochs"]))
        else:
            entries, _ = _load_entries(args.db, False)
            model = load_fc_model(args.model)
            report = evaluate(model, entries, args.split)
            print(json.dumps(report if args.json else report["summary"], indent=1))
    except (ModelServerError, SimulationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _store_evaluation(out: Path, report: dict[str, Any]) -> None:
    """Add the evaluation summary to model.json (the weights, hence the version, unchanged)."""
    meta_path = out / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["evaluation"] = {k: v for k, v in report.items() if k != "rows"}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    (out / "evaluation.json").write_text(json.dumps(report, indent=1) + "\n")
