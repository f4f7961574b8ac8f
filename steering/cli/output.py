"""How ``steer`` commands print their results, and the command line they record."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import typer

from simulations.jsonutil import json_default

__all__ = ["command_line", "emit"]


def emit(payload: dict[str, Any], as_json: bool) -> None:
    """Print a command's result on stdout.

    Parameters
    ----------
    payload
        The result; numpy arrays and scalars are allowed (:func:`json_default`).
    as_json
        One line of JSON; otherwise ``key: value`` lines, with lists of more than 8 items
        shown as their length.
    """
    if as_json:
        typer.echo(json.dumps(payload, indent=None, default=json_default))
    else:
        for key, value in payload.items():
            if isinstance(value, list) and len(value) > 8:
                value = f"[{len(value)} items]"
            typer.echo(f"{key}: {value}")


def command_line() -> str:
    """This process's command line as ``steer ARGS`` (the provenance written with results)."""
    return shlex.join(["steer", *sys.argv[1:]])
