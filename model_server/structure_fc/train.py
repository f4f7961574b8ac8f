"""Training of the structure -> force-constant e3nn model.

Command line: ``steer fcmodel train --db PATH --out DIR --epochs N --seed S [--members K]
[--resume] ...`` (:mod:`steering.cli.fcmodel`). The entries come from
:mod:`model_server.structure_fc.dataset`; the evaluation is in
:mod:`model_server.structure_fc.evaluation`.

**Targets.** For each entry the model's bond graph (cutoff ``NetConfig.cutoff``) is built and
the database's blocks are matched to its bonds by ``(i, j, n1, n2, n3)``; a model bond that
the database does not list is a zero target when it is shorter than the entry's longest
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
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from model_server.exceptions import TrainingError
from model_server.structure_fc.dataset import MIN_FC, FCSampleLike, crystal_key, fingerprint
from model_server.structure_fc.graph import (
    PeriodicGraph,
    atom_descriptors,
    build_graph,
    match_pairs,
)
from model_server.structure_fc.model import build_net, parameters_of, save_fc_model
from model_server.structure_fc.network import (
    FCNet,
    GraphBatch,
    NetConfig,
    collate,
    element_features,
)
from model_server.structure_fc.settings import TrainSettings
from simulations.lattice.pair_phonons import dynamical_matrices
from simulations.provenance import git_commit, host

__all__ = [
    "Prepared",
    "TrainSettings",
    "batch_loss",
    "prepare",
    "train",
]

logger = logging.getLogger(__name__)

#: Floor of the per-crystal loss normalisation, eV/A^2 per tensor component.
LOSS_FLOOR = 0.02


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
    train_e, val_e, empty = _splits(entries)
    train_p, val_p, config = _prepare_splits(train_e, val_e, settings, t_start)
    ckpt_path = out / "checkpoint.pt"
    state = _Progress()
    members: list[dict[str, torch.Tensor]] = []
    resumed: dict[str, Any] | None = None
    if resume and ckpt_path.is_file():
        state, members, resumed = _resume_from(ckpt_path, config)
    steps_per_epoch = math.ceil(len(train_p) / settings.batch_size)
    if settings.max_steps:
        steps_per_epoch = min(steps_per_epoch, settings.max_steps)
    bar = tqdm(
        total=settings.members * settings.epochs,
        initial=state.member * settings.epochs + state.epoch,
        desc="fc_e3nn",
        unit="epoch",
        disable=not progress,
        file=sys.stderr,
    )
    run = _Run(
        settings=settings,
        config=config,
        index={z: k for k, z in enumerate(config.species)},
        train_p=train_p,
        val_p=val_p,
        steps_per_epoch=steps_per_epoch,
        ckpt_path=ckpt_path,
        bar=bar,
        t_run=time.perf_counter() - state.seconds,
        stop_after=stop_after,
    )
    while state.member < settings.members:
        best_params = _train_member(run, state, members, resumed)
        resumed = None
        if best_params is None:  # stopped by stop_after
            bar.close()
            return {}
        members.append(best_params)
        logger.info(
            "member %d: best loss %.4f at epoch %d", state.member, state.best, state.best_epoch
        )
        state.member += 1
        state.epoch = 0
    bar.close()
    training = {
        "settings": asdict(settings),
        "n_train": len(train_p),
        "n_val": len(val_p),
        "left_out_without_fcs": empty,
        "train_seconds": round(time.perf_counter() - run.t_run, 1),
        "history": state.history,
        "best_epochs": [
            int(np.argmin([h["val"] if val_p else h["train"] for h in hist]))
            for hist in state.history
        ],
        "loss": "per crystal: |dPhi|^2/|Phi|^2 (bonds + self) + w_dyn |dD(q)|^2/|D(q)|^2",
    }
    _save(out, run, members, training, fingerprint(train_e), provenance)
    ckpt_path.unlink(missing_ok=True)
    return json.loads((out / "model.json").read_text())


def _splits(
    entries: Sequence[FCSampleLike],
) -> tuple[list[FCSampleLike], list[FCSampleLike], list[str]]:
    """The ``train`` and ``val`` entries with force constants, and the names of those left
    out for having none (below :data:`MIN_FC`).

    Raises
    ------
    TrainingError
        No ``train`` entry to fit on.
    """
    empty = sorted(e.name for e in entries if float(np.abs(e.fc).max()) < MIN_FC)
    if empty:
        logger.warning("left out %d entries without force constants: %s", len(empty), empty)
    usable = [e for e in entries if e.name not in set(empty)]
    train_e = [e for e in usable if e.split == "train"]
    if not train_e:
        raise TrainingError("no entries with split 'train' to fit the model on")
    return train_e, [e for e in usable if e.split == "val"], empty


def _save(
    out: Path,
    run: _Run,
    members: Sequence[dict[str, torch.Tensor]],
    training: dict[str, Any],
    training_set_fingerprint: str,
    provenance: dict[str, Any] | None,
) -> None:
    """Build the float64 ensemble of the members' best parameters, calibrate its distance
    and spread, and write the model directory."""
    nets = []
    for params in members:
        net = build_net(run.config, torch.float64)
        net.load_state_dict(params, strict=False)
        nets.append(net)
    calibration, bank, bank_species = _calibrate(
        nets, run.config, run.train_p, run.val_p, run.settings
    )
    meta = _model_meta(run.config, calibration, training, training_set_fingerprint, provenance)
    save_fc_model(out, nets=nets, bank=bank, bank_species=bank_species, meta=meta)


def _prepare_splits(
    train_e: Sequence[FCSampleLike],
    val_e: Sequence[FCSampleLike],
    settings: TrainSettings,
    t_start: float,
) -> tuple[list[Prepared], list[Prepared], NetConfig]:
    """Prepare the training and validation crystals and choose the network's configuration
    (validation crystals with an element the training set lacks are left out)."""
    train_p = [prepare(e, settings.cutoff) for e in train_e]
    config = _net_config(settings, train_p)
    known = set(config.species)
    val_p = [prepare(e, settings.cutoff) for e in val_e if set(e.numbers.tolist()) <= known]
    logger.info(
        "prepared %d train / %d val crystals in %.1f s; %d elements, %.1f bonds per atom",
        len(train_p),
        len(val_p),
        time.perf_counter() - t_start,
        len(config.species),
        config.avg_neighbours,
    )
    return train_p, val_p, config


def _resume_from(
    ckpt_path: Path, config: NetConfig
) -> tuple[_Progress, list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Progress, finished members and the raw checkpoint of an interrupted run.

    Raises
    ------
    TrainingError
        The checkpoint was written for another network configuration (other data or
        settings).
    """
    resumed: dict[str, Any] = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if resumed.get("config") != json.dumps(config.to_json(), sort_keys=True):
        raise TrainingError(
            f"{ckpt_path} was written for other data or settings; remove it or train "
            "without --resume"
        )
    state = _Progress(
        member=int(resumed["member"]),
        epoch=int(resumed["epoch"]),
        best=float(resumed["best"]),
        best_epoch=int(resumed["best_epoch"]),
        history=json.loads(resumed["history"]),
        seconds=float(resumed["seconds"]),
    )
    return state, list(resumed["members"]), resumed


@dataclass(frozen=True, slots=True, kw_only=True)
class _Run:
    """What the training of every member shares."""

    settings: TrainSettings
    config: NetConfig
    index: dict[int, int]  # atomic number -> embedding row
    train_p: list[Prepared]
    val_p: list[Prepared]
    steps_per_epoch: int
    ckpt_path: Path
    bar: Any  # tqdm progress bar
    t_run: float  # perf_counter() at the start of the run, less the resumed run's seconds
    stop_after: int | None


def _train_member(
    run: _Run,
    state: _Progress,
    members: list[dict[str, torch.Tensor]],
    resumed: dict[str, Any] | None,
) -> dict[str, torch.Tensor] | None:
    """Train member ``state.member`` (from ``resumed`` if it holds this member mid-way),
    writing a checkpoint after every epoch.

    Returns
    -------
    The parameters of its best epoch, or ``None`` when ``run.stop_after`` epochs are done.
    """
    settings = run.settings
    k = state.member
    torch.manual_seed(settings.seed + k)
    net = build_net(run.config, torch.float32).train()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
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
    while state.epoch < settings.epochs:
        train_loss = _train_epoch(run, net, opt, k, state.epoch)
        sched.step()
        val_loss = _evaluate_loss(net, run.val_p, run.index, settings.w_dyn, 16)
        select = val_loss if run.val_p else train_loss
        if select < state.best:
            state.best, state.best_epoch = select, state.epoch
            best_params = parameters_of(net)
        state.history[k].append(
            {"epoch": state.epoch, "train": round(train_loss, 6), "val": round(val_loss, 6)}
        )
        state.epoch += 1
        state.seconds = time.perf_counter() - run.t_run
        run.bar.set_postfix(member=k, train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        run.bar.update(1)
        torch.save(
            {
                "config": json.dumps(run.config.to_json(), sort_keys=True),
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
            run.ckpt_path,
        )
        done_epochs = k * settings.epochs + state.epoch
        if run.stop_after is not None and done_epochs >= run.stop_after:
            return None
    return best_params


def _train_epoch(
    run: _Run, net: FCNet, opt: torch.optim.Optimizer, member: int, epoch: int
) -> float:
    """One epoch of optimiser steps on shuffled batches; returns the mean training loss."""
    settings = run.settings
    net.train()
    # One generator per (member, epoch): a resumed run draws the same batches.
    rng = np.random.default_rng([settings.seed, member, epoch])
    order = rng.permutation(len(run.train_p))
    running = 0.0
    for s in range(run.steps_per_epoch):
        chunk = [run.train_p[i] for i in order[s * settings.batch_size :][: settings.batch_size]]
        batch = collate([p.graph for p in chunk], run.index)
        loss, _ = batch_loss(net, batch, _targets(chunk, torch.float32), settings.w_dyn)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), settings.clip)
        opt.step()
        running += float(loss.detach())
    return running / run.steps_per_epoch


def _model_meta(
    config: NetConfig,
    calibration: dict[str, Any],
    training: dict[str, Any],
    training_set_fingerprint: str,
    provenance: dict[str, Any] | None,
) -> dict[str, Any]:
    """What model.json records besides the format, members and version."""
    return {
        "kind": "structure -> force constants (e3nn)",
        "units": {"fc": "eV/A^2", "lengths": "Angstrom", "frequencies": "THz"},
        "config": config.to_json(),
        "elements": [_sym(z) for z in config.species],
        "distance": calibration,
        "training": training,
        "provenance": {
            "training_set_fingerprint": training_set_fingerprint,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "torch": torch.__version__,
            "python": host()["python"],
            **(provenance or {}),
        },
    }


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
