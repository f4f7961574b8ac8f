"""``steer fcmodel``: train and evaluate the structure -> force-constant e3nn model
(:mod:`model_server.structure_fc`; see docs/fc_e3nn.md).

Both commands print JSON on stdout (indented): ``train`` the test-split summary of the new
model (or its members' best epochs when there is no test split or ``--no-evaluate``),
``evaluate`` the summary or, with ``--json``, the whole report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from model_server.structure_fc.settings import TrainSettings
from steering.cli.output import command_line

__all__ = ["fcmodel_app"]

fcmodel_app = typer.Typer(
    help="The structure -> force-constant e3nn model: train it on the FC database, evaluate "
    "it on a split (DOS metrics).",
    no_args_is_help=True,
)

_D = TrainSettings()

_DbOpt = Annotated[
    Path | None, typer.Option("--db", help="FC database (default: the committed one).")
]

_ReferenceOpt = Annotated[
    bool, typer.Option("--reference", help="Train on the shipped reference FCs.")
]
_OutOpt = Annotated[Path, typer.Option("--out", help="Model directory to write.")]
_ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from <out>/checkpoint.pt.")]
_QuietOpt = Annotated[bool, typer.Option("--quiet", help="No progress bar.")]
_NoEvaluateOpt = Annotated[
    bool, typer.Option("--no-evaluate", help="Skip the test-split evaluation.")
]
_EpochsOpt = Annotated[int, typer.Option("--epochs", help="Epochs per member.")]
_SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of member 0 (member k: seed + k).")]
_MembersOpt = Annotated[int, typer.Option("--members", help="Ensemble members.")]
_BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Crystals per batch.")]
_LrOpt = Annotated[float, typer.Option("--lr", help="Initial learning rate.")]
_LrFinalOpt = Annotated[float, typer.Option("--lr-final", help="Final learning rate.")]
_WDynOpt = Annotated[float, typer.Option("--w-dyn", help="Weight of the D(q) loss.")]
_ClipOpt = Annotated[float, typer.Option("--clip", help="Gradient-norm clipping.")]
_CutoffOpt = Annotated[float, typer.Option("--cutoff", help="Bond cutoff, Angstrom.")]
_NLayersOpt = Annotated[int, typer.Option("--n-layers", help="Interaction layers.")]
_NScalarOpt = Annotated[int, typer.Option("--n-scalar", help="0e channels.")]
_NPseudoOpt = Annotated[int, typer.Option("--n-pseudo", help="0o channels.")]
_NVectorOpt = Annotated[int, typer.Option("--n-vector", help="1o+1e channels.")]
_NTensorOpt = Annotated[int, typer.Option("--n-tensor", help="2e+2o channels.")]
_LmaxOpt = Annotated[int, typer.Option("--lmax", help="Largest degree of the bond directions.")]
_NRadialOpt = Annotated[int, typer.Option("--n-radial", help="Radial basis functions.")]
_RadialHiddenOpt = Annotated[int, typer.Option("--radial-hidden", help="Width of the radial MLPs.")]
_ElementFeaturesOpt = Annotated[
    bool,
    typer.Option(
        "--element-features/--no-element-features", help="Element features in the embedding."
    ),
]
_WeightDecayOpt = Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")]
_MaxDistanceOpt = Annotated[
    float, typer.Option("--max-distance", help="In-domain distance threshold.")
]
_MaxRelativeSpreadOpt = Annotated[
    float,
    typer.Option("--max-relative-spread", help="In-domain spread threshold (0: calibrated)."),
]
_MaxStepsOpt = Annotated[
    int, typer.Option("--max-steps", help="Most steps per epoch (0: no limit).")
]
_ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch threads.")]


@fcmodel_app.command("train")
def train_cmd(
    db: _DbOpt = None,
    reference: _ReferenceOpt = False,
    out: _OutOpt = Path("models/fc_e3nn"),
    resume: _ResumeOpt = False,
    quiet: _QuietOpt = False,
    no_evaluate: _NoEvaluateOpt = False,
    epochs: _EpochsOpt = _D.epochs,
    seed: _SeedOpt = _D.seed,
    members: _MembersOpt = _D.members,
    batch_size: _BatchSizeOpt = _D.batch_size,
    lr: _LrOpt = _D.lr,
    lr_final: _LrFinalOpt = _D.lr_final,
    w_dyn: _WDynOpt = _D.w_dyn,
    clip: _ClipOpt = _D.clip,
    cutoff: _CutoffOpt = _D.cutoff,
    n_layers: _NLayersOpt = _D.n_layers,
    n_scalar: _NScalarOpt = _D.n_scalar,
    n_pseudo: _NPseudoOpt = _D.n_pseudo,
    n_vector: _NVectorOpt = _D.n_vector,
    n_tensor: _NTensorOpt = _D.n_tensor,
    lmax: _LmaxOpt = _D.lmax,
    n_radial: _NRadialOpt = _D.n_radial,
    radial_hidden: _RadialHiddenOpt = _D.radial_hidden,
    element_features: _ElementFeaturesOpt = _D.element_features,
    weight_decay: _WeightDecayOpt = _D.weight_decay,
    max_distance: _MaxDistanceOpt = _D.max_distance,
    max_relative_spread: _MaxRelativeSpreadOpt = _D.max_relative_spread,
    max_steps: _MaxStepsOpt = _D.max_steps,
    threads: _ThreadsOpt = _D.threads,
) -> None:
    """Train the ensemble on the train split, calibrate its distance, write the model
    directory, then evaluate it on the test split (stored in model.json)."""
    from model_server.structure_fc.dataset import load_entries
    from model_server.structure_fc.evaluation import evaluate, store_evaluation
    from model_server.structure_fc.model import load_fc_model
    from model_server.structure_fc.train import train

    settings = TrainSettings(
        epochs=epochs,
        seed=seed,
        members=members,
        batch_size=batch_size,
        lr=lr,
        lr_final=lr_final,
        w_dyn=w_dyn,
        clip=clip,
        cutoff=cutoff,
        n_layers=n_layers,
        n_scalar=n_scalar,
        n_pseudo=n_pseudo,
        n_vector=n_vector,
        n_tensor=n_tensor,
        lmax=lmax,
        n_radial=n_radial,
        radial_hidden=radial_hidden,
        element_features=element_features,
        weight_decay=weight_decay,
        max_distance=max_distance,
        max_relative_spread=max_relative_spread,
        max_steps=max_steps,
        threads=threads,
    )
    entries, info = load_entries(db, reference)
    info["command"] = command_line()
    meta = train(entries, out, settings, resume=resume, progress=not quiet, provenance=info)
    if not no_evaluate and any(e.split == "test" for e in entries):
        report = evaluate(load_fc_model(out), entries, "test")
        store_evaluation(out, report)
        typer.echo(json.dumps(report["summary"], indent=1))
    else:
        typer.echo(json.dumps(meta["training"]["best_epochs"]))


@fcmodel_app.command("evaluate")
def evaluate_cmd(
    db: _DbOpt = None,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model directory (default: the committed one).")
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="Database split: train, val or test.")
    ] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report.")] = False,
) -> None:
    """DOS metrics of the model on a split of the database."""
    from model_server.structure_fc.dataset import load_entries
    from model_server.structure_fc.evaluation import evaluate
    from model_server.structure_fc.model import load_fc_model

    entries, _ = load_entries(db, False)
    report = evaluate(load_fc_model(model), entries, split)
    typer.echo(json.dumps(report if as_json else report["summary"], indent=1))
