"""``steer fcdb``: build and inspect the force-constant training database."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from steering.cli.options import JsonOpt
from steering.cli.output import command_line

__all__ = ["fcdb_app"]

fcdb_app = typer.Typer(
    help="The force-constant database: small crystals relaxed and given finite-displacement "
    "FCs by the ML force fields shipped in wheels (training data of the structure-to-FC model).",
    no_args_is_help=True,
)


@fcdb_app.command("build")
def build_cmd(
    out: Annotated[
        Path, typer.Option("--out", help="Database file (HDF5); <out>.parts/ holds partials.")
    ] = Path("simulations/data/fcdb/fcdb.h5"),
    model: Annotated[
        str, typer.Option("--model", help="Force field: sevennet-0, chgnet-0.3.0, ... or alias.")
    ] = "sevennet-0",
    limit: Annotated[
        int | None, typer.Option("--limit", help="Only the first N crystals of the catalogue.")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", help="Worker processes (default: CPU cores).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue into an existing file; skip done crystals.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over (deletes an existing file).")
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="With --resume: compute failed crystals again.")
    ] = False,
    prototype: Annotated[
        list[str] | None,
        typer.Option("--prototype", help="Only this prototype (repeatable), e.g. fcc."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Relax each crystal, compute its FCs by finite displacements, keep its stability verdict.

    Resumable (--resume) and interruptible: finished crystals are written as they come.
    """
    from simulations.fcdb.build import build_database

    try:
        summary = build_database(
            out,
            model=model,
            limit=limit,
            jobs=jobs,
            resume=resume,
            overwrite=overwrite,
            retry_failed=retry_failed,
            prototypes=prototype or None,
            progress=True,
            command=command_line(),
        )
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the finished crystals were packed
        typer.echo(
            f"interrupted: the finished crystals are in {out}; continue with --resume", err=True
        )
        raise SystemExit(130) from None
    payload = summary.to_dict()
    if as_json:
        typer.echo(json.dumps(payload))
        return
    for key, value in payload.items():
        if key != "failures":
            typer.echo(f"{key}: {value}")
    for line in summary.failures:
        typer.echo(f"failed: {line}")


@fcdb_app.command("info")
def info_cmd(
    path: Annotated[
        Path | None, typer.Argument(help="Database file (default: the committed one).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Counts per prototype, split and stability; provenance of the build."""
    from simulations.fcdb.database import database_info

    info = database_info(path)
    if as_json:
        typer.echo(json.dumps(info))
        return
    typer.echo(f"{info['path']}: {info['file_bytes'] / 1e6:.2f} MB, models {info['models']}")
    typer.echo(
        f"entries {info['n_entries']}: stable {info['n_stable']}, unstable "
        f"{info['n_unstable']} (not loaded by default), failed {info['n_failed']}"
    )
    typer.echo(f"{'prototype':<12} {'stable':>7} {'unstable':>9} {'failed':>7}")
    for proto, c in info["by_prototype"].items():
        typer.echo(f"{proto:<12} {c['stable']:>7} {c['unstable']:>9} {c['failed']:>7}")
    typer.echo("splits (stable): " + ", ".join(f"{k} {v}" for k, v in info["by_split"].items()))
